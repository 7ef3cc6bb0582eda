#!/usr/bin/env python3
"""How much does STREAM add on top of a backend? Compared with talking to the backend directly,
and with the LiteLLM proxy in front of the same backend.

One run starts everything it needs on 127.0.0.1 (free ports picked by the OS):

* the STREAM simulator (`streamllm sim`, TTFT 0, unlimited token rate) as the backend;
* the STREAM gateway (`streamllm serve`) with its `local` tier pointed at that simulator;
* unless --skip-litellm, the LiteLLM proxy, installed into a throw-away virtualenv in a
  temporary directory (never a project dependency), mapping a model name to the simulator.

For every concurrency level it warms each target up, then measures streamed chat completions in
rounds that alternate the targets (the order rotates each round), so slow drifts of the machine
hit every target alike. Per request it records the time to the first content token and the
time to `data: [DONE]`; per target, requests per second over the measured batches and the CPU
time each process (simulator, gateways, this load generator) spent per request. The SSE stream
is parsed here and every answer must carry exactly --tokens content deltas and end with [DONE];
anything else aborts the run. Each concurrent worker has its own single-connection httpx client
(see open_clients for why).

Everything it started is stopped again on success, error, Ctrl-C or SIGTERM.

    .venv/bin/python bench/overhead.py                       # full run, with LiteLLM
    .venv/bin/python bench/overhead.py --skip-litellm        # direct vs STREAM only
    .venv/bin/python bench/overhead.py --requests 200,1000 --concurrency 1,32
    .venv/bin/python bench/overhead.py --profile-gateway     # also py-spy the gateway

See docs/BENCHMARKS.md for what the numbers mean and the latest results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx  # the same client library the gateway uses

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
LOOPBACK = "127.0.0.1"
SIM_MODEL = "sim-model"
PROMPT = "Explain in one paragraph why a gateway should add little latency."

# Every switch LiteLLM documents for its own outbound requests (cost map, Anthropic beta
# headers, blog feed, auto-router presets, policy templates), plus the umbrella offline mode of
# newer releases. Unknown variables are ignored by older releases. As a second guard, the
# proxy's HTTP(S) proxy variables point at a closed loopback port, with loopback exempted, so
# anything that still tries to reach the internet fails on the spot instead of leaving.
LITELLM_OFFLINE_ENV = {
    "LITELLM_OFFLINE_MODE": "true",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_MODEL_COST_MAP_URL": "http://127.0.0.1:9/blocked",
    "LITELLM_ANTHROPIC_BETA_HEADERS_URL": "http://127.0.0.1:9/blocked",
    "LITELLM_AUTOROUTER_PRESETS_URL": "http://127.0.0.1:9/blocked",
    "LITELLM_BLOG_POSTS_URL": "http://127.0.0.1:9/blocked",
    "DISABLE_ADMIN_UI": "True",
    "LITELLM_LOG": "ERROR",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


class BenchError(RuntimeError):
    """The benchmark cannot go on (a server died, an answer was wrong, a deadline passed)."""


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    """A port the OS says is free on loopback now (the server binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


class Services:
    """Starts servers in their own process groups and stops every one of them, whatever happens."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: list[Service] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Service:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            try:
                proc = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, cwd=self.workdir, start_new_session=True,
                )
            except OSError as e:
                raise BenchError(f"cannot start {name} ({argv[0]}): {e}") from None
        svc = Service(name, proc, log)
        self.started.append(svc)
        return svc

    def stop_all(self) -> None:
        for svc in reversed(self.started):
            _stop(svc.proc)
        self.started.clear()


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group we created for `proc`, then SIGKILL whatever is left."""
    pgid = proc.pid  # start_new_session=True: the child leads a group with its own pid
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


# Loopback only: never through a proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_ready(
    svc: Service, url: str, deadline_s: float, check=None, headers: dict[str, str] | None = None
) -> None:
    """Poll `url` until it answers 200 (and `check` passes), the process dies, or time runs out."""
    end = time.monotonic() + deadline_s
    last = "no answer yet"
    while time.monotonic() < end:
        if svc.proc.poll() is not None:
            raise BenchError(
                f"{svc.name} exited with code {svc.proc.returncode} before it was ready; "
                f"its log ends:\n{svc.tail()}"
            )
        try:
            with _DIRECT.open(urllib.request.Request(url, headers=headers or {}),
                              timeout=2) as resp:
                body = resp.read()
                if resp.status == 200 and (check is None or check(body)):
                    return
                last = f"HTTP {resp.status}: {body[:200]!r}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = str(e)
        time.sleep(0.2)
    raise BenchError(
        f"{svc.name} was not ready at {url} within {deadline_s:g}s ({last}); "
        f"its log ends:\n{svc.tail()}"
    )


