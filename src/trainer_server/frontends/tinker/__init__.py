"""The Tinker-protocol HTTP front end: the official ``tinker`` SDK runs unmodified against this server.

``TinkerFrontEnd(backend, config).app`` is an ASGI app (Starlette) serving Tinker's
``/api/v1`` routes over a :class:`TinkerBackend`, the same core the gRPC API uses.
See docs/TINKER.md.
"""

from trainer_server.frontends.tinker.app import TinkerConfig, TinkerFrontEnd
from trainer_server.frontends.tinker.backend import TinkerBackend

__all__ = ["TinkerBackend", "TinkerConfig", "TinkerFrontEnd"]
