"""What a Slurm job submitted by the `slurm` control plane runs (`python -m
streamllm.hpc.job_entry`): one call, read from a file, its result written to another.

`STREAMLLM_CALL_FILE` holds the call (base64 text of a pickle of the function's module and name
and its arguments); it is removed once read, since it holds a prompt and the request's relay
token and key. The result goes to `STREAMLLM_RESULT_FILE` as JSON, never as a pickle: the
gateway does not unpickle what a node wrote. It is written under a temporary name that must not
exist (no one else's symlink is followed) and renamed, so that a reader never sees half of it.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import pickle
import sys
from typing import Any


def run(encoded: str) -> dict[str, Any]:
    call = pickle.loads(base64.b64decode(encoded))
    fn = getattr(importlib.import_module(call["module"]), call["name"])
    try:
        return {"ok": True, "value": fn(*call["args"])}
    except Exception as e:  # noqa: BLE001 - the outcome is reported, whatever the work raised
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def read_call(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        encoded = f.read()
    os.remove(path)
    return encoded


def write_result(path: str, outcome: dict[str, Any]) -> None:
    try:
        text = json.dumps(outcome)
    except (TypeError, ValueError) as e:
        text = json.dumps({"ok": False, "error": f"the result is not JSON: {e}"})
    part = path + ".part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(part, path)


def main() -> int:
    os.umask(0o077)  # what the job writes holds answers: for the job's owner only
    outcome = run(read_call(os.environ["STREAMLLM_CALL_FILE"]))
    write_result(os.environ["STREAMLLM_RESULT_FILE"], outcome)
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
