"""A single-node Slurm cluster in a temporary directory, for the suite's `slurm` tests.

Debian's munged, slurmctld and slurmd (installed by `make test` when it runs as root) are
started with a configuration of their own: free ports, their own spool, state and log
directories, no cgroups (`proctrack/linuxproc`), no accounting database, and jobs scheduled at
once (`batch_sched_delay=0`). The node claims more CPUs than the machine has
(`config_overrides`), so that pilot jobs, agents and batch jobs can run side by side on a
2-core machine. The daemons are ended by PID, after every job has been cancelled.

The scheduler's commands are reached through wrappers in `bin/`, as a site's users reach a
login node: put that directory first on PATH (Parsl's SlurmProvider runs `sbatch`, `squeue`,
`sacct` and `scancel` by name).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from streamllm.realmodel import free_port

COMMANDS = ("sbatch", "squeue", "scancel", "sacct", "sinfo", "scontrol", "srun")
DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "boxnode"
NODE_CPUS = 64  # what the node claims (jobs compute nothing: they wait on a model server)


def why_not_available() -> str | None:
    """None when a box can start here, else why not (one line)."""
    if os.geteuid() != 0:
        return "the Slurm cluster in a box needs root (run `make test` as root to install it)"
    missing = [d for d in DAEMONS + ("mungekey", "sbatch") if shutil.which(d) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing): `make test` as root "
                "installs Debian's slurmctld, slurmd, slurm-client and munge")
    return None


@dataclass
class SlurmBox:
    partitions: tuple[str, ...] = ("gpu", "gpu2")
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="slurmbox-")))
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    started_in_s: float = 0.0

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def bin(self) -> Path:
        """The scheduler's commands, as a login node offers them."""
        return self.root / "bin"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """Run one of the scheduler's commands (`squeue`, `scancel` ...) and return its output."""
        done = subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def jobs(self) -> list[dict[str, str]]:
        """The jobs in the queue: id, name, account, comment, state, partition."""
        out = self.command("squeue", "-h", "-o", "%i|%j|%a|%k|%t|%P")
        keys = ("id", "name", "account", "comment", "state", "partition")
        return [dict(zip(keys, line.split("|"), strict=True)) for line in out.splitlines()]

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 30) -> SlurmBox:
        began = time.monotonic()
        os.chmod(self.root, 0o755)
        key_dir, run_dir = self.root / "munge", self.root / "munge-run"
        key_dir.mkdir(mode=0o700)
        run_dir.mkdir(mode=0o755)  # munged wants its socket's directory open to all
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir()
        subprocess.run(["mungekey", "--create", f"--keyfile={key_dir / 'munge.key'}"],
                       check=True, capture_output=True)
        socket_path = run_dir / "munge.socket"
        self._write_conf(socket_path)
        self._write_commands()
        logs = self.root / "log"
        try:
            self._spawn("munged", ["munged", "--foreground", f"--key-file={key_dir / 'munge.key'}",
                                   f"--socket={socket_path}", f"--pid-file={run_dir / 'pid'}",
                                   f"--seed-file={key_dir / 'seed'}",
                                   f"--log-file={logs / 'munged.log'}"])
            self._wait(lambda: socket_path.exists(), timeout, "munged's socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
            self._wait(self._idle, timeout, "the node to be idle")
        except BaseException:
            self.stop()
            raise
        self.started_in_s = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then end the daemons by PID."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            try:
                ids = self.command("squeue", "-h", "-o", "%i", check=False).split()
                if ids:
                    self.command("scancel", *ids, check=False)
                    self._wait(lambda: not self.command("squeue", "-h", "-o", "%i",
                                                        check=False).split(), 30, "jobs to end")
            except (RuntimeError, subprocess.TimeoutExpired, OSError):
                pass  # the daemons go anyway
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmBox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- parts --------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")
        self.processes[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                env=self.env, start_new_session=True)
        out.close()

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    log = (self.root / "log" / f"{name}.out").read_text(errors="replace")
                    raise RuntimeError(f"{name} exited ({process.returncode}) while waiting "
                                       f"for {what}: {log[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def _idle(self) -> bool:
        done = subprocess.run([str(self.bin / "sinfo"), "-h", "-N", "-o", "%T"],
                              capture_output=True, text=True, timeout=10, check=False)
        return done.returncode == 0 and done.stdout.split() and \
            all(s == "idle" for s in done.stdout.split())

    def _write_conf(self, munge_socket: Path) -> None:
        host = socket.gethostname()
        r = self.root
        lines = [
            "ClusterName=streambox",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            # a cancelled job's processes get this long after SIGTERM before SIGKILL
            "KillWait=5",
            (f"NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} "
             "RealMemory=16000 State=UNKNOWN"),
        ]
        for i, name in enumerate(self.partitions):
            default = "YES" if i == 0 else "NO"
            lines.append(f"PartitionName={name} Nodes={NODE} Default={default} "
                         "MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _write_commands(self) -> None:
        self.bin.mkdir()
        for name in COMMANDS:
            real = shutil.which(name)
            if real is None:
                continue
            wrapper = self.bin / name
            wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {real} "$@"\n')
            wrapper.chmod(0o755)
