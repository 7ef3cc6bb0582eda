#!/usr/bin/env python3
"""HPC as a service: how much later the first token comes with per-request jobs, with warm
agents, and straight from the backend; and batch throughput on one cluster against two.

One run starts, on 127.0.0.1: the simulator standing in for the clusters' vLLM (model
`paced`: 30 ms TTFT, 50 tokens/s, 40-token answers), and STREAM gateways (`streamllm serve`)
whose `hpc` tier reaches it through a Parsl engine (LocalProvider) and the gateway's own relay:

* `jobs`: every request is a job of its own (no agents);
* `agents`: one warm agent per cluster (min_warm 1, up to 2, 32 requests each), started through
  the same Parsl engine, which takes requests over the relay;
* `direct`: the simulator itself, the same-run baseline.

Streamed requests are measured at concurrency 1 and 32 with bench/overhead.py's load
generator (closed loop, every answer parsed and checked, warm-up, rounds whose order rotates).

Batch throughput: the `openai` SDK uploads a file of N lines, creates a batch and polls until
it completes, on a gateway with one cluster and on one with two clusters (each its own Parsl
engine, relay and simulator). Two kinds of lines: `fast` (no delays, 16 tokens: the gateway and
workers on this machine's cores are the limit) and `timed` (200 ms to the first token, then 16
tokens at 100/s, as a GPU would take them: the lines each cluster runs at once are the limit).
Lines per second from creation to completion.

    .venv/bin/python bench/hpc.py                      # about 6 minutes
    .venv/bin/python bench/hpc.py --skip-batch
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from overhead import (
    LOOPBACK,
    BenchError,
    Services,
    Target,
    free_port,
    open_clients,
    percentile,
    run_batch,
    save_results,
    streamllm_exe,
    wait_ready,
)

TOKENS = 40


def start_sim(services: Services) -> str:
    port = free_port()
    config = services.workdir / "sim.json"
    config.write_text(json.dumps({"models": {
        "paced": {"ttft_ms": 30, "tokens_per_s": 50, "answer_tokens": TOKENS},
        "fast": {"answer_tokens": 16},
        # A line as a GPU would take it (0.36 s), so that throughput is set by how many lines
        # the clusters run at once, not by this machine's two cores.
        "timed": {"ttft_ms": 200, "tokens_per_s": 100, "answer_tokens": 16}}}))
    svc = services.start("sim", [streamllm_exe(), "sim", "--host", LOOPBACK, "--port",
                                 str(port), "--config", str(config)])
    wait_ready(svc, f"http://{LOOPBACK}:{port}/health", 30)
    return f"http://{LOOPBACK}:{port}"


def cluster(sim: str, agents: bool, workers: int = 40) -> dict[str, Any]:
    out: dict[str, Any] = {"base_url": f"{sim}/v1", "models": ["paced", "fast", "timed"],
                           "control_plane": "parsl", "parsl": {"max_workers": workers}}
    if agents:
        out["agents"] = {"min_warm": 1, "max": 2, "max_concurrency": 32,
                         "walltime_s": 86400, "replace_before_s": 600}
    return out


def start_gateway(services: Services, name: str, clusters: dict[str, Any],
                  ready: Any = None) -> str:
    port = free_port()
    config = services.workdir / f"{name}.json"
    config.write_text(json.dumps({
        "server": {"detect_ollama": False, "log_level": "warning",
                   "data_dir": str(services.workdir / name)},
        "tiers": {"hpc": {"kind": "hpc", "clusters": clusters},
                  "local": {"enabled": False}, "cloud": {"enabled": False}},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLLM_")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    svc = services.start(name, [streamllm_exe(), "serve", "--host", LOOPBACK, "--port",
                                str(port), "--config", str(config)], env=env)
    base = f"http://{LOOPBACK}:{port}"

    def all_ready(body: bytes) -> bool:
        card = json.loads(body)
        return card.get("state") == "ready" and all(
            e["state"] == "ready" and (ready is None or ready(e)) for e in card["endpoints"])

    wait_ready(svc, f"{base}/v1/models/hpc/paced", 180, all_ready)
    return base


async def measure(targets: list[Target], levels: dict[int, int], rounds: int,
                  warmup: int) -> dict[int, dict[str, list[float]]]:
    out: dict[int, dict[str, list[float]]] = {}
    async with contextlib.AsyncExitStack() as stack:
        for t in targets:
            await open_clients(stack, t, max(levels))
        for level, count in levels.items():
            for t in targets:
                await run_batch(t, level, warmup, TOKENS)
            ttft: dict[str, list[float]] = {t.name: [] for t in targets}
            per_round = max(1, count // rounds)
            for r in range(rounds):
                for t in targets[r % len(targets):] + targets[:r % len(targets)]:
                    samples, _ = await run_batch(t, level, per_round, TOKENS)
                    ttft[t.name] += [s.ttft * 1000 for s in samples]
            out[level] = ttft
            print(f"[bench] concurrency {level} done", flush=True)
    return out


def run_batch_api(base: str, lines: int, model: str) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    rows = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": f"hpc/{model}",
                                 "messages": [{"role": "user", "content": f"line {i}"}]}})
            for i in range(lines)]
    upload = client.files.create(file=("in.jsonl", "\n".join(rows).encode()), purpose="batch")
    started = time.monotonic()
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    took = time.monotonic() - started
    if batch.status != "completed" or batch.request_counts.completed != lines:
        raise BenchError(f"batch ended {batch.status}: {batch.request_counts}")
    out = client.files.content(batch.output_file_id).text.strip().splitlines()
    if len(out) != lines or len({json.loads(x)["custom_id"] for x in out}) != lines:
        raise BenchError("the output file does not hold one result per line")
    return {"lines": lines, "model": model, "seconds": took, "lines_per_s": lines / took}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", default="60,320", help="per target at concurrency 1 and 32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--batch-lines", type=int, default=1000)
    p.add_argument("--skip-batch", action="store_true")
    p.add_argument("--skip-stream", action="store_true")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.requests.split(",")]
    levels = {1: counts[0], 32: counts[1]}
    workdir = Path(tempfile.mkdtemp(prefix="streamllm-bench-hpc-"))
    services = Services(workdir)
    results: dict[str, Any] = {}
    ok = False
    started = time.monotonic()
    try:
        sim = start_sim(services)
        if not args.skip_stream:
            jobs = start_gateway(services, "jobs", {"c1": cluster(sim, agents=False)})
            agents = start_gateway(services, "agents", {"c1": cluster(sim, agents=True)},
                                   ready=lambda e: e["agents"]["ready"] >= 1)
            targets = [Target("direct", f"{sim}/v1/chat/completions", "paced"),
                       Target("jobs", f"{jobs}/v1/chat/completions", "hpc/paced"),
                       Target("agents", f"{agents}/v1/chat/completions", "hpc/paced")]
            ttft = asyncio.run(measure(targets, levels, args.rounds, args.warmup))
            rows = []
            for level, by in ttft.items():
                base = percentile(by["direct"], 50)
                for name, values in by.items():
                    rows.append({"target": name, "concurrency": level, "n": len(values),
                                 "p50": percentile(values, 50), "p95": percentile(values, 95),
                                 "delta_p50": percentile(values, 50) - base})
            results["ttft"] = rows
            print()
            print("| path | conc. | n | TTFT p50 | TTFT p95 | Δ p50 vs direct |")
            print("|---|---|---|---|---|---|")
            for r in rows:
                delta = "—" if r["target"] == "direct" else f"{r['delta_p50']:+.2f} ms"
                print(f"| {r['target']} | {r['concurrency']} | {r['n']} | {r['p50']:.2f} | "
                      f"{r['p95']:.2f} | {delta} |")
            services.stop_all()
            sim = start_sim(services)
        if not args.skip_batch:
            # Each cluster has a simulator of its own (its own GPUs). `fast` lines have no
            # delays: what the gateway and workers on this machine's cores can push. `timed`
            # lines take 0.36 s each, as on a GPU: what a second cluster adds.
            sim2 = start_sim(services)
            one = start_gateway(services, "batch-one", {"c1": cluster(sim, False, 16)})
            for model in ("fast", "timed"):
                results[f"batch_one_cluster_{model}"] = run_batch_api(one, args.batch_lines,
                                                                      model)
            two = start_gateway(services, "batch-two", {"c1": cluster(sim, False, 16),
                                                        "c2": cluster(sim2, False, 16)})
            results["batch_two_clusters_fast"] = run_batch_api(two, args.batch_lines, "fast")
            results["batch_two_clusters_timed"] = run_batch_api(two, args.batch_lines, "timed")
            print()
            for k in ("batch_one_cluster_fast", "batch_two_clusters_fast",
                      "batch_one_cluster_timed", "batch_two_clusters_timed"):
                r = results[k]
                print(f"{k}: {r['lines']} lines in {r['seconds']:.1f} s = "
                      f"{r['lines_per_s']:.1f} lines/s")
        path = save_results("hpc", vars(args), results=results)
        print(f"\n[bench] done in {time.monotonic() - started:.0f}s; results in {path}")
        ok = True
        return 0
    except BenchError as e:
        print(f"[bench] FAILED: {e}", file=sys.stderr)
        return 2
    finally:
        services.stop_all()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"[bench] logs kept in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
