"""Institutional login by token introspection, against a real RFC 7662 server double on loopback."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streamllm.gateway.introspection import (
    IntrospectionFailed,
    IntrospectionSettings,
    Principal,
    TokenIntrospector,
)
from streamllm.serving import ServerThread
from tests.conftest import closed_port

CLIENT_ID = "0b5e7a52-stream-resource-server"
CLIENT_SECRET = "Zm9v+YmFy/c2VjcmV0=="  # base64-like, as Globus secrets are: "+", "/", "="
SCOPE = "urn:globus:auth:scope:stream.example.org:all"
# Distinctive strings, so finding one in a log line or an error message cannot be a coincidence.
ALICE = "tok-alice-1f7c2d9e8b"
MALLORY = "tok-mallory-5a0b3c6d4e"


@dataclass(frozen=True)
class Raw:
    """An answer the double sends verbatim (error statuses, broken bodies)."""

    status: int
    body: bytes
    media_type: str = "application/json"


@dataclass(frozen=True)
class Slow:
    seconds: float


@dataclass(frozen=True)
class Gated:
    """Hold the answer until the test opens the gate; `received` says the request arrived."""

    answer: dict[str, Any]
    received: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Seen:
    token: str | None
    query: str
    form_keys: frozenset[str]


@dataclass
class IntrospectionDouble:
    """A resource server's view of Globus Auth: Basic client auth, a form, answers per token."""

    server: ServerThread
    answers: dict[str, Any]
    seen: list[Seen]
    hits: list[int]  # every request, including those refused for bad credentials

    @property
    def url(self) -> str:
        return f"{self.server.url}/v2/oauth2/token/introspect"

    @property
    def requests(self) -> int:
        return len(self.hits)


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def double_app(answers: dict[str, Any], seen: list[Seen], hits: list[int]) -> Starlette:
    async def introspect(request: Request) -> Response:
        hits.append(1)
        if request.headers.get("authorization") != basic(CLIENT_ID, CLIENT_SECRET):
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        if not request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        # Parsed by hand: Starlette's request.form() needs python-multipart, not a dependency.
        form = parse_qs((await request.body()).decode(), keep_blank_values=True)
        token = form["token"][0] if len(form.get("token", [])) == 1 else None
        seen.append(Seen(token, request.url.query, frozenset(form)))
        if not token:
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        answer = answers.get(token, {"active": False})
        if isinstance(answer, Raw):
            return Response(answer.body, status_code=answer.status, media_type=answer.media_type)
        if isinstance(answer, Slow):
            await asyncio.sleep(answer.seconds)
            return JSONResponse({"active": False})
        if isinstance(answer, Gated):
            answer.received.set()
            await asyncio.to_thread(answer.gate.wait, 10)
            return JSONResponse(answer.answer)
        return JSONResponse(answer)

    return Starlette(routes=[Route("/v2/oauth2/token/introspect", introspect, methods=["POST"])])


@pytest.fixture
def double() -> Iterator[IntrospectionDouble]:
    answers: dict[str, Any] = {}
    seen: list[Seen] = []
    hits: list[int] = []
    server = ServerThread(double_app(answers, seen, hits)).start()
    yield IntrospectionDouble(server, answers, seen, hits)
    server.stop()


