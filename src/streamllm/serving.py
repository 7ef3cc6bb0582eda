"""Run an ASGI app with uvicorn on a socket we bind first (so port 0 gives a free port).

Binding before serving means the address is known and connectable at once: connections wait
in the listen backlog until uvicorn accepts them, so callers need no readiness polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import threading
from typing import Any

import uvicorn


def bind(host: str = "127.0.0.1", port: int = 0, backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


# uvicorn logs "Started server process" and the like through one global logger; an embedded
# server (the gateway's simulator) saying it all again beside the gateway only confuses.
_embedded = contextvars.ContextVar("streamllm_embedded_server", default=False)


class _QuietEmbedded(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _embedded.get()


_quiet = _QuietEmbedded()


class _Server(uvicorn.Server):
    """uvicorn's server, telling waiters when its startup (app lifespan included) is done."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.ready = threading.Event()
        # Only the process's main server may own SIGINT/SIGTERM; embedded servers must not.
        self.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


def _config(app: Any, **kw: Any) -> uvicorn.Config:
    # An embedded server must not reconfigure the process's logging: uvicorn's loggers are
    # global, and a second server setting them to "warning" silences the main server too.
    kw.setdefault("log_config", None)
    kw.setdefault("log_level", None)
    kw.setdefault("access_log", False)
    kw.setdefault("lifespan", "auto")
    kw.setdefault("timeout_graceful_shutdown", 2)
    return uvicorn.Config(app, **kw)


class ServerThread:
    """An app served on loopback from a daemon thread: `with ServerThread(app) as s: s.url`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **uvicorn_kw: Any):
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = _Server(_config(app, **uvicorn_kw))
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"uvicorn:{self.port}")
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    def start(self, timeout: float = 30.0) -> ServerThread:
        """Start serving; return once the app's startup has finished (or failed)."""
        self._thread.start()
        while not self.server.ready.wait(0.05):
            if not self._thread.is_alive():
                raise RuntimeError(f"server on port {self.port} failed to start")
            timeout -= 0.05
            if timeout <= 0:
                raise TimeoutError(f"server on port {self.port} did not start")
        return self

    def request_stop(self) -> None:
        self.server.should_exit = True

    def stop(self) -> None:
        self.request_stop()
        if self._thread.ident is not None:  # it may never have been started
            self._thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerTask:
    """An app served from a task in the current event loop (the gateway's embedded simulator)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **uvicorn_kw: Any):
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = _Server(_config(app, **uvicorn_kw))
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerTask:
        uvicorn_log = logging.getLogger("uvicorn.error")
        if _quiet not in uvicorn_log.filters:
            uvicorn_log.addFilter(_quiet)
        context = contextvars.copy_context()
        context.run(_embedded.set, True)  # only this server's task runs with it set
        self._task = asyncio.get_running_loop().create_task(
            self.server.serve(sockets=[self.sock]), context=context
        )
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task
        self.sock.close()
