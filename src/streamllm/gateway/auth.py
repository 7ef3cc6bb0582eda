"""Who is calling: API keys (from the configuration or the store), institutional OAuth tokens
(RFC 7662 introspection), or the web chat's session cookie; checked before anything else runs.

Pure ASGI, like the request-context middleware, so streaming responses pass through untouched.
Keys are held only as SHA-256 digests and compared in constant time; a key never reaches a log.
With no key configured, stored or obtainable by login, the server is in single-user mode: the
API is open (and `serve` keeps it on loopback).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

from streamllm.caller import Caller
from streamllm.config import ApiKeySettings, ServerSettings
from streamllm.errors import AuthenticationFailed, ServiceUnavailable
from streamllm.gateway.errors import error_response
from streamllm.gateway.introspection import IntrospectionFailed, TokenIntrospector
from streamllm.store import Store
from streamllm.store import conversations as sessions
from streamllm.store import keys as stored_keys

PROTECTED_PREFIXES = ("/v1", "/ui/api")  # health, metrics, the page itself stay open
SESSION_COOKIE = "stream_session"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def caller_from_settings(k: ApiKeySettings) -> Caller:
    return Caller(name=k.holder, admin=k.admin, allow_cloud=k.allow_cloud,
                  allow_tiers=frozenset(k.allow_tiers) if k.allow_tiers else None,
                  budget_usd=k.budget_usd, rpm=k.rpm, max_concurrent=k.max_concurrent)


def caller_from_record(k: stored_keys.KeyRecord) -> Caller:
    tiers = frozenset(k.allow_tiers) if k.allow_tiers else None
    return Caller(name=k.name, key_id=k.id, admin=k.admin, allow_tiers=tiers,
                  allow_cloud=tiers is None or "cloud" in tiers, budget_usd=k.budget_usd,
                  rpm=k.rpm, max_concurrent=k.max_concurrent)


class Authenticator:
    """Turns credentials into a Caller. `store` is a callable because the store opens with the
    app's lifespan, after the middleware is built."""

    def __init__(self, settings: ServerSettings, store: Callable[[], Store | None],
                 introspector: TokenIntrospector | None = None):
        self.settings = settings
        self.static = [(_digest(k.key), caller_from_settings(k))
                       for k in settings.load_api_keys()]
        self.store = store
        self.introspector = introspector
        self._oauth_defaults = settings.oauth
        self._key_cache: dict[bytes, tuple[float, Caller | None]] = {}
        self._stored_count: tuple[float, int] = (0.0, -1)
        self._closed = False  # a key has existed: single-user mode is over

    async def required(self) -> bool:
        """Whether the API needs a credential now: keys in the configuration, OAuth login, or
        any key ever made in the store (re-checked every few seconds, so the first key made by
        `streamllm keys create` closes a running single-user server). Revoking every key does
        not open the server again: once keys exist, they are required for good."""
        if self.static or self.introspector is not None or self._closed:
            return True
        store = self.store()
        if store is None:
            return False
        at, count = self._stored_count
        if count < 0 or time.monotonic() - at >= self.settings.key_cache_s:
            count = await stored_keys.key_count(store)
            self._stored_count = (time.monotonic(), count)
        self._closed = count > 0
        return self._closed

    async def from_bearer(self, token: str) -> Caller | None:
        candidate = _digest(token)
        found = None
        for known, caller in self.static:  # no early exit: time does not depend on the match
            if hmac.compare_digest(candidate, known):
                found = caller
        if found is not None:
            return found
        store = self.store()
        if store is not None and token.startswith(stored_keys.KEY_PREFIX):
            cached = self._key_cache.get(candidate)
            if cached is not None and time.monotonic() - cached[0] < self.settings.key_cache_s:
                return cached[1]
            record = await stored_keys.key_for(store, token)
            caller = caller_from_record(record) if record else None
            if len(self._key_cache) > 10_000:
                self._key_cache.clear()
            self._key_cache[candidate] = (time.monotonic(), caller)
            return caller
        if self.introspector is not None:
            principal = await self.introspector.check(token)
            if principal is not None:
                oauth = self._oauth_defaults
                return Caller(name=principal.name,
                              allow_cloud=oauth.allow_cloud if oauth else True,
                              budget_usd=oauth.budget_usd if oauth else None)
        return None

    async def from_session(self, token: str) -> Caller | None:
        store = self.store()
        if store is None:
            return None
        found = await sessions.session(store, token)
        if found is None:
            return None
        name, key_id = found
        if key_id is not None:
            record = await stored_keys.key_by_id(store, key_id)
            return caller_from_record(record) if record and record.revoked_at is None else None
        for _, caller in self.static:
            if caller.name == name:
                return caller
        return None  # the key it was opened with is gone from the configuration


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def session_token(scope: dict) -> str | None:
    cookies = _header(scope, b"cookie")
    if not cookies:
        return None
    for part in cookies.split(";"):
        name, _, value = part.strip().partition("=")
        if name == SESSION_COOKIE and value:
            return value
    return None


def _same_origin(scope: dict) -> bool:
    # The session cookie is SameSite=Strict; this also refuses a cross-site page's request
    # where a browser sent it anyway.
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    host = _header(scope, b"host") or ""
    return origin.split("://", 1)[-1] == host


class AuthMiddleware:
    """Leaves the Caller (or None in single-user mode) in the request state as `caller`."""

    def __init__(self, app: Any, authenticator: Authenticator):
        self.app = app
        self.auth = authenticator

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        err = None
        try:
            caller = await self._caller(scope)
            if caller is None and await self.auth.required():
                err = self._missing(scope)
        except IntrospectionFailed as e:
            caller, err = None, ServiceUnavailable(
                f"The institution's login service could not be asked: {e}")
        if err is not None:
            response = error_response(err)
            if err.status == 401:
                response.headers["www-authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        state["caller"] = caller
        await self.app(scope, receive, send)

    async def _caller(self, scope: dict) -> Caller | None:
        scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return await self.auth.from_bearer(token.strip())
        cookie = session_token(scope)
        if cookie and _same_origin(scope):
            return await self.auth.from_session(cookie)
        return None

    def _missing(self, scope: dict) -> AuthenticationFailed:
        scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return AuthenticationFailed("Incorrect API key provided.")
        if session_token(scope):
            return AuthenticationFailed("Your session has ended; sign in again.")
        return AuthenticationFailed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
