"""Signed, expiring download URLs for checkpoint files, served by this server.

``save_weights_external`` checkpoints are fetched through ``get_external_weights_urls``:
one URL per file, like the signed storage URLs Tinker hands out. A URL names the owner,
checkpoint and file and carries an expiry and an HMAC-SHA256 signature made with a key
only the server knows, so it works without an API key, only for what it names, only until
it expires, and only the owner of the checkpoint is ever given it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import quote

__all__ = ["UrlSigner"]


class UrlSigner:
    """Makes and checks download URLs (one random key per server process by default)."""

    def __init__(self, key: bytes | None = None, ttl_s: float = 3600.0) -> None:
        self._key = key or secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def _signature(self, owner: str, name: str, relpath: str, expires: int) -> str:
        message = "\n".join((owner, name, relpath, str(expires))).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def url(self, base_url: str, owner: str, name: str, relpath: str) -> tuple[str, int]:
        """The URL of one file and its expiry (unix seconds)."""
        expires = int(time.time() + self.ttl_s)
        sig = self._signature(owner, name, relpath, expires)
        path = f"/api/v1/downloads/{quote(owner or '-', safe='')}/{quote(name, safe='')}/{quote(relpath)}"
        return f"{base_url.rstrip('/')}{path}?expires={expires}&sig={sig}", expires

    def check(self, owner: str, name: str, relpath: str, expires: int, sig: str) -> bool:
        """Whether a presented URL is genuine and unexpired."""
        if expires < time.time():
            return False
        return hmac.compare_digest(self._signature(owner, name, relpath, expires), sig)
