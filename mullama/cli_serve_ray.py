"""``mullama serve --replicas N``: the server's replicas behind Ray Serve."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from mullama.server.settings import ServerSettings

__all__ = ["serve_replicas", "autoscaling_from_args"]

APP_NAME = "mullama"


def autoscaling_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """Serve's autoscaling settings from the command line, or None for a fixed number of replicas."""
    if args.min_replicas is None and args.max_replicas is None and args.target_ongoing_requests is None:
        return None
    if args.max_replicas is None:
        raise ValueError("autoscaling needs --max-replicas")
    low = args.min_replicas if args.min_replicas is not None else 1
    if not 0 <= low <= args.max_replicas or args.max_replicas < 1:
        raise ValueError(f"need 0 <= --min-replicas ({low}) <= --max-replicas ({args.max_replicas}) "
                         "and --max-replicas >= 1")
    config: dict[str, Any] = {"min_replicas": low, "max_replicas": args.max_replicas}
    if args.replicas is not None:
        if not low <= args.replicas <= args.max_replicas:
            raise ValueError(f"--replicas {args.replicas} must lie within --min-replicas and --max-replicas")
        config["initial_replicas"] = args.replicas
    if args.target_ongoing_requests is not None:
        config["target_ongoing_requests"] = args.target_ongoing_requests
    return config


def _free_port(host: str) -> int:
    from mullama.server.runner import bind_socket

    sock = bind_socket(host, 0)
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def serve_replicas(args: argparse.Namespace, path: Path, model_id: str, settings: ServerSettings) -> int:
    """Start (or join) Ray, deploy the replicas, serve until SIGINT/SIGTERM, then stop what was started."""
    from mullama.context import default_threads
    from mullama.server import ray_serve

    try:
        autoscaling = autoscaling_from_args(args)
        if args.replicas is None and autoscaling is None:
            raise ValueError("the Ray Serve options need --replicas N (or --max-replicas N)")
        if args.replicas is not None and args.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
        if args.ray_cpus is not None and args.ray_cpus < 1:
            raise ValueError(f"--ray-cpus must be at least 1, got {args.ray_cpus}")
        if args.replica_cpus is not None and args.replica_cpus < 0:
            raise ValueError(f"--replica-cpus must not be negative, got {args.replica_cpus}")
        if args.ray_address is not None and args.ray_cpus is not None:
            raise ValueError("--ray-cpus applies to a Ray started here, not to one joined with --ray-address")
    except ValueError as exc:
        print(f"mullama: {exc}", file=sys.stderr)
        return 2
    local = args.ray_address is None
    if local:  # must precede the first import of ray, here and in every process Ray starts
        for key, value in ray_serve.LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
    try:
        import ray
        from ray import serve
    except ImportError:
        print("mullama: --replicas needs Ray Serve: pip install 'mullama[ray]'", file=sys.stderr)
        return 2

    most = autoscaling["max_replicas"] if autoscaling else args.replicas
    cpus = args.ray_cpus or default_threads()
    threads = args.threads
    replica_cpus = args.replica_cpus
    if local:  # replicas share this machine's cores: split them rather than oversubscribe
        threads = threads or ray_serve.threads_per_replica(cpus, most)
        replica_cpus = replica_cpus if replica_cpus is not None else min(1.0, cpus / most)
    config = ray_serve.ReplicaConfig(str(Path(path).resolve()), n_ctx=args.n_ctx, n_parallel=args.parallel,
                                     n_threads=threads, max_queue=args.max_queue,
                                     prefix_cache=args.prefix_cache, settings=settings)
    port = settings.port or _free_port(settings.host)
    stop = threading.Event()

    if local:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=args.access_log)
    else:
        ray.init(address=args.ray_address, log_to_driver=args.access_log)
    try:
        serve.start(http_options={"host": settings.host, "port": port})
        app = ray_serve.build_app(config, num_replicas=args.replicas or 1, autoscaling_config=autoscaling,
                                  ray_actor_options={"num_cpus": replica_cpus if replica_cpus is not None else 1},
                                  logging_config={"enable_access_log": bool(args.access_log)})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except Exception as exc:  # noqa: BLE001 - Ray's own kinds; the replicas' logs hold the details
            print(f"mullama: error: the replicas did not start: {exc}", file=sys.stderr, flush=True)
            return 1
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        shown = f"[{settings.host}]" if ":" in settings.host else settings.host
        count = (f"{autoscaling['min_replicas']}-{autoscaling['max_replicas']} replicas" if autoscaling
                 else f"{args.replicas} replica{'s' if args.replicas != 1 else ''}")
        cache = "" if args.prefix_cache else ", no prefix cache"
        print(f"mullama: serving {model_id} on http://{shown}:{port} ({count} of {args.parallel} slots{cache}, "
              f"Ray Serve)", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        try:
            if local:
                serve.shutdown()
            else:  # a shared cluster: remove only what was deployed here
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
    print("mullama: stopped", file=sys.stderr, flush=True)
    return 0
