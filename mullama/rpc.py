"""ggml's RPC backend: one model's layers on the devices of several hosts.

A host runs ``mullama rpc-server`` (:func:`serve`); a client passes the servers
to ``Model.load(path, rpc_servers=[...])``. This module holds what both sides
check before llama.cpp is called: the endpoints, that each server answers ggml's
handshake (ggml aborts the process on an unreachable server, and waits forever on
a busy one), the layer split.

The protocol has no authentication and no encryption, and its servers have had
remote-code-execution bugs: a server must only ever be reachable from trusted
machines (loopback, or a private network behind a firewall).
"""

from __future__ import annotations

import ipaddress
import math
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Iterable, Sequence

from mullama import errors

__all__ = [
    "DEFAULT_PORT",
    "child_env",
    "SECURITY_WARNING",
    "rpc_available",
    "require_rpc",
    "parse_endpoints",
    "check_reachable",
    "check_tensor_split",
    "serve",
]

DEFAULT_PORT = 50052
CONNECT_TIMEOUT = 3.0
REBUILD_HINT = ("rebuild it with ggml's RPC backend: MULLAMA_RPC=1 pip install . in mullama's source tree "
                "(or MULLAMA_RPC=1 python setup.py build_ext --inplace there)")
SECURITY_WARNING = (
    "WARNING: ggml's RPC protocol has no authentication and no encryption, and its server has had "
    "remote-code-execution vulnerabilities. Never expose an RPC server to an untrusted network: "
    "bind it to 127.0.0.1, or to a private network that only trusted machines reach.")


def child_env() -> dict[str, str]:
    """The environment of a child process that runs an RPC-backed engine: it imports this
    same mullama, and its abort() (expected when a server dies) skips ggml's gdb backtrace,
    which takes seconds and says nothing new."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("GGML_NO_BACKTRACE", "1")
    # ``python -m`` would put the working directory first on sys.path: run from a source
    # checkout (without compiled extensions), the child would import that tree instead
    env["PYTHONSAFEPATH"] = "1"
    return env


def rpc_available() -> bool:
    """True when this build of mullama has ggml's RPC backend (``MULLAMA_RPC=1``)."""
    from mullama._engine._model import rpc_available as available

    return bool(available())


def require_rpc() -> None:
    """Raise :class:`ModelLoadError` with the rebuild command when RPC is not built in."""
    if not rpc_available():
        raise errors.ModelLoadError(f"this build of mullama has no RPC backend; {REBUILD_HINT}")


def _split_endpoint(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"RPC server {text!r} is not HOST:PORT")
    if ":" in host or "[" in host:
        raise ValueError(f"RPC server {text!r}: ggml's RPC client speaks IPv4 only (HOST:PORT, no IPv6)")
    if any(c.isspace() for c in host) or "\x00" in host:
        raise ValueError(f"RPC server {text!r}: the host contains a blank or NUL character")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"RPC server {text!r}: port {port} is outside 1-65535")
    return host, port


def parse_endpoints(servers: str | Iterable[str]) -> list[str]:
    """``servers`` (a list, or one comma-separated string) as checked ``HOST:PORT`` strings."""
    if isinstance(servers, str):
        items = [s.strip() for s in servers.split(",")]
    else:
        items = list(servers)
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"each RPC server must be a 'HOST:PORT' string, got {type(item).__name__}")
        items = [s.strip() for s in items]
    if not items or any(not s for s in items):
        raise ValueError("rpc_servers needs at least one 'HOST:PORT' and no empty entries")
    out = []
    for item in items:
        host, port = _split_endpoint(item)
        endpoint = f"{host}:{port}"
        if endpoint in out:
            raise ValueError(f"RPC server {endpoint} is listed twice")
        out.append(endpoint)
    from mullama._engine._model import rpc_max_servers

    if len(out) > rpc_max_servers():
        raise ValueError(f"{len(out)} RPC servers given; ggml takes at most {rpc_max_servers()}")
    return out


