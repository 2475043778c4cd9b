# The engine's C state, shared by the step functions (_core.pyx) and the Python-facing
# classes (_engine.pyx). Everything here is plain C data; the step runs without the GIL.

from libc.stdint cimport int32_t, int64_t, uint64_t

from mullama._engine._llama cimport (llama_context, llama_vocab, llama_batch, llama_sampler, llama_token,
                                    llama_token_data, c_bool)
from mullama._engine._mll cimport mll_bell, mll_ring, mll_rows, mll_row_job, mll_costs
from mullama._engine._pipe cimport TextPipe


cdef struct Req:
    Req * next                    # FIFO link while queued
    llama_sampler * smpl          # NULL: greedy argmax
    llama_sampler * grammar       # NULL: unconstrained; else checks each chosen token (mll_sample_constrained)
    llama_token_data * cand       # n_vocab candidates for the grammar's full pass (with a grammar only)
    int32_t grammar_fast_k        # see mll_sample_constrained (0: a rejected choice means a full pass)
    int32_t n_grammar_rejected    # tokens whose first choice the grammar rejected
    int32_t n_grammar_full        # of those, the ones that needed a pass over the whole vocabulary
    llama_token * prompt
    int32_t n_prompt
    int32_t prefill_pos           # prompt tokens whose keys/values are in the cache
    int32_t n_past                # all tokens in the cache (prompt, then generated)
    int32_t n_reused              # prompt tokens found in the slot's cache at admission
    int32_t max_tokens
    int32_t n_generated
    int32_t n_ctx_limit           # prompt + generated tokens allowed
    llama_token last
    bint pending_decode
    bint want_logprob
    int32_t n_top                 # alternatives to report with each token (<= MLL_REC_TOP)
    bint reuse                    # start from the longest cached prefix of an idle slot
    bint keep                     # leave the KV cells in the slot when it ends (for reuse)
    float * logits_out            # if set: a copy of the first sampled logits row
    bint parked
    int32_t out_idx               # row of its logits in the current batch, -1 if none
    int32_t n_in_batch            # tokens it has in the current batch
    int finish
    int err
    int32_t err_code
    char err_text[256]            # llama.cpp's exception text when err is ERR_CXX
    int cancel
    int done                      # the engine is finished with it (read by Python)
    int seq
    TextPipe pipe
    mll_ring * ring
    # n > 1: branches that start from this request's prompt when it is done (linked by next)
    Req * kids
    int n_kids
    bint waiting                  # a branch waiting for its parent's prompt
    # a snapshot to start from, restored into the slot at admission (owned by Python)
    const unsigned char * state_data
    size_t state_len
    int32_t state_n_kv            # the first state_n_kv prompt tokens are the snapshot's cells
    # a driver's command, run on the engine's thread between two steps
    int cmd
    int cmd_status                # 0 while pending, 1 done, < 0 failed (CMD_* codes)
    Req * cmd_req                 # CMD_FORK: the new branch
    unsigned char * snap_data     # CMD_SNAPSHOT: the sequence's cells (malloc'ed; the caller frees)
    size_t snap_len
    llama_token * snap_tokens     # the tokens: the cached ones, then the pending one if any
    int32_t snap_n_kv
    int32_t snap_n_tokens
    # scoring: rows of prompt positions >= score_from are reduced as they come (arrays owned by Python)
    bint score
    int32_t score_from            # the first position whose row is wanted (it scores the next token)
    int32_t score_top             # alternatives to keep per scored token
    double * sc_logprob           # [n_prompt]: entry p+1 is log P(prompt[p+1] | prompt[..p]) from row p
    int32_t * sc_argmax           # [n_prompt]: entry p+1 is row p's most likely token
    int32_t * sc_top_ids          # [n_prompt * score_top], laid out like sc_logprob
    float * sc_top_vals
    int32_t sc_idx                # this step: batch index of the first scored row
    int32_t sc_pos                # and its position
    int32_t sc_n                  # scored rows this step
    int32_t sc_job                # this step: the row job of the first scored row
    # this step's sampled rows: row jobs job0 .. job0 + n_rows - 1 (batch rows out_idx ..)
    int32_t job0
    int32_t n_rows
    # speculation: drafts from the sequence's own earlier n-grams (draft_max 0: off)
    int32_t draft_max
    int32_t ngram
    int32_t draft_min             # verify at least this many drafted tokens when there is a draft
    llama_token * draft           # [MLL_DRAFT_MAX]: the tokens after `last` put in this step's batch
    int32_t n_draft               # of them in the batch this step
    int32_t n_real                # of those, found by the lookup (the rest: filler, see _plan_drafts)
    llama_token shadow            # a draft's first token that was not verified (-1: none): checked
                                  # against the token chosen, so acceptance is known without drafting
    double accept                 # estimated chance that a drafted token is accepted (moving average)
    int64_t n_drafted             # drafted tokens verified, and the accepted ones
    int64_t n_accepted


