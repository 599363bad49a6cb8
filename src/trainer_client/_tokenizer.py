"""The model's tokenizer on the client, built from the files the server streams (GetTokenizer).

With ``transformers`` installed the tokenizer is the one users expect from Hugging Face
(``AutoTokenizer``: a ``PreTrainedTokenizerFast`` with ``apply_chat_template``,
``eos_token_id``, ``decode(skip_special_tokens=...)``), loaded from the model's own files,
chat template included. Without it, the client still works: the tokenizer is the raw
``tokenizers.Tokenizer``, with ``eos_token`` and ``eos_token_id`` attributes set from the model's
files. Either way the EOS is the model's, never a guess: the tokenizer config's ``eos_token``,
else the first EOS id of ``generation_config.json``, else none.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

from trainer_client._errors import ProtocolError

__all__ = ["load_tokenizer", "token_ids"]


def _json(files: dict[str, bytes], name: str) -> dict[str, Any]:
    try:
        value = json.loads(files[name]) if name in files else {}
    except ValueError as exc:
        raise ProtocolError(f"the model's {name} is not valid JSON: {exc}") from exc
    return value if isinstance(value, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _generation_eos_ids(files: dict[str, bytes]) -> list[int]:
    eos = _json(files, "generation_config.json").get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def load_tokenizer(files: dict[str, bytes]) -> Any:
    """Build the tokenizer from a model's tokenizer files (as :meth:`get_tokenizer_files` returns them).

    Raises:
        ProtocolError: the files hold no ``tokenizer.json``.
    """
    if "tokenizer.json" not in files:
        raise ProtocolError(f"the model has no tokenizer.json (files: {sorted(files)})")
    if importlib.util.find_spec("transformers") is not None:
        return _hf_tokenizer(files)
    return _raw_tokenizer(files)


def _hf_tokenizer(files: dict[str, bytes]) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory(prefix="trainer-tokenizer-") as tmp:
        for name, data in files.items():
            (Path(tmp) / Path(name).name).write_bytes(data)
        try:
            tokenizer: Any = AutoTokenizer.from_pretrained(tmp)
        except (ValueError, OSError, KeyError):  # no tokenizer_class and no config.json to guess it from
            tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp)
    if tokenizer.eos_token_id is None:
        eos = _generation_eos_ids(files)
        if eos:
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos[0])
    return tokenizer


def _raw_tokenizer(files: dict[str, bytes]) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
    eos_token = _token_text(_json(files, "tokenizer_config.json").get("eos_token"))
    eos_id = None if eos_token is None else tokenizer.token_to_id(eos_token)
    if eos_id is None:
        generation = _generation_eos_ids(files)
        eos_id = generation[0] if generation else None
        eos_token = None if eos_id is None else tokenizer.id_to_token(eos_id)
    # Tokenizer instances take attributes (pyo3 ``dict`` class); typed as Any below.
    result: Any = tokenizer
    result.eos_token = eos_token
    result.eos_token_id = eos_id
    return result


def token_ids(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    """Encode ``text`` with either kind of tokenizer (Hugging Face or ``tokenizers``)."""
    encoded = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return list(encoded.ids if hasattr(encoded, "ids") else encoded)