_CMD_HELLO = 14          # RPC_CMD_HELLO, fixed across protocol versions
_CONN_CAPS_SIZE = 24     # RPC_CONN_CAPS_SIZE of ggml-rpc's transport.h at the pin
_HANDSHAKE_MAX = 1024


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def check_reachable(endpoints: Sequence[str], timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise :class:`ModelLoadError` unless every endpoint answers ggml's RPC handshake
    (HELLO) with a protocol version this build speaks.

    ggml's RPC client calls ``abort()`` when it cannot connect or the handshake fails,
    and waits forever on a server busy with another client (a server serves one client
    at a time): this check turns those cases into an exception."""
    from mullama._engine._model import rpc_protocol_version

    ours = rpc_protocol_version()
    our_major, our_minor = (int(x) for x in ours.split(".")[:2])
    for endpoint in endpoints:
        host, port = _split_endpoint(endpoint)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise errors.ModelLoadError(
                f"RPC server {endpoint} is not reachable ({reason}); start it there with "
                f"'mullama rpc-server --port {port}'") from None
        try:
            with sock:
                sock.sendall(bytes([_CMD_HELLO]) + _CONN_CAPS_SIZE.to_bytes(8, "little") + bytes(_CONN_CAPS_SIZE))
                size = int.from_bytes(_recv_exact(sock, 8), "little")
                if not 3 <= size <= _HANDSHAKE_MAX:
                    raise EOFError
                major, minor, patch = _recv_exact(sock, size)[:3]
        except socket.timeout:
            raise errors.ModelLoadError(
                f"RPC server {endpoint} accepted the connection but did not answer ggml's RPC handshake "
                f"within {timeout:g} s: it serves one client at a time and may be busy with another, "
                f"or it is not a ggml RPC server") from None
        except (EOFError, OSError):
            raise errors.ModelLoadError(
                f"RPC server {endpoint} broke off ggml's RPC handshake: it is not a ggml RPC server, or "
                f"one of another protocol version (this build speaks {ours})") from None
        if major != our_major or minor > our_minor:
            raise errors.ModelLoadError(
                f"RPC server {endpoint} speaks ggml RPC protocol {major}.{minor}.{patch}; this build "
                f"speaks {ours}: run the same mullama (or llama.cpp) version on both sides")


def check_tensor_split(split: Sequence[float] | None, n_servers: int) -> list[float] | None:
    """``split`` as floats: finite, non-negative, not all zero. Its length is checked
    against the servers' devices when they are known (one weight per device; a
    ``mullama rpc-server`` offers one), here only against ``n_servers`` devices at least."""
    if split is None:
        return None
    if isinstance(split, (str, bytes)):
        raise TypeError("tensor_split must be a sequence of numbers")
    values = []
    for i, v in enumerate(split):
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise TypeError(f"tensor_split[{i}] must be a number, got {type(v).__name__}")
        f = float(v)
        if not math.isfinite(f) or f < 0:
            raise ValueError(f"tensor_split[{i}] must be a finite number >= 0, got {v!r}")
        values.append(f)
    if len(values) < n_servers:
        raise ValueError(f"tensor_split has {len(values)} weights for {n_servers} RPC servers "
                         f"(one weight per device)")
    if not any(values):
        raise ValueError("tensor_split must not be all zero")
    return values


def _check_bind_host(host: str) -> None:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"--host must be an IPv4 address (the RPC server binds with inet_addr), got {host!r}") \
            from None


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, threads: int | None = None) -> int:
    """Run an RPC server for this machine's CPU in this process; returns only when it
    cannot listen (e.g. the port is taken). Ctrl-C or SIGTERM end the process."""
    _check_bind_host(host)
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be within 1-65535, got {port}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if not rpc_available():
        raise errors.MullamaError(f"this build of mullama has no RPC backend; {REBUILD_HINT}")
    from mullama._engine._model import rpc_start_server
    from mullama.context import default_threads

    print(SECURITY_WARNING, file=sys.stderr)
    if not ipaddress.IPv4Address(host).is_loopback:
        print(f"WARNING: listening on {host}, not on loopback: every machine that reaches {host}:{port} "
              f"can run computations here and read or overwrite this server's memory.", file=sys.stderr)
    sys.stderr.flush()
    # the server loop is C and never returns to Python: the signals end the process directly
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    rpc_start_server(f"{host}:{port}", threads or default_threads())
    sys.stdout.flush()
    print(f"mullama: the RPC server on {host}:{port} stopped (could not listen or accept)", file=sys.stderr)
    return 1
