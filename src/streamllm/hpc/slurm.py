"""The `slurm` control plane: every request, agent and batch chunk is a Slurm job of its own,
submitted with `sbatch` and charged to its caller's account.

Parsl's `SlurmProvider` runs requests inside pilot jobs that every caller shares, so the
scheduler cannot say who ran what. Here each job carries `--account` (the caller's, from the
cluster's `accounts` map, else the default) and a `--comment` naming the caller, as a site's
accounting expects. The cost is a scheduler round trip per request (`sbatch` to a running job);
warm agents, which run under the default account, are what avoid it (docs/hpc-as-api.md).

How a job travels: the call (a base64 pickle of the function's module, name and arguments: the
function is streamllm's own, installed on the nodes) is written to a file of its own, mode 0600,
in the work directory; the batch script, fed to `sbatch` on standard input, names that file
and runs `python -m streamllm.hpc.job_entry`, which reads and removes it and writes the result
as JSON to a file named by the same random name. The script holds no prompt, key or token:
Slurm keeps scripts (`scontrol write batch_script`, slurmdbd's job_script). One `squeue` every
`poll_s` for all of our jobs tells which have ended; the result file (read through
`login_command` when the gateway is not on the cluster's filesystem) completes the job's future,
and a job that ended without one fails it, naming the job and its state (CANCELLED after
`scancel`, TIMEOUT, NODE_FAIL ...).

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
import secrets
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from streamllm.config import SlurmSettings
from streamllm.errors import ConfigError
from streamllm.hpc.control import DispatchKind, JobGone, JobOptions, StartedJob

log = logging.getLogger("streamllm.hpc")

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


class SlurmJobEnded(JobGone):
    """A job ended without a result: cancelled, out of time, its node lost ..."""

    def __init__(self, job_id: str, state: SlurmJobState | None, why: str = ""):
        self.job_id, self.state = job_id, state
        said = f"ended {state.value}" if state is not None else "left the queue"
        super().__init__(f"Slurm job {job_id} {said} without a result{why}")


class SlurmJobFailed(Exception):
    """A job ran its call, and the call raised."""

    def __init__(self, job_id: str, error: str):
        self.job_id, self.error = job_id, error
        super().__init__(f"Slurm job {job_id} failed: {error}")


# -- pure parts -----------------------------------------------------------------------------------
def job_name(fn: Callable[..., Any]) -> str:
    """`stream-completion`, `stream-agent`, `stream-batch-chunk`, `stream-ping`."""
    return "stream-" + fn.__name__.removeprefix("run_").replace("_", "-")


def slurm_time(seconds: float) -> str:
    """Seconds as sbatch's `--time` (days-hours:minutes:seconds), rounded up to a minute."""
    minutes = max(1, math.ceil(seconds / 60))
    days, minutes = divmod(minutes, 24 * 60)
    return f"{days}-{minutes // 60:02d}:{minutes % 60:02d}:00"


def comment_for(options: JobOptions, ref: str = "") -> str:
    """Who a job is for, as `squeue -o %k` and `scontrol show job` will show it, and the
    submission's reference (also in the gateway's log), which is never cut off."""
    text = options.comment or (f"streamllm caller={options.caller}" if options.caller
                               else "streamllm")
    printable = "".join(c if c.isprintable() else "?" for c in text)
    tail = f" ref={ref}" if ref else ""
    return printable[:COMMENT_LIMIT - len(tail)] + tail


def find_by_ref(squeue_output: str, ref: str) -> str | None:
    """The job whose comment carries `ref`, from `squeue -h -o %i|%k` lines."""
    for line in squeue_output.splitlines():
        job_id, _, comment = line.strip().partition("|")
        if comment.endswith(f" ref={ref}") and job_id.isdigit():
            return job_id
    return None


def sbatch_argv(settings: SlurmSettings, name: str, options: JobOptions,
                work_dir: str, ref: str = "") -> list[str]:
    argv = ["sbatch", "--parsable", f"--job-name={name}",
            f"--output={work_dir}/%j.out", f"--chdir={work_dir}",
            # A requeued job would run again under the same id after we settled it.
            "--no-requeue",
            # Only what the job needs of our environment: it holds the gateway's secrets.
            f"--export={','.join(settings.export) or 'NONE'}"]
    if options.walltime_s is not None:
        argv.append(f"--time={slurm_time(options.walltime_s)}")
    else:
        argv.append(f"--time={settings.walltime}")
    if settings.partition:
        argv.append(f"--partition={settings.partition}")
    account = options.account or settings.account
    if account:
        argv.append(f"--account={account}")
    argv.append(f"--comment={comment_for(options, ref)}")
    return [*argv, *settings.options]


