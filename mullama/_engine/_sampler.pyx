# cython: language_level=3
"""Sampler chains for the engine: one ``llama_sampler`` chain per sequence."""

from libc.stdint cimport int32_t, uint32_t
from libc.stdlib cimport malloc, free

import os
import re
import sys
import tempfile

from mullama._engine._llama cimport *
from mullama._engine._guard cimport (mll_sampler_accept, mll_guard_error, mll_sampler_init_grammar,
                                     mll_sampler_init_grammar_lazy_patterns, mll_sampler_clone,
                                     mll_grammar_allows)
from mullama._engine._model cimport ModelHandle
from mullama._engine._model import take_log
from mullama import errors


cdef llama_sampler * make_sampler(tuple cfg, int32_t n_vocab, int32_t n_ctx, const int[:] prompt) except? NULL:
    """The sampler chain for ``cfg``, or NULL for plain greedy (argmax, no candidate array).

    ``cfg`` is (temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
    repeat_last_n, frequency_penalty, presence_penalty, seed, logit_bias items);
    ``prompt`` counts as history for the penalties."""
    (temperature, top_k, top_p, min_p, typical_p, repeat_penalty, repeat_last_n,
     frequency_penalty, presence_penalty, seed, logit_bias) = cfg[:11]
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
            if mll_sampler_accept(chain, prompt[i]) < 0:
                detail = mll_guard_error().decode("utf-8", "replace")
                llama_sampler_free(chain)
                raise errors.cxx_exception("setting up the sampler", detail, errors.GenerationError)
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


# A grammar's source is parsed by recursive descent, and repetitions are expanded into
# copies of their item: deep nesting could exhaust the C stack, and a repetition such as
# x{2,1} or x{99999999999} keeps llama.cpp's parser busy for ever. Both are refused before
# it sees them; the bounds leave ample room for what JSON Schemas and tool calls produce.
MAX_GRAMMAR_BYTES = 1 << 20
MAX_GRAMMAR_NESTING = 200
MAX_GRAMMAR_REPEAT = 10_000
MAX_GRAMMAR_TRIGGERS = 64
_PARSER_ERROR = re.compile(r"error parsing grammar: ([^\n]*)")


def _repeat_problem(str body):
    """What is wrong with the inside of a ``{...}`` repetition, or None."""
    lo, comma, hi = body.partition(",")
    lo, hi = lo.strip(), hi.strip()
    if not lo.isdigit() or (hi and not hi.isdigit()) or (not comma and hi):
        return f"malformed repetition {{{body}}}"
    n_lo = int(lo)
    n_hi = int(hi) if hi else (n_lo if not comma else None)
    if max(n_lo, n_hi or 0) > MAX_GRAMMAR_REPEAT:
        return f"repetition {{{body}}} is over the limit of {MAX_GRAMMAR_REPEAT}"
    if n_hi is not None and n_hi < n_lo:
        return f"repetition {{{body}}} has its maximum below its minimum"
    return None


def _precheck(str text):
    """Problems llama.cpp's parser would not survive or would take for ever on, or None.
    Scans outside string literals, character classes and comments."""
    cdef Py_ssize_t i = 0, n = len(text), j
    cdef int depth = 0, deepest = 0
    cdef Py_UCS4 c, close
    while i < n:
        c = text[i]
        if c == '#':
            while i < n and text[i] != '\n':
                i += 1
        elif c == '"' or c == '[':
            close = '"' if c == '"' else ']'
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == '\\' else 1
        elif c == '(':
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_GRAMMAR_NESTING:
                return f"the grammar nests parentheses more than {MAX_GRAMMAR_NESTING} deep"
        elif c == ')':
            depth -= 1
        elif c == '{':
            j = text.find('}', i)
            if j < 0:
                return "a repetition { is not closed"
            problem = _repeat_problem(text[i + 1:j])
            if problem:
                return problem
            i = j
        i += 1
    return None


