"""The `slurm` control plane: every request, agent and batch chunk is a Slurm job of its own,
submitted with `sbatch` and charged to its caller's account.

Parsl's `SlurmProvider` runs requests inside pilot jobs that every caller shares, so the
scheduler cannot say who ran what. Here each job carries `--account` (the caller's, from the
cluster's `accounts` map, else the default) and a `--comment` naming the caller, as a site's
accounting expects. The cost is a scheduler round trip per request (`sbatch` to a running job);
warm agents, which run under the default account, are what avoid it (docs/hpc-as-api.md).

How a job travels: the batch script, fed to `sbatch` on standard input, carries the call (a
base64 pickle of the function's module, name and arguments: the function is streamllm's own,
installed on the nodes) and runs `python -m streamllm.hpc.job_entry`, which writes the result as
JSON into the work directory. One `squeue` every `poll_s` for all of our jobs tells which have
ended; the result file (read through `login_command` when the gateway is not on the cluster's
filesystem) completes the job's future, and a job that ended without one fails it, naming the
job and its state (CANCELLED after `scancel`, TIMEOUT, NODE_FAIL ...).

The tokens come back through the relay as with any control plane: the future is the backstop,
so polling adds nothing to an answer's latency.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import math
import os
import pickle
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from streamllm.config import SlurmSettings
from streamllm.hpc.control import DispatchKind, JobOptions, StartedJob

log = logging.getLogger("streamllm.hpc")

COMMAND_TIMEOUT_S = 30.0  # one scheduler command; a login node that takes longer is unwell
RESULT_LAG_POLLS = 3  # a completed job's result may show on a shared filesystem this late
COMMENT_LIMIT = 128


class SlurmJobState(StrEnum):
    """The states `squeue --states=all` reports (Slurm 22.05 and later)."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    SUSPENDED = "SUSPENDED"
    STOPPED = "STOPPED"
    SIGNALING = "SIGNALING"
    STAGE_OUT = "STAGE_OUT"
    RESIZING = "RESIZING"
    REQUEUED = "REQUEUED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    REQUEUE_FED = "REQUEUE_FED"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    REVOKED = "REVOKED"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    UNKNOWN = "UNKNOWN"  # a state this module does not know: treated as still going

    @classmethod
    def parse(cls, text: str) -> SlurmJobState:
        try:
            return cls(text.strip().upper())
        except ValueError:
            return cls.UNKNOWN

    @property
    def ended(self) -> bool:
        return self in _ENDED


_ENDED = frozenset({
    SlurmJobState.COMPLETED, SlurmJobState.CANCELLED, SlurmJobState.FAILED,
    SlurmJobState.TIMEOUT, SlurmJobState.NODE_FAIL, SlurmJobState.PREEMPTED,
    SlurmJobState.BOOT_FAIL, SlurmJobState.DEADLINE, SlurmJobState.OUT_OF_MEMORY,
    SlurmJobState.REVOKED, SlurmJobState.SPECIAL_EXIT,
})


class SchedulerError(Exception):
    """A scheduler command failed (sbatch refused the job, the controller did not answer)."""


class SlurmJobEnded(Exception):
    """A job ended without a result: cancelled, out of time, its node lost ..."""

    def __init__(self, job_id: str, state: SlurmJobState | None, detail: str = ""):
        self.job_id, self.state = job_id, state
        said = f"ended {state.value}" if state is not None else "left the queue"
        super().__init__(f"Slurm job {job_id} {said} without a result{detail}")


# -- pure parts -----------------------------------------------------------------------------------
def job_name(fn: Callable[..., Any]) -> str:
    """`stream-completion`, `stream-agent`, `stream-batch-chunk`, `stream-ping`."""
    return "stream-" + fn.__name__.removeprefix("run_").replace("_", "-")


def slurm_time(seconds: float) -> str:
    """Seconds as sbatch's `--time` (days-hours:minutes:seconds), rounded up to a minute."""
    minutes = max(1, math.ceil(seconds / 60))
    days, minutes = divmod(minutes, 24 * 60)
    return f"{days}-{minutes // 60:02d}:{minutes % 60:02d}:00"


