"""`GET /v1/models` shapes, with STREAM's extra fields (which tier, and what state it is in)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class ModelCard(BaseModel):
    # OpenAI clients ignore fields they do not know, so the tier and its state ride along.
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "streamllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
