"""The HPC tier with its cluster behind a real firewall: nothing can reach it, it only dials out.

The walled box (tests/slurm_box.py WalledSlurmBox) runs slurmctld, slurmd, every job and the
real model's server in a network namespace whose nftables input chain drops everything but
loopback and replies (docs/firewall.md). The gateway, Parsl's interchange and the relay run on
this side. Parsl's SlurmProvider submits through the box's wrappers (`ip netns exec`, what SSH
to a login node is at a site); the pilot job's worker dials the interchange and the relay on
this side's end of the veth pair, and the model server inside the namespace. Answers are
compared with what the model server itself says, asked from inside the namespace (this side
cannot ask it: that is the point), one request at a time at temperature 0 with a seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from streamllm.config import Settings
from streamllm.gateway import create_app
from streamllm.realmodel import MODEL_NAME
from streamllm.serving import ServerThread
from tests.conftest import hpc_ready, start_relay, until
from tests.slurm_box import end_process
from tests.test_slurm import body

pytestmark = [pytest.mark.slurm, pytest.mark.real_model, pytest.mark.timeout(300)]

MODEL = f"hpc/{MODEL_NAME}"
BLOCKED_WITHIN_S = 1.0  # a dropped SYN is never answered; a reachable port answers in ~1 ms


@dataclass
class Relay:
    url: str
    port: int
    secret_file: Path
    ca_file: Path  # what SSL_CERT_FILE must name for the relay's certificate to be trusted


def site_certificate(directory: Path, address: str) -> tuple[Path, Path, Path]:
    """A CA of the site's own and a certificate it signed for `address`: the CA file, the
    certificate and its key (PEM)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "streambox test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(address))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = directory / "ca.pem", directory / "relay.pem", directory / "relay.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def walled_relay(walled_box, tmp_path_factory) -> Iterator[Relay]:
    """The relay on this side's end of the veth pair: the one address that both the gateway
    (it is this machine's) and the jobs inside the namespace (through the veth) reach, and
    that no other network of this machine does, as 0.0.0.0 would. Off loopback the relay
    serves only TLS (`streamllm relay` refuses otherwise), so the site has a CA of its own."""
    tmp = tmp_path_factory.mktemp("walled-relay")
    secret = tmp / "relay.secret"
    secret.write_text(secrets.token_hex(32))
    ca, cert, key = site_certificate(tmp, walled_box.host_address)
    process, port = start_relay("--host", walled_box.host_address, "--tls-cert", str(cert),
                                "--tls-key", str(key), "--secret-file", str(secret))
    try:
        yield Relay(f"wss://{walled_box.host_address}:{port}", port, secret, ca)
    finally:
        end_process(process)


def direct_answer_inside(box, model_server, question: str) -> str:
    """What the model server says for the same body, asked from inside the namespace."""
    answer = box.http_inside(f"{model_server.url}/chat/completions",
                             json.dumps({"model": MODEL_NAME, **body(question)}))
    return json.loads(answer)["choices"][0]["message"]["content"] or ""


def streamed(url: str, question: str) -> tuple[str, str | None, dict, float]:
    """The gateway's streamed answer, its finish reason, headers, and seconds to first token."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    began = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model=MODEL, stream=True,
                                                           **body(question))
    text, finish, first = "", None, None
    for chunk in raw.parse():
        for c in chunk.choices:
            if c.delta.content and first is None:
                first = time.monotonic() - began
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish, dict(raw.headers), first if first is not None else float("nan")


def blocked(host: str, port: int) -> bool:
    """Whether a TCP connection from this side to host:port goes unanswered (a firewall's
    drop: a port with nothing behind it would be refused at once)."""
    try:
        socket.create_connection((host, port), timeout=BLOCKED_WITHIN_S).close()
    except TimeoutError:
        return True
    except OSError:
        return False  # refused or unreachable: answered, so not dropped by a firewall
    return False


def hpc_only(cluster: dict[str, Any], data_dir: Path) -> Settings:
    """A gateway whose only tier is `hpc`, with this one cluster (`walled`)."""
    return Settings.model_validate({
        "server": {"detect_ollama": False, "data_dir": str(data_dir)},
        "tiers": {"hpc": {"kind": "hpc", "clusters": {"walled": cluster}},
                  "local": {"enabled": False}, "cloud": {"enabled": False}},
    })


@contextlib.contextmanager
def outside_the_wall(walled_box, walled_relay) -> Iterator[None]:
    """The gateway's environment, for as long as it lives: the walled box's scheduler commands
    first on PATH (the control planes run sbatch, squeue and scancel by name), whether or not
    `slurm_box` (a session fixture) has put its own there before; and SSL_CERT_FILE naming the
    site's CA, which the gateway's relay client and health probe trust, and so do the jobs'
    workers (sbatch passes it on), as at a site with a CA of its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{walled_box.bin}{os.pathsep}{os.environ.get('PATH', '')}")
        mp.setenv("SSL_CERT_FILE", str(walled_relay.ca_file))
        assert shutil.which("sbatch") == str(walled_box.bin / "sbatch")
        yield


