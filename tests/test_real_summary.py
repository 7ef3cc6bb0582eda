"""Token counts and summaries on the real model (SmolLM2-135M-Instruct behind llama-cpp-python's
server): the GGUF's own tokenizer counts what the server counts, and a conversation longer than
the model's 2048-token window is summarised by that model and then fits it."""

from __future__ import annotations

import sys

import httpx2 as httpx
import openai
import pytest

from streamllm import realmodel
from streamllm.context.tokens import GGUFTokenizer, TokenCounter, load_tokenizer
from streamllm.errors import ConfigError
from tests.conftest import unavailable

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(300)]

WHERE = "tiers.local.tokenizer"
FACTS = ["Our allocation is PROJ-4471 on the Aurora-7 cluster.",
         "The budget is $12,500 for the year, approved by Dr. Okafor on March 14.",
         "Results must go to /scratch/lab/run42 and the deadline is Friday 18:00.",
         "We decided on 4 nodes with 8 GPUs each and a checkpoint every 30 minutes."]
TOPICS = ["the Lustre scratch quota", "our CUDA 12 build", "the Slurm fairshare policy",
          "node gpu017's ECC errors", "the weekly Globus transfer", "MPI rank placement",
          "the conda environment for the lab", "checkpoint intervals for the solver"]


def conversation(turns: int) -> list[dict]:
    """A system message, `turns` user/assistant exchanges (facts planted in the first ones) and
    a last question."""
    messages = [{"role": "system", "content": "You help a research computing group. Be brief."}]
    for i in range(turns):
        topic = TOPICS[i % len(TOPICS)]
        fact = f" {FACTS[i]}" if i < len(FACTS) else ""
        messages.append({"role": "user", "content":
                         f"Turn {i + 1}: about {topic}, we saw the job slow down again on Tuesday "
                         f"and I logged the timings in the notebook.{fact} What should I check "
                         "next?"})
        messages.append({"role": "assistant", "content":
                         f"For {topic}, first compare the timings with last week's baseline, "
                         "then look at the scheduler logs and the node health checks. If the "
                         "slowdown is on every node, it is likely the filesystem; if it is on "
                         "one node, drain it and open a ticket with the admins."})
    messages.append({"role": "user", "content": "Where must the results go?"})
    return messages


@pytest.fixture(scope="module")
def gguf() -> str:
    why = realmodel.why_not_available()
    if why:
        unavailable(why)
    return str(realmodel.model_path())


@pytest.fixture(scope="module")
def counter(gguf) -> TokenCounter:
    return TokenCounter(tokenizer=load_tokenizer(gguf, WHERE))


def server_prompt_tokens(client: openai.OpenAI, messages: list[dict]) -> int:
    reply = client.chat.completions.create(model=realmodel.MODEL_NAME, messages=messages,
                                           max_tokens=1, temperature=0)
    return reply.usage.prompt_tokens


CONVERSATIONS = {
    # The template adds its default system prompt (21 tokens) when the first message is not one.
    "one user message": [{"role": "user", "content": "Hello there, how are you?"}],
    "system and user": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hello there, how are you?"}],
    "no system message": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "\ncode:\n```py\nx = 1\n```"}],
    "whitespace, numbers, accents, CJK and emoji": [
        {"role": "system", "content": "You help a research computing group."},
        {"role": "user", "content": "What is Slurm's fairshare? Réponds en français 🙂"},
        {"role": "assistant", "content": "C'est un facteur de priorité.\n\n  Il décroît.  "},
        {"role": "user", "content": "  And the quota on /scratch/lab? 12,500 GB! 配额  \n"}],
    # What fitting sends: the system message, the summary as a second one, the recent turns.
    "summarized": [
        {"role": "system", "content": "You help a research computing group."},
        {"role": "system", "content": "Summary of the earlier conversation (12 messages):\n"
                                      "- The user's allocation is PROJ-4471."},
        {"role": "user", "content": "Where must the results go?"},
        {"role": "assistant", "content": "To /scratch/lab/run42, by Friday 18:00."},
        {"role": "user", "content": "Thanks. And the budget?"}],
    "fifteen exchanges": conversation(15),
}


def test_the_gguf_tokenizer_counts_what_the_server_counts(model_server, counter):
    """Never fewer tokens than the server's usage.prompt_tokens, and at most 1 % (+1) more:
    text is tokenised message by message, so a merge across a message's edge in the rendered
    prompt (seen: one token in the accents case) makes the count a little high, never low."""
    client = openai.OpenAI(base_url=model_server.url, api_key="unused", max_retries=0)
    seen = {}
    for name, messages in CONVERSATIONS.items():
        real = server_prompt_tokens(client, messages)
        counted = counter.count(messages)
        seen[name] = (counted, real)
        assert real <= counted <= real + 1 + real // 100, (name, counted, real)
    exact = [name for name, (counted, real) in seen.items() if counted == real]
    assert len(exact) >= len(seen) - 1, seen


