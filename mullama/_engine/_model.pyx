# cython: language_level=3
"""Owner of a ``llama_model``: loading, vocabulary, metadata, chat templates.

Also installs llama.cpp's log hook once per process: messages are kept (the
last few errors explain a failed load) and printed only when MULLAMA_LOG asks.

Every llama.cpp call here that can throw a C++ exception goes through
mll_guard.h; a caught exception becomes a mullama exception naming the
operation and llama.cpp's message.
"""

import os

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, uint64_t
from libc.stdlib cimport calloc, malloc, free
from libc.string cimport memcpy, strlen

from mullama._engine._llama cimport *
from mullama._engine._guard cimport *
from mullama._engine._ggml_backend cimport *
from mullama._engine._rpc cimport *
from mullama import errors

# ---------------------------------------------------------------- logging
# llama.cpp logs from any thread; the hook touches only this C buffer.

cdef enum:
    LOG_CAP = 4096
cdef char _log_buf[LOG_CAP]
cdef size_t _log_len = 0
cdef int _log_print_level = 5      # 5 = print nothing
cdef ggml_log_level _log_last_level = GGML_LOG_LEVEL_NONE
cdef bint _backend_ready = False


cdef void _log_hook(ggml_log_level level, const char * text, void * user_data) noexcept nogil:
    global _log_len, _log_last_level
    cdef size_t n
    cdef ggml_log_level effective = level
    if level == GGML_LOG_LEVEL_CONT:
        effective = _log_last_level
    else:
        _log_last_level = level
    if text == NULL:
        return
    n = strlen(text)
    if <int> effective >= _log_print_level:
        _write_stderr(text, n)
    if effective < GGML_LOG_LEVEL_WARN:
        return
    if n >= LOG_CAP:
        text = text + (n - (LOG_CAP - 1))
        n = LOG_CAP - 1
    if _log_len + n >= LOG_CAP:
        _log_len = 0
    memcpy(_log_buf + _log_len, text, n)
    _log_len += n


cdef extern from "unistd.h" nogil:
    ssize_t write(int fd, const void * buf, size_t count)


cdef void _write_stderr(const char * text, size_t n) noexcept nogil:
    write(2, text, n)


def init_backend():
    """Initialise llama.cpp once and route its log through mullama."""
    global _backend_ready, _log_print_level
    if _backend_ready:
        return
    level = os.environ.get("MULLAMA_LOG", "").strip().lower()
    _log_print_level = {"debug": 1, "info": 2, "warn": 3, "warning": 3, "error": 4}.get(level, 5)
    llama_log_set(_log_hook, NULL)
    llama_backend_init()
    _backend_ready = True


def take_log() -> str:
    """Return and forget the warnings and errors llama.cpp logged since the last call."""
    global _log_len
    text = _log_buf[:_log_len].decode("utf-8", "replace")
    _log_len = 0
    return text


def system_info() -> str:
    init_backend()
    return llama_print_system_info().decode("utf-8", "replace")


def supports_gpu_offload() -> bool:
    init_backend()
    return llama_supports_gpu_offload()


cdef inline bint _threw() noexcept nogil:
    """True when the last guarded call on this thread caught a C++ exception."""
    return mll_guard_error()[0] != 0


cdef int _raise_if_threw(str what, cls=errors.MullamaError, str hint="") except -1:
    """Raise for a C++ exception caught by the last guarded call on this thread."""
    if _threw():
        raise errors.cxx_exception(what, mll_guard_error().decode("utf-8", "replace"), cls, hint)
    return 0


# ---------------------------------------------------------------- RPC backend
# ggml's RPC backend is optional (MULLAMA_RPC=1 at build time): its functions are
# looked up in the "RPC" registry, which exists only when it was built in.


cdef void * _rpc_proc(const char * name):
    init_backend()
    cdef ggml_backend_reg_t reg = ggml_backend_reg_by_name(b"RPC")
    if reg == NULL:
        return NULL
    return ggml_backend_reg_get_proc_address(reg, name)


