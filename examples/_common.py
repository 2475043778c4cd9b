"""Shared by the examples: which model to load and how long to generate.

MULLAMA_MODEL picks a GGUF file (default: the embedded Gemma 3 270M);
MULLAMA_EXAMPLE_MAX_TOKENS caps every generation (the tests set it low).
"""

from __future__ import annotations

import os
import signal

import trio

from mullama import default_model_path


def model_path() -> str:
    return os.environ.get("MULLAMA_MODEL") or str(default_model_path())


def cap(n: int) -> int:
    limit = os.environ.get("MULLAMA_EXAMPLE_MAX_TOKENS")
    return min(n, int(limit)) if limit else n


async def until_interrupted() -> None:
    """Returns at Ctrl+C (or SIGTERM): a server given it as its shutdown trigger stops gracefully."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return
