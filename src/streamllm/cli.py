"""The `streamllm` command: `serve` the gateway, the `sim`ulated backend, the `relay`, and
the complexity `judge`'s tools."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import uvicorn
import yaml

from streamllm.cluster_cli import cluster_app
from streamllm.config import ServerSettings, Settings, SimSettings, load_settings
from streamllm.errors import ConfigError
from streamllm.judge_cli import judge_app
from streamllm.keys_cli import keys_app

if TYPE_CHECKING:
    from streamllm.realmodel import ModelServer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="STREAM: one OpenAI-compatible endpoint over local, HPC and cloud LLM tiers.",
)
app.add_typer(judge_app, name="judge")
app.add_typer(keys_app, name="keys")
app.add_typer(cluster_app, name="cluster")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML configuration file (else $STREAMLLM_CONFIG)."),
]


def _setup_logging(level: str, fmt: str = "text") -> None:
    # Libraries that log every request or task at INFO would drown STREAM's own lines.
    for noisy in ("httpx", "httpx2", "parsl", "websockets", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from streamllm.logs import configure

    configure(level, fmt)


def _stored_keys(server: ServerSettings) -> bool:
    """Whether keys were ever made in the store (so the server will demand them)."""
    from streamllm.store import StoreConfigError
    from streamllm.store.keys import keys_were_made

    try:
        return keys_were_made(server.database_url, server.data_dir)
    except StoreConfigError as e:
        typer.echo(f"streamllm: server.database_url: {e}", err=True)
        raise typer.Exit(2) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    config: ConfigOption = None,
    real_model: Annotated[bool, typer.Option(
        "--real-model", help="Serve the local tier from a real small model (SmolLM2-135M, the "
        "[real] extra), started as a child process.")] = False,
) -> None:
    """Start the gateway: the OpenAI-compatible API at /v1."""
    try:
        settings = load_settings(config)
    except ConfigError as e:
        typer.echo(f"streamllm: {e}", err=True)
        raise typer.Exit(2) from None
    server = settings.server.model_copy(
        update={k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    )
    settings = settings.model_copy(update={"server": server})
    try:
        has_keys = bool(server.load_api_keys()) or server.oauth is not None
    except ConfigError as e:
        typer.echo(f"streamllm: {e}", err=True)
        raise typer.Exit(2) from None
    if not _is_loopback(server.host) and not has_keys and not _stored_keys(server):
        # Without keys anyone who can reach the port can spend the cluster's GPUs and the
        # cloud budget, so an open server stays on this machine.
        typer.echo(
            f"streamllm: refusing to bind {server.host} without API keys: create one with "
            "`streamllm keys create --name NAME`, set server.api_keys or server.api_keys_file "
            "or server.oauth, or serve on loopback (127.0.0.1 or ::1).",
            err=True,
        )
        raise typer.Exit(2)
    _setup_logging(server.log_level, server.log_format)
    from streamllm.gateway import create_app

    model_server = None
    if real_model:
        model_server, settings = _with_real_model(settings)
    try:
        try:
            gateway = create_app(settings)
        except ConfigError as e:
            typer.echo(f"streamllm: {e}", err=True)
            raise typer.Exit(2) from None

        logging.getLogger("streamllm").info(
            "STREAM listening on http://%s:%d (API at /v1)", server.host, server.port
        )
        uvicorn.run(
            gateway,
            host=server.host,
            port=server.port,
            log_level=server.log_level,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    finally:
        if model_server is not None:
            model_server.stop()


def _with_real_model(settings: Settings) -> tuple[ModelServer, Settings]:
    """Start the real model's server and point the local tier at it."""
    from streamllm import realmodel
    from streamllm.config import TierSettings

    why = realmodel.why_not_available()
    if why:
        typer.echo(f"streamllm: --real-model: {why}; `make run-real` installs it", err=True)
        raise typer.Exit(2)
    log_dir = Path(settings.server.data_dir).expanduser() / "logs"
    try:
        model_server = realmodel.start_model_server(log_dir)
    except RuntimeError as e:
        typer.echo(f"streamllm: --real-model: {e}", err=True)
        raise typer.Exit(1) from None
    logging.getLogger("streamllm").info(
        "local tier: %s on llama-cpp-python's server at %s (log: %s)", realmodel.MODEL_NAME,
        model_server.url, model_server.log_path)
    # The model's own vocabulary counts its tokens exactly (the GGUF carries it).
    local = TierSettings(kind="llamacpp", base_url=model_server.url,
                         models=[realmodel.MODEL_NAME], context_window=realmodel.CONTEXT_WINDOW,
                         tokenizer=str(realmodel.model_path()))
    tiers = {**settings.tiers, "local": local}
    return model_server, settings.model_copy(update={"tiers": tiers})


