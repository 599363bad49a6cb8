"""Tiny, locally built models: the built-in ``tiny-llama`` and small test models.

No machine this project runs on can download weights or tokenizers, yet tests and the demo need
real models that load through the same code path as a user's checkpoint. This module builds them
from scratch:

- a byte-level BPE tokenizer (``tokenizers``), trained on a small corpus embedded here: English
  sentences plus arithmetic such as ``12 + 7 = 19`` so the demo can learn something checkable;
- a small causal LM from a ``transformers`` config (Llama with grouped-query attention, Qwen2 or
  GPT-2), randomly initialised from a seed;

both saved in Hugging Face layout (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ...), so ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load them with no project code.

Invariants:

- Deterministic: the same arguments give byte-identical ``tokenizer.json`` and
  ``model.safetensors`` on every run and in every process. Building never disturbs the caller's
  torch RNG (it runs inside ``torch.random.fork_rng``).
- Atomic: a model directory is built in a temporary sibling and renamed into place, so a crash
  never leaves a half-written model that looks whole.
- The tokenizer adds no special tokens on encode; callers prepend ``<|bos|>`` and append
  ``<|eos|>`` themselves. Digits are always split into single-digit tokens.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "BOS_TOKEN",
    "BUILTIN_MODEL_NAME",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SUPPORTED_ARCHITECTURES",
    "build_tiny_model",
    "build_tokenizer",
    "ensure_builtin_model",
    "trainer_home",
]

logger = logging.getLogger("trainer_server.builtin_models")

BUILTIN_MODEL_NAME = "tiny-llama"
"""Name under which the built-in model is served and cached."""

SUPPORTED_ARCHITECTURES = ("gpt2", "llama", "qwen2")
"""Values accepted by ``build_tiny_model(architecture=...)``."""

BOS_TOKEN = "<|bos|>"
"""Beginning-of-sequence token of the built-in tokenizer (never added automatically)."""
EOS_TOKEN = "<|eos|>"
"""End-of-sequence token of the built-in tokenizer (never added automatically)."""
PAD_TOKEN = "<|pad|>"
"""Padding token of the built-in tokenizer."""
_SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

_TOKENIZER_VOCAB_SIZE = 512
_TOKENIZER_MODEL_MAX_LENGTH = 256
_TRAINER_HOME_ENV = "TRAINER_HOME"
_DEFAULT_TRAINER_HOME = "~/.cache/trainer-service"

# Files whose presence marks a finished model directory (they are only ever renamed in together).
_MODEL_MARKER_FILES = ("config.json", "model.safetensors")

_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A small model can still learn simple patterns if the data is clean.",
    "Training a language model means predicting the next token again and again.",
    "The server keeps the weights on the accelerator while the client computes the loss.",
    "Every step of gradient descent moves the parameters a little downhill.",
    "She opened the window and the cold morning air filled the room.",
    "He wrote the numbers on the board and asked the class to add them.",
    "The river runs past the old mill and under the stone bridge.",
    "On Monday the team met to plan the next release of the software.",
    "Good tests are small, fast and check one thing at a time.",
    "The cat sat on the mat and watched the birds in the garden.",
    "Water boils at one hundred degrees at sea level.",
    "There are seven days in a week and twelve months in a year.",
    "The library opens at nine in the morning and closes at six in the evening.",
    "Please write your answer as a single number.",
    "What is the sum of the two numbers?",
    "The answer is correct, well done.",
    "The answer is wrong, try again.",
    "Question: what is two plus three? Answer: five.",
    "Question: what is ten minus four? Answer: six.",
    "If you have three apples and buy two more, you have five apples.",
    "If a train leaves at noon and travels for three hours, it arrives at three.",
    "The children played in the park until the sun went down.",
    "A good teacher explains the idea first and the details later.",
    "Reading every day makes it easier to learn new words.",
    "The weather today is sunny with a light wind from the west.",
    "They walked along the beach and collected shells in a bucket.",
    "The computer saved the file to disk before it shut down.",
    "Numbers can be added, subtracted, multiplied and divided.",
    "Zero, one, two, three, four, five, six, seven, eight, nine.",
    "The baker makes fresh bread every morning before dawn.",
    "We will meet again at the same place next week.",
    "The loss went down slowly and then it stopped changing.",
    "A checkpoint stores the weights so that training can resume later.",
    "The optimizer uses the gradients to update every parameter.",
    "It is a truth universally acknowledged that tests should pass.",
    "Once upon a time there was a tiny model that wanted to count.",
    "The doctor told him to drink more water and to sleep well.",
    "Mountains are tall, rivers are long and the sea is deep.",
    "The end of the story was happy, and everyone went home.",
)
_SUBJECTS = ("The dog", "A child", "My friend", "The teacher", "Our team", "The old man", "A bird", "The model")
_VERBS = ("sees", "likes", "finds", "counts", "reads", "writes", "learns", "remembers")
_OBJECTS = ("the ball", "a book", "the numbers", "a long letter", "the answer", "three stars", "the map", "a song")
_PLACES = ("in the house", "at school", "near the river", "in the garden", "on the hill", "after dinner")


def _tokenizer_corpus() -> list[str]:
    """Return the tokenizer's training corpus: fixed sentences plus seeded generated lines.

    Returns:
        The corpus, one line per entry. Identical on every call (``random.Random(0)``).
    """
    rng = random.Random(0)
    lines = list(_SENTENCES)
    for _ in range(200):
        subject, verb, obj, place = (
            rng.choice(_SUBJECTS),
            rng.choice(_VERBS),
            rng.choice(_OBJECTS),
            rng.choice(_PLACES),
        )
        lines.append(f"{subject} {verb} {obj} {place}.")
    for _ in range(400):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        result = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {result}")
        if rng.random() < 0.25:
            lines.append(f"Question: what is {a} {op} {b}? Answer: {result}")
    return lines


@functools.cache
def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE tokenizer once per process and return its JSON serialization.

    Returns:
        The content of ``tokenizer.json`` (pretty-printed, byte-for-byte deterministic).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # Single-digit tokens make arithmetic learnable by a tiny model (as Llama and Qwen do).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(_SPECIAL_TOKENS),
        # All 256 byte symbols, so any text (any language, emoji) encodes and round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    serialized: str = tokenizer.to_str(pretty=True)
    return serialized


def _tokenizer_facts() -> tuple[int, dict[str, int]]:
    """Return the trained tokenizer's vocabulary size and the ids of its special tokens.

    Returns:
        ``(vocab_size, {special_token: id})``.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(_trained_tokenizer_json())
    ids: dict[str, int] = {}
    for token in _SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:  # pragma: no cover - the trainer always adds special tokens
            raise RuntimeError(f"special token {token!r} missing from the trained tokenizer")
        ids[token] = token_id
    vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
    return vocab_size, ids


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as stable, pretty-printed JSON with a trailing newline."""
    path.write_text(json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tokenizer(out_dir: Path) -> None:
    """Write the built-in byte-level BPE tokenizer into ``out_dir`` in Hugging Face layout.

    Writes ``tokenizer.json`` (identical bytes on every run), ``tokenizer_config.json`` and
    ``special_tokens_map.json``; ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads the
    result as a ``PreTrainedTokenizerFast`` with bos, eos and pad tokens set. The vocabulary holds
    about 512 tokens, the first three being ``<|bos|>``, ``<|eos|>`` and ``<|pad|>``.

    Args:
        out_dir: Directory to write into; created if missing. Existing files of the same names
            are overwritten.
    """
    _write_tokenizer(out_dir, model_max_length=_TOKENIZER_MODEL_MAX_LENGTH)


def _write_tokenizer(out_dir: Path, *, model_max_length: int) -> None:
    """Write the tokenizer files, recording ``model_max_length`` in ``tokenizer_config.json``.

    Args:
        out_dir: Directory to write into; created if missing.
        model_max_length: Longest sequence the paired model accepts.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(_trained_tokenizer_json(), encoding="utf-8")
    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_tokens,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "padding_side": "right",
        },
    )
    _write_json(out_dir / "special_tokens_map.json", special_tokens)


