"""Pure-ASGI middleware: request ids and the x-stream-* headers every response carries.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched and a client
disconnect still reaches the handler.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from streamllm.logs import request_id_var

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = incoming if incoming and _SAFE_ID.match(incoming) else uuid.uuid4().hex
        request_id_var.set(request_id)  # for log records made while this request is handled
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        # Handlers fill these in as they learn the route; defaults say "nothing was routed".
        headers = state["stream_headers"] = {
            "x-stream-tier": "none",
            "x-stream-model": "none",
            "x-stream-complexity": "none",
            "x-stream-overhead-ms": "0",
        }

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", ()))
                present = {k.lower() for k, _ in raw}
                if b"x-request-id" not in present:
                    raw.append((b"x-request-id", request_id.encode()))
                for k, v in headers.items():
                    if k.encode() not in present:
                        raw.append((k.encode(), str(v).encode("latin-1", "replace")))
                message = {**message, "headers": raw}
            await send(message)

        await self.app(scope, receive, send_with_headers)
