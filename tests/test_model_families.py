"""Models shaped like the real families (Llama-3, Qwen2.5, Gemma, Mistral), end to end.

Each family's tiny random model is saved by the current ``save_pretrained`` with the family's
special tokens, chat template (``chat_template.jinja``), EOS list (``generation_config.json``)
and tied or untied embeddings. The tests check what a new user relies on: the client's tokenizer
is the model's (template, EOS), chat datums match ``apply_chat_template`` with weight on the
assistant's tokens only, and a trained session exports BASE and ADAPTER directories that
transformers and peft load back with the same logprobs, template and EOS.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from trainer_client import AdamParams, AsyncServiceClient, Datum, SamplingParams
from trainer_server import ServerConfig, TrainerServer
from trainer_server.model_families import FAMILIES, build_family_model

NAMES = sorted(FAMILIES)
MESSAGES = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6, of course."},
]
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2.5": "<|im_end|>", "gemma": "<end_of_turn>", "mistral": "</s>"}
"""What closes an assistant turn in each family's template (trained, it teaches the model to stop)."""


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_family_model(root / name, name, max_position_embeddings=128) for name in NAMES}


@pytest_asyncio.fixture
async def service(family_dirs: dict[str, Path], tmp_path: Path) -> AsyncIterator[AsyncServiceClient]:
    config = ServerConfig(models=family_dirs, port=0, device="cpu", checkpoint_dir=tmp_path / "ckpt")
    async with TrainerServer(config) as server, AsyncServiceClient(server.address) as client:
        yield client


def local_tokenizer(family_dirs: dict[str, Path], name: str) -> Any:
    return AutoTokenizer.from_pretrained(family_dirs[name])


def test_saved_like_the_family(family_dirs: dict[str, Path]) -> None:
    for name, spec in FAMILIES.items():
        d = family_dirs[name]
        config = json.loads((d / "config.json").read_text())
        generation = json.loads((d / "generation_config.json").read_text())
        assert config["tie_word_embeddings"] is spec.tied, name
        assert (d / "chat_template.jinja").read_text() == spec.chat_template
        tok = local_tokenizer(family_dirs, name)
        eos = generation["eos_token_id"]
        assert [tok.convert_ids_to_tokens(i) for i in (eos if isinstance(eos, list) else [eos])] == list(
            spec.generation_eos
        )
        assert tok.eos_token == spec.eos and tok.bos_token == spec.bos and tok.pad_token == spec.pad
        first = tok("hi")["input_ids"][0]
        assert (first == tok.bos_token_id) is (spec.bos is not None), f"{name}: BOS added as the family does"


@pytest.mark.parametrize("name", NAMES)
def test_chat_datum_matches_apply_chat_template(family_dirs: dict[str, Path], name: str) -> None:
    tok = local_tokenizer(family_dirs, name)
    expected = tok.apply_chat_template(MESSAGES, tokenize=True)["input_ids"]
    for train_on, trained_text in (
        ("all_assistant_messages", f"4{END_OF_TURN[name]}6, of course.{END_OF_TURN[name]}"),
        ("last_assistant_message", f"6, of course.{END_OF_TURN[name]}"),
    ):
        datum = Datum.from_messages(tok, MESSAGES, train_on=train_on)
        assert [*datum.model_input.tolist(), int(datum.target_tokens[-1])] == expected
        trained = [t for t, w in zip(datum.target_tokens.tolist(), datum.weights.tolist(), strict=True) if w]
        assert tok.decode(trained) == trained_text, train_on
        assert set(datum.weights.tolist()) == {0.0, 1.0}

    every = Datum.from_messages(tok, MESSAGES, train_on="all_tokens")
    assert bool((every.weights == 1).all())
    short = Datum.from_messages(tok, MESSAGES, max_length=len(expected) - 3)
    assert short.model_input.tolist() == expected[: len(expected) - 3]
    with pytest.raises(ValueError, match="nothing to train on"):
        Datum.from_messages(tok, MESSAGES, max_length=4)
    with pytest.raises(ValueError, match="train_on must be one of"):
        Datum.from_messages(tok, MESSAGES, train_on="everything")
    with pytest.raises(ValueError, match="no assistant message"):
        Datum.from_messages(tok, MESSAGES[:1])


def test_chat_datum_is_cut_to_the_models_length(family_dirs: dict[str, Path]) -> None:
    tok = local_tokenizer(family_dirs, "qwen2.5")
    assert tok.model_max_length == 128
    long = [{"role": "user", "content": "one two three " * 10}, {"role": "assistant", "content": "four " * 80}]
    datum = Datum.from_messages(tok, long)
    assert len(datum) == 128
    assert datum.weights.sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_from_text_appends_the_models_eos(family_dirs: dict[str, Path], name: str) -> None:
    tok = local_tokenizer(family_dirs, name)
    datum = Datum.from_text(tok, "Q: 2 + 2 =", " 4")
    assert tok.convert_ids_to_tokens(int(datum.target_tokens[-1])) == FAMILIES[name].eos
    assert (int(datum.model_input[0]) == tok.bos_token_id) is (FAMILIES[name].bos is not None)


