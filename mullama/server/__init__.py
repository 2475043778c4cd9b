"""mullama's HTTP server: SSE, WebSocket and an OpenAI-compatible API on trio.

Programmatic use::

    model = mullama.AsyncModel(mullama.Model.load(path), n_parallel=4)
    app = create_app(model, ServerSettings(api_key="secret"))   # any ASGI server

or ``mullama serve`` on the command line (Hypercorn's trio worker).
"""

from mullama.server.app import create_app
from mullama.server.settings import ServerSettings

__all__ = ["create_app", "ServerSettings"]
