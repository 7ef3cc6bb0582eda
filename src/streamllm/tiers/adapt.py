"""Shape a client's request for one backend (pure): model name, usage, unsupported fields."""

from __future__ import annotations

from typing import Any

from streamllm.config import TierSettings

# Fields that are STREAM's own and never leave the gateway.
STREAM_FIELDS = ("allow_cloud", "full_context")
# Backends that ignore `max_completion_tokens` but honour `max_tokens`.
LEGACY_MAX_TOKENS = {"ollama", "llamacpp"}


def backend_body(
    client_body: dict[str, Any], model: str, tier: TierSettings, *, stream: bool
) -> dict[str, Any]:
    body = {k: v for k, v in client_body.items() if k not in STREAM_FIELDS}
    body["model"] = model
    if stream:
        body["stream"] = True
        # Always ask for usage so cost and token accounting never guess; the gateway strips the
        # usage chunk again unless the client asked for it.
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    else:
        body.pop("stream", None)
        body.pop("stream_options", None)
    if tier.kind in LEGACY_MAX_TOKENS and "max_completion_tokens" in body:
        limit = body.pop("max_completion_tokens")
        body.setdefault("max_tokens", limit)
    for name in tier.drop_params:
        body.pop(name, None)
    return body
