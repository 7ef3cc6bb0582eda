"""Institutional login: bearer tokens checked by OAuth 2.0 Token Introspection (RFC 7662).

Owns asking the introspection endpoint (Globus Auth or any RFC 7662 server) about a token,
the local policy on its answer (domains, groups, scope), and the cache in front of the endpoint.

Decisions worth knowing:
- When both `allowed_domains` and `allowed_groups` are configured, a token must pass *both*:
  configuring a group narrows the institution, it does not open a second door.
- The request is the plain RFC 7662 form (`token=...`), without Globus's `include=identity_set`:
  nothing here uses linked identities, and a strict non-Globus server may reject the parameter.
- Answers are cached under a SHA-256 of the token, never the token: positive answers for
  `min(cache_s, exp - now)`, negative ones (inactive, expired, not allowed) for at most 10 s so
  a flood of bad tokens does not become a flood of introspection calls, yet a token that was
  refused a moment ago (say, before a group change) is soon asked about again. Failures to
  reach the endpoint are never cached.
- Globus answers `active: true` only to the resource server a token was issued for; with other
  servers, set `required_scope` so tokens minted for some other service are refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx2

log = logging.getLogger(__name__)

NEGATIVE_CACHE_S = 10.0  # upper bound on how long a refusal is remembered
MAX_CACHED_TOKENS = 10_000


@dataclass(frozen=True)
class IntrospectionSettings:
    url: str  # the introspection endpoint (https:// required unless the host is loopback)
    client_id: str
    client_secret: str  # the caller reads it from an env var; never logged
    allowed_domains: tuple[str, ...] = ()  # username/email domain, exact or a subdomain
    allowed_groups: tuple[str, ...] = ()  # any overlap with the token's groups claim
    groups_claim: str = "groups"  # the claim holding a list of group ids/names
    required_scope: str | None = None  # must be among the space-separated `scope`
    cache_s: float = 60.0  # how long an answer is cached (never beyond the token's exp)
    timeout_s: float = 5.0  # for the whole introspection call

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("introspection url must be an absolute http(s) URL")
        # The token and our client secret travel in this request: only TLS may carry them
        # off the machine.
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("introspection url must use https:// unless its host is loopback")
        if not self.client_id or not self.client_secret:
            raise ValueError("introspection needs the resource server's client id and secret")
        if self.timeout_s <= 0:
            raise ValueError("introspection timeout_s must be positive")
        if self.cache_s < 0:
            raise ValueError("introspection cache_s must not be negative")

    def __repr__(self) -> str:  # the dataclass default would print the secret
        return (
            f"IntrospectionSettings(url={self.url!r}, client_id={self.client_id!r}, "
            f"client_secret='***', allowed_domains={self.allowed_domains!r}, "
            f"allowed_groups={self.allowed_groups!r}, groups_claim={self.groups_claim!r}, "
            f"required_scope={self.required_scope!r}, cache_s={self.cache_s!r}, "
            f"timeout_s={self.timeout_s!r})"
        )


@dataclass(frozen=True)
class Principal:
    name: str  # "oauth:<username or sub>"
    username: str | None
    email: str | None
    groups: tuple[str, ...]
    expires_at: float | None  # the token's exp (seconds since the epoch), if the server said


class IntrospectionFailed(Exception):
    """The introspection server could not be asked (network, 5xx, bad JSON): answer 503, not 401."""


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token_key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _domain_of(address: Any) -> str | None:
    if not isinstance(address, str) or "@" not in address:
        return None
    return address.rpartition("@")[2].strip().rstrip(".").lower() or None


def _normalise_domain(domain: str) -> str:
    return domain.strip().lstrip("@.").rstrip(".").lower()


def _in_domains(domain: str | None, allowed: tuple[str, ...]) -> bool:
    # A subdomain matches only on a label boundary: "cs.uchicago.edu" yes, "evil-uchicago.edu" no.
    return domain is not None and any(domain == d or domain.endswith("." + d) for d in allowed)


def _string_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass
class _Cached:
    principal: Principal | None
    until: float  # on the monotonic clock


class TokenIntrospector:
    """Asks about bearer tokens: a Principal, None to refuse (401), or IntrospectionFailed (503)."""

    def __init__(
        self,
        settings: IntrospectionSettings,
        client: httpx2.AsyncClient | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_entries: int = MAX_CACHED_TOKENS,
    ):
        self.settings = settings
        self._owns_client = client is None
        self._client = client or httpx2.AsyncClient(timeout=settings.timeout_s)
        # Cache lifetimes run on a monotonic clock; `exp` is seconds since the epoch, so
        # comparing with it needs the wall clock.
        self._clock = clock
        self._wall_clock = wall_clock
        self._max_entries = max_entries
        self._domains = tuple(_normalise_domain(d) for d in settings.allowed_domains if d.strip())
        self._groups = frozenset(settings.allowed_groups)
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[Principal | None]] = {}

    async def check(self, token: str) -> Principal | None:
        key = _token_key(token)
        cached = self._cache.get(key)
        if cached is not None:
            if self._clock() < cached.until:
                self._cache.move_to_end(key)
                return cached.principal
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            # One introspection call per token however many requests carry it at once; the
            # call runs as its own task so one waiter's cancellation does not fail the others.
            task = asyncio.create_task(self._introspect_and_cache(key, token))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        return await asyncio.shield(task)

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()
        self._cache.clear()
        if self._owns_client:
            await self._client.aclose()

    def _forget(self, key: bytes, task: asyncio.Task[Principal | None]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # every waiter may have gone: mark the failure as seen

    async def _introspect_and_cache(self, key: bytes, token: str) -> Principal | None:
        answer = await self._introspect(token)
        principal, refusal = self._judge(answer)
        if refusal is not None:
            # A short digest lets operators correlate refusals without the token itself.
            log.info("oauth token %s refused: %s", key.hex()[:12], refusal)
        ttl = self.settings.cache_s
        if principal is None:
            ttl = min(ttl, NEGATIVE_CACHE_S)
        elif principal.expires_at is not None:
            ttl = min(ttl, principal.expires_at - self._wall_clock())
        self._remember(key, principal, ttl)
        return principal

    def _remember(self, key: bytes, principal: Principal | None, ttl: float) -> None:
        if ttl <= 0:
            return
        self._cache[key] = _Cached(principal, self._clock() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    async def _introspect(self, token: str) -> Mapping[str, Any]:
        s = self.settings
        host = urlsplit(s.url).hostname
        try:
            # The token goes only in the form body, never the URL: URLs end up in logs.
            # Globus's own SDK sends the id and secret as Basic credentials without
            # form-encoding them first, and Globus secrets contain "+" "/" "=", so neither do we.
            async with asyncio.timeout(s.timeout_s):
                resp = await self._client.post(
                    s.url,
                    data={"token": token},
                    auth=httpx2.BasicAuth(s.client_id, s.client_secret),
                    headers={"accept": "application/json"},
                    timeout=s.timeout_s,
                )
        except (httpx2.HTTPError, TimeoutError) as e:
            kind = "timed out" if isinstance(e, TimeoutError) else type(e).__name__
            raise IntrospectionFailed(f"token introspection at {host} failed: {kind}") from e
        if resp.status_code != 200:
            hint = " (check the client id and secret)" if resp.status_code in (401, 403) else ""
            raise IntrospectionFailed(
                f"token introspection at {host} answered HTTP {resp.status_code}{hint}"
            )
        try:
            answer = resp.json()
        except ValueError:
            raise IntrospectionFailed(
                f"token introspection at {host} answered invalid JSON"
            ) from None
        if not isinstance(answer, dict):
            raise IntrospectionFailed(f"token introspection at {host} answered JSON, not an object")
        return answer

    def _judge(self, answer: Mapping[str, Any]) -> tuple[Principal | None, str | None]:
        """The Principal an introspection answer grants, or None and why not."""
        s = self.settings
        if answer.get("active") is not True:  # RFC 7662: a boolean; "true" or 1 is not true
            return None, "inactive"
        exp = answer.get("exp")
        if exp is not None:
            if isinstance(exp, bool) or not isinstance(exp, (int, float)):
                return None, "exp is not a number"
            if exp <= self._wall_clock():
                return None, "expired"
        username = _string_or_none(answer.get("username"))
        email = _string_or_none(answer.get("email"))
        subject = username or _string_or_none(answer.get("sub"))
        if subject is None:
            return None, "no username or sub to name the caller by"
        if s.required_scope is not None:
            scope = answer.get("scope")
            if not isinstance(scope, str) or s.required_scope not in scope.split():
                return None, "required scope missing"
        claim = answer.get(s.groups_claim)
        groups = tuple(g for g in claim if isinstance(g, str)) if isinstance(claim, list) else ()
        if self._domains and not (
            _in_domains(_domain_of(username), self._domains)
            or _in_domains(_domain_of(email), self._domains)
        ):
            return None, "domain not allowed"
        if self._groups and self._groups.isdisjoint(groups):
            return None, "not in an allowed group"
        principal = Principal(
            name=f"oauth:{subject}",
            username=username,
            email=email,
            groups=groups,
            expires_at=float(exp) if exp is not None else None,
        )
        return principal, None
