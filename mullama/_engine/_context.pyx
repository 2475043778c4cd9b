# cython: language_level=3
"""Owner of a ``llama_context`` and of the generation loop.

One generation at a time runs on a context. Each call to ``step()`` releases
the GIL and, touching no Python object, decodes the previously sampled token,
samples the next one, turns it into bytes, passes them through the UTF-8
holdback and the stop-sequence matcher, and leaves the printable bytes in the
context's hand-off buffer. Prompt processing happens in ``n_batch`` chunks
(``prefill()``), between which Python can look for signals and cancellation;
inside a chunk, llama.cpp's abort callback watches the cancel flag.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint32_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy

import numpy as np

from mullama._engine._llama cimport *
from mullama._engine._mll cimport *
from mullama._engine._model cimport ModelHandle
from mullama._engine._ring cimport TokenRing
from mullama._engine._threads cimport attach_pools, free_pools
from mullama._engine._pipe cimport *
from mullama._engine._text cimport StopSet
from mullama import errors

cdef enum:
    MAX_TOP = 64

FINISH_NAMES = {FIN_EOS: "eos", FIN_STOP: "stop", FIN_MAX_TOKENS: "max_tokens",
                FIN_CONTEXT: "context", FIN_CANCELLED: "cancelled"}


cdef struct GenState:
    llama_context * ctx
    const llama_vocab * vocab
    llama_sampler * smpl          # NULL on the greedy fast path
    llama_batch batch
    int32_t n_vocab
    int32_t n_batch
    int32_t n_ctx_limit           # the user's limit: prompt + generated tokens
    # tokens whose keys/values are in the cache, position i at tokens[i]
    llama_token * tokens
    int32_t n_past
    # the current generation
    llama_token * prompt
    int32_t n_prompt
    int32_t prefill_pos
    int32_t max_tokens
    int32_t n_generated
    llama_token last
    bint pending_decode
    int finish
    int err
    int32_t err_code
    int cancel                    # set from any thread; read by the abort callback
    int64_t n_decode_calls
    # per-token results
    llama_token token
    bint want_logprob
    float logprob
    int32_t n_top
    int32_t top_ids[MAX_TOP]
    float top_logprobs[MAX_TOP]
    # text pipeline: piece -> utf8 holdback -> stop matcher -> out
    TextPipe pipe


cdef c_bool _abort_cb(void * data) noexcept nogil:
    return (<GenState *> data).cancel != 0


cdef int _decode_one(GenState * g, llama_token tok) noexcept nogil:
    g.batch.n_tokens = 1
    g.batch.token[0] = tok
    g.batch.pos[0] = g.n_past
    g.batch.n_seq_id[0] = 1
    g.batch.seq_id[0][0] = 0
    g.batch.logits[0] = 1
    g.n_decode_calls += 1
    cdef int32_t rc = llama_decode(g.ctx, g.batch)
    if rc != 0:
        g.err = ERR_DECODE
        g.err_code = rc
        return -1
    g.tokens[g.n_past] = tok
    g.n_past += 1
    return 0


cdef int _prefill_chunk(GenState * g) noexcept nogil:
    """Decode the next chunk of the prompt. Returns 1 when the prompt is done, 0 if more
    remains, -1 on error."""
    cdef int32_t start = g.prefill_pos
    cdef int32_t end = start + g.n_batch
    cdef int32_t i
    cdef int32_t rc
    if end > g.n_prompt:
        end = g.n_prompt
    g.batch.n_tokens = end - start
    for i in range(start, end):
        g.batch.token[i - start] = g.prompt[i]
        g.batch.pos[i - start] = i
        g.batch.n_seq_id[i - start] = 1
        g.batch.seq_id[i - start][0] = 0
        g.batch.logits[i - start] = 1 if i == g.n_prompt - 1 else 0
    g.n_decode_calls += 1
    rc = llama_decode(g.ctx, g.batch)
    if rc != 0:
        g.err = ERR_DECODE
        g.err_code = rc
        return -1
    memcpy(g.tokens + start, g.prompt + start, (end - start) * sizeof(llama_token))
    g.n_past = end
    g.prefill_pos = end
    return 1 if end == g.n_prompt else 0


cdef int _step(GenState * g) noexcept nogil:
    """One token: decode the last one, sample, detokenize, hold back, match stops.

    Returns 0 with ``g.pipe.out``/``g.pipe.out_len`` holding the printable bytes and
    ``g.finish`` set when this token ends the generation; -1 on error.
    """
    cdef float * logits
    cdef llama_token tok
    cdef int rc
    cdef mll_row_job job
    g.pipe.out_len = 0
    if g.pending_decode:
        if g.cancel:
            g.finish = FIN_CANCELLED
            pipe_flush(&g.pipe)
            return 0
        if _decode_one(g, g.last) < 0:
            return -1
        g.pending_decode = False
    logits = llama_get_logits_ith(g.ctx, -1)
    if logits == NULL:
        g.err = ERR_NO_LOGITS
        return -1
    row_job(&job, logits, g.smpl, g.want_logprob, g.n_top, g.top_ids, g.top_logprobs)
    mll_row_run(&job, g.n_vocab)
    tok = choose_token(g.ctx, -1, g.smpl, &job)
    g.token = tok
    g.n_generated += 1
    if g.want_logprob:
        token_logprobs(&job, tok, &g.logprob)
    if llama_vocab_is_eog(g.vocab, tok):
        g.finish = FIN_EOS
        pipe_flush(&g.pipe)
        return 0
    rc = pipe_push(&g.pipe, g.vocab, tok)
    if rc < 0:
        g.err = ERR_NOMEM
        return -1
    if rc == 1:
        g.finish = FIN_STOP
        return 0
    if g.n_generated >= g.max_tokens:
        g.finish = FIN_MAX_TOKENS
    elif g.n_prompt + g.n_generated >= g.n_ctx_limit:
        g.finish = FIN_CONTEXT
    if g.finish != FIN_NONE:
        pipe_flush(&g.pipe)
        return 0
    g.last = tok
    g.pending_decode = True
    return 0


cdef int _produce(GenState * g, mll_ring * r) noexcept nogil:
    """The whole generation on a producer thread: prompt chunks, then one token per
    free ring slot. Returns 0, or -1 when a decode failed (details in ``g.err``)."""
    cdef int rc
    cdef int32_t i
    cdef mll_tok_rec * rec
    while g.prefill_pos < g.n_prompt:
        if r.cancelled:
            g.cancel = 1
        if g.cancel:
            g.finish = FIN_CANCELLED
            return 0
        rc = _prefill_chunk(g)
        if rc < 0:
            return -1
    while True:
        if mll_ring_wait_slot(r) < 0:
            g.cancel = 1
        if g.cancel:
            g.finish = FIN_CANCELLED
            return 0
        if _step(g) < 0:
            return -1
        rec = mll_ring_slot(r)
        rec.token = g.token if g.finish != FIN_CANCELLED else -1
        rec.finish = g.finish
        rec.logprob = g.logprob if g.want_logprob else 0.0
        rec.n_top = min(g.n_top, MLL_REC_TOP, g.n_vocab) if g.want_logprob and g.finish != FIN_CANCELLED else 0
        for i in range(rec.n_top):
            rec.top_ids[i] = g.top_ids[i]
            rec.top_logprobs[i] = g.top_logprobs[i]
        if mll_ring_set_text(rec, g.pipe.out, <unsigned int> g.pipe.out_len) < 0:
            g.err = ERR_NOMEM
            return -1
        mll_ring_commit(r)
        if g.finish != FIN_NONE:
            return 0


cdef llama_sampler * make_sampler(tuple cfg, int32_t n_vocab, int32_t n_ctx, const int[:] prompt) except? NULL:
    """The sampler chain for ``cfg`` (see ContextHandle.begin), or NULL for plain greedy."""
    (temperature, top_k, top_p, min_p, typical_p, repeat_penalty, repeat_last_n,
     frequency_penalty, presence_penalty, seed, logit_bias) = cfg
    cdef bint penalties = (repeat_penalty != 1.0 or frequency_penalty != 0.0
                           or presence_penalty != 0.0) and repeat_last_n != 0
    cdef llama_sampler * chain
    cdef llama_logit_bias * biases
    cdef Py_ssize_t i, n_bias = len(logit_bias)
    cdef int32_t last_n
    if temperature <= 0.0 and not penalties and n_bias == 0:
        return NULL     # plain greedy: argmax over the logits, no candidate array
    chain = llama_sampler_chain_init(llama_sampler_chain_default_params())
    if chain == NULL:
        raise MemoryError()
    if n_bias:
        biases = <llama_logit_bias *> malloc(n_bias * sizeof(llama_logit_bias))
        if biases == NULL:
            llama_sampler_free(chain)
            raise MemoryError()
        for i, (tok, bias) in enumerate(logit_bias):
            biases[i].token = tok
            biases[i].bias = bias
        llama_sampler_chain_add(chain, llama_sampler_init_logit_bias(n_vocab, n_bias, biases))
        free(biases)
    if penalties:
        last_n = repeat_last_n if repeat_last_n > 0 else n_ctx
        llama_sampler_chain_add(chain, llama_sampler_init_penalties(
            n_vocab, last_n, repeat_penalty, frequency_penalty, presence_penalty))
        # the prompt counts as history for the penalties, as in llama.cpp's own tools
        for i in range(max(0, prompt.shape[0] - last_n), prompt.shape[0]):
            llama_sampler_accept(chain, prompt[i])
    if temperature <= 0.0:
        llama_sampler_chain_add(chain, llama_sampler_init_greedy())
        return chain
    if top_k > 0:
        llama_sampler_chain_add(chain, llama_sampler_init_top_k(top_k))
    if typical_p < 1.0:
        llama_sampler_chain_add(chain, llama_sampler_init_typical(typical_p, 1))
    if top_p < 1.0:
        llama_sampler_chain_add(chain, llama_sampler_init_top_p(top_p, 1))
    if min_p > 0.0:
        llama_sampler_chain_add(chain, llama_sampler_init_min_p(min_p, 1))
    llama_sampler_chain_add(chain, llama_sampler_init_temp(temperature))
    llama_sampler_chain_add(chain, llama_sampler_init_dist(<uint32_t> seed))
    return chain


cdef class ContextHandle:
    """Owns a ``llama_context``, its batch, the sampler chain and the text pipeline.

    Not thread-safe on its own: the Python ``Context`` serialises calls with a lock.
    """

    cdef GenState g
    cdef ggml_threadpool * _pool
    cdef ggml_threadpool * _pool_batch
    cdef readonly ModelHandle model
    cdef readonly int32_t n_ctx
    cdef readonly int32_t n_ctx_internal
    cdef readonly int32_t n_batch
    cdef readonly int n_threads
    cdef readonly int n_threads_batch
    # the current generation's stop strings (kept alive for the C matcher)
    cdef StopSet _stops
    cdef bint _active

    def __cinit__(self, ModelHandle model not None, int n_ctx, int n_batch, int n_threads,
                  int n_threads_batch, int flash_attn, bint swa_full):
        cdef llama_context_params params
        model.check_open()
        self.model = model
        self.g.ctx = NULL
        params = llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = 1
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        params.flash_attn_type = <llama_flash_attn_type> flash_attn
        params.swa_full = swa_full
        params.no_perf = True
        params.abort_callback = _abort_cb
        params.abort_callback_data = &self.g
        from mullama._engine._model import take_log
        take_log()
        with nogil:
            self.g.ctx = llama_init_from_model(model.model, params)
        if self.g.ctx == NULL:
            raise errors.context_create_error(take_log().strip().replace("\n", "; ")[-300:])
        if attach_pools(self.g.ctx, n_threads, n_threads_batch, &self._pool, &self._pool_batch) < 0:
            raise errors.context_create_error("ggml could not create its thread pool")
        self.n_ctx = n_ctx
        self.n_ctx_internal = llama_n_ctx(self.g.ctx)
        self.n_batch = llama_n_batch(self.g.ctx)
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        self.g.vocab = model.vocab
        self.g.n_vocab = model.n_vocab
        self.g.n_batch = self.n_batch
        self.g.n_ctx_limit = n_ctx
        self.g.batch = llama_batch_init(self.n_batch, 0, 1)
        self.g.tokens = <llama_token *> malloc((n_ctx + 1) * sizeof(llama_token))
        if self.g.tokens == NULL or self.g.batch.token == NULL or pipe_reserve(&self.g.pipe, 256) < 0:
            raise MemoryError()
        self.g.n_past = 0
        self._stops = None

    def __dealloc__(self):
        self._free_all()

    cdef void _free_all(self) noexcept:
        self._free_generation()
        if self.g.ctx != NULL:
            llama_free(self.g.ctx)
            self.g.ctx = NULL
        free_pools(&self._pool, &self._pool_batch)
        if self.g.batch.token != NULL:
            llama_batch_free(self.g.batch)
            self.g.batch.token = NULL
        free(self.g.tokens)
        self.g.tokens = NULL
        pipe_free(&self.g.pipe)

    cdef void _free_generation(self) noexcept:
        if self.g.smpl != NULL:
            llama_sampler_free(self.g.smpl)
            self.g.smpl = NULL
        free(self.g.prompt)
        self.g.prompt = NULL
        self._stops = None
        self._active = False

    def close(self):
        self._free_all()

    @property
    def closed(self) -> bool:
        return self.g.ctx == NULL

    cdef int _check_open(self) except -1:
        if self.g.ctx == NULL:
            raise errors.ClosedError("the context is closed")
        if self.model.closed:
            raise errors.ClosedError("the model of this context is closed")
        return 0

    # ----------------------------------------------------------- cache

    @property
    def n_past(self) -> int:
        return self.g.n_past

    @property
    def n_decode_calls(self) -> int:
        return self.g.n_decode_calls

    def cached_tokens(self) -> list:
        return [self.g.tokens[i] for i in range(self.g.n_past)]

    def clear(self):
        self._check_open()
        self._drop_cache()

    cdef void _drop_cache(self) noexcept:
        """Free every KV cell of the context (nothing will be reused)."""
        if self.g.ctx != NULL:
            llama_memory_clear(llama_get_memory(self.g.ctx), True)
        self.g.n_past = 0

    def memory_pos_max(self) -> int:
        """Largest position llama.cpp holds for sequence 0 (-1 when empty)."""
        self._check_open()
        return llama_memory_seq_pos_max(llama_get_memory(self.g.ctx), 0)

    cdef int32_t _reuse_prefix(self, int32_t n_prompt, bint reuse):
        """Keep the longest cached prefix of the new prompt (if ``reuse``); drop the rest."""
        cdef int32_t p = 0
        cdef int32_t limit = min(self.g.n_past, n_prompt)
        while reuse and p < limit and self.g.tokens[p] == self.g.prompt[p]:
            p += 1
        if p == n_prompt:
            p -= 1          # the last prompt token must be decoded again for its logits
        if p < self.g.n_past:
            if not llama_memory_seq_rm(llama_get_memory(self.g.ctx), 0, p, -1):
                llama_memory_clear(llama_get_memory(self.g.ctx), True)
                p = 0
        self.g.n_past = p
        return p

    # ----------------------------------------------------------- generation

    def begin(self, const int[:] prompt not None, int max_tokens, tuple sampler, list stops,
              bint want_logprob, int n_top, bint reuse_prefix):
        """Set up a generation; returns the number of prompt tokens reused from the cache.

        ``sampler`` is (temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
        repeat_last_n, frequency_penalty, presence_penalty, seed, logit_bias items).
        """
        cdef int32_t n = prompt.shape[0]
        cdef Py_ssize_t i
        self._check_open()
        self._free_generation()
        if n <= 0:
            raise ValueError("the prompt is empty")
        if n >= self.n_ctx:
            raise errors.ContextOverflowError(
                f"the prompt has {n} tokens but the context holds {self.n_ctx} "
                f"(prompt and generated tokens together); shorten the prompt or raise n_ctx",
                n_prompt=n, n_ctx=self.n_ctx)
        for i in range(n):
            if prompt[i] < 0 or prompt[i] >= self.g.n_vocab:
                raise IndexError(
                    f"prompt token id {prompt[i]} at position {i} is outside the vocabulary "
                    f"[0, {self.g.n_vocab})")
        self.g.prompt = <llama_token *> malloc(n * sizeof(llama_token))
        if self.g.prompt == NULL:
            raise MemoryError()
        memcpy(self.g.prompt, &prompt[0], n * sizeof(llama_token))
        self.g.n_prompt = n
        self._setup_stops(stops)
        self.g.smpl = make_sampler(sampler, self.g.n_vocab, self.n_ctx, prompt)
        pipe_start(&self.g.pipe)
        if pipe_reserve(&self.g.pipe, self.g.pipe.piece_cap) < 0:
            raise MemoryError()
        self.g.max_tokens = max_tokens
        self.g.n_generated = 0
        self.g.pending_decode = False
        self.g.finish = FIN_NONE
        self.g.err = ERR_NONE
        self.g.err_code = 0
        self.g.cancel = 0
        self.g.want_logprob = want_logprob
        self.g.n_top = min(max(n_top, 0), MAX_TOP)
        self.g.prefill_pos = self._reuse_prefix(n, reuse_prefix)
        self._active = True
        return self.g.prefill_pos

    cdef void _setup_stops(self, list stops) except *:
        self._stops = StopSet(stops)
        self._stops.bind(&self.g.pipe.stop)

    def prefill(self) -> bool:
        """Decode one chunk of the prompt (GIL released). True when the prompt is done."""
        cdef int rc
        self._check_active()
        if self.g.prefill_pos >= self.g.n_prompt:
            return True
        with nogil:
            rc = _prefill_chunk(&self.g)
        if rc < 0:
            self._fail()
        return rc == 1

    def step(self):
        """Generate one token (GIL released while it runs).

        Returns (token_id, text_bytes, finish_code, logprob, top) where finish_code
        is 0 while the generation goes on.
        """
        cdef int rc
        self._check_active()
        if self.g.prefill_pos < self.g.n_prompt:
            raise RuntimeError("prefill() must finish before step()")
        with nogil:
            rc = _step(&self.g)
        if rc < 0:
            self._fail()
        text = PyBytes_FromStringAndSize(self.g.pipe.out, self.g.pipe.out_len)
        top = None
        if self.g.want_logprob and self.g.n_top > 0:
            top = tuple([(self.g.top_ids[i], self.g.top_logprobs[i]) for i in range(self.g.n_top)])
        token = self.g.token
        if self.g.finish == FIN_CANCELLED:
            token = -1
        if self.g.finish != FIN_NONE:
            self._active = False
        return (token, text, self.g.finish,
                self.g.logprob if self.g.want_logprob else None, top)

    def produce(self, TokenRing ring not None, bint keep_cache=False):
        """Run the current generation to its end on this thread, without the GIL,
        handing each token to ``ring``. Returns (error_kind, decode_status); (0, 0)
        when it ended normally or was cancelled. The ring is closed in every case."""
        cdef int rc = 0
        cdef int err = ERR_NONE
        cdef int32_t code = 0
        try:
            self._check_active()
            with nogil:
                rc = _produce(&self.g, &ring.r)
            if rc < 0:
                err, code = self.g.err, self.g.err_code
                if err == ERR_DECODE and code == 2 and self.g.cancel:
                    err, code = ERR_NONE, 0      # aborted because we were cancelled
                    self.g.finish = FIN_CANCELLED
                llama_memory_seq_rm(llama_get_memory(self.g.ctx), 0, self.g.n_past, -1)
            self._active = False
            if not keep_cache:
                self._drop_cache()
            return (err, code)
        finally:
            mll_ring_close(&ring.r, 1 if err != ERR_NONE else 0)

    @staticmethod
    def error_for(int err, int code):
        """The exception for a (error_kind, decode_status) pair from ``produce``."""
        if err == ERR_DECODE:
            try:
                errors.raise_for_decode(code)
            except errors.GenerationError as exc:
                return exc
        if err == ERR_NO_LOGITS:
            return errors.GenerationError("llama.cpp returned no logits for the last token")
        return MemoryError()

    @property
    def finish_code(self) -> int:
        return self.g.finish

    def finish_early(self) -> bytes:
        """Stop the current generation now (the consumer went away)."""
        if not self._active:
            return b""
        self._active = False
        self.g.finish = FIN_CANCELLED
        self.g.pipe.out_len = 0
        if self.g.pipe.out != NULL:
            pipe_flush(&self.g.pipe)
            return PyBytes_FromStringAndSize(self.g.pipe.out, self.g.pipe.out_len)
        return b""

    def request_cancel(self):
        """Ask a running decode to stop; safe from any thread."""
        self.g.cancel = 1

    @property
    def active(self) -> bool:
        return self._active

    @property
    def n_generated(self) -> int:
        return self.g.n_generated

    @property
    def stop_index(self):
        return self.g.pipe.stop.matched_index if self.g.pipe.stop.matched else None

    cdef int _check_active(self) except -1:
        self._check_open()
        if not self._active:
            raise RuntimeError("no generation is active on this context")
        return 0

    cdef int _fail(self) except -1:
        cdef int err = self.g.err
        cdef int32_t code = self.g.err_code
        self._active = False
        # positions a failed or aborted decode left behind are dropped, so the
        # cache holds exactly tokens[0:n_past]
        llama_memory_seq_rm(llama_get_memory(self.g.ctx), 0, self.g.n_past, -1)
        if err == ERR_DECODE:
            if code == 2 and self.g.cancel:
                raise errors.GenerationError("generation was cancelled", code=2)
            errors.raise_for_decode(code)
        if err == ERR_NO_LOGITS:
            raise errors.GenerationError("llama.cpp returned no logits for the last token")
        raise MemoryError()

    # ----------------------------------------------------------- research

    def eval_logits(self, const int[:] prompt not None, bint reuse_prefix):
        """Logits (float32, n_vocab) for the token after ``prompt``; uses the prefix cache."""
        cdef int32_t n = prompt.shape[0]
        cdef float * logits
        self.begin(prompt, 1, (0.0, 0, 1.0, 0.0, 1.0, 1.0, 0, 0.0, 0.0, 0, ()), [], False, 0,
                   reuse_prefix)
        while not self.prefill():
            pass
        logits = llama_get_logits_ith(self.g.ctx, -1)
        self._active = False
        if logits == NULL:
            raise errors.GenerationError("llama.cpp returned no logits for the last token")
        out = np.empty(self.g.n_vocab, dtype=np.float32)
        cdef float[:] view = out
        memcpy(&view[0], logits, self.g.n_vocab * sizeof(float))
        return out
