"""mullama: a streaming token engine over llama.cpp.

Sync API::

    from mullama import Model, Context, SamplerParams
    model = Model.load(path)
    ctx = Context(model, n_ctx=2048)
    for piece in ctx.generate_stream("Once upon a time", max_tokens=64):
        print(piece, end="", flush=True)
"""

from mullama.async_model import AsyncModel
from mullama.context import Context, default_threads
from mullama.default_model import DEFAULT_MODEL_SHA256, default_model_path
from mullama.errors import (
    ClosedError,
    ContextOverflowError,
    DefaultModelMissingError,
    DownloadError,
    GenerationError,
    ModelLoadError,
    ModelNotFoundError,
    MullamaError,
    QueueFullError,
    StreamingError,
    TemplateError,
    GrammarError,
    SchemaError,
    ToolError,
    TokenizerError,
    StateError,
    TokenIdError,
    UnsupportedModelError,
)
from mullama.model import Model
from mullama.params import SamplerParams
from mullama.stream import BlockingTokenStream, TokenStream
from mullama.state import SequenceState
from mullama.stream_config import StreamConfig
from mullama.types import GenerationStats, TokenData
from mullama._generation import TextStream, TokenIterator
from mullama.scoring import PerplexityResult, ScoreResult

__version__ = "0.1.0"

__all__ = [
    "Model",
    "Context",
    "AsyncModel",
    "SequenceState",
    "StreamConfig",
    "TokenStream",
    "BlockingTokenStream",
    "QueueFullError",
    "SamplerParams",
    "TokenData",
    "GenerationStats",
    "TokenIterator",
    "TextStream",
    "default_model_path",
    "default_threads",
    "DEFAULT_MODEL_SHA256",
    "MullamaError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ContextOverflowError",
    "GenerationError",
    "StreamingError",
    "TemplateError",
    "GrammarError",
    "SchemaError",
    "ToolError",
    "TokenizerError",
    "StateError",
    "TokenIdError",
    "UnsupportedModelError",
    "ScoreResult",
    "PerplexityResult",
    "DefaultModelMissingError",
    "ClosedError",
    "DownloadError",
]
