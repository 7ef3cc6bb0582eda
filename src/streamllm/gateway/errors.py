"""The one place typed errors become HTTP responses in OpenAI's error envelope."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from streamllm.errors import BackendRateLimited, LimitExceeded, StreamError
from streamllm.protocol.errors import ErrorEnvelope

log = logging.getLogger("streamllm.gateway")

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def envelope(err: StreamError) -> dict:
    return ErrorEnvelope.of(err.message, err.type, err.param, err.code).model_dump()


def error_response(err: StreamError) -> JSONResponse:
    headers = {}
    if isinstance(err, BackendRateLimited):
        headers["retry-after"] = "1"
    elif isinstance(err, LimitExceeded):
        headers["retry-after"] = str(max(1, math.ceil(err.retry_after)))
    return JSONResponse(envelope(err), status_code=err.status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(StreamError)
    async def _typed(request: Request, exc: StreamError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("request failed: %s", exc.message)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = ErrorEnvelope.of(
            str(exc.detail), _STATUS_TYPES.get(exc.status_code, "invalid_request_error"),
            code=None,
        )
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        body = ErrorEnvelope.of(f"{first['msg']}", "invalid_request_error", param)
        return JSONResponse(body.model_dump(), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error (this is a STREAM bug)")
        body = ErrorEnvelope.of("internal error in the STREAM gateway", "server_error")
        return JSONResponse(body.model_dump(), status_code=500)
