"""Files for the Batch API: bytes in `<data_dir>/files/<id>`, metadata in the store.

A file's path is made from its id alone (which this module generates and checks), never from
the name it was uploaded with; that name is metadata. Bytes are written under a temporary name
and renamed into place, so a file that has a record is always complete.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from streamllm.store import Store
from streamllm.store import batches as records
from streamllm.store.batches import FileRecord

FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
COPY_BUFFER = 1024 * 1024


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def display_name(name: str | None, default: str = "upload.jsonl") -> str:
    """The name a file is listed under: the uploaded name's last part, printable, bounded."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:255] or default


class FileStore:
    def __init__(self, store: Store, data_dir: str | os.PathLike[str]):
        self.store = store
        self.root = Path(data_dir).expanduser().absolute() / "files"

    def path(self, file_id: str) -> Path:
        if not FILE_ID.match(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return self.root / file_id

    async def add(self, caller: str | None, purpose: str, filename: str,
                  write: Callable[[BinaryIO], int], *, record: bool = True) -> FileRecord:
        """A new file whose bytes `write` puts into the open file it is given (in a worker
        thread) and whose size it returns. With `record` false the caller stores the record
        itself (to do so in one transaction with something else)."""
        file_id = new_file_id()
        target = self.path(file_id)
        size = await asyncio.to_thread(_write_into_place, target, write)
        made = FileRecord(id=file_id, caller=caller, purpose=purpose, filename=filename,
                          bytes=size, created_at=time.time())
        if record:
            try:
                await records.insert_file(self.store, made)
            except BaseException:
                target.unlink(missing_ok=True)
                raise
        return made

    async def upload(self, caller: str | None, purpose: str, filename: str,
                     source: BinaryIO) -> FileRecord:
        def copy(out: BinaryIO) -> int:
            source.seek(0)
            shutil.copyfileobj(source, out, COPY_BUFFER)
            return out.tell()

        return await self.add(caller, purpose, display_name(filename), copy)

    async def get(self, caller: str | None, file_id: str) -> FileRecord | None:
        if not FILE_ID.match(file_id):
            return None
        return await records.file_for(self.store, caller, file_id)

    async def delete(self, caller: str | None, file_id: str) -> bool:
        if not FILE_ID.match(file_id) or not await records.delete_file(self.store, caller,
                                                                      file_id):
            return False
        await asyncio.to_thread(self.path(file_id).unlink, missing_ok=True)
        return True

    def discard(self, file_id: str) -> None:
        """Remove bytes whose record was never stored."""
        self.path(file_id).unlink(missing_ok=True)

    def new(self, caller: str | None, purpose: str, filename: str) -> NewFile:
        """A file to be written a piece at a time (a batch's output), placed when complete."""
        return NewFile(self, caller, purpose, filename)


class NewFile:
    """A file being written in pieces: its bytes go under a temporary name until `place`,
    which returns its record for the caller to store."""

    def __init__(self, files: FileStore, caller: str | None, purpose: str, filename: str):
        self.id = new_file_id()
        self.caller, self.purpose, self.filename = caller, purpose, filename
        self.target = files.path(self.id)
        self.partial = self.target.with_name(self.target.name + ".part")
        self.size = 0
        self._out: BinaryIO | None = None

    async def write(self, data: bytes) -> None:
        if not data:
            return
        if self._out is None:
            await asyncio.to_thread(self.target.parent.mkdir, parents=True, exist_ok=True)
            self._out = await asyncio.to_thread(open, self.partial, "wb")
        await asyncio.to_thread(self._out.write, data)
        self.size += len(data)

    async def place(self) -> FileRecord | None:
        """Move the complete file into place; None (and nothing on disk) if it is empty."""
        out, self._out = self._out, None
        if out is None:
            return None

        def finish() -> None:
            with out:
                out.flush()
                os.fsync(out.fileno())
            os.replace(self.partial, self.target)

        await asyncio.to_thread(finish)
        return FileRecord(id=self.id, caller=self.caller, purpose=self.purpose,
                          filename=self.filename, bytes=self.size, created_at=time.time())

    def abandon(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        self.partial.unlink(missing_ok=True)
        self.target.unlink(missing_ok=True)


def _write_into_place(target: Path, write: Callable[[BinaryIO], int]) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with open(partial, "wb") as out:
            size = write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return size
