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

`WalledSlurmBox` is the same cluster behind a firewall: its daemons, its jobs and the model
server it starts run in a network namespace of their own that lets nothing in (docs/firewall.md).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from streamllm import realmodel
from streamllm.realmodel import free_port

COMMANDS = ("sbatch", "squeue", "scancel", "sacct", "sinfo", "scontrol", "srun")
DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "boxnode"
NODE_CPUS = 64  # what the node claims (jobs compute nothing: they wait on a model server)


WRAPPERS_MARK = ".slurm-box-wrappers"  # in a box's bin/: its commands are wrappers


def real_command(name: str) -> str | None:
    """The scheduler's command itself, never another box's wrapper for it: with a box's bin/
    first on PATH, a second box's wrappers would otherwise run the first box's (and so talk
    to the first box's slurmctld)."""
    dirs = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep)
            if d and not (Path(d) / WRAPPERS_MARK).exists()]
    return shutil.which(name, path=os.pathsep.join(dirs))


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

    @property
    def address(self) -> str:
        """Where slurmctld and slurmd listen (`SlurmctldHost`'s address and `NodeAddr`)."""
        return "127.0.0.1"

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
            where = self._daemon_prefix()
            self._spawn("munged", [*where, "munged", "--foreground",
                                   f"--key-file={key_dir / 'munge.key'}",
                                   f"--socket={socket_path}", f"--pid-file={run_dir / 'pid'}",
                                   f"--seed-file={key_dir / 'seed'}",
                                   f"--log-file={logs / 'munged.log'}"])
            self._wait(lambda: socket_path.exists(), timeout, "munged's socket")
            self._spawn("slurmctld", [*where, "slurmctld", "-D", "-f", str(self.conf)])
            self._spawn("slurmd", [*where, "slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
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
            end_process(self.processes.pop(name))
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmBox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- parts (a WalledSlurmBox changes where they run) ---------------------------------------
    def _daemon_prefix(self) -> list[str]:
        """What the daemons' command lines start with (nothing: they run on this machine)."""
        return []

    def _command_prefix(self) -> str:
        """What the wrappers put before a scheduler command (nothing: it runs here)."""
        return ""

    def _ports(self) -> tuple[int, int]:
        """slurmctld's and slurmd's ports."""
        return free_port(), free_port()

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
        ctld_port, slurmd_port = self._ports()
        lines = [
            "ClusterName=streambox",
            f"SlurmctldHost={host}({self.address})",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
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
            (f"NodeName={NODE} NodeHostname={host} NodeAddr={self.address} CPUs={NODE_CPUS} "
             "RealMemory=16000 State=UNKNOWN"),
        ]
        for i, name in enumerate(self.partitions):
            default = "YES" if i == 0 else "NO"
            lines.append(f"PartitionName={name} Nodes={NODE} Default={default} "
                         "MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _write_commands(self) -> None:
        self.bin.mkdir()
        (self.bin / WRAPPERS_MARK).touch()
        for name in COMMANDS:
            real = real_command(name)
            if real is None:
                continue
            wrapper = self.bin / name
            wrapper.write_text(
                f'#!/bin/sh\nSLURM_CONF={self.conf} exec {self._command_prefix()}{real} "$@"\n')
            wrapper.chmod(0o755)


# -- the cluster behind a firewall --------------------------------------------------------------

# The box's own /30 comes from this range, one of its 16,384 at random; a /30 that meets any
# address or route of this machine is passed over. 10.213/16 is nobody's default and not this
# machine's (its own network is 192.0.2.0/24).
WALLED_RANGE = ipaddress.ip_network("10.213.0.0/16")
WALLED_PORTS = (6817, 6818)  # Slurm's own defaults: the namespace is the box's alone
# Inside the namespace: nothing comes in but replies to what went out, and traffic to itself.
FIREWALL = """\
table inet filter {
  chain input {
    type filter hook input priority filter; policy drop;
    iif "lo" accept
    ct state established,related accept
  }
  chain output {
    type filter hook output priority filter; policy accept;
  }
}
"""

# A client run inside the namespace with the interpreter of this virtualenv but only the
# standard library (it starts in ~0.1 s): `tcp HOST PORT TIMEOUT` connects and closes; `http
# URL TIMEOUT` GETs, or POSTs its standard input as JSON, and prints the body. Fails (exit 1,
# the traceback on stderr) when it cannot.
INSIDE_CLIENT = """\
import socket, sys, urllib.request
mode, timeout = sys.argv[1], float(sys.argv[-1])
if mode == "tcp":
    socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=timeout).close()
else:
    body = sys.stdin.buffer.read() or None
    request = urllib.request.Request(sys.argv[2], data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        sys.stdout.write(answer.read().decode())
"""


def why_walled_not_available() -> str | None:
    """None when a walled box can start here, else why not (one line)."""
    why = why_not_available()
    if why:
        return why
    missing = [t for t in ("ip", "nft", "nsenter") if shutil.which(t) is None]
    if missing:
        return (f"{', '.join(missing)} missing: the walled Slurm box needs iproute2, nftables "
                "and util-linux (`make test` as root installs them)")
    return None


@dataclass
class WalledSlurmBox(SlurmBox):
    """A SlurmBox whose daemons, and so every job, run in a network namespace of their own
    behind an nftables firewall that lets nothing in: a cluster that can only dial out.

    The namespace (`streambox-<n>`) is joined to this machine by a veth pair on a /30 of its
    own: `host_address` on this side, `address` inside, where slurmctld, slurmd and whatever
    `popen_inside` starts (the GPU node's model server) listen. The wrappers in `bin/` run the
    scheduler's commands with `ip netns exec` (what SSH to a login node is at a site). stop()
    ends every process it started and any left in the namespace (a job's stray child) by PID,
    then deletes the veth pair and the namespace, also after a start that failed halfway.
    """

    netns: str | None = None
    network: ipaddress.IPv4Network | None = None
    veth: str | None = None  # this side's end; the other end is inside the namespace
    inside: list[subprocess.Popen] = field(default_factory=list)
    network_in_s: float = 0.0  # of started_in_s, how long the namespace and firewall took

    @property
    def address(self) -> str:
        """The namespace's address: its daemons and servers listen here."""
        assert self.network is not None, "the box is not started"
        return str(self.network[2])

    @property
    def host_address(self) -> str:
        """This machine's end of the veth pair: what jobs inside dial out to."""
        assert self.network is not None, "the box is not started"
        return str(self.network[1])

    @property
    def ports(self) -> dict[str, int]:
        return dict(zip(("slurmctld", "slurmd"), WALLED_PORTS, strict=True))

    # -- inside the namespace -----------------------------------------------------------------
    def inside_argv(self, argv: list[str]) -> list[str]:
        """argv run inside the namespace, as a login node's shell would run it."""
        assert self.netns is not None, "the box is not started"
        return [shutil.which("ip") or "ip", "netns", "exec", self.netns, *argv]

    def popen_inside(self, argv: list[str], log_path: Path | None = None,
                     **kwargs: object) -> subprocess.Popen:
        """Start a process inside the namespace (its output to `log_path`, if given); stop()
        ends it by PID if it still runs. `ip netns exec` execs the command, so the PID is the
        process's own."""
        if log_path is not None:
            with open(log_path, "wb") as out:
                process = subprocess.Popen(self.inside_argv(argv), stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True,
                                           **kwargs)  # type: ignore[call-overload]
        else:
            process = subprocess.Popen(self.inside_argv(argv), start_new_session=True,
                                       **kwargs)  # type: ignore[call-overload]
        self.inside.append(process)
        return process

    def run_inside(self, argv: list[str], timeout: float = 30,
                   input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.inside_argv(argv), capture_output=True, text=True,
                              input=input, timeout=timeout, check=False)

    def connects_inside(self, port: int, host: str | None = None, timeout: float = 2) -> bool:
        """Whether a TCP connection from inside the namespace to host:port (default: the
        namespace's own address) is accepted."""
        done = self.run_inside([sys.executable, "-c", INSIDE_CLIENT, "tcp", host or self.address,
                                str(port), str(timeout)], timeout=timeout + 30)
        return done.returncode == 0

    def http_inside(self, url: str, body: str | None = None, timeout: float = 60) -> str:
        """GET url (or POST body as JSON) from inside the namespace; the response's body."""
        done = self.run_inside([sys.executable, "-c", INSIDE_CLIENT, "http", url, str(timeout)],
                               input=body or "", timeout=timeout + 30)
        if done.returncode != 0:
            raise RuntimeError(f"{url} from inside {self.netns}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def ruleset(self) -> str:
        """The namespace's nftables ruleset, as `nft list ruleset` prints it."""
        done = self.run_inside(["nft", "list", "ruleset"])
        if done.returncode != 0:
            raise RuntimeError(f"nft list ruleset: {done.stderr}")
        return done.stdout

    def start_model_server(self, log_dir: Path, port: int = 8000,
                           timeout: float = 120) -> realmodel.ModelServer:
        """The real model's server inside the namespace on `address`:port (vLLM's port on a
        GPU node). Ready when it answers /v1/models, asked from inside: this side cannot."""
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"model-server-inside-{port}.log"
        # Like realmodel.start_model_server's: it ends with its parent, even one killed (the
        # signal survives `ip netns exec`'s exec, which is not setuid).
        process = self.popen_inside(realmodel.server_command(self.address, port), log_path,
                                    env=realmodel.server_environment(),
                                    preexec_fn=realmodel._end_with_parent)
        server = realmodel.ModelServer(process, self.address, port, log_path)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the model server exited ({process.returncode}): "
                                       f"{log_path.read_text(errors='replace')[-2000:]}")
                try:
                    self.http_inside(f"{server.url}/models", timeout=5)
                    return server
                except RuntimeError:
                    pass  # not listening yet (refused at once), or not serving yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the model server did not answer within {timeout:.0f} s")
                time.sleep(0.1)
        except BaseException:
            server.stop()
            raise

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 30) -> WalledSlurmBox:
        began = time.monotonic()
        try:
            self._make_network()
            self.network_in_s = time.monotonic() - began
            super().start(timeout)  # (which calls stop() itself if a daemon fails)
        except BaseException:
            self.stop()
            raise
        self.started_in_s = time.monotonic() - began
        return self

    def stop(self) -> None:
        for process in reversed(self.inside):
            end_process(process)
        self.inside.clear()
        super().stop()
        if self.netns is not None:
            self._end_stragglers()
        if self.veth is not None:
            # Deleting one end deletes both.
            subprocess.run(["ip", "link", "del", self.veth], capture_output=True, check=False)
            self.veth = None
        if self.netns is not None:
            done = subprocess.run(["ip", "netns", "del", self.netns], capture_output=True,
                                  text=True, check=False)
            if done.returncode != 0 and "No such file" not in done.stderr:
                raise RuntimeError(f"ip netns del {self.netns}: {done.stderr}")
            self.netns = None

    # -- parts --------------------------------------------------------------------------------
    def _daemon_prefix(self) -> list[str]:
        # nsenter changes the network namespace alone; `ip netns exec` would also remount /sys
        # without the cgroup mounts, and slurmd then fails to start.
        assert self.netns is not None
        return ["nsenter", f"--net=/run/netns/{self.netns}"]

    def _command_prefix(self) -> str:
        assert self.netns is not None
        return f"{shutil.which('ip')} netns exec {self.netns} "

    def _ports(self) -> tuple[int, int]:
        return WALLED_PORTS

    def _make_network(self) -> None:
        for _ in range(64):
            index = secrets.randbelow(WALLED_RANGE.num_addresses // 4)
            network = ipaddress.ip_network(
                (int(WALLED_RANGE.network_address) + 4 * index, 30))
            if _in_use(network):
                continue
            # `ip netns add` fails when the name exists: that is what makes a /30 this box's
            # alone among boxes started at the same time (the name carries the /30's number).
            name = f"streambox-{index}"
            done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                if "exists" in done.stderr:
                    continue
                raise RuntimeError(f"ip netns add {name}: {done.stderr.strip()}")
            self.netns, self.network = name, network
            break
        else:
            raise RuntimeError(f"no free /30 in {WALLED_RANGE} after 64 draws")
        self.veth, peer = f"sbx{index}h", f"sbx{index}n"
        prefix = network.prefixlen
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", peer, "netns", name)
        _ip("addr", "add", f"{self.host_address}/{prefix}", "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        _ip("-n", name, "addr", "add", f"{self.address}/{prefix}", "dev", peer)
        _ip("-n", name, "link", "set", peer, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        done = self.run_inside(["nft", "-f", "-"], input=FIREWALL)
        if done.returncode != 0:
            raise RuntimeError(f"nft -f (the firewall): {done.stderr.strip()}")

    def _end_stragglers(self) -> None:
        """End, by PID, any process still in the namespace: a job's child that Slurm's
        proctrack/linuxproc lost track of. The namespace is the box's own, so every process
        in it was started by the box."""
        def pids() -> list[int]:
            done = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                                  text=True, check=False)
            return [int(p) for p in done.stdout.split()]

        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            left = pids()
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while pids() and time.monotonic() < deadline:
                time.sleep(0.05)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _in_use(network: ipaddress.IPv4Network) -> bool:
    """Whether any address or route of this machine meets `network` (the default route aside)."""
    for what in (["-4", "addr", "show"], ["-4", "route", "show", "table", "all"]):
        done = subprocess.run(["ip", "-j", *what], capture_output=True, text=True, check=True)
        for entry in json.loads(done.stdout or "[]"):
            found = [f"{a['local']}/{a['prefixlen']}" for a in entry.get("addr_info", [])]
            if entry.get("dst") not in (None, "default"):
                found.append(entry["dst"])
            if any(ipaddress.ip_network(f, strict=False).overlaps(network) for f in found):
                return True
    return False


def end_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 15 s, by PID; waited for either way."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
