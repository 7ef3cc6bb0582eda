"""`/v1/usage`: the caller's own usage (totals, per tier, per day, one request), and for
admin keys everyone's."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from streamllm.caller import Caller
from streamllm.errors import InvalidRequest, NotFound, PermissionDenied
from streamllm.gateway.runtime import Runtime
from streamllm.store import usage as ledger

DAY = 86400


def _days(request: Request) -> int:
    raw = request.query_params.get("days", "30")
    if not raw.isdigit() or not 1 <= int(raw) <= 3660:
        raise InvalidRequest("days must be a whole number from 1 to 3660", param="days")
    return int(raw)


def usage_router(runtime: Runtime) -> APIRouter:
    router = APIRouter()

    def caller_of(request: Request) -> Caller | None:
        return getattr(request.state, "caller", None)

    @router.get("/v1/usage")
    async def my_usage(request: Request) -> JSONResponse:
        caller = caller_of(request)
        days = _days(request)
        await runtime.accounts.flush()
        since = time.time() - days * DAY
        summary = await ledger.summary(runtime.store, caller.name if caller else None, since)
        return JSONResponse({"object": "stream.usage", "key": caller.name if caller else None,
                             "days": days, **summary})

    @router.get("/v1/usage/requests/{request_id}")
    async def one_request(request_id: str, request: Request) -> JSONResponse:
        caller = caller_of(request)
        row = runtime.accounts.pending(request_id)
        if row is None:
            await runtime.accounts.flush()  # a flush under way holds it until it is written
            row = await ledger.row_for(runtime.store, request_id)
        if row is None or row.caller != (caller.name if caller else None):
            raise NotFound(f"No request `{request_id}` of this caller is in the ledger.",
                           param="request_id")
        return JSONResponse({"object": "stream.usage.request", **row.public()})

    @router.get("/v1/usage/all")
    async def everyone(request: Request) -> JSONResponse:
        caller = caller_of(request)
        if caller is not None and not caller.admin:
            raise PermissionDenied("Only admin keys may see everyone's usage.")
        days = _days(request)
        await runtime.accounts.flush()
        since = time.time() - days * DAY
        return JSONResponse({
            "object": "stream.usage.all", "days": days,
            **await ledger.summary(runtime.store, None, since, everyone=True),
            "callers": await ledger.by_caller(runtime.store, since),
        })

    return router
