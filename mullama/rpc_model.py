"""RPC-backed models run their engine in a child process.

ggml's RPC client calls ``abort()`` when a server dies or answers garbage, which
would end the user's interpreter without a word. So ``Model.load(path,
rpc_servers=...)`` starts a child process (``spawn``: a fresh interpreter) that
loads the model with the normal in-process path and runs normal
:class:`~mullama.Context` objects; the parent drives it over a pipe, one request
and one answer at a time. When the child dies, the call that was waiting raises
:class:`GenerationError` naming the cause (the signal and llama.cpp's last
words); the parent process lives on, and later loads work as before.

The parent keeps a vocabulary-only copy of the model (no weights), so
tokenizing, chat templates and metadata never cross the pipe.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from typing import Any, Iterator

from mullama import errors
from mullama.model import Model
from mullama.rpc import child_env

__all__ = ["RpcModel", "RpcContext", "RpcStream"]

_STDERR_TAIL = 4096


def _exception_payload(exc: BaseException) -> tuple[type, str, dict]:
    # exceptions with extra __init__ arguments do not unpickle: send class, text and attributes
    return type(exc), str(exc), dict(getattr(exc, "__dict__", {}))


def _rebuild(payload: tuple[type, str, dict]) -> BaseException:
    cls, message, attrs = payload
    exc = cls.__new__(cls)
    BaseException.__init__(exc, message)
    exc.__dict__.update(attrs)
    return exc


def _stream_state(it: Any) -> dict[str, Any]:
    return {"finish_reason": it.finish_reason, "stop_sequence": it.stop_sequence,
            "tokens_generated": it.tokens_generated, "is_finished": it.is_finished, "stats": it.stats}


def _child_main(conn: Any) -> None:
    """The child: load, then answer requests until the pipe closes or says exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent, which closes us
    from mullama.context import Context

    model: Model | None = None
    contexts: dict[int, Context] = {}
    streams: dict[int, Iterator[Any]] = {}
    stream_owner: dict[int, int] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        op = msg[0]
        if op == "exit":
            break
        try:
            if op == "load":
                path, kwargs = msg[1], msg[2]
                model = Model.load(path, **kwargs, in_process=True)
                conn.send(("ok", model._info))
            elif op == "context":
                contexts[msg[1]] = Context(model, *msg[2], **msg[3])
                conn.send(("ok", None))
            elif op == "call":
                result = getattr(contexts[msg[1]], msg[2])(*msg[3], **msg[4])
                conn.send(("ok", result))
            elif op == "get":
                conn.send(("ok", getattr(contexts[msg[1]], msg[2])))
            elif op == "stream":
                # a new generation on a context supersedes its older streams: forget them
                for sid in [sid for sid, owner in stream_owner.items() if owner == msg[1]]:
                    streams.pop(sid, None)
                    stream_owner.pop(sid, None)
                streams[msg[2]] = getattr(contexts[msg[1]], msg[3])(*msg[4], **msg[5])
                stream_owner[msg[2]] = msg[1]
                conn.send(("ok", None))
            elif op == "next":
                it = streams.get(msg[1])
                if it is None:
                    raise errors.StreamingError(
                        "this stream was superseded by a newer generation on the same context")
                try:
                    item = next(it)
                except StopIteration:
                    streams.pop(msg[1], None)
                    conn.send(("end", _stream_state(it)))
                else:
                    conn.send(("item", item, _stream_state(it)))
            elif op == "close_stream":
                it = streams.pop(msg[1], None)
                if it is not None:
                    it.close()
                    conn.send(("ok", _stream_state(it)))
                else:
                    conn.send(("ok", None))
            elif op == "close_context":
                ctx = contexts.pop(msg[1], None)
                if ctx is not None:
                    ctx.close()
                conn.send(("ok", None))
            else:
                conn.send(("err", _exception_payload(ValueError(f"unknown request {op!r}"))))
        except Exception as exc:  # the parent raises it again
            if op == "next":
                streams.pop(msg[1], None)
            try:
                conn.send(("err", _exception_payload(exc)))
            except Exception:  # an attribute that does not pickle: the message still goes
                conn.send(("err", (errors.MullamaError, f"{type(exc).__name__}: {exc}", {})))
    for ctx in contexts.values():
        ctx.close()
    if model is not None:
        model.close()