@app.command()
def sim(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8001,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML with the simulator's models.")
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option(help="Serve this model name (repeatable).")
    ] = None,
    ttft_ms: Annotated[float, typer.Option(help="Time to first token, ms.")] = 0.0,
    tokens_per_s: Annotated[float, typer.Option(help="Token rate (0 = unlimited).")] = 0.0,
    answer_tokens: Annotated[int, typer.Option(help="Answer length in tokens.")] = 32,
    context_window: Annotated[int, typer.Option(help="Context window in tokens.")] = 8192,
) -> None:
    """Run the simulated OpenAI-compatible backend (tests, demo, benchmarks)."""
    from streamllm.sim.app import Simulator

    if config:
        try:
            settings = SimSettings.model_validate(yaml.safe_load(config.read_text()) or {})
        except Exception as e:  # config errors are reported, not raised
            typer.echo(f"streamllm sim: invalid {config}: {e}", err=True)
            raise typer.Exit(2) from None
    else:
        spec = {
            "ttft_ms": ttft_ms,
            "tokens_per_s": tokens_per_s,
            "answer_tokens": answer_tokens,
            "context_window": context_window,
        }
        settings = SimSettings.model_validate(
            {"models": {name: spec for name in (model or ["sim-model"])}}
        )
    _setup_logging("info")
    logging.getLogger("streamllm.sim").info(
        "simulator on http://%s:%d/v1 serving %s", host, port, ", ".join(settings.models)
    )
    uvicorn.run(Simulator(settings).app, host=host, port=port, log_level="warning")


@app.command()
def relay(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8765,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    secret_file: Annotated[
        Path | None,
        typer.Option(help="File holding the token secret shared with the gateway "
                          "(else $STREAMLLM_RELAY_SECRET)."),
    ] = None,
    idle_s: Annotated[float, typer.Option(help="Close channels idle this long.")] = 300.0,
    max_channels: Annotated[int, typer.Option(help="Most channels open at once.")] = 10_000,
) -> None:
    """Run the WebSocket relay that HPC workers and gateways both dial out to."""
    import asyncio
    import os
    import signal
    import ssl

    from streamllm.relay.server import RelayLimits, RelayServer

    secret = (
        secret_file.read_bytes().strip() if secret_file
        else os.environ.get("STREAMLLM_RELAY_SECRET", "").encode()
    )
    if len(secret) < 32:
        typer.echo(
            "streamllm relay: a token secret of at least 32 bytes is required "
            "(--secret-file or STREAMLLM_RELAY_SECRET); the gateway must use the same one.",
            err=True,
        )
        raise typer.Exit(2)
    if (tls_cert is None) != (tls_key is None):
        typer.echo("streamllm relay: --tls-cert and --tls-key go together", err=True)
        raise typer.Exit(2)
    context = None
    if tls_cert and tls_key:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls_cert, tls_key)
    elif not _is_loopback(host):
        typer.echo(
            f"streamllm relay: refusing to serve {host} without TLS (--tls-cert/--tls-key)",
            err=True,
        )
        raise typer.Exit(2)
    _setup_logging("info")

    async def run() -> None:
        server = await RelayServer(
            secret, RelayLimits(idle_s=idle_s, max_channels=max_channels)
        ).start(host, port, ssl=context)
        scheme = "wss" if context else "ws"
        logging.getLogger("streamllm.relay").info(
            "relay on %s://%s:%d (health at /health)", scheme, host, server.port
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(run())


if __name__ == "__main__":
    app()
