"""Control planes: how a job reaches the cluster. One interface, shaped like an Executor.

- `local`: a process pool on this machine, for the smallest setups.
- `globus`: a Globus Compute endpoint on the cluster (`globus_compute_sdk.Executor`).
- `parsl`: a Parsl HighThroughputExecutor; `LocalProvider` by default (one machine, what tests
  and the demo use as the stand-in for a remote endpoint), Slurm or PBS on a cluster.
- `slurm`: `sbatch` itself, one Slurm job per request, agent or batch chunk, charged to the
  caller's account (hpc/slurm.py).

Every submission carries an idempotency key: a client's retry of the same request gets the
future of the job already running instead of starting a second GPU job.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import multiprocessing
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from streamllm.config import HPCSettings


class DispatchKind(StrEnum):
    """How a request reached the cluster (the `x-stream-dispatch` header)."""

    JOB = "job"  # a job of its own through the control plane
    AGENT = "agent"  # a warm agent that was already running


class JobGone(Exception):
    """The scheduler says a job has ended without a result (cancelled, out of time, its node
    lost): nothing more will come from it, on the relay or otherwise. Other failures of a
    job's future (a lost heartbeat, a result that could not be delivered) prove less."""


@dataclass(frozen=True)
class StartedJob:
    """A job as the gateway knows it: the control plane's future and what we need to know
    about it. What we need is carried here, never asked of the future: a Parsl AppFuture
    answers any attribute it lacks with a new remote task."""

    future: concurrent.futures.Future[Any]
    kind: DispatchKind = DispatchKind.JOB
    job_id: str | None = None  # the scheduler's id for it, where the plane has one


@dataclass(frozen=True)
class JobOptions:
    """What a scheduler is told about a job besides its work. Planes whose workers every
    caller shares (Parsl's pilot jobs, a process pool) have nothing to tell and ignore it."""

    caller: str | None = None  # whose request: the job's comment says so
    account: str | None = None  # the allocation to charge; None: the plane's default
    walltime_s: float | None = None  # how long it may run; None: the plane's default
    comment: str | None = None  # instead of the one made from `caller`


class ControlPlane(Protocol):
    name: str

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]: ...

    def start(self, fn: Callable[..., Any], *args: Any,
              options: JobOptions | None = None) -> StartedJob: ...

    def cancel(self, job_id: str) -> None:
        """Stop a job the gateway has given up on (its StartedJob.job_id)."""
        ...

    def shutdown(self) -> None: ...


class JobsOnly:
    """A control plane whose every submission is a job of its own."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        raise NotImplementedError

    def start(self, fn: Callable[..., Any], *args: Any,
              options: JobOptions | None = None) -> StartedJob:
        return StartedJob(self.submit(fn, *args), DispatchKind.JOB)

    def cancel(self, job_id: str) -> None:
        pass  # its jobs have no id of their own: they end with their work or their walltime


class LocalControlPlane(JobsOnly):
    name = "local"

    def __init__(self, max_workers: int = 4):
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._closed = False
        self._pool = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        # Spawned, not forked: the gateway has threads (its event loop's helpers, TLS, the
        # relay), and a child forked while one of them held a lock can hang in it; this was
        # seen as a worker's relay handshake timing out. A spawned worker also sees the
        # environment as it is now (not as a fork server saw it when it started).
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self._max_workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_exit_with, initargs=(os.getpid(),))

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        with self._lock:
            pool = self._pool
        try:
            return pool.submit(fn, *args)
        except concurrent.futures.process.BrokenProcessPool:
            # A worker died (killed, out of memory) and took the pool down: the jobs it held
            # have failed with it, and the plane goes on with a fresh pool, as a cluster's
            # endpoint would go on after losing a node.
            with self._lock:
                if self._pool is pool and not self._closed:
                    _terminate(pool)
                    self._pool = self._new_pool()
                pool = self._pool
            return pool.submit(fn, *args)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            # Jobs still running here are the gateway's own children (a warm agent lives as
            # long as its walltime): stop them, or the interpreter's exit would wait for them.
            _terminate(self._pool)


def _terminate(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    if hasattr(pool, "terminate_workers"):  # Python 3.14 and later
        pool.terminate_workers()
        return
    # Before 3.14 the pool offers no way to stop running workers but its private table.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()


def _exit_with(parent: int) -> None:
    """In each local worker: exit when the gateway is gone. A spawned worker holds both ends of
    its task pipe, so a gateway that dies (or exits while the worker is still starting) would
    otherwise leave it waiting for work forever."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-gateway").start()