class _Child:
    """The child process and its end of the pipe; one request at a time.

    The child is a fresh interpreter running this module (not multiprocessing's
    spawn, which would import the user's main script again)."""

    def __init__(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        self._stderr_path: str | None = None
        stderr = None
        if not os.environ.get("MULLAMA_LOG"):
            fd, self._stderr_path = tempfile.mkstemp(prefix="mullama-rpc-", suffix=".log")
            stderr = os.fdopen(fd, "wb")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "mullama.rpc_model", str(child_sock.fileno())],
                pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr, env=child_env())
        finally:
            child_sock.close()  # only the child holds its end: its death reads as EOF here
            if stderr is not None:
                stderr.close()
        self._conn = Connection(parent_sock.detach())
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.dead: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def next_id(self) -> int:
        return next(self._ids)

    def request(self, msg: tuple, error: type[errors.MullamaError] = errors.GenerationError) -> tuple:
        """Send ``msg`` and return the answer; the child's exception is raised here, and a
        dead child raises ``error`` naming why it died."""
        with self._lock:
            if self.dead is not None:
                raise error(self.dead)
            try:
                self._conn.send(msg)
                answer = self._conn.recv()
            except (EOFError, OSError):
                self.dead = self._death_cause()
                raise error(self.dead) from None
            except BaseException:
                # Ctrl-C while the child works: its answer would be read as the next
                # request's. One token is quick to wait for; anything else may not be.
                if msg[0] == "next":
                    try:
                        self._conn.recv()
                        raise
                    except (EOFError, OSError):
                        pass
                self._proc.kill()
                self._proc.wait()
                self.dead = "the RPC engine process was stopped when a call to it was interrupted"
                raise
        if answer[0] == "err":
            raise _rebuild(answer[1])
        return answer

    def _death_cause(self) -> str:
        try:
            code = self._proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            how = "stopped answering"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        said = self._last_words()
        msg = f"the RPC engine process (pid {self._proc.pid}) {how}"
        if said:
            msg += f"; its log ends with: {said}"
        if code is not None and code == -signal.SIGABRT:
            msg += " (an RPC server died, was stopped or lost its connection)"
        return msg

    def _last_words(self) -> str:
        if self._stderr_path is None:
            return ""
        try:
            with open(self._stderr_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - _STDERR_TAIL))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        picked = [ln for ln in lines if "error" in ln.lower() or "abort" in ln.lower() or "fail" in ln.lower()
                  or "crash" in ln.lower()]
        return " | ".join((picked or lines)[-2:])

    def close(self) -> None:
        with self._lock:
            if self.dead is None:
                try:
                    self._conn.send(("exit",))
                except OSError:
                    pass
                self.dead = "the RPC-backed model is closed"
            self._conn.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._stderr_path is not None:
            try:
                os.unlink(self._stderr_path)
            except OSError:
                pass
            self._stderr_path = None


class RpcModel(Model):
    """A model whose layers live on RPC servers, driven in a child process.

    Made by ``Model.load(path, rpc_servers=...)``. Tokenizing, templates and
    metadata work as on any :class:`Model` (from a vocabulary-only copy here);
    ``Context(model, ...)`` gives an :class:`RpcContext` in the child.
    ``AsyncModel`` and ``embed`` need an in-process model
    (``Model.load(..., in_process=True)``).
    """

    def __init__(self, path: str, rpc_servers: list[str], load_kwargs: dict[str, Any]) -> None:
        from mullama._engine._model import ModelHandle

        super().__init__(ModelHandle(path, 0, True, False, True))
        self.rpc_servers = list(rpc_servers)
        self._child = _Child()
        try:
            answer = self._child.request(("load", path, dict(load_kwargs, rpc_servers=self.rpc_servers)),
                                         errors.ModelLoadError)
        except BaseException:
            self._child.close()
            self._handle.close()
            raise
        self._info = answer[1]

    @property
    def engine_pid(self) -> int | None:
        """Process id of the child that holds the model."""
        return self._child.pid

    def close(self) -> None:
        for ctx in list(self._contexts):
            ctx.close()
        self._child.close()
        super().close()

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        raise errors.MullamaError("embeddings need an in-process model: Model.load(..., in_process=True)")


