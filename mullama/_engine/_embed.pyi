"""Type stubs for the embedding extension (``_embed.pyx``)."""

import numpy as np

from mullama._engine._model import ModelHandle

POOLING: dict[str, int]

class Embedder:
    model: ModelHandle
    n_ctx: int
    n_seq: int
    n_embd: int
    pooling: int
    def __init__(self, model: ModelHandle, pooling: str, n_ctx: int, n_seq: int, n_threads: int) -> None: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def embed(self, texts: list[np.ndarray], out: np.ndarray | None = None) -> list[np.ndarray] | None: ...
