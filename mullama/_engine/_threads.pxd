# A persistent ggml threadpool per context: without one, ggml sets up a fresh
# pool for every graph it computes, which costs a little on every token.

from mullama._engine._llama cimport (ggml_threadpool, ggml_threadpool_params, ggml_threadpool_params_default,
                             ggml_threadpool_new, ggml_threadpool_free, llama_context,
                             llama_attach_threadpool)


cdef inline int attach_pools(llama_context * ctx, int n_threads, int n_threads_batch,
                             ggml_threadpool ** pool, ggml_threadpool ** pool_batch) noexcept nogil:
    """Create and attach the pools; 0 on success, -1 when ggml could not create them."""
    cdef ggml_threadpool_params params = ggml_threadpool_params_default(n_threads)
    pool[0] = ggml_threadpool_new(&params)
    if pool[0] == NULL:
        return -1
    if n_threads_batch == n_threads:
        pool_batch[0] = NULL
    else:
        params = ggml_threadpool_params_default(n_threads_batch)
        pool_batch[0] = ggml_threadpool_new(&params)
        if pool_batch[0] == NULL:
            ggml_threadpool_free(pool[0])
            pool[0] = NULL
            return -1
    llama_attach_threadpool(ctx, pool[0], pool_batch[0] if pool_batch[0] != NULL else pool[0])
    return 0


cdef inline void free_pools(ggml_threadpool ** pool, ggml_threadpool ** pool_batch) noexcept nogil:
    """Free the pools (after llama_free of the context that used them)."""
    if pool_batch[0] != NULL:
        ggml_threadpool_free(pool_batch[0])
        pool_batch[0] = NULL
    if pool[0] != NULL:
        ggml_threadpool_free(pool[0])
        pool[0] = NULL
