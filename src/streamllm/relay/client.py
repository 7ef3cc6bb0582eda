"""Dialling the relay, for either role: the token goes in a header, never in the URL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from streamllm.errors import RelayError, TokenRejected
from streamllm.relay.frames import HEADER_SIZE, MAX_PAYLOAD


class RelayLink:
    """One side's connection to a channel: send frames, iterate over the frames that arrive."""

    def __init__(self, conn: ClientConnection):
        self._conn = conn

    async def send(self, frame: bytes) -> None:
        try:
            await self._conn.send(frame)
        except ConnectionClosed as e:
            raise RelayError(f"relay connection closed: {e}") from None

    async def frames(self) -> AsyncIterator[bytes]:
        try:
            async for message in self._conn:
                if isinstance(message, bytes):
                    yield message
        except ConnectionClosed as e:
            raise RelayError(f"relay connection lost: {e}") from None

    async def close(self) -> None:
        await self._conn.close()


async def dial(
    relay_url: str,
    channel: str,
    role: str,
    token: str,
    *,
    resume_from: int | None = None,
    open_timeout: float = 10.0,
    ssl: Any = None,
) -> RelayLink:
    """Connect to `relay_url` (ws:// or wss://) as `role` on `channel`."""
    headers = {"authorization": f"Bearer {token}", "x-stream-role": role}
    if resume_from is not None:
        headers["x-stream-resume-from"] = str(resume_from)
    url = f"{relay_url.rstrip('/')}/v1/channels/{channel}"
    # websockets makes its own default TLS context for wss:// (honouring SSL_CERT_FILE for a
    # campus CA) only when it is given none; ssl=None with wss:// is an error to it.
    tls = {"ssl": ssl} if ssl is not None else {}
    try:
        conn = await connect(
            url,
            additional_headers=headers,
            open_timeout=open_timeout,
            max_size=MAX_PAYLOAD + HEADER_SIZE,
            compression=None,
            **tls,
        )
    except InvalidStatus as e:
        status = e.response.status_code
        detail = e.response.body.decode(errors="replace")[:200]
        if status == 401:
            raise TokenRejected(f"relay refused the token: {detail}") from None
        raise RelayError(f"relay refused the connection ({status}): {detail}") from None
    except (OSError, TimeoutError) as e:
        raise RelayError(f"relay unreachable: {e}") from None
    except (InvalidHandshake, ConnectionClosed) as e:
        # A relay that is stopping or starting can accept the connection and drop it before
        # the handshake is done: unreachable too, for now.
        raise RelayError(f"relay handshake failed: {e}") from None
    return RelayLink(conn)
