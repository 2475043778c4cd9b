# cython: language_level=3
"""The one engine step: many sequences share one llama_context and one decode.

``engine_step`` admits queued requests into free slots (reusing the longest
cached prefix an idle slot holds), drops cancelled ones, builds a batch from
every running sequence whose consumer has room (one token each) plus chunks of
waiting prompts, decodes once, samples each sequence with its own sampler, runs
each sequence's text pipeline and hands the token to that sequence's ring.
Every driver uses it: the sync ``Context`` steps on the caller's thread,
``AsyncModel`` and the server on an engine thread (``engine_run``).
Nothing here touches a Python object.
"""

from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from mullama._engine._llama cimport *
from mullama._engine._mll cimport *
from mullama._engine._pipe cimport *
from mullama._engine._guard cimport (mll_decode, mll_state_seq_get_size, mll_state_seq_get_data,
                                     mll_state_seq_set_data, MLL_CXX_ERROR, mll_sampler_clone,
                                     mll_sample_constrained, MLL_NO_TOKEN, mll_grammar_allows)


cdef enum:
    MIN_REUSE = 8                 # shortest cached prefix worth taking a slot for


cdef c_bool engine_abort(void * data) noexcept nogil:
    """Abort a decode only when every sequence in the batch is cancelled (or at shutdown)."""
    cdef EngineState * e = <EngineState *> data
    cdef int i
    cdef Req * r
    if e.stop:
        return True
    for i in range(e.n_slots):
        r = e.slots[i]
        if r != NULL and r.n_in_batch > 0 and not (r.cancel or r.ring.cancelled):
            return False
    return True


cdef void engine_forget(EngineState * e, int seq) noexcept nogil:
    """Free a sequence's KV cells and publish what llama.cpp now reports for it."""
    cdef llama_memory_t mem = llama_get_memory(e.ctx)
    llama_memory_seq_rm(mem, seq, -1, -1)
    e.n_hist[seq] = 0
    e.kv_pos[seq] = llama_memory_seq_pos_max(mem, seq)


cdef void engine_publish_kv(EngineState * e) noexcept nogil:
    cdef llama_memory_t mem = llama_get_memory(e.ctx)
    cdef int i
    for i in range(e.n_slots):
        e.kv_pos[i] = llama_memory_seq_pos_max(mem, i)


cdef void _keep_or_forget(EngineState * e, Req * r, int err) noexcept nogil:
    """A request ends: its slot keeps the cells it decoded (``keep``) or frees them."""
    cdef llama_memory_t mem = llama_get_memory(e.ctx)
    if r.keep and err == ERR_NONE and r.n_past > 0:
        # a decode that failed or was aborted may have left cells past n_past
        if llama_memory_seq_rm(mem, r.seq, r.n_past, -1):
            e.n_hist[r.seq] = r.n_past
            e.kv_pos[r.seq] = llama_memory_seq_pos_max(mem, r.seq)
            return
    engine_forget(e, r.seq)


cdef Req * _detach(EngineState * e, int slot, int err) noexcept nogil:
    """The slot's request is over: its cells are kept for reuse or freed, the slot is free."""
    cdef Req * r = e.slots[slot]
    cdef Req * kid
    _keep_or_forget(e, r, err)
    while r.kids != NULL:
        # branches still waiting for this prompt evaluate it themselves
        kid = r.kids
        r.kids = kid.next
        kid.next = NULL
        kid.waiting = False
        kid.prefill_pos = 0
        kid.n_past = 0
    r.n_kids = 0
    _end_command(e, r, CMD_ENDED)
    e.clock += 1
    e.used_at[slot] = e.clock
    e.slots[slot] = NULL
    e.n_active -= 1
    if err != ERR_NONE:
        r.err = err
    return r


cdef void _close(EngineState * e, Req * r, int err) noexcept nogil:
    mll_ring_close(r.ring, 1 if err != ERR_NONE else 0)
    pthread_mutex_lock(&e.bell.mu)
    r.done = 1
    pthread_mutex_unlock(&e.bell.mu)


cdef void engine_finish(EngineState * e, int slot, int err) noexcept nogil:
    """End the slot's request: free the slot (cells kept or freed), close its ring."""
    _close(e, _detach(e, slot, err), err)


cdef int32_t _common_prefix(EngineState * e, int slot, Req * r) noexcept nogil:
    cdef const llama_token * h = e.hist + <size_t> slot * e.slot_cells
    cdef int32_t p = 0
    cdef int32_t limit = min(e.n_hist[slot], r.n_prompt)
    while p < limit and h[p] == r.prompt[p]:
        p += 1
    return p


