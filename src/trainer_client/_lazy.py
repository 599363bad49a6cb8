"""Modules the client imports on first use: ``torch`` and the tensor wire format.

``torch`` takes seconds to import, and the shell commands (``trainer-client info``,
``checkpoints``, ``download``, ``delete``) never touch a tensor. The client's modules therefore
name ``torch`` and ``trainer_proto.wire`` through these stand-ins, which import the real module
at the first attribute access (type checkers see the real modules: each user imports them
under ``TYPE_CHECKING``). ``tests/test_client_cli.py`` checks that the CLI imports no torch.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["torch", "wire"]


class _Deferred:
    """Stands in for a module; imports it at the first attribute access."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}>"


torch: Any = _Deferred("torch")
wire: Any = _Deferred("trainer_proto.wire")
