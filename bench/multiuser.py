#!/usr/bin/env python3
"""What do API keys and the usage ledger cost? Request rate and time to first token through
STREAM with a stored key and the ledger, on SQLite and on PostgreSQL, against the same gateway
with no keys (single-user mode) and against the backend alone, in one run.

One run starts, on 127.0.0.1: the simulator (TTFT 0, no rate limit, 32-token answers) and three
gateways in front of it, each a `streamllm serve` process with `local` on the simulator:

* `open`: no keys (single-user mode), SQLite store: the ledger is still written;
* `keys-sqlite`: a key made with `streamllm keys create`, every request authenticated against
  the store, a ledger row per request, SQLite;
* `keys-postgres`: the same on PostgreSQL (a fresh database on 127.0.0.1:5432, dropped after).

For each concurrency level, every target is warmed up, then measured in rounds whose order
rotates, as in bench/overhead.py (whose load generator and statistics this reuses). Every
answer is parsed and checked; at the end each gateway's ledger must hold one row per request.

    .venv/bin/python bench/multiuser.py                  # about 2 minutes
    .venv/bin/python bench/multiuser.py --skip-postgres
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from overhead import (
    LOOPBACK,
    SIM_MODEL,
    BenchError,
    Services,
    Target,
    free_port,
    group_cpu,
    open_clients,
    percentile,
    run_batch,
    save_results,
    start_simulator,
    streamllm_exe,
    wait_ready,
)

PG = {"host": "127.0.0.1", "port": 5432}


def pg_admin(sql: str) -> str:
    """Run `sql` on the test database as the first role that exists; returns the role."""
    import asyncpg

    async def run() -> str:
        last = None
        for user in ("postgres", "root"):
            try:
                conn = await asyncpg.connect(**PG, user=user, database="test", timeout=5)
            except (OSError, asyncpg.PostgresError) as e:
                last = e
                continue
            try:
                await conn.execute(sql)
            finally:
                await conn.close()
            return user
        raise BenchError(f"PostgreSQL not reachable at {PG['host']}:{PG['port']}: {last}")

    return asyncio.run(run())


def start_gateway(services: Services, name: str, sim: str, database_url: str,
                  with_key: bool) -> tuple[str, dict[str, str], str]:
    port = free_port()
    config = services.workdir / f"{name}.json"
    config.write_text(json.dumps({
        "server": {"detect_ollama": False, "log_level": "warning", "database_url": database_url,
                   "data_dir": str(services.workdir / name)},
        "tiers": {"local": {"kind": "vllm", "base_url": f"{sim}/v1", "models": [SIM_MODEL]},
                  "hpc": {"enabled": False}, "cloud": {"enabled": False}},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLLM_")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    headers: dict[str, str] = {}
    if with_key:
        made = subprocess.run([streamllm_exe(), "keys", "create", "--name", f"bench-{name}",
                               "--config", str(config)], capture_output=True, text=True,
                              env=env, timeout=60, check=False)
        if made.returncode != 0:
            raise BenchError(f"keys create failed: {made.stderr}")
        headers["authorization"] = f"Bearer {made.stdout.strip()}"
    svc = services.start(name, [streamllm_exe(), "serve", "--host", LOOPBACK, "--port",
                                str(port), "--config", str(config)], env=env)
    base = f"http://{LOOPBACK}:{port}"
    wait_ready(svc, f"{base}/health/ready", 60, lambda b: json.loads(b).get("status") == "ready")
    return base, headers, str(svc.proc.pid)


async def measure(targets: list[Target], pgids: dict[str, int], levels: list[int],
                  counts: dict[int, int], rounds: int, tokens: int,
                  warmup: int) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    async with contextlib.AsyncExitStack() as stack:
        for t in targets:
            await open_clients(stack, t, max(levels))
        for level in levels:
            for t in targets:
                await run_batch(t, level, warmup, tokens)
            results = {t.name: {"samples": [], "wall": 0.0, "cpu": 0.0} for t in targets}
            per_round = max(1, counts[level] // rounds)
            for r in range(rounds):
                order = targets[r % len(targets):] + targets[:r % len(targets)]
                for t in order:
                    pgid = pgids.get(t.name)
                    before = group_cpu(pgid) if pgid else 0.0
                    samples, wall = await run_batch(t, level, per_round, tokens)
                    res = results[t.name]
                    res["samples"] += samples
                    res["wall"] += wall
                    if pgid:
                        res["cpu"] += group_cpu(pgid) - before
            out[level] = results
            print(f"[bench] concurrency {level} done", flush=True)
    return out


def summarise(results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for level, by_target in results.items():
        direct = by_target["direct"]
        direct_p50 = percentile([s.ttft for s in direct["samples"]], 50) * 1000
        direct_rps = len(direct["samples"]) / direct["wall"]
        for name, res in by_target.items():
            ttft = [s.ttft * 1000 for s in res["samples"]]
            rps = len(res["samples"]) / res["wall"]
            rows.append({
                "target": name, "concurrency": level, "n": len(ttft),
                "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95),
                "rps": rps, "delta_ttft_p50": percentile(ttft, 50) - direct_p50,
                "rps_vs_direct": rps / direct_rps,
                "gateway_cpu_ms_per_req": 1000 * res["cpu"] / len(ttft) if res["cpu"] else None,
            })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [("| target | conc. | n | TTFT p50 | TTFT p95 | req/s | Δ TTFT p50 vs direct | "
             "req/s vs direct | gateway CPU/req |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cpu = f"{r['gateway_cpu_ms_per_req']:.2f} ms" if r["gateway_cpu_ms_per_req"] else "—"
        delta = "—" if r["target"] == "direct" else f"{r['delta_ttft_p50']:+.2f} ms"
        ratio = "—" if r["target"] == "direct" else f"{r['rps_vs_direct']:.2f}×"
        lines.append(f"| {r['target']} | {r['concurrency']} | {r['n']} | {r['ttft_p50']:.2f} | "
                     f"{r['ttft_p95']:.2f} | {r['rps']:.0f} | {delta} | {ratio} | {cpu} |")
    return "\n".join(lines)


def ledger_rows(database_url: str) -> int:
    from sqlalchemy import func, select

    from streamllm.store import Store
    from streamllm.store.tables import usage

    async def count() -> int:
        store = await Store.open(database_url)
        try:
            async with store.engine.connect() as c:
                return int((await c.execute(select(func.count()).select_from(usage))).scalar())
        finally:
            await store.close()

    return asyncio.run(count())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", default="300,1500", help="per target, at each level")
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--skip-postgres", action="store_true")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    counts = dict(zip(levels, (int(x) for x in args.requests.split(",")), strict=True))
    workdir = Path(tempfile.mkdtemp(prefix="streamllm-bench-multiuser-"))
    services = Services(workdir)
    pg_db = None
    ok = False
    started = time.monotonic()
    try:
        sim = start_simulator(services, args.tokens)
        plans = [("open", f"sqlite+aiosqlite:///{workdir}/open.db", False),
                 ("keys-sqlite", f"sqlite+aiosqlite:///{workdir}/keys.db", True)]
        if not args.skip_postgres:
            pg_db = f"stream_bench_{uuid.uuid4().hex[:10]}"
            user = pg_admin(f'CREATE DATABASE "{pg_db}"')
            plans.append(("keys-postgres",
                          f"postgresql+asyncpg://{user}@{PG['host']}:{PG['port']}/{pg_db}", True))
        targets = [Target("direct", f"{sim}/v1/chat/completions", SIM_MODEL)]
        pgids: dict[str, int] = {}
        for name, url, keyed in plans:
            base, headers, pid = start_gateway(services, name, sim, url, keyed)
            targets.append(Target(name, f"{base}/v1/chat/completions", "local", headers))
            pgids[name] = int(pid)
        results = asyncio.run(measure(targets, pgids, levels, counts, args.rounds, args.tokens,
                                      args.warmup))
        rows = summarise(results)
        services.stop_all()  # the ledger is flushed on shutdown
        expected = sum(args.warmup + (counts[lv] // args.rounds) * args.rounds for lv in levels)
        written = {name: ledger_rows(url) for name, url, _ in plans}
        for name, count in written.items():
            if count != expected:
                raise BenchError(f"{name}: {count} ledger rows for {expected} requests")
        print()
        print(table(rows))
        print(f"\nledger rows: {written} (one per request)")
        path = save_results("multiuser", vars(args), rows=rows, ledger_rows=written)
        print(f"[bench] done in {time.monotonic() - started:.0f}s; results in {path}")
        ok = True
        return 0
    except BenchError as e:
        print(f"[bench] FAILED: {e}", file=sys.stderr)
        return 2
    finally:
        services.stop_all()
        if pg_db:
            with contextlib.suppress(BenchError):
                pg_admin(f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)')
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"[bench] logs kept in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
