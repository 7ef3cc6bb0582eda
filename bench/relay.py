#!/usr/bin/env python3
"""What does the HPC tier's relay cost? Time to first token through the relay, through batch
mode and straight from the backend, the relay's cost per token, and what one relay core holds.

Part 1, time to first token. One run starts on 127.0.0.1 (ports picked by the OS):

* the STREAM simulator (`streamllm sim`) as the cluster's vLLM: model `paced` (TTFT 30 ms,
  50 tokens/s, 200-token answers by default) and model `fast` (no delays, same answer length);
* the relay (`streamllm relay`), in its own process;
* a Parsl control plane (`HighThroughputExecutor`, `LocalProvider`): interchange and worker
  processes of its own, the DataFlowKernel inside this process, where a gateway has it.

This process plays the gateway: `HPCRelayBackend` with `transport="relay"` and with
`transport="batch"` over the same Parsl plane, and `OpenAIHTTPBackend` straight to the
simulator. Requests of four kinds (relay, batch, direct, and the empty job
`streamllm.hpc.worker.ping`, which reports the worker's clock) are started round-robin at a
fixed interval, the order rotating each round, so every kind sees the same machine. The
worker's result carries its wall-clock start and first backend chunk, which splits a relay
request's time to first token into control-plane dispatch, the worker's own time to the
backend's first chunk, and the relay hop back. Every answer is checked against the text the
simulator must produce.

Part 2, cost per token: the `paced` streams of part 1 (inter-token timing, relay against
direct), then the `fast` model, where nothing waits, streamed alternately through relay and
direct: the time from first to last token, per token.

Part 3, relay capacity: a fresh relay pinned to CPU 0, a load generator (this script with
--load-generator) pinned to CPU 1 holding both ends of every channel, sending DATA frames that
were sealed with the worker's `Sealer` and carry a chunk as the worker re-encodes it. It
measures one frame's latency on an idle relay; frames and tokens per second through long-lived
channels; whole 200-token streams per second, channel set-up included; how many channels the
relay holds at once (all checked alive) and its RSS per channel.

Everything it started is stopped again on success, error, Ctrl-C or SIGTERM.

    .venv/bin/python bench/relay.py                  # full run, about 4 minutes
    .venv/bin/python bench/relay.py --quick          # smoke run, under a minute
    .venv/bin/python bench/relay.py --requests 60 --channels 8000

See docs/BENCHMARKS.md for what the numbers mean and the latest results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import datetime as dt
import json
import math
import os
import resource
import secrets
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Process handling, readiness checks and statistics are shared with the gateway benchmark.
from overhead import (
    LOOPBACK,
    RESULTS_DIR,
    BenchError,
    Service,
    Services,
    free_port,
    machine_info,
    percentile,
    streamllm_exe,
    wait_ready,
)

MESSAGES = [{"role": "user", "content": "Summarise what the cluster found in last night's run."}]
PACED, FAST = "paced", "fast"
SECRET_ENV = "STREAMLLM_RELAY_SECRET"


# -- processes ------------------------------------------------------------------------------


def start_simulator(services: Services, ttft_ms: float, rate: float, tokens: int) -> str:
    port = free_port()
    config = services.workdir / "sim.yaml"
    config.write_text(textwrap.dedent(f"""\
        models:
          {PACED}: {{ttft_ms: {ttft_ms}, tokens_per_s: {rate}, answer_tokens: {tokens}}}
          {FAST}: {{ttft_ms: 0, tokens_per_s: 0, answer_tokens: {tokens}}}
        """))
    svc = services.start(
        "simulator",
        [streamllm_exe(), "sim", "--host", LOOPBACK, "--port", str(port), "--config", str(config)],
    )
    base = f"http://{LOOPBACK}:{port}"
    wait_ready(svc, f"{base}/health", 30)
    return base


def start_relay(services: Services, name: str, secret: str) -> tuple[Service, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLLM_")}
    env[SECRET_ENV] = secret
    svc = services.start(
        name, [streamllm_exe(), "relay", "--host", LOOPBACK, "--port", str(port)], env=env
    )
    wait_ready(svc, f"http://{LOOPBACK}:{port}/health", 30)
    return svc, f"ws://{LOOPBACK}:{port}"


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (sched_setaffinity is per thread on Linux)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cpus)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _tree_seconds(root: int, marker: str) -> float:
    """CPU seconds used so far by `root`, by processes whose command line holds `marker` (Parsl
    starts its worker pool detached, under init, from a script in our work directory), and by
    every live process descended from either."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    roots = {root}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    roots.add(int(entry.name))
        except OSError:
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / tick
    total = 0.0
    for pid, used in cpu.items():
        p = pid
        while p > 1 and p not in roots:
            p = parent.get(p, 0)
        if p in roots:
            total += used
    return total