cdef int _pick_slot(EngineState * e, Req * r, int32_t * prefix) noexcept nogil:
    """The free slot for ``r``: the one whose cache shares the longest prefix with its
    prompt, else the least recently used one (its cache is the one given up). -1: none."""
    cdef int i, best = -1
    cdef int32_t p, best_p = -1
    for i in range(e.n_slots):
        if e.slots[i] != NULL:
            continue
        p = _common_prefix(e, i, r) if r.reuse else 0
        if p < MIN_REUSE and e.n_slots > 1:
            p = 0                   # a BOS and a word in common do not justify evicting a cache
        if p > best_p or (p == best_p and e.used_at[i] < e.used_at[best]):
            best, best_p = i, p
    prefix[0] = best_p
    return best


cdef int32_t _attach(EngineState * e, int slot, Req * r, int32_t p) noexcept nogil:
    """Put ``r`` in ``slot`` keeping the first ``p`` cached tokens (fewer when the
    sliding window no longer covers them). Returns the tokens kept."""
    cdef llama_memory_t mem = llama_get_memory(e.ctx)
    cdef llama_pos lo
    if r.state_data != NULL:
        if engine_restore(e, slot, r.state_data, r.state_len, r.prompt, r.state_n_kv) < 0:
            r.seq = slot
            e.slots[slot] = r
            e.n_active += 1
            engine_finish(e, slot, ERR_STATE)
            return 0
        p = r.state_n_kv
    if p >= r.n_prompt:
        p = r.n_prompt - 1          # the last prompt token is decoded again for its logits
    if r.score and p > r.score_from:
        p = r.score_from            # the scored rows are computed, not taken from the cache
    if p <= 0 or not llama_memory_seq_rm(mem, slot, p, -1):
        p = 0
    elif e.n_swa > 0:
        # the next token attends to the n_swa positions before it: with a window-sized
        # cache those may already have been overwritten by the tokens after them
        lo = llama_memory_seq_pos_min(mem, slot)
        if lo < 0 or lo > max(0, p - e.n_swa):
            p = 0
    if p == 0:
        engine_forget(e, slot)
    else:
        e.n_hist[slot] = p
        e.n_prefix_hits += 1
        e.n_reused_tokens += p
    r.seq = slot
    r.n_past = p
    r.prefill_pos = p
    r.n_reused = p
    e.slots[slot] = r
    e.n_active += 1
    return p


cdef void _admit(EngineState * e) noexcept nogil:
    """Move queued requests into free slots, first come first served."""
    cdef Req * r
    cdef int slot
    cdef int32_t p
    cdef Req * kid
    while e.n_active < e.n_slots:
        pthread_mutex_lock(&e.bell.mu)
        r = e.q_head
        if r != NULL and not (r.cancel or r.ring.cancelled) and e.n_slots - e.n_active < 1 + r.n_kids:
            pthread_mutex_unlock(&e.bell.mu)
            return                  # n > 1 waits until all its branches have a slot
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
        slot = _pick_slot(e, r, &p)
        _attach(e, slot, r, p)
        kid = r.kids
        while kid != NULL:
            slot = _pick_slot(e, kid, &p)
            _attach(e, slot, kid, 0)
            kid.waiting = r.done == 0
            kid.prefill_pos = kid.n_prompt if kid.waiting else 0
            kid = kid.next


cdef void engine_reap(EngineState * e) noexcept nogil:
    """End every running request whose consumer cancelled it."""
    cdef int i
    cdef Req * r
    for i in range(e.n_slots):
        r = e.slots[i]
        if r != NULL and (r.cancel or r.ring.cancelled):
            r.finish = FIN_CANCELLED
            engine_finish(e, i, ERR_NONE)


cdef inline void _put(EngineState * e, int32_t n, llama_token tok, int32_t pos, int seq, bint out) noexcept nogil:
    e.batch.token[n] = tok
    e.batch.pos[n] = pos
    e.batch.n_seq_id[n] = 1
    e.batch.seq_id[n][0] = seq
    e.batch.logits[n] = out


cdef inline void _put_kept(EngineState * e, int32_t n, llama_token tok, int32_t pos, int seq, bint out) noexcept nogil:
    """Like _put, for a token that stays in the cache: recorded in the slot's history."""
    _put(e, n, tok, pos, seq, out)
    e.hist[<size_t> seq * e.slot_cells + pos] = tok


cdef inline bint _can_pad(EngineState * e, int i) noexcept nogil:
    """Whether slot ``i`` can take this step's throw-away tokens (``1 + e.step_k``): free
    or idle, with room."""
    cdef Req * r = e.slots[i]
    if r == NULL:
        return e.n_hist[i] + e.step_k < e.slot_cells
    return r.n_in_batch == 0 and r.n_past + e.step_k < e.slot_cells


