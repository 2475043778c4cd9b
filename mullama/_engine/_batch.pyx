# cython: language_level=3
"""Continuous batching: many streams share one llama_context and one decode.

One engine thread runs ``_engine_loop`` without the GIL. Each step it builds
a batch from every running stream whose consumer has room (one token each)
plus chunks of waiting prompts, decodes once, samples each sequence with its
own sampler, runs each stream's text pipeline and hands the token to that
stream's ring. A stream whose ring is full is parked (left out of the batch)
without slowing the others. Finished or cancelled streams free their KV cells
at once; requests beyond the slots wait in a bounded FIFO.
"""

import threading

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport calloc, malloc, free
from libc.string cimport memcpy
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from mullama._engine._llama cimport *
from mullama._engine._mll cimport *
from mullama._engine._threads cimport attach_pools, free_pools
from mullama._engine._pipe cimport *
from mullama._engine._text cimport StopSet
from mullama._engine._model cimport ModelHandle
from mullama._engine._ring cimport TokenRing
from mullama._engine._context cimport make_sampler
from mullama import errors

cdef struct Req:
    Req * next                    # FIFO link while queued
    llama_sampler * smpl          # NULL: greedy argmax
    llama_token * prompt
    int32_t n_prompt
    int32_t prefill_pos
    int32_t n_past
    int32_t max_tokens
    int32_t n_generated
    int32_t n_ctx_limit
    llama_token last
    bint pending_decode
    bint want_logprob
    int32_t n_top                 # alternatives to report with each token (<= MLL_REC_TOP)
    bint parked
    int32_t out_idx               # row of its logits in the current batch, -1 if none
    int32_t n_in_batch            # tokens it has in the current batch
    int finish
    int err
    int32_t err_code
    int cancel
    int done                      # the engine is finished with it (read by Python)
    int seq
    TextPipe pipe
    mll_ring * ring


cdef struct Engine:
    llama_context * ctx
    const llama_vocab * vocab
    int32_t n_vocab
    llama_batch batch
    int32_t n_batch
    int32_t prefill_chunk         # prompt tokens per step while other streams decode
    Req ** slots
    int n_slots
    int n_active
    int rr                        # where the next prefill round starts (fairness)
    Req * q_head
    Req * q_tail
    int q_len
    mll_bell bell
    int stop
    int64_t n_decode_calls
    int64_t n_decoded_tokens
    int64_t decode_ns             # time inside llama_decode
    int64_t sample_ns             # time sampling and handing tokens out after each decode
    int32_t * kv_pos              # per slot: llama.cpp's largest cached position, as last seen by
                                  # the engine thread (others read this, never llama.cpp itself)
    int32_t slot_cells            # KV cells of one slot's sequence
    int32_t * scratch             # one allocation for the three per-slot arrays below
    int32_t * pad_seq             # sequences given a throw-away token this step (see _build_batch)
    int32_t * pad_pos             # and the position it took, removed again after the decode
    int32_t * job_slot            # the slot of each job
    int n_pad
    mll_rows rows                 # a step's argmax / log-sum-exp / top-k work, on all threads
    mll_row_job * jobs            # one per slot with logits this step


cdef c_bool _engine_abort(void * data) noexcept nogil:
    """Abort a decode only when every stream in the batch is cancelled (or at shutdown)."""
    cdef Engine * e = <Engine *> data
    cdef int i
    cdef Req * r
    if e.stop:
        return True
    for i in range(e.n_slots):
        r = e.slots[i]
        if r != NULL and r.n_in_batch > 0 and not (r.cancel or r.ring.cancelled):
            return False
    return True


cdef void _forget_seq(Engine * e, int seq) noexcept nogil:
    """Free a sequence's KV cells and publish what llama.cpp now reports for it."""
    cdef llama_memory_t mem = llama_get_memory(e.ctx)
    llama_memory_seq_rm(mem, seq, -1, -1)
    e.kv_pos[seq] = llama_memory_seq_pos_max(mem, seq)


cdef void _publish_kv(Engine * e) noexcept nogil:
    cdef llama_memory_t mem = llama_get_memory(e.ctx)
    cdef int i
    for i in range(e.n_slots):
        e.kv_pos[i] = llama_memory_seq_pos_max(mem, i)


cdef void _finish_req(Engine * e, int slot, int err) noexcept nogil:
    cdef Req * r = e.slots[slot]
    _forget_seq(e, r.seq)
    e.slots[slot] = NULL
    e.n_active -= 1
    if err != ERR_NONE:
        r.err = err
    mll_ring_close(r.ring, 1 if err != ERR_NONE else 0)
    pthread_mutex_lock(&e.bell.mu)
    r.done = 1
    pthread_mutex_unlock(&e.bell.mu)