def streamllm_exe() -> str:
    exe = Path(sys.executable).with_name("streamllm")
    if exe.exists():
        return str(exe)
    found = shutil.which("streamllm")
    if not found:
        raise BenchError("the `streamllm` command was not found; run `pip install -e .` first")
    return found


def start_simulator(services: Services, tokens: int) -> str:
    port = free_port()
    svc = services.start(
        "simulator",
        [streamllm_exe(), "sim", "--host", LOOPBACK, "--port", str(port), "--model", SIM_MODEL,
         "--answer-tokens", str(tokens), "--ttft-ms", "0", "--tokens-per-s", "0"],
    )
    base = f"http://{LOOPBACK}:{port}"
    wait_ready(svc, f"{base}/health", 30)
    return base


def start_gateway(services: Services, sim_base: str, python: str | None = None) -> str:
    """STREAM with its `local` tier on the simulator; `python` runs another interpreter's copy."""
    port = free_port()
    config = services.workdir / "stream.yaml"
    config.write_text(textwrap.dedent(f"""\
        server: {{detect_ollama: false, log_level: warning, data_dir: "{services.workdir}/data"}}
        tiers:
          local: {{kind: vllm, base_url: "{sim_base}/v1", models: [{SIM_MODEL}]}}
          hpc:   {{enabled: false}}
          cloud: {{enabled: false}}
        """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLLM_")}
    # The backend is on loopback: a proxy from the environment must not stand in between.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    command = [python, "-m", "streamllm.cli"] if python else [streamllm_exe()]
    svc = services.start(
        "stream",
        [*command, "serve", "--host", LOOPBACK, "--port", str(port), "--config", str(config)],
        env=env,
    )
    base = f"http://{LOOPBACK}:{port}"
    wait_ready(svc, f"{base}/health/ready", 30, lambda b: json.loads(b).get("status") == "ready")
    return base


def prepare_litellm_venv(venv: Path, spec: str, workdir: Path) -> Path:
    """A virtualenv holding LiteLLM's proxy; reused when it already has the `litellm` command."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    log = workdir / "litellm-pip.log"
    print(f"[bench] installing {spec} into {venv} (log: {log}) ...", flush=True)
    started = time.monotonic()
    with open(log, "wb") as out:
        for argv in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
             spec],
        ):
            try:
                subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=900)
            except subprocess.CalledProcessError:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise BenchError(f"`{' '.join(argv)}` failed; log ends:\n{tail}") from None
    if not exe.exists():
        raise BenchError(f"{spec} installed, but {exe} is missing")
    print(f"[bench] LiteLLM installed in {time.monotonic() - started:.0f}s", flush=True)
    return exe


def litellm_version(venv: Path) -> str:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    return out.stdout.strip() or "unknown"


def start_litellm(
    services: Services, exe: Path, sim_base: str, model_name: str, master_key: str
) -> str:
    port = free_port()
    config = services.workdir / "litellm.yaml"
    config.write_text(textwrap.dedent(f"""\
        model_list:
          - model_name: {model_name}
            litellm_params:
              model: openai/{SIM_MODEL}
              api_base: {sim_base}/v1
              api_key: dummy
        litellm_settings:
          telemetry: false
        """))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LITELLM_", "OPENAI_", "DATABASE_URL"))}
    env.update(LITELLM_OFFLINE_ENV)
    # Recent releases refuse to start without a master key; a random one, sent by the client,
    # also means the proxy's normal authentication path is part of what is measured.
    env["LITELLM_MASTER_KEY"] = master_key
    svc = services.start(
        "litellm",
        [str(exe), "--config", str(config), "--host", LOOPBACK, "--port", str(port)],
        env=env,
    )
    base = f"http://{LOOPBACK}:{port}"

    def has_model(body: bytes) -> bool:
        return any(m.get("id") == model_name for m in json.loads(body).get("data", []))

    wait_ready(svc, f"{base}/v1/models", 180, has_model,
               headers={"authorization": f"Bearer {master_key}"})
    return base


# -- load -----------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str  # .../v1/chat/completions
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    clients: list[httpx.AsyncClient] = field(default_factory=list)  # one per worker


def request_body(model: str) -> bytes:
    return json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
    }).encode()


def open_clients(stack: contextlib.AsyncExitStack, target: Target, workers: int):
    """One single-connection httpx client per worker.

    One shared pool of 32 connections made httpx's pool bookkeeping the bottleneck of the whole
    benchmark (and bimodal: ~300 or ~600 req/s for the same simulator); a client per worker
    keeps a connection each with none of that. Idle connections expire on the client side
    after 2 s, before the servers' 5 s keep-alive limit, so no request races a server close.
    """
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=2.0)

    async def enter() -> None:
        target.body = request_body(target.model)
        while len(target.clients) < workers:
            target.clients.append(await stack.enter_async_context(
                httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0), trust_env=False)
            ))

    return enter()


@dataclass
class Sample:
    ttft: float  # seconds from sending to the first content delta
    total: float  # seconds from sending to data: [DONE]
    overhead_ms: float | None = None  # STREAM's own x-stream-overhead-ms header


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0  # summed wall time of the measured batches
    batch_rps: list[float] = field(default_factory=list)  # one per round, to show the spread
    cpu: Counter[str] = field(default_factory=Counter)  # CPU seconds per process while measured

    @property
    def rps(self) -> float:
        return len(self.samples) / self.wall if self.wall else 0.0


async def one_request(target: Target, client: httpx.AsyncClient, tokens: int) -> Sample:
    """One streamed completion, SSE parsed by hand; exactly `tokens` content deltas, then [DONE]."""
    started = time.perf_counter()
    first: float | None = None
    deltas = 0
    done = False
    data_lines: list[bytes] = []
    async with client.stream(
        "POST", target.url, content=target.body,
        headers={"content-type": "application/json", "accept": "text/event-stream",
                 **target.headers},
    ) as resp:
        if resp.status_code != 200:
            await resp.aread()
            raise BenchError(
                f"{target.name}: HTTP {resp.status_code}: {resp.text[:300]}"
            )
        overhead = resp.headers.get("x-stream-overhead-ms")
        buf = b""
        async for piece in resp.aiter_bytes():
            buf += piece
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line, buf = buf[:nl].rstrip(b"\r"), buf[nl + 1 :]
                if line:
                    if line.startswith(b"data:"):
                        value = line[5:]
                        data_lines.append(value[1:] if value.startswith(b" ") else value)
                    continue  # comments (":...") and other fields are skipped
                if not data_lines:
                    continue
                data, data_lines = b"\n".join(data_lines), []
                if done:
                    raise BenchError(f"{target.name}: an event after [DONE]: {data[:200]!r}")
                if data == b"[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    raise BenchError(f"{target.name}: error event in stream: {data[:300]!r}")
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        deltas += 1
                        if first is None:
                            first = time.perf_counter()
    ended = time.perf_counter()
    if not done:
        raise BenchError(f"{target.name}: the stream ended without data: [DONE]")
    if deltas != tokens or first is None:
        raise BenchError(f"{target.name}: expected {tokens} content deltas, got {deltas}")
    return Sample(first - started, ended - started, float(overhead) if overhead else None)


async def run_batch(
    target: Target, concurrency: int, count: int, tokens: int
) -> tuple[list[Sample], float]:
    """`count` requests from `concurrency` workers in a closed loop; the samples and wall time."""
    samples: list[Sample] = []
    left = count

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            samples.append(await one_request(target, client, tokens))

    if len(target.clients) < concurrency:
        raise BenchError(f"{target.name}: {len(target.clients)} clients for {concurrency} workers")
    started = time.perf_counter()
    tasks = [asyncio.create_task(worker(target.clients[i]))
             for i in range(min(concurrency, count))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return samples, time.perf_counter() - started


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of one process group."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ... utime stime
            total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


def cpu_snapshot(groups: dict[str, int]) -> dict[str, float]:
    snap = {name: group_cpu(pgid) for name, pgid in groups.items()}
    snap["load generator"] = time.process_time()
    return snap


async def measure(
    targets: list[Target], levels: list[int], requests: dict[int, int], warmup: int,
    rounds: int, tokens: int, groups: dict[str, int],
) -> dict[int, dict[str, Series]]:
    results: dict[int, dict[str, Series]] = {}
    async with contextlib.AsyncExitStack() as stack:
        for t in targets:
            await open_clients(stack, t, max(levels))
        for c in levels:
            total = requests[c]
            per_round = [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]
            print(f"[bench] concurrency {c}: warm-up {warmup}/target, then {total}/target "
                  f"in {rounds} alternating rounds", flush=True)
            for t in targets:
                await run_batch(t, c, warmup, tokens)
            series = {t.name: Series() for t in targets}
            for r, n in enumerate(per_round):
                if n == 0:
                    continue
                shift = r % len(targets)
                for t in targets[shift:] + targets[:shift]:
                    before = cpu_snapshot(groups)
                    samples, wall = await run_batch(t, c, n, tokens)
                    after = cpu_snapshot(groups)
                    series[t.name].cpu.update({k: after[k] - before[k] for k in after})
                    series[t.name].samples += samples
                    series[t.name].wall += wall
                    series[t.name].batch_rps.append(len(samples) / wall)
            results[c] = series
            line = ", ".join(
                f"{name} {s.rps:.0f} req/s (rounds: {', '.join(f'{x:.0f}' for x in s.batch_rps)})"
                for name, s in series.items()
            )
            print(f"[bench] concurrency {c}: {line}", flush=True)
    return results


# -- statistics and report ---------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(results: dict[int, dict[str, Series]]) -> list[dict[str, Any]]:
    rows = []
    for c, series in results.items():
        base = series["direct"]
        base_ttft = percentile([s.ttft for s in base.samples], 50) * 1000
        for name, s in series.items():
            ttft = [x.ttft * 1000 for x in s.samples]
            total = [x.total * 1000 for x in s.samples]
            own = [x.overhead_ms for x in s.samples if x.overhead_ms is not None]
            row = {
                "target": name, "concurrency": c, "requests": len(s.samples),
                "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
                "ttft_p99_ms": percentile(ttft, 99), "ttft_mean_ms": sum(ttft) / len(ttft),
                "stream_p50_ms": percentile(total, 50), "stream_p95_ms": percentile(total, 95),
                "stream_p99_ms": percentile(total, 99),
                "req_per_s": s.rps, "wall_s": s.wall,
                "req_per_s_by_round": [round(x, 1) for x in s.batch_rps],
                "ttft_p50_delta_ms": percentile(ttft, 50) - base_ttft,
                "rps_ratio": s.rps / base.rps if base.rps else float("nan"),
            }
            if own:
                row["self_reported_overhead_p50_ms"] = percentile(own, 50)
            n = len(s.samples)
            row["cpu_ms_per_request"] = {k: 1000 * v / n for k, v in s.cpu.items()}
            row["cpu_cores_busy"] = {k: v / s.wall for k, v in s.cpu.items()}
            rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| target | conc. | TTFT p50 | TTFT p95 | TTFT p99 | stream p50 | stream p95 "
            "| req/s | Δ TTFT p50 vs direct | req/s vs direct | proxy CPU/req |")
    out = [head, "|" + "---|" * 11]
    for r in rows:
        direct = r["target"] == "direct"
        delta = "—" if direct else f"{r['ttft_p50_delta_ms']:+.2f} ms"
        ratio = "—" if direct else f"{r['rps_ratio']:.2f}×"
        proxy_cpu = r["cpu_ms_per_request"].get(r["target"])
        cpu = "—" if direct or proxy_cpu is None else f"{proxy_cpu:.2f} ms"
        out.append(
            f"| {r['target']} | {r['concurrency']} | {r['ttft_p50_ms']:.2f} | "
            f"{r['ttft_p95_ms']:.2f} | {r['ttft_p99_ms']:.2f} | {r['stream_p50_ms']:.2f} | "
            f"{r['stream_p95_ms']:.2f} | {r['req_per_s']:.0f} | {delta} | {ratio} | {cpu} |"
        )
    out.append("")
    out.append("(times in ms; TTFT = request sent → first content token; proxy CPU/req = CPU "
               "time of the gateway's own process per request)")
    return "\n".join(out)


def cpu_table(rows: list[dict[str, Any]]) -> str:
    """CPU per request of every process, and how many cores each kept busy."""
    procs: list[str] = []
    for r in rows:
        procs += [p for p in r["cpu_ms_per_request"] if p not in procs]
    head = "| target | conc. | " + " | ".join(f"{p} ms/req (cores)" for p in procs) + " |"
    out = [head, "|" + "---|" * (2 + len(procs))]
    for r in rows:
        cells = [
            f"{r['cpu_ms_per_request'][p]:.2f} ({r['cpu_cores_busy'][p]:.2f})"
            if p in r["cpu_ms_per_request"] else "—" for p in procs
        ]
        out.append(f"| {r['target']} | {r['concurrency']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def verdicts(rows: list[dict[str, Any]], levels: list[int]) -> list[tuple[str, bool]]:
    out = []
    stream = {r["concurrency"]: r for r in rows if r["target"] == "stream"}
    lo, hi = min(levels), max(levels)
    if lo in stream:
        d = stream[lo]["ttft_p50_delta_ms"]
        out.append((f"STREAM adds {d:+.2f} ms to TTFT p50 at concurrency {lo} (target ≤ 1 ms)",
                    d <= 1.0))
    if hi in stream and hi != lo:
        q = stream[hi]["rps_ratio"]
        text = (f"STREAM keeps {q:.2f}× the direct request rate at concurrency {hi} "
                "(target ≥ 0.50×)")
        out.append((text, q >= 0.5))
    return out


def save_results(name: str, settings: dict[str, Any], **sections: Any) -> Path:
    """Write a run's results as bench/results/<name>-<time>.json, with the command and the
    machine, so that a figure in docs/BENCHMARKS.md can be traced to its run."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(), "settings": settings, **sections}, indent=2) + "\n")
    return path


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True, check=False).stdout.strip()
    if commit and dirty:
        # Which uncommitted state was measured, so runs of the same working tree can be matched.
        diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD", "--", "src"],
                              capture_output=True, check=False).stdout
        digest = hashlib.sha256(diff).hexdigest()[:12]
        commit += f" + uncommitted changes in src/ (diff sha256 {digest})"
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "cpu": cpu,
        "platform": platform.platform(),
        "httpx2": httpx.__version__,
        "commit": commit or "unknown",
    }


