"""Cancel a request's work the moment its client goes away, at any stage.

One watcher task per request waits for `http.disconnect` and cancels the handling task: while it
waits for a backend's first token, while a non-streaming backend call runs, or while it relays a
stream. Cancellation then closes the backend request (its connection), which is how a backend
learns to stop. `RelayResponse` streams with that same watcher, instead of Starlette's
StreamingResponse, which would start two more tasks per request to do the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response


class ClientWatch:
    def __init__(self, request: Request):
        self._task = asyncio.current_task()
        self._watcher = asyncio.ensure_future(self._wait(request))
        self._watcher.add_done_callback(self._client_left)

    @staticmethod
    async def _wait(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def _client_left(self, watcher: asyncio.Future[None]) -> None:
        if not watcher.cancelled() and self._task is not None:
            self._task.cancel()

    @property
    def client_left(self) -> bool:
        return self._watcher.done() and not self._watcher.cancelled()

    def absorb(self) -> bool:
        """Inside `except CancelledError`: True (and the cancellation undone) if it was ours."""
        if self.client_left and self._task is not None and self._task.cancelling():
            self._task.uncancel()
            return True
        return False

    def stop(self) -> None:
        self._watcher.remove_done_callback(self._client_left)
        self._watcher.cancel()


class RelayResponse(Response):
    """A server-sent-events response whose body stops when the watched client leaves."""

    media_type = "text/event-stream"

    def __init__(
        self, body: AsyncIterator[bytes], watch: ClientWatch, headers: Mapping[str, str]
    ):
        self.body_iterator = body
        self.watch = watch
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
            )
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not self.watch.absorb():
                raise
        except OSError:
            pass  # the client's socket went away between the watcher's checks
        finally:
            self.watch.stop()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
