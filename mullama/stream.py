"""``TokenStream``: an async stream of generated tokens (trio and asyncio, via anyio).

A native producer thread runs the decode loop without the GIL and hands each
token to a bounded ring (``_ring.TokenRing``); the event loop sleeps on the
ring's eventfd and only wakes to take tokens out, so decoding never blocks
it. When ``buffer_size`` tokens wait unread the producer pauses: no decoding
happens until the consumer reads again.
"""

from __future__ import annotations

import math
import select
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import anyio
from anyio.abc import ObjectReceiveStream

from mullama._engine._ring import CLOSED, EMPTY, TokenRing
from mullama.errors import StreamingError
from mullama.state import SequenceState
from mullama.stream_config import StreamConfig
from mullama.types import TokenData

if TYPE_CHECKING:
    from mullama.context import Context
    from mullama.stream_config import StreamConfig as _Config  # noqa: F401

__all__ = ["TokenStream", "BlockingTokenStream"]

_FINISH = {1: "stop", 2: "stop", 3: "length", 4: "length", 5: "cancelled"}


class _Job:
    """One stream's request on the engine and, when the stream has an engine of its own
    (``AsyncModel(batching=False)``), the producer thread that steps it."""

    def __init__(self, request: Any, context: "Context | None" = None, engine: Any = None,
                 model: Any = None, prompt: Any = None, seed: int | None = None) -> None:
        self.request = request
        self.prompt = prompt
        self.seed = seed
        self.ring = request.ring
        self.context = context
        self.engine = engine if context is None else context._engine
        self.model = model if context is None else context.model
        self.failure: BaseException | None = None
        self.thread: threading.Thread | None = None
        if context is not None:
            self.thread = threading.Thread(target=self._run, name="mullama-producer", daemon=True)

    def _run(self) -> None:
        try:
            # the context's lock keeps close() from freeing it under the running decode
            with self.context._lock:
                self.context._live_engine().run_until(self.request)
        except BaseException as exc:  # reported to the consumer, never lost in the thread
            self.failure = exc
            self.request.cancel()
            self.ring.close(1)

    def start(self) -> None:
        if self.thread is not None:
            self.thread.start()

    @property
    def finished(self) -> bool:
        if self.thread is not None:
            return not self.thread.is_alive()
        return self.request.done

    def stop(self) -> None:
        """Ask for the end: a paused stream wakes, a running decode of it aborts."""
        self.request.cancel()

    async def wait(self) -> None:
        """Wait (without blocking the event loop) until the engine has let go of it."""
        while not self.finished:
            await anyio.sleep(0.001)

    def error(self) -> BaseException | None:
        if self.failure is not None:
            return self.failure
        return self.request.error()