def comment_for(options: JobOptions) -> str:
    """Who a job is for, as `squeue -o %k` and `scontrol show job` will show it."""
    text = options.comment or (f"streamllm caller={options.caller}" if options.caller
                               else "streamllm")
    printable = "".join(c if c.isprintable() else "?" for c in text)
    return printable[:COMMENT_LIMIT]


def sbatch_argv(settings: SlurmSettings, name: str, options: JobOptions,
                work_dir: str) -> list[str]:
    argv = ["sbatch", "--parsable", f"--job-name={name}",
            f"--output={work_dir}/%j.out", f"--chdir={work_dir}"]
    if options.walltime_s is not None:
        argv.append(f"--time={slurm_time(options.walltime_s)}")
    else:
        argv.append(f"--time={settings.walltime}")
    if settings.partition:
        argv.append(f"--partition={settings.partition}")
    account = options.account or settings.account
    if account:
        argv.append(f"--account={account}")
    argv.append(f"--comment={comment_for(options)}")
    return [*argv, *settings.options]


def batch_script(python: str, work_dir: str, fn: Callable[..., Any], args: Sequence[Any]) -> str:
    call = pickle.dumps({"module": fn.__module__, "name": fn.__qualname__, "args": tuple(args)})
    encoded = base64.encodebytes(call).decode()
    return (
        "#!/bin/sh\n"
        f"export STREAMLLM_RESULTS_DIR={shlex.quote(work_dir)}\n"
        f"exec {shlex.quote(python)} -m streamllm.hpc.job_entry <<'STREAMLLM_CALL'\n"
        f"{encoded}STREAMLLM_CALL\n"
    )


def parse_job_id(sbatch_output: str) -> str:
    """`sbatch --parsable` prints `id` or `id;cluster`."""
    first = sbatch_output.strip().splitlines()[0] if sbatch_output.strip() else ""
    job_id = first.split(";")[0].strip()
    if not job_id.isdigit():
        raise SchedulerError(f"sbatch printed no job id: {sbatch_output.strip()[:200]!r}")
    return job_id


def parse_squeue(output: str) -> dict[str, SlurmJobState]:
    """`squeue -h -o %i|%T` lines as job id -> state."""
    states: dict[str, SlurmJobState] = {}
    for line in output.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id:
            states[job_id] = SlurmJobState.parse(state)
    return states


# -- the plane ------------------------------------------------------------------------------------
@dataclass
class _Tracked:
    future: concurrent.futures.Future[Any]
    name: str
    missing: int = 0  # polls it has been seen ended with no result yet


