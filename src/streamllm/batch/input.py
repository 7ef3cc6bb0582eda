"""Reading a batch's input file (pure: bytes in, lines and errors out).

A file the batch cannot use at all (not JSONL, a line without a custom_id or with one seen
before, another method or url, too many lines) fails the batch with every such line listed. A
line whose body is not a valid chat request only fails that line: it is kept, with the error
the chat endpoint would have answered, and goes to the batch's error file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from streamllm.batch.runner import parse_body
from streamllm.errors import InvalidRequest

MAX_CUSTOM_ID = 512
MAX_MODEL = 255
MAX_FILE_ERRORS = 100  # listed in the batch's errors; a broken file is not read to its end


@dataclass(frozen=True)
class InputLine:
    line: int  # 1-based
    custom_id: str
    model: str  # as the body names it ("auto" when it names none)
    offset: int  # where the line's bytes are in the file
    length: int
    invalid: InvalidRequest | None = None  # the body is not a valid chat request


@dataclass(frozen=True)
class FileError:
    """One reason the file is unusable, in OpenAI's batch error shape."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def public(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "param": self.param,
                "line": self.line}


def read_input(raw_lines: Iterable[bytes], endpoint: str,
               max_lines: int) -> tuple[list[InputLine], list[FileError]]:
    """The file's usable lines, or (when the list of errors is not empty) why it is unusable.

    `raw_lines` are the file's lines with their line endings (iterating a binary file gives
    them), so that each line's offset can be found again later.
    """
    lines: list[InputLine] = []
    errors: list[FileError] = []
    seen: set[str] = set()
    offset = 0
    number = 0
    for raw in raw_lines:
        number += 1
        start, offset = offset, offset + len(raw)
        if not raw.strip():
            continue  # blank lines (a trailing newline, say) are no requests
        if len(lines) >= max_lines:
            errors.append(FileError(
                "too_many_lines", f"The file has more than {max_lines} requests, the most "
                "one batch may hold.", number))
            break
        found = _line(raw, number, endpoint, seen)
        if isinstance(found, FileError):
            errors.append(found)
            if len(errors) >= MAX_FILE_ERRORS:
                break
            continue
        custom_id, model, invalid = found
        seen.add(custom_id)
        lines.append(InputLine(number, custom_id, model, start, len(raw), invalid))
    if not lines and not errors:
        errors.append(FileError("empty_file", "The file holds no requests."))
    return lines, errors


def _line(raw: bytes, number: int, endpoint: str,
          seen: set[str]) -> FileError | tuple[str, str, InvalidRequest | None]:
    try:
        item = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return FileError("invalid_json_line", f"Line {number} is not valid JSON.", number)
    if not isinstance(item, dict):
        return FileError("invalid_json_line", f"Line {number} is not a JSON object.", number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return FileError("missing_custom_id", f"Line {number} has no custom_id (a string).",
                         number, "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID:
        return FileError("invalid_custom_id", f"Line {number}: custom_id is longer than "
                         f"{MAX_CUSTOM_ID} characters.", number, "custom_id")
    if custom_id in seen:
        return FileError("duplicate_custom_id", f"Line {number}: the custom_id {custom_id!r} "
                         "is used by an earlier line; each request needs its own.", number,
                         "custom_id")
    if item.get("method") != "POST":
        return FileError("invalid_method", f"Line {number}: method must be POST.", number,
                         "method")
    if item.get("url") != endpoint:
        return FileError("invalid_url", f"Line {number}: url must be {endpoint}, the batch's "
                         "endpoint.", number, "url")
    body = item.get("body")
    if not isinstance(body, dict):
        return FileError("invalid_body", f"Line {number}: body must be a JSON object (the "
                         "chat completion request).", number, "body")
    model = body.get("model", "auto")
    invalid = None
    try:
        parse_body(body)
    except InvalidRequest as e:
        invalid = e
    if not isinstance(model, str):
        model = "auto"  # the line fails for its body; only its grouping needs a name
    elif len(model) > MAX_MODEL:
        invalid = invalid or InvalidRequest(
            f"Invalid value for 'model': longer than {MAX_MODEL} characters", param="model")
        model = model[:MAX_MODEL]
    return custom_id, model, invalid
