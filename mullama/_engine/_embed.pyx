# cython: language_level=3
"""Embeddings on a llama_context made for them.

The context is created with embeddings on, the pooling chosen at creation
(causal LMs such as Gemma 3 carry no pooling key, so it must be set), one
unified KV stream for all sequences and a micro-batch as large as the
context. Both matter: llama.cpp pools per micro-batch, so a text longer than
``n_ubatch`` would be pooled in pieces, and with a stream per sequence texts
of different lengths in one decode pool wrongly. Many texts share a decode;
the cache is cleared between decodes (nothing is reused). With "rank" pooling a
model's classifier head runs on the pooled vector and each text gives its
``n_cls_out`` scores instead of an embedding.
"""

from libc.stdint cimport int32_t
from libc.string cimport memcpy

from mullama._engine._llama cimport *
from mullama._engine._model cimport ModelHandle
from mullama._engine._guard cimport mll_init_from_model, mll_decode, mll_guard_error, MLL_CXX_ERROR
from mullama import errors

POOLING = {"none": LLAMA_POOLING_TYPE_NONE, "mean": LLAMA_POOLING_TYPE_MEAN, "cls": LLAMA_POOLING_TYPE_CLS,
           "last": LLAMA_POOLING_TYPE_LAST, "rank": LLAMA_POOLING_TYPE_RANK}


cdef class Embedder:
    """One embedding context: ``n_ctx`` tokens per decode, at most ``n_seq`` texts in it.
    ``n_embd`` is the width of a pooled row: the embedding size, or the classifier's
    ``n_cls_out`` with "rank" pooling."""

    cdef llama_context * ctx
    cdef llama_batch batch
    cdef readonly ModelHandle model
    cdef readonly int n_ctx
    cdef readonly int n_seq
    cdef readonly int n_embd
    cdef readonly int pooling
    cdef object __weakref__

    def __cinit__(self, ModelHandle model not None, str pooling, int n_ctx, int n_seq, int n_threads):
        cdef llama_context_params params
        model.check_open()
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {', '.join(POOLING)}, got {pooling!r}")
        self.model = model
        self.pooling = POOLING[pooling]
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        params = llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = n_ctx
        params.n_seq_max = n_seq
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.embeddings = True
        params.pooling_type = <llama_pooling_type> self.pooling
        params.kv_unified = True
        params.no_perf = True
        from mullama._engine._model import take_log
        take_log()
        with nogil:
            self.ctx = mll_init_from_model(model.model, params)
        if self.ctx == NULL:
            detail = mll_guard_error().decode("utf-8", "replace") or take_log().strip().replace("\n", "; ")[-300:]
            raise errors.context_create_error(detail)
        if self.pooling == LLAMA_POOLING_TYPE_RANK:
            self.n_embd = llama_model_n_cls_out(model.model)
        else:
            self.n_embd = llama_model_n_embd_out(model.model)
        self.batch = llama_batch_init(n_ctx, 0, 1)
        if self.batch.token == NULL:
            raise MemoryError()

    def __dealloc__(self):
        self.close()

    def close(self):
        if self.ctx != NULL:
            llama_free(self.ctx)
            self.ctx = NULL
        if self.batch.token != NULL:
            llama_batch_free(self.batch)
            self.batch.token = NULL

    @property
    def closed(self) -> bool:
        return self.ctx == NULL

    def embed(self, list texts, float[:, ::1] out=None):
        """Embed each int32 id array of ``texts`` (each at most ``n_ctx`` ids, none empty).
        Pooled: rows of ``out`` (len(texts), n_embd). Pooling "none": a list of
        (n_tokens, n_embd) arrays, one per text. Blocks; the GIL is released while
        llama.cpp decodes."""
        import numpy as np
        cdef int i = 0, first, k, j, n = len(texts)
        cdef int32_t n_tok, rc, pos
        cdef const int[::1] ids
        cdef const float * row
        cdef list tokens_out = []
        cdef float[:, ::1] per
        if self.ctx == NULL or self.model.closed:
            raise errors.ClosedError("the embedding context is closed")
        if self.pooling != LLAMA_POOLING_TYPE_NONE and (out is None or out.shape[0] != n or out.shape[1] != self.n_embd):
            raise ValueError("out must be a float32 array of shape (len(texts), n_embd)")
        for text in texts:
            if not 0 < len(text) <= self.n_ctx:
                raise ValueError(f"each text must have 1 to {self.n_ctx} tokens, got {len(text)}")
        while i < n:
            first = i
            n_tok = 0
            while i < n and i - first < self.n_seq and n_tok + len(texts[i]) <= self.n_ctx:
                ids = texts[i]
                for j in range(ids.shape[0]):
                    self.batch.token[n_tok] = ids[j]
                    self.batch.pos[n_tok] = j
                    self.batch.n_seq_id[n_tok] = 1
                    self.batch.seq_id[n_tok][0] = i - first
                    self.batch.logits[n_tok] = 1
                    n_tok += 1
                i += 1
            self.batch.n_tokens = n_tok
            with nogil:
                llama_memory_clear(llama_get_memory(self.ctx), True)
                rc = mll_decode(self.ctx, self.batch)
            if rc == MLL_CXX_ERROR:
                raise errors.cxx_exception("embedding", mll_guard_error().decode("utf-8", "replace"),
                                           errors.GenerationError)
            if rc != 0:
                errors.raise_for_decode(rc, "embedding decode")
            pos = 0
            for k in range(first, i):
                if self.pooling == LLAMA_POOLING_TYPE_NONE:
                    arr = np.empty((len(texts[k]), self.n_embd), dtype=np.float32)
                    per = arr
                    for j in range(len(texts[k])):
                        row = llama_get_embeddings_ith(self.ctx, pos + j)
                        if row == NULL:
                            raise errors.GenerationError("llama.cpp returned no embedding for a token")
                        memcpy(&per[j, 0], row, self.n_embd * sizeof(float))
                    tokens_out.append(arr)
                else:
                    row = llama_get_embeddings_seq(self.ctx, k - first)
                    if row == NULL:
                        raise errors.GenerationError("llama.cpp returned no pooled embedding")
                    memcpy(&out[k, 0], row, self.n_embd * sizeof(float))
                pos += len(texts[k])
        return tokens_out if self.pooling == LLAMA_POOLING_TYPE_NONE else None
