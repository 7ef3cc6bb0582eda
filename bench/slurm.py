"""What each way onto a Slurm cluster costs a request: time to first token and to the whole
answer, on the Slurm cluster in a box with the real model, against the model server itself.

Ways measured (each one request at a time, the same questions, streamed with the openai SDK):
- `direct`: the model server itself (the baseline);
- `sbatch job`: `control_plane: slurm`, a Slurm job of its own per request (what a caller with
  an account of their own gets);
- `parsl pilot`: Parsl's SlurmProvider, the request a task in a pilot job already running;
- `sbatch agent`: `control_plane: slurm` with one warm agent, itself a Slurm job.

Run as root on a machine where `make test` has installed Slurm and the `[real]` extra:
    .venv/bin/python bench/slurm.py [--requests 20]
Results: bench/results/slurm-<time>.json, and a table on stdout for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai

from streamllm import realmodel
from streamllm.config import Settings
from streamllm.gateway import create_app
from streamllm.serving import ServerThread
from tests.slurm_box import SlurmBox, end_process

QUESTIONS = ["Name a planet.", "Say hello.", "What is 3 plus 4?", "Name a colour.",
             "Name a city in France."]


def start_relay(secret_file: Path) -> tuple[subprocess.Popen, int]:
    relay = subprocess.Popen([str(Path(sys.executable).with_name("streamllm")), "relay",
                              "--port", "0", "--secret-file", str(secret_file)],
                             stderr=subprocess.PIPE, text=True)
    for line in relay.stderr:  # type: ignore[union-attr]
        if "relay on ws" in line:
            threading.Thread(target=relay.stderr.read, daemon=True).start()  # type: ignore[union-attr]
            return relay, int(line.rsplit(":", 1)[1].split()[0])
    raise RuntimeError("the relay exited before it was ready")


def one(base_url: str, model: str, question: str, max_tokens: int) -> tuple[float, float, str]:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    began = time.perf_counter()
    first = None
    text = ""
    for chunk in client.chat.completions.create(
            model=model, stream=True, temperature=0, seed=7, max_tokens=max_tokens,
            messages=[{"role": "user", "content": question}]):
        for c in chunk.choices:
            if c.delta.content and first is None:
                first = time.perf_counter() - began
            text += c.delta.content or ""
    return (first or 0.0) * 1000, (time.perf_counter() - began) * 1000, text


def measure(base_url: str, model: str, n: int, max_tokens: int) -> dict[str, Any]:
    one(base_url, model, QUESTIONS[0], max_tokens)  # warm: the first request pays starts
    ttft, total, answers = [], [], []
    for i in range(n):
        t, w, text = one(base_url, model, QUESTIONS[i % len(QUESTIONS)], max_tokens)
        ttft.append(t)
        total.append(w)
        answers.append(text)
    return {"ttft_ms_p50": statistics.median(ttft), "ttft_ms_max": max(ttft),
            "total_ms_p50": statistics.median(total), "answers": answers}


def gateway(tmp: Path, cluster: dict[str, Any]) -> tuple[Any, ServerThread]:
    settings = Settings.model_validate({
        "server": {"detect_ollama": False, "data_dir": str(tmp)},
        "tiers": {"hpc": {"kind": "hpc", "clusters": {"box": cluster}},
                  "local": {"enabled": False}, "cloud": {"enabled": False}},
    })
    app = create_app(settings)
    server = ServerThread(app).start(timeout=120)
    clusters = app.state.runtime.backends["hpc"].clusters
    deadline = time.monotonic() + 180
    while not all(c.state() == "ready" for c in clusters) or any(
            c.pool.enabled and not c.pool.ready() for c in clusters):
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError("the cluster did not become ready")
        time.sleep(0.1)
    return app, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    secret = tmp / "relay.secret"
    secret.write_text(secrets.token_hex(32))
    results: dict[str, Any] = {}
    with SlurmBox() as box, realmodel.start_model_server(tmp / "model") as model:
        os.environ["PATH"] = f"{box.bin}{os.pathsep}{os.environ['PATH']}"
        relay, port = start_relay(secret)
        try:
            common = {"relay_url": f"ws://127.0.0.1:{port}", "relay_secret_file": str(secret),
                      "base_url": model.url, "models": [realmodel.MODEL_NAME]}
            results["direct"] = measure(model.url, realmodel.MODEL_NAME, args.requests,
                                        args.max_tokens)
            ways = {
                "sbatch job": {"control_plane": "slurm",
                               "slurm": {"partition": "gpu", "poll_s": 1.0,
                                         "work_dir": str(tmp / "jobs")}},
                "parsl pilot": {"control_plane": "parsl", "parsl": {
                    "provider": "slurm", "max_workers": 4, "heartbeat_s": 1,
                    "run_dir": str(tmp / "parsl"),
                    "provider_options": {"partition": "gpu", "exclusive": False,
                                         "walltime": "00:30:00", "init_blocks": 1,
                                         "min_blocks": 1, "max_blocks": 1}}},
                "sbatch agent": {"control_plane": "slurm",
                                 "slurm": {"partition": "gpu2", "poll_s": 1.0,
                                           "work_dir": str(tmp / "agents")},
                                 "agents": {"min_warm": 1, "max": 1, "walltime_s": 1200,
                                            "replace_before_s": 60, "heartbeat_s": 1}},
            }
            for name, cluster in ways.items():
                _, server = gateway(tmp / name.replace(" ", "-"), {**common, **cluster})
                try:
                    results[name] = measure(f"{server.url}/v1", f"hpc/{realmodel.MODEL_NAME}",
                                            args.requests, args.max_tokens)
                finally:
                    server.stop()
        finally:
            end_process(relay)
    base = results["direct"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT, check=False).stdout.strip()
    print(f"commit {commit}, {platform.node()}, {os.cpu_count()} cores, "
          f"{args.requests} requests each, max_tokens {args.max_tokens}")
    print("| way | TTFT p50 (ms) | TTFT max (ms) | whole answer p50 (ms) | TTFT vs direct | "
          "same answers as direct |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        same = sum(a == b for a, b in zip(r["answers"], base["answers"], strict=True))
        print(f"| {name} | {r['ttft_ms_p50']:.1f} | {r['ttft_ms_max']:.1f} | "
              f"{r['total_ms_p50']:.1f} | {r['ttft_ms_p50'] / base['ttft_ms_p50']:.1f}x | "
              f"{same}/{len(r['answers'])} |")
    out = ROOT / "bench" / "results" / f"slurm-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"commit": commit, "results": results}, indent=1))


if __name__ == "__main__":
    main()