cdef int32_t _build_batch(EngineState * e) noexcept nogil:
    """Fill the step's batch: one token for each running sequence with room, then prompt chunks.

    Each slot is its own KV stream (not unified), and llama.cpp then splits a batch into
    micro-batches of equal token counts over runs of consecutive sequence ids: a hole in
    the run (a parked stream, a free slot between busy ones) would cost a second pass over
    the weights. Holes are filled with one throw-away token each (its cell is removed after
    the decode), which costs far less, and tokens go in in slot order."""
    cdef int32_t n = 0
    cdef int32_t budget, chunk, j, k, pos
    cdef int32_t rows = e.max_rows
    cdef int i, idx, lo = -1, hi = -1, odd_fix = -1
    cdef int n_decoding = 0, n_prefill = 0, n_drafted = 0
    cdef Req * r
    for i in range(e.n_slots):
        r = e.slots[i]
        if r == NULL:
            continue
        r.out_idx = -1
        r.n_in_batch = 0
        r.sc_n = 0
        r.n_rows = 0
        r.n_draft = 0
        r.n_real = 0
        r.shadow = -1
        if not r.pending_decode or r.waiting:
            continue
        if mll_ring_space(r.ring) == 0:
            if not r.parked:
                mll_ring_note_full(r.ring)
                r.parked = True
            continue
        r.parked = False
        r.n_in_batch = 1
        n_decoding += 1
    n_drafted = _plan_drafts(e, n_decoding)
    n_decoding += n_drafted
    budget = e.n_batch - n_decoding
    if n_decoding and budget > e.prefill_chunk:
        budget = e.prefill_chunk    # a long prompt must not stall the running streams
    for k in range(e.n_slots):
        if budget <= 0:
            break
        idx = (e.rr + k) % e.n_slots
        r = e.slots[idx]
        if r == NULL or r.prefill_pos >= r.n_prompt or r.waiting:
            continue
        chunk = r.n_prompt - r.prefill_pos
        if chunk > budget:
            chunk = budget
        if r.score:
            chunk = _score_chunk(r, chunk, &rows)
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
    # (Drafts are priced with that in mind, and a pad there would split the pass.)
    if n_prefill == 0 and n_drafted == 0 and n_decoding >= 3 and n_decoding % 2 == 1:
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
            if _can_pad(e, i) and n + e.step_k < e.n_batch:
                # after the cached tokens, so that removing them leaves those intact; as many
                # as each stream of the pass decodes, which keeps it one micro-batch
                pos = r.n_past if r != NULL else e.n_hist[i]
                for j in range(1 + e.step_k):
                    _put(e, n + j, r.last if r != NULL else 0, pos + j, i, j == 0 and i == odd_fix)
                e.pad_seq[e.n_pad] = i
                e.pad_pos[e.n_pad] = pos
                e.n_pad += 1
                n += 1 + e.step_k
        elif r.prefill_pos < r.n_prompt:
            for j in range(r.n_in_batch):
                _put_kept(e, n + j, r.prompt[r.prefill_pos + j], r.prefill_pos + j, i, False)
            if r.prefill_pos + r.n_in_batch == r.n_prompt and not (r.score and r.max_tokens == 0):
                e.batch.logits[n + r.n_in_batch - 1] = 1
                r.out_idx = n + r.n_in_batch - 1
            if r.score:
                _mark_scored(e, r, n)
            n += r.n_in_batch
        else:
            # the stream's token, then its draft: every one of them gets a logits row
            _put_kept(e, n, r.last, r.n_past, i, True)
            r.out_idx = n
            for j in range(r.n_draft):
                _put_kept(e, n + 1 + j, r.draft[j], r.n_past + 1 + j, i, True)
            n += 1 + r.n_draft
    e.batch.n_tokens = n
    e.step_rows = 0
    for j in range(n):
        e.step_rows += e.batch.logits[j] != 0
    e.step_timed = n_prefill == 0
    return n


cdef int32_t _draft_room(EngineState * e, Req * r) noexcept nogil:
    """How many drafted tokens ``r`` can verify this step: each accepted one takes a ring
    record, a token of max_tokens and of the context, and a KV cell."""
    cdef int32_t m = r.draft_max
    m = min(m, <int32_t> mll_ring_space(r.ring) - 1)
    m = min(m, r.max_tokens - r.n_generated - 1)
    m = min(m, r.n_ctx_limit - r.n_prompt - r.n_generated - 1)
    m = min(m, e.slot_cells - r.n_past - 1)
    return m