cdef void _admit(Engine * e) noexcept nogil:
    """Move queued requests into free slots, first come first served."""
    cdef int i
    cdef Req * r
    for i in range(e.n_slots):
        if e.slots[i] != NULL:
            continue
        pthread_mutex_lock(&e.bell.mu)
        r = e.q_head
        while r != NULL and (r.cancel or r.ring.cancelled):
            # left before it started: it never decodes anything
            e.q_head = r.next
            e.q_len -= 1
            r.finish = FIN_CANCELLED
            mll_ring_close(r.ring, 0)
            r.done = 1
            r = e.q_head
        if r != NULL:
            e.q_head = r.next
            e.q_len -= 1
        if e.q_head == NULL:
            e.q_tail = NULL
        pthread_mutex_unlock(&e.bell.mu)
        if r == NULL:
            return
        r.seq = i
        _forget_seq(e, i)
        e.slots[i] = r
        e.n_active += 1


cdef void _reap(Engine * e) noexcept nogil:
    cdef int i
    cdef Req * r
    for i in range(e.n_slots):
        r = e.slots[i]
        if r != NULL and (r.cancel or r.ring.cancelled):
            r.finish = FIN_CANCELLED
            _finish_req(e, i, ERR_NONE)


cdef inline void _put(Engine * e, int32_t n, llama_token tok, int32_t pos, int seq, bint out) noexcept nogil:
    e.batch.token[n] = tok
    e.batch.pos[n] = pos
    e.batch.n_seq_id[n] = 1
    e.batch.seq_id[n][0] = seq
    e.batch.logits[n] = out


cdef int32_t _build_batch(Engine * e) noexcept nogil:
    """Fill the step's batch: one token for each running stream with room, then prompt chunks.

    Each slot is its own KV stream (not unified), and llama.cpp then splits a batch into
    micro-batches of equal token counts over runs of consecutive sequence ids: a hole in
    the run (a parked stream, a free slot between busy ones) would cost a second pass over
    the weights. Holes are filled with one throw-away token each (its cell is removed after
    the decode), which costs far less, and tokens go in in slot order."""
    cdef int32_t n = 0
    cdef int32_t budget, chunk, j, k, pos
    cdef int i, idx, lo = -1, hi = -1, odd_fix = -1
    cdef int n_decoding = 0, n_prefill = 0
    cdef Req * r
    for i in range(e.n_slots):
        r = e.slots[i]
        if r == NULL:
            continue
        r.out_idx = -1
        r.n_in_batch = 0
        if not r.pending_decode:
            continue
        if mll_ring_space(r.ring) == 0:
            if not r.parked:
                mll_ring_note_full(r.ring)
                r.parked = True
            continue
        r.parked = False
        r.n_in_batch = 1
        n_decoding += 1
    budget = e.n_batch - n_decoding
    if n_decoding and budget > e.prefill_chunk:
        budget = e.prefill_chunk    # a long prompt must not stall the running streams
    for k in range(e.n_slots):
        if budget <= 0:
            break
        idx = (e.rr + k) % e.n_slots
        r = e.slots[idx]
        if r == NULL or r.prefill_pos >= r.n_prompt:
            continue
        chunk = r.n_prompt - r.prefill_pos
        if chunk > budget:
            chunk = budget
        r.n_in_batch = chunk
        budget -= chunk
    e.rr = (e.rr + 1) % e.n_slots
    for i in range(e.n_slots):
        r = e.slots[i]
        if r != NULL and r.n_in_batch > 0:
            if lo < 0:
                lo = i
            hi = i
            if r.prefill_pos < r.n_prompt:
                n_prefill += 1
    e.n_pad = 0
    if lo < 0:
        e.batch.n_tokens = 0
        return 0
    # An odd number of logits rows (3, 5, 7...) costs more than one more row on the CPU
    # kernels here: with 7 streams a step takes longer than with 8. So a decode step with
    # an odd count asks for one extra row: a hole's throw-away token, or one just beside.
    if n_prefill == 0 and n_decoding >= 3 and n_decoding % 2 == 1:
        for i in range(lo + 1, hi):
            if _can_pad(e, i):
                odd_fix = i
                break
        if odd_fix < 0 and hi + 1 < e.n_slots and _can_pad(e, hi + 1):
            hi += 1
            odd_fix = hi
        elif odd_fix < 0 and lo > 0 and _can_pad(e, lo - 1):
            lo -= 1
            odd_fix = lo
    for i in range(lo, hi + 1):
        r = e.slots[i]
        if r == NULL or r.n_in_batch == 0:
            if _can_pad(e, i) and n < e.n_batch:
                pos = r.n_past if r != NULL else 0
                _put(e, n, r.last if r != NULL else 0, pos, i, i == odd_fix)
                e.pad_seq[e.n_pad] = i
                e.pad_pos[e.n_pad] = pos
                e.n_pad += 1
                n += 1
        elif r.prefill_pos < r.n_prompt:
            for j in range(r.n_in_batch):
                _put(e, n + j, r.prompt[r.prefill_pos + j], r.prefill_pos + j, i, False)
            if r.prefill_pos + r.n_in_batch == r.n_prompt:
                e.batch.logits[n + r.n_in_batch - 1] = 1
                r.out_idx = n + r.n_in_batch - 1
            n += r.n_in_batch
        else:
            _put(e, n, r.last, r.n_past, i, True)
            r.out_idx = n
            n += 1
    e.batch.n_tokens = n
    return n