@pytest.fixture(scope="module")
def walled_gateway(walled_box, walled_model_server, walled_relay,
                   tmp_path_factory) -> Iterator[tuple[Any, str, dict[str, float]]]:
    """A gateway whose one cluster is the walled box: Parsl pilot jobs on partition gpu."""
    tmp = tmp_path_factory.mktemp("walled-gateway")
    cluster = {
        "control_plane": "parsl",
        "relay_url": walled_relay.url,
        "relay_secret_file": str(walled_relay.secret_file),
        "base_url": walled_model_server.url,  # as the worker inside the namespace reaches it
        "models": [MODEL_NAME],
        "parsl": {
            "provider": "slurm",
            "address": walled_box.host_address,  # where the job's worker dials the interchange
            "max_workers": 4,
            "heartbeat_s": 1,
            "run_dir": str(tmp / "parsl"),
            "provider_options": {"partition": "gpu", "exclusive": False,
                                 "walltime": "00:30:00",
                                 "init_blocks": 1, "min_blocks": 1, "max_blocks": 1},
        },
    }
    settings = hpc_only(cluster, tmp)
    with outside_the_wall(walled_box, walled_relay):
        began = time.monotonic()
        app = create_app(settings)
        server = ServerThread(app).start(timeout=120)
        try:
            seen: dict[str, float] = {}

            def pilot_running() -> bool:
                states = {j["state"] for j in walled_box.jobs()}
                if states:
                    seen.setdefault("gateway_start_to_pilot_queued_s", time.monotonic() - began)
                return "R" in states

            until(pilot_running, 120, "the pilot job to run")
            seen["gateway_start_to_pilot_running_s"] = time.monotonic() - began
            hpc_ready(app, timeout=120)
            seen["gateway_start_to_cluster_ready_s"] = time.monotonic() - began
            yield app, server.url, seen
        finally:
            server.stop()


def test_a_job_runs_inside_the_namespace_and_can_dial_out_only(walled_box, walled_relay,
                                                               tmp_path, record_property):
    """A job submitted through the login node's sbatch sees the namespace's network alone, and
    reaches this side (the relay's port) while this side cannot reach the namespace."""
    out = walled_box.root / f"job-{tmp_path.name}.out"
    probe = (f"import socket, time; print('started', time.time(), flush=True); "
             f"socket.create_connection(('{walled_box.host_address}', {walled_relay.port}), "
             f"timeout=5).close(); print('dialled out')")
    submitted = time.time()
    job_id = walled_box.command("sbatch", "--parsable", "-p", "gpu2", "-o", str(out),
                                "--wrap", f"ip -4 -o addr show; {sys.executable} -c \"{probe}\"")
    until(lambda: job_id.strip() not in walled_box.command("squeue", "-h", "-o", "%i").split(),
          60, "the job to end")
    log = out.read_text()
    interfaces, _, rest = log.partition("started")
    addresses = {line.split()[3] for line in interfaces.splitlines() if " inet " in line}
    assert addresses == {"127.0.0.1/8", f"{walled_box.address}/30"}, log
    assert "dialled out" in rest, log
    started = float(log.split("started", 1)[1].split()[0])
    record_property("sbatch_to_job_started_s", round(started - submitted, 3))
    print(f"sbatch to job started: {started - submitted:.3f} s")


