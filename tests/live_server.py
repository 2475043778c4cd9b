"""A real mullama server on 127.0.0.1 for the tests, and small HTTP helpers.

The server runs Hypercorn's trio worker in a thread of the test process, on
a socket bound to port 0, serving an AsyncModel the test passes in.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from typing import Any, Iterator

import trio

from mullama import AsyncModel
from mullama.server.runner import bind_socket, serve
from mullama.server.settings import ServerSettings


class LiveServer:
    def __init__(self, model: AsyncModel, settings: ServerSettings | None = None) -> None:
        self.model = model
        self.settings = settings or ServerSettings(port=0)
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error:
            raise RuntimeError(f"the server did not start: {self._error!r}")

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve(self.model, self.settings, self.sock,
                                                          shutdown_trigger=self._stop.wait,
                                                          task_status=task_status))
            self._ready.set()

    def close(self) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(30)
        self.sock.close()

    # ------------------------------------------------------------ clients

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None, timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, **kw)
        return status, json.loads(data)

    def sse(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Iterator[dict]:
        """The parsed ``data:`` events of a streaming POST, as they arrive."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request("POST", path, body=json.dumps(body), headers=headers or {})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            for line in resp:
                line = line.rstrip(b"\r\n")
                if line.startswith(b"data: "):
                    payload = line[6:]
                    yield {"raw": payload.decode()} if payload == b"[DONE]" else json.loads(payload)
        finally:
            conn.close()

    def metrics(self, headers: dict[str, str] | None = None) -> dict[str, float]:
        status, _, data = self.request("GET", "/metrics", headers=headers)
        assert status == 200, data
        out = {}
        for line in data.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Poll /metrics until no stream runs and every slot's KV cells are free."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics(self._auth())
            if m["mullama_active_streams"] == 0 and m["mullama_slots_in_use"] == 0 \
                    and m["mullama_engine_streams"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not become idle: {m}")
            time.sleep(0.02)

    def _auth(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


def open_sse_socket(port: int, body: dict, headers: dict[str, str] | None = None) -> socket.socket:
    """A raw connection that posted a streaming request (for disconnect tests)."""
    payload = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.sendall(f"POST /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n{extra}\r\n".encode() + payload)
    return sock


def read_events(sock: socket.socket, count: int) -> list[dict]:
    """Read until ``count`` SSE data events have arrived on a raw socket."""
    buf = b""
    while len(re.findall(rb"data: ", buf)) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    body = buf.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in buf else b""
    return [json.loads(m) for m in re.findall(rb"data: (\{.*?\})\n", body)]