cdef inline bint _can_pad(Engine * e, int i) noexcept nogil:
    """Whether slot ``i`` can take a throw-away token this step: free, or idle with room."""
    cdef Req * r = e.slots[i]
    return r == NULL or (r.n_in_batch == 0 and r.n_past < e.slot_cells)


cdef void _drop_pads(Engine * e) noexcept nogil:
    cdef llama_memory_t mem = llama_get_memory(e.ctx)
    cdef int k
    for k in range(e.n_pad):
        llama_memory_seq_rm(mem, e.pad_seq[k], e.pad_pos[k], -1)
    e.n_pad = 0


cdef int _sample_and_push(Engine * e, int slot, mll_row_job * job) noexcept nogil:
    """Choose the slot's token from its row (whose statistics ``job`` holds), run the text
    pipeline and hand the token to the ring."""
    cdef Req * r = e.slots[slot]
    cdef float logprob = 0.0
    cdef int rc
    cdef mll_tok_rec * rec
    cdef llama_token tok = choose_token(e.ctx, r.out_idx, r.smpl, job)
    rec = mll_ring_slot(r.ring)
    rec.n_top = 0
    if r.want_logprob:
        rec.n_top = token_logprobs(job, tok, &logprob)   # the job wrote the alternatives into rec
    r.n_generated += 1
    r.pipe.out_len = 0
    if llama_vocab_is_eog(e.vocab, tok):
        r.finish = FIN_EOS
        pipe_flush(&r.pipe)
    else:
        rc = pipe_push(&r.pipe, e.vocab, tok)
        if rc < 0:
            return ERR_NOMEM
        if rc == 1:
            r.finish = FIN_STOP
        elif r.n_generated >= r.max_tokens:
            r.finish = FIN_MAX_TOKENS
        elif r.n_prompt + r.n_generated >= r.n_ctx_limit:
            r.finish = FIN_CONTEXT
        if r.finish != FIN_NONE and r.finish != FIN_STOP:
            pipe_flush(&r.pipe)
    # room was checked before the token joined the batch, and only we add records
    rec.token = tok
    rec.finish = r.finish
    rec.logprob = logprob
    if mll_ring_set_text(rec, r.pipe.out, <unsigned int> r.pipe.out_len) < 0:
        return ERR_NOMEM
    if r.finish != FIN_NONE:
        # free the KV cells before the consumer can see the final token
        _forget_seq(e, r.seq)
    mll_ring_commit(r.ring)
    if r.finish != FIN_NONE:
        _finish_req(e, slot, ERR_NONE)
    else:
        r.last = tok
        r.pending_decode = True
    return ERR_NONE


