"""Base models: loaded once from local Hugging Face directories, shared by sessions.

A base model is loaded through ``transformers.AutoModelForCausalLM.from_pretrained``, the
same path a user's real checkpoint takes, with remote code disabled (weights come only
from safetensors, or from ``torch.load(weights_only=True)`` inside transformers). Its
parameters are frozen; sessions train copies (full fine-tune) or adapters whose frozen
base parameters are the very same tensors (LoRA), so LoRA sessions cost only their
adapter and optimizer state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer_server.core.types import ModelSummary

__all__ = ["TOKENIZER_FILES", "BaseModel", "load_base_model"]

log = logging.getLogger("trainer_server.models")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Tokenizer and generation files of a model directory: streamed by GetTokenizer and copied into
BASE and ADAPTER exports, so the client's tokenizer and an exported model keep the chat template
(``chat_template.jinja`` since transformers 4.50) and the EOS tokens (``generation_config.json``)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    """A loaded, frozen base model and what clients need to know about it."""

    name: str
    path: Path
    model: Any  # transformers.PreTrainedModel
    device: torch.device
    vocab_size: int
    max_sequence_length: int
    tokenizer_files: dict[str, bytes]

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end a sample (from the generation config, else the model config)."""
        for config in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(config, "eos_token_id", None)
            if eos is not None:
                return frozenset([eos] if isinstance(eos, int) else eos)
        return frozenset()

    @property
    def num_parameters(self) -> int:
        """Parameter count of the base model."""
        return sum(p.numel() for p in self.model.parameters())

    def summary(self) -> ModelSummary:
        """Describe the model (GetServerInfo, Tinker's capabilities)."""
        return ModelSummary(
            name=self.name,
            architecture=type(self.model).__name__,
            vocab_size=self.vocab_size,
            max_sequence_length=self.max_sequence_length,
            dtype=str(next(self.model.parameters()).dtype).removeprefix("torch."),
            num_parameters=self.num_parameters,
        )


def _max_length(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the maximum sequence length of {type(config).__name__}")


def load_base_model(name: str, path: Path, device: torch.device, dtype: str) -> BaseModel:
    """Load a causal LM from a local Hugging Face directory.

    Args:
        name: the name clients use for it.
        path: directory with ``config.json`` and weights.
        device: where to put it.
        dtype: "float32", "bfloat16" or "float16".

    Raises:
        FileNotFoundError: the directory or its config is missing.
    """
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {name!r}: {path} has no config.json (expected a Hugging Face model directory)")
    log.info("loading model %r from %s (%s on %s)", name, path, dtype, device)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], trust_remote_code=False)
    model.to(device)
    model.eval()  # no dropout: the service computes deterministic logprobs and gradients
    model.requires_grad_(False)
    tokenizer_files = {f: (path / f).read_bytes() for f in TOKENIZER_FILES if (path / f).is_file()}
    base = BaseModel(
        name=name,
        path=path,
        model=model,
        device=device,
        vocab_size=int(model.get_input_embeddings().num_embeddings),
        max_sequence_length=_max_length(model.config),
        tokenizer_files=tokenizer_files,
    )
    log.info(
        "model %r ready: %s, %.2fM parameters, vocab %d, max length %d",
        name,
        type(model).__name__,
        base.num_parameters / 1e6,
        base.vocab_size,
        base.max_sequence_length,
    )
    return base
