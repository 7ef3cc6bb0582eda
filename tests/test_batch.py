"""The Batch API through the official `openai` SDK, on SQLite and on PostgreSQL: files, batches
across tiers, per-line errors, budgets, cancellation, malformed input, isolation between keys,
resuming after a restart, the usage ledger; and the pieces underneath (input validation, the
store's exactly-once results, a chunk runner that dies halfway)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from streamllm.batch.input import read_input
from streamllm.batch.runner import Chunk, LineResult
from streamllm.sim.content import answer_text
from streamllm.store import Store
from streamllm.store import batches as records
from streamllm.store.batches import LineOutcome, LineRef
from tests.conftest import tier_config

ALICE, BOB, CAROL = "sk-alice-0123456789", "sk-bob-0123456789", "sk-carol-0123456789"
ENDPOINT = "/v1/chat/completions"
FINISHED = ("completed", "failed", "cancelled", "expired")


def ask(n: int | str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question number {n}: what is in the data?"}]


def line(custom_id: str, model: str, n: int | str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
            "body": {"model": model, "messages": ask(n), **body}}


def write_jsonl(path: Path, items: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                            for x in items))
    return path


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


class Deployment:
    """Two simulated tiers (local: local-m, and broken-m which always answers 500; cloud:
    cloud-m at $1 per 8 answer tokens) behind a gateway with three keys, whose store is
    `database_url` and whose data directory survives restarts."""

    def __init__(self, start_sim, start_gateway, database_url: str, data_dir: Path):
        self.local = start_sim({"local-m": {"answer_tokens": 8},
                                "broken-m": {"error_rate": 1.0}})
        self.cloud = start_sim({"cloud-m": {"answer_tokens": 8}})
        self._start_gateway = start_gateway
        self.config = {
            "server": {
                "database_url": database_url, "data_dir": str(data_dir),
                "api_keys": [{"key": ALICE, "name": "alice"}, {"key": BOB, "name": "bob"},
                             {"key": CAROL, "name": "carol", "budget_usd": 2.5}],
            },
            "tiers": {
                "local": tier_config(self.local.url, "local-m",
                                     models=["local-m", "broken-m"]),
                "cloud": tier_config(self.cloud.url, "cloud-m",
                                     prices={"*": {"output_per_mtok": 1e6 / 8}}),
                "hpc": {"enabled": False},
            },
        }
        self.gateway = None

    def start(self, **batch: Any) -> Deployment:
        self.config["batch"] = {**self.config.get("batch", {}), **batch}
        self.gateway = self._start_gateway(self.config)
        return self

    def stop(self) -> None:
        self.gateway.server.stop()

    def sdk(self, key: str = ALICE) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.v1, api_key=key, max_retries=0)

    def get(self, path: str, key: str = ALICE) -> httpx.Response:
        return httpx.get(f"{self.gateway.url}{path}", timeout=10,
                         headers={"authorization": f"Bearer {key}"})

    def submit(self, path: Path, key: str = ALICE, **extra: Any):
        client = self.sdk(key)
        with open(path, "rb") as f:
            uploaded = client.files.create(file=f, purpose="batch")
        return client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,
                                     completion_window="24h", **extra)


@pytest.fixture
def deployment(start_sim, start_gateway, database_url, tmp_path) -> Deployment:
    return Deployment(start_sim, start_gateway, database_url, tmp_path / "data")


def wait_for(client: openai.OpenAI, batch_id: str, done=lambda b: b.status in FINISHED,
             timeout: float = 60.0):
    """Poll the batch until `done(batch)` holds, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.05)


def files_of(client: openai.OpenAI, batch) -> tuple[list[dict], list[dict]]:
    out = jsonl(client.files.content(batch.output_file_id).text) if batch.output_file_id \
        else []
    err = jsonl(client.files.content(batch.error_file_id).text) if batch.error_file_id else []
    return out, err


def content_of(result: dict[str, Any]) -> str:
    return result["response"]["body"]["choices"][0]["message"]["content"]


