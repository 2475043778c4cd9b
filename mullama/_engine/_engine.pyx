# cython: language_level=3
"""The engine's Python face: ``Request`` (one generation) and ``Engine`` (one
llama_context with ``n_slots`` sequences and the step of ``_core.pyx``).

Drivers differ only in where steps run: ``Engine.step()`` on the calling
thread (the sync ``Context``), ``Engine.run_until(request)`` on a producer
thread, or ``Engine.start()`` for an engine thread serving every request
(``AsyncModel`` and the server).
"""

import threading

from libc.stdint cimport int32_t
from libc.stdlib cimport calloc, malloc, free
from libc.string cimport memcpy, memset

from mullama._engine._llama cimport *
from mullama._engine._mll cimport *
from mullama._engine._threads cimport attach_pools, free_pools
from mullama._engine._pipe cimport *
from mullama._engine._text cimport StopSet
from mullama._engine._model cimport ModelHandle
from mullama._engine._ring cimport TokenRing
from mullama._engine._sampler cimport make_sampler, Grammar
from mullama._engine._core cimport *
from mullama._engine._guard cimport mll_init_from_model, mll_guard_error
from mullama import errors


cdef class Request:
    """One queued or running generation of the engine (owns its C state).

    ``sampler`` is the tuple of ``SamplerParams.native``. ``reuse``: start from
    the longest prefix of the prompt an idle slot still holds; ``keep``: leave
    the cells in the slot when it ends. ``logits_out``: a float32 array of
    ``n_vocab`` values that receives the logits the first token is sampled from.
    ``grammar``: a parsed :class:`Grammar` the generated tokens must follow (the
    request takes its own copy of the grammar's state).
    """

    cdef Req r
    cdef readonly TokenRing ring
    cdef StopSet _stops
    cdef object _logits_out
    cdef object _state
    cdef Grammar _grammar
    cdef list _kids
    cdef tuple _scores
    cdef object __weakref__

    def __cinit__(self, const int[:] prompt not None, int max_tokens, tuple sampler, list stops,
                  bint want_logprob, int n_ctx_limit, TokenRing ring not None, int n_vocab,
                  int n_top=0, bint reuse=False, bint keep=False, float[::1] logits_out=None,
                  bytes state=None, int state_n_kv=0, Grammar grammar=None):
        cdef Py_ssize_t n = prompt.shape[0]
        if n <= 0:
            raise ValueError("the prompt is empty")
        for i in range(n):
            if prompt[i] < 0 or prompt[i] >= n_vocab:
                raise IndexError(f"prompt token id {prompt[i]} at position {i} is outside the "
                                 f"vocabulary [0, {n_vocab})")
        self.ring = ring
        self.r.n_prompt = <int32_t> n
        self.r.prompt = <llama_token *> malloc(n * sizeof(llama_token))
        if self.r.prompt == NULL:
            raise MemoryError()
        memcpy(self.r.prompt, &prompt[0], n * sizeof(llama_token))
        self.r.max_tokens = max_tokens
        self.r.n_ctx_limit = n_ctx_limit
        self.r.want_logprob = want_logprob
        self.r.n_top = min(max(n_top, 0), MLL_REC_TOP) if want_logprob else 0
        self.r.reuse = reuse
        self.r.keep = keep
        self.r.out_idx = -1
        self.r.ring = &ring.r
        if logits_out is not None:
            if logits_out.shape[0] != n_vocab:
                raise ValueError("logits_out must hold n_vocab values")
            self._logits_out = logits_out
            self.r.logits_out = &logits_out[0]
        if state is not None:
            if not 0 <= state_n_kv <= n:
                raise ValueError("a snapshot's cached tokens must begin the prompt")
            self._state = state
            self.r.state_data = <const unsigned char *> (<char *> state)
            self.r.state_len = len(state)
            self.r.state_n_kv = state_n_kv
        self._kids = []
        self._stops = StopSet(stops)
        self._stops.bind(&self.r.pipe.stop)
        pipe_start(&self.r.pipe)
        if pipe_reserve(&self.r.pipe, 256) < 0:
            raise MemoryError()
        self.r.smpl = make_sampler(sampler, n_vocab, n_ctx_limit, prompt)
        draft_max, ngram, draft_min = sampler[11] if len(sampler) > 11 else (0, 0, 0)
        if draft_max > 0:
            if not (1 <= draft_max <= MLL_DRAFT_MAX and 1 <= ngram and 0 <= draft_min <= draft_max):
                raise ValueError(f"draft_max must be within [1, {MLL_DRAFT_MAX}], ngram >= 1 and "
                                 f"draft_min within [0, draft_max]")
            self.r.draft_min = draft_min
            self.r.draft = <llama_token *> malloc(MLL_DRAFT_MAX * sizeof(llama_token))
            if self.r.draft == NULL:
                raise MemoryError()
            self.r.draft_max = draft_max
            self.r.ngram = ngram
            # no evidence yet: assume the text repeats its match (a copy goes fast from the
            # start); the checks of unverified drafts bring it down quickly when it does not
            self.r.accept = 0.8
        self.r.shadow = -1
        if grammar is not None:
            if grammar.model.n_vocab != n_vocab:
                raise ValueError("the grammar was parsed for another model's vocabulary")
            self._grammar = grammar
            self.r.cand = <llama_token_data *> malloc(n_vocab * sizeof(llama_token_data))
            if self.r.cand == NULL:
                raise MemoryError()
            self.r.grammar = grammar.clone()
            self.r.grammar_fast_k = _grammar_fast_k(sampler)

    def __dealloc__(self):
        if self.r.smpl != NULL:
            llama_sampler_free(self.r.smpl)
        if self.r.grammar != NULL:
            llama_sampler_free(self.r.grammar)
        free(self.r.cand)
        free(self.r.draft)
        free(self.r.prompt)
        free(self.r.snap_data)
        free(self.r.snap_tokens)
        pipe_free(&self.r.pipe)

    def want_scores(self, int first, int top=0):
        """Before submitting: reduce the logits rows of prompt positions ``first`` ..
        ``n_prompt - 2`` as they are computed, each scoring the prompt token after it
        (its log-probability, whether it is the row's argmax, the ``top`` most likely
        tokens). With ``max_tokens == 0`` the request ends once its prompt is evaluated.
        ``scores()`` returns the arrays."""
        import numpy as np
        cdef Py_ssize_t n = self.r.n_prompt
        if not 0 <= first < n:
            raise ValueError(f"the first scored row must be a prompt position in [0, {n}), got {first}")
        if top < 0:
            raise ValueError(f"top must be >= 0, got {top}")
        logprob = np.full(n, np.nan, dtype=np.float64)
        argmax = np.full(n, -1, dtype=np.int32)
        top_ids = np.full((n, top), -1, dtype=np.int32)
        top_vals = np.full((n, top), np.nan, dtype=np.float32)
        cdef double[::1] lp = logprob
        cdef int32_t[::1] am = argmax
        cdef int32_t[:, ::1] ti = top_ids
        cdef float[:, ::1] tv = top_vals
        self._scores = (logprob, argmax, top_ids, top_vals)
        self.r.score = True
        self.r.score_from = first
        self.r.score_top = top
        self.r.sc_logprob = &lp[0]
        self.r.sc_argmax = &am[0]
        self.r.sc_top_ids = &ti[0, 0] if top else NULL
        self.r.sc_top_vals = &tv[0, 0] if top else NULL

    def scores(self):
        """(logprob, argmax, top_ids, top_logprobs) of ``want_scores``: numpy arrays with
        one entry (row) per prompt token; NaN / -1 where a token was not scored. Complete
        once the request is done without error."""
        if self._scores is None:
            raise RuntimeError("this request scores nothing (want_scores was not called)")
        return self._scores

    def add_branch(self, Request kid not None):
        """Before submitting: ``kid`` (same prompt) branches from this request's prompt once
        it is evaluated, sampling its first token from the same logits (n > 1)."""
        if kid is self:
            raise ValueError("a request cannot branch from itself")
        if kid.r.n_prompt != self.r.n_prompt:
            raise ValueError("a branch has its parent's prompt")
        kid.r.next = self.r.kids
        self.r.kids = &kid.r
        self.r.n_kids += 1
        self._kids.append(kid)

    @property
    def branches(self) -> list:
        return list(self._kids)

    @property
    def command_status(self) -> int:
        """0 while a command (snapshot, fork) waits for the engine, 1 when done, < 0 failed."""
        return self.r.cmd_status

    def take_snapshot(self):
        """(tokens, n_cached, data) of the last snapshot command; frees its buffers."""
        if self.r.snap_tokens == NULL:
            raise RuntimeError("no snapshot was taken")
        return _snapshot_tuple(&self.r)

    def cancel(self):
        """Ask the engine to drop this request; it stops within one step."""
        self.r.cancel = 1
        self.ring.cancel()

    @property
    def done(self) -> bool:
        return self.r.done != 0

    @property
    def n_prompt(self) -> int:
        return self.r.n_prompt

    @property
    def finish_code(self) -> int:
        """How the request ended (a FIN_* code of _pipe.pxd; 0 while it runs)."""
        return self.r.finish

    @property
    def keeps_cache(self) -> bool:
        return self.r.keep

    @property
    def n_reused(self) -> int:
        """Prompt tokens taken from the cache instead of being evaluated."""
        return self.r.n_reused

    @property
    def n_generated(self) -> int:
        return self.r.n_generated

    @property
    def grammar_stats(self) -> dict:
        """Tokens whose first choice the grammar rejected, and how many of those needed a pass
        of the grammar over the whole vocabulary."""
        return {"rejected": self.r.n_grammar_rejected, "full_passes": self.r.n_grammar_full}

    @property
    def spec_stats(self) -> dict:
        """Speculation: drafted tokens verified, how many of them were accepted, and the
        estimated chance that the next drafted token is accepted (which sets draft lengths)."""
        return {"drafted": self.r.n_drafted, "accepted": self.r.n_accepted, "acceptance": self.r.accept}

    @property
    def stop_index(self):
        """Which stop string ended the generation, or None."""
        return self.r.pipe.stop.matched_index if self.r.pipe.stop.matched else None

    def error(self):
        """The exception for a failed request, or None."""
        if self.r.err == ERR_DECODE:
            try:
                errors.raise_for_decode(self.r.err_code)
            except errors.GenerationError as exc:
                return exc
        if self.r.err == ERR_NO_LOGITS:
            return errors.GenerationError("llama.cpp returned no logits for the last token")
        if self.r.err == ERR_NOMEM:
            return MemoryError()
        if self.r.err == ERR_STATE:
            return errors.StateError("llama.cpp refused the snapshot's cells for this engine "
                                     "(a different model or context layout)")
        if self.r.err == ERR_GRAMMAR:
            return errors.GenerationError("the grammar allows no token at this point (every token it "
                                          "allows was banned, or the grammar can neither go on nor end)")
        if self.r.err == ERR_CXX:
            return errors.cxx_exception("generation", self.r.err_text.decode("utf-8", "replace"),
                                        errors.GenerationError)
        return None


