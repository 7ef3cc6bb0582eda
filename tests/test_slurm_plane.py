"""The `slurm` control plane: its pure parts, then jobs on the Slurm cluster in a box.

What a scheduler is told (account, comment, walltime, partition) is built by pure functions and
checked here without Slurm; the rest runs real `sbatch`, `squeue` and `scancel`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamllm.config import HPCSettings, SlurmSettings
from streamllm.hpc.control import JobOptions
from streamllm.hpc.slurm import (
    SchedulerError,
    SlurmControlPlane,
    SlurmJobEnded,
    SlurmJobFailed,
    SlurmJobState,
    batch_script,
    comment_for,
    encode_call,
    find_by_ref,
    job_name,
    parse_job_id,
    parse_squeue,
    sbatch_argv,
    slurm_time,
)
from streamllm.hpc.worker import ping, run_completion

# -- pure parts -----------------------------------------------------------------------------------


def test_the_job_name_says_what_the_job_does():
    assert job_name(run_completion) == "stream-completion"
    assert job_name(ping) == "stream-ping"


@pytest.mark.parametrize(("seconds", "expected"), [
    (1, "0-00:01:00"), (60, "0-00:01:00"), (61, "0-00:02:00"), (3720, "0-01:02:00"),
    (90_000, "1-01:00:00"),
])
def test_walltimes_are_rounded_up_to_a_minute_in_sbatch_form(seconds, expected):
    assert slurm_time(seconds) == expected


def test_sbatch_is_told_the_callers_account_and_comment_and_the_sites_options():
    settings = SlurmSettings(partition="gpu", account="stream-svc", walltime="00:10:00",
                             options=["--gres=gpu:1"])
    argv = sbatch_argv(settings, "stream-completion", JobOptions(caller="alice",
                                                                 account="chem-123"), "/w")
    assert argv[0] == "sbatch" and "--parsable" in argv
    assert "--account=chem-123" in argv and "--account=stream-svc" not in argv
    assert "--comment=streamllm caller=alice" in argv  # (no reference given here)
    assert "--partition=gpu" in argv and "--time=00:10:00" in argv
    assert argv[-1] == "--gres=gpu:1"
    # No caller account: the default one; a walltime of its own wins over the plane's.
    argv = sbatch_argv(settings, "stream-agent", JobOptions(walltime_s=600), "/w")
    assert "--account=stream-svc" in argv and "--time=0-00:10:00" in argv


def test_a_comment_keeps_only_printable_text_is_bounded_and_keeps_its_reference():
    assert comment_for(JobOptions(caller="eve\nrm -rf /")) == "streamllm caller=eve?rm -rf /"
    assert comment_for(JobOptions()) == "streamllm"
    long = comment_for(JobOptions(caller="x" * 500), ref="0123abcd4567")
    assert len(long) == 128 and long.endswith("x ref=0123abcd4567")
    listed = "7|streamllm caller=a ref=aaaaaaaaaaaa\n8|streamllm caller=b ref=0123abcd4567\n"
    assert find_by_ref(listed, "0123abcd4567") == "8"
    assert find_by_ref(listed, "ffffffffffff") is None


def test_the_job_id_comes_from_sbatch_parsable_output():
    assert parse_job_id("42\n") == "42"
    assert parse_job_id("42;campus\n") == "42"
    assert parse_job_id("Welcome to login1.\nQuota: 3 of 10 TB\n42\n") == "42"
    with pytest.raises(SchedulerError, match="no job id"):
        parse_job_id("sbatch: error: Batch job submission failed\n")


def test_squeue_states_are_parsed_and_unknown_ones_count_as_going():
    states = parse_squeue("7|RUNNING\n8|CANCELLED\n9|SOMETHING_NEW\n")
    assert states == {"7": SlurmJobState.RUNNING, "8": SlurmJobState.CANCELLED,
                      "9": SlurmJobState.UNKNOWN}
    assert states["8"].ended and not states["7"].ended and not states["9"].ended


def test_the_call_survives_its_trip_and_the_script_holds_no_part_of_it():
    from streamllm.hpc import job_entry

    encoded = encode_call(os.path.join, ("/scratch", "the secret prompt"))
    assert job_entry.run(encoded) == {"ok": True, "value": "/scratch/the secret prompt"}
    script = batch_script("/opt/py env/bin/python", "/w d/x.call", "/w d/x.result.json",
                          setup="source /opt/env/bin/activate")
    assert script.startswith("#!/bin/sh\nsource /opt/env/bin/activate\n")
    assert "export STREAMLLM_CALL_FILE='/w d/x.call'" in script
    assert "exec '/opt/py env/bin/python' -m streamllm.hpc.job_entry" in script
    assert encoded.strip() not in script


def test_sbatch_gets_only_the_environment_it_is_told_to_pass_and_no_requeue():
    argv = sbatch_argv(SlurmSettings(), "stream-ping", JobOptions(), "/w")
    assert "--export=SSL_CERT_FILE,SSL_CERT_DIR" in argv and "--no-requeue" in argv
    assert "--export=NONE" in sbatch_argv(SlurmSettings(export=[]), "stream-ping",
                                          JobOptions(), "/w")


def test_accounts_need_a_plane_that_submits_each_request_itself():
    with pytest.raises(ValueError, match="control_plane: slurm"):
        HPCSettings.model_validate({"control_plane": "parsl", "accounts": {"alice": "a1"}})
    HPCSettings.model_validate({"control_plane": "slurm", "accounts": {"alice": "a1"}})


# -- on the cluster in a box ----------------------------------------------------------------------


@pytest.fixture
def plane(slurm_box, tmp_path) -> Iterator[SlurmControlPlane]:
    plane = SlurmControlPlane(SlurmSettings(partition="gpu", poll_s=0.2, account="svc"),
                              str(tmp_path / "slurm"))
    try:
        yield plane
    finally:
        plane.shutdown()


def job_info(box, job_id: str) -> str:
    return box.command("scontrol", "show", "job", job_id)


def until_state(box, job_id: str, state: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while state not in job_info(box, job_id):
        assert time.monotonic() < deadline, job_info(box, job_id)
        time.sleep(0.05)


@pytest.mark.slurm
def test_a_call_runs_as_a_slurm_job_and_its_result_comes_back(plane, slurm_box):
    started = plane.start(ping, options=JobOptions(caller="alice", account="chem-123"))
    result = started.future.result(timeout=60)
    assert result["pid"] != os.getpid()
    info = job_info(slurm_box, started.job_id)
    assert "JobName=stream-ping" in info and "Account=chem-123" in info
    assert "Comment=streamllm caller=alice ref=" in info and "JobState=COMPLETED" in info
    # Its files are gone once the result is in; the directory is its user's alone.
    assert not list(Path(plane.work_dir).iterdir())
    assert Path(plane.work_dir).stat().st_mode & 0o777 == 0o700


@pytest.mark.slurm
def test_a_call_that_raises_fails_its_future_with_the_error(plane):
    # (a function the node can import: this test module is not installed there)
    future = plane.submit(os.stat, "/nonexistent/the-data")
    with pytest.raises(SlurmJobFailed, match="FileNotFoundError: .* '/nonexistent/the-data'"):
        future.result(timeout=60)


@pytest.mark.slurm
def test_scancel_fails_the_future_naming_the_job(plane, slurm_box):
    started = plane.start(time.sleep, 600)
    until_state(slurm_box, started.job_id, "JobState=RUNNING")
    slurm_box.command("scancel", started.job_id)
    error = started.future.exception(timeout=30)
    assert isinstance(error, SlurmJobEnded)
    assert str(error).startswith(f"Slurm job {started.job_id} ended CANCELLED")
    assert started.job_id not in plane.running


@pytest.mark.slurm
def test_shutdown_cancels_the_jobs_still_running(slurm_box, tmp_path):
    plane = SlurmControlPlane(SlurmSettings(poll_s=0.2), str(tmp_path / "slurm"))
    try:
        started = plane.start(time.sleep, 600)
        until_state(slurm_box, started.job_id, "JobState=RUNNING")
    finally:
        plane.shutdown()
    assert isinstance(started.future.exception(timeout=1), SlurmJobEnded)
    until_state(slurm_box, started.job_id, "JobState=CANCELLED")


@pytest.mark.slurm
def test_a_job_sbatch_refuses_is_an_error_at_once(slurm_box, tmp_path):
    plane = SlurmControlPlane(SlurmSettings(partition="no-such-partition", poll_s=0.2),
                              str(tmp_path / "slurm"))
    try:
        with pytest.raises(SchedulerError, match="sbatch failed"):
            plane.start(ping)
        assert not list(Path(plane.work_dir).iterdir()), "the call's file was left behind"
    finally:
        plane.shutdown()


@pytest.mark.slurm
def test_through_a_login_shell_arguments_stay_whole_and_a_banner_is_ignored(slurm_box, tmp_path):
    """`login_command` as ssh uses it: one command string, parsed again by the login node's
    shell, which may print a banner first. A comment with spaces and shell characters in the
    caller's name arrives whole, and nothing of it is run."""
    login = tmp_path / "login"
    login.write_text('#!/bin/sh\necho "Welcome to login1 (maintenance on Friday)"\n'
                     'exec sh -c "$1"\n')
    login.chmod(0o755)
    plane = SlurmControlPlane(SlurmSettings(poll_s=0.2, login_command=[str(login)]),
                              str(tmp_path / "jobs"))
    try:
        caller = "o'brien; touch /tmp/pwned-$$ $(id)"
        started = plane.start(ping, options=JobOptions(caller=caller, account="chem-123"))
        assert started.future.result(timeout=60)["pid"] != os.getpid()
        comment = slurm_box.command("squeue", "-h", "--states=all",
                                    f"--jobs={started.job_id}", "-o", "%k").strip()
        assert comment.startswith(f"streamllm caller={caller} ref=")
        assert not list(Path("/tmp").glob("pwned-*"))
    finally:
        plane.shutdown()


