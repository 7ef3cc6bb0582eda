"""Fitting conversations to a window (pure): what is kept, summarised and trimmed, and the
guarantee that the result fits."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streamllm.context.fit import (
    FitParams,
    assemble,
    minimum_tokens,
    plan_fit,
    prefix_hashes,
    split,
)
from streamllm.context.tokens import Calibration, TokenCounter


def chat(n: int, words: int = 30) -> list[dict]:
    out: list[dict] = [{"role": "system", "content": "You are a helpful research assistant."}]
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        out.append({"role": role, "content": f"turn {i} " + "lorem ipsum dolor " * words})
    return out


def plan(messages, window=2000, reserve=200, cached=None, owner=None, verbatim=0.5, cap=300):
    counter = TokenCounter()
    _, turns = split(messages)
    return plan_fit(messages, counter, window, reserve, cached or {},
                    FitParams(verbatim, cap), prefix_hashes(turns, owner)), counter


def test_a_conversation_that_fits_is_sent_whole():
    p, counter = plan(chat(3))
    fitted = assemble(p, None, counter)
    assert p.action == "full" and fitted.action == "full"
    assert fitted.messages == chat(3)


def test_older_turns_are_summarised_and_recent_ones_kept_word_for_word():
    messages = chat(41)
    p, counter = plan(messages)
    assert p.action == "summarized" and p.needs_summary and p.base == 0
    assert p.turns[p.boundary]["role"] == "user", "the recent part starts at a user turn"
    fitted = assemble(p, "the user is studying lorem ipsum", counter)
    assert fitted.action == "summarized"
    assert fitted.messages[0] == messages[0], "system messages stay first, word for word"
    assert "Summary of the earlier conversation" in fitted.messages[1]["content"]
    assert fitted.messages[2:] == messages[1 + p.boundary:]
    assert fitted.tokens_after <= p.budget < fitted.tokens_before
    # Aging happens in a block: the recent part takes at most its share of the budget.
    assert counter.count(fitted.messages[2:]) <= p.budget * 0.5


def test_the_next_turns_reuse_the_stored_summary_until_it_no_longer_leaves_room():
    messages = chat(41)
    first, _counter = plan(messages)
    cached = {first.boundary: 100}
    needed_again = 0
    for extra in range(2, 30, 2):
        later = chat(41 + extra)
        p, _ = plan(later, cached=cached)
        assert p.hashes[first.boundary] == first.hashes[first.boundary], "same prefix, same id"
        if p.needs_summary:
            needed_again = extra
            assert p.base == first.boundary, "it extends the summary it has"
            break
        assert p.boundary == first.boundary
    assert needed_again >= 4, "several turns pass before the next block ages"


def test_summaries_are_per_owner():
    turns = split(chat(5))[1]
    assert prefix_hashes(turns, "alice")[3] != prefix_hashes(turns, "bob")[3]
    assert prefix_hashes(turns, "alice")[3] == prefix_hashes(turns, "alice")[3]


def test_a_tool_exchange_is_never_split():
    messages = [{"role": "user", "content": "q " * 300},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "r " * 300},
                {"role": "assistant", "content": "a " * 300},
                {"role": "user", "content": "and now?"}]
    p, counter = plan(messages, window=700, reserve=100)
    assert p.turns[p.boundary]["role"] == "user"
    fitted = assemble(p, "summary", counter)
    assert all(m.get("role") != "tool" or i > 0 for i, m in enumerate(fitted.messages))


def test_when_the_summary_is_not_enough_the_oldest_recent_turns_are_trimmed():
    messages = chat(13, words=20)
    p, counter = plan(messages, window=1000, reserve=100)
    assert p.action == "summarized"
    # A summary longer than planned (a model that ignored its limit) leaves too little room.
    fitted = assemble(p, "summary " * 260, counter)
    assert fitted.action == "trimmed" and fitted.trimmed > 0
    assert fitted.messages[-1] == messages[-1], "the latest user turn always stays"
    assert "Summary of" in fitted.messages[1]["content"]
    assert fitted.tokens_after <= p.budget


def test_the_summary_itself_goes_before_the_latest_turn_does():
    messages = chat(5, words=20) + [{"role": "user", "content": "x " * 1200}]
    p, counter = plan(messages, window=1000, reserve=100)
    fitted = assemble(p, "summary " * 150, counter)
    assert fitted.action == "trimmed"
    assert fitted.messages == [messages[0], messages[-1]]
    assert fitted.tokens_after <= p.budget


def test_a_latest_turn_larger_than_the_window_cannot_fit():
    messages = chat(3) + [{"role": "user", "content": "y " * 5000}]
    p, counter = plan(messages, window=1000, reserve=100)
    assert assemble(p, "summary", counter) is None
    assert minimum_tokens(messages, counter) > 1000


def test_calibration_learns_a_models_rate():
    counter = TokenCounter()
    messages = [{"role": "user", "content": "word " * 400}]  # 2000 characters
    for _ in range(8):
        counter.observe(messages, 400 + 4 + 2)  # the backend counts one token per word
    assert abs(counter.calibration.tokens_per_char - 0.2) < 0.01
    assert counter.margin == 0.05
    assert not counter.observe([{"role": "user", "content": "hi"}], 3), "too little to learn"
    assert not TokenCounter(Calibration()).observe(messages, 0)


conversation = st.lists(
    st.tuples(st.sampled_from(["user", "assistant", "system", "tool"]),
              st.text(alphabet="ab c.\n1", min_size=0, max_size=400)),
    min_size=1, max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(conversation, st.integers(300, 4000), st.integers(16, 400), st.integers(0, 600),
       st.sampled_from([0.2, 0.5, 0.8]), st.booleans())
def test_the_fitted_result_always_fits(raw, window, reserve, summary_len, share, with_cache):
    messages = [{"role": r, "content": t} for r, t in raw]
    if not any(m["role"] == "user" for m in messages):
        messages.append({"role": "user", "content": "question?"})
    counter = TokenCounter()
    _, turns = split(messages)
    hashes = prefix_hashes(turns)
    users = [i for i, m in enumerate(turns) if m["role"] == "user"]
    cached = {users[len(users) // 2]: summary_len // 4} if with_cache and users[0] != users[
        len(users) // 2] else {}
    p = plan_fit(messages, counter, window, reserve, cached, FitParams(share, 200), hashes)
    fitted = assemble(p, "s" * summary_len if p.action == "summarized" else None, counter)
    if fitted is None:
        assert minimum_tokens(messages, counter) > p.budget or p.action == "impossible"
        return
    assert counter.count(fitted.messages) <= p.budget
    assert fitted.tokens_after == counter.count(fitted.messages)
    latest_user = [m for m in messages if m["role"] == "user"][-1]
    assert latest_user in fitted.messages
    assert [m for m in fitted.messages if m["role"] in ("system",) and not m["content"].startswith(
        "Summary of")] == [m for m in messages if m["role"] == "system"] or fitted.action != "full"