# -- profiling the gateway ----------------------------------------------------------------------


def find_py_spy(workdir: Path, venv: Path | None) -> str:
    found = shutil.which("py-spy")
    if found:
        return found
    if venv is not None and (venv / "bin" / "py-spy").exists():
        return str(venv / "bin" / "py-spy")
    venv = venv or workdir / "tools-venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                       stdout=subprocess.DEVNULL)
    print("[bench] installing py-spy into the throw-away venv ...", flush=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", "py-spy"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return str(venv / "bin" / "py-spy")


def _frame_parts(frame: str) -> tuple[str, str]:
    """py-spy's "func (pkg/mod.py:123)" -> ("func (pkg/mod.py)", "pkg/mod.py")."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({path})", path


def _layer(path: str) -> str:
    """Which package a source file belongs to: `streamllm/...` by module, others by package."""
    if path.startswith("streamllm/"):
        return path
    head = path.split("/", 1)[0]
    return head.removesuffix(".py")


def summarise_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Shares of the gateway's busy samples from py-spy's collapsed stacks ("a;b;c count").

    self: where the sample was taken (the innermost frame); by_package: self time summed per
    package (per module inside streamllm); inclusive: samples with the function anywhere on the
    stack, leaving out the frames every sample shares (CLI, uvicorn.run, the event loop).
    """
    own: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        parts = [_frame_parts(f) for f in stack.split(";") if f]
        if not parts:
            continue
        own[parts[-1][0]] += count
        layers[_layer(parts[-1][1])] += count
        for name in {name for name, _ in parts}:
            incl[name] += count

    def pct(n: int) -> float:
        return round(100.0 * n / total, 1) if total else 0.0

    shared = {name for name, n in incl.items() if n >= 0.995 * total}
    return {
        "samples": total,
        "self": [(name, pct(n)) for name, n in own.most_common(top)],
        "by_package": [(name, pct(n)) for name, n in layers.most_common(top)],
        "inclusive": [(name, pct(n)) for name, n in incl.most_common()
                      if name not in shared][:top],
        "streamllm_inclusive": [(name, pct(n)) for name, n in incl.most_common()
                                if "(streamllm/" in name and name not in shared][:top],
    }


async def _profile_load(target: Target, concurrency: int, count: int, tokens: int) -> float:
    async with contextlib.AsyncExitStack() as stack:
        await open_clients(stack, target, concurrency)
        await run_batch(target, concurrency, 50, tokens)
        samples, wall = await run_batch(target, concurrency, count, tokens)
        return len(samples) / wall


def profile_gateway(py_spy: str, gateway: Service, gateway_url: str, workdir: Path,
                    concurrency: int, count: int, tokens: int) -> dict[str, Any]:
    raw = workdir / "gateway-profile.txt"
    log = workdir / "py-spy.log"
    # Blocking mode (the default): py-spy pauses the gateway for each sample, which costs a
    # little throughput but gives whole stacks; --nonblocking left a third of them truncated.
    with open(log, "wb") as err:
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(gateway.proc.pid), "--rate", "250",
             "--format", "raw", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )
    try:
        time.sleep(1.0)
        if spy.poll() is not None:
            raise BenchError(f"py-spy exited at once: {log.read_text()[-500:]}")
        target = Target("stream", f"{gateway_url}/v1/chat/completions", "local")
        rps = asyncio.run(_profile_load(target, concurrency, count, tokens))
    finally:
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _stop(spy)
    if not raw.exists():
        raise BenchError(f"py-spy wrote no profile: {log.read_text()[-500:]}")
    summary = summarise_profile(raw)
    summary["req_per_s_while_profiled"] = rps
    summary["raw"] = raw.read_text()
    return summary