async def test_client_tokenizer_is_the_models(service: AsyncServiceClient, family_dirs: dict[str, Path]) -> None:
    for name, spec in FAMILIES.items():
        files = await service.get_tokenizer_files(name)
        assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= set(
            files
        )
        tok = await service.get_tokenizer(name)
        assert isinstance(tok, PreTrainedTokenizerFast)
        assert tok.chat_template == spec.chat_template
        assert tok.eos_token == spec.eos
        assert tok.apply_chat_template(MESSAGES) == local_tokenizer(family_dirs, name).apply_chat_template(MESSAGES)
        ids = tok.apply_chat_template(MESSAGES, tokenize=True)["input_ids"]
        assert spec.eos not in tok.decode(ids, skip_special_tokens=True)


def logprobs_of(model: Any, datum: Datum) -> torch.Tensor:
    with torch.no_grad():
        logits = model(datum.model_input[None]).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, datum.target_tokens[:, None])[:, 0]


@pytest.mark.parametrize("name", NAMES)
async def test_train_sample_export_and_reload(
    service: AsyncServiceClient, family_dirs: dict[str, Path], tmp_path: Path, name: str
) -> None:
    from peft import PeftModel

    tc = await service.create_training_client(name, lora_rank=4)
    tok = await tc.get_tokenizer()
    datum = Datum.from_messages(tok, MESSAGES)
    for _ in range(2):
        fb = tc.forward_backward([datum], "cross_entropy")
        step = tc.optim_step(AdamParams(learning_rate=5e-2))
        await fb
        assert not (await step).no_gradient
    prompt = tok.apply_chat_template(MESSAGES[:1], add_generation_prompt=True, tokenize=True)["input_ids"]
    sample = await tc.sample(prompt, 2, SamplingParams(max_tokens=6, seed=0))
    assert all(0 < len(s.tokens) <= 6 and max(s.tokens) < len(tok) for s in sample.sequences)
    trained = (await tc.forward([datum])).logprobs[0]

    await tc.save_checkpoint(f"{name}-base", "base", dtype="float32")
    await tc.save_checkpoint(f"{name}-adapter", "adapter")
    base_dir = await service.download_checkpoint(f"{name}-base", tmp_path / "base", progress=False)
    adapter_dir = await service.download_checkpoint(f"{name}-adapter", tmp_path / "adapter", progress=False)
    await tc.close()

    for exported in (base_dir, adapter_dir):  # the template and the EOS list travel with the weights
        assert (exported / "chat_template.jinja").read_text() == FAMILIES[name].chat_template
        assert (
            json.loads((exported / "generation_config.json").read_text())["eos_token_id"]
            == json.loads((family_dirs[name] / "generation_config.json").read_text())["eos_token_id"]
        )
    reloaded_tok = AutoTokenizer.from_pretrained(base_dir)
    assert reloaded_tok.eos_token == FAMILIES[name].eos
    assert reloaded_tok.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert (
        base.generation_config.eos_token_id
        == AutoModelForCausalLM.from_pretrained(family_dirs[name]).generation_config.eos_token_id
    )
    torch.testing.assert_close(logprobs_of(base, datum), trained, atol=1e-4, rtol=1e-4)
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(family_dirs[name], dtype=torch.float32), adapter_dir
    )
    torch.testing.assert_close(logprobs_of(with_adapter, datum), trained, atol=1e-4, rtol=1e-4)
    untrained = logprobs_of(AutoModelForCausalLM.from_pretrained(family_dirs[name], dtype=torch.float32), datum)
    assert float((trained - untrained).abs().max()) > 1e-3  # the training really changed the weights


async def test_large_base_export_logs_its_progress(
    service: AsyncServiceClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from trainer_server import _export

    monkeypatch.setattr(_export, "_PROGRESS_MIN_BYTES", 0)  # every export counts as large
    tc = await service.create_training_client("llama3", lora_rank=4)
    with caplog.at_level(logging.INFO, logger="trainer_server.export"):
        await tc.save_checkpoint("llama3-logged", "base", dtype="float32")
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer_server.export"]
    assert any("GiB to gather" in line for line in lines), lines
    assert [line for line in lines if "% gathered" in line][-1].startswith("BASE export of llama3: 100% gathered")
    assert any("written in" in line for line in lines), lines
    await tc.close()
