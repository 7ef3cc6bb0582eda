"""`create_app(settings)`: the gateway as a FastAPI app, with no global state.

Routes: POST /v1/chat/completions, GET /v1/models[/{id}], GET /health, GET /health/ready;
/v1/files and /v1/batches (gateway/batch_routes.py), /v1/usage (gateway/usage_routes.py).
"""

from __future__ import annotations

import contextlib
import html
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from streamllm import __version__
from streamllm.config import TIERS, Settings
from streamllm.errors import ConfigError, ModelNotFound, NotFound
from streamllm.gateway import errors
from streamllm.gateway.auth import Authenticator, AuthMiddleware
from streamllm.gateway.batch_routes import batch_router
from streamllm.gateway.chat import ChatHandler
from streamllm.gateway.introspection import IntrospectionSettings, TokenIntrospector
from streamllm.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from streamllm.gateway.middleware import RequestContext
from streamllm.gateway.runtime import Runtime, preflight
from streamllm.gateway.ui_routes import static_files, ui_router
from streamllm.gateway.usage_routes import usage_router
from streamllm.protocol.models import ModelCard, ModelList
from streamllm.store.keys import keys_were_made
from streamllm.tiers.federation import FederatedHPCBackend


def _model_cards(runtime: Runtime) -> list[ModelCard]:
    def owner(tier: str) -> str:
        return "simulator" if runtime.simulated(tier) else runtime.tiers[tier].kind

    def state(tier: str) -> str:
        return runtime.health[tier].state

    def placed(tier: str, model: str) -> dict:
        """For a federated tier: the model's state and the clusters behind it."""
        backend = runtime.backends.get(tier)
        if not isinstance(backend, FederatedHPCBackend):
            return {"state": state(tier)}
        return {"state": backend.model_state(model), "endpoints": backend.endpoints(model)}

    if runtime.settings.server.profile == "hpc-as-api":
        # The cluster's models by their own names, as vLLM itself would list them.
        return [
            ModelCard(id=model, owned_by=owner("hpc"), tier="hpc", **placed("hpc", model))
            for model in runtime.catalogue.get("hpc", ())
        ]

    cards = [
        ModelCard(
            id="auto", owned_by="streamllm", tier="auto",
            description="STREAM picks the tier by judging each request",
        )
    ]
    for tier in TIERS:
        if tier in runtime.tiers:
            default = runtime.catalogue[tier][0] if runtime.catalogue[tier] else None
            cards.append(
                ModelCard(id=tier, owned_by=owner(tier), tier=tier, state=state(tier),
                          default_model=default)
            )
    for tier in TIERS:
        for model in runtime.catalogue.get(tier, ()):
            cards.append(
                ModelCard(id=f"{tier}/{model}", owned_by=owner(tier), tier=tier,
                          **placed(tier, model))
            )
    for alias, target in runtime.settings.aliases.items():
        cards.append(ModelCard(id=alias, owned_by="streamllm", tier="alias", alias_of=target))
    return cards