def rpc_available() -> bool:
    """True when this build has ggml's RPC backend."""
    return _rpc_proc(b"ggml_backend_rpc_add_server") != NULL


def rpc_protocol_version() -> str:
    return f"{RPC_PROTO_MAJOR_VERSION}.{RPC_PROTO_MINOR_VERSION}.{RPC_PROTO_PATCH_VERSION}"


def rpc_max_servers() -> int:
    return GGML_RPC_MAX_SERVERS


def rpc_start_server(str endpoint, size_t n_threads):
    """Serve this process's CPU device over ggml's RPC protocol at ``endpoint``.

    Blocks for as long as the server runs (it only returns when it cannot bind or
    accept); the GIL is released. Raises RuntimeError when RPC is not built in.
    """
    cdef rpc_start_server_fn start = <rpc_start_server_fn> _rpc_proc(b"ggml_backend_rpc_start_server")
    if start == NULL:
        raise RuntimeError("this build of mullama has no RPC backend")
    cdef ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if cpu == NULL:
        raise RuntimeError("no CPU device to serve")
    cdef bytes bendpoint = endpoint.encode("ascii")
    cdef const char * cendpoint = bendpoint
    with nogil:
        start(cendpoint, NULL, n_threads, 1, &cpu)


cdef list _rpc_devices(list endpoints):
    """The devices of each RPC server (as integers holding ggml_backend_dev_t), in order.

    Every endpoint must already have answered the handshake (mullama.rpc): ggml aborts the process
    when a server it is asked to add cannot be reached."""
    cdef rpc_add_server_fn add = <rpc_add_server_fn> _rpc_proc(b"ggml_backend_rpc_add_server")
    cdef ggml_backend_reg_t reg
    cdef bytes bendpoint
    cdef const char * cendpoint
    cdef size_t i
    if add == NULL:
        raise errors.ModelLoadError("this build of mullama has no RPC backend (rebuild with MULLAMA_RPC=1)")
    devices = []
    for endpoint in endpoints:
        bendpoint = endpoint.encode("ascii")
        cendpoint = bendpoint
        with nogil:
            reg = mll_rpc_add_server(add, cendpoint)
        if reg == NULL:
            if _threw():
                raise errors.ModelLoadError(f"adding the RPC server {endpoint} failed: llama.cpp threw "
                                            + mll_guard_error().decode("utf-8", "replace"))
            raise errors.ModelLoadError(f"the RPC server {endpoint} offers no device")
        for i in range(ggml_backend_reg_dev_count(reg)):
            devices.append(<size_t> ggml_backend_reg_dev_get(reg, i))
    return devices


cdef str _vocab_hint(str path):
    return f"the vocabulary of {path!r} is broken or not supported"


def _last_error_line() -> str:
    lines = [ln.strip() for ln in take_log().splitlines() if ln.strip()]
    picked = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return "; ".join((picked or lines)[-3:])


# ---------------------------------------------------------------- model


