"""Shared by the examples: which model to load and how long to generate.

MULLAMA_MODEL picks a GGUF file (default: the embedded Gemma 3 270M);
MULLAMA_EXAMPLE_MAX_TOKENS caps every generation (the tests set it low).
"""

from __future__ import annotations

import os
import signal
from functools import partial

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


async def serve_app(app, label: str, port: int, scheme: str = "http", path: str = "") -> None:
    """Load the model into ``app.state.model`` and serve ``app`` on 127.0.0.1:``port`` (Hypercorn's
    trio worker) until Ctrl+C; prints the address once listening (port 0 picks a free one)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from mullama import AsyncModel

    model = app.state.model = await AsyncModel.load(model_path(), n_ctx=4096, n_parallel=4)
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    async with model, trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=until_interrupted))
        address = binds[0].replace("http", scheme, 1)
        print(f"{label} on {address}{path}", flush=True)
