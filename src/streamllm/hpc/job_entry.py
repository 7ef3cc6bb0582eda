"""What a Slurm job submitted by the `slurm` control plane runs (`python -m
streamllm.hpc.job_entry`): one call, read from standard input, its result written to a file.

The batch script feeds the call in on stdin (a base64 pickle of the function's module and name
and its arguments), so nothing but the script crosses to the cluster. The result goes back as
JSON, never as a pickle: the gateway does not unpickle what a node wrote. It is written to a
temporary name and renamed, so that a reader never sees half of it.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import pickle
import sys
from typing import Any


def run(payload: bytes) -> dict[str, Any]:
    call = pickle.loads(base64.b64decode(payload))
    fn = getattr(importlib.import_module(call["module"]), call["name"])
    try:
        return {"ok": True, "value": fn(*call["args"])}
    except Exception as e:  # noqa: BLE001 - the outcome is reported, whatever the work raised
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def main() -> int:
    os.umask(0o077)  # the result holds an answer: for the job's owner only
    payload = sys.stdin.buffer.read()
    results_dir = os.environ["STREAMLLM_RESULTS_DIR"]
    job_id = os.environ.get("SLURM_JOB_ID", str(os.getpid()))
    outcome = run(payload)
    try:
        text = json.dumps(outcome)
    except (TypeError, ValueError) as e:
        text = json.dumps({"ok": False, "error": f"the result is not JSON: {e}"})
    path = os.path.join(results_dir, f"{job_id}.result.json")
    with open(path + ".part", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".part", path)
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