class RpcContext:
    """A :class:`~mullama.Context` that lives in the child of an :class:`RpcModel`.

    ``generate``, ``generate_stream``, ``stream_tokens``, ``logits``, ``score``,
    ``loglikelihood``, ``perplexity``, ``clear_cache``, ``save_state`` /
    ``load_state`` and the facts are forwarded; each call blocks until the child
    answers. A child that dies makes the waiting call raise :class:`GenerationError`.
    """

    _FORWARDED = frozenset({"generate", "logits", "score", "loglikelihood", "perplexity", "clear_cache",
                            "save_state", "load_state", "cached_tokens", "kv_positions"})
    _FACTS = frozenset({"n_ctx", "n_batch", "n_threads", "seed", "n_decode_calls", "n_cached", "last_stats",
                        "prefix_stats", "grammar_stats"})

    def __init__(self, model: RpcModel, *args: Any, **kwargs: Any) -> None:
        if model.closed:
            raise errors.ClosedError("the model is closed")
        self._model = model
        self._child = model._child
        self._id = self._child.next_id()
        self._closed = False
        self._child.request(("context", self._id, args, kwargs), errors.MullamaError)
        model._register(self)

    @property
    def model(self) -> RpcModel:
        return self._model

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._child.dead is None:
            try:
                self._child.request(("close_context", self._id))
            except errors.GenerationError:
                pass

    def __enter__(self) -> "RpcContext":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self) -> None:
        if self._closed:
            raise errors.ClosedError("the context is closed")

    def __getattr__(self, name: str) -> Any:
        if name in RpcContext._FORWARDED:
            def call(*args: Any, **kwargs: Any) -> Any:
                self._check()
                return self._child.request(("call", self._id, name, args, kwargs))[1]
            call.__name__ = name
            return call
        if name in RpcContext._FACTS:
            self._check()
            return self._child.request(("get", self._id, name))[1]
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def generate_stream(self, *args: Any, **kwargs: Any) -> "RpcStream":
        """Like :meth:`Context.generate_stream`: each ``next()`` decodes one token in the child."""
        return self._stream("generate_stream", args, kwargs)

    def stream_tokens(self, *args: Any, **kwargs: Any) -> "RpcStream":
        """Like :meth:`Context.stream_tokens`."""
        return self._stream("stream_tokens", args, kwargs)

    def _stream(self, method: str, args: tuple, kwargs: dict) -> "RpcStream":
        self._check()
        sid = self._child.next_id()
        self._child.request(("stream", self._id, sid, method, args, kwargs))
        return RpcStream(self._child, sid)


class RpcStream(Iterator[Any]):
    """The parent's end of a stream in the child: text pieces (``generate_stream``) or
    :class:`TokenData` (``stream_tokens``), with the same ``finish_reason``, ``stats``,
    ``close()`` as the in-process iterators."""

    def __init__(self, child: _Child, sid: int) -> None:
        self._child = child
        self._sid = sid
        self._done = False
        self._state: dict[str, Any] = {"finish_reason": None, "stop_sequence": None, "tokens_generated": 0,
                                       "is_finished": False, "stats": None}

    def __iter__(self) -> "RpcStream":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        try:
            answer = self._child.request(("next", self._sid))
        except BaseException:
            self._done = True
            raise
        self._state = answer[-1]
        if answer[0] == "end":
            self._done = True
            raise StopIteration
        return answer[1]

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        if self._child.dead is None:
            try:
                state = self._child.request(("close_stream", self._sid))[1]
            except errors.GenerationError:
                return
            if state is not None:
                self._state = state

    def __enter__(self) -> "RpcStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def finish_reason(self) -> str | None:
        return self._state["finish_reason"]

    @property
    def stop_sequence(self) -> str | None:
        return self._state["stop_sequence"]

    @property
    def tokens_generated(self) -> int:
        return self._state["tokens_generated"]

    @property
    def is_finished(self) -> bool:
        return self._done or self._state["is_finished"]

    @property
    def stats(self) -> Any:
        return self._state["stats"]


if __name__ == "__main__":
    _child_main(Connection(int(sys.argv[1])))