def _make_config(
    architecture: str,
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    max_position_embeddings: int,
    special_ids: dict[str, int],
) -> Any:
    """Build the ``transformers`` config for one of :data:`SUPPORTED_ARCHITECTURES`.

    Args:
        architecture: ``"llama"``, ``"qwen2"`` or ``"gpt2"``.
        vocab_size: Rows of the embedding and LM head.
        hidden_size: Model width.
        num_layers: Number of transformer blocks.
        num_heads: Attention heads (query heads for Llama and Qwen2).
        max_position_embeddings: Longest sequence the model accepts.
        special_ids: Ids of the bos, eos and pad tokens.

    Returns:
        A ``transformers.PretrainedConfig`` with fp32 dtype, all dropout 0 and untied embeddings.
    """
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "bos_token_id": special_ids[BOS_TOKEN],
        "eos_token_id": special_ids[EOS_TOKEN],
        "pad_token_id": special_ids[PAD_TOKEN],
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    if architecture == "gpt2":
        return GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_position_embeddings,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **common,
        )
    # Two key/value heads shared by the query heads exercises grouped-query attention.
    num_kv_heads = 2 if num_heads % 2 == 0 else num_heads
    llama_like: dict[str, Any] = {
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "attention_dropout": 0.0,
        **common,
    }
    if architecture == "llama":
        return LlamaConfig(**llama_like)
    return Qwen2Config(**llama_like)