class _StreamState:
    """What the async and the blocking stream share: bookkeeping and ending."""

    def __init__(self, config: StreamConfig, producer: "_Job | None",
                 on_done: Callable[[], None] | None, prompt_tokens: int) -> None:
        self._config = config
        self._producer = producer
        self._on_done = on_done
        self._done = producer is None
        self._count = 0
        self._started = time.monotonic()
        self._deadline = self._started + config.timeout if config.timeout_ms else math.inf
        self._loop_thread = threading.get_ident()
        self.prompt_tokens = prompt_tokens
        self.finish_reason: str | None = "length" if producer is None else None
        if producer is None:
            self._release()

    @property
    def config(self) -> StreamConfig:
        return self._config

    @property
    def is_finished(self) -> bool:
        return self._done

    @property
    def tokens_generated(self) -> int:
        """Tokens handed out so far."""
        return self._count

    @property
    def buffered(self) -> int:
        """Tokens produced but not yet read (at most ``config.buffer_size``)."""
        return self._producer.ring.size if self._producer else 0

    @property
    def spec_stats(self) -> dict[str, int]:
        """Speculation in this stream: ``drafted`` tokens verified and ``accepted`` ones."""
        request = self._producer.request if self._producer is not None else None
        return {"drafted": 0, "accepted": 0} if request is None else dict(
            drafted=request.spec_stats["drafted"], accepted=request.spec_stats["accepted"])

    @property
    def producer_pauses(self) -> int:
        """How often decoding of this stream paused because ``buffer_size`` tokens waited unread."""
        return self._producer.ring.full_waits if self._producer else 0

    # ------------------------------------------------------------ snapshots and forks

    def _begin_command(self, cmd: int, child: Any = None) -> Any:
        job = self._producer
        if job is None or self._done or job.engine is None:
            raise StreamingError("the stream has ended")
        job.engine.command(job.request, cmd, child)
        return job.request

    def _end_command(self, request: Any, what: str) -> None:
        status = request.command_status
        if status == 1:
            return
        reasons = {-1: "the stream has already ended",
                   -2: "no free slot to branch into (n_parallel sequences are busy)",
                   -3: "out of memory", -4: "llama.cpp could not copy the sequence's state"}
        raise StreamingError(f"{what} failed: {reasons.get(status, f'status {status}')}")

    def _snapshot_result(self, request: Any) -> SequenceState:
        self._end_command(request, "snapshot")
        return SequenceState._from_engine(request.take_snapshot(), self._producer.model,
                                          self._producer.engine.n_slots)

    def _branch(self, config: StreamConfig | None) -> tuple[Any, StreamConfig]:
        """The request of a new branch at this stream's current position."""
        job = self._producer
        if job is None or self._done or job.engine is None:
            raise StreamingError("the stream has ended")
        inherit = config is None
        if config is None:
            config = self._config
        elif not isinstance(config, StreamConfig):
            raise TypeError(f"config must be a StreamConfig, got {type(config).__name__}")
        if list(config._stops) != list(self._config._stops):
            raise ValueError("a fork keeps its parent's stop sequences (the text held back for them "
                             "is shared)")
        from mullama._engine._engine import Request

        model = job.model
        params = config.sampler_params()
        if inherit and params.seed is not None:
            # its own seed: a sampled branch must not replay its parent's draws
            params = params.replace(seed=(params.seed + 1) % (1 << 32))
        sampler = params.native(model.n_vocab, job.seed)
        child = Request(job.prompt, config.max_tokens, sampler, list(config._stops), config.logprobs,
                        job.engine.n_ctx_per_slot, TokenRing(config.buffer_size), model.n_vocab,
                        config.top_logprobs, False, job.request.keeps_cache, None, None, 0,
                        model.grammar_for(params))
        self._begin_command(2, child)
        return child, config

    def _branch_stream(self, child: Any, config: StreamConfig, cls: type) -> Any:
        self._end_command(self._producer.request, "fork")
        job = self._producer
        return cls(config, _Job(child, engine=job.engine, model=job.model, prompt=job.prompt, seed=job.seed),
                   None, child.n_prompt)

    def _deliver(self, record: tuple) -> TokenData:
        token, raw, finish, logprob, top = record
        index = self._count
        self._count += 1
        if finish:
            self.finish_reason = _FINISH.get(finish, "stop")
            self._finish()
        return TokenData(raw.decode("utf-8", "replace"), token, bool(finish),
                         logprob if self._config.logprobs else None, top, index)

    def _poll(self) -> tuple | None:
        """One look at the ring for a waiting consumer: a record, or None when the caller
        must wait for ``fileno()``. Raises at the deadline; returns CLOSED at the end."""
        if time.monotonic() >= self._deadline:
            self._timed_out()
        record = self._producer.ring.pop(True)
        if record is CLOSED:
            self._closed_without_final()
            return CLOSED
        return None if record is EMPTY else record

    def _closed_without_final(self) -> None:
        producer = self._producer
        self._finish()
        err = producer.error() if producer else None
        if err is not None:
            self.finish_reason = "error"
            raise err
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def _timed_out(self) -> None:
        self.cancel()
        self.finish_reason = "timeout"
        raise StreamingError(f"the stream timed out after {self._config.timeout_ms} ms "
                             f"({self._count} tokens received)")

    def cancel(self) -> None:
        """Stop generating now. Safe to call at any time, more than once."""
        if self._done:
            return
        self.finish_reason = "cancelled"
        self._finish()

    def _finish(self) -> None:
        if self._producer is not None and not self._producer.ring.closed:
            self._producer.stop()
        self._done = True
        self._release()

    def _release(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    def __del__(self) -> None:
        # an abandoned stream must not keep decoding or hold its slot
        if not getattr(self, "_done", True):
            self._producer.stop()
            if threading.get_ident() == self._loop_thread:
                try:
                    self._done = True
                    self._release()
                except Exception:  # noqa: BLE001 - the loop may be gone at shutdown
                    pass


class TokenStream(_StreamState, ObjectReceiveStream[TokenData]):
    """Tokens of one generation, as they are produced.

    Use ``async for token in stream``, ``await stream.next()`` (``None`` at
    the end), ``stream.try_next()`` (never waits) or ``await
    stream.receive()`` (raises ``anyio.EndOfStream`` at the end). The last
    token has ``is_final`` set.

    Cancellation: ``cancel()``, ``aclose()``, leaving ``async with``, or the
    cancellation of a task waiting in ``receive()`` (a trio cancel scope, an
    asyncio task cancel or timeout) all end the stream: decoding of it stops
    within one decode step, also in the middle of prompt processing, and its
    slot goes back to the model for the next stream. Every ``receive()`` is a
    checkpoint.
    """

    async def receive(self) -> TokenData:
        try:
            await anyio.lowlevel.checkpoint()
            if self._done:
                raise anyio.EndOfStream
            record = await self._wait_record()
            if self._config.stream_delay_ms:
                await anyio.sleep(self._config.stream_delay_ms / 1000)
        except anyio.EndOfStream:
            raise
        except BaseException:
            # the consumer is leaving (cancelled, timed out, failed): stop decoding
            self.cancel()
            raise
        return self._deliver(record)

    async def next(self) -> TokenData | None:
        """The next token, or None when the stream has ended."""
        try:
            return await self.receive()
        except anyio.EndOfStream:
            return None

    def try_next(self) -> TokenData | None:
        """The next token if one is ready, else None. Never waits."""
        if self._done:
            return None
        record = self._producer.ring.pop(False)
        if record is EMPTY:
            return None
        if record is CLOSED:
            self._closed_without_final()
            return None
        return self._deliver(record)

    async def _wait_record(self) -> tuple:
        ring = self._producer.ring
        while True:
            record = self._poll()
            if record is CLOSED:
                raise anyio.EndOfStream
            if record is not None:
                return record
            with anyio.move_on_after(self._deadline - time.monotonic()):
                await anyio.wait_readable(ring.fileno())
            ring.drain_wake()

    async def snapshot(self) -> SequenceState:
        """A :class:`SequenceState` of this stream at the engine's position: the prompt, the
        tokens generated so far (read or still buffered) and their KV cells. Continuing
        from it (``generate_stream(..., state=...)``) evaluates only the last token."""
        request = self._begin_command(1)
        while request.command_status == 0:
            await anyio.sleep(0.001)
        return self._snapshot_result(request)

    async def fork(self, config: StreamConfig | None = None) -> "TokenStream":
        """A new stream that continues from this one's current position (after the tokens
        it has produced, read or buffered) without evaluating anything again: its KV cells
        are copied. It has its own sampler (``config``, or this stream's with a new seed)
        and ends, or is cancelled, independently. Needs a free slot (``n_parallel``)."""
        child, config = self._branch(config)
        while self._producer.request.command_status == 0:
            await anyio.sleep(0.001)
        return self._branch_stream(child, config, TokenStream)

    async def aclose(self) -> None:
        """Cancel if still running and wait until its producer has let go."""
        self.cancel()
        if self._producer is not None:
            with anyio.CancelScope(shield=True):
                await self._producer.wait()


class BlockingTokenStream(_StreamState, Iterator[TokenData]):
    """The same stream for plain threads: ``next()`` blocks until a token arrives.

    ``close()`` (or leaving ``with``) cancels it; decoding of it stops within
    one step. Timeouts raise :class:`StreamingError` as in the async stream.
    """

    def __iter__(self) -> "BlockingTokenStream":
        return self

    def __next__(self) -> TokenData:
        if self._done:
            raise StopIteration
        ring = self._producer.ring
        try:
            while True:
                record = self._poll()
                if record is CLOSED:
                    raise StopIteration
                if record is not None:
                    break
                remaining = self._deadline - time.monotonic()
                select.select([ring.fileno()], [], [], None if math.isinf(remaining) else max(remaining, 0))
                ring.drain_wake()
            if self._config.stream_delay_ms:
                time.sleep(self._config.stream_delay_ms / 1000)
        except BaseException as exc:
            if not isinstance(exc, StopIteration):
                self.cancel()
            raise
        return self._deliver(record)

    def snapshot(self) -> SequenceState:
        """See :meth:`TokenStream.snapshot`; blocks this thread until the engine has copied it."""
        request = self._begin_command(1)
        while request.command_status == 0:
            time.sleep(0.001)
        return self._snapshot_result(request)

    def fork(self, config: StreamConfig | None = None) -> "BlockingTokenStream":
        """See :meth:`TokenStream.fork`."""
        child, config = self._branch(config)
        while self._producer.request.command_status == 0:
            time.sleep(0.001)
        return self._branch_stream(child, config, BlockingTokenStream)

    def close(self) -> None:
        self.cancel()
        while self._producer is not None and not self._producer.finished:
            time.sleep(0.001)

    def __enter__(self) -> "BlockingTokenStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