# -- main ---------------------------------------------------------------------------------------


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return levels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=parse_levels, default=[1, 32],
                   help="comma-separated concurrency levels (default 1,32)")
    p.add_argument("--requests", default=None,
                   help="measured requests per target: one number for every level, or one per "
                        "level (default 400 at concurrency 1, 2000 above)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up requests per target and level")
    p.add_argument("--rounds", type=int, default=4,
                   help="split each measurement into this many alternating rounds (default 4)")
    p.add_argument("--tokens", type=int, default=32, help="answer length in tokens (default 32)")
    p.add_argument("--skip-litellm", action="store_true", help="do not benchmark LiteLLM")
    p.add_argument("--litellm-spec", default="litellm[proxy]", help="pip requirement for LiteLLM")
    p.add_argument("--litellm-venv", type=Path, default=None,
                   help="reuse (or create and keep) LiteLLM's virtualenv here instead of a "
                        "throw-away one; must be outside the repository")
    p.add_argument("--gateway-python", default=None,
                   help="run the gateway as `PYTHON -m streamllm.cli serve` (another virtualenv "
                        "or checkout, for A/B comparisons); default: this venv's `streamllm`")
    p.add_argument("--profile-gateway", action="store_true",
                   help="afterwards, sample the gateway with py-spy (installed into a throw-away "
                        "venv unless on PATH) under load and print its hot spots")
    p.add_argument("--profile-requests", type=int, default=3000,
                   help="requests sent while py-spy samples the gateway (default 3000)")
    p.add_argument("--profile-concurrency", type=int, default=None,
                   help="concurrency while profiling (default: the highest level)")
    p.add_argument("--json", type=Path, default=None,
                   help="write results here (default bench/results/overhead-<time>.json)")
    p.add_argument("--no-json", action="store_true", help="do not write a JSON file")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the temporary directory (configs, server logs) after a good run")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when STREAM misses a target (≤ 1 ms TTFT p50 at the lowest "
                        "concurrency, ≥ 0.5× direct req/s at the highest)")
    args = p.parse_args(argv)

    levels = args.concurrency
    if args.requests is None:
        requests = {c: 400 if c == 1 else 2000 for c in levels}
    else:
        try:
            counts = [int(x) for x in str(args.requests).split(",") if x.strip()]
        except ValueError:
            p.error("--requests takes one positive number, or one per concurrency level")
        if len(counts) == 1:
            counts *= len(levels)
        if len(counts) != len(levels) or any(n < 1 for n in counts):
            p.error("--requests takes one positive number, or one per concurrency level")
        requests = dict(zip(levels, counts))
    if args.gateway_python:
        # abspath, not resolve(): a venv's python is a symlink that must stay as it is.
        args.gateway_python = os.path.abspath(args.gateway_python)
    if args.rounds < 1 or args.warmup < 0 or args.tokens < 1:
        p.error("--rounds and --tokens must be positive, --warmup not negative")
    if args.litellm_venv is not None:
        venv_abs = args.litellm_venv.resolve()
        if venv_abs == REPO or REPO in venv_abs.parents:
            p.error("--litellm-venv must be outside the repository")

    # SIGTERM unwinds like Ctrl-C, so the `finally` below stops every server.
    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Also when started from a shell that ignores SIGINT for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    workdir = Path(tempfile.mkdtemp(prefix="streamllm-bench-"))
    services = Services(workdir)
    ok = False
    try:
        info = machine_info()
        print(f"[bench] machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}; "
              f"work dir {workdir}", flush=True)
        litellm_exe = None
        venv = None
        if not args.skip_litellm:
            venv = args.litellm_venv.resolve() if args.litellm_venv else workdir / "litellm-venv"
            litellm_exe = prepare_litellm_venv(venv, args.litellm_spec, workdir)
            info["litellm"] = litellm_version(venv)

        sim_base = start_simulator(services, args.tokens)
        gateway_base = start_gateway(services, sim_base, args.gateway_python)
        targets = [
            Target("direct", f"{sim_base}/v1/chat/completions", SIM_MODEL),
            Target("stream", f"{gateway_base}/v1/chat/completions", "local"),
        ]
        print(f"[bench] simulator {sim_base}, STREAM {gateway_base}", flush=True)
        if litellm_exe is not None:
            print("[bench] starting the LiteLLM proxy ...", flush=True)
            key = "sk-bench-" + secrets.token_hex(16)
            litellm_base = start_litellm(services, litellm_exe, sim_base, "bench-sim", key)
            targets.append(Target("litellm", f"{litellm_base}/v1/chat/completions", "bench-sim",
                                  headers={"authorization": f"Bearer {key}"}))
            print(f"[bench] LiteLLM {info['litellm']} at {litellm_base}", flush=True)

        started = time.monotonic()
        results = asyncio.run(
            measure(targets, levels, requests, args.warmup, args.rounds, args.tokens,
                    {svc.name: svc.proc.pid for svc in services.started})
        )
        for svc in services.started:
            if svc.proc.poll() is not None:
                raise BenchError(f"{svc.name} exited during the run; its log ends:\n{svc.tail()}")
        rows = summarise(results)
        table = markdown_table(rows)
        print()
        print(table)
        print()
        print("CPU time per request by process (and cores kept busy) while each target ran:")
        print()
        print(cpu_table(rows))
        print()
        checks = verdicts(rows, levels)
        for text, passed in checks:
            print(f"{'MET ' if passed else 'MISSED'}  {text}")
        print(f"\n[bench] measured in {time.monotonic() - started:.0f}s", flush=True)

        profile = None
        if args.profile_gateway:
            py_spy = find_py_spy(workdir, venv)
            gateway = next(s for s in services.started if s.name == "stream")
            c = args.profile_concurrency or max(levels)
            print(f"[bench] profiling the gateway with py-spy at concurrency {c}, "
                  f"{args.profile_requests} requests ...", flush=True)
            profile = profile_gateway(py_spy, gateway, gateway_base, workdir, c,
                                      args.profile_requests, args.tokens)
            print(f"\nGateway CPU profile ({profile['samples']} samples while busy, "
                  f"{profile['req_per_s_while_profiled']:.0f} req/s under py-spy)")
            for key, title in (
                ("by_package", "self time by package (streamllm by module)"),
                ("self", "self time by function"),
                ("inclusive", "inclusive time by function (shared root frames left out)"),
                ("streamllm_inclusive", "inclusive time, streamllm functions"),
            ):
                print(f"\n{title}, % of busy samples:")
                for name, share in profile[key]:
                    print(f"  {share:5.1f}  {name}")
            print()

        if not args.no_json:
            path = args.json or RESULTS_DIR / (
                "overhead-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json"
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            doc = {
                "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": info,
                "settings": {"concurrency": levels, "requests": requests, "warmup": args.warmup,
                             "rounds": args.rounds, "tokens": args.tokens},
                "rows": rows,
                "checks": [{"text": t, "met": m} for t, m in checks],
            }
            if profile is not None:
                doc["gateway_profile"] = {k: v for k, v in profile.items() if k != "raw"}
                raw_path = path.with_suffix(".gateway-profile.txt")
                raw_path.write_text(profile["raw"])
            path.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"[bench] results written to {path}")
        ok = True
        return 1 if args.check and not all(m for _, m in checks) else 0
    except BenchError as e:
        print(f"\n[bench] FAILED: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[bench] interrupted", file=sys.stderr)
        return 130
    finally:
        services.stop_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if ok and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            # Keep the servers' logs for a look, but not a multi-hundred-MB virtualenv.
            for leftover in ("litellm-venv", "tools-venv"):
                shutil.rmtree(workdir / leftover, ignore_errors=True)
            print(f"[bench] logs kept in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