def test_a_hpc_request_streams_the_walled_model_servers_answer(
        walled_gateway, walled_box, walled_model_server, record_property):
    _, url, timings = walled_gateway
    question = "Name three planets of the solar system."
    expected = direct_answer_inside(walled_box, walled_model_server, question)
    assert expected.strip(), "the model server answered nothing"
    began = time.monotonic()
    text, finish, headers, first_token_s = streamed(url, question)
    total_s = time.monotonic() - began
    assert text == expected
    assert finish in ("stop", "length")
    assert headers["x-stream-dispatch"] == "job"
    assert headers["x-stream-transport"] == "relay"
    # The worker that ran it is in a Parsl pilot job that the walled box's Slurm is running.
    pilots = [j for j in walled_box.jobs() if j["partition"] == "gpu" and j["state"] == "R"]
    assert pilots and all(j["name"].startswith("parsl") for j in pilots), walled_box.jobs()
    timings = {**timings, "first_token_s": first_token_s, "answer_s": total_s}
    for name, value in timings.items():
        record_property(name, round(value, 3))
    print(f"walled box bring-up {walled_box.started_in_s:.3f} s (namespace and firewall "
          f"{walled_box.network_in_s:.3f} s); " +
          "; ".join(f"{k} {v:.3f}" for k, v in timings.items()))


def test_the_host_cannot_reach_the_clusters_ports(walled_box, walled_model_server):
    """slurmctld, slurmd and the model server listen on the namespace's address (test below),
    and connections from this side to them are dropped: no answer, not even a refusal."""
    ports = {**walled_box.ports, "model server": walled_model_server.port}
    with ThreadPoolExecutor(len(ports)) as pool:  # each waits out its timeout: side by side
        dropped = dict(zip(ports, pool.map(lambda p: blocked(walled_box.address, p),
                                           ports.values()), strict=True))
    reached = {name: ports[name] for name, was_dropped in dropped.items() if not was_dropped}
    assert not reached, f"reachable from the host: {reached}"
    rules = walled_box.ruleset()
    assert "policy drop" in rules and 'iif "lo" accept' in rules, rules


def test_inside_the_namespace_the_same_ports_answer(walled_box, walled_model_server):
    for name, port in walled_box.ports.items():
        assert walled_box.connects_inside(port), f"{name} ({port}) not reachable inside"
    models = json.loads(walled_box.http_inside(f"{walled_model_server.url}/models"))
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]


def test_sbatch_per_request_through_the_login_node_streams_through_the_wall(
        walled_box, walled_model_server, walled_relay, tmp_path):
    """`control_plane: slurm`: no interchange at all. The gateway runs the scheduler's commands
    on the login node (the wrappers), each request is a Slurm job inside the wall, and the job
    only dials out, to the relay."""
    cluster = {
        "control_plane": "slurm",
        "relay_url": walled_relay.url,
        "relay_secret_file": str(walled_relay.secret_file),
        "base_url": walled_model_server.url,
        "models": [MODEL_NAME],
        "slurm": {"partition": "gpu2", "poll_s": 0.5, "work_dir": str(tmp_path / "jobs")},
    }
    settings = hpc_only(cluster, tmp_path)
    with outside_the_wall(walled_box, walled_relay):
        app = create_app(settings)
        server = ServerThread(app).start(timeout=120)
        try:
            hpc_ready(app, timeout=120)
            question = "Name a large desert."
            expected = direct_answer_inside(walled_box, walled_model_server, question)
            text, _, headers, _ = streamed(server.url, question)
            assert text == expected
            assert headers["x-stream-dispatch"] == "job"
            assert headers["x-stream-transport"] == "relay"
            job = walled_box.command("squeue", "-h", "--states=all",
                                     f"--jobs={headers['x-stream-hpc-job']}", "-o", "%j|%P")
            assert job.strip() == "stream-completion|gpu2"
        finally:
            server.stop()