class OtherLoad:
    """How busy the machine was with processes that are not this benchmark's (other users'
    tests, say): busy CPU time of all cores minus what this benchmark's processes used, per
    second. Processes that ended in between are not counted as ours (Parsl's are stopped
    after the measurement)."""

    def __init__(self, workdir: Path):
        self._marker = str(workdir)

    def start(self) -> OtherLoad:
        self._t, self._busy = time.monotonic(), _busy_seconds()
        self._ours = _tree_seconds(os.getpid(), self._marker)
        self.cores: float | None = None
        return self

    def stop(self) -> float:
        """Call while this benchmark's processes still run; later calls keep the first figure."""
        if self.cores is None:
            wall = time.monotonic() - self._t
            ours = _tree_seconds(os.getpid(), self._marker) - self._ours
            self.cores = max(0.0, (_busy_seconds() - self._busy - ours) / wall) if wall else 0.0
        return self.cores


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def raise_fd_limit() -> int:
    """Open files up to the hard limit; children (the relay) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- part 1 and 2: one request of each kind ------------------------------------------------------

# The job record of the request running in the current task; TimedPlane fills it in.
_JOB: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("job", default=None)


class TimedPlane:
    """The control plane, noting for each job when it was submitted and its future: the
    future's result holds the worker's own timestamps."""

    def __init__(self, plane: Any):
        self.plane = plane
        self.name = plane.name

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        record = _JOB.get()
        submitted = time.time()
        future = self.plane.submit(fn, *args)
        if record is not None:
            record.update(submitted_at=submitted, future=future)
        return future

    def shutdown(self) -> None:
        self.plane.shutdown()


def warm_worker() -> int:
    """Import what run_completion needs, and stay long enough that each worker gets one."""
    import http.client  # noqa: F401
    import os
    import time

    import websockets.sync.client  # noqa: F401

    import streamllm.hpc.worker  # noqa: F401

    time.sleep(0.3)
    return os.getpid()


@dataclass
class Sample:
    kind: str  # relay | batch | direct | dispatch | relay-fast | direct-fast
    t0: float  # wall clock when the request was started
    first_any: float | None = None  # first chunk of any kind at the client (wall clock)
    first_content: float | None = None  # first content token at the client (wall clock)
    end: float | None = None
    token_times: list[float] = field(default_factory=list)  # perf_counter per content delta
    submitted_at: float | None = None  # control-plane submit (wall clock)
    started_at: float | None = None  # run_completion started on the worker
    first_chunk_at: float | None = None  # first backend chunk at the worker
    worker_seconds: float | None = None  # the job's own duration
    frames: int | None = None
    cut_short: bool = False  # relay only: the job's result came first; the rest was healed

    def ms(self, a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else (b - a) * 1000


def _check_answer(sample: Sample, text: str, usage: dict | None, finish: str | None,
                  model: str, tokens: int, expect_deltas: int | None) -> None:
    expected = _expected_text(model, tokens)
    if text != expected:
        raise BenchError(f"{sample.kind}: wrong answer ({len(text)} chars, expected "
                         f"{len(expected)}): {text[:80]!r}")
    if expect_deltas is not None and len(sample.token_times) != expect_deltas:
        raise BenchError(f"{sample.kind}: {len(sample.token_times)} content deltas, "
                         f"expected {expect_deltas}")
    if not usage or usage.get("completion_tokens") != tokens:
        raise BenchError(f"{sample.kind}: usage {usage!r}, expected {tokens} completion tokens")
    if finish != "stop":
        raise BenchError(f"{sample.kind}: finish reason {finish!r}")


_TEXTS: dict[tuple[str, int], str] = {}


def _expected_text(model: str, tokens: int) -> str:
    from streamllm.sim.content import answer_text

    key = (model, tokens)
    if key not in _TEXTS:
        _TEXTS[key] = answer_text(model, MESSAGES, tokens)
    return _TEXTS[key]


def request_body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "stream": True,
            "stream_options": {"include_usage": True}}


async def _consume(sample: Sample, batches: Any) -> tuple[str, dict | None, str | None]:
    """Read a backend's stream, timing the first chunk, the first token and every token."""
    parts: list[str] = []
    usage = finish = None
    async for batch in batches:
        now, tick = time.time(), time.perf_counter()
        if sample.first_any is None:
            sample.first_any = now
        for chunk in batch:
            if chunk.data.get("usage"):
                usage = chunk.data["usage"]
            for choice in chunk.data.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
                    sample.token_times.append(tick)
                    if sample.first_content is None:
                        sample.first_content = now
                finish = choice.get("finish_reason") or finish
    sample.end = time.time()
    return "".join(parts), usage, finish


async def direct_request(backend: Any, model: str, tokens: int, kind: str) -> Sample:
    sample = Sample(kind, time.time())
    text, usage, finish = await _consume(sample, backend.stream(request_body(model)))
    _check_answer(sample, text, usage, finish, model, tokens, tokens)
    return sample


async def hpc_request(backend: Any, transport: str, model: str, tokens: int, kind: str) -> Sample:
    from streamllm.tiers.base import Dispatch

    record: dict[str, Any] = {}
    _JOB.set(record)  # this task's own context: concurrent requests do not mix
    dispatch = Dispatch()
    sample = Sample(kind, time.time())
    text, usage, finish = await _consume(sample, backend.stream(request_body(model), dispatch))
    if dispatch.headers.get("x-stream-transport") != transport:
        raise BenchError(f"{kind}: went by {dispatch.headers.get('x-stream-transport')!r}, "
                         f"not {transport}")
    if "future" not in record:
        raise BenchError(f"{kind}: no control-plane submission was seen")
    result = await asyncio.wrap_future(record["future"])
    if result.get("error"):
        raise BenchError(f"{kind}: the job failed: {result['error']}")
    if transport == "relay" and result.get("relay_error"):
        raise BenchError(f"{kind}: the worker's relay failed: {result['relay_error']}")
    sample.submitted_at = record["submitted_at"]
    sample.started_at = result.get("started_at")
    sample.first_chunk_at = result.get("first_chunk_at")
    sample.worker_seconds = result.get("seconds")
    sample.frames = result.get("frames")
    # Batch mode answers in one delta carrying the whole text. A relay stream whose job result
    # reached the gateway before all its frames did ends with the rest as one healed delta.
    _check_answer(sample, text, usage, finish, model, tokens, None)
    if transport == "relay" and len(sample.token_times) != tokens:
        sample.cut_short = True
    return sample


async def dispatch_request(plane: Any) -> Sample:
    """The worker module's own empty job (`ping`), which reports the worker's clock."""
    from streamllm.hpc.worker import ping

    sample = Sample("dispatch", time.time())
    sample.submitted_at = time.time()
    sample.started_at = (await asyncio.wrap_future(plane.submit(ping)))["at"]
    sample.end = time.time()
    return sample


