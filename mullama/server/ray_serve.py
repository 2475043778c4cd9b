"""Replicas of the mullama server behind Ray Serve (the optional extra ``mullama[ray]``).

Each replica is a Ray actor that loads the model once into an
:class:`~mullama.AsyncModel` and answers with the very ASGI app of
``mullama serve`` (:func:`mullama.server.create_app`): ``/stream`` (SSE),
``/ws``, the OpenAI endpoints, ``/health`` and ``/metrics``. Ray Serve's proxy
routes each HTTP request to a replica, counts the requests each replica holds,
restarts replicas that die and, when asked, adds or removes replicas with load.

Streaming is end to end: the replica's ASGI messages travel to the proxy as
they are sent, so every SSE token reaches the client as it is decoded. When a
client disconnects, the proxy cancels the request in the replica; the
cancellation arrives there as ``asyncio.CancelledError`` at the response's next
await, which closes the generation, and the engine stops within one decode step.

Programmatic use::

    import ray
    from ray import serve
    from mullama.server.ray_serve import ReplicaConfig, build_app

    ray.init(address="auto")
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app(ReplicaConfig("/models/model.gguf", n_parallel=4), num_replicas=2),
              name="mullama", route_prefix="/")

or ``mullama serve --replicas 2`` on the command line.

Security: a Ray cluster has no authentication. Anyone who reaches its ports
can run code on every node, so keep it on a private network (and, on one
machine, on loopback, which is what ``mullama serve --replicas`` does when it
starts Ray itself).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from mullama.server.settings import ServerSettings

if TYPE_CHECKING:  # pragma: no cover
    from ray.serve import Application
    from starlette.types import ASGIApp

__all__ = ["RAY_SERVE_VERSION", "LOOPBACK_ENV", "REPLICA_HEADER", "ReplicaConfig", "MullamaReplica", "build_app",
           "max_ongoing_requests", "threads_per_replica"]

RAY_SERVE_VERSION = "2.60.0"

# Set before ``import ray`` in every process of a one-machine cluster, these keep
# Ray on 127.0.0.1: without the first, Ray replaces a loopback node address with
# the machine's primary one (by design, for multi-node clusters); the second keeps
# Ray from reporting usage statistics anywhere.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class ReplicaConfig:
    """What each replica loads and serves.

    - ``model_path``: the GGUF file, at the same path on every node that may
      host a replica (replicas load it themselves; nothing is shipped).
    - ``n_ctx``, ``n_parallel``, ``n_threads``, ``max_queue``, ``prefix_cache``:
      the replica's :class:`~mullama.AsyncModel`, as in ``mullama serve``.
    - ``settings``: the HTTP app's :class:`ServerSettings` (API key, limits);
      its ``host``/``port`` are unused: Serve's proxy is where clients connect.
    """

    model_path: str
    n_ctx: int = 2048
    n_parallel: int = 4
    n_threads: int | None = None
    max_queue: int = 64
    prefix_cache: bool = True
    settings: ServerSettings = field(default_factory=ServerSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.model_path, (str, os.PathLike)) or not str(self.model_path):
            raise ValueError(f"model_path must be a path to a GGUF file, got {self.model_path!r}")
        object.__setattr__(self, "model_path", os.fspath(self.model_path))
        for name, low in (("n_ctx", 8), ("n_parallel", 1), ("max_queue", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.n_threads is not None and (isinstance(self.n_threads, bool) or not isinstance(self.n_threads, int)
                                           or self.n_threads < 1):
            raise ValueError(f"n_threads must be a positive integer or None, got {self.n_threads!r}")
        if not isinstance(self.settings, ServerSettings):
            raise ValueError(f"settings must be a ServerSettings, got {type(self.settings).__name__}")


def max_ongoing_requests(config: ReplicaConfig) -> int:
    """Requests Serve sends one replica at once: its slots plus its queue.

    Past that, requests wait in Serve's router, which hands each to a replica
    with room, rather than in one replica's queue while another idles. Two
    more let ``/health`` and ``/metrics`` through when every slot and queue
    place is taken.
    """
    return config.n_parallel + config.max_queue + 2


REPLICA_HEADER = "x-mullama-replica"


class ReplicaHeaderMiddleware:
    """Names the replica that answered in each HTTP response (``X-Mullama-Replica``).

    The routes stay those of :func:`mullama.server.create_app`; this only
    tells a client (or a test, or a load balancer's log) where a request went.
    """

    def __init__(self, app: "ASGIApp", replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", ()), self.header])
            await send(message)

        await self.app(scope, receive, send_with_header)


def _keep_internal_grpc_on_loopback() -> None:
    """On a loopback-only cluster, bind the replica's inter-deployment gRPC server to 127.0.0.1.

    Ray Serve 2.60 starts that server on ``[::]:0`` (every interface) in each
    replica, right after the constructor; peers reach it at the node's address
    and the port, so on a cluster whose node address is loopback, binding it
    there changes nothing for them and keeps the port off the network. On a
    cluster with routable node addresses it is left as Ray made it.
    """
    import ipaddress

    import ray
    from ray.serve._private import replica as serve_replica

    if not ray.is_initialized():  # not in a Ray worker: nothing to bind, and no address to look up
        return
    try:
        node_ip = ray.util.get_node_ip_address()
        loopback = ipaddress.ip_address(node_ip).is_loopback
    except (ValueError, RuntimeError):
        return
    add_port = getattr(serve_replica, "add_port_to_grpc_server", None)
    if not loopback or add_port is None or getattr(add_port, "_mullama_loopback", False):
        return

    def add_port_on_node_ip(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{node_ip}:{address[5:]}"
        return add_port(server, address)

    add_port_on_node_ip._mullama_loopback = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = add_port_on_node_ip


class MullamaReplica:
    """One replica: the model in an :class:`~mullama.AsyncModel` and the app serving it.

    Ray Serve builds the app after the constructor (``__serve_build_asgi_app__``),
    so the routes are those of :func:`mullama.server.create_app`, unchanged.
    """

    def __init__(self, config: ReplicaConfig) -> None:
        from mullama.async_model import AsyncModel
        from mullama.model import Model

        _keep_internal_grpc_on_loopback()
        self.config = config
        self.model = AsyncModel(Model.load(config.model_path), n_ctx=config.n_ctx, n_parallel=config.n_parallel,
                                n_threads=config.n_threads, max_queue=config.max_queue,
                                prefix_cache=config.prefix_cache)

    def __serve_build_asgi_app__(self) -> "ASGIApp":
        from ray import serve
        from ray.serve.exceptions import RayServeException

        from mullama.server.app import create_app

        app = create_app(self.model, self.config.settings)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # built outside a replica (e.g. in a test)
            replica = "local"
        app.add_middleware(ReplicaHeaderMiddleware, replica=replica)
        return app

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine is gone is replaced."""
        if self.model.closed:
            raise RuntimeError("the replica's model is closed")

    def __del__(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            model.close()


def build_app(config: ReplicaConfig, *, num_replicas: int | None = 1,
              autoscaling_config: Mapping[str, Any] | Any | None = None,
              ray_actor_options: Mapping[str, Any] | None = None, name: str = "mullama",
              **deployment_options: Any) -> "Application":
    """A Serve application of ``num_replicas`` replicas serving ``config``.

    ``autoscaling_config`` (a dict or ``ray.serve.config.AutoscalingConfig``)
    goes to Serve unchanged and replaces ``num_replicas``; a dict without
    ``target_ongoing_requests`` gets the replica's slot count, so Serve adds a
    replica when the slots are full. ``ray_actor_options`` (default: one CPU
    per replica) and further ``deployment_options`` (``health_check_period_s``,
    ``max_queued_requests``, ...) go to :func:`ray.serve.deployment` unchanged.
    Nothing starts until the application is passed to ``serve.run``.
    """
    from ray import serve

    if not isinstance(config, ReplicaConfig):
        raise ValueError(f"config must be a ReplicaConfig, got {type(config).__name__}")
    if autoscaling_config is not None:
        if isinstance(autoscaling_config, Mapping):
            autoscaling_config = dict(autoscaling_config)
            autoscaling_config.setdefault("target_ongoing_requests", config.n_parallel)
        num_replicas = None
    elif num_replicas is None or isinstance(num_replicas, bool) or not isinstance(num_replicas, int) \
            or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
    actor_options = dict(ray_actor_options) if ray_actor_options is not None else {}
    actor_options.setdefault("num_cpus", 1)
    options: dict[str, Any] = dict(max_ongoing_requests=max_ongoing_requests(config),
                                   ray_actor_options=actor_options, name=name)
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas
    options.update(deployment_options)
    deployment = serve.deployment(serve.ingress()(MullamaReplica), **options)
    return deployment.bind(config)


def threads_per_replica(cpus: int, replicas: int) -> int:
    """Decode threads for each of ``replicas`` replicas sharing ``cpus`` cores (at least one)."""
    return max(1, cpus // max(1, replicas))