@pytest.mark.slurm
def test_a_job_queued_by_an_sbatch_that_then_failed_is_followed_not_started_twice(
        slurm_box, tmp_path):
    """The fault a busy controller causes: the job is queued, and sbatch still fails ("Socket
    timed out on send/recv operation"). Here a login shell runs sbatch for real and then
    reports that failure instead of its output."""
    login = tmp_path / "login"
    login.write_text('#!/bin/sh\ncase "$1" in\n  sbatch*) sh -c "$1" >/dev/null; '
                     'echo "sbatch: error: Batch job submission failed: Socket timed out on '
                     'send/recv operation" >&2; exit 1;;\n  *) exec sh -c "$1";;\nesac\n')
    login.chmod(0o755)
    plane = SlurmControlPlane(SlurmSettings(poll_s=0.2, login_command=[str(login)]),
                              str(tmp_path / "jobs"))
    try:
        before = set(slurm_box.command("squeue", "-h", "--states=all", "-o", "%i").split())
        started = plane.start(ping)
        assert started.future.result(timeout=60)["pid"] != os.getpid()
        after = set(slurm_box.command("squeue", "-h", "--states=all", "-o", "%i").split())
        assert after - before == {started.job_id}, "one job, the one sbatch did queue"
    finally:
        plane.shutdown()