cdef int32_t _grammar_fast_k(tuple cfg):
    """How many best allowed tokens decide the choice of the sampler ``cfg`` (see
    ``mll_sample_constrained``): 1 for plain greedy, top-k for a chain that nothing reorders
    before its top-k, 0 when only the whole vocabulary will do."""
    (temperature, top_k, _top_p, _min_p, _typical_p, repeat_penalty, repeat_last_n,
     frequency_penalty, presence_penalty, _seed, logit_bias) = cfg[:11]
    penalties = (repeat_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0) \
        and repeat_last_n != 0
    if penalties or logit_bias:
        return 0
    if temperature <= 0.0:
        return 1
    return top_k if top_k > 0 else 0


cdef inline void _release(void ** p) noexcept:
    free(p[0])
    p[0] = NULL


cdef tuple _snapshot_tuple(Req * r):
    import numpy as np
    tokens = np.empty(r.snap_n_tokens, dtype=np.int32)
    cdef int[::1] view = tokens
    if r.snap_n_tokens:
        memcpy(&view[0], r.snap_tokens, r.snap_n_tokens * sizeof(int))
    data = (<char *> r.snap_data)[:r.snap_len] if r.snap_len else b""
    n_kv = r.snap_n_kv
    free(r.snap_data)
    free(r.snap_tokens)
    r.snap_data = NULL
    r.snap_tokens = NULL
    return tokens, n_kv, data