class FakeClock:
    """Monotonic and wall time that move only when the test says so."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_700_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make(
    double: IntrospectionDouble, clock: FakeClock
) -> AsyncIterator[Callable[..., TokenIntrospector]]:
    made: list[TokenIntrospector] = []

    def build(
        client: httpx2.AsyncClient | None = None, max_entries: int = 10_000, **settings: Any
    ) -> TokenIntrospector:
        fields: dict[str, Any] = {
            "url": double.url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            **settings,
        }
        introspector = TokenIntrospector(
            IntrospectionSettings(**fields),
            client,
            clock=clock.monotonic,
            wall_clock=clock.time,
            max_entries=max_entries,
        )
        made.append(introspector)
        return introspector

    yield build
    for introspector in made:
        await introspector.aclose()


def active(
    clock: FakeClock,
    username: str | None = "alice@uchicago.edu",
    *,
    ttl: float = 3600,
    **claims: Any,
) -> dict[str, Any]:
    """A Globus-shaped answer for an active token that expires `ttl` seconds from now."""
    answer: dict[str, Any] = {
        "active": True,
        "scope": f"openid email {SCOPE}",
        "client_id": "c0ffee00-native-app",
        "sub": "9d0f8a4e-0000-4000-8000-00000000a11c",
        "exp": int(clock.wall + ttl),
        "iat": int(clock.wall - 60),
        "token_type": "Bearer",
        **claims,
    }
    if username is not None:
        answer["username"] = username
    return answer


# -- what a token is worth ------------------------------------------------------------------


async def test_active_token_from_an_allowed_domain_is_a_principal(double, make, clock):
    double.answers[ALICE] = active(clock, email="Alice@UChicago.edu", groups=["g-ai"])
    principal = await make(allowed_domains=("uchicago.edu",)).check(ALICE)
    assert principal == Principal(
        name="oauth:alice@uchicago.edu",
        username="alice@uchicago.edu",
        email="Alice@UChicago.edu",
        groups=("g-ai",),
        expires_at=float(int(clock.wall + 3600)),
    )
    # The token travelled only in the form body, and the form is plain RFC 7662.
    assert double.seen == [Seen(ALICE, "", frozenset({"token"}))]


async def test_principal_is_named_by_sub_when_there_is_no_username(double, make, clock):
    double.answers[ALICE] = active(clock, username=None)
    principal = await make().check(ALICE)
    assert principal is not None
    assert principal.name == "oauth:9d0f8a4e-0000-4000-8000-00000000a11c"
    assert principal.username is None


@pytest.mark.parametrize("flag", [False, "true", 1, None])
async def test_token_that_is_not_exactly_active_is_refused(double, make, clock, flag):
    double.answers[ALICE] = {**active(clock), "active": flag}
    assert await make().check(ALICE) is None
    assert double.requests == 1  # asked, and refused on the answer


async def test_unknown_token_is_refused(double, make):
    assert await make().check(MALLORY) is None


async def test_expired_token_is_refused_even_if_the_server_says_active(double, make, clock):
    double.answers[ALICE] = active(clock, ttl=-1)
    assert await make().check(ALICE) is None


async def test_token_with_a_nonnumeric_exp_is_refused(double, make, clock):
    double.answers[ALICE] = active(clock, exp="tomorrow")
    assert await make().check(ALICE) is None


@pytest.mark.parametrize(
    ("username", "email", "allowed"),
    [
        ("alice@uchicago.edu", None, True),
        ("ALICE@UChicago.EDU", None, True),  # domains compare case-insensitively
        ("alice@cs.uchicago.edu", None, True),  # a subdomain
        ("alice@gmail.com", None, False),
        ("alice@evil-uchicago.edu", None, False),  # a suffix, but not on a label boundary
        ("alice@uchicago.edu.evil.org", None, False),
        ("alice@gmail.com", "alice@uchicago.edu", True),  # the email alone suffices
        ("alice@uchicago.edu", "alice@gmail.com", True),  # and so does the username
        ("alice", None, False),  # no domain at all
        (None, None, False),
    ],
)
async def test_domain_rule(double, make, clock, username, email, allowed):
    claims = {"email": email} if email else {}
    double.answers[ALICE] = active(clock, username, **claims)
    principal = await make(allowed_domains=("UChicago.edu",)).check(ALICE)
    assert (principal is not None) is allowed


@pytest.mark.parametrize(
    ("claims", "allowed"),
    [
        ({"groups": ["g-physics", "g-ai"]}, True),
        ({"groups": ["g-physics"]}, False),
        ({"groups": []}, False),
        ({}, False),
        ({"groups": "g-ai"}, False),  # the claim must be a list, not a string that contains it
    ],
)
async def test_group_rule(double, make, clock, claims, allowed):
    double.answers[ALICE] = active(clock, **claims)
    principal = await make(allowed_groups=("g-ai", "g-staff")).check(ALICE)
    assert (principal is not None) is allowed


async def test_groups_are_read_from_the_configured_claim(double, make, clock):
    double.answers[ALICE] = active(clock, groups=["g-physics"], globus_groups=["g-ai", 7])
    introspector = make(allowed_groups=("g-ai",), groups_claim="globus_groups")
    principal = await introspector.check(ALICE)
    assert principal is not None and principal.groups == ("g-ai",)  # non-strings dropped


async def test_a_groups_claim_that_is_not_a_list_counts_as_no_groups(double, make, clock):
    double.answers[ALICE] = active(clock, groups="g-ai g-staff")
    principal = await make().check(ALICE)  # no group rule: the token is allowed
    assert principal is not None and principal.groups == ()


@pytest.mark.parametrize(
    ("username", "groups", "allowed"),
    [
        ("alice@uchicago.edu", ["g-ai"], True),
        ("alice@uchicago.edu", ["g-physics"], False),  # right domain, wrong group
        ("alice@gmail.com", ["g-ai"], False),  # right group, wrong domain
    ],
)
async def test_with_domains_and_groups_both_must_pass(
    double, make, clock, username, groups, allowed
):
    double.answers[ALICE] = active(clock, username, groups=groups)
    introspector = make(allowed_domains=("uchicago.edu",), allowed_groups=("g-ai",))
    assert (await introspector.check(ALICE) is not None) is allowed


@pytest.mark.parametrize(
    ("scope", "allowed"),
    [
        (f"openid {SCOPE} email", True),
        ("openid email", False),
        (f"{SCOPE}:admin", False),  # a longer scope is not the required one
        (None, False),
    ],
)
async def test_required_scope(double, make, clock, scope, allowed):
    double.answers[ALICE] = active(clock, scope=scope)
    principal = await make(required_scope=SCOPE).check(ALICE)
    assert (principal is not None) is allowed


# -- caching and single flight -----------------------------------------------------------------


async def test_a_repeated_token_is_answered_from_the_cache_until_cache_s(double, make, clock):
    double.answers[ALICE] = active(clock)
    introspector = make(cache_s=5.0)
    first = await introspector.check(ALICE)
    assert first is not None
    clock.advance(4.9)
    assert await introspector.check(ALICE) == first
    assert double.requests == 1
    clock.advance(0.2)
    assert await introspector.check(ALICE) == first
    assert double.requests == 2


async def test_the_cache_never_outlives_the_token(double, make, clock):
    double.answers[ALICE] = active(clock, ttl=3)
    introspector = make(cache_s=60.0)
    assert await introspector.check(ALICE) is not None
    clock.advance(3.5)  # past exp, well within cache_s
    assert await introspector.check(ALICE) is None
    assert double.requests == 2


async def test_refusals_are_cached_but_briefly(double, make, clock):
    double.answers[ALICE] = active(clock)
    introspector = make(cache_s=60.0)
    await introspector.check(ALICE)
    for _ in range(5):
        assert await introspector.check(MALLORY) is None
    assert double.requests == 2  # one each: a flood of a bad token is one introspection
    clock.advance(10.5)
    assert await introspector.check(MALLORY) is None
    assert await introspector.check(ALICE) is not None
    assert double.requests == 3  # the refusal was asked again; the grant was still cached


async def test_the_cache_is_bounded_and_drops_the_least_recently_used(double, make, clock):
    tokens = [f"tok-lru-{i}-9c1e" for i in range(3)]
    for token in tokens:
        double.answers[token] = active(clock)
    a, b, c = tokens
    introspector = make(max_entries=2)
    await introspector.check(a)
    await introspector.check(b)
    await introspector.check(a)  # a is now the more recently used
    await introspector.check(c)  # evicts b
    assert double.requests == 3
    await introspector.check(a)
    await introspector.check(c)
    assert double.requests == 3
    await introspector.check(b)
    assert double.requests == 4


async def test_concurrent_checks_of_one_token_share_one_introspection(double, make, clock):
    double.answers[ALICE] = active(clock)
    introspector = make(cache_s=0)  # no cache: only the single flight can save requests
    results = await asyncio.gather(*(introspector.check(ALICE) for _ in range(10)))
    assert double.requests == 1
    assert results[0] is not None and all(r == results[0] for r in results)
    await introspector.check(ALICE)
    assert double.requests == 2  # cache_s=0 really caches nothing


async def test_concurrent_checks_share_a_failure_and_it_is_not_cached(double, make):
    double.answers[ALICE] = Raw(502, b"bad gateway", "text/plain")
    introspector = make()
    results = await asyncio.gather(
        *(introspector.check(ALICE) for _ in range(10)), return_exceptions=True
    )
    assert double.requests == 1
    assert all(isinstance(r, IntrospectionFailed) for r in results)
    with pytest.raises(IntrospectionFailed):
        await introspector.check(ALICE)
    assert double.requests == 2


async def test_one_waiter_giving_up_does_not_fail_the_others(double, make, clock):
    gated = Gated(active(clock))
    double.answers[ALICE] = gated
    introspector = make()
    quitter = asyncio.create_task(introspector.check(ALICE))
    stayer = asyncio.create_task(introspector.check(ALICE))
    assert await asyncio.to_thread(gated.received.wait, 10)
    quitter.cancel()
    gated.gate.set()
    assert await stayer is not None
    assert quitter.cancelled()
    assert double.requests == 1


# -- when the server cannot be asked ------------------------------------------------------------


async def test_server_down_is_a_failure_not_a_refusal(make):
    introspector = make(url=f"http://127.0.0.1:{closed_port()}/v2/oauth2/token/introspect")
    with pytest.raises(IntrospectionFailed):
        await introspector.check(ALICE)


@pytest.mark.parametrize(
    "answer",
    [
        Raw(500, b'{"error": "internal"}'),
        Raw(200, b"<html>maintenance</html>", "text/html"),  # not JSON
        Raw(200, b'["active", true]'),  # JSON, but not an object
    ],
)
async def test_broken_answers_are_failures(double, make, answer):
    double.answers[ALICE] = answer
    with pytest.raises(IntrospectionFailed):
        await make().check(ALICE)
    assert double.requests == 1


async def test_wrong_client_credentials_are_a_failure(double, make, clock):
    double.answers[ALICE] = active(clock)
    introspector = make(client_secret="not-the-secret")
    with pytest.raises(IntrospectionFailed, match="401"):
        await introspector.check(ALICE)
    assert double.requests == 1 and double.seen == []  # refused before reading the form


async def test_a_slow_server_times_out_as_a_failure(double, make):
    double.answers[ALICE] = Slow(1.0)
    with pytest.raises(IntrospectionFailed, match="timed out"):
        await make(timeout_s=0.2).check(ALICE)


# -- secrets stay secret ----------------------------------------------------------------------


async def test_token_and_secret_never_reach_logs_or_errors(double, make, clock, caplog):
    caplog.set_level(logging.DEBUG)  # everything, httpx2's own request logging included
    double.answers[ALICE] = active(clock, "alice@gmail.com")  # refused: wrong domain
    bad = {"tok-500-" + ALICE: Raw(500, b"{}"), "tok-html-" + ALICE: Raw(200, b"<html>")}
    double.answers.update(bad)
    introspector = make(allowed_domains=("uchicago.edu",))
    wrong_creds = make(client_secret=CLIENT_SECRET + "-wrong")
    down = make(url=f"http://127.0.0.1:{closed_port()}/introspect")

    assert await introspector.check(ALICE) is None
    assert await introspector.check(MALLORY) is None
    errors: list[str] = []
    for check, token in [
        (introspector.check, "tok-500-" + ALICE),
        (introspector.check, "tok-html-" + ALICE),
        (wrong_creds.check, ALICE),
        (down.check, ALICE),
    ]:
        with pytest.raises(IntrospectionFailed) as failure:
            await check(token)
        errors.append(str(failure.value))
        errors.append(repr(failure.value))

    ours = [r for r in caplog.records if r.name == "streamllm.gateway.introspection"]
    assert ours, "the refusals should have been logged, or this test checks nothing"
    texts = [r.getMessage() for r in caplog.records] + errors
    texts.append(repr(introspector.settings))
    for secret in (ALICE, MALLORY, CLIENT_SECRET, basic(CLIENT_ID, CLIENT_SECRET).split()[1]):
        leaks = [t for t in texts if secret in t]
        assert not leaks, f"a secret leaked into: {leaks}"


# -- settings and ownership ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://auth.globus.org/v2/oauth2/token/introspect", True),
        ("http://127.0.0.1:8080/introspect", True),
        ("http://localhost:8080/introspect", True),
        ("http://[::1]:8080/introspect", True),
        ("http://auth.globus.org/v2/oauth2/token/introspect", False),  # token in clear text
        ("http://10.0.0.5/introspect", False),
        ("auth.globus.org/introspect", False),
    ],
)
def test_settings_require_https_off_loopback(url, ok):
    def build() -> IntrospectionSettings:
        return IntrospectionSettings(url=url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)

    if ok:
        assert build().url == url
    else:
        with pytest.raises(ValueError):
            build()


async def test_a_client_passed_in_is_left_open(double, make, clock):
    double.answers[ALICE] = active(clock)
    async with httpx2.AsyncClient() as client:
        introspector = make(client=client)
        assert await introspector.check(ALICE) is not None
        await introspector.aclose()
        assert not client.is_closed