cdef class ModelHandle:
    """Owns one ``llama_model``. ``close()`` is idempotent; ``__dealloc__`` frees too."""

    def __cinit__(self, str path, int n_gpu_layers=-1, bint use_mmap=True, bint use_mlock=False,
                  bint vocab_only=False, list rpc_servers=None, list tensor_split=None):
        """``rpc_servers`` (validated, reachable ``HOST:PORT`` strings) puts the layers on
        the devices of those servers and nowhere else: the list is passed to llama.cpp
        explicitly, so other models of the process keep their own devices.
        ``tensor_split`` (one non-negative weight per device) shares the layers out."""
        cdef llama_model_params params
        cdef bytes bpath = os.fsencode(path)
        cdef const char * cpath = bpath
        cdef ggml_backend_dev_t * devices = NULL
        cdef float * split = NULL
        cdef size_t i, n_max
        init_backend()
        self.path = path
        self.model = NULL
        params = llama_model_default_params()
        if rpc_servers:
            found = _rpc_devices(rpc_servers)
            n_max = llama_max_devices()
            if <size_t> len(found) > n_max:
                raise errors.ModelLoadError(
                    f"the RPC servers offer {len(found)} devices; llama.cpp takes at most {n_max}", path=path)
            if tensor_split is not None and len(tensor_split) != len(found):
                raise errors.ModelLoadError(
                    f"tensor_split has {len(tensor_split)} weights but the RPC servers offer {len(found)} "
                    f"devices (one weight per device)", path=path)
            devices = <ggml_backend_dev_t *> calloc(len(found) + 1, sizeof(ggml_backend_dev_t))
            split = <float *> calloc(n_max, sizeof(float))
            if devices == NULL or split == NULL:
                free(devices)
                free(split)
                raise MemoryError()
            for i in range(len(found)):
                devices[i] = <ggml_backend_dev_t> <size_t> found[i]
                if tensor_split is not None:
                    split[i] = tensor_split[i]
            params.devices = devices
            params.split_mode = LLAMA_SPLIT_MODE_LAYER
            if tensor_split is not None:
                params.tensor_split = split
        params.n_gpu_layers = n_gpu_layers
        if use_mmap:
            params.load_mode = LLAMA_LOAD_MODE_MMAP_MLOCK if use_mlock else LLAMA_LOAD_MODE_MMAP
        else:
            params.load_mode = LLAMA_LOAD_MODE_MLOCK if use_mlock else LLAMA_LOAD_MODE_NONE
        params.vocab_only = vocab_only
        take_log()
        with nogil:
            self.model = mll_model_load_from_file(cpath, params)
        # llama.cpp copied the device list and the split into the model
        free(devices)
        free(split)
        if self.model == NULL:
            if _threw():
                raise errors.model_load_error(
                    path, "llama.cpp threw " + mll_guard_error().decode("utf-8", "replace"))
            raise errors.model_load_error(path, _last_error_line())
        self.vocab = llama_model_get_vocab(self.model)
        self.n_vocab = llama_vocab_n_tokens(self.vocab)
        if self.vocab == NULL or self.n_vocab <= 0:
            llama_model_free(self.model)
            self.model = NULL
            raise errors.model_load_error(path, "the model has no vocabulary")

    def __dealloc__(self):
        if self.model != NULL:
            llama_model_free(self.model)
            self.model = NULL

    def close(self):
        if self.model != NULL:
            llama_model_free(self.model)
            self.model = NULL
            self.vocab = NULL

    @property
    def closed(self) -> bool:
        return self.model == NULL

    cdef int check_open(self) except -1:
        if self.model == NULL:
            raise errors.ClosedError("the model is closed")
        return 0

    # ----------------------------------------------------------- facts

    def info(self) -> dict:
        self.check_open()
        cdef char buf[256]
        if mll_model_desc(self.model, buf, sizeof(buf)) == MLL_CXX_ERROR:
            _raise_if_threw("reading the model description")
            buf[0] = 0
        return {
            "desc": buf.decode("utf-8", "replace"),
            "n_vocab": self.n_vocab,
            "n_ctx_train": llama_model_n_ctx_train(self.model),
            "n_embd": llama_model_n_embd(self.model),
            "n_layer": llama_model_n_layer(self.model),
            # a vocabulary-only model has no layers, and n_head of layer 0 would abort
            "n_head": llama_model_n_head(self.model) if llama_model_n_layer(self.model) > 0 else 0,
            "size": llama_model_size(self.model),
            "n_params": llama_model_n_params(self.model),
            "has_encoder": llama_model_has_encoder(self.model),
            "has_decoder": llama_model_has_decoder(self.model),
            "bos": llama_vocab_bos(self.vocab),
            "eos": llama_vocab_eos(self.vocab),
            "add_bos": llama_vocab_get_add_bos(self.vocab),
            "add_eos": llama_vocab_get_add_eos(self.vocab),
            "add_sep": llama_vocab_get_add_sep(self.vocab),
            "sep": llama_vocab_sep(self.vocab),
            "n_cls_out": llama_model_n_cls_out(self.model),
        }

    def metadata(self) -> dict:
        """All GGUF key/value metadata as strings (arrays are summarised by llama.cpp)."""
        self.check_open()
        cdef int32_t i, n = llama_model_meta_count(self.model)
        cdef int32_t size
        cdef char * buf
        cdef size_t cap = 1024
        out = {}
        buf = <char *> malloc(cap)
        if buf == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                size = mll_model_meta_key_by_index(self.model, i, buf, cap)
                if size == MLL_CXX_ERROR:
                    _raise_if_threw("reading the model metadata")
                if size < 0:
                    continue
                key = buf[:min(<size_t> size, cap - 1)].decode("utf-8", "replace")
                size = mll_model_meta_val_str_by_index(self.model, i, buf, cap)
                if size == MLL_CXX_ERROR:
                    _raise_if_threw("reading the model metadata")
                if size >= <int32_t> cap:
                    free(buf)
                    cap = size + 1
                    buf = <char *> malloc(cap)
                    if buf == NULL:
                        raise MemoryError()
                    size = mll_model_meta_val_str_by_index(self.model, i, buf, cap)
                    if size == MLL_CXX_ERROR:
                        _raise_if_threw("reading the model metadata")
                if size < 0:
                    continue
                out[key] = buf[:min(<size_t> size, cap - 1)].decode("utf-8", "replace")
        finally:
            free(buf)
        return out

    def chat_template(self, name=None):
        """The model's chat template (Jinja source) or None."""
        self.check_open()
        cdef const char * tmpl
        cdef bytes bname
        if name is None:
            tmpl = mll_model_chat_template(self.model, NULL)
        else:
            bname = name.encode()
            tmpl = mll_model_chat_template(self.model, bname)
        if tmpl == NULL:
            _raise_if_threw("reading the chat template", errors.TemplateError)
            return None
        return tmpl.decode("utf-8", "replace")

    def is_eog(self, int token) -> bool:
        self.check_open()
        self._check_id(token)
        return llama_vocab_is_eog(self.vocab, token)

    def is_control(self, int token) -> bool:
        self.check_open()
        self._check_id(token)
        return llama_vocab_is_control(self.vocab, token)

    cdef int _check_id(self, long long token) except -1:
        if token < 0 or token >= self.n_vocab:
            raise IndexError(f"token id {token} is outside the vocabulary [0, {self.n_vocab})")
        return 0

    # ----------------------------------------------------------- text

    def tokenize(self, bytes text not None, bint add_special=True, bint parse_special=False) -> list:
        """Token ids of ``text``. Raises TokenizerError when llama.cpp's tokenizer throws."""
        self.check_open()
        cdef Py_ssize_t n_text = len(text)
        cdef const char * ctext = text
        cdef int32_t cap, n
        cdef llama_token * buf
        if n_text > 0x7FFFFFFF:
            raise ValueError("text is too long to tokenize (over 2 GiB)")
        cap = <int32_t> min(n_text + 8, 0x7FFFFFFF)
        buf = <llama_token *> malloc(cap * sizeof(llama_token))
        if buf == NULL:
            raise MemoryError()
        try:
            with nogil:
                n = mll_tokenize(self.vocab, ctext, <int32_t> n_text, buf, cap, add_special, parse_special)
            if n < 0:
                if n == MLL_CXX_ERROR:
                    # INT32_MIN is also llama.cpp's own "too many tokens" answer
                    _raise_if_threw("tokenize", errors.TokenizerError, _vocab_hint(self.path))
                    raise ValueError("tokenization overflowed the token count limit")
                cap = -n
                free(buf)
                buf = <llama_token *> malloc(cap * sizeof(llama_token))
                if buf == NULL:
                    raise MemoryError()
                with nogil:
                    n = mll_tokenize(self.vocab, ctext, <int32_t> n_text, buf, cap, add_special,
                                     parse_special)
                if n < 0:
                    _raise_if_threw("tokenize", errors.TokenizerError, _vocab_hint(self.path))
                    raise RuntimeError("llama_tokenize failed")
            return [buf[i] for i in range(n)]
        finally:
            free(buf)

    def token_to_piece(self, int token, bint special=False) -> bytes:
        self.check_open()
        self._check_id(token)
        cdef char small[64]
        cdef int32_t n = mll_token_to_piece(self.vocab, token, small, sizeof(small), 0, special)
        cdef char * big
        if n == MLL_CXX_ERROR:
            _raise_if_threw("token_to_piece", errors.TokenizerError, _vocab_hint(self.path))
        if n >= 0:
            return small[:n]
        big = <char *> malloc(-n)
        if big == NULL:
            raise MemoryError()
        try:
            n = mll_token_to_piece(self.vocab, token, big, -n, 0, special)
            if n == MLL_CXX_ERROR:
                _raise_if_threw("token_to_piece", errors.TokenizerError, _vocab_hint(self.path))
            return big[:max(n, 0)]
        finally:
            free(big)

    def detokenize(self, const int[:] ids not None, bint remove_special=False,
                   bint unparse_special=False) -> bytes:
        """Bytes of ``ids`` (int32). Ids outside the vocabulary raise IndexError."""
        self.check_open()
        cdef Py_ssize_t i, n = ids.shape[0]
        cdef int32_t size, cap
        cdef char * buf
        if n == 0:
            return b""
        if n > 0x0FFFFFFF:
            raise ValueError("too many token ids to detokenize at once")
        for i in range(n):
            if ids[i] < 0 or ids[i] >= self.n_vocab:
                raise IndexError(
                    f"token id {ids[i]} at position {i} is outside the vocabulary [0, {self.n_vocab})")
        cap = <int32_t> (n * 8 + 16)
        buf = <char *> malloc(cap)
        if buf == NULL:
            raise MemoryError()
        try:
            with nogil:
                size = mll_detokenize(self.vocab, <const llama_token *> &ids[0], <int32_t> n, buf, cap,
                                      remove_special, unparse_special)
            if size == MLL_CXX_ERROR:
                _raise_if_threw("detokenize", errors.TokenizerError, _vocab_hint(self.path))
            if size < 0:
                cap = -size
                free(buf)
                buf = <char *> malloc(cap)
                if buf == NULL:
                    raise MemoryError()
                with nogil:
                    size = mll_detokenize(self.vocab, <const llama_token *> &ids[0], <int32_t> n, buf,
                                          cap, remove_special, unparse_special)
                if size < 0:
                    _raise_if_threw("detokenize", errors.TokenizerError, _vocab_hint(self.path))
                    raise RuntimeError("llama_detokenize failed")
            return PyBytes_FromStringAndSize(buf, size)
        finally:
            free(buf)

    def apply_chat_template(self, bytes template not None, list messages, bint add_assistant) -> bytes:
        """Render ``messages`` (a list of (role, content) byte pairs) with a built-in template.

        Raises TemplateError when llama.cpp does not recognise the template or throws.
        """
        cdef Py_ssize_t i, n = len(messages)
        cdef llama_chat_message * chat = <llama_chat_message *> malloc(max(n, 1) * sizeof(llama_chat_message))
        cdef int32_t size, cap = 0
        cdef char * buf = NULL
        keep = []
        if chat == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                role, content = messages[i]
                keep.append(role)
                keep.append(content)
                chat[i].role = <const char *> role
                chat[i].content = <const char *> content
                cap += len(role) + len(content)
            cap = cap * 2 + 256
            for _ in range(2):      # a second time only when the first buffer was too small
                free(buf)
                buf = <char *> malloc(cap)
                if buf == NULL:
                    raise MemoryError()
                size = mll_chat_apply_template(template, chat, n, add_assistant, buf, cap)
                if size == MLL_CXX_ERROR:
                    _raise_if_threw("applying the chat template", errors.TemplateError)
                if size <= cap:
                    break
                cap = size + 1
            if size > cap:
                raise errors.TemplateError("the rendered chat template did not fit its buffer")
            if size < 0:
                raise errors.TemplateError("llama.cpp does not support this chat template")
            return buf[:size]
        finally:
            free(chat)
            free(buf)