cdef void _after_decode(Engine * e, int32_t rc) noexcept nogil:
    cdef int i, k, err
    cdef int32_t n_jobs = 0
    cdef Req * r
    cdef mll_tok_rec * rec
    cdef const float * logits
    for i in range(e.n_slots):
        r = e.slots[i]
        if r == NULL or r.n_in_batch == 0:
            continue
        if rc != 0:
            if rc == 2 and (r.cancel or r.ring.cancelled):
                r.finish = FIN_CANCELLED
                _finish_req(e, i, ERR_NONE)
            else:
                r.err_code = rc
                _finish_req(e, i, ERR_DECODE)
            continue
        r.n_past += r.n_in_batch
        e.n_decoded_tokens += r.n_in_batch
        if r.prefill_pos < r.n_prompt:
            r.prefill_pos += r.n_in_batch
        else:
            r.pending_decode = False
        if r.out_idx < 0:
            continue
        logits = llama_get_logits_ith(e.ctx, r.out_idx)
        if logits == NULL:
            _finish_req(e, i, ERR_NO_LOGITS)
            continue
        rec = mll_ring_slot(r.ring)
        row_job(&e.jobs[n_jobs], logits, r.smpl, r.want_logprob, r.n_top, rec.top_ids, rec.top_logprobs)
        e.job_slot[n_jobs] = i
        n_jobs += 1
    if n_jobs == 0:
        return
    # the rows' reductions, spread over the decode's threads; then each stream in slot order
    mll_rows_compute(&e.rows, n_jobs)
    for k in range(n_jobs):
        i = e.job_slot[k]
        err = _sample_and_push(e, i, &e.jobs[k])
        if err != ERR_NONE and e.slots[i] != NULL:
            _finish_req(e, i, err)


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t> ts.tv_sec * 1000000000 + ts.tv_nsec


cdef void _engine_loop(Engine * e) noexcept nogil:
    cdef uint64_t seen
    cdef int32_t n, rc
    cdef int64_t t0, t1
    while True:
        seen = mll_bell_seen(&e.bell)
        if e.stop:
            return
        _admit(e)
        _reap(e)
        n = _build_batch(e)
        if n == 0:
            _publish_kv(e)
            mll_bell_wait(&e.bell, seen)
            continue
        e.n_decode_calls += 1
        t0 = _now_ns()
        rc = llama_decode(e.ctx, e.batch)
        t1 = _now_ns()
        _drop_pads(e)
        _after_decode(e, rc)
        _publish_kv(e)
        e.decode_ns += t1 - t0
        e.sample_ns += _now_ns() - t1


cdef class Request:
    """One queued or running generation of the engine (owns its C state)."""

    cdef Req r
    cdef readonly TokenRing ring
    cdef StopSet _stops

    def __cinit__(self, const int[:] prompt not None, int max_tokens, tuple sampler, list stops,
                  bint want_logprob, int n_ctx_limit, TokenRing ring not None, int n_vocab,
                  int n_top=0):
        cdef Py_ssize_t n = prompt.shape[0]
        self.ring = ring
        self.r.n_prompt = <int32_t> n
        self.r.prompt = <llama_token *> malloc(max(n, 1) * sizeof(llama_token))
        if self.r.prompt == NULL:
            raise MemoryError()
        if n:
            memcpy(self.r.prompt, &prompt[0], n * sizeof(llama_token))
        self.r.max_tokens = max_tokens
        self.r.n_ctx_limit = n_ctx_limit
        self.r.want_logprob = want_logprob
        self.r.n_top = min(max(n_top, 0), MLL_REC_TOP) if want_logprob else 0
        self.r.out_idx = -1
        self.r.ring = &ring.r
        self._stops = StopSet(stops)
        self._stops.bind(&self.r.pipe.stop)
        pipe_start(&self.r.pipe)
        if pipe_reserve(&self.r.pipe, 256) < 0:
            raise MemoryError()
        self.r.smpl = make_sampler(sampler, n_vocab, n_ctx_limit, prompt)

    def __dealloc__(self):
        if self.r.smpl != NULL:
            llama_sampler_free(self.r.smpl)
        free(self.r.prompt)
        pipe_free(&self.r.pipe)

    def cancel(self):
        """Ask the engine to drop this request; it stops within one step."""
        self.r.cancel = 1
        self.ring.cancel()

    @property
    def done(self) -> bool:
        return self.r.done != 0

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
        return None