# -- end to end ---------------------------------------------------------------------------------


def test_a_thousand_lines_across_two_tiers_each_get_exactly_one_right_answer(
        deployment, tmp_path):
    deployment.start()
    items = [line(f"req-{i}", "local" if i % 2 else "cloud/cloud-m", i) for i in range(1000)]
    batch = deployment.submit(write_jsonl(tmp_path / "in.jsonl", items),
                              metadata={"project": "survey"})
    assert batch.status == "validating" and batch.metadata == {"project": "survey"}
    client = deployment.sdk()
    batch = wait_for(client, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 1000
    assert batch.request_counts.completed == 1000 and batch.request_counts.failed == 0
    assert batch.error_file_id is None
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    out, _ = files_of(client, batch)
    assert sorted(r["custom_id"] for r in out) == sorted(x["custom_id"] for x in items)
    for result in out:
        i = int(result["custom_id"].removeprefix("req-"))
        model = "local-m" if i % 2 else "cloud-m"
        assert result["error"] is None and result["response"]["status_code"] == 200
        assert result["response"]["body"]["model"] == model
        assert content_of(result) == answer_text(model, ask(i), 8)
        assert result["id"].startswith("batch_req_")
    assert len(deployment.local.sim.log) == 500 and len(deployment.cloud.sim.log) == 500

    # Every line is in the caller's ledger, on the tier that ran it, with the backend's usage.
    usage = deployment.get("/v1/usage?days=1").json()
    assert usage["totals"]["requests"] == 1000
    assert {t: v["requests"] for t, v in usage["per_tier"].items()} == {"local": 500,
                                                                      "cloud": 500}
    assert usage["totals"]["completion_tokens"] == 8000
    assert usage["per_tier"]["cloud"]["cost_usd"] == pytest.approx(500.0)
    row = deployment.get(f"/v1/usage/requests/{out[0]['response']['request_id']}").json()
    assert row["outcome"] == "completed" and row["caller"] == "alice"
    assert row["route_reason"].startswith("batch")
    assert deployment.get(f"/v1/usage/requests/{out[0]['id']}", BOB).status_code == 404

    listed = client.batches.list(limit=5)
    assert [b.id for b in listed.data] == [batch.id] and not listed.has_more


def test_bad_lines_fail_alone_with_their_codes_while_the_others_succeed(deployment, tmp_path):
    deployment.start()
    items = [line(f"ok-{i}", "local", i) for i in range(5)]
    items += [
        line("bad-body", "local", "x", temperature=5),  # not a valid chat request
        line("backend-500", "local/broken-m", "y"),  # the backend answers 500
        line("no-such-model", "no-such-model", "z"),
    ]
    client = deployment.sdk()
    batch = wait_for(client, deployment.submit(write_jsonl(tmp_path / "in.jsonl", items)).id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (8, 5, 3)
    out, err = files_of(client, batch)
    assert sorted(r["custom_id"] for r in out) == [f"ok-{i}" for i in range(5)]
    errors = {r["custom_id"]: r for r in err}
    assert set(errors) == {"bad-body", "backend-500", "no-such-model"}
    expect = {"bad-body": (400, "invalid_request_error"), "backend-500": (502, "backend_error"),
              "no-such-model": (404, "model_not_found")}
    for custom_id, (status, code) in expect.items():
        got = errors[custom_id]
        assert got["response"]["status_code"] == status, got
        assert got["error"]["code"] == code, got
        assert got["response"]["body"]["error"]["code"] == code
        assert got["error"]["message"]
    assert "temperature" in errors["bad-body"]["error"]["message"]
    # Only the lines that could run reached a backend; the invalid one never did.
    assert len(deployment.local.sim.log) == 6
    assert [r.model for r in deployment.local.sim.log].count("broken-m") == 1


def test_a_budget_covers_the_lines_it_can_and_refuses_the_rest(deployment, tmp_path):
    deployment.start()
    # Each cloud answer costs $1 (8 tokens); carol's budget is $2.50: two lines fit.
    items = [line(f"c-{i}", "cloud", i, max_tokens=8) for i in range(4)]
    client = deployment.sdk(CAROL)
    batch = wait_for(client, deployment.submit(write_jsonl(tmp_path / "in.jsonl", items),
                                               CAROL).id)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 2)
    out, err = files_of(client, batch)
    assert len(out) == 2 and len(err) == 2
    assert {r["error"]["code"] for r in err} == {"insufficient_quota"}
    assert {r["response"]["status_code"] for r in err} == {429}
    assert len(deployment.cloud.sim.log) == 2, "a refused line reached no backend"
    usage = deployment.get("/v1/usage?days=1", CAROL).json()
    assert usage["totals"]["cost_usd"] == pytest.approx(2.0)


def test_cancelling_stops_the_batch_and_keeps_what_finished(deployment, tmp_path):
    deployment.local.model("local-m").ttft_ms = 150
    deployment.start(chunk_size=10, chunks_at_once=1, lines_at_once=2)
    items = [line(f"slow-{i}", "local", i) for i in range(100)]
    client = deployment.sdk()
    batch = deployment.submit(write_jsonl(tmp_path / "in.jsonl", items))
    wait_for(client, batch.id, lambda b: b.request_counts.completed >= 4)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait_for(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    done = batch.request_counts.completed
    assert 4 <= done < 100 and batch.request_counts.failed == 0
    out, err = files_of(client, batch)
    assert len(out) == done
    for result in out:
        assert content_of(result) == answer_text(
            "local-m", ask(int(result["custom_id"].removeprefix("slow-"))), 8)
    assert {r["error"]["code"] for r in err} == {"batch_cancelled"}
    assert all(r["response"] is None for r in err)
    assert sorted(r["custom_id"] for r in out + err) == sorted(x["custom_id"] for x in items)
    # What was in flight was stopped, and nothing new reached the backend since: every request
    # the backend saw has ended, and the next request is the only new one.
    log = deployment.local.sim
    assert log.wait_until(lambda entries: all(e.outcome != "running" for e in entries), 10)
    seen = len(log.log)
    assert seen <= done + 2, "at most the lines in flight were started and not kept"
    deployment.sdk().chat.completions.create(model="local", messages=ask("after"))
    assert len(log.log) == seen + 1
    assert client.batches.cancel(batch.id).status == "cancelled"  # idempotent


def test_an_unusable_input_file_fails_the_batch_with_each_problem_listed(deployment, tmp_path):
    deployment.start(max_lines=5)
    client = deployment.sdk()
    broken = write_jsonl(tmp_path / "broken.jsonl", [
        line("a", "local", 1),
        "this is not json",
        line("a", "local", 2),  # the same custom_id again
        {**line("c", "local", 3), "url": "/v1/embeddings"},
        {**line("d", "local", 4), "method": "GET"},
    ])
    batch = wait_for(client, deployment.submit(broken).id)
    assert batch.status == "failed" and batch.failed_at
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "invalid_url"),
        (5, "invalid_method")]
    assert batch.output_file_id is None and batch.error_file_id is None

    too_long = write_jsonl(tmp_path / "long.jsonl", [line(f"n{i}", "local", i)
                                                    for i in range(6)])
    batch = wait_for(client, deployment.submit(too_long).id)
    assert batch.status == "failed"
    assert [(e.line, e.code) for e in batch.errors.data] == [(6, "too_many_lines")]
    assert len(deployment.local.sim.log) == 0

    uploaded = client.files.create(file=("ok.jsonl", b"{}\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                              completion_window="24h")
    assert err.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,
                              completion_window="48h")
    assert err.value.body["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-" + "0" * 32, endpoint=ENDPOINT,
                              completion_window="24h")


def test_another_key_can_neither_see_nor_touch_a_batch_or_its_files(deployment, tmp_path):
    deployment.local.model("local-m").ttft_ms = 100
    deployment.start(chunks_at_once=1, lines_at_once=1)
    items = [line(f"p-{i}", "local", i) for i in range(30)]
    batch = deployment.submit(write_jsonl(tmp_path / "in.jsonl", items))
    alice, bob = deployment.sdk(ALICE), deployment.sdk(BOB)
    for attempt in (
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
        lambda: bob.files.retrieve(batch.input_file_id),
        lambda: bob.files.content(batch.input_file_id),
        lambda: bob.files.delete(batch.input_file_id),
        lambda: bob.batches.create(input_file_id=batch.input_file_id, endpoint=ENDPOINT,
                                   completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert bob.batches.list().data == [] and bob.files.list().data == []
    with pytest.raises(openai.AuthenticationError):
        deployment.sdk("sk-nobody-0123456789").batches.list()
    # While it runs, its input file cannot be deleted from under it.
    with pytest.raises(openai.BadRequestError):
        alice.files.delete(batch.input_file_id)
    alice.batches.cancel(batch.id)
    done = wait_for(alice, batch.id)
    assert done.status == "cancelled"
    for file_id in (done.output_file_id, done.error_file_id):
        if file_id:
            with pytest.raises(openai.NotFoundError):
                bob.files.content(file_id)
    assert alice.files.delete(batch.input_file_id).deleted


def test_a_restart_mid_batch_resumes_without_running_any_line_twice(deployment, tmp_path):
    deployment.local.model("local-m").ttft_ms = 100
    deployment.start(chunk_size=10, chunks_at_once=2, lines_at_once=3)
    items = [line(f"r-{i}", "local", i) for i in range(90)]
    client = deployment.sdk()
    batch = deployment.submit(write_jsonl(tmp_path / "in.jsonl", items))
    wait_for(client, batch.id, lambda b: b.request_counts.completed >= 15)
    deployment.stop()  # a clean stop: requests in flight finish and are kept
    before = len(deployment.local.sim.log)
    assert before < 90, "the batch was to be stopped midway"

    deployment.start()  # the same store and data directory
    client = deployment.sdk()
    batch = wait_for(client, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (90, 0)
    out, _ = files_of(client, batch)
    assert sorted(r["custom_id"] for r in out) == sorted(x["custom_id"] for x in items)
    for result in out:
        assert content_of(result) == answer_text(
            "local-m", ask(int(result["custom_id"].removeprefix("r-"))), 8)
    # The backend saw each line exactly once, across both runs of the gateway.
    asked = Counter(e.body["messages"][0]["content"] for e in deployment.local.sim.log)
    assert len(deployment.local.sim.log) == 90 and max(asked.values()) == 1
    assert all(e.outcome == "completed" for e in deployment.local.sim.log)
    assert deployment.get("/v1/usage?days=1").json()["totals"]["requests"] == 90


def test_files_round_trip_and_an_upload_over_the_limit_is_refused(deployment, tmp_path):
    deployment.start(max_file_bytes=2000)
    client = deployment.sdk()
    small = write_jsonl(tmp_path / "small.jsonl", [line("s", "local", 1)])
    with open(small, "rb") as f:
        made = client.files.create(file=f, purpose="batch")
    assert made.id.startswith("file-") and made.bytes == small.stat().st_size
    assert made.filename == "small.jsonl" and made.status == "processed"
    assert client.files.retrieve(made.id).bytes == made.bytes
    assert client.files.content(made.id).content == small.read_bytes()
    assert [f.id for f in client.files.list(purpose="batch").data] == [made.id]
    # Stored by id under the data directory, never by the name it was uploaded with.
    assert (tmp_path / "data" / "files" / made.id).read_bytes() == small.read_bytes()

    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=("big.jsonl", b"x" * 5000), purpose="batch")
    assert err.value.status_code == 413
    chunked = httpx.post(f"{deployment.gateway.v1}/files", timeout=10,  # no Content-Length
                         headers={"authorization": f"Bearer {ALICE}",
                                  "content-type": "multipart/form-data; boundary=b"},
                         content=iter([  # well-formed up to its size: the size is its only fault
                             (b'--b\r\ncontent-disposition: form-data; name="file"; '
                             b'filename="big.jsonl"\r\n\r\n'), b"x" * 100_000]))
    assert chunked.status_code == 413
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.jsonl", b"{}"), purpose="fine-tune")
    odd = client.files.create(file=("../../etc/passwd", b"{}\n"), purpose="batch")
    assert odd.filename == "passwd" and not (tmp_path / "etc").exists()
    deleted = client.files.delete(made.id)
    assert deleted.deleted and deleted.id == made.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made.id)
    assert not (tmp_path / "data" / "files" / made.id).exists()


# -- underneath ---------------------------------------------------------------------------------


def test_reading_an_input_file_keeps_bad_bodies_as_line_errors():
    items = [json.dumps(line("a", "local", 1)), json.dumps(line("b", "cloud", 2, top_p=7)),
             "", json.dumps({**line("c", "x", 3), "body": {"messages": ask(3)}})]
    raw = io.BytesIO("\n".join(items).encode() + b"\n")
    lines, errors = read_input(raw, ENDPOINT, 10)
    assert errors == []
    assert [(x.line, x.custom_id, x.model) for x in lines] == [
        (1, "a", "local"), (2, "b", "cloud"), (4, "c", "auto")]
    assert lines[0].invalid is None and lines[2].invalid is None
    assert lines[1].invalid is not None and lines[1].invalid.param == "top_p"
    data = raw.getvalue()
    for x in lines:  # each line can be found again by its offset
        assert json.loads(data[x.offset : x.offset + x.length])["custom_id"] == x.custom_id
    assert read_input(io.BytesIO(b"\n\n"), ENDPOINT, 10)[1][0].code == "empty_file"
    assert read_input(io.BytesIO(b'{"custom_id": "a"}\n'), ENDPOINT, 10)[1][0].code == \
        "invalid_method"


async def test_a_lines_result_is_stored_once_however_often_it_arrives(database_url):
    store = await Store.open(database_url)
    try:
        now = time.time()
        await records.insert_batch(store, {
            "id": "batch_x", "caller": None, "key_id": None, "rights": "null",
            "endpoint": ENDPOINT, "completion_window": "24h", "input_file_id": "file-x",
            "status": "validating", "meta": None, "errors": None, "output_file_id": None,
            "error_file_id": None, "total": 0, "completed": 0, "failed": 0,
            "created_at": now, "expires_at": now + 86400, "in_progress_at": None,
            "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None, "owner": None,
            "lease_until": None})
        refs = [LineRef(f"l{i}", i + 1, f"batch_req_{i}", "local", i * 10, 10) for i in range(3)]
        assert await records.start_lines(store, "batch_x", refs, [], now)
        assert not await records.start_lines(store, "batch_x", refs, [], now)

        def ok(custom_id: str, text: str) -> LineOutcome:
            return LineOutcome(custom_id, 200, json.dumps({"text": text}), None, None, "local",
                               now)

        first = await asyncio.gather(
            records.record_results(store, "batch_x", [ok("l0", "first"), ok("l1", "first")]),
            records.record_results(store, "batch_x", [ok("l0", "second")]))
        assert sorted(first[0] + first[1]) == ["l0", "l1"]
        again = await records.record_results(
            store, "batch_x", [ok("l1", "again"), LineOutcome("l2", 502, "{}", "backend_error",
                                                              "down", "local", now)])
        assert again == ["l2"]
        batch = await records.batch_by_id(store, "batch_x")
        assert (batch.total, batch.completed, batch.failed) == (3, 2, 1)
        assert await records.pending_lines(store, "batch_x") == []
        stored = {r["custom_id"]: r async for r in records.all_lines(store, "batch_x")}
        assert json.loads(stored["l1"]["response"]) == {"text": "first"}
    finally:
        await store.close()


class DiesHalfway:
    """A chunk runner that answers some lines and then dies: on its first try after two
    lines, on its second after one line (which it also repeats)."""

    name = "dies-halfway"

    def __init__(self) -> None:
        self.chunks: list[list[str]] = []

    def parallel(self) -> int:
        return 1

    async def run_chunk(self, chunk: Chunk, cancel: asyncio.Event) -> AsyncIterator[LineResult]:
        self.chunks.append([x.custom_id for x in chunk.lines])
        answered = chunk.lines[: 2 if chunk.attempt == 1 else 1]
        for x in answered:
            yield LineResult(x.custom_id, 200, {"choices": [], "attempt": chunk.attempt}, None,
                             {"prompt_tokens": 1, "completion_tokens": 1}, "local", "local-m")
        if chunk.attempt == 2:
            yield LineResult(answered[0].custom_id, 200, {"again": True}, None, None, "local",
                             "local-m")
        raise RuntimeError("the node running this chunk went away")


def test_a_chunk_that_dies_is_retried_once_then_its_lines_fail(deployment, tmp_path):
    deployment.start(chunk_size=5)
    runner = DiesHalfway()
    deployment.gateway.app.state.runtime.batch_runners["local"] = runner  # "local" lines
    items = [line(f"d-{i}", "local", i) for i in range(5)]
    client = deployment.sdk()
    batch = wait_for(client, deployment.submit(write_jsonl(tmp_path / "in.jsonl", items)).id)
    assert batch.status == "completed"
    assert runner.chunks == [[f"d-{i}" for i in range(5)], ["d-2", "d-3", "d-4"]]
    out, err = files_of(client, batch)
    assert {r["custom_id"]: r["response"]["body"].get("attempt") for r in out} == {
        "d-0": 1, "d-1": 1, "d-2": 2}
    assert sorted(r["custom_id"] for r in err) == ["d-3", "d-4"]
    assert {r["error"]["code"] for r in err} == {"runner_failed"}
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 2)


def test_a_batch_past_its_completion_window_expires_with_what_finished(deployment, tmp_path):
    deployment.local.model("local-m").ttft_ms = 100
    deployment.start(chunk_size=5, chunks_at_once=1, lines_at_once=1, lease_s=0.3)
    items = [line(f"e-{i}", "local", i) for i in range(40)]
    client = deployment.sdk()
    batch = deployment.submit(write_jsonl(tmp_path / "in.jsonl", items))
    wait_for(client, batch.id, lambda b: b.request_counts.completed >= 2)
    service = deployment.gateway.app.state.runtime.batches
    service.clock = lambda: time.time() + 2 * 86400  # a day and more later
    batch = wait_for(client, batch.id)
    assert batch.status == "expired" and batch.expired_at >= batch.expires_at
    out, err = files_of(client, batch)
    assert len(out) == batch.request_counts.completed >= 2
    assert {r["error"]["code"] for r in err} == {"batch_expired"}
    assert len(out) + len(err) == 40


def test_revoking_the_key_cancels_its_batches(deployment, database_url, tmp_path):
    from streamllm.store import keys

    async def make() -> str:
        store = await Store.open(database_url)
        try:
            return (await keys.create_key(store, "dora"))[1]
        finally:
            await store.close()

    async def revoke() -> None:
        store = await Store.open(database_url)
        try:
            assert await keys.revoke_keys(store, "dora") == 1
        finally:
            await store.close()

    dora = asyncio.run(make())
    deployment.local.model("local-m").ttft_ms = 100
    deployment.start(chunks_at_once=1, lines_at_once=1, lease_s=0.3)
    items = [line(f"k-{i}", "local", i) for i in range(40)]
    client = deployment.sdk(dora)
    batch = deployment.submit(write_jsonl(tmp_path / "in.jsonl", items), dora)
    wait_for(client, batch.id, lambda b: b.request_counts.completed >= 1)
    asyncio.run(revoke())
    # The key no longer works, so its owner's batch is read straight from the store.

    async def status() -> str:
        store = await Store.open(database_url)
        try:
            return (await records.batch_by_id(store, batch.id)).status
        finally:
            await store.close()

    deadline = time.monotonic() + 30
    while asyncio.run(status()) != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert len(deployment.local.sim.log) < 40
