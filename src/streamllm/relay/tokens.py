"""Per-channel capability tokens: HMAC-SHA256 over channel, role, expiry and a nonce.

The gateway mints one token per side of a channel; the relay verifies it with the secret it
shares with the gateway and accepts each token once. A token travels in a header or the first
WebSocket message, never in a URL. Pure: the clock and the memory of used tokens are passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from typing import Literal

from streamllm.errors import TokenRejected

Role = Literal["producer", "consumer"]
ROLES: tuple[Role, ...] = ("producer", "consumer")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Claims:
    channel: str
    role: Role
    expires: float
    nonce: str


def mint(secret: bytes, channel: str, role: Role, ttl_s: float, now: float | None = None) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    now = time.time() if now is None else now
    claims = {"c": channel, "r": role, "e": round(now + ttl_s, 3), "n": _b64(os.urandom(12))}
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


class TokenVerifier:
    """Checks tokens for one relay and remembers used ones until they expire."""

    def __init__(self, secret: bytes, max_remembered: int = 1_000_000):
        self._secret = secret
        self._used: dict[str, float] = {}
        self._max = max_remembered

    def verify(self, token: str, channel: str, role: Role, now: float | None = None) -> Claims:
        now = time.time() if now is None else now
        try:
            body, mac = token.split(".")
            expected = hmac.new(self._secret, body.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(mac)):
                raise TokenRejected("relay token signature is invalid")
            raw = json.loads(_unb64(body))
            claims = Claims(str(raw["c"]), raw["r"], float(raw["e"]), str(raw["n"]))
        except TokenRejected:
            raise
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TokenRejected("relay token is malformed") from None
        if claims.channel != channel:
            raise TokenRejected("relay token is for another channel")
        if claims.role != role:
            raise TokenRejected(f"relay token is for the {claims.role} role, not {role}")
        if claims.expires <= now:
            raise TokenRejected("relay token has expired")
        self._forget_expired(now)
        if claims.nonce in self._used:
            raise TokenRejected("relay token was already used")
        if len(self._used) >= self._max:
            raise TokenRejected("relay is remembering too many tokens; try again shortly")
        self._used[claims.nonce] = claims.expires
        return claims

    def _forget_expired(self, now: float) -> None:
        if len(self._used) > 1024:
            for nonce in [n for n, exp in self._used.items() if exp <= now]:
                del self._used[nonce]
