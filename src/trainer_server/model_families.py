"""Tiny random models shaped like real Hugging Face families: Llama-3, Qwen2.5, Gemma, Mistral.

Tests need models that look, on disk and to ``transformers``, like the checkpoints users serve:
the family's architecture and config conventions (tied or untied embeddings, a list of EOS ids
in ``generation_config.json``), its special tokens and its chat template, saved by the current
``save_pretrained`` (which writes the template as ``chat_template.jinja``). Nothing can be
downloaded here, so each family is rebuilt from its public conventions:

=========  ===================  ======  ==================  ==========================  ========
family     architecture         tied    bos                 eos (tokenizer; generation)  pad
=========  ===================  ======  ==================  ==========================  ========
llama3     LlamaForCausalLM     no      <|begin_of_text|>   <|eot_id|>; +<|end_of_text|>  none
qwen2.5    Qwen2ForCausalLM     yes     none                <|im_end|>; +<|endoftext|>    <|endoftext|>
gemma      GemmaForCausalLM     yes     <bos>               <eos>; +<end_of_turn>         <pad>
mistral    MistralForCausalLM   no      <s>                 </s>                        none
=========  ===================  ======  ==================  ==========================  ========

The vocabulary is the built-in byte-level BPE (:mod:`trainer_server.builtin_models`) plus the
family's special tokens; the tokenizer adds the family's BOS where the real one does (Llama-3,
Gemma, Mistral). Chat templates are written here after the families' published ones (Llama-3
Instruct, Qwen2.5 Instruct with its default system prompt, Gemma-it, Mistral-Instruct). Builds
are deterministic, take about a second, and are written in a temp sibling renamed into place.

From the shell: ``python -m trainer_server.model_families qwen2.5 models/tiny-chat``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer_server.builtin_models import _trained_tokenizer_json, save_random_model

__all__ = ["FAMILIES", "Family", "build_family_model", "main"]

_LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

_MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    """How one model family looks on disk.

    Attributes:
        name: the family's name (a key of :data:`FAMILIES`).
        architecture: ``transformers`` config ``model_type``.
        special_tokens: added special tokens, in id order after the BPE vocabulary.
        bos: BOS token (None: the family has none); the tokenizer prepends it on encode.
        eos: the tokenizer's EOS token (what ends an assistant turn in instruct models).
        generation_eos: the EOS tokens of ``generation_config.json`` (all that stop generation).
        pad: the padding token, or None.
        tied: input and output embeddings share one tensor.
        chat_template: the family's Jinja chat template.
    """

    name: str
    architecture: str
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    generation_eos: tuple[str, ...]
    pad: str | None
    tied: bool
    chat_template: str
    extra_config: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llama3",
            architecture="llama",
            special_tokens=(
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ),
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            generation_eos=("<|end_of_text|>", "<|eot_id|>"),
            pad=None,
            tied=False,
            chat_template=_LLAMA3_TEMPLATE,
        ),
        Family(
            name="qwen2.5",
            architecture="qwen2",
            special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos=None,
            eos="<|im_end|>",
            generation_eos=("<|im_end|>", "<|endoftext|>"),
            pad="<|endoftext|>",
            tied=True,
            chat_template=_QWEN25_TEMPLATE,
        ),
        Family(
            name="gemma",
            architecture="gemma",
            special_tokens=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
            bos="<bos>",
            eos="<eos>",
            generation_eos=("<eos>", "<end_of_turn>"),
            pad="<pad>",
            tied=True,
            chat_template=_GEMMA_TEMPLATE,
        ),
        Family(
            name="mistral",
            architecture="mistral",
            special_tokens=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
            bos="<s>",
            eos="</s>",
            generation_eos=("</s>",),
            pad=None,
            tied=False,
            chat_template=_MISTRAL_TEMPLATE,
        ),
    )
}
"""The families :func:`build_family_model` builds, by name."""


def _tokenizer(family: Family, model_max_length: int) -> Any:
    """The family's ``PreTrainedTokenizerFast``: built-in BPE + its special tokens, template, BOS rule."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(_trained_tokenizer_json())
    raw.add_special_tokens(list(family.special_tokens))
    if family.bos is not None:
        bos_id = raw.token_to_id(family.bos)
        raw.post_processor = processors.TemplateProcessing(
            single=f"{family.bos}:0 $A:0", pair=f"{family.bos}:0 $A:0 $B:1", special_tokens=[(family.bos, bos_id)]
        )
    tokens = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad}
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=raw,
        model_max_length=model_max_length,
        chat_template=family.chat_template,
        clean_up_tokenization_spaces=False,
        **{k: v for k, v in tokens.items() if v is not None},
    )


def _config(family: Family, tokenizer: Any, *, hidden_size: int, num_layers: int, max_positions: int) -> Any:
    from transformers import AutoConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in family.special_tokens}
    eos_ids = [ids[t] for t in family.generation_eos]
    num_heads = 4
    return AutoConfig.for_model(
        family.architecture,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=family.tied,
        bos_token_id=ids[family.bos] if family.bos else None,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=ids[family.pad] if family.pad else None,
        attention_dropout=0.0,
        dtype="float32",
        **family.extra_config,
    )


def build_family_model(
    out_dir: Path,
    family: str,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_position_embeddings: int = 128,
    seed: int = 0,
) -> Path:
    """Build a tiny random model of ``family`` and save it as the family's checkpoints are saved.

    Model and tokenizer are written by ``save_pretrained`` (``config.json``,
    ``generation_config.json`` with the family's EOS list, ``model.safetensors``,
    ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``), so
    ``AutoModelForCausalLM`` and ``AutoTokenizer`` load them with no project code.

    Args:
        out_dir: the model directory (replaced if it exists).
        family: a key of :data:`FAMILIES`.
        hidden_size: model width (a multiple of 4 attention heads with an even head size).
        num_layers: transformer blocks.
        max_position_embeddings: longest sequence, also the tokenizer's ``model_max_length``.
        seed: weight initialisation seed (the caller's RNG is untouched).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: an unknown family.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}; got {family!r}")
    spec = FAMILIES[family]
    from transformers import GenerationConfig

    tokenizer = _tokenizer(spec, max_position_embeddings)
    config = _config(
        spec, tokenizer, hidden_size=hidden_size, num_layers=num_layers, max_positions=max_position_embeddings
    )

    def write(tmp_dir: Path, model: Any) -> None:
        model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        _check_saved(tmp_dir)

    return save_random_model(Path(out_dir), config, seed, write)


def _check_saved(model_dir: Path) -> None:
    """The files a current ``save_pretrained`` writes are there (the template as its own file)."""
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        if not (model_dir / name).is_file():
            raise RuntimeError(f"save_pretrained did not write {name} in {model_dir}")
    json.loads((model_dir / "tokenizer_config.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer_server.model_families FAMILY DIR``: build a model, print its directory."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m trainer_server.model_families", description="Build a tiny model shaped like a real family."
    )
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--max-position-embeddings", type=int, default=256)
    args = parser.parse_args(argv)
    print(build_family_model(args.out_dir, args.family, max_position_embeddings=args.max_position_embeddings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
