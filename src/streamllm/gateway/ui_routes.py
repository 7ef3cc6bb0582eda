"""The web chat's own routes: the page and its static files, sign-in sessions, server-side
conversations and the settings the page offers. Chat itself goes through `/v1`."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from streamllm.caller import Caller
from streamllm.config import TIERS
from streamllm.errors import AuthenticationFailed, InvalidRequest, NotFound
from streamllm.gateway.auth import SESSION_COOKIE, Authenticator, session_token
from streamllm.gateway.chat import read_json_body
from streamllm.gateway.errors import error_response
from streamllm.gateway.runtime import Runtime
from streamllm.store import conversations

UI_DIR = str(resources.files("streamllm.ui"))
TITLE_LIMIT = 200


def static_files() -> StaticFiles:
    return StaticFiles(directory=UI_DIR)


def _title(body: Any) -> str | None:
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    title = body.get("title")
    if title is None:
        return None
    if not isinstance(title, str) or not title.strip() or len(title) > TITLE_LIMIT:
        raise InvalidRequest(f"title must be 1 to {TITLE_LIMIT} characters", param="title")
    return title.strip()


def ui_router(runtime: Runtime, auth: Authenticator) -> APIRouter:
    router = APIRouter()

    def caller_of(request: Request) -> Caller | None:
        return getattr(request.state, "caller", None)

    def owner(request: Request) -> str | None:
        caller = caller_of(request)
        return caller.name if caller else None

    @router.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(f"{UI_DIR}/index.html", headers={"cache-control": "no-cache"})

    # -- sessions ------------------------------------------------------------------------------
    @router.get("/ui/session")
    async def current(request: Request) -> JSONResponse:
        token = session_token(request.scope)
        caller = await auth.from_session(token) if token else None
        return JSONResponse({"auth_required": await auth.required(),
                             "signed_in": caller is not None,
                             "name": caller.name if caller else None,
                             "admin": bool(caller and caller.admin)})

    @router.post("/ui/session")
    async def sign_in(request: Request) -> Response:
        body = await read_json_body(request, 16 * 1024)
        key = body.get("api_key") if isinstance(body, dict) else None
        if not isinstance(key, str) or not key.strip():
            raise InvalidRequest("api_key is required", param="api_key")
        caller = await auth.from_bearer(key.strip())
        if caller is None:
            return error_response(AuthenticationFailed("Incorrect API key provided."))
        hours = runtime.settings.server.session_hours
        token = await conversations.open_session(runtime.store, caller.name, caller.key_id,
                                                 hours * 3600)
        response = JSONResponse({"signed_in": True, "name": caller.name,
                                 "admin": caller.admin})
        secure = request.url.scheme == "https" or \
            request.headers.get("x-forwarded-proto") == "https"
        # HttpOnly: page scripts never see it; Strict: no other site's request carries it.
        response.set_cookie(SESSION_COOKIE, token, max_age=int(hours * 3600), httponly=True,
                            samesite="strict", secure=secure, path="/")
        return response

    @router.delete("/ui/session")
    async def sign_out(request: Request) -> Response:
        token = session_token(request.scope)
        if token:
            await conversations.close_session(runtime.store, token)
        response = Response(status_code=204)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # -- what the page offers ---------------------------------------------------------------------
    @router.get("/ui/api/config")
    async def config(request: Request) -> JSONResponse:
        caller = caller_of(request)
        tiers = [t for t in TIERS if t in runtime.tiers and (caller is None or caller.may_use(t))]
        return JSONResponse({
            "tiers": tiers, "judges": sorted(runtime.judges),
            "default_judge": runtime.settings.routing.judge.kind,
            "allow_cloud": runtime.settings.routing.allow_cloud
            and (caller is None or caller.allow_cloud),
            "name": caller.name if caller else None,
        })

    # -- conversations ------------------------------------------------------------------------------
    def card(c: conversations.Conversation) -> dict[str, Any]:
        return {"id": c.id, "title": c.title, "created": c.created, "updated": c.updated,
                "messages": c.messages}

    @router.get("/ui/api/conversations")
    async def listing(request: Request) -> JSONResponse:
        found = await conversations.listing(runtime.store, owner(request))
        return JSONResponse({"object": "list", "data": [card(c) for c in found]})

    @router.post("/ui/api/conversations")
    async def create(request: Request) -> JSONResponse:
        raw = await request.body()
        title = _title(await read_json_body(request, 16 * 1024)) if raw.strip() else None
        made = await conversations.create(runtime.store, owner(request),
                                          title or "New conversation")
        return JSONResponse(card(made), status_code=201)

    @router.get("/ui/api/conversations/{conversation_id}")
    async def one(conversation_id: str, request: Request) -> JSONResponse:
        found = await conversations.get(runtime.store, owner(request), conversation_id)
        if found is None:
            raise NotFound(f"No conversation `{conversation_id}`.", param="conversation_id")
        conv, messages = found
        return JSONResponse({**card(conv), "messages": messages})

    @router.patch("/ui/api/conversations/{conversation_id}")
    async def rename(conversation_id: str, request: Request) -> JSONResponse:
        title = _title(await read_json_body(request, 16 * 1024))
        if title is None:
            raise InvalidRequest("title is required", param="title")
        if not await conversations.rename(runtime.store, owner(request), conversation_id,
                                          title):
            raise NotFound(f"No conversation `{conversation_id}`.", param="conversation_id")
        return await one(conversation_id, request)

    @router.delete("/ui/api/conversations/{conversation_id}")
    async def delete(conversation_id: str, request: Request) -> Response:
        if not await conversations.remove(runtime.store, owner(request), conversation_id):
            raise NotFound(f"No conversation `{conversation_id}`.", param="conversation_id")
        return Response(status_code=204)

    return router