def _validate_shape(
    *,
    architecture: str,
    vocab_size: int | None,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    max_positions: int,
) -> None:
    """Reject arguments ``build_tiny_model`` cannot build, naming the fix.

    Args:
        architecture: Requested architecture name.
        vocab_size: Requested vocabulary size, or ``None`` for the tokenizer's.
        hidden_size: Model width.
        num_layers: Number of transformer blocks.
        num_heads: Attention (query) heads.
        max_positions: Longest sequence the model accepts.

    Raises:
        ValueError: If an argument is out of range or inconsistent.
    """
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(SUPPORTED_ARCHITECTURES)}; got {architecture!r}")
    for name, value in (
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("max_position_embeddings", max_positions),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1; got {value}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
    if architecture != "gpt2" and (hidden_size // num_heads) % 2:
        raise ValueError(
            f"head size hidden_size/num_heads = {hidden_size // num_heads} must be even for rotary embeddings"
        )
    if vocab_size is not None and vocab_size < len(_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {len(_SPECIAL_TOKENS)} (the special tokens); got {vocab_size}")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing whatever ``dst`` held.

    ``os.replace`` is atomic but cannot overwrite a non-empty directory, so an existing ``dst`` is
    first renamed aside and deleted afterwards: at every moment ``dst`` is absent or complete.
    """
    try:
        os.replace(src, dst)
        return
    except OSError:
        if not dst.exists():
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old / dst.name)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def build_tiny_model(
    out_dir: Path,
    *,
    architecture: str = "llama",
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 256,
    seed: int = 0,
    with_tokenizer: bool = True,
) -> Path:
    """Build a small, randomly initialised causal LM and save it in Hugging Face layout.

    The model is fp32 with every dropout probability 0 and untied input/output embeddings; its
    bos/eos/pad ids are those of the built-in tokenizer. Weights come from ``torch.manual_seed(seed)``
    inside ``torch.random.fork_rng``, so equal arguments give byte-identical ``model.safetensors``
    and the caller's RNG state is left untouched. The directory is built in a temporary sibling and
    renamed into place; an existing ``out_dir`` is replaced.

    Args:
        out_dir: Final model directory.
        architecture: One of :data:`SUPPORTED_ARCHITECTURES`: ``"llama"`` (2 key/value heads, so
            grouped-query attention when ``num_heads > 2``), ``"qwen2"`` or ``"gpt2"``.
        vocab_size: Embedding rows; defaults to the built-in tokenizer's vocabulary size. Must be
            at least that size when ``with_tokenizer`` is true.
        hidden_size: Model width; a multiple of ``num_heads``.
        num_layers: Number of transformer blocks.
        num_heads: Attention (query) heads.
        max_position_embeddings: Longest sequence the model accepts.
        seed: Seed for the weight initialisation.
        with_tokenizer: Also write the built-in tokenizer into the directory.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: If the arguments describe no buildable model.
    """
    _validate_shape(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_positions=max_position_embeddings,
    )
    tokenizer_vocab_size, special_ids = _tokenizer_facts()
    if vocab_size is None:
        vocab_size = tokenizer_vocab_size
    elif with_tokenizer and vocab_size < tokenizer_vocab_size:
        raise ValueError(
            f"vocab_size ({vocab_size}) is smaller than the tokenizer's vocabulary ({tokenizer_vocab_size}); "
            "raise it, leave it unset, or pass with_tokenizer=False"
        )
    config = _make_config(
        architecture,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        special_ids=special_ids,
    )

    def write(tmp_dir: Path, model: Any) -> None:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        if with_tokenizer:
            _write_tokenizer(tmp_dir, model_max_length=max_position_embeddings)

    return save_random_model(out_dir, config, seed, write)


def save_random_model(out_dir: Path, config: Any, seed: int, write: Callable[[Path, Any], None]) -> Path:
    """Initialise a causal LM from ``config`` with ``seed`` and save it as ``out_dir``, atomically.

    The weights come from ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng`` (the
    caller's RNG is untouched); ``write(tmp_dir, model)`` saves the model and whatever goes with
    it into a temporary sibling, which then replaces ``out_dir`` by a rename, so a crash never
    leaves a half-written model directory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        # devices=[]: the model is built on CPU; do not touch (or initialise) CUDA RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # transformers leaves from_config unannotated.
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
        model.eval()
        write(tmp_dir, model)
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; a model directory is ordinary data.
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _is_built(model_dir: Path) -> bool:
    """Return whether ``model_dir`` holds a finished model."""
    return all((model_dir / name).is_file() for name in _MODEL_MARKER_FILES)


def trainer_home() -> Path:
    """Return ``$TRAINER_HOME``, by default ``~/.cache/trainer-service``: where models and checkpoints live."""
    return Path(os.environ.get(_TRAINER_HOME_ENV) or _DEFAULT_TRAINER_HOME).expanduser()


def _default_models_root() -> Path:
    """Return ``$TRAINER_HOME/models`` (``TRAINER_HOME`` defaults to ``~/.cache/trainer-service``)."""
    return trainer_home() / "models"


class _FileLock:
    """An exclusive ``fcntl.flock`` on a lock file, held for the duration of a ``with`` block."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def __enter__(self) -> _FileLock:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _lock_path(model_dir: Path) -> Path:
    """Return the lock file guarding the build of ``model_dir`` (a hidden sibling)."""
    return model_dir.parent / f".{model_dir.name}.lock"


def ensure_builtin_model(cache_dir: Path | None = None) -> Path:
    """Return the directory of the built-in ``tiny-llama`` model, building it on first use.

    The model is Llama-style (hidden size 64, 2 layers, 4 heads, 2 key/value heads, 256
    positions, seed 0) with the built-in tokenizer. It lives in ``cache_dir / "tiny-llama"``, by
    default ``$TRAINER_HOME/models/tiny-llama`` with ``TRAINER_HOME`` defaulting to
    ``~/.cache/trainer-service``. A directory that already holds ``config.json`` and
    ``model.safetensors`` is returned as is. An exclusive file lock beside the directory makes
    concurrent first calls (threads or processes) build it once; the others wait and reuse it.

    Args:
        cache_dir: Directory holding built-in models; ``None`` for ``$TRAINER_HOME/models``.

    Returns:
        The model directory, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    model_dir = (Path(cache_dir) if cache_dir is not None else _default_models_root()) / BUILTIN_MODEL_NAME
    if _is_built(model_dir):
        return model_dir
    with _FileLock(_lock_path(model_dir)):
        if _is_built(model_dir):  # Another process built it while we waited for the lock.
            return model_dir
        started = time.monotonic()
        build_tiny_model(
            model_dir,
            architecture="llama",
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            max_position_embeddings=256,
            seed=0,
        )
        logger.info(
            "Built the built-in model %r (first use) in %.1f s and saved it to %s",
            BUILTIN_MODEL_NAME,
            time.monotonic() - started,
            model_dir,
        )
    return model_dir