class SlurmControlPlane:
    name = "slurm"

    def __init__(self, settings: SlurmSettings, default_work_dir: str):
        self.settings = settings
        self.work_dir = os.path.expanduser(settings.work_dir or default_work_dir)
        self.python = settings.python or sys.executable
        self._jobs: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.submitted = 0
        if settings.login_command:
            self._command(["mkdir", "-p", "-m", "700", self.work_dir])
        else:
            os.makedirs(self.work_dir, mode=0o700, exist_ok=True)
        self._poller = threading.Thread(target=self._poll_loop, daemon=True,
                                        name="slurm-poller")
        self._poller.start()

    # -- the control-plane interface ------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        return self.start(fn, *args).future

    def start(self, fn: Callable[..., Any], *args: Any,
              options: JobOptions | None = None) -> StartedJob:
        options = options or JobOptions()
        name = job_name(fn)
        script = batch_script(self.python, self.work_dir, fn, args)
        output = self._command(sbatch_argv(self.settings, name, options, self.work_dir),
                               stdin=script)
        job_id = parse_job_id(output)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # it is the scheduler's now: scancel stops it
        with self._lock:
            self._jobs[job_id] = _Tracked(future, name)
            self.submitted += 1
        log.debug("slurm: submitted %s as job %s", name, job_id)
        return StartedJob(future, DispatchKind.JOB, job_id)

    def shutdown(self) -> None:
        """Cancel every job still ours (agents included): a gateway that stops must not leave
        them holding nodes."""
        self._stop.set()
        self._poller.join(timeout=COMMAND_TIMEOUT_S)
        with self._lock:
            left = dict(self._jobs)
            self._jobs.clear()
        if left:
            try:
                self._command(["scancel", *left])
            except SchedulerError as e:
                log.warning("slurm: could not cancel jobs %s: %s", ", ".join(left), e)
        for job_id, tracked in left.items():
            if not tracked.future.done():
                tracked.future.set_exception(SlurmJobEnded(job_id, SlurmJobState.CANCELLED,
                                                           ": the gateway stopped"))

    @property
    def running(self) -> list[str]:
        """Our jobs that have not ended yet, by id."""
        with self._lock:
            return list(self._jobs)

    # -- following jobs -------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                self.poll()
            except Exception:  # the poller must outlive any one bad poll
                log.exception("slurm: polling the queue failed")

    def poll(self) -> None:
        """One look at the queue: settle every job that has ended."""
        with self._lock:
            ids = list(self._jobs)
        if not ids:
            return
        try:
            output = self._command(["squeue", "-h", "--states=all", f"--jobs={','.join(ids)}",
                                    "-o", "%i|%T"])
            states = parse_squeue(output)
        except SchedulerError as e:
            if "invalid job id" not in str(e).lower():
                log.warning("slurm: squeue failed: %s", e)
                return  # the controller may be back at the next poll; jobs are not failed
            states = {}  # every one of them has left the queue
        for job_id in ids:
            state = states.get(job_id)
            if state is None or state.ended or state is SlurmJobState.COMPLETING:
                self._settle(job_id, state)

    def _settle(self, job_id: str, state: SlurmJobState | None) -> None:
        with self._lock:
            tracked = self._jobs.get(job_id)
        if tracked is None:
            return
        result = self._read(self._result_path(job_id))
        if result is None:
            if state is SlurmJobState.COMPLETING:
                return  # still exiting: its result may come
            tracked.missing += 1
            if state is SlurmJobState.COMPLETED and tracked.missing < RESULT_LAG_POLLS:
                return
        with self._lock:
            self._jobs.pop(job_id, None)
        if result is not None and result.get("ok"):
            self._remove(self._result_path(job_id), self._output_path(job_id))
            tracked.future.set_result(result.get("value"))
            return
        if result is None:
            error: Exception = SlurmJobEnded(job_id, state, self._tail(job_id))
        else:
            self._remove(self._result_path(job_id))
            error = RuntimeError(f"Slurm job {job_id}: {result.get('error')}")
        log.warning("slurm: %s (output: %s)", error, self._output_path(job_id))
        tracked.future.set_exception(error)

    # -- files and commands ---------------------------------------------------------------------
    def _result_path(self, job_id: str) -> str:
        return os.path.join(self.work_dir, f"{job_id}.result.json")

    def _output_path(self, job_id: str) -> str:
        return os.path.join(self.work_dir, f"{job_id}.out")

    def _read(self, path: str) -> dict[str, Any] | None:
        try:
            if self.settings.login_command:
                text = self._command(["cat", path])
            else:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
        except (OSError, SchedulerError):
            return None
        try:
            outcome = json.loads(text)
        except ValueError:
            return None
        return outcome if isinstance(outcome, dict) else None

    def _tail(self, job_id: str) -> str:
        """The end of a failed job's output, when it is on our filesystem."""
        if self.settings.login_command:
            return ""
        try:
            with open(self._output_path(job_id), encoding="utf-8", errors="replace") as f:
                last = f.read()[-300:].strip()
        except OSError:
            return ""
        return f" (its output ends: {last.splitlines()[-1]})" if last else ""

    def _remove(self, *paths: str) -> None:
        if self.settings.login_command:
            try:
                self._command(["rm", "-f", *paths])
            except SchedulerError:
                pass
            return
        for path in paths:
            try:
                os.remove(path)
            except OSError:
                pass

    def _command(self, argv: list[str], stdin: str | None = None) -> str:
        full = [*self.settings.login_command, *argv]
        try:
            done = subprocess.run(full, input=stdin, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SchedulerError(f"{argv[0]}: {e}") from None
        if done.returncode != 0:
            raise SchedulerError(f"{argv[0]} failed ({done.returncode}): "
                                 f"{done.stderr.strip()[:500]}")
        return done.stdout