cdef class BatchEngine:
    """One llama_context with ``n_slots`` sequences and the thread that decodes them."""

    cdef Engine e
    cdef ggml_threadpool * _pool
    cdef ggml_threadpool * _pool_batch
    cdef readonly ModelHandle model
    cdef readonly int n_ctx_per_slot
    cdef readonly int max_queue
    cdef object _thread
    cdef object _inflight
    cdef object _lock
    cdef object __weakref__

    def __cinit__(self, ModelHandle model not None, int n_slots, int n_ctx_per_slot, int n_batch,
                  int n_threads, int flash_attn, int max_queue, int prefill_chunk):
        cdef llama_context_params params
        cdef int i
        model.check_open()
        self.model = model
        self.n_ctx_per_slot = n_ctx_per_slot
        self.max_queue = max_queue
        self._inflight = {}
        self._lock = threading.Lock()
        mll_bell_init(&self.e.bell)
        params = llama_context_default_params()
        params.n_ctx = n_slots * n_ctx_per_slot
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_slots
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.flash_attn_type = <llama_flash_attn_type> flash_attn
        params.kv_unified = False
        params.swa_full = True
        params.no_perf = True
        params.abort_callback = _engine_abort
        params.abort_callback_data = &self.e
        with nogil:
            self.e.ctx = llama_init_from_model(model.model, params)
        if self.e.ctx == NULL:
            from mullama._engine._model import take_log
            raise errors.context_create_error(take_log().strip().replace("\n", "; ")[-300:])
        if attach_pools(self.e.ctx, n_threads, n_threads, &self._pool, &self._pool_batch) < 0:
            raise errors.context_create_error("ggml could not create its thread pool")
        self.e.vocab = model.vocab
        self.e.n_vocab = model.n_vocab
        self.e.n_batch = llama_n_batch(self.e.ctx)
        self.e.prefill_chunk = max(1, min(prefill_chunk, self.e.n_batch))
        self.e.n_slots = n_slots
        self.e.slots = <Req **> calloc(n_slots, sizeof(Req *))
        self.e.kv_pos = <int32_t *> malloc(n_slots * sizeof(int32_t))
        self.e.batch = llama_batch_init(self.e.n_batch, 0, 1)
        self.e.slot_cells = <int32_t> (llama_n_ctx(self.e.ctx) // n_slots)
        self.e.scratch = <int32_t *> calloc(3 * n_slots, sizeof(int32_t))
        self.e.jobs = <mll_row_job *> calloc(n_slots, sizeof(mll_row_job))
        if (self.e.slots == NULL or self.e.kv_pos == NULL or self.e.batch.token == NULL
                or self.e.scratch == NULL or self.e.jobs == NULL):
            raise MemoryError()
        self.e.pad_seq = self.e.scratch
        self.e.pad_pos = self.e.scratch + n_slots
        self.e.job_slot = self.e.scratch + 2 * n_slots
        if mll_rows_init(&self.e.rows, self.e.jobs, self.e.n_vocab, n_threads, self._pool) < 0:
            raise MemoryError()
        for i in range(n_slots):
            self.e.kv_pos[i] = -1
        self._thread = threading.Thread(target=self._run, name="mullama-engine", daemon=True)
        self._thread.start()

    def _run(self):
        with nogil:
            _engine_loop(&self.e)

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
        free(self.e.slots)
        self.e.slots = NULL
        free(self.e.kv_pos)
        self.e.kv_pos = NULL
        free(self.e.jobs)
        self.e.jobs = NULL
        free(self.e.scratch)
        self.e.scratch = NULL

    def submit(self, Request req not None):
        """Queue ``req``; raises QueueFullError when ``max_queue`` requests already wait."""
        if self.e.ctx == NULL or self.e.stop:
            raise errors.ClosedError("the engine is closed")
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
            # the engine holds a C pointer to req: keep the object alive until it is done
            self._inflight[id(req)] = req
        req.ring.r.on_space = mll_bell_ring
        req.ring.r.on_space_arg = &self.e.bell
        mll_bell_ring(&self.e.bell)

    def wake(self):
        mll_bell_ring(&self.e.bell)

    def close(self):
        """Stop the engine thread; running and queued requests end as cancelled."""
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
                _finish_req(&self.e, i, ERR_NONE)
        r = self.e.q_head
        while r != NULL:
            mll_ring_close(r.ring, 0)
            r.done = 1
            r = r.next
        self.e.q_head = self.e.q_tail = NULL
        self.e.q_len = 0
        self._free()
        self._inflight.clear()

    @property
    def closed(self) -> bool:
        return self.e.ctx == NULL

    @property
    def n_slots(self) -> int:
        return self.e.n_slots

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
    def timing(self) -> dict:
        """Seconds the engine thread spent inside llama_decode and after it (sampling,
        text pipeline, hand-off), summed over all steps."""
        return {"decode_s": self.e.decode_ns / 1e9, "sample_s": self.e.sample_ns / 1e9}

    def used_positions(self) -> list:
        """Largest cached position of each sequence (-1: its KV cells are free), as llama.cpp's
        memory API reported it to the engine thread after its last change; safe to call while
        the engine decodes."""
        if self.e.ctx == NULL:
            return []
        return [self.e.kv_pos[i] for i in range(self.e.n_slots)]