def encode_call(fn: Callable[..., Any], args: Sequence[Any]) -> str:
    """The call as the job reads it: base64 text of a pickle of names and arguments."""
    call = pickle.dumps({"module": fn.__module__, "name": fn.__qualname__, "args": tuple(args)})
    return base64.encodebytes(call).decode()


def batch_script(python: str, call_file: str, result_file: str, setup: str = "") -> str:
    return (
        "#!/bin/sh\n"
        f"{setup.rstrip()}\n"
        f"export STREAMLLM_CALL_FILE={shlex.quote(call_file)}\n"
        f"export STREAMLLM_RESULT_FILE={shlex.quote(result_file)}\n"
        f"exec {shlex.quote(python)} -m streamllm.hpc.job_entry\n"
    )


def parse_job_id(sbatch_output: str) -> str:
    """`sbatch --parsable` prints `id` or `id;cluster`, after whatever a login shell printed
    first (a banner): the last line that is one."""
    for line in reversed(sbatch_output.strip().splitlines()):
        job_id = line.split(";")[0].strip()
        if job_id.isdigit():
            return job_id
    raise SchedulerError(f"sbatch printed no job id: {sbatch_output.strip()[-200:]!r}")


def parse_squeue(output: str) -> dict[str, SlurmJobState]:
    """`squeue -h -o %i|%T` lines as job id -> state."""
    states: dict[str, SlurmJobState] = {}
    for line in output.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id:
            states[job_id] = SlurmJobState.parse(state)
    return states


# A job that ended in one of these may still have written its result: wait for it a little.
_MAY_HAVE_RESULT = (None, SlurmJobState.COMPLETED, SlurmJobState.FAILED)


# -- the plane ------------------------------------------------------------------------------------
@dataclass
class _Tracked:
    future: concurrent.futures.Future[Any]
    nonce: str  # names its call and result files
    ended_at: float | None = None  # when the queue first said it had ended with no result


