"""Read a byte stream in the background so that each read returns everything that has arrived.

A fast backend sends many small SSE chunks per network read. Handing them on one by one costs a
parse, a middleware pass and a socket write each; taking whatever has accumulated since the
last read turns a burst into one write, and costs nothing in latency (nothing is ever held back
waiting for more).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class Pump:
    """Drains `source` into a bounded buffer from a task of its own; `take()` empties it."""

    def __init__(self, source: AsyncIterator[bytes], limit: int = 1 << 20):
        self._source = source
        self._limit = limit
        self._buffer = bytearray()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._ended = False
        self._error: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            async for data in self._source:
                self._buffer += data
                self._arrived.set()
                if len(self._buffer) >= self._limit:
                    # Backpressure: stop reading the backend until the reader catches up.
                    self._room.clear()
                    await self._room.wait()
        except Exception as e:  # handed to the reader, which raises it as its own
            self._error = e
        finally:
            self._ended = True
            self._arrived.set()

    async def take(self) -> bytes:
        """Everything received since the last call, waiting until there is some.

        Returns b"" once the source has ended and everything was taken; raises what the source
        raised after everything before it was taken.
        """
        while not self._buffer:
            if self._ended:
                if self._error is not None:
                    raise self._error
                return b""
            self._arrived.clear()
            await self._arrived.wait()
        data = bytes(self._buffer)
        self._buffer.clear()
        self._room.set()
        return data

    async def aclose(self) -> None:
        """Stop reading. Safe to call from a task that is itself being cancelled."""
        if not self._task.done():
            self._task.cancel()
            # asyncio.wait does not re-raise the pump's own cancellation, only ours.
            await asyncio.wait([self._task])