async def interleave(kinds: dict[str, Callable[[], Awaitable[Sample]]], rounds: int,
                     interval: float, label: str) -> dict[str, list[Sample]]:
    """Start one request every `interval` seconds, the kinds in turn, the order rotating each
    round; `interval` 0 runs them one after another instead."""
    names = list(kinds)
    out: dict[str, list[Sample]] = {n: [] for n in names}
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Sample]] = []
    start = loop.time()
    slot = 0
    try:
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                if interval > 0:
                    await asyncio.sleep(max(0.0, start + slot * interval - loop.time()))
                    tasks.append(asyncio.create_task(kinds[name]()))
                    slot += 1
                else:
                    out[name].append(await kinds[name]())
            if interval > 0 and (r + 1) % max(1, rounds // 4) == 0:
                print(f"[bench] {label}: {r + 1}/{rounds} rounds started", flush=True)
        for sample in await asyncio.gather(*tasks):
            out[sample.kind].append(sample)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return out


async def measure_requests(
    args: argparse.Namespace, sim: str, relay_url: str, secret: bytes, workdir: Path,
    other: OtherLoad,
) -> tuple[dict[str, list[Sample]], dict[str, int]]:
    from streamllm.config import TierSettings
    from streamllm.hpc.control import IdempotentSubmitter, ParslControlPlane
    from streamllm.tiers.hpc import HPCRelayBackend
    from streamllm.tiers.openai_http import OpenAIHTTPBackend

    print(f"[bench] starting Parsl (LocalProvider, {args.parsl_workers} workers) ...", flush=True)
    t = time.monotonic()
    parsl = ParslControlPlane(run_dir=str(workdir / "parsl"), provider="local",
                              max_workers=args.parsl_workers)
    plane = TimedPlane(parsl)
    direct = OpenAIHTTPBackend("hpc", TierSettings(kind="vllm", base_url=f"{sim}/v1",
                                                   models=[PACED, FAST]))
    submitter = IdempotentSubmitter(plane)
    relay = HPCRelayBackend("hpc", submitter, relay_url, secret, f"{sim}/v1", transport="relay")
    batch = HPCRelayBackend("hpc", submitter, None, None, f"{sim}/v1", transport="batch")
    tokens = args.tokens
    try:
        # Every worker process imports the worker module once, before anything is measured.
        for _ in range(5):
            pids = await asyncio.gather(*(asyncio.wrap_future(parsl.submit(warm_worker))
                                          for _ in range(2 * args.parsl_workers)))
            if len(set(pids)) >= args.parsl_workers:
                break
        await asyncio.gather(
            *(hpc_request(relay, "relay", FAST, tokens, "warm") for _ in range(args.parsl_workers)),
            *(hpc_request(batch, "batch", FAST, tokens, "warm") for _ in range(2)),
            *(direct_request(direct, FAST, tokens, "warm") for _ in range(2)),
            *(dispatch_request(plane) for _ in range(4)),
        )
        print(f"[bench] Parsl ready and warm in {time.monotonic() - t:.1f}s", flush=True)

        print(f"[bench] part 1: {args.requests} requests per kind, one started every "
              f"{args.interval:g}s ({args.ttft_ms:g} ms TTFT, {args.rate:g} tokens/s, "
              f"{tokens} tokens)", flush=True)
        t = time.monotonic()
        paced = await interleave({
            "relay": lambda: hpc_request(relay, "relay", PACED, tokens, "relay"),
            "batch": lambda: hpc_request(batch, "batch", PACED, tokens, "batch"),
            "direct": lambda: direct_request(direct, PACED, tokens, "direct"),
            "dispatch": lambda: dispatch_request(plane),
        }, args.requests, args.interval, "part 1")
        print(f"[bench] part 1 done in {time.monotonic() - t:.0f}s", flush=True)

        print(f"[bench] part 2: {args.fast_requests} unpaced streams each through relay and "
              "direct, one after another", flush=True)
        t = time.monotonic()
        fast = await interleave({
            "relay-fast": lambda: hpc_request(relay, "relay", FAST, tokens, "relay-fast"),
            "direct-fast": lambda: direct_request(direct, FAST, tokens, "direct-fast"),
        }, args.fast_requests, 0, "part 2")
        print(f"[bench] part 2 done in {time.monotonic() - t:.0f}s", flush=True)
        if relay.rejected:
            raise BenchError(f"the gateway rejected relay frames: {relay.rejected}")
        print(f"[bench] relay streams finished from the job's result (healed): {relay.healed}",
              flush=True)
        other.stop()  # before Parsl's detached worker pool goes away
        return {**paced, **fast}, {"healed": relay.healed}
    finally:
        await direct.aclose()
        parsl.shutdown()


# -- part 3: the load generator (a separate process) -----------------------------------------------


def chunk_payload(i: int) -> bytes:
    """A chunk as the simulator sends it (vLLM's shape), as the worker re-encodes it."""
    return json.dumps({
        "id": "chatcmpl-sim4242", "object": "chat.completion.chunk", "created": 1767225600,
        "model": PACED,
        "choices": [{"index": 0, "delta": {"content": f" token{i % 1000}"}, "logprobs": None,
                     "finish_reason": None}],
        "usage": None,
    }, separators=(",", ":")).encode()


class _Stream:
    """One channel's two tokens and a sealed answer, prepared before the clock runs."""

    def __init__(self, secret: bytes, tokens: int, final: bool = True):
        from streamllm.relay.crypto import Sealer, new_key
        from streamllm.relay.frames import Direction, FrameType
        from streamllm.relay.tokens import mint

        self.channel = secrets.token_hex(16)
        self.key = new_key()
        # The gateway's default token lifetime: how long the relay remembers a used token.
        self.producer_token = mint(secret, self.channel, "producer", 120)
        self.consumer_token = mint(secret, self.channel, "consumer", 120)
        sealer = Sealer(self.key, self.channel, Direction.DOWN)
        self.frames = [sealer.seal(FrameType.DATA, chunk_payload(i)) for i in range(tokens)]
        self.final = sealer.final(b'{"cancelled":false}') if final else b""
        self.sealer = sealer  # to seal more, when `final` is False


def _is_final(frame: bytes) -> bool:
    from streamllm.relay.frames import FrameType

    return frame[1] == FrameType.FINAL


_TOKENS_USED = [0]  # tokens this generator has presented to the relay (it remembers them)


async def _open_pair(relay: str, s: _Stream) -> tuple[Any, Any]:
    from streamllm.relay.client import dial

    _TOKENS_USED[0] += 2
    consumer = await dial(relay, s.channel, "consumer", s.consumer_token, resume_from=0)
    producer = await dial(relay, s.channel, "producer", s.producer_token)
    return producer, consumer


def _verify(s: _Stream, received: list[bytes]) -> None:
    """The consumer's side, as the gateway does it: every frame authentic and in order."""
    from streamllm.relay.crypto import Opener
    from streamllm.relay.frames import Direction

    opener = Opener(s.key, s.channel, Direction.DOWN)
    for frame in received:
        opener.open(frame)
    opener.end()


async def gen_latency(relay: str, secret: bytes, frames: int, rate: float) -> dict[str, Any]:
    """One channel, one frame at a time: seal, relay, open, parse; on an otherwise idle relay."""
    from streamllm.relay.crypto import Opener, Sealer
    from streamllm.relay.frames import Direction, FrameType

    s = _Stream(secret, 0, final=False)
    producer, consumer = await _open_pair(relay, s)
    sealer = Sealer(s.key, s.channel, Direction.DOWN)
    opener = Opener(s.key, s.channel, Direction.DOWN)
    sent: list[float] = []
    took: list[float] = []

    async def consume() -> None:
        async for frame in consumer.frames():
            ftype, payload = opener.open(frame)
            if ftype is FrameType.FINAL:
                return
            json.loads(payload)
            took.append(time.perf_counter() - sent[len(took)])

    reader = asyncio.create_task(consume())
    start = time.perf_counter()
    for i in range(frames):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        sent.append(time.perf_counter())
        await producer.send(sealer.seal(FrameType.DATA, chunk_payload(i)))
    await producer.send(sealer.final())
    await asyncio.wait_for(reader, 30)
    await producer.close()
    await consumer.close()
    ms = [x * 1000 for x in took]
    return {"frames": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "p99_ms": percentile(ms, 99)}


async def gen_steady(relay: str, secret: bytes, relay_pid: int, channels: int, seconds: float,
                     ring: int, window: int = 256) -> dict[str, Any]:
    """Long-lived channels, producers sending as fast as the relay takes frames.

    Each producer cycles through one sealed stream of `ring` frames: the relay reads only
    headers and never checks sequence numbers, so it does the same work as for fresh frames.
    A producer runs at most `window` frames ahead of its consumer, as a worker would be held
    back by the relay's backpressure; without that, loopback socket buffers soak up hundreds
    of thousands of frames and the producers starve the consumers of this process.
    """
    streams = [_Stream(secret, ring) for _ in range(channels)]
    pairs = [await _open_pair(relay, s) for s in streams]
    received = [0] * channels
    caught_up = [asyncio.Event() for _ in range(channels)]
    stop = asyncio.Event()
    nudge = max(1, window // 4)

    async def produce(i: int) -> None:
        producer, frames = pairs[i][0], streams[i].frames
        n = 0
        while not stop.is_set():
            while n - received[i] >= window:
                caught_up[i].clear()
                await caught_up[i].wait()
            await producer.send(frames[n % ring])
            n += 1
        await producer.send(streams[i].final)

    async def consume(i: int) -> None:
        async for frame in pairs[i][1].frames():
            if _is_final(frame):
                return
            received[i] += 1
            if received[i] % nudge == 0:
                caught_up[i].set()

    tasks = [asyncio.create_task(produce(i)) for i in range(channels)]
    tasks += [asyncio.create_task(consume(i)) for i in range(channels)]
    await asyncio.sleep(1.0)  # ramp up
    n0, c0, g0, t0 = sum(received), process_cpu(relay_pid), time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    n1, c1, g1, t1 = sum(received), process_cpu(relay_pid), time.process_time(), time.perf_counter()
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    for producer, consumer in pairs:
        await producer.close()
        await consumer.close()
    wall = t1 - t0
    return {"channels": channels, "window": window, "seconds": wall, "frames": n1 - n0,
            "frames_per_s": (n1 - n0) / wall, "relay_cores": (c1 - c0) / wall,
            "generator_cores": (g1 - g0) / wall, "frame_bytes": len(streams[0].frames[0])}


async def gen_streams(relay: str, secret: bytes, relay_pid: int, concurrency: int,
                      seconds: float, tokens: int, expected_rate: float) -> dict[str, Any]:
    """Whole answers: per stream a new channel (two handshakes, two tokens checked), `tokens`
    DATA frames and the FINAL frame, as fast as they go, `concurrency` streams at a time."""
    want = int(expected_rate * (seconds + 2) * 1.3) + 4 * concurrency
    pool = [_Stream(secret, tokens) for _ in range(want)]
    pool.reverse()
    done = frames = verified = 0
    ran_out = counting = False
    remembered = _TOKENS_USED[0]
    deadline = time.perf_counter() + 1.0 + seconds + 1.0

    async def worker(w: int) -> None:
        nonlocal done, frames, verified, ran_out
        first = True
        while time.perf_counter() < deadline:
            if pool:
                s = pool.pop()
            else:  # sealed here and now, on the load generator's clock
                s, ran_out = _Stream(secret, tokens), True
            producer, consumer = await _open_pair(relay, s)
            got: list[bytes] = []

            async def send(s: _Stream = s, producer: Any = producer) -> None:
                for frame in s.frames:
                    await producer.send(frame)
                await producer.send(s.final)

            sender = asyncio.create_task(send())
            async for frame in consumer.frames():
                got.append(frame)
                if _is_final(frame):
                    break
            await sender
            await producer.close()
            await consumer.close()
            if len(got) != tokens + 1:
                raise BenchError(f"a stream delivered {len(got)} of {tokens + 1} frames")
            if first:  # open one stream per worker completely, as the gateway would
                _verify(s, got)
                verified += 1
                first = False
            if counting:
                done += 1
                frames += len(got)

    tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    await asyncio.sleep(1.0)
    counting = True
    c0, g0, t0 = process_cpu(relay_pid), time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    counting = False
    c1, g1, t1 = process_cpu(relay_pid), time.process_time(), time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    wall = t1 - t0
    return {"concurrency": concurrency, "tokens": tokens, "seconds": wall, "streams": done,
            "streams_per_s": done / wall, "frames_per_s": frames / wall,
            "tokens_per_s": done * tokens / wall, "relay_cores": (c1 - c0) / wall,
            "generator_cores": (g1 - g0) / wall, "verified_streams": verified,
            "pool_ran_out": ran_out, "tokens_remembered_before": remembered}


async def gen_hold(relay: str, secret: bytes, relay_pid: int, channels: int, answers: int,
                   tokens: int, parallel: int = 64) -> dict[str, Any]:
    """Open `channels` producer+consumer pairs and keep them; prove every one alive; read the
    relay's RSS before and after. Then `answers` of them carry a whole answer each (which the
    relay retains for resumption), and the RSS is read again."""
    import urllib.request

    from streamllm.relay.crypto import Opener
    from streamllm.relay.frames import Direction, FrameType

    health_url = relay.replace("ws://", "http://") + "/health"

    def health() -> dict[str, Any]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(health_url, timeout=10) as resp:
            return json.loads(resp.read())

    base_channels = health()["channels"]
    rss0 = rss_kib(relay_pid)
    streams = [_Stream(secret, 0, final=False) for _ in range(channels)]
    pairs: list[tuple[Any, Any] | None] = [None] * channels
    gate = asyncio.Semaphore(parallel)
    opened_at: list[float] = []
    t0 = time.perf_counter()

    async def open_one(i: int) -> None:
        async with gate:
            pairs[i] = await _open_pair(relay, streams[i])
            opened_at.append(time.perf_counter())

    # In two halves, so that the RSS growth of the second half (no one-off costs in it)
    # can be told from the average.
    half = channels // 2
    await asyncio.gather(*(open_one(i) for i in range(half)))
    await asyncio.sleep(0.5)
    rss_half = rss_kib(relay_pid)
    pause = time.perf_counter() - max(opened_at, default=t0)
    await asyncio.gather(*(open_one(i) for i in range(half, channels)))
    opened_at[half:] = [t - pause for t in opened_at[half:]]  # the pause is not opening time
    open_s = time.perf_counter() - t0 - pause
    # Set-up rate over each tenth of the channels: does opening slow down as more are held?
    tenth = max(1, channels // 10)
    opened_at.sort()
    rates = []
    prev = t0
    for k in range(tenth - 1, channels, tenth):
        rates.append(round(tenth / max(opened_at[k] - prev, 1e-9)))
        prev = opened_at[k]

    # One iterator per consumer, kept for the whole test.
    inbox = [pair[1].frames().__aiter__() for pair in pairs]  # type: ignore[index]

    async def ping(i: int, count: int) -> bool:
        producer = pairs[i][0]  # type: ignore[index]
        s, it = streams[i], inbox[i]
        for j in range(count):
            await producer.send(s.sealer.seal(FrameType.DATA, chunk_payload(j)))
        opener = Opener(s.key, s.channel, Direction.DOWN)
        opener.next_seq = s.sealer.seq - count
        for _ in range(count):
            opener.open(await asyncio.wait_for(it.__anext__(), 30))
        return True

    alive = sum(await asyncio.gather(*(ping(i, 1) for i in range(channels))))
    held = health()["channels"] - base_channels
    await asyncio.sleep(1.0)
    rss1 = rss_kib(relay_pid)
    answers = min(answers, channels)
    t1 = time.perf_counter()
    for start in range(0, answers, parallel):
        await asyncio.gather(*(ping(i, tokens) for i in range(start, min(start + parallel,
                                                                          answers))))
    answer_s = time.perf_counter() - t1
    await asyncio.sleep(1.0)
    rss2 = rss_kib(relay_pid)
    alive_after = sum(await asyncio.gather(*(ping(i, 1) for i in range(channels))))

    async def close(i: int) -> None:
        producer, consumer = pairs[i]  # type: ignore[misc]
        await producer.send(streams[i].sealer.final())
        while not _is_final(await asyncio.wait_for(inbox[i].__anext__(), 30)):
            pass
        await producer.close()
        await consumer.close()

    for start in range(0, channels, parallel):
        await asyncio.gather(*(close(i) for i in range(start, min(start + parallel, channels))))
    return {"channels": channels, "alive": alive, "alive_after_answers": alive_after,
            "held_per_relay_health": held, "open_s": open_s,
            "opened_per_s": channels / open_s, "opened_per_s_by_tenth": rates,
            "rss_before_kib": rss0, "rss_held_kib": rss1,
            "rss_per_channel_kib": (rss1 - rss0) / channels, "rss_half_kib": rss_half,
            "rss_per_channel_second_half_kib": (rss1 - rss_half) / (channels - half),
            "answers": answers, "answer_tokens": tokens, "answers_s": answer_s,
            "rss_with_answers_kib": rss2,
            "rss_per_answer_kib": (rss2 - rss1) / answers if answers else None}


async def load_generator(spec: dict[str, Any]) -> dict[str, Any]:
    secret = os.environ[SECRET_ENV].encode()
    relay, pid, seconds, tokens = spec["relay"], spec["relay_pid"], spec["seconds"], spec["tokens"]
    out: dict[str, Any] = {}

    def say(text: str) -> None:
        print(f"[load] {text}", file=sys.stderr, flush=True)

    # Warm the relay (imports, first allocations) before anything is measured.
    await gen_streams(relay, secret, pid, 4, 0.2, tokens, 20)
    for test in spec["tests"]:
        if test == "hold":
            say(f"hold: {spec['channels']} channels")
            out[test] = await gen_hold(relay, secret, pid, spec["channels"], spec["answers"],
                                       tokens)
        elif test == "latency":
            say("latency: one frame at a time")
            out[test] = await gen_latency(relay, secret, spec["latency_frames"], 100.0)
        elif test == "steady":
            say(f"steady: {spec['steady_channels']} channels for {seconds:g}s")
            out[test] = await gen_steady(relay, secret, pid, spec["steady_channels"], seconds,
                                         2000)
        elif test == "streams":
            say(f"streams: {spec['streams_concurrency']} at a time for {seconds:g}s, "
                f"{_TOKENS_USED[0]} tokens used on this relay so far")
            expected = out["steady"]["frames_per_s"] / (tokens + 1) if "steady" in out else 150
            out[test] = await gen_streams(relay, secret, pid, spec["streams_concurrency"],
                                          seconds, tokens, expected)
    return out


def run_load_generator(spec_json: str) -> int:
    spec = json.loads(spec_json)
    if spec.get("cpu") is not None:
        os.sched_setaffinity(0, {spec["cpu"]})
    raise_fd_limit()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(load_generator(spec))
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


def measure_capacity(args: argparse.Namespace, services: Services) -> dict[str, Any]:
    """Two fresh relays in turn: one for memory (nothing run before it has left freed memory
    for new channels to reuse), then streams on a relay that remembers those channels'
    tokens; one for latency and throughput from a clean start."""
    result: dict[str, Any] = {}
    cpus = sorted(os.sched_getaffinity(0))
    relay_cpu, gen_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    for name, tests in (("relay-memory", ["hold", "streams"]),
                        ("relay-throughput", ["latency", "steady", "streams"])):
        secret = secrets.token_hex(32)
        relay, url = start_relay(services, name, secret)
        if relay_cpu is not None:
            pin(relay.proc.pid, {relay_cpu})
        out = services.workdir / f"{name}.json"
        spec = {"relay": url, "relay_pid": relay.proc.pid, "cpu": gen_cpu, "out": str(out),
                "tests": tests, "tokens": args.tokens, "latency_frames": args.latency_frames,
                "seconds": args.capacity_seconds, "steady_channels": args.steady_channels,
                "streams_concurrency": args.streams_concurrency, "channels": args.channels,
                "answers": args.answers}
        env = dict(os.environ)
        env[SECRET_ENV] = secret
        gen = services.start(f"load-{name}",
                             [sys.executable, str(Path(__file__).resolve()), "--load-generator",
                              json.dumps(spec)], env=env)
        deadline = time.monotonic() + 600
        shown = 0
        while gen.proc.poll() is None:
            if relay.proc.poll() is not None:
                raise BenchError(f"the relay exited during the capacity run:\n{relay.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"the load generator did not finish in 10 min:\n{gen.tail()}")
            time.sleep(0.2)
            lines = gen.log.read_text(errors="replace").splitlines()
            for line in lines[shown:]:
                if line.startswith("[load]"):
                    print(f"[bench] {line[7:]}", flush=True)
            shown = len(lines)
        if gen.proc.returncode != 0 or not out.exists():
            raise BenchError(f"the load generator failed (exit {gen.proc.returncode}):\n"
                             f"{gen.tail(40)}")
        part = json.loads(out.read_text())
        if "hold" in part:
            result["hold"] = part["hold"]
            result["streams_after_hold"] = part["streams"]
        else:
            result.update(part)
        services.stop_all()
    result["relay_cpu"], result["generator_cpu"] = relay_cpu, gen_cpu
    return result


def measure_crypto(tokens: int, rounds: int = 20000) -> dict[str, float]:
    """CPU per token at each end, without sockets: the worker's re-encode and seal, the
    gateway's open and parse."""
    from streamllm.relay.crypto import Opener, Sealer, new_key
    from streamllm.relay.frames import Direction, FrameType

    key, channel = new_key(), secrets.token_hex(16)
    payload = chunk_payload(7)
    chunk = json.loads(payload)
    best: dict[str, float] = {}
    for _ in range(3):
        sealer = Sealer(key, channel, Direction.DOWN)
        opener = Opener(key, channel, Direction.DOWN)
        frames = []
        t = time.perf_counter()
        for _ in range(rounds):
            frames.append(sealer.seal(FrameType.DATA, payload))
        seal = (time.perf_counter() - t) / rounds
        t = time.perf_counter()
        for _ in range(rounds):
            json.dumps(chunk, separators=(",", ":")).encode()
        dumps = (time.perf_counter() - t) / rounds
        t = time.perf_counter()
        for frame in frames:
            _, payload = opener.open(frame)
            json.loads(payload)
        open_parse = (time.perf_counter() - t) / rounds
        for k, v in (("seal_us", seal), ("encode_us", dumps), ("open_parse_us", open_parse)):
            best[k] = min(best.get(k, float("inf")), v * 1e6)
    best["frame_bytes"] = len(frames[0])
    return best


# -- statistics and report ---------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95)}


def summarise(samples: dict[str, list[Sample]], rate: float) -> dict[str, Any]:
    def ms(kind: str, fn: Callable[[Sample], float | None]) -> list[float]:
        return [v for s in samples.get(kind, []) if (v := fn(s)) is not None]

    ttft = {k: stats(ms(k, lambda s: s.ms(s.t0, s.first_content))) for k in
            ("relay", "batch", "direct")}
    out: dict[str, Any] = {"ttft": ttft}
    out["dispatch"] = {
        "relay": stats(ms("relay", lambda s: s.ms(s.submitted_at, s.started_at))),
        "batch": stats(ms("batch", lambda s: s.ms(s.submitted_at, s.started_at))),
        "trivial_to_worker": stats(ms("dispatch", lambda s: s.ms(s.submitted_at, s.started_at))),
        "trivial_round_trip": stats(ms("dispatch", lambda s: s.ms(s.submitted_at, s.end))),
    }
    beyond = stats(ms("relay", lambda s: s.ms(s.t0, s.first_content)
                      - s.ms(s.submitted_at, s.started_at)))  # type: ignore[operator]
    out["relay_beyond_dispatch"] = beyond
    out["relay_overhead_beyond_dispatch_p50_ms"] = beyond["p50"] - ttft["direct"]["p50"]
    out["relay_overhead_total_p50_ms"] = ttft["relay"]["p50"] - ttft["direct"]["p50"]
    out["batch_over_relay"] = ttft["batch"]["p50"] / ttft["relay"]["p50"]
    out["parts_p50_ms"] = {
        "relay": {
            "before_submit": stats(ms("relay", lambda s: s.ms(s.t0, s.submitted_at))),
            "dispatch": out["dispatch"]["relay"],
            "worker_to_first_backend_chunk":
                stats(ms("relay", lambda s: s.ms(s.started_at, s.first_chunk_at))),
            "first_chunk_worker_to_client":
                stats(ms("relay", lambda s: s.ms(s.first_chunk_at, s.first_any))),
            "first_chunk_to_first_token":
                stats(ms("relay", lambda s: s.ms(s.first_any, s.first_content))),
        },
        "batch": {
            "dispatch": out["dispatch"]["batch"],
            "worker_to_first_backend_chunk":
                stats(ms("batch", lambda s: s.ms(s.started_at, s.first_chunk_at))),
            "job": stats(ms("batch", lambda s: s.worker_seconds * 1000
                            if s.worker_seconds is not None else None)),
            "result_back_to_client": stats(ms("batch", lambda s: s.ms(
                s.started_at + s.worker_seconds, s.first_any)
                if s.started_at and s.worker_seconds is not None else None)),
        },
        "direct": {
            "first_chunk": stats(ms("direct", lambda s: s.ms(s.t0, s.first_any))),
            "first_chunk_to_first_token":
                stats(ms("direct", lambda s: s.ms(s.first_any, s.first_content))),
        },
    }
    producer_dial = (out["parts_p50_ms"]["relay"]["worker_to_first_backend_chunk"]["p50"]
                     - out["parts_p50_ms"]["batch"]["worker_to_first_backend_chunk"]["p50"])
    out["producer_dial_p50_ms"] = producer_dial
    # What the relay and its encryption themselves put in front of the first token: the
    # worker's dial before it calls the backend, and the first chunk's trip worker → gateway.
    out["relay_and_crypto_p50_ms"] = (
        producer_dial + out["parts_p50_ms"]["relay"]["first_chunk_worker_to_client"]["p50"])
    # The rest of "beyond dispatch": the worker's own backend call (a fresh connection from
    # http.client) against the gateway's pooled one.
    out["worker_backend_call_vs_direct_p50_ms"] = (
        out["parts_p50_ms"]["batch"]["worker_to_first_backend_chunk"]["p50"]
        - out["parts_p50_ms"]["direct"]["first_chunk"]["p50"])

    def relayed(s: Sample) -> list[float]:
        # A stream cut short ends with one healed delta: time only what the relay carried.
        return s.token_times[:-1] if s.cut_short else s.token_times

    def per_token(kind: str) -> list[float]:
        return [1000 * (t[-1] - t[0]) / (len(t) - 1)
                for s in samples.get(kind, []) if len(t := relayed(s)) > 1]

    def gaps(kind: str) -> list[float]:
        return [1000 * (b - a) for s in samples.get(kind, [])
                for a, b in zip(relayed(s), relayed(s)[1:])]

    tok: dict[str, Any] = {}
    for kind in ("relay", "direct", "relay-fast", "direct-fast"):
        g = gaps(kind)
        cut = [s for s in samples.get(kind, []) if s.cut_short]
        tok[kind] = {"per_token": stats(per_token(kind)), "gap_p99_ms": percentile(g, 99),
                     "gap_max_ms": max(g) if g else float("nan"), "cut_short": len(cut),
                     "relayed_tokens_when_cut": sorted(len(s.token_times) - 1 for s in cut)}
    tok["paced_added_ms"] = tok["relay"]["per_token"]["p50"] - tok["direct"]["per_token"]["p50"]
    tok["fast_added_ms"] = (tok["relay-fast"]["per_token"]["p50"]
                            - tok["direct-fast"]["per_token"]["p50"])
    tok["schedule_ms"] = 1000 / rate if rate else float("nan")
    out["per_token"] = tok
    return out


def _f(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def report_requests(summary: dict[str, Any], crypto: dict[str, float] | None) -> str:
    s = summary
    t, d = s["ttft"], s["dispatch"]
    lines = [
        ("| path | n | TTFT p50 | TTFT p95 | dispatch p50 | dispatch p95 | TTFT − dispatch p50 "
        "| TTFT − dispatch p95 |"),
        "|---|---|---|---|---|---|---|---|",
        (f"| direct | {t['direct']['n']} | {_f(t['direct']['p50'])} | {_f(t['direct']['p95'])} "
        "| — | — | — | — |"),
        (f"| relay | {t['relay']['n']} | {_f(t['relay']['p50'])} | {_f(t['relay']['p95'])} | "
        f"{_f(d['relay']['p50'])} | {_f(d['relay']['p95'])} | "
        f"{_f(s['relay_beyond_dispatch']['p50'])} | {_f(s['relay_beyond_dispatch']['p95'])} |"),
        (f"| batch | {t['batch']['n']} | {_f(t['batch']['p50'], 0)} | {_f(t['batch']['p95'], 0)} "
        f"| {_f(d['batch']['p50'])} | {_f(d['batch']['p95'])} | — | — |"),
        (f"| Parsl dispatch alone (to worker / round trip) | {d['trivial_to_worker']['n']} | — "
        f"| — | {_f(d['trivial_to_worker']['p50'])} / {_f(d['trivial_round_trip']['p50'])} | "
        f"{_f(d['trivial_to_worker']['p95'])} / {_f(d['trivial_round_trip']['p95'])} | — | — |"),
        "",
        ("(ms; TTFT = request started → first content token at the client; dispatch = "
        "control-plane submit → run_completion started on the worker)"),
        "",
        (f"batch / relay TTFT p50: {s['batch_over_relay']:.1f}×; relay − direct TTFT p50: "
        f"{s['relay_overhead_total_p50_ms']:+.2f} ms; relay beyond dispatch − direct, p50: "
        f"{s['relay_overhead_beyond_dispatch_p50_ms']:+.2f} ms"),
        "",
        "Relay request, p50 of each part (ms): "
        + ", ".join(f"{k.replace('_', ' ')} {_f(v['p50'])}"
                    for k, v in s["parts_p50_ms"]["relay"].items()),
        "Batch request, p50 of each part (ms): "
        + ", ".join(f"{k.replace('_', ' ')} {_f(v['p50'])}"
                    for k, v in s["parts_p50_ms"]["batch"].items()),
        "Direct request, p50 (ms): "
        + ", ".join(f"{k.replace('_', ' ')} {_f(v['p50'])}"
                    for k, v in s["parts_p50_ms"]["direct"].items()),
        (f"Producer's relay dial inside the job (relay − batch, worker start → first backend "
        f"chunk, p50): {s['producer_dial_p50_ms']:+.2f} ms"),
        (f"Relay + encryption alone (that dial + the first chunk's trip worker → gateway): "
        f"{s['relay_and_crypto_p50_ms']:.2f} ms; the worker's own backend call against the "
        f"gateway's (batch worker start → first chunk − direct first chunk, p50): "
        f"{s['worker_backend_call_vs_direct_p50_ms']:+.2f} ms"),
        f"Relay streams finished from the job's result (healed): {s.get('relay_streams_healed')}",
        "",
    ]
    tok = s["per_token"]
    lines += [
        "| stream | n | ms per token p50 | p95 | gap p99 | gap max | cut short by the result |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in ("direct", "relay", "direct-fast", "relay-fast"):
        r = tok[kind]
        cut = "—" if kind.startswith("direct") else str(r["cut_short"])
        lines.append(f"| {kind} | {r['per_token']['n']} | {_f(r['per_token']['p50'], 3)} | "
                     f"{_f(r['per_token']['p95'], 3)} | {_f(r['gap_p99_ms'])} | "
                     f"{_f(r['gap_max_ms'])} | {cut} |")
    lines += [
        "",
        (f"(ms per token = first → last content token / (tokens − 1); paced schedule "
        f"{tok['schedule_ms']:.1f} ms; `-fast`: no pacing)"),
        (f"relay adds {tok['paced_added_ms']:+.3f} ms per token paced, "
        f"{tok['fast_added_ms']:+.3f} ms per token unpaced"),
    ]
    if crypto:
        lines.append(
            f"CPU per token outside the relay: worker re-encode {crypto['encode_us']:.1f} µs + "
            f"seal {crypto['seal_us']:.1f} µs; gateway open + parse "
            f"{crypto['open_parse_us']:.1f} µs ({crypto['frame_bytes']:.0f}-byte frames)")
    return "\n".join(lines)


def report_capacity(c: dict[str, Any]) -> str:
    st, sm, h, lat = c["steady"], c["streams"], c["hold"], c["latency"]
    pinned = (f"relay pinned to CPU {c['relay_cpu']}, load generator to CPU "
              f"{c['generator_cpu']}" if c["relay_cpu"] is not None else "no pinning")
    lines = [
        f"Relay capacity ({pinned}):",
        "",
        "| measure | result |",
        "|---|---|",
        (f"| one frame, seal → relay → open + parse, idle relay | p50 {lat['p50_ms']:.3f} ms, "
        f"p95 {lat['p95_ms']:.3f} ms ({lat['frames']} frames) |"),
        (f"| frames (= tokens) per second, {st['channels']} long-lived channels | "
        f"{st['frames_per_s']:,.0f} with the relay at {st['relay_cores']:.2f} cores "
        f"(load generator {st['generator_cores']:.2f}) → "
        f"{st['frames_per_s'] / max(st['relay_cores'], 1e-9):,.0f} per busy relay core |"),
        f"| relay CPU per frame | {1e6 * st['relay_cores'] / st['frames_per_s']:.1f} µs |",
        (f"| whole {sm['tokens']}-token answers, {sm['concurrency']} at a time, new "
        f"channel each | {sm['streams_per_s']:,.1f} streams/s = {sm['tokens_per_s']:,.0f} "
        f"tokens/s, relay at {sm['relay_cores']:.2f} cores"
        f"{' (prepared streams ran out: a lower bound)' if sm['pool_ran_out'] else ''} |"),
        (f"| the same on a relay that has just held {h['channels']} channels "
        f"({c['streams_after_hold']['tokens_remembered_before']} tokens remembered) | "
        f"{c['streams_after_hold']['streams_per_s']:,.1f} streams/s = "
        f"{c['streams_after_hold']['tokens_per_s']:,.0f} tokens/s, relay at "
        f"{c['streams_after_hold']['relay_cores']:.2f} cores |"),
        (f"| channels held at once | {h['alive']} of {h['channels']} alive "
        f"({h['held_per_relay_health']} per the relay's /health), opened at "
        f"{h['opened_per_s']:,.0f}/s |"),
        (f"| set-up rate by tenth of the channels | "
        f"{', '.join(str(r) for r in h['opened_per_s_by_tenth'])} per s |"),
        (f"| relay RSS per idle channel (producer + consumer) | "
        f"{h['rss_per_channel_kib']:.1f} KiB on average ({h['rss_before_kib'] / 1024:.1f} → "
        f"{h['rss_held_kib'] / 1024:.1f} MiB), {h['rss_per_channel_second_half_kib']:.1f} KiB "
        f"over the second half |"),
        (f"| extra RSS per channel holding a {h['answer_tokens']}-token answer | "
        f"{_f(h['rss_per_answer_kib'], 1)} KiB ({h['answers']} channels) |"),
    ]
    return "\n".join(lines)


def verdicts(summary: dict[str, Any]) -> list[tuple[str, bool]]:
    over = summary["relay_overhead_beyond_dispatch_p50_ms"]
    tok = summary["per_token"]["fast_added_ms"]
    paced = summary["per_token"]["paced_added_ms"]
    alone = summary["relay_and_crypto_p50_ms"]
    return [
        ((f"the relay path adds {over:+.2f} ms to TTFT p50 beyond control-plane dispatch, "
         "against direct (target ≤ 3 ms)"), over <= 3.0),
        (f"of which the relay and encryption themselves {alone:.2f} ms (target ≤ 3 ms)",
         alone <= 3.0),
        ((f"relay path adds {tok:+.3f} ms per token unpaced, {paced:+.3f} ms paced "
         "(target ≤ 0.2 ms)"), max(tok, paced) <= 0.2),
    ]


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=None,
                   help="part 1: requests per kind (relay, batch, direct, dispatch; default 40)")
    p.add_argument("--interval", type=float, default=0.75,
                   help="part 1: seconds between request starts (default 0.75; 0 = one after "
                        "another)")
    p.add_argument("--fast-requests", type=int, default=None,
                   help="part 2: unpaced streams per path (default 30)")
    p.add_argument("--ttft-ms", type=float, default=30.0, help="backend TTFT (default 30)")
    p.add_argument("--rate", type=float, default=50.0, help="backend tokens/s (default 50)")
    p.add_argument("--tokens", type=int, default=200, help="answer length (default 200)")
    p.add_argument("--parsl-workers", type=int, default=6,
                   help="Parsl worker processes (default 6; more than jobs ever in flight)")
    p.add_argument("--channels", type=int, default=None,
                   help="part 3: channels held at once (default 5000)")
    p.add_argument("--answers", type=int, default=None,
                   help="part 3: held channels that then carry a whole answer (default 500)")
    p.add_argument("--capacity-seconds", type=float, default=None,
                   help="part 3: length of each throughput window (default 5)")
    p.add_argument("--steady-channels", type=int, default=32)
    p.add_argument("--streams-concurrency", type=int, default=32)
    p.add_argument("--latency-frames", type=int, default=300)
    p.add_argument("--skip-capacity", action="store_true", help="parts 1 and 2 only")
    p.add_argument("--skip-requests", action="store_true", help="part 3 only")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 6 requests per kind, 8 unpaced, 500 channels, 2 s windows")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--json", type=Path, default=None,
                   help="write results here (default bench/results/relay-<time>.json)")
    p.add_argument("--no-json", action="store_true", help="do not write a JSON file")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the temporary directory (configs, server logs) after a good run")
    p.add_argument("--load-generator", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.load_generator:
        return run_load_generator(args.load_generator)

    quick = args.quick
    args.requests = args.requests or (6 if quick else 40)
    args.fast_requests = args.fast_requests or (8 if quick else 30)
    args.channels = args.channels or (500 if quick else 5000)
    args.answers = args.answers if args.answers is not None else (100 if quick else 500)
    args.capacity_seconds = args.capacity_seconds or (2.0 if quick else 5.0)
    if quick:
        args.latency_frames = min(args.latency_frames, 100)
    if min(args.requests, args.fast_requests, args.tokens, args.channels) < 1 or args.rate <= 0:
        p.error("counts must be positive, and --rate above 0")
    fd_limit = raise_fd_limit()
    if not args.skip_capacity and 2 * args.channels + 256 > fd_limit:
        p.error(f"--channels {args.channels} needs {2 * args.channels + 256} open files; the "
                f"limit here is {fd_limit}")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    workdir = Path(tempfile.mkdtemp(prefix="streamllm-bench-relay-"))
    services = Services(workdir)
    ok = False
    try:
        info = machine_info()
        info["loadavg_at_start"] = os.getloadavg()
        print(f"[bench] machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
              f"load average {info['loadavg_at_start'][0]:.2f}; work dir {workdir}", flush=True)
        started = time.monotonic()
        summary = capacity = crypto = None
        if not args.skip_requests:
            sim = start_simulator(services, args.ttft_ms, args.rate, args.tokens)
            secret = secrets.token_hex(32)
            _relay_svc, relay_url = start_relay(services, "relay", secret)
            print(f"[bench] simulator {sim}, relay {relay_url}", flush=True)
            try:
                import uvloop  # the gateway runs on uvloop (uvicorn picks it); so does this part

                runner: Any = uvloop.run
            except ImportError:
                runner = asyncio.run
            other = OtherLoad(workdir).start()
            samples, counts = runner(
                measure_requests(args, sim, relay_url, secret.encode(), workdir, other))
            info["other_load_cores_requests"] = other.stop()
            print(f"[bench] other processes kept {other.cores:.2f} cores busy meanwhile",
                  flush=True)
            for svc in services.started:
                if svc.proc.poll() is not None:
                    raise BenchError(f"{svc.name} exited during the run:\n{svc.tail()}")
            summary = summarise(samples, args.rate)
            summary["relay_streams_healed"] = counts["healed"]
            summary["samples"] = {k: [s.__dict__ | {"token_times": None} for s in v]
                                  for k, v in samples.items()}
            crypto = measure_crypto(args.tokens)
            services.stop_all()
        if not args.skip_capacity:
            print("[bench] part 3: relay capacity", flush=True)
            other = OtherLoad(workdir).start()
            capacity = measure_capacity(args, services)  # children reaped: counted as ours
            info["other_load_cores_capacity"] = other.stop()
            print(f"[bench] other processes kept {other.cores:.2f} cores busy meanwhile",
                  flush=True)
        info["loadavg_at_end"] = os.getloadavg()
        checks = verdicts(summary) if summary is not None else []
        for part in (report_requests(summary, crypto) if summary else None,
                     report_capacity(capacity) if capacity else None):
            if part:
                print()
                print(part)
        print()
        for text, passed in checks:
            print(f"{'MET ' if passed else 'MISSED'}  {text}")
        print(f"\n[bench] done in {time.monotonic() - started:.0f}s; load average at the end "
              f"{info['loadavg_at_end'][0]:.2f}", flush=True)
        if not args.no_json:
            path = args.json or RESULTS_DIR / (
                "relay-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
            path.parent.mkdir(parents=True, exist_ok=True)
            doc = {
                "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": info,
                "settings": {k: v for k, v in vars(args).items() if k != "load_generator"
                             and not isinstance(v, Path)},
                "summary": summary, "capacity": capacity, "crypto": crypto,
                "checks": [{"text": t, "met": m} for t, m in checks],
            }
            path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
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
            print(f"[bench] logs kept in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
