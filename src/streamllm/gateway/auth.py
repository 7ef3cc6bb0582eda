"""API keys on /v1: `Authorization: Bearer <key>`, checked before anything else runs.

Pure ASGI, like the request-context middleware, so streaming responses pass through untouched.
Keys are held only as SHA-256 digests and compared in constant time; a key never reaches a log.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from streamllm.config import ApiKeySettings
from streamllm.errors import AuthenticationFailed
from streamllm.gateway.errors import error_response

PROTECTED_PREFIX = "/v1"  # health checks and the status page stay open for operators


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeyAuth:
    """On success the key's settings are left in the request state as `api_key`."""

    def __init__(self, app: Any, keys: list[ApiKeySettings]):
        if not keys:
            raise ValueError("ApiKeyAuth needs at least one key")
        self.app = app
        self._keys = [(_digest(k.key), k) for k in keys]

    def _known(self, key: str) -> ApiKeySettings | None:
        candidate = _digest(key)
        found = None
        for digest, entry in self._keys:  # no early exit: time does not depend on the match
            if hmac.compare_digest(candidate, digest):
                found = entry
        return found

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        auth = ""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                auth = value.decode("latin-1")
                break
        scheme, _, key = auth.partition(" ")
        entry = self._known(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if entry is not None:
            scope.setdefault("state", {})["api_key"] = entry
            await self.app(scope, receive, send)
            return
        if scheme.lower() != "bearer" or not key.strip():
            err = AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
            )
        else:
            err = AuthenticationFailed("Incorrect API key provided.")
        response = error_response(err)
        response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)