cdef class Grammar:
    """A GBNF grammar parsed for one model's vocabulary (start rule ``root``).

    Parsing happens once, here; every constrained request clones this prototype.
    ``triggers`` makes the grammar lazy: free generation until one of these regex
    patterns matches the output from its start, then the grammar applies to the text
    from the pattern's first capture group on."""

    def __cinit__(self, ModelHandle model not None, str text, triggers=()):
        cdef bytes source
        cdef list patterns
        cdef const char ** c_patterns = NULL
        cdef size_t n_patterns, i
        model.check_open()
        self.proto = NULL
        self.model = model
        self.text = text
        self.triggers = tuple(triggers)
        if not text.strip():
            raise errors.GrammarError("the grammar is empty")
        if "\0" in text:
            raise errors.GrammarError("the grammar contains a NUL character")
        source = text.encode("utf-8")
        if len(source) > MAX_GRAMMAR_BYTES:
            raise errors.GrammarError(f"the grammar is {len(source)} bytes; at most {MAX_GRAMMAR_BYTES} are allowed")
        problem = _precheck(text)
        if problem:
            raise errors.GrammarError(f"invalid grammar: {problem}")
        if len(self.triggers) > MAX_GRAMMAR_TRIGGERS:
            raise errors.GrammarError(f"at most {MAX_GRAMMAR_TRIGGERS} trigger patterns are allowed")
        patterns = []
        for t in self.triggers:
            if not isinstance(t, str) or not t or "\0" in t:
                raise errors.GrammarError(f"a grammar trigger must be a non-empty regex string, got {t!r}")
            try:
                re.compile(t)
            except re.error as exc:
                raise errors.GrammarError(f"grammar trigger {t!r} is not a valid regex: {exc}") from None
            patterns.append(t.encode("utf-8"))
        n_patterns = len(patterns)
        take_log()
        # llama.cpp's parser prints its message (and the whole grammar) to stderr rather than
        # returning it: catch that output for the exception, pass anything else on
        sys.stderr.flush()
        captured = tempfile.TemporaryFile()
        saved = os.dup(2)
        try:
            os.dup2(captured.fileno(), 2)
            if n_patterns:
                c_patterns = <const char **> malloc(n_patterns * sizeof(const char *))
                if c_patterns == NULL:
                    raise MemoryError()
                for i in range(n_patterns):
                    c_patterns[i] = <const char *> (<bytes> patterns[i])
                self.proto = mll_sampler_init_grammar_lazy_patterns(model.vocab, source, b"root", c_patterns,
                                                                    n_patterns)
                free(c_patterns)
            else:
                self.proto = mll_sampler_init_grammar(model.vocab, source, b"root")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            printed = captured.read().decode("utf-8", "replace")
            captured.close()
        found = _PARSER_ERROR.search(printed)
        if found is None and printed:
            sys.stderr.write(printed)
        if self.proto == NULL:
            if mll_guard_error()[0] != 0:
                detail = mll_guard_error().decode("utf-8", "replace")
            elif found is not None:
                detail = found.group(1).strip()
            else:
                lines = [ln.strip() for ln in take_log().splitlines() if ln.strip()]
                detail = "; ".join(lines[-3:]) or "llama.cpp refused it"
            raise errors.GrammarError(f"invalid grammar: {detail}")

    def __dealloc__(self):
        if self.proto != NULL:
            llama_sampler_free(self.proto)
            self.proto = NULL

    cdef llama_sampler * clone(self) except NULL:
        """A fresh copy of the parsed grammar for one request (the caller owns it)."""
        cdef llama_sampler * copy = mll_sampler_clone(self.proto)
        if copy == NULL:
            raise errors.cxx_exception("copying a grammar", mll_guard_error().decode("utf-8", "replace"),
                                       errors.GenerationError)
        return copy

    def accepts(self, tokens) -> bool:
        """Whether the token ids form a complete sentence of the grammar: each is allowed
        where it stands, and generation may end after the last."""
        cdef llama_sampler * g
        cdef int ok = 1, rc
        cdef llama_token eos
        self.model.check_open()
        ids = []
        for t in tokens:
            self.model._check_id(t)
            ids.append(int(t))
        eos = llama_vocab_eos(self.model.vocab)
        if eos < 0:
            eos = llama_vocab_eot(self.model.vocab)
        if eos < 0:
            raise errors.GrammarError("the model has no end-of-generation token to test the grammar's end with")
        g = self.clone()
        try:
            for t in ids:
                rc = mll_grammar_allows(g, t)
                if rc == 1:
                    rc = mll_sampler_accept(g, t)
                    if rc < 0:
                        raise errors.cxx_exception("checking a grammar", mll_guard_error().decode("utf-8", "replace"),
                                                   errors.GrammarError)
                    continue
                if rc < 0:
                    raise errors.cxx_exception("checking a grammar", mll_guard_error().decode("utf-8", "replace"),
                                               errors.GrammarError)
                return False
            rc = mll_grammar_allows(g, eos)
            if rc < 0:
                raise errors.cxx_exception("checking a grammar", mll_guard_error().decode("utf-8", "replace"),
                                           errors.GrammarError)
            return rc == 1
        finally:
            llama_sampler_free(g)