def test_the_chat_template_is_measured_from_the_gguf(counter):
    """SmolLM2's ChatML: <|im_start|>role\\n ... <|im_end|>\\n around each message ("assistant"
    is two tokens), <|im_start|>assistant\\n for the answer, and a default system prompt."""
    overhead = counter.overhead
    assert overhead.by_role == {"user": 5, "assistant": 6, "system": 5}
    assert overhead.priming == 4
    assert overhead.without_system == 21
    assert counter.count_text("Hello world") == 2


def test_text_that_looks_like_a_special_token_is_not_undercounted(model_server, counter):
    """The server parses special tokens in the rendered prompt, message text included; the
    counter reads text as text, which takes more tokens."""
    client = openai.OpenAI(base_url=model_server.url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Say <|im_end|> and then <|im_start|>system."}]
    assert counter.count(messages) >= server_prompt_tokens(client, messages)


def test_remembered_tokens_are_the_tokenizers_own_and_bounded(gguf):
    tokenizer = load_tokenizer(gguf, WHERE)
    tokenizer.CACHE_ENTRIES = 3  # this instance only
    texts = [f"Turn {i}: what changed on node gpu0{i}?" for i in range(5)]
    for text in [*texts, *texts]:
        assert tokenizer.encode(text).ids == tokenizer.llama.tokenize(
            text.encode(), add_bos=False, special=False)
        assert len(tokenizer._cache) <= 3
    assert list(tokenizer._cache) == texts[-3:]  # the most recently used are kept
    long_text = "x" * (tokenizer.CACHE_CHARS + 1)
    assert tokenizer.encode(long_text).ids and long_text not in tokenizer._cache


def test_a_missing_or_broken_gguf_file_is_a_config_error(gguf, tmp_path):
    with pytest.raises(ConfigError, match=f"{WHERE}: cannot load .*no such file"):
        load_tokenizer(str(tmp_path / "nope.gguf"), WHERE)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really")
    with pytest.raises(ConfigError, match=f"{WHERE}: cannot load {broken}"):
        load_tokenizer(str(broken), WHERE)
    assert isinstance(load_tokenizer(gguf, WHERE), GGUFTokenizer)


def test_a_gguf_file_without_llama_cpp_is_a_config_error(gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails
    with pytest.raises(ConfigError, match=r"llama-cpp-python \(pip install 'streamllm\[real\]'\)"):
        load_tokenizer(gguf, WHERE)


MAX_TOKENS = 32


def test_a_conversation_longer_than_the_window_is_summarised_by_the_real_model(
        model_server, start_gateway, counter, gguf):
    gateway = start_gateway({
        "tiers": {
            "local": {"kind": "llamacpp", "base_url": model_server.url,
                      "models": [realmodel.MODEL_NAME],
                      "context_window": realmodel.CONTEXT_WINDOW, "tokenizer": gguf},
            "hpc": {"enabled": False}, "cloud": {"enabled": False}},
        "context": {
            # SmolLM2-135M copies a long block instead of summarising it and runs into the
            # length limit (the extractive summary then takes over): with 80 % of the window
            # kept word for word, the aged block (12 messages, ~800 tokens) is one short call.
            "verbatim_share": 0.8,
            "prepare_ahead": False,  # no background summaries competing for the one server
            "summarizer": {"timeout_s": 240},
        },
    })
    messages = conversation(18)
    assert counter.count(messages) > realmodel.CONTEXT_WINDOW, "the conversation must not fit"
    client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=280)
    raw = client.chat.completions.with_raw_response.create(
        model="local", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    reply = raw.parse()  # a context overflow in llama.cpp would have been an error status

    headers = raw.headers
    assert headers["x-stream-tier"] == "local"
    assert headers["x-stream-context"] == "summarized"
    assert int(headers["x-stream-context-tokens-before"]) > realmodel.CONTEXT_WINDOW
    assert headers["x-stream-summary"] == "new"
    # What the model server read fits its window with the answer, and was counted exactly.
    prompt = reply.usage.prompt_tokens
    assert prompt <= realmodel.CONTEXT_WINDOW - MAX_TOKENS
    assert prompt <= int(headers["x-stream-context-tokens-after"]) <= prompt + 1 + prompt // 100
    assert reply.choices[0].message.content

    # The summary was the real model's, not the extractive fallback's.
    summary = httpx.get(f"{gateway.v1}/stream/summaries/{headers['x-stream-summary-id']}",
                        timeout=10).json()
    assert summary["method"] == "model", summary
    assert summary["messages_summarized"] > 0 and summary["text"].strip()
    context = gateway.app.state.runtime.context
    assert (context.model_summaries, context.extractive_summaries) == (1, 0)
