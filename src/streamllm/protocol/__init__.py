"""OpenAI wire models: the one definition of every request, response, chunk and error shape.

The gateway, the simulator and (later) the HPC worker all speak through these models.
"""

from streamllm.protocol.chat import (
    ChatCompletionRequest,
    ChatMessage,
    StreamOptions,
    Usage,
)
from streamllm.protocol.errors import ErrorBody, ErrorEnvelope
from streamllm.protocol.models import ModelCard, ModelList

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "ErrorBody",
    "ErrorEnvelope",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "Usage",
]
