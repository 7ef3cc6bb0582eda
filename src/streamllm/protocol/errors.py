"""OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody

    @classmethod
    def of(
        cls, message: str, type: str, param: str | None = None, code: str | int | None = None
    ) -> ErrorEnvelope:
        return cls(error=ErrorBody(message=message, type=type, param=param, code=code))
