"""The web chat end to end in headless Chromium: sign-in, streamed answers and their badges,
stop, usage, restore on reload, phone width and keyboard use, against a real gateway with three
simulated tiers. Chromium is Debian's (/usr/bin/chromium); nothing is downloaded."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.conftest import tier_config

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
KEY = "sk-webui-test-0001"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
EASY = "hi, what's the capital of Peru?"
DESKTOP = {"width": 1280, "height": 820}
# What the local model answers (the simulator streams it word by word): markdown as models write.
MARKDOWN_ANSWER = """## Lima

The capital of **Peru** is *Lima*, on the Pacific coast, with `UTC-5` time.

- Population: about 10 million
- Founded: 1535

```python
print("Lima, Peru")
```

| City | Country |
|------|---------|
| Lima | Peru    |

See [Wikipedia](https://en.wikipedia.org/wiki/Lima) for more."""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM}: "
                    "apt-get install chromium (tests never download a browser)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def gateway_with_three_tiers(start_sim, start_gateway, server: dict, embedded_cloud=False):
    """local (in markdown, 25 tokens/s) and hpc (40/s) stream visibly; cloud answers slowly and
    at length, for stopping; hpc has a price so its answers cost something. With
    `embedded_cloud`, cloud is left unconfigured and the gateway's own simulator stands in."""
    sims = {
        "local": start_sim({"local-m": {"tokens_per_s": 25, "answer_tokens": 500,
                                        "reply": MARKDOWN_ANSWER}}),
        "hpc": start_sim({"hpc-m": {"tokens_per_s": 40, "answer_tokens": 60}}),
        "cloud": start_sim({"cloud-slow": {"tokens_per_s": 15, "answer_tokens": 3000}}),
    }
    models = {"local": "local-m", "hpc": "hpc-m", "cloud": "cloud-slow"}
    tiers = {t: tier_config(s.url, models[t]) for t, s in sims.items()}
    tiers["hpc"]["prices"] = {"*": {"input_per_mtok": 2.0, "output_per_mtok": 40.0}}
    if embedded_cloud:
        del tiers["cloud"]
    return sims, start_gateway({"tiers": tiers, "server": server})


def last_answer(page):
    return page.locator("#messages .msg.assistant").last


def chip(article, field: str):
    return article.locator(f".badge [data-field='{field}'] .chip-v")


def send(page, text: str) -> None:
    page.fill("#composer-input", text)
    page.click("#send")


def settled(article) -> None:
    """The answer has finished streaming and its ledger row (cost) has arrived."""
    expect(article).not_to_have_class(re.compile(r"\bstreaming\b"), timeout=20_000)
    expect(chip(article, "cost")).not_to_have_text("…", timeout=20_000)


def test_web_chat_signs_in_streams_stops_and_restores(browser, start_sim, start_gateway):
    sims, gw = gateway_with_three_tiers(
        start_sim, start_gateway, {"api_keys": [{"key": KEY, "name": "webui"}]})
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    chat_ids: list[str] = []
    page.on("response", lambda r: chat_ids.append(r.headers["x-request-id"])
            if r.url.endswith("/v1/chat/completions") and r.ok else None)
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))

    # Sign-in: a wrong key says so; the right one opens the app.
    page.goto(gw.url + "/")
    key_field = page.locator("#login-key")
    expect(key_field).to_be_visible()
    assert key_field.get_attribute("type") == "password"
    assert key_field.get_attribute("autocomplete") == "off"
    key_field.fill("sk-this-is-not-a-key")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_have_text("Incorrect API key provided.")
    key_field.fill(KEY)
    page.keyboard.press("Enter")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#sign-out")).to_be_visible()

    # The key is nowhere a script could read it; the session cookie is HttpOnly.
    readable = page.evaluate("""async () => JSON.stringify({
        local: {...localStorage}, session: {...sessionStorage}, cookie: document.cookie,
        idb: indexedDB.databases ? await indexedDB.databases() : [],
        field: document.getElementById('login-key').value})""")
    assert KEY not in readable and "sk-" not in readable, readable
    cookies = context.cookies(gw.url)
    assert cookies, "signing in sets a session cookie"
    assert all(c["httpOnly"] and c["sameSite"] == "Strict" for c in cookies), cookies
    assert all(KEY not in c["value"] for c in cookies)

    expect(page.locator("#health .light")).to_have_count(3)

    # An easy question on auto: the answer streams in, then completes with its badge.
    send(page, EASY)
    answer = last_answer(page)
    body = answer.locator(".msg-body")
    expect(body).to_have_text(re.compile(r"\w"))
    first = page.evaluate("""() => {
        const a = [...document.querySelectorAll('.msg.assistant')].pop();
        return {n: a.querySelector('.msg-body').textContent.length,
                streaming: a.classList.contains('streaming')}; }""")
    assert first["streaming"], "the first words arrive while the answer is still streaming"
    page.wait_for_function(
        """n => [...document.querySelectorAll('.msg.assistant')].pop()
                 .querySelector('.msg-body').textContent.length > n""", arg=first["n"])
    settled(answer)
    assert len(body.inner_text()) > first["n"]
    expect(chip(answer, "tier")).to_have_text("local")
    expect(chip(answer, "model")).to_have_text("local-m")
    expect(chip(answer, "complexity")).to_have_text("LOW")
    expect(chip(answer, "confidence")).to_have_text(re.compile(r"^\d{1,3}%$"))
    expect(chip(answer, "ttft")).to_have_text(re.compile(r"\d+ ms|\d\.\d\d s"))
    expect(chip(answer, "cost")).to_have_text("$0")
    # ... rendered as markdown, with a working copy button on the code block.
    expect(body.locator("h4")).to_have_text("Lima")
    expect(body.locator("strong")).to_have_text("Peru")
    expect(body.locator("ul > li")).to_have_text(["Population: about 10 million", "Founded: 1535"])
    expect(body.locator("pre code.language-python")).to_have_text('print("Lima, Peru")')
    expect(body.locator("table td")).to_have_text(["Lima", "Peru"])
    link = body.locator("a", has_text="Wikipedia")
    expect(link).to_have_attribute("href", "https://en.wikipedia.org/wiki/Lima")
    expect(link).to_have_attribute("rel", re.compile(r"\bnoopener\b"))
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gw.url)
    body.locator(".md-code button").click()
    expect(body.locator(".md-code button")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == 'print("Lima, Peru")'
    expect(page.locator("#conversation-list .conversation")).to_have_count(1)
    assert "#chat/" in page.url

    # Choose hpc: the badge says so, and hpc's price gives the answer a cost.
    page.select_option("#setting-tier", "hpc")
    expect(page.locator("#setting-judge")).to_be_disabled()
    send(page, "Now explain standard deviation briefly.")
    answer = last_answer(page)
    settled(answer)
    expect(chip(answer, "tier")).to_have_text("hpc")
    expect(chip(answer, "model")).to_have_text("hpc-m")
    expect(chip(answer, "cost")).to_have_text(re.compile(r"^<?\$0\.\d*[1-9]"))
    expect(answer.locator(".msg-error")).to_have_count(0)

    # A long, slow answer stopped with the Stop button: the partial text stays, the backend
    # stops generating, and the ledger records the request as cancelled.
    page.select_option("#setting-tier", "cloud")
    send(page, "Write me a very long essay on checkpointing.")
    answer = last_answer(page)
    expect(page.locator("#stop")).to_be_visible()
    expect(answer.locator(".msg-body")).to_have_text(re.compile(r"\w+ \w+ \w+"))
    page.click("#stop")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_visible()
    expect(chip(answer, "outcome")).to_have_text("stopped")
    partial = answer.locator(".msg-body").inner_text()
    assert partial.strip()
    settled(answer)
    assert answer.locator(".msg-body").inner_text() == partial, "nothing arrives after Stop"
    expect(chip(answer, "tier")).to_have_text("cloud")
    assert sims["cloud"].sim.wait_until(
        lambda log: log and log[-1].outcome in ("cancelled", "disconnected"))
    assert sims["cloud"].sim.log[-1].tokens_sent < 3000
    with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {KEY}"},
                      timeout=10) as api:
        row = api.get(f"/v1/usage/requests/{chat_ids[-1]}")
        assert row.status_code == 200, row.text
        assert (row.json()["outcome"], row.json()["tier"]) == ("cancelled", "cloud")

    before_reload = page.locator(".msg .msg-body").all_text_contents()
    assert len(before_reload) == 6
    page.screenshot(path=str(ARTIFACTS / "webchat.png"), full_page=True)

    # The usage page: totals count the three requests; both charts have a table behind them.
    page.click("#tab-usage")
    expect(page.locator("#usage-view")).to_be_visible()
    expect(page.locator("#usage-totals [data-field='requests'] dd")).to_have_text("3")
    expect(page.locator("#usage-tiers")).to_contain_text("hpc")
    for chart in ("#chart-spend", "#chart-share"):
        expect(page.locator(f"{chart} svg[role='img'] > desc")).not_to_be_empty()
        expect(page.locator(f"{chart} details table")).to_have_count(1)
    expect(page.locator("#chart-share rect.bar-tier")).to_have_count(3)
    page.set_viewport_size({"width": 1280, "height": 1500})  # the page scrolls inside itself
    page.screenshot(path=str(ARTIFACTS / "webchat-usage.png"), full_page=True)
    page.set_viewport_size(DESKTOP)

    # Reload: the conversation comes back from the server, badges included.
    page.click("#tab-chat")
    expect(page.locator("#chat-view")).to_be_visible()
    page.reload()
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator(".msg .msg-body")).to_have_count(6)
    # The stopped answer may have a few more words on the server: those in flight at Stop.
    expect(page.locator(".msg .msg-body")).to_have_text(
        [*before_reload[:5], re.compile("^" + re.escape(before_reload[5]))])
    restored = page.locator("#messages .msg.assistant")
    expect(restored.locator(".badge [data-field='tier'] .chip-v")).to_have_text(
        ["local", "hpc", "cloud"])
    expect(chip(restored.nth(2), "outcome")).to_have_text("stopped")
    expect(page.locator("#conversation-list .conversation.current")).to_have_count(1)
    # Health lights: three real (simulator-process) backends, up and routable: green.
    expect(page.locator("#health .light-up")).to_have_count(3)

    # Keyboard only: Tab reaches the message box, Shift+Enter adds a line, Enter sends.
    page.evaluate("document.activeElement && document.activeElement.blur()")
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "composer-input":
            break
    else:
        pytest.fail("Tab never reached the message box")
    page.keyboard.type("First line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert page.input_value("#composer-input") == "First line\nsecond line"
    page.keyboard.press("Enter")
    expect(page.locator("#messages .msg.user").last).to_have_text("First line\nsecond line")
    expect(page.locator("#composer-input")).to_have_value("")
    settled(last_answer(page))
    expect(chip(last_answer(page), "tier")).to_have_text(re.compile(r"local|hpc"))

    # Escape stops an answer too.
    page.select_option("#setting-tier", "cloud")
    send(page, "Another long essay, please.")
    expect(last_answer(page).locator(".msg-body")).to_have_text(re.compile(r"\w+ \w+"))
    page.keyboard.press("Escape")
    expect(chip(last_answer(page), "outcome")).to_have_text("stopped")
    settled(last_answer(page))

    # Phone width: no sideways scrolling; the sidebar is a drawer behind a toggle.
    page.emulate_media(reduced_motion="reduce")  # the drawer appears at once, for the screenshot
    page.set_viewport_size({"width": 375, "height": 740})
    expect(page.locator("#drawer-toggle")).to_be_visible()
    expect(page.locator("#sidebar")).to_be_hidden()
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.click("#drawer-toggle")
    expect(page.locator("#sidebar")).to_be_visible()
    expect(page.locator("#drawer-toggle")).to_have_attribute("aria-expanded", "true")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.screenshot(path=str(ARTIFACTS / "webchat-phone-drawer.png"))
    page.keyboard.press("Escape")
    expect(page.locator("#sidebar")).to_be_hidden()
    expect(page.locator("#drawer-toggle")).to_have_attribute("aria-expanded", "false")
    page.click("#tab-usage")
    expect(page.locator("#usage-totals [data-field='requests'] dd")).to_have_text("5")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.screenshot(path=str(ARTIFACTS / "webchat-phone-usage.png"))
    page.click("#tab-chat")
    expect(page.locator(".msg .msg-body")).to_have_count(10)
    expect(page.locator("#composer-input")).to_be_in_viewport()
    page.screenshot(path=str(ARTIFACTS / "webchat-phone.png"))

    # Signing out ends the session on the server too.
    page.click("#sign-out")
    expect(page.locator("#login-key")).to_be_visible()
    assert page.evaluate("fetch('/ui/session').then(r => r.json())")["signed_in"] is False

    assert not page_errors, page_errors
    foreign = [u for u in requested if not u.startswith(gw.url + "/") and not u.startswith("data:")]
    assert not foreign, f"the page reached beyond the gateway: {foreign}"
    context.close()


def test_a_conversation_list_fetched_before_a_rename_or_delete_does_not_undo_it(
        browser, start_sim, start_gateway):
    """The list is refreshed after every answer, without waiting for it. A refresh that is
    answered while a title is being edited, or after a rename or a delete it was asked for
    before, must not undo what the user just did (it did, once, in CI)."""
    _, gw = gateway_with_three_tiers(start_sim, start_gateway, {}, embedded_cloud=True)
    api = httpx.Client(base_url=gw.url, timeout=10)
    kept = api.post("/ui/api/conversations", json={"title": "Before"}).json()["id"]
    doomed = api.post("/ui/api/conversations", json={"title": "Doomed"}).json()["id"]
    page = browser.new_page(viewport=DESKTOP)
    page.goto(gw.url + f"/#chat/{kept}")
    listed = page.locator("#conversation-list")
    title = listed.locator(f"[data-id='{kept}'] .conversation-title")
    expect(title).to_have_text("Before")

    # Every list refresh is answered from the server as it was when asked, and held until
    # the test lets it through.
    held: list[tuple[object, object]] = []
    page.route(re.compile(r"/ui/api/conversations$"),
               lambda route: held.append((route, route.fetch())) if route.request.method == "GET"
               else route.continue_())

    def refresh_held() -> None:
        """A refusal (cloud asked for, cloud not allowed) ends with a refresh of the list."""
        page.select_option("#setting-tier", "cloud")
        page.uncheck("#setting-cloud")
        with page.expect_request(lambda r: r.url.endswith("/ui/api/conversations")
                                 and r.method == "GET"):
            send(page, "Only if the cloud may answer.")
        expect(listed).to_have_attribute("aria-busy", "true")

    def let_through() -> None:
        route, response = held.pop()
        route.fulfill(response=response)
        expect(listed).not_to_have_attribute("aria-busy", "true")

    # Answered while the title is being edited: the edit stays open and is saved.
    refresh_held()
    listed.get_by_role("button", name="Rename “Before”").click()
    let_through()
    page.get_by_role("textbox", name="New title").fill("During")
    page.keyboard.press("Enter")
    expect(title).to_have_text("During")

    # Asked for before a rename, answered after it: the old title does not come back.
    refresh_held()
    listed.get_by_role("button", name="Rename “During”").click()
    page.get_by_role("textbox", name="New title").fill("After")
    page.keyboard.press("Enter")
    expect(title).to_have_text("After")
    let_through()
    expect(title).to_have_text("After")

    # Asked for before a delete, answered after it: the deleted conversation does not return.
    refresh_held()
    page.once("dialog", lambda dialog: dialog.accept())
    listed.get_by_role("button", name="Delete “Doomed”").click()
    expect(listed.locator(f"[data-id='{doomed}']")).to_have_count(0)
    let_through()
    expect(listed.locator(".conversation")).to_have_count(1)
    expect(title).to_have_text("After")

    assert api.get(f"/ui/api/conversations/{kept}").json()["title"] == "After"
    assert api.get(f"/ui/api/conversations/{doomed}").status_code == 404
    assert not held
    api.close()
    page.close()


def test_a_message_sent_while_its_conversation_loads_goes_into_it_and_stays_shown(
        browser, start_sim, start_gateway):
    """Found in the full suite under load: a message sent before the conversation in the
    address had loaded started a new conversation, and the late load then replaced it on the
    screen with the (empty) one that was asked for."""
    _, gw = gateway_with_three_tiers(start_sim, start_gateway, {}, embedded_cloud=True)
    api = httpx.Client(base_url=gw.url, timeout=10)
    first = api.post("/ui/api/conversations", json={"title": "First"}).json()["id"]
    page = browser.new_page(viewport=DESKTOP)
    held: list[tuple[object, object]] = []
    page.route(re.compile(rf"/ui/api/conversations/{first}$"),
               lambda route: held.append((route, route.fetch())))
    with page.expect_request(lambda r: r.url.endswith(f"/ui/api/conversations/{first}")):
        page.goto(gw.url + f"/#chat/{first}")
    page.select_option("#setting-tier", "local")
    send(page, EASY)
    route, response = held.pop()
    route.fulfill(response=response)
    settled(last_answer(page))
    expect(page.locator("#messages .msg.user")).to_have_text([EASY])
    expect(page).to_have_url(re.compile(rf"#chat/{first}$"))
    stored = api.get(f"/ui/api/conversations/{first}").json()["messages"]
    assert [m["content"] for m in stored if m["role"] == "user"] == [EASY]
    assert len(api.get("/ui/api/conversations").json()["data"]) == 1  # no new one
    api.close()
    page.close()


def test_what_was_asked_for_last_stays_shown_when_an_earlier_answer_arrives_late(
        browser, start_sim, start_gateway):
    """Opening A then B quickly: if A's messages arrive after B's, B is what stays shown, also
    when B was the one already open. The same for the usage page's period."""
    _, gw = gateway_with_three_tiers(start_sim, start_gateway, {}, embedded_cloud=True)
    api = httpx.Client(base_url=gw.url, timeout=10)
    first = api.post("/ui/api/conversations", json={"title": "First"}).json()["id"]
    second = api.post("/ui/api/conversations", json={"title": "Second"}).json()["id"]
    api.close()
    page = browser.new_page(viewport=DESKTOP)
    page.goto(gw.url + f"/#chat/{first}")
    page.select_option("#setting-tier", "local")
    send(page, EASY)
    settled(last_answer(page))
    listed = page.locator("#conversation-list")
    listed.locator(f"[data-id='{second}'] a").click()
    expect(page.locator("#welcome")).to_be_visible()
    send(page, "And the capital of Chile?")
    settled(last_answer(page))
    asked = page.locator("#messages .msg.user")
    expect(asked).to_have_text(["And the capital of Chile?"])

    held: list[tuple[object, object]] = []
    page.route(re.compile(rf"/ui/api/conversations/{first}$"),
               lambda route: held.append((route, route.fetch())))
    with page.expect_request(lambda r: r.url.endswith(f"/ui/api/conversations/{first}")):
        listed.locator(f"[data-id='{first}'] a").click()
    listed.locator(f"[data-id='{second}'] a").click()
    expect(page).to_have_url(re.compile(rf"#chat/{second}$"))
    route, response = held.pop()
    route.fulfill(response=response)
    expect(page.locator("#messages")).not_to_have_attribute("aria-busy", "true")
    expect(asked).to_have_text(["And the capital of Chile?"])
    expect(page.locator("#messages .msg.assistant")).to_have_count(1)
    expect(listed.locator(".conversation.current")).to_have_attribute("data-id", second)

    page.click("#tab-usage")
    status = page.locator("#usage-status")
    expect(status).to_have_text(re.compile("^Last 30 days"))
    page.route(re.compile(r"/v1/usage\?days=7$"),
               lambda route: held.append((route, route.fetch())))
    with page.expect_request(lambda r: r.url.endswith("/v1/usage?days=7")):
        page.select_option("#usage-days", "7")
    page.select_option("#usage-days", "90")
    expect(status).to_have_text(re.compile("^Last 90 days"))
    route, response = held.pop()
    route.fulfill(response=response)
    expect(page.locator("#usage-view")).not_to_have_attribute("aria-busy", "true")
    expect(status).to_have_text(re.compile("^Last 90 days"))
    expect(page.locator("#usage-totals [data-field='requests'] dd")).to_have_text("2")
    page.close()


HOSTILE = {
    "script": "<script>window.__owned = 1</script>",
    "img": "<img src=x onerror=\"window.__owned = 1\">",
    "js_link": "[click](javascript:window.__owned=1)",
    "js_link_spaced": "[click]( JaVaScRiPt:window.__owned=1 )",
    "data_link": "[click](data:text/html,<script>window.__owned=1</script>)",
    "autolink": "<javascript:window.__owned=1>",
    "code": "`<b onclick=x>` and\n```html\n<script>window.__owned = 1</script>\n```",
    "image": "![x](https://example.org/x.png)",
}


def test_single_user_mode_needs_no_sign_in_and_answers_render_safely(browser, start_sim,
                                                                     start_gateway):
    _, gw = gateway_with_three_tiers(start_sim, start_gateway, {}, embedded_cloud=True)
    page = browser.new_page(viewport=DESKTOP)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(gw.url + "/")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#sign-out")).to_be_hidden()
    expect(page.locator("#setting-tier option")).to_have_text(
        [re.compile("^auto"), "local", "HPC", "cloud"])
    # The embedded cloud simulator is up but synthetic: amber, and it says so.
    cloud_light = page.locator("#health .light", has_text="cloud")
    expect(cloud_light).to_have_class(re.compile(r"\blight-warn\b"))
    expect(cloud_light).to_contain_text("simulated")
    expect(page.locator("#health .light-up")).to_have_count(2)

    # Markdown as models write it, rendered by the page's own module.
    rendered = page.evaluate("""async (hostile) => {
        const md = await import('/ui/static/markdown.js');
        const out = {};
        for (const [name, text] of Object.entries(hostile)) {
            const box = document.createElement('div');
            document.body.appendChild(box);
            md.renderMarkdown(box, text);
            const nodes = [...box.querySelectorAll('*')];
            out[name] = {html: box.innerHTML, tags: [...new Set(nodes.map((n) => n.localName))],
                         handlers: nodes.flatMap((n) => n.getAttributeNames())
                                        .filter((a) => a.startsWith('on')),
                         hrefs: nodes.filter((n) => n.hasAttribute('href'))
                                     .map((n) => n.getAttribute('href'))};
        }
        const sample = '# Title\\n\\nSome **bold**, *italic* and `code`.\\n\\n- one\\n- two\\n\\n' +
            '1. first\\n2. second\\n\\n> quoted\\n\\n```py\\nprint(1)\\n```\\n\\n' +
            '| a | b |\\n|---|---|\\n| 1 | 2 |\\n\\n[site](https://example.org)';
        const whole = document.createElement('div');
        md.renderMarkdown(whole, sample);
        // Streaming: the same text fed in growing pieces ends in the same DOM.
        const grown = document.createElement('div');
        for (let i = 1; i <= sample.length; i += 3) md.renderMarkdown(grown, sample.slice(0, i));
        md.renderMarkdown(grown, sample);
        const q = (s) => whole.querySelectorAll(s).length;
        return {out, owned: window.__owned || 0, same: grown.innerHTML === whole.innerHTML,
                counts: {h: q('h3'), strong: q('strong'), em: q('em'), code: q('p code'),
                         ul: q('ul li'), ol: q('ol li'), quote: q('blockquote'),
                         pre: q('pre code.language-py'), copy: q('.md-code button'),
                         table: q('table td'),
                         link: q('a[rel~="noopener"][href="https://example.org/"]')}};
    }""", HOSTILE)
    assert rendered["owned"] == 0
    for name, found in rendered["out"].items():
        assert not set(found["tags"]) & {"script", "img", "iframe", "object", "svg"}, (name, found)
        assert not found["handlers"], (name, found)
        assert all(h.startswith(("https://", "http://")) for h in found["hrefs"]), (name, found)
    assert "&lt;script&gt;" in rendered["out"]["script"]["html"]
    assert rendered["out"]["image"]["hrefs"] == ["https://example.org/x.png"], "a link, not a load"
    assert rendered["same"], "incremental rendering ends where one-shot rendering does"
    assert rendered["counts"] == {"h": 1, "strong": 1, "em": 1, "code": 1, "ul": 2, "ol": 2,
                                  "quote": 1, "pre": 1, "copy": 1, "table": 2, "link": 1}

    # A real answer in single-user mode, on the tier the user picked.
    page.select_option("#setting-tier", "local")
    page.fill("#composer-input", EASY)
    page.keyboard.press("Enter")
    settled(last_answer(page))
    expect(chip(last_answer(page), "tier")).to_have_text("local")

    # Refused before streaming (cloud asked for, cloud not allowed): the error shows inline,
    # readably, and the message is back in the box to try again.
    page.select_option("#setting-tier", "cloud")
    page.uncheck("#setting-cloud")
    page.fill("#composer-input", "Only if the cloud may answer.")
    page.keyboard.press("Enter")
    error = page.locator("#messages .msg.user").last.locator(".msg-error")
    expect(error).to_have_text(re.compile(r"^403: \S"))
    expect(page.locator("#composer-input")).to_have_value("Only if the cloud may answer.")
    expect(page.locator("#messages .msg.assistant")).to_have_count(1)

    # Rename, new chat and delete, all kept on the server.
    api = httpx.Client(base_url=gw.url, timeout=10)
    conversation = page.locator("#conversation-list .conversation")
    expect(conversation).to_have_count(1)
    conversation_id = conversation.get_attribute("data-id")
    conversation.get_by_role("button", name=re.compile("^Rename")).click()
    page.get_by_role("textbox", name="New title").fill("Capitals")
    page.keyboard.press("Enter")
    expect(conversation.locator(".conversation-title")).to_have_text("Capitals")
    assert api.get(f"/ui/api/conversations/{conversation_id}").json()["title"] == "Capitals"
    page.click("#new-conversation")
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#welcome")).to_be_visible()
    page.once("dialog", lambda dialog: dialog.accept())
    conversation.get_by_role("button", name="Delete “Capitals”").click()
    expect(page.locator("#conversation-list .conversation")).to_have_count(0)
    assert api.get(f"/ui/api/conversations/{conversation_id}").status_code == 404
    api.close()
    foreign = [u for u in requested if not u.startswith(gw.url + "/") and not u.startswith("data:")]
    assert not foreign, foreign
    page.close()
