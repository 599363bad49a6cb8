"""Server addresses as users write them, turned into gRPC targets.

``host`` (the server's default port, 50051, is added), ``host:port``, ``[::1]:port``,
``http://host:port`` (plaintext) and ``https://host:port`` (TLS) are understood; gRPC's own
target schemes (``dns:///``, ``unix:``, ``ipv4:``, ``ipv6:``) pass through unchanged. Anything
else is refused with a message that shows the accepted forms.
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_PORT", "DEFAULT_TARGET", "parse_target"]

DEFAULT_PORT = 50051
"""The port ``trainer-server`` listens on by default, used when an address has none."""
DEFAULT_TARGET = f"localhost:{DEFAULT_PORT}"
"""Where clients connect when neither an address nor ``$TRAINER_SERVER`` is given."""

_GRPC_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")
_FORMS = "expected HOST, HOST:PORT, http://HOST:PORT or https://HOST:PORT (e.g. localhost:50051)"


def _with_port(hostport: str, original: str) -> str:
    if not hostport or "/" in hostport or "?" in hostport or "#" in hostport:
        raise ValueError(f"cannot use {original!r} as a server address: {_FORMS}")
    if hostport.startswith("["):  # [v6]:port or [v6]
        if hostport.endswith("]"):
            return f"{hostport}:{DEFAULT_PORT}"
        if not re.fullmatch(r"\[[^\]]+\]:\d+", hostport):
            raise ValueError(f"cannot use {original!r} as a server address: {_FORMS}")
        return hostport
    if hostport.count(":") > 1:  # a bare IPv6 address
        return f"[{hostport}]:{DEFAULT_PORT}"
    host, sep, port = hostport.partition(":")
    if not sep:
        return f"{host}:{DEFAULT_PORT}"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"cannot use {original!r} as a server address (bad port {port!r}): {_FORMS}")
    return hostport


def parse_target(address: str, *, tls: bool) -> tuple[str, bool]:
    """The gRPC target for ``address`` and whether to use TLS.

    Args:
        address: what the user wrote.
        tls: TLS was asked for (``tls=True`` or root certificates).

    Returns:
        ``(target, tls)``; ``https://`` turns TLS on.

    Raises:
        ValueError: an address this client cannot connect to, or ``http://`` with TLS asked for.
    """
    address = address.strip()
    if address.startswith(_GRPC_SCHEMES):
        return address, tls
    scheme, sep, rest = address.partition("://")
    if not sep:
        return _with_port(address, address), tls
    scheme = scheme.lower()
    if scheme == "https":
        return _with_port(rest.rstrip("/"), address), True
    if scheme == "http":
        if tls:
            raise ValueError(f"{address!r} says http:// (plaintext) but TLS was asked for; write https://{rest}")
        return _with_port(rest.rstrip("/"), address), False
    raise ValueError(f"cannot use {address!r} as a server address (unknown scheme {scheme!r}): {_FORMS}")