def _introspector(settings: Settings) -> TokenIntrospector | None:
    oauth = settings.server.oauth
    if oauth is None:
        return None
    secret = os.environ.get(oauth.client_secret_env, "")
    if not secret:
        raise ConfigError(f"server.oauth: the client secret is not in ${oauth.client_secret_env}")
    try:
        return TokenIntrospector(IntrospectionSettings(
            url=oauth.introspection_url, client_id=oauth.client_id, client_secret=secret,
            allowed_domains=tuple(oauth.allowed_domains),
            allowed_groups=tuple(oauth.allowed_groups), groups_claim=oauth.groups_claim,
            required_scope=oauth.required_scope, cache_s=oauth.cache_s))
    except ValueError as e:
        raise ConfigError(f"server.oauth: {e}") from None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    api_keys = settings.server.load_api_keys()
    preflight(settings)
    if settings.server.profile == "hpc-as-api" and not api_keys and \
            settings.server.oauth is None and \
            not keys_were_made(settings.server.database_url, settings.server.data_dir):
        raise ConfigError(
            "server.profile hpc-as-api requires API keys (`streamllm keys create`, "
            "server.api_keys or server.api_keys_file, or server.oauth): it is meant to be "
            "reached by other people"
        )
    runtime = Runtime(settings)
    introspector = _introspector(settings)
    auth = Authenticator(settings.server, lambda: runtime.store, introspector)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()
            if introspector is not None:
                await introspector.aclose()

    app = FastAPI(
        title="STREAM", version=__version__, lifespan=lifespan,
        docs_url="/docs", redoc_url=None,
    )
    app.state.runtime = runtime
    errors.install(app)
    app.add_middleware(AuthMiddleware, authenticator=auth)
    app.add_middleware(RequestContext)  # added last, so it runs first: 401s get request ids too
    chat = ChatHandler(runtime)

    # A plain Starlette route: the handler reads and validates its own body (to control the
    # error envelope and the size limit), so FastAPI's per-request dependency solving would be
    # pure overhead on the hottest path.
    async def chat_completions(request: Request) -> Response:
        return await chat(request)

    app.add_route(
        "/v1/chat/completions", chat_completions, methods=["POST"], include_in_schema=False
    )

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=_model_cards(runtime)).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        for card in _model_cards(runtime):
            if card.id == model_id:
                return JSONResponse(card.model_dump())
        raise ModelNotFound(f"The model `{model_id}` does not exist.", param="model")

    @app.get("/v1/stream/summaries/{summary_id}")
    async def get_summary(summary_id: str, request: Request) -> JSONResponse:
        # The summary a response named in x-stream-summary-id, for its own caller only.
        key = getattr(request.state, "api_key", None)
        record = await runtime.context.summary(summary_id, key.holder if key else None)
        if record is None:
            raise NotFound(f"No summary `{summary_id}` exists for this caller.",
                           param="summary_id")
        return JSONResponse({
            "id": summary_id, "object": "stream.summary", "tier": record.tier,
            "messages_summarized": record.turns, "method": record.method,
            "tokens": record.tokens, "created": int(record.created_at),
            "extends": f"{record.tier}.{record.parent_hash}" if record.parent_hash else None,
            "text": record.text,
        })

    app.include_router(usage_router(runtime))
    app.include_router(batch_router(runtime))
    app.include_router(ui_router(runtime, auth))
    app.mount("/ui/static", static_files(), name="ui-static")

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        if not settings.server.metrics:
            raise NotFound("metrics are turned off (server.metrics: false)")
        return Response(runtime.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/status", include_in_schema=False)
    async def status_page() -> HTMLResponse:
        # A status page, so that opening the address in a browser says what is running.
        rows = "".join(
            f"<tr><td>{html.escape(t)}</td><td>{html.escape(runtime.health[t].state)}</td>"
            f"<td>{'simulator' if runtime.simulated(t) else html.escape(runtime.backends[t].name)}"
            f"</td><td>{html.escape(', '.join(runtime.catalogue[t]))}</td></tr>"
            for t in runtime.tiers
        )
        return HTMLResponse(
            "<!doctype html><html lang=en><meta charset=utf-8><title>STREAM</title>"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<h1>STREAM {__version__}</h1><p>OpenAI-compatible API at <code>/v1</code> "
            "(point any OpenAI client's base URL here, model <code>auto</code>). "
            "<a href='/v1/models'>Models</a> · <a href='/health/ready'>Tier health</a> · "
            "<a href='/docs'>API docs</a></p>"
            "<table><tr><th>tier<th>state<th>backend<th>models</tr>" + rows + "</table></html>"
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        tiers = {
            tier: {
                **runtime.health[tier].as_dict(),
                "backend": runtime.backends[tier].name,
                "simulated": runtime.simulated(tier),
                "models": runtime.catalogue[tier],
                "routable": runtime.healthy(tier),
            }
            for tier in runtime.tiers
        }
        up = [t for t, h in tiers.items() if h["state"] == "up"]
        status = "ready" if len(up) == len(tiers) else "degraded" if up else "unavailable"
        return JSONResponse(
            {"status": status, "tiers": tiers}, status_code=200 if up else 503
        )

    return app
