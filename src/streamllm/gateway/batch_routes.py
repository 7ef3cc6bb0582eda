"""`/v1/files` and `/v1/batches`: OpenAI's Files and Batch APIs, each object its caller's own.

Uploads are parsed as they arrive and refused with 413 as soon as they pass
`batch.max_file_bytes`; the work itself is `streamllm.batch`'s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import FileResponse, JSONResponse

from streamllm.caller import Caller
from streamllm.errors import InvalidRequest, NotFound, PayloadTooLarge
from streamllm.gateway.chat import read_json_body
from streamllm.gateway.runtime import Runtime
from streamllm.store import batches as records

UPLOAD_PURPOSES = ("batch",)
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, headers and the purpose field
FILES_LIMIT = 10_000
BATCHES_LIMIT = 100


def _limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise InvalidRequest(f"limit must be a whole number from 1 to {most}", param="limit")
    return int(raw)


def _page(data: list[dict[str, Any]], more: bool) -> JSONResponse:
    return JSONResponse({"object": "list", "data": data, "has_more": more,
                         "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None})


async def _bounded(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for part in stream:
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(f"the upload is larger than the {limit}-byte limit")
        yield part


def batch_router(runtime: Runtime) -> APIRouter:
    router = APIRouter()
    settings = runtime.settings.batch

    def caller_of(request: Request) -> Caller | None:
        return getattr(request.state, "caller", None)

    def owner(request: Request) -> str | None:
        caller = caller_of(request)
        return caller.name if caller else None

    # -- files ---------------------------------------------------------------------------------
    @router.post("/v1/files")
    async def upload(request: Request) -> JSONResponse:
        limit = settings.max_file_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit + \
                FORM_OVERHEAD:
            raise PayloadTooLarge(f"the file is larger than the {limit}-byte limit "
                                  "(batch.max_file_bytes)")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise InvalidRequest("upload the file as multipart/form-data, with fields `file` "
                                 "and `purpose`")
        parser = MultiPartParser(request.headers, _bounded(request.stream(),
                                                           limit + FORM_OVERHEAD),
                                 max_files=1, max_fields=8)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise InvalidRequest(
                f"the upload is not valid multipart/form-data: {e.message}") from None
        try:
            purpose = form.get("purpose")
            if not isinstance(purpose, str) or purpose not in UPLOAD_PURPOSES:
                raise InvalidRequest(f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}",
                                     param="purpose")
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise InvalidRequest("'file' is a required property", param="file")
            if file.size is not None and file.size > limit:
                raise PayloadTooLarge(f"the file is larger than the {limit}-byte limit "
                                      "(batch.max_file_bytes)")
            made = await runtime.files.upload(owner(request), purpose, file.filename or "",
                                              file.file)
        finally:
            await form.close()
        return JSONResponse(made.public())

    @router.get("/v1/files")
    async def list_files(request: Request) -> JSONResponse:
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be asc or desc", param="order")
        found, more = await records.list_files(
            runtime.store, owner(request), purpose=request.query_params.get("purpose"),
            newest_first=order == "desc", limit=_limit(request, FILES_LIMIT, FILES_LIMIT),
            after=request.query_params.get("after"))
        return _page([f.public() for f in found], more)

    async def mine(request: Request, file_id: str) -> records.FileRecord:
        found = await runtime.files.get(owner(request), file_id)
        if found is None:
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        return found

    @router.get("/v1/files/{file_id}")
    async def one_file(file_id: str, request: Request) -> JSONResponse:
        return JSONResponse((await mine(request, file_id)).public())

    @router.get("/v1/files/{file_id}/content")
    async def content(file_id: str, request: Request) -> FileResponse:
        found = await mine(request, file_id)
        path = runtime.files.path(found.id)
        if not path.exists():
            raise NotFound(f"The content of {file_id} is gone.", param="file_id")
        return FileResponse(path, media_type="application/octet-stream",
                            filename=found.filename)

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request) -> JSONResponse:
        await mine(request, file_id)
        reader = await records.batch_reading(runtime.store, file_id)
        if reader is not None:
            raise InvalidRequest(f"The file is the input of batch {reader}, which has not "
                                 "finished; cancel it or wait for it first.", param="file_id")
        if not await runtime.files.delete(owner(request), file_id):
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    # -- batches -------------------------------------------------------------------------------
    @router.post("/v1/batches")
    async def create(request: Request) -> JSONResponse:
        body = await read_json_body(request, 64 * 1024)
        return JSONResponse(await runtime.batches.create(caller_of(request), body))

    @router.get("/v1/batches")
    async def list_batches(request: Request) -> JSONResponse:
        data, more = await runtime.batches.listing(
            caller_of(request), _limit(request, 20, BATCHES_LIMIT),
            request.query_params.get("after"))
        return _page(data, more)

    @router.get("/v1/batches/{batch_id}")
    async def one_batch(batch_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await runtime.batches.get(caller_of(request), batch_id))

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await runtime.batches.cancel(caller_of(request), batch_id))

    return router