cdef int32_t _plan_drafts(EngineState * e, int n_decoding) noexcept nogil:
    """Find each decoding stream's draft (the tokens that followed the latest earlier
    occurrence of its last ``ngram`` tokens) and choose how many of them to verify, from
    the measured pass costs and each stream's acceptance. Returns the drafted tokens added.

    A pass over several sequences is split by llama.cpp into micro-batches with the same
    token count per sequence, so there every decoding stream verifies the same count
    (``e.step_k``): a stream whose own draft is shorter verifies filler after it (a new
    lookup of the drafted sequence, see mll_ngram_fill), which may still be accepted."""
    cdef int i, n = 0
    cdef int32_t m, k, rows, total = 0, room = MLL_DRAFT_MAX, floor = 0
    cdef bint common = n_decoding > 1
    cdef Req * r
    cdef llama_token * h
    e.step_k = 0
    if e.n_swa > 0:
        return 0                    # a window-sized cache may have dropped cells a rejection needs
    for i in range(e.n_slots):
        r = e.slots[i]
        if r != NULL and r.prefill_pos < r.n_prompt and not r.waiting:
            return 0                # a prompt goes in too: the pass is split by sequence anyway
    for i in range(e.n_slots):
        r = e.slots[i]
        if r == NULL or r.n_in_batch != 1:
            continue
        m = _draft_room(e, r) if r.draft_max > 0 else 0
        if common:
            room = min(room, m)
            if room <= 0:
                return 0            # a stream without speculation (or room) holds the count at 0
        if m <= 0:
            continue
        h = e.hist + <size_t> i * e.slot_cells
        h[r.n_past] = r.last        # the sequence so far ends with the token about to be decoded
        k = mll_ngram_draft(h, r.n_past + 1, r.ngram, m, r.draft)
        if k > 0 and r.grammar != NULL and mll_grammar_allows(r.grammar, r.draft[0]) != 1:
            k = 0                   # the grammar would reject it: no draft
        if k <= 0 and not common:
            continue
        e.plan_slot[n] = i
        e.plan_avail[n] = k
        e.plan_acc[n] = r.accept
        n += 1
    if n == 0:
        return 0
    if common:
        k = mll_draft_plan_common(&e.costs, n, e.plan_avail, e.plan_acc, room, 1.03)
        for i in range(n):
            floor = max(floor, min(e.slots[e.plan_slot[i]].draft_min, e.plan_avail[i]))
        k = min(max(k, floor), room, (e.n_batch - n) // n)
        e.step_k = k
        for i in range(n):
            e.plan_k[i] = k
    else:
        rows = mll_draft_plan(&e.costs, n, e.plan_avail, e.plan_acc, n_decoding - n,
                              min(<int32_t> MLL_COST_ROWS, e.n_batch), 1.03, e.plan_k)
        for i in range(n):
            r = e.slots[e.plan_slot[i]]
            m = max(e.plan_k[i], min(r.draft_min, e.plan_avail[i]))
            if rows + m - e.plan_k[i] > e.n_batch:
                m = e.plan_k[i]
            rows += m - e.plan_k[i]
            e.plan_k[i] = m
    for i in range(n):
        r = e.slots[e.plan_slot[i]]
        k = e.plan_k[i]
        r.n_real = min(k, e.plan_avail[i])
        if k > r.n_real:
            mll_ngram_fill(e.hist + <size_t> e.plan_slot[i] * e.slot_cells, r.n_past + 1, r.ngram,
                           r.n_real, k, r.draft)
        r.n_draft = k
        if k == 0 and e.plan_avail[i] > 0:
            r.shadow = r.draft[0]
        r.n_in_batch = 1 + k
        total += k
    return total


cdef inline int32_t _scored_in(Req * r, int32_t start, int32_t chunk, int32_t * lo) noexcept nogil:
    """How many positions of ``[start, start + chunk)`` have a scored row (the rows at
    ``score_from .. n_prompt - 2``: each predicts the prompt token after it); the first into ``lo``."""
    cdef int32_t a = max(start, r.score_from)
    cdef int32_t b = min(start + chunk, r.n_prompt - 1)
    lo[0] = a
    return b - a if b > a else 0


cdef int32_t _score_chunk(Req * r, int32_t chunk, int32_t * rows) noexcept nogil:
    """Shorten a scoring request's prompt chunk so that its scored rows fit the ``rows``
    left to this step (llama.cpp holds a logits row per output); takes them from ``rows``."""
    cdef int32_t lo
    cdef int32_t n = _scored_in(r, r.prefill_pos, chunk, &lo)
    if n > rows[0]:
        chunk = lo + rows[0] - r.prefill_pos
        n = rows[0]
    rows[0] -= n
    return chunk


cdef void _mark_scored(EngineState * e, Req * r, int32_t n) noexcept nogil:
    """Ask for the logits rows of the scored positions of ``r``'s chunk (at batch index ``n``)."""
    cdef int32_t lo, k
    r.sc_n = _scored_in(r, r.prefill_pos, r.n_in_batch, &lo)
    r.sc_pos = lo
    r.sc_idx = n + lo - r.prefill_pos
    for k in range(r.sc_n):
        e.batch.logits[r.sc_idx + k] = 1


cdef void _drop_pads(EngineState * e) noexcept nogil:
    cdef llama_memory_t mem = llama_get_memory(e.ctx)
    cdef int k
    for k in range(e.n_pad):
        llama_memory_seq_rm(mem, e.pad_seq[k], e.pad_pos[k], -1)
    e.n_pad = 0


cdef void _copy_seq(EngineState * e, Req * src, Req * dst) noexcept nogil:
    """``dst`` continues from ``src``'s cells: the whole KV stream is copied (for
    non-unified KV llama.cpp copies streams whole; a partial range aborts)."""
    cdef llama_memory_t mem = llama_get_memory(e.ctx)
    engine_forget(e, dst.seq)
    llama_memory_seq_cp(mem, src.seq, dst.seq, -1, -1)
    memcpy(e.hist + <size_t> dst.seq * e.slot_cells, e.hist + <size_t> src.seq * e.slot_cells,
           src.n_past * sizeof(llama_token))
    e.n_hist[dst.seq] = src.n_past
    dst.n_past = src.n_past
    dst.n_reused = src.n_reused
    e.kv_pos[dst.seq] = llama_memory_seq_pos_max(mem, dst.seq)


cdef int32_t _branch_kids(EngineState * e, Req * r, const float * logits, int32_t n_jobs) noexcept nogil:
    """``r``'s prompt is done: each waiting branch takes a copy of its cells and samples
    from the same logits row with its own sampler."""
    cdef Req * kid
    cdef mll_tok_rec * rec
    while r.kids != NULL:
        kid = r.kids
        r.kids = kid.next
        kid.next = NULL
        kid.waiting = False
        _copy_seq(e, r, kid)
        kid.prefill_pos = kid.n_prompt
        kid.out_idx = r.out_idx
        rec = mll_ring_slot(kid.ring)
        kid.job0 = n_jobs
        kid.n_rows = 1
        n_jobs = _add_job(e, n_jobs, kid.seq, r.out_idx, logits, kid.smpl, kid.want_logprob, kid.n_top,
                          rec.top_ids, rec.top_logprobs)
    r.n_kids = 0
    return n_jobs


cdef void _end_command(EngineState * e, Req * r, int status) noexcept nogil:
    cdef Req * c = r.cmd_req
    if r.cmd == CMD_NONE:
        return
    if status < 0 and r.cmd == CMD_FORK and c != NULL and c.done == 0:
        # the branch never started: it ends at once, empty
        c.finish = FIN_CANCELLED
        mll_ring_close(c.ring, 0)
        pthread_mutex_lock(&e.bell.mu)
        c.done = 1
        pthread_mutex_unlock(&e.bell.mu)
    pthread_mutex_lock(&e.bell.mu)
    r.cmd = CMD_NONE
    r.cmd_status = status
    pthread_mutex_unlock(&e.bell.mu)


cdef int engine_snapshot(EngineState * e, int slot, Req * r) noexcept nogil:
    """Copy slot ``slot``'s cells and tokens into ``r.snap_*`` (plus the sampled token not
    yet decoded when a request runs there). Returns 1, or a CMD_* failure code."""
    cdef Req * live = e.slots[slot]
    cdef int32_t n_kv = live.n_past if live != NULL else e.n_hist[slot]
    cdef bint pending = live != NULL and live.pending_decode
    cdef size_t size = mll_state_seq_get_size(e.ctx, slot)
    r.snap_data = <unsigned char *> malloc(max(size, 1))
    r.snap_tokens = <llama_token *> malloc((n_kv + 1) * sizeof(llama_token))
    if r.snap_data == NULL or r.snap_tokens == NULL:
        free(r.snap_data)
        free(r.snap_tokens)
        r.snap_data = NULL
        r.snap_tokens = NULL
        return CMD_NOMEM
    r.snap_len = mll_state_seq_get_data(e.ctx, r.snap_data, size, slot) if size else 0
    if size and r.snap_len == 0:
        return CMD_FAILED
    memcpy(r.snap_tokens, e.hist + <size_t> slot * e.slot_cells, n_kv * sizeof(llama_token))
    if pending:
        r.snap_tokens[n_kv] = live.last
    r.snap_n_kv = n_kv
    r.snap_n_tokens = n_kv + (1 if pending else 0)
    return 1


cdef int engine_restore(EngineState * e, int slot, const unsigned char * data, size_t n,
                        const llama_token * tokens, int32_t n_kv) noexcept nogil:
    """Load a snapshot's cells into the free slot ``slot``. Returns 0, or -1 when
    llama.cpp refused them (the slot is then empty)."""
    engine_forget(e, slot)
    if n_kv > e.slot_cells or (n and mll_state_seq_set_data(e.ctx, data, n, slot) == 0):
        engine_forget(e, slot)
        return -1
    if llama_memory_seq_pos_max(llama_get_memory(e.ctx), slot) != n_kv - 1:
        engine_forget(e, slot)
        return -1
    memcpy(e.hist + <size_t> slot * e.slot_cells, tokens, n_kv * sizeof(llama_token))
    e.n_hist[slot] = n_kv
    e.kv_pos[slot] = n_kv - 1
    return 0


cdef int _fork(EngineState * e, Req * r, Req * c) noexcept nogil:
    """Start branch ``c`` at ``r``'s current position, in a free slot. Returns 1 or a CMD_* code."""
    cdef int slot, i
    cdef int32_t p, n
    cdef llama_token * grown
    cdef llama_sampler * grammar
    if e.n_active >= e.n_slots:
        return CMD_NO_SLOT
    if r.grammar != NULL and c.grammar != NULL:
        # the branch continues the parent's sentence: its grammar state, not a fresh one
        grammar = mll_sampler_clone(r.grammar)
        if grammar == NULL:
            return CMD_FAILED
        llama_sampler_free(c.grammar)
        c.grammar = grammar
    slot = _pick_slot(e, c, &p)
    _attach(e, slot, c, 0)
    if r.prefill_pos < r.n_prompt:
        # still reading its prompt: branch when it is done, like n > 1
        c.waiting = True
        c.prefill_pos = c.n_prompt
        c.next = r.kids
        r.kids = c
        r.n_kids += 1
        return 1
    # the branch's "prompt" is everything before its first token of its own
    n = r.n_past + (1 if r.pending_decode else 0)
    grown = <llama_token *> malloc(max(n, 1) * sizeof(llama_token))
    if grown == NULL:
        engine_finish(e, slot, ERR_NOMEM)
        return CMD_NOMEM
    memcpy(grown, e.hist + <size_t> r.seq * e.slot_cells, r.n_past * sizeof(llama_token))
    if r.pending_decode:
        grown[r.n_past] = r.last
    free(c.prompt)
    c.prompt = grown
    c.n_prompt = n
    _copy_seq(e, r, c)
    c.prefill_pos = n
    c.last = r.last
    c.pending_decode = r.pending_decode
    # the text the parent holds back (half a character, a possible stop) is the branch's too
    c.pipe.utf8 = r.pipe.utf8
    for i in range(<int> r.pipe.stop.n_stops):
        c.pipe.stop.state[i] = r.pipe.stop.state[i]
    c.pipe.stop.held = r.pipe.stop.held
    c.pipe.stop.held_from = r.pipe.stop.held_from
    return 1


cdef void engine_commands(EngineState * e) noexcept nogil:
    """What drivers asked of running requests (snapshots, forks), between two steps."""
    cdef int i, status
    cdef Req * r
    for i in range(e.n_slots):
        r = e.slots[i]
        if r == NULL or r.cmd == CMD_NONE:
            continue
        if r.cmd == CMD_SNAPSHOT:
            status = engine_snapshot(e, i, r)
        else:
            status = _fork(e, r, r.cmd_req)
        _end_command(e, r, status)


cdef int _sample_and_push(EngineState * e, int slot, int32_t idx, mll_row_job * job,
                          llama_token * chosen) noexcept nogil:
    """Choose the slot's token from batch row ``idx`` (whose statistics ``job`` holds), run
    the text pipeline and hand the token to the ring; the token into ``chosen``."""
    cdef Req * r = e.slots[slot]
    cdef float logprob = 0.0
    cdef int rc
    cdef mll_tok_rec * rec
    cdef int full = 0
    cdef llama_token tok
    if r.grammar == NULL:
        tok = choose_token(e.ctx, idx, r.smpl, job)
    else:
        tok = mll_sample_constrained(e.vocab, job.logits, e.n_vocab, r.smpl, r.grammar, job.argmax,
                                     r.grammar_fast_k, r.cand, &full)
        e.n_grammar_tokens += 1
        if full:
            e.n_grammar_rejected += 1
            r.n_grammar_rejected += 1
        if full == 2:
            e.n_grammar_full += 1
            r.n_grammar_full += 1
        if tok == MLL_NO_TOKEN:
            return ERR_GRAMMAR
    if tok < 0:
        keep_guard_error(r.err_text, sizeof(r.err_text))
        return ERR_CXX
    chosen[0] = tok
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
        if rc == -2:
            keep_guard_error(r.err_text, sizeof(r.err_text))
            return ERR_CXX
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
        # the slot lets go (cells kept or freed) before the consumer can see the final token
        _detach(e, slot, ERR_NONE)
        mll_ring_commit(r.ring)
        _close(e, r, ERR_NONE)
    else:
        mll_ring_commit(r.ring)
        r.last = tok
        r.pending_decode = True
    return ERR_NONE


cdef inline int32_t _add_job(EngineState * e, int32_t n, int slot, int32_t idx, const float * logits,
                             llama_sampler * smpl, bint want_logprob, int32_t n_top, int32_t * top_ids,
                             float * top_vals) noexcept nogil:
    """Job ``n`` reduces batch row ``idx`` (of slot ``slot``). Returns the next job."""
    row_job(&e.jobs[n], logits, smpl, want_logprob, n_top, top_ids, top_vals)
    e.job_slot[n] = slot
    e.job_idx[n] = idx
    return n + 1


cdef int32_t _row_jobs(EngineState * e, int i, Req * r, int32_t n_jobs) noexcept nogil:
    """One row job per logits row of slot ``i``: its sampled rows (the stream's token and
    its draft; each writes its alternatives into the ring record it will fill), then its
    scored prompt rows. A missing row ends the request. Returns the next job."""
    cdef int32_t j, p
    cdef const float * logits
    cdef mll_tok_rec * rec
    for j in range(1 + r.n_draft if r.out_idx >= 0 else 0):
        if llama_get_logits_ith(e.ctx, r.out_idx + j) == NULL:
            engine_finish(e, i, ERR_NO_LOGITS)
            return n_jobs
    for j in range(r.sc_n):
        if llama_get_logits_ith(e.ctx, r.sc_idx + j) == NULL:
            r.sc_n = 0
            engine_finish(e, i, ERR_NO_LOGITS)
            return n_jobs
    if r.out_idx >= 0:
        logits = llama_get_logits_ith(e.ctx, r.out_idx)
        if r.logits_out != NULL:
            memcpy(r.logits_out, logits, e.n_vocab * sizeof(float))
            r.logits_out = NULL
        r.job0 = n_jobs
        r.n_rows = 1 + r.n_draft
        for j in range(r.n_rows):
            rec = mll_ring_slot_at(r.ring, <unsigned int> j)
            n_jobs = _add_job(e, n_jobs, i, r.out_idx + j, llama_get_logits_ith(e.ctx, r.out_idx + j), r.smpl,
                              r.want_logprob, r.n_top, rec.top_ids, rec.top_logprobs)
        n_jobs = _branch_kids(e, r, logits, n_jobs)
    r.sc_job = n_jobs
    for j in range(r.sc_n):
        p = r.sc_pos + j + 1        # the token this row scores
        n_jobs = _add_job(e, n_jobs, i, r.sc_idx + j, llama_get_logits_ith(e.ctx, r.sc_idx + j), NULL, True,
                          r.score_top, r.sc_top_ids + <size_t> p * r.score_top,
                          r.sc_top_vals + <size_t> p * r.score_top)
    return n_jobs


cdef void _score_store(EngineState * e) noexcept nogil:
    """Write the scored rows' results into their requests' arrays; a scoring request whose
    prompt is done and that generates nothing ends."""
    cdef int i, t
    cdef int32_t j, p
    cdef Req * r
    cdef mll_row_job * job
    for i in range(e.n_slots):
        r = e.slots[i]
        if r == NULL or not r.score:
            continue
        for j in range(r.sc_n):
            job = &e.jobs[r.sc_job + j]
            p = r.sc_pos + j + 1
            r.sc_logprob[p] = <double> job.logits[r.prompt[p]] - job.lse
            r.sc_argmax[p] = job.argmax
            for t in range(job.got_top):
                job.top_vals[t] = <float> (job.top_vals[t] - job.lse)
        r.sc_n = 0
        if r.max_tokens == 0 and r.prefill_pos >= r.n_prompt:
            r.finish = FIN_MAX_TOKENS
            engine_finish(e, i, ERR_NONE)


cdef inline void _note_accept(Req * r, bint hit) noexcept nogil:
    r.accept = 0.85 * r.accept + (0.15 if hit else 0.0)


cdef void _verify(EngineState * e, int slot) noexcept nogil:
    """Hand out the slot's tokens, row after row: each row's token is chosen by the
    stream's own sampler (which advances only with the tokens handed out), and the next
    row counts only while the chosen token equals the drafted one there. For a sampled
    stream this is the speculative accept rule for a point-mass draft: the draft token
    is kept with probability p(token), else the token comes from p without it. The
    cells of the rejected draft tokens are removed."""
    cdef Req * r = e.slots[slot]
    cdef int32_t j, n_acc = 0, n_draft = r.n_draft, n_real = r.n_real
    cdef llama_token tok = -1, first = -1
    cdef llama_token shadow = r.shadow
    cdef bint rejected = False
    cdef int err
    for j in range(r.n_rows):
        err = _sample_and_push(e, slot, e.job_idx[r.job0 + j], &e.jobs[r.job0 + j], &tok)
        if err != ERR_NONE:
            if e.slots[slot] != NULL:
                engine_finish(e, slot, err)
            break
        if j == 0:
            first = tok
        if e.slots[slot] == NULL or j == n_draft:
            break                   # it ended, or that was the token after the whole draft
        if tok != r.draft[j] or r.cancel or r.ring.cancelled:
            rejected = tok != r.draft[j]
            break
        # the drafted token was decoded at its position already: it stays in the cache
        r.n_past += 1
        e.n_hist[slot] = r.n_past
        n_acc += 1
    if n_draft > 0:
        r.n_drafted += n_draft
        r.n_accepted += n_acc
        e.n_drafted += n_draft
        e.n_accepted += n_acc
        # the acceptance estimate is of the lookup's drafts, not of filler after them
        for j in range(min(n_acc, n_real)):
            _note_accept(r, True)
        if rejected and n_acc < n_real:
            _note_accept(r, False)
        if e.slots[slot] == r:
            llama_memory_seq_rm(llama_get_memory(e.ctx), slot, r.n_past, -1)
    elif shadow >= 0 and first >= 0:
        _note_accept(r, first == shadow)


cdef void _after_decode(EngineState * e, int32_t rc) noexcept nogil:
    cdef int i
    cdef int32_t n_jobs = 0
    cdef Req * r
    for i in range(e.n_slots):
        r = e.slots[i]
        if r == NULL or r.n_in_batch == 0:
            continue
        if rc != 0:
            if rc == 2 and (r.cancel or r.ring.cancelled):
                r.finish = FIN_CANCELLED
                engine_finish(e, i, ERR_NONE)
            elif rc == MLL_CXX_ERROR:
                keep_guard_error(r.err_text, sizeof(r.err_text))
                engine_finish(e, i, ERR_CXX)
            else:
                r.err_code = rc
                engine_finish(e, i, ERR_DECODE)
            continue
        # drafted tokens count as cached only once accepted (_verify)
        r.n_past += r.n_in_batch - r.n_draft
        e.n_hist[i] = r.n_past
        e.n_decoded_tokens += r.n_in_batch
        if r.prefill_pos < r.n_prompt:
            r.prefill_pos += r.n_in_batch
        else:
            r.pending_decode = False
        n_jobs = _row_jobs(e, i, r, n_jobs)
    if n_jobs > 0:
        # every row's reductions, spread over the decode's threads
        mll_rows_compute(&e.rows, n_jobs)
    if rc == 0:
        _score_store(e)
    # then each stream's tokens, in slot order
    for i in range(e.n_slots):
        r = e.slots[i]
        if r != NULL and r.n_rows > 0:
            _verify(e, i)


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t> ts.tv_sec * 1000000000 + ts.tv_nsec


cdef int32_t engine_step(EngineState * e) noexcept nogil:
    """One step: admit, reap, decode one batch, hand out its tokens. Returns the number
    of tokens decoded (0: nothing could run — every request is parked, or none is left)."""
    cdef int32_t n, rc
    cdef int64_t t0, t1
    cdef int i
    if e.clear_wanted:
        for i in range(e.n_slots):
            if e.slots[i] == NULL:
                engine_forget(e, i)
        pthread_mutex_lock(&e.bell.mu)
        e.clear_wanted = 0
        pthread_mutex_unlock(&e.bell.mu)
    _admit(e)
    engine_reap(e)
    engine_commands(e)
    n = _build_batch(e)
    if n == 0:
        engine_publish_kv(e)
        return 0
    e.n_decode_calls += 1
    t0 = _now_ns()
    rc = mll_decode(e.ctx, e.batch)
    t1 = _now_ns()
    _drop_pads(e)
    if rc == 0 and e.step_timed:
        mll_cost_note(&e.costs, e.step_rows, <double> (t1 - t0))
    _after_decode(e, rc)
    engine_publish_kv(e)
    e.decode_ns += t1 - t0
    e.sample_ns += _now_ns() - t1
    return n


cdef void engine_run(EngineState * e, Req * until) noexcept nogil:
    """Step until the engine stops (or, with ``until``, that request is done); sleep on
    the bell while nothing can run."""
    cdef uint64_t seen
    while True:
        seen = mll_bell_seen(&e.bell)
        if e.stop or (until != NULL and until.done):
            return
        if engine_step(e) == 0:
            if until != NULL and until.done:
                return
            mll_bell_wait(&e.bell, seen)
