#!/usr/bin/env python3
"""Do long conversations keep simple questions on the local tier? The STREAM paper's study,
reproduced with the simulator: 5 conversations of 40 turns, a LOW probe at turns 10, 20, 30, 35
and 40, with summaries and without.

One run starts, on 127.0.0.1, three simulators (local: 4,096-token window; hpc: 32,768;
cloud: 128,000; each reads the prompt at a set prefill rate, so a longer prompt costs time as on
a real server) and a STREAM gateway (`streamllm serve`) in front of them, three times:

* `summaries`: the defaults (older turns summarised per tier, the next turn's summary prepared
  in the background once a conversation fills 70 % of a window);
* `no-lookahead`: summaries, but written only when a request needs them, so every summary's
  latency is seen by a client (first build vs extending a stored one);
* `no-summaries`: `context.summarize: false`; a conversation too long for a tier skips it.

Each conversation is a client keeping its own history: ordinary turns go to `auto` (the judge
routes them), the probe is "thanks! quick one: what's 2 + 2?" (LOW). Per request it records the
tier, the `x-stream-context*` and `x-stream-summary*` headers and the backend's prompt tokens.

    .venv/bin/python bench/context.py               # about 5 minutes
    .venv/bin/python bench/context.py --turns 20    # shorter

Results go to bench/results/context-<time>.json; see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
from overhead import (
    LOOPBACK,
    BenchError,
    Services,
    free_port,
    save_results,
    streamllm_exe,
    wait_ready,
)

from streamllm.sim.content import prompt_tokens

PROBE = "thanks! quick one: what's 2 + 2?"
PROBE_TURNS = (10, 20, 30, 35, 40)
SIMS = {  # tier: model settings (answers are synthetic; the times imitate real servers)
    "local": {"context_window": 4096, "ttft_ms": 40, "prefill_tokens_per_s": 3000,
              "answer_tokens": 110},
    "hpc": {"context_window": 32768, "ttft_ms": 120, "prefill_tokens_per_s": 40000,
            "answer_tokens": 160},
    "cloud": {"context_window": 128000, "ttft_ms": 250, "prefill_tokens_per_s": 60000,
              "answer_tokens": 160},
}
MODES = {
    "summaries": {},
    "no-lookahead": {"prepare_ahead": False},
    "no-summaries": {"summarize": False},
}
SUBJECTS = ["the Lustre scratch quota", "our CUDA build", "the fairshare policy",
            "the ECC errors on gpu017", "the nightly Globus transfer", "MPI rank placement",
            "the lab's conda environment", "the solver's checkpoint interval",
            "the 3.2 TB input set", "PROJ-4471's allocation", "the Slurm array jobs",
            "the container image", "the benchmark on the A100 nodes"]
SENTENCES = [
    "I looked at {s} again this morning and the numbers still do not add up.",
    "Dr. Okafor wants a short write-up on {s} before the group meeting on Thursday.",
    "We tried halving the batch size, which helped a little, but {s} is still the bottleneck.",
    "The logs for {s} show long pauses every few minutes, mostly during I/O.",
    "Could you explain what you would measure first for {s}, and why?",
    "Last week a colleague suggested rewriting the reader, but I am not sure it matters.",
    "Our deadline is the end of the month, so anything that takes days is out.",
    "For context, the runs use 4 nodes with 8 GPUs each and about 600 GB of memory.",
    "I also noticed the job sometimes waits in the queue for hours before it starts.",
    "What would a reasonable target be for {s} on a cluster like ours?",
]


def user_turn(rng: random.Random, i: int) -> str:
    subject = rng.choice(SUBJECTS)
    picked = rng.sample(SENTENCES, rng.randint(2, 5))
    return f"(turn {i}) " + " ".join(x.format(s=subject) for x in picked)


def start_sims(services: Services) -> dict[str, str]:
    out = {}
    for tier, spec in SIMS.items():
        port = free_port()
        config = services.workdir / f"sim-{tier}.yaml"
        config.write_text(json.dumps({"models": {f"{tier}-m": spec}}))
        svc = services.start(f"sim-{tier}", [streamllm_exe(), "sim", "--host", LOOPBACK,
                                             "--port", str(port), "--config", str(config)])
        wait_ready(svc, f"http://{LOOPBACK}:{port}/health", 30)
        out[tier] = f"http://{LOOPBACK}:{port}/v1"
    return out


def start_gateway(services: Services, sims: dict[str, str], mode: str) -> str:
    port = free_port()
    data = services.workdir / f"data-{mode}"
    config = services.workdir / f"gateway-{mode}.yaml"
    config.write_text(json.dumps({
        "server": {"detect_ollama": False, "data_dir": str(data), "log_level": "warning"},
        "tiers": {t: {"kind": "vllm", "base_url": url, "models": [f"{t}-m"],
                      "context_window": SIMS[t]["context_window"]} for t, url in sims.items()},
        "context": MODES[mode],
    }))
    svc = services.start(f"gateway-{mode}", [streamllm_exe(), "serve", "--host", LOOPBACK,
                                             "--port", str(port), "--config", str(config)])
    wait_ready(svc, f"http://{LOOPBACK}:{port}/health/ready", 60)
    return f"http://{LOOPBACK}:{port}"


def run_mode(base: str, conversations: int, turns: int,
             think_s: float) -> list[dict[str, Any]]:
    rows = []
    with httpx.Client(base_url=base, timeout=120) as client:
        for c in range(conversations):
            rng = random.Random(1000 + c)
            history = [{"role": "system",
                        "content": "You help a research computing group with their cluster."}]
            for i in range(1, turns + 1):
                probe = i in PROBE_TURNS
                history.append({"role": "user", "content": PROBE if probe else
                                user_turn(rng, i)})
                started = time.perf_counter()
                resp = client.post("/v1/chat/completions",
                                   json={"model": "auto", "messages": history})
                took = (time.perf_counter() - started) * 1000
                h = resp.headers
                row = {"conversation": c, "turn": i, "probe": probe, "status": resp.status_code,
                       "tier": h.get("x-stream-tier"), "ms": took,
                       "context": h.get("x-stream-context"),
                       "before": int(h.get("x-stream-context-tokens-before") or 0),
                       "after": int(h.get("x-stream-context-tokens-after") or 0),
                       "summary": h.get("x-stream-summary"),
                       "summary_id": h.get("x-stream-summary-id"),
                       "summary_ms": float(h["x-stream-summary-ms"])
                       if "x-stream-summary-ms" in h else None}
                if resp.status_code == 200:
                    body = resp.json()
                    row["prompt_tokens"] = body["usage"]["prompt_tokens"]
                    history.append({"role": "assistant",
                                    "content": body["choices"][0]["message"]["content"]})
                else:
                    history.pop()
                    if not probe:
                        raise BenchError(f"turn {i} failed: {resp.status_code} {resp.text}")
                if row["summary"] == "new" and row["summary_id"]:
                    got = client.get(f"/v1/stream/summaries/{row['summary_id']}").json()
                    row["summary_kind"] = "extension" if got.get("extends") else "first build"
                    # What the summarizer read, against what re-summarising everything aged so
                    # far would read (the paper's reference code does that every turn).
                    said = [m for m in history if m["role"] != "system"]
                    done, previous = 0, 0
                    if got.get("extends"):
                        parent = client.get(f"/v1/stream/summaries/{got['extends']}").json()
                        done, previous = parent["messages_summarized"], parent["tokens"]
                    end = got["messages_summarized"]
                    row["summarizer_read"] = previous + prompt_tokens(said[done:end])
                    row["aged_prefix"] = prompt_tokens(said[:end])
                rows.append(row)
                if i + 1 in PROBE_TURNS and think_s:
                    time.sleep(think_s)  # the user reads the answer before asking again
            print(f"[bench]   conversation {c + 1}/{conversations} done", flush=True)
    return rows


def summarise(rows: list[dict[str, Any]], conversations: int) -> dict[str, Any]:
    probes = [r for r in rows if r["probe"]]
    out: dict[str, Any] = {
        "probes": len(probes),
        "probes_local": sum(1 for r in probes if r["tier"] == "local"),
        "probes_failed": sum(1 for r in probes if r["status"] != 200),
        "probe_tiers_by_turn": {t: [r["tier"] or str(r["status"]) for r in probes
                                    if r["turn"] == t] for t in PROBE_TURNS},
        "requests_that_waited_for_a_summary": sum(1 for r in rows if r["summary"] == "new"),
        "summarized_requests": sum(1 for r in rows if r["context"] in ("summarized",
                                                                          "trimmed")),
    }
    for kind in ("first build", "extension"):
        mine = [r for r in rows if r.get("summary_kind") == kind]
        ms = [r["summary_ms"] for r in mine]
        out[f"summary_ms_{kind.replace(' ', '_')}"] = (
            {"n": len(ms), "p50": statistics.median(ms), "max": max(ms),
             "read_tokens_mean": round(statistics.mean(r["summarizer_read"] for r in mine)),
             "aged_prefix_tokens_mean": round(statistics.mean(r["aged_prefix"] for r in mine))}
            if ms else None)
    per_turn = {}
    for t in (10, 20, 30, 35, 40):
        at = [r for r in rows if r["turn"] == t and r.get("prompt_tokens")]
        per_turn[t] = {"prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"]
                                                                   for r in at)) if at else None,
                       "history_tokens_mean": round(statistics.mean(r["before"] for r in at))
                       if at else None}
    out["by_probe_turn"] = per_turn
    return out


def report(results: dict[str, dict[str, Any]]) -> str:
    lines = [("| mode | probes kept local | failed | requests that waited for a summary | "
             "summary wait, first build p50 (n) | extension p50 (n) |"),
             "|---|---|---|---|---|---|"]
    def wait(stats: dict[str, Any] | None) -> str:
        if not stats:
            return "—"
        return (f"{stats['p50']:.0f} ms (n={stats['n']}; read {stats['read_tokens_mean']} of "
                f"{stats['aged_prefix_tokens_mean']} aged tokens)")

    for mode, r in results.items():
        lines.append(
            f"| {mode} | {r['probes_local']}/{r['probes']} | {r['probes_failed']} | "
            f"{r['requests_that_waited_for_a_summary']} | "
            f"{wait(r['summary_ms_first_build'])} | {wait(r['summary_ms_extension'])} |")
    lines += ["", ("Prompt tokens the serving backend received at the probe turns (mean over "
              "conversations), against the conversation's own size:"), "",
              "| turn | conversation | " + " | ".join(results) + " |",
              "|---|---|" + "---|" * len(results)]
    first = next(iter(results.values()))
    for t in (10, 20, 30, 35, 40):
        cells = [str(results[m]["by_probe_turn"][t]["prompt_tokens_mean"] or "—")
                 for m in results]
        lines.append(f"| {t} | {first['by_probe_turn'][t]['history_tokens_mean']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Probe tiers by turn:"]
    for mode, r in results.items():
        lines.append(f"- {mode}: " + "; ".join(f"{t}: {', '.join(v)}"
                                               for t, v in r["probe_tiers_by_turn"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=5)
    p.add_argument("--turns", type=int, default=40)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--think-ms", type=float, default=1500,
                   help="pause before each probe, as a user reading the answer (default 1500)")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="streamllm-bench-context-"))
    services = Services(workdir)
    started = time.monotonic()
    results: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    ok = False
    try:
        sims = start_sims(services)
        for mode in args.modes.split(","):
            print(f"[bench] mode {mode}", flush=True)
            gateway = start_gateway(services, sims, mode)
            rows = run_mode(gateway, args.conversations, args.turns, args.think_ms / 1000)
            raw[mode] = rows
            results[mode] = summarise(rows, args.conversations)
        print()
        print(report(results))
        path = save_results("context", vars(args), sims=SIMS, results=results, rows=raw)
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
