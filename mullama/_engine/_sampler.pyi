"""Type stubs for the sampler extension (``_sampler.pyx``)."""

from typing import Iterable, Sequence

from mullama._engine._model import ModelHandle

MAX_GRAMMAR_BYTES: int
MAX_GRAMMAR_NESTING: int
MAX_GRAMMAR_REPEAT: int
MAX_GRAMMAR_TRIGGERS: int

class Grammar:
    model: ModelHandle
    text: str
    triggers: tuple[str, ...]
    def __init__(self, model: ModelHandle, text: str, triggers: Sequence[str] = ()) -> None: ...
    def accepts(self, tokens: Iterable[int]) -> bool: ...