class GlobusControlPlane(JobsOnly):
    """Jobs go to a Globus Compute endpoint; the SDK batches submissions and streams results
    back over AMQP. Credentials come from the SDK's own login (`globus-compute-endpoint` /
    GLOBUS_COMPUTE_CLIENT_ID and _SECRET for a service identity); STREAM stores none."""

    name = "globus"

    def __init__(
        self,
        endpoint_id: str,
        user_endpoint_config: dict[str, Any] | None = None,
        resource_specification: dict[str, Any] | None = None,
        amqp_port: int | None = None,
    ):
        from globus_compute_sdk import Executor

        self._executor = Executor(
            endpoint_id=endpoint_id,
            user_endpoint_config=user_endpoint_config or None,
            resource_specification=resource_specification or None,
            amqp_port=amqp_port,
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        return self._executor.submit(fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class ParslControlPlane(JobsOnly):
    """A private Parsl DataFlowKernel (not Parsl's global one), so several can coexist."""

    name = "parsl"

    def __init__(
        self,
        run_dir: str,
        provider: str = "local",
        max_workers: int = 4,
        provider_options: dict[str, Any] | None = None,
        address: str = "127.0.0.1",
        heartbeat_s: float = 5.0,
    ):
        from parsl.config import Config
        from parsl.dataflow.dflow import DataFlowKernel
        from parsl.executors import HighThroughputExecutor

        options = dict(provider_options or {})
        # Parsl starts its interchange and worker pool as console scripts found on PATH; in an
        # unactivated virtualenv they sit beside this interpreter, so make sure PATH has them.
        scripts = os.path.dirname(sys.executable)
        if scripts not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
        if provider == "local":
            from parsl.providers import LocalProvider

            options.setdefault("init_blocks", 1)
            options.setdefault("min_blocks", 1)
            options.setdefault("max_blocks", 1)
            chosen: Any = LocalProvider(**options)
        elif provider == "slurm":
            from parsl.providers import SlurmProvider

            chosen = SlurmProvider(**options)
        elif provider == "pbspro":
            from parsl.providers import PBSProProvider

            chosen = PBSProProvider(**options)
        else:
            raise ValueError(f"unknown Parsl provider {provider!r} (local, slurm, pbspro)")
        os.makedirs(run_dir, exist_ok=True)
        config = Config(
            executors=[
                HighThroughputExecutor(
                    label="stream_hpc",
                    provider=chosen,
                    address=address,
                    max_workers_per_node=max_workers,
                    # A worker waits on the node's vLLM over HTTP; it computes nothing itself,
                    # so CPU cores must not cap how many run side by side.
                    cores_per_worker=0.01,
                    # Ctrl-C in a terminal signals the whole process group; the interchange
                    # must not die before we ask it to stop, or Parsl's shutdown waits on it
                    # forever. A session of its own keeps it out of the terminal's group.
                    interchange_launch_cmd=["setsid", "interchange.py"],
                    # Also how often a node checks its workers: a worker that died fails its
                    # task within about this long (Parsl's default of 30 s is long for a chat).
                    heartbeat_period=max(1, round(heartbeat_s)),
                    heartbeat_threshold=max(4, round(heartbeat_s * 6)),
                )
            ],
            run_dir=run_dir,
            usage_tracking=0,  # Parsl must not report usage anywhere
            initialize_logging=False,
            strategy="none" if provider == "local" else "simple",
        )
        self._dfk = DataFlowKernel(config)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        from parsl import python_app

        return python_app(fn, data_flow_kernel=self._dfk, executors=["stream_hpc"])(*args)

    @property
    def tasks_started(self) -> int:
        """How many tasks Parsl's dataflow kernel has been given (ours and any it made)."""
        return int(self._dfk.task_count)

    def shutdown(self) -> None:
        self._dfk.cleanup()


@dataclass
class Submission:
    future: concurrent.futures.Future[Any]
    kind: DispatchKind  # a job of its own or a warm agent (a joined job keeps its kind)
    started: bool  # False: this call joined a job an earlier call started
    args: tuple[Any, ...]  # the arguments the job was really started with
    job_id: str | None = None  # the scheduler's id of the job (or of the agent's job)


class IdempotentSubmitter:
    """Remembers recent submissions by key so that a retried request joins the running job."""

    def __init__(self, plane: ControlPlane, ttl_s: float = 600.0, max_keys: int = 10_000):
        self.plane = plane
        self._ttl = ttl_s
        self._max = max_keys
        self._jobs: OrderedDict[str, tuple[float, Submission]] = OrderedDict()
        self._starting: dict[str, threading.Event] = {}  # keys whose job is being started
        self._lock = threading.Lock()
        self.submitted = 0  # how many jobs really reached the control plane

    def submit(self, key: str, fn: Callable[..., Any], *args: Any,
               options: JobOptions | None = None) -> Submission:
        """Start `fn(*args)`, or join the job an earlier call with the same key started.

        The lock is not held while the plane starts the job (`sbatch` can take seconds): a
        call with the same key meanwhile waits for that start, others go on."""
        while True:
            now = time.monotonic()
            with self._lock:
                while self._jobs:
                    oldest_key, (at, _) = next(iter(self._jobs.items()))
                    if now - at <= self._ttl and len(self._jobs) < self._max:
                        break
                    del self._jobs[oldest_key]
                starting = self._starting.get(key)
                if starting is None:
                    known = self._jobs.get(key)
                    if known is not None:
                        job = known[1]
                        # A job that failed may be retried for real; one running or done is
                        # joined.
                        if not (job.future.done() and job.future.exception() is not None):
                            return Submission(job.future, job.kind, False, job.args,
                                              job.job_id)
                    starting = self._starting[key] = threading.Event()
                    break
            starting.wait()  # the same key is being started by another call: then join it
        try:
            begun = self.plane.start(fn, *args, options=options)
        except BaseException:
            with self._lock:
                self._starting.pop(key).set()
            raise
        job = Submission(begun.future, begun.kind, True, args, begun.job_id)
        with self._lock:
            self.submitted += 1
            self._jobs[key] = (now, job)
            self._starting.pop(key).set()
        return job


def make_control_plane(settings: HPCSettings, data_dir: str) -> ControlPlane:
    """The control plane the configuration names. Slow (Parsl starts its interchange and
    workers), so callers off the event loop's thread."""
    if settings.control_plane == "local":
        return LocalControlPlane(max_workers=settings.local_workers)
    if settings.control_plane == "slurm":
        from streamllm.hpc.slurm import SlurmControlPlane

        return SlurmControlPlane(settings.slurm, os.path.join(os.path.expanduser(data_dir),
                                                              "slurm"))
    if settings.control_plane == "globus":
        g = settings.globus
        return GlobusControlPlane(
            g.endpoint_id or "", g.user_endpoint_config, g.resource_specification, g.amqp_port
        )
    p = settings.parsl
    return ParslControlPlane(
        run_dir=p.run_dir or os.path.join(os.path.expanduser(data_dir), "parsl"),
        provider=p.provider,
        max_workers=p.max_workers,
        provider_options=p.provider_options,
        address=p.address,
        heartbeat_s=p.heartbeat_s,
    )
