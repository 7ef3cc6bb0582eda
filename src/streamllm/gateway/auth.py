"""API keys on /v1: `Authorization: Bearer <key>`, checked before anything else runs.

Pure ASGI, like the request-context middleware, so streaming responses pass through untouched.
Keys are held only as SHA-256 digests and compared in constant time; a key never reaches a log.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from streamllm.errors import AuthenticationFailed
from streamllm.gateway.errors import error_response

PROTECTED_PREFIX = "/v1"  # health checks and the status page stay open for operators


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeyAuth:
    def __init__(self, app: Any, keys: list[str]):
        if not keys:
            raise ValueError("ApiKeyAuth needs at least one key")
        self.app = app
        self._digests = [_digest(k) for k in keys]

    def _known(self, key: str) -> bool:
        candidate = _digest(key)
        found = False
        for known in self._digests:  # no early exit: time does not depend on which key matched
            found |= hmac.compare_digest(candidate, known)
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
        if scheme.lower() != "bearer" or not key.strip():
            err = AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
            )
        elif not self._known(key.strip()):
            err = AuthenticationFailed("Incorrect API key provided.")
        else:
            await self.app(scope, receive, send)
            return
        response = error_response(err)
        response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)