cdef enum:
    CMD_NONE = 0
    CMD_SNAPSHOT = 1
    CMD_FORK = 2
    CMD_ENDED = -1                # the request ended before the command ran
    CMD_NO_SLOT = -2              # a fork found no free slot
    CMD_NOMEM = -3
    CMD_FAILED = -4               # llama.cpp refused (mll_guard_error or its log says why)
    ERR_STATE = 5                 # a request's snapshot could not be restored
    ERR_GRAMMAR = 6               # the grammar allowed no token at all


cdef struct EngineState:
    llama_context * ctx
    const llama_vocab * vocab
    int32_t n_vocab
    int32_t n_swa                 # sliding-window size (0: none, or the window cache is full-size)
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
    int clear_wanted              # a driver asks the engine thread to free the idle slots' cells
    int64_t n_decode_calls
    int64_t n_decoded_tokens
    int64_t n_prefix_hits         # admissions that reused cached tokens
    int64_t n_reused_tokens       # prompt tokens not evaluated thanks to the cache
    int64_t decode_ns             # time inside llama_decode
    int64_t sample_ns             # time sampling and handing tokens out after each decode
    int64_t n_grammar_tokens      # tokens chosen under a grammar
    int64_t n_grammar_rejected    # of those, the ones whose first choice the grammar rejected
    int64_t n_grammar_full        # and of those, the ones that needed a pass over the whole vocabulary
    int32_t * kv_pos              # per slot: llama.cpp's largest cached position, as last seen by
                                  # the engine thread (others read this, never llama.cpp itself)
    int32_t slot_cells            # KV cells of one slot's sequence
    llama_token * hist            # per slot, slot_cells tokens: what its KV cells hold, by position
    int32_t * n_hist              # per slot: how many of those are valid
    uint64_t * used_at            # per slot: when it last ended a request (least recently used)
    uint64_t clock
    int32_t * scratch             # one allocation for the three per-slot arrays below
    int32_t * pad_seq             # sequences given a throw-away token this step (see _build_batch)
    int32_t * pad_pos             # and the position it took, removed again after the decode
    int32_t * job_slot            # the slot of each job
    int n_pad
    mll_rows rows                 # a step's argmax / log-sum-exp / top-k work, on all threads
    mll_row_job * jobs            # one per slot with logits this step, then the scored rows
    int32_t max_rows              # scored rows per decode (llama.cpp keeps a logits row for each)
    int32_t * job_idx             # the batch row of each job
    int32_t n_jobs_cap
    mll_costs costs               # measured decode cost by logits rows (pure decode steps)
    int32_t step_rows             # logits rows of this step's batch
    bint step_timed               # this step decodes only (no prompt, no scored rows): it is measured
    int64_t n_drafted             # all streams: drafted tokens verified, and the accepted ones
    int64_t n_accepted
    int32_t * plan_slot           # per drafting stream: scratch for choosing draft lengths
    int32_t * plan_avail
    int32_t * plan_k
    double * plan_acc
    int32_t step_k                # a pass over several sequences: the draft length every one verifies


cdef int32_t engine_step(EngineState * e) noexcept nogil
cdef void engine_run(EngineState * e, Req * until) noexcept nogil
cdef c_bool engine_abort(void * data) noexcept nogil
cdef void engine_reap(EngineState * e) noexcept nogil
cdef void engine_finish(EngineState * e, int slot, int err) noexcept nogil
cdef void engine_forget(EngineState * e, int seq) noexcept nogil
cdef void engine_publish_kv(EngineState * e) noexcept nogil
cdef void engine_commands(EngineState * e) noexcept nogil
cdef int engine_snapshot(EngineState * e, int slot, Req * r) noexcept nogil
cdef int engine_restore(EngineState * e, int slot, const unsigned char * data, size_t n,
                        const llama_token * tokens, int32_t n_kv) noexcept nogil
