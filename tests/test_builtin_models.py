"""Tests for the locally built tiny models and tokenizer (trainer_server.builtin_models)."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from trainer_server import builtin_models
from trainer_server.builtin_models import (
    BOS_TOKEN,
    BUILTIN_MODEL_NAME,
    EOS_TOKEN,
    PAD_TOKEN,
    build_tiny_model,
    build_tokenizer,
    ensure_builtin_model,
)

TEXTS = [
    "12 + 7 = 19",
    "Question: what is 45 * 3? Answer: 135",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnewlines  ",
    "Unicode: héllo wörld, 日本語, emoji 🙂",
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "llama")


def _logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        logits: torch.Tensor = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    return logits


def test_llama_model_loads_and_matches_tokenizer(llama_dir: Path) -> None:
    _logits(llama_dir)
    config = json.loads((llama_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    assert config["model_type"] == "llama"
    assert config["num_key_value_heads"] == 2
    assert config["num_attention_heads"] == 4
    assert config["tie_word_embeddings"] is False
    assert config["attention_dropout"] == 0.0
    assert config["vocab_size"] == len(tokenizer)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    weights = load_file(llama_dir / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])


@pytest.mark.parametrize("architecture", ["qwen2", "gpt2"])
def test_other_architectures_load(tmp_path: Path, architecture: str) -> None:
    model_dir = build_tiny_model(tmp_path / architecture, architecture=architecture, hidden_size=32, num_heads=2)
    _logits(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == architecture
    assert config["tie_word_embeddings"] is False
    if architecture == "gpt2":
        assert (config["n_embd"], config["n_head"], config["n_positions"]) == (32, 2, 256)
        assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.0


def test_tokenizer_round_trips(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(hf, PreTrainedTokenizerFast)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert 400 <= raw.get_vocab_size() <= 600
    for text in TEXTS:
        ids = raw.encode(text).ids
        assert raw.decode(ids) == text
        assert hf(text)["input_ids"] == ids  # no special tokens added implicitly
        assert hf.decode(ids) == text
    # Digits are single tokens, so arithmetic is learnable.
    assert raw.encode("1234").tokens == ["1", "2", "3", "4"]
    # Special tokens are atomic and skipped on decode when asked.
    ids = hf(f"{BOS_TOKEN}1 + 1 = 2{EOS_TOKEN}")["input_ids"]
    assert ids[0] == hf.bos_token_id
    assert ids[-1] == hf.eos_token_id
    assert hf.decode(ids, skip_special_tokens=True) == "1 + 1 = 2"


def test_builds_are_byte_identical(tmp_path: Path, llama_dir: Path) -> None:
    rng_before = torch.get_rng_state()
    again = build_tiny_model(tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not disturb the caller's RNG"
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (llama_dir / name).read_bytes(), name
    other_seed = build_tiny_model(tmp_path / "seed1", seed=1, with_tokenizer=False)
    assert (other_seed / "model.safetensors").read_bytes() != (llama_dir / "model.safetensors").read_bytes()
    assert not (other_seed / "tokenizer.json").exists()


def test_rebuild_replaces_and_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model"
    build_tiny_model(out, with_tokenizer=False)
    (out / "stale.txt").write_text("old")
    build_tiny_model(out, architecture="gpt2", hidden_size=32, num_heads=2)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(builtin_models, "_write_tokenizer", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_model(tmp_path / "broken", hidden_size=32, num_heads=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"architecture": "mamba"}, "architecture must be one of"),
        ({"hidden_size": 30, "num_heads": 4}, "multiple of num_heads"),
        ({"vocab_size": 100}, "smaller than the tokenizer's vocabulary"),
        ({"num_layers": 0}, "num_layers must be at least 1"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_tiny_model(tmp_path / "bad", **kwargs)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_ensure_builtin_model_is_idempotent(
    tmp_path: Path, llama_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINER_HOME", str(tmp_path / "home"))
    with caplog.at_level(logging.INFO, logger="trainer_server.builtin_models"):
        model_dir = ensure_builtin_model()
    assert model_dir == tmp_path / "home" / "models" / BUILTIN_MODEL_NAME
    assert any("saved it to" in r.getMessage() and str(model_dir) in r.getMessage() for r in caplog.records)
    assert (model_dir / "model.safetensors").read_bytes() == (llama_dir / "model.safetensors").read_bytes()
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns

    caplog.clear()
    calls: list[Path] = []
    monkeypatch.setattr(builtin_models, "build_tiny_model", lambda out_dir, **_: calls.append(out_dir))
    with caplog.at_level(logging.INFO, logger="trainer_server.builtin_models"):
        assert ensure_builtin_model() == model_dir
    assert calls == []
    assert not caplog.records
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_ensure_builtin_model_builds_once_under_concurrency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = builtin_models.build_tiny_model
    calls: list[Path] = []

    def counting_build(out_dir: Path, **kwargs: object) -> Path:
        calls.append(out_dir)
        return real_build(out_dir, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtin_models, "build_tiny_model", counting_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_builtin_model(tmp_path))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / BUILTIN_MODEL_NAME] * 4
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{BUILTIN_MODEL_NAME}.lock", BUILTIN_MODEL_NAME]