cdef class Engine:
    """One llama_context with ``n_slots`` sequences of ``n_ctx_per_slot`` cells each.

    Not thread-safe by itself: either one engine thread steps it (``start``),
    or its owner serialises ``step``/``run_until``/``clear`` with a lock.
    ``submit`` and the read-only properties are safe from any thread.
    """

    cdef EngineState e
    cdef ggml_threadpool * _pool
    cdef ggml_threadpool * _pool_batch
    cdef readonly ModelHandle model
    cdef readonly int n_ctx_per_slot
    cdef readonly int n_ctx_internal
    cdef readonly int max_queue
    cdef readonly int n_threads
    cdef object _thread
    cdef object _inflight
    cdef object _lock
    cdef object __weakref__

    def __cinit__(self, ModelHandle model not None, int n_slots, int n_ctx_per_slot, int n_batch,
                  int n_threads, int n_threads_batch, int flash_attn, bint swa_full=True,
                  int max_queue=64, int prefill_chunk=256, int max_rows=256):
        cdef llama_context_params params
        cdef int i
        model.check_open()
        self.model = model
        self.n_ctx_per_slot = n_ctx_per_slot
        self.max_queue = max_queue
        self.n_threads = n_threads
        self._inflight = {}
        self._lock = threading.Lock()
        mll_bell_init(&self.e.bell)
        params = llama_context_default_params()
        params.n_ctx = n_slots * n_ctx_per_slot
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_slots
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        params.flash_attn_type = <llama_flash_attn_type> flash_attn
        params.kv_unified = False
        params.swa_full = swa_full
        params.no_perf = True
        params.abort_callback = engine_abort
        params.abort_callback_data = &self.e
        from mullama._engine._model import take_log
        take_log()
        with nogil:
            self.e.ctx = mll_init_from_model(model.model, params)
        if self.e.ctx == NULL:
            detail = mll_guard_error().decode("utf-8", "replace") or take_log().strip().replace("\n", "; ")[-300:]
            raise errors.context_create_error(detail)
        if attach_pools(self.e.ctx, n_threads, n_threads_batch, &self._pool, &self._pool_batch) < 0:
            raise errors.context_create_error("ggml could not create its thread pool")
        self.n_ctx_internal = llama_n_ctx(self.e.ctx)
        self.e.vocab = model.vocab
        self.e.n_vocab = model.n_vocab
        self.e.n_swa = 0 if swa_full else max(0, llama_model_n_swa(model.model))
        self.e.n_batch = llama_n_batch(self.e.ctx)
        self.e.prefill_chunk = max(1, min(prefill_chunk, self.e.n_batch))
        self.e.n_slots = n_slots
        self.e.slot_cells = <int32_t> (self.n_ctx_internal // n_slots)
        self.e.slots = <Req **> calloc(n_slots, sizeof(Req *))
        self.e.kv_pos = <int32_t *> malloc(n_slots * sizeof(int32_t))
        self.e.n_hist = <int32_t *> calloc(n_slots, sizeof(int32_t))
        self.e.used_at = <uint64_t *> calloc(n_slots, sizeof(uint64_t))
        self.e.hist = <llama_token *> malloc(<size_t> n_slots * self.e.slot_cells * sizeof(llama_token))
        self.e.batch = llama_batch_init(self.e.n_batch, 0, 1)
        self.e.max_rows = max(1, min(max_rows, self.e.n_batch))
        # a row job for each logits row: every stream's token and draft, then the scored rows
        self.e.n_jobs_cap = n_slots * (1 + MLL_DRAFT_MAX) + self.e.max_rows
        self.e.scratch = <int32_t *> calloc(5 * n_slots + 2 * self.e.n_jobs_cap, sizeof(int32_t))
        self.e.plan_acc = <double *> calloc(n_slots, sizeof(double))
        self.e.jobs = <mll_row_job *> calloc(self.e.n_jobs_cap, sizeof(mll_row_job))
        if (self.e.slots == NULL or self.e.kv_pos == NULL or self.e.n_hist == NULL or self.e.used_at == NULL
                or self.e.hist == NULL or self.e.batch.token == NULL or self.e.scratch == NULL
                or self.e.jobs == NULL or self.e.plan_acc == NULL):
            raise MemoryError()
        self.e.pad_seq = self.e.scratch
        self.e.pad_pos = self.e.scratch + n_slots
        self.e.plan_slot = self.e.scratch + 2 * n_slots
        self.e.plan_avail = self.e.scratch + 3 * n_slots
        self.e.plan_k = self.e.scratch + 4 * n_slots
        self.e.job_slot = self.e.scratch + 5 * n_slots
        self.e.job_idx = self.e.job_slot + self.e.n_jobs_cap
        if mll_rows_init(&self.e.rows, self.e.jobs, self.e.n_vocab, n_threads, self._pool) < 0:
            raise MemoryError()
        for i in range(n_slots):
            self.e.kv_pos[i] = -1

    # ----------------------------------------------------------- drivers

    def start(self):
        """Run the engine on a thread of its own until ``close()``."""
        self._thread = threading.Thread(target=self._run, name="mullama-engine", daemon=True)
        self._thread.start()

    def _run(self):
        with nogil:
            engine_run(&self.e, NULL)

    def step(self) -> int:
        """One engine step on this thread (GIL released). Returns the tokens decoded:
        0 when nothing could run."""
        cdef int32_t n
        self._check_open()
        with nogil:
            n = engine_step(&self.e)
        return n

    def run_until(self, Request req not None):
        """Step on this thread (GIL released) until ``req`` is done, sleeping while its
        consumer has no room."""
        self._check_open()
        with nogil:
            engine_run(&self.e, &req.r)

    def reap(self):
        """End the cancelled requests now (for a driver that steps on its own thread)."""
        if self.e.ctx != NULL:
            engine_reap(&self.e)

    def clear(self):
        """Forget every idle slot's cached tokens (running requests keep theirs)."""
        cdef int i
        self._check_open()
        for i in range(self.e.n_slots):
            if self.e.slots[i] == NULL:
                engine_forget(&self.e, i)

    def clear_idle(self):
        """Free the idle slots' cells from the engine's own thread (threaded engines):
        returns once done, after at most one decode step."""
        import time
        self._check_open()
        if self._thread is None:
            self.clear()
            return
        pthread_mutex_lock(&self.e.bell.mu)
        self.e.clear_wanted = 1
        pthread_mutex_unlock(&self.e.bell.mu)
        mll_bell_ring(&self.e.bell)
        while self.e.clear_wanted and self.e.ctx != NULL and not self.e.stop:
            time.sleep(0.001)

    cdef int _check_open(self) except -1:
        if self.e.ctx == NULL or self.e.stop:
            raise errors.ClosedError("the engine is closed")
        if self.model.closed:
            raise errors.ClosedError("the model of this engine is closed")
        return 0

    def submit(self, Request req not None):
        """Queue ``req``; raises QueueFullError when ``max_queue`` requests already wait."""
        self._check_open()
        if req._grammar is not None and req._grammar.model.vocab != self.e.vocab:
            raise ValueError("the request's grammar was parsed for another model")
        with self._lock:
            for key in [k for k, v in self._inflight.items() if (<Request> v).r.done]:
                del self._inflight[key]
            pthread_mutex_lock(&self.e.bell.mu)
            full = self.e.q_len >= self.max_queue
            if not full:
                req.r.next = NULL
                if self.e.q_tail != NULL:
                    self.e.q_tail.next = &req.r
                else:
                    self.e.q_head = &req.r
                self.e.q_tail = &req.r
                self.e.q_len += 1
            pthread_mutex_unlock(&self.e.bell.mu)
            if full:
                raise errors.QueueFullError(
                    f"{self.max_queue} requests are already waiting for a slot; try again later")
        # the engine holds C pointers to req (and its branches): keep them alive until done
        self._register(req)
        mll_bell_ring(&self.e.bell)

    def wake(self):
        mll_bell_ring(&self.e.bell)

    def _register(self, Request req):
        with self._lock:
            self._inflight[id(req)] = req
            for kid in req._kids:
                self._inflight[id(kid)] = kid
        for kid in [req] + req._kids:
            (<Request> kid).ring.r.on_space = mll_bell_ring
            (<Request> kid).ring.r.on_space_arg = &self.e.bell

    def command(self, Request req not None, int cmd, Request child=None):
        """Ask the engine to snapshot (1) or fork into ``child`` (2) the running ``req``
        between two steps; poll ``req.command_status``. Threaded engines run it on their
        thread; otherwise the caller runs ``run_commands()``."""
        self._check_open()
        if cmd == CMD_FORK:
            if child is None:
                raise ValueError("a fork needs the branch's request")
            self._register(child)
        pthread_mutex_lock(&self.e.bell.mu)
        if req.r.done:
            req.r.cmd_status = CMD_ENDED
        else:
            req.r.cmd_status = 0
            req.r.cmd = cmd
            req.r.cmd_req = &child.r if child is not None else NULL
        pthread_mutex_unlock(&self.e.bell.mu)
        mll_bell_ring(&self.e.bell)

    def run_commands(self):
        """Run pending commands now (for a driver that steps on its own thread)."""
        self._check_open()
        with nogil:
            engine_commands(&self.e)

    def snapshot_slot(self, int slot):
        """(tokens, n_cached, data) of an idle slot's cached cells."""
        cdef Req tmp
        cdef int rc
        self._check_open()
        if not 0 <= slot < self.e.n_slots or self.e.slots[slot] != NULL:
            raise ValueError("the slot is not idle")
        memset(&tmp, 0, sizeof(Req))
        with nogil:
            rc = engine_snapshot(&self.e, slot, &tmp)
        if rc != 1:
            free(tmp.snap_data)
            free(tmp.snap_tokens)
            raise MemoryError() if rc == CMD_NOMEM else errors.MullamaError(
                "llama.cpp could not copy the sequence's state")
        return _snapshot_tuple(&tmp)

    def restore_slot(self, int slot, bytes data not None, const int[:] tokens not None, int n_kv):
        """Load a snapshot's cells into the idle slot ``slot``; its tokens become the slot's
        cache. Raises MullamaError when llama.cpp refuses them (the slot is then empty)."""
        cdef int rc
        cdef const unsigned char * src = <const unsigned char *> (<char *> data)
        cdef size_t n = len(data)
        cdef const llama_token * toks = NULL
        self._check_open()
        if not 0 <= slot < self.e.n_slots or self.e.slots[slot] != NULL:
            raise ValueError("the slot is not idle")
        if not 0 <= n_kv <= tokens.shape[0]:
            raise ValueError("n_kv must be within the tokens")
        if tokens.shape[0]:
            toks = <const llama_token *> &tokens[0]
        with nogil:
            rc = engine_restore(&self.e, slot, src, n, toks, n_kv)
        if rc < 0:
            raise errors.StateError("llama.cpp refused the snapshot's cells for this context "
                                    "(a different model or context layout)")

    # ----------------------------------------------------------- lifecycle

    def __dealloc__(self):
        self._free()

    cdef void _free(self) noexcept:
        if self.e.ctx != NULL:
            llama_free(self.e.ctx)
            self.e.ctx = NULL
        mll_rows_free(&self.e.rows)
        free_pools(&self._pool, &self._pool_batch)
        if self.e.batch.token != NULL:
            llama_batch_free(self.e.batch)
            self.e.batch.token = NULL
        _release(<void **> &self.e.slots)
        _release(<void **> &self.e.kv_pos)
        _release(<void **> &self.e.jobs)
        _release(<void **> &self.e.scratch)
        _release(<void **> &self.e.plan_acc)
        _release(<void **> &self.e.hist)
        _release(<void **> &self.e.n_hist)
        _release(<void **> &self.e.used_at)

    def close(self):
        """Stop the engine; running and queued requests end as cancelled. The caller
        makes sure no other thread is inside ``step``/``run_until``."""
        cdef Req * r
        cdef int i
        if self.e.ctx == NULL:
            return
        self.e.stop = 1
        mll_bell_ring(&self.e.bell)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for i in range(self.e.n_slots):
            if self.e.slots[i] != NULL:
                self.e.slots[i].finish = FIN_CANCELLED
                engine_finish(&self.e, i, ERR_NONE)
        r = self.e.q_head
        while r != NULL:
            mll_ring_close(r.ring, 0)
            r.done = 1
            r = r.next
        self.e.q_head = self.e.q_tail = NULL
        self.e.q_len = 0
        self._free()
        self._inflight.clear()

    # ----------------------------------------------------------- facts

    @property
    def closed(self) -> bool:
        return self.e.ctx == NULL

    @property
    def n_slots(self) -> int:
        return self.e.n_slots

    @property
    def n_batch(self) -> int:
        return self.e.n_batch

    @property
    def max_rows(self) -> int:
        """Scored logits rows per decode at most."""
        return self.e.max_rows

    @property
    def n_active(self) -> int:
        return self.e.n_active

    @property
    def queue_depth(self) -> int:
        return self.e.q_len

    @property
    def n_decode_calls(self) -> int:
        return self.e.n_decode_calls

    @property
    def n_decoded_tokens(self) -> int:
        return self.e.n_decoded_tokens

    @property
    def prefix_stats(self) -> dict:
        """Admissions that reused cached tokens, and how many prompt tokens they skipped."""
        return {"hits": self.e.n_prefix_hits, "reused_tokens": self.e.n_reused_tokens}

    @property
    def grammar_stats(self) -> dict:
        """Tokens chosen under a grammar, how many of those the grammar rejected first, and how
        many then needed a pass of the grammar over the whole vocabulary."""
        return {"tokens": self.e.n_grammar_tokens, "rejected": self.e.n_grammar_rejected,
                "full_passes": self.e.n_grammar_full}

    @property
    def spec_stats(self) -> dict:
        """Speculation, all streams: drafted tokens verified, and how many were accepted."""
        return {"drafted": self.e.n_drafted, "accepted": self.e.n_accepted}

    def pass_costs(self) -> dict:
        """Measured seconds of a decode-only pass by logits rows (the basis of draft lengths)."""
        return {n: mll_cost_measured(&self.e.costs, n) / 1e9 for n in range(1, MLL_COST_ROWS + 1)
                if mll_cost_measured(&self.e.costs, n) > 0}

    @property
    def timing(self) -> dict:
        """Seconds spent inside llama_decode and after it (sampling, text pipeline,
        hand-off), summed over all steps."""
        return {"decode_s": self.e.decode_ns / 1e9, "sample_s": self.e.sample_ns / 1e9}

    def n_cached(self, int slot) -> int:
        """How many tokens slot ``slot`` holds in its KV cells."""
        if self.e.ctx == NULL or not 0 <= slot < self.e.n_slots:
            return 0
        return self.e.n_hist[slot]

    def cached_tokens(self, int slot) -> list:
        """The tokens whose keys and values slot ``slot`` holds, by position."""
        if self.e.ctx == NULL or not 0 <= slot < self.e.n_slots:
            return []
        base = <size_t> slot * self.e.slot_cells
        return [self.e.hist[base + i] for i in range(self.e.n_hist[slot])]

    def held_positions(self) -> list:
        """Like ``used_positions``, but -1 for slots that no request holds (their cells,
        if any, belong to the prefix cache)."""
        if self.e.ctx == NULL:
            return []
        return [self.e.kv_pos[i] if self.e.slots[i] != NULL else -1 for i in range(self.e.n_slots)]

    def used_positions(self) -> list:
        """Largest cached position of each sequence (-1: its KV cells are free), as llama.cpp's
        memory API reported it after the engine's last change; safe to call while it decodes."""
        if self.e.ctx == NULL:
            return []
        return [self.e.kv_pos[i] for i in range(self.e.n_slots)]
