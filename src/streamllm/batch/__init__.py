"""OpenAI's Batch API: uploaded files, batches of chat completions run in chunks, output files.

`files` keeps the bytes, `input` reads an input file, `runner` defines the chunk runner
interface (and the runner over the tiers' backends), `service` runs batches to completion.
"""

from streamllm.batch.files import FileStore
from streamllm.batch.runner import (
    BackendChunkRunner,
    BatchHost,
    BatchLine,
    Chunk,
    ChunkRunner,
    LineError,
    LineResult,
    route_line,
)
from streamllm.batch.service import BatchService

__all__ = ["BackendChunkRunner", "BatchHost", "BatchLine", "BatchService", "Chunk",
           "ChunkRunner", "FileStore", "LineError", "LineResult", "route_line"]
