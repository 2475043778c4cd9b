"""Running the app on Hypercorn's trio worker."""

from __future__ import annotations

import logging
import os
import socket
from typing import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from mullama.async_model import AsyncModel
from mullama.server.app import create_app
from mullama.server.settings import ServerSettings

__all__ = ["bind_socket", "hypercorn_config", "serve"]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one; read it from ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def hypercorn_config(settings: ServerSettings, sock: socket.socket, access_log: bool = False) -> Config:
    config = Config()
    # Hypercorn closes the socket it is given: hand it a duplicate, the caller keeps its own
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.websocket_max_message_size = settings.max_ws_message_bytes
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 30.0
    config.accesslog = logging.getLogger("mullama.access") if access_log else None
    config.errorlog = logging.getLogger("mullama.server")
    return config


async def serve(model: AsyncModel, settings: ServerSettings, sock: socket.socket, *,
                shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                access_log: bool = False) -> None:
    """Serve ``model`` on ``sock`` until ``shutdown_trigger`` returns (or forever).

    Streams still running at shutdown are cancelled; the model stays open.
    """
    app = create_app(model, settings)
    config = hypercorn_config(settings, sock, access_log)
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_app, app, config, shutdown_trigger)
        task_status.started()


async def _serve_app(app, config: Config, shutdown_trigger, task_status=trio.TASK_STATUS_IGNORED) -> None:
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)