class SlurmControlPlane:
    name = "slurm"

    def __init__(self, settings: SlurmSettings, default_work_dir: str):
        self.settings = settings
        self.work_dir = settings.work_dir or default_work_dir
        self.python = settings.python or sys.executable
        self._jobs: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.submitted = 0
        self._make_work_dir()
        self._poller = threading.Thread(target=self._poll_loop, daemon=True,
                                        name="slurm-poller")
        self._poller.start()

    def _make_work_dir(self) -> None:
        if self.settings.login_command:
            # On the cluster: its own user's, no one else's (an existing one is made so).
            where = shlex.quote(self.work_dir)
            self._command(["sh", "-c", f"mkdir -p {where} && chmod 700 {where}"])
            return
        self.work_dir = os.path.expanduser(self.work_dir)
        os.makedirs(self.work_dir, mode=0o700, exist_ok=True)
        st = os.stat(self.work_dir)
        if st.st_uid != os.geteuid():
            raise ConfigError(f"slurm.work_dir {self.work_dir} belongs to another user: job "
                              "calls and answers must be readable by this one alone")
        if st.st_mode & 0o077:
            os.chmod(self.work_dir, 0o700)  # an existing directory others could read

    # -- the control-plane interface ------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        return self.start(fn, *args).future

    def start(self, fn: Callable[..., Any], *args: Any,
              options: JobOptions | None = None) -> StartedJob:
        if self._stop.is_set():
            raise SchedulerError("the slurm control plane has stopped")
        options = options or JobOptions()
        nonce = secrets.token_hex(12)
        call_file = self._path(f"{nonce}.call")
        self._write_private(call_file, encode_call(fn, args))
        script = batch_script(self.python, call_file, self._path(f"{nonce}.result.json"),
                              self.settings.setup)
        ref = nonce[:12]
        try:
            output = self._command(sbatch_argv(self.settings, job_name(fn), options,
                                               self.work_dir, ref), stdin=script)
            job_id = parse_job_id(output)
        except SchedulerError as e:
            # A busy controller can queue the job and still fail to say so ("Socket timed
            # out"): look for it by its reference, or a retry would start a second one.
            job_id = self._find(ref)
            if job_id is None:
                self._remove(call_file)
                raise
            log.warning("slurm: sbatch failed (%s), but job %s (ref %s) was queued: following "
                        "it", e, job_id, ref)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # it is the scheduler's now: scancel stops it
        with self._lock:
            stopped = self._stop.is_set()
            if not stopped:
                self._jobs[job_id] = _Tracked(future, nonce)
                self.submitted += 1
        if stopped:  # shut down while sbatch ran: nobody would follow or cancel it
            self.cancel(job_id)
            raise SchedulerError("the slurm control plane has stopped")
        log.debug("slurm: submitted %s as job %s (ref %s)", job_name(fn), job_id, ref)
        return StartedJob(future, DispatchKind.JOB, job_id)

    def _find(self, ref: str) -> str | None:
        try:
            return find_by_ref(self._command(["squeue", "--me", "-h", "--states=all",
                                              "-o", "%i|%k"]), ref)
        except SchedulerError:
            return None

    def cancel(self, job_id: str) -> None:
        """scancel one job (its future fails once the queue says it has ended)."""
        try:
            self._command(["scancel", job_id])
        except SchedulerError as e:
            log.warning("slurm: could not cancel job %s: %s", job_id, e)

    def shutdown(self) -> None:
        """Cancel every job still ours (agents included): a gateway that stops must not leave
        them holding nodes."""
        with self._lock:
            self._stop.set()
            left = dict(self._jobs)
            self._jobs.clear()
        if left:
            try:
                self._command(["scancel", *left])
            except SchedulerError as e:
                log.warning("slurm: could not cancel jobs %s: %s", ", ".join(left), e)
        for job_id, tracked in left.items():
            tracked.future.set_exception(SlurmJobEnded(job_id, SlurmJobState.CANCELLED,
                                                       ": the gateway stopped"))
        self._poller.join(timeout=self.settings.command_timeout_s)

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
        result_file = self._path(f"{tracked.nonce}.result.json")
        result = self._read(result_file)
        if result is None:
            if state is SlurmJobState.COMPLETING:
                return  # still exiting: its result may come
            now = time.monotonic()
            tracked.ended_at = tracked.ended_at or now
            if state in _MAY_HAVE_RESULT and now - tracked.ended_at < \
                    self.settings.result_wait_s:
                return
        with self._lock:
            # Settled once: by this poll, or by shutdown, whichever takes it from the table.
            if self._jobs.pop(job_id, None) is not tracked:
                return
        self._remove(result_file, self._path(f"{tracked.nonce}.call"))
        if result is not None and result.get("ok"):
            self._remove(self._output_path(job_id))
            tracked.future.set_result(result.get("value"))
            return
        if result is None:
            error: Exception = SlurmJobEnded(job_id, state)
        else:
            error = SlurmJobFailed(job_id, str(result.get("error")))
        # The job's own output stays on the cluster and in our log, not in what a client sees.
        log.warning("slurm: %s (output: %s%s)", error, self._output_path(job_id),
                    self._tail(job_id))
        tracked.future.set_exception(error)

    # -- files and commands ---------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return os.path.join(self.work_dir, name)

    def _output_path(self, job_id: str) -> str:
        return self._path(f"{job_id}.out")

    def _write_private(self, path: str, text: str) -> None:
        """A file only this user can read, that did not exist (no one else's symlink)."""
        if self.settings.login_command:
            self._command(["sh", "-c", f"umask 077 && set -C && cat > {shlex.quote(path)}"],
                          stdin=text)
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)

    def _read(self, path: str) -> dict[str, Any] | None:
        try:
            if self.settings.login_command:
                text = self._command(["cat", path])
            else:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
        except (OSError, SchedulerError):
            return None
        # The result is one line of JSON; a login shell may have printed something first.
        lines = text.strip().splitlines()
        try:
            outcome = json.loads(lines[-1]) if lines else None
        except ValueError:
            return None
        return outcome if isinstance(outcome, dict) else None

    def _tail(self, job_id: str) -> str:
        """The end of a failed job's output, when it is on our filesystem (for the log)."""
        if self.settings.login_command:
            return ""
        try:
            with open(self._output_path(job_id), encoding="utf-8", errors="replace") as f:
                last = f.read()[-300:].strip()
        except OSError:
            return ""
        return f"; it ends: {last.splitlines()[-1]}" if last else ""

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
        # Through ssh the command is one string that the login node's shell parses again:
        # quoted here, so that a comment with spaces (or a caller's name) stays one argument.
        full = [*self.settings.login_command, shlex.join(argv)] if self.settings.login_command \
            else argv
        try:
            done = subprocess.run(full, input=stdin, capture_output=True, text=True,
                                  timeout=self.settings.command_timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SchedulerError(f"{argv[0]}: {e}") from None
        if done.returncode != 0:
            raise SchedulerError(f"{argv[0]} failed ({done.returncode}): "
                                 f"{done.stderr.strip()[:500]}")
        return done.stdout
