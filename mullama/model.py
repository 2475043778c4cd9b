"""``Model``: a loaded GGUF model, its tokenizer and metadata."""

from __future__ import annotations

import os
import stat
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from mullama import errors
from mullama._engine._model import ModelHandle
from mullama._engine._sampler import Grammar
from mullama.chat_template import looks_like_jinja, render_chat_template
from mullama.gguf_check import validate_gguf_file

__all__ = ["Model"]

TokenIds = Sequence[int] | np.ndarray
GRAMMAR_CACHE = 32


def as_token_array(ids: Any, n_vocab: int, what: str = "token ids") -> np.ndarray:
    """int32 array of ``ids``, each checked against ``[0, n_vocab)``."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of integers, not {type(ids).__name__}")
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int32)
    if arr.dtype == object or (arr.dtype.kind == "f" and not isinstance(ids, np.ndarray)):
        # Python ints past int64 (or int64 mixed with uint64, which numpy turns into float64)
        # are ids out of range, not ids of the wrong type
        for i, v in enumerate(ids if isinstance(ids, (list, tuple)) else arr.tolist()):
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and not 0 <= v < n_vocab:
                raise IndexError(f"{what}: id {v} at position {i} is outside the vocabulary [0, {n_vocab})")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= n_vocab))
    if bad.size:
        i = int(bad[0])
        raise IndexError(f"{what}: id {int(arr[i])} at position {i} is outside the vocabulary [0, {n_vocab})")
    return np.ascontiguousarray(arr, dtype=np.int32)


def check_model_path(path: str | os.PathLike[str]) -> str:
    """Reject what llama.cpp should never be handed: missing files, directories, FIFOs."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"model path must be str or os.PathLike, got {type(path).__name__}")
    if "\x00" in path:
        raise errors.ModelLoadError(f"model path {path!r} contains a NUL character", path=path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise errors.ModelNotFoundError(f"model file {path!r} does not exist", path=path) from None
    except OSError as exc:
        raise errors.ModelLoadError(f"cannot access model file {path!r}: {exc.strerror}", path=path) from exc
    if stat.S_ISDIR(st.st_mode):
        raise errors.ModelLoadError(f"model path {path!r} is a directory, not a GGUF file", path=path)
    if not stat.S_ISREG(st.st_mode):
        raise errors.ModelLoadError(f"model path {path!r} is not a regular file", path=path)
    if not os.access(path, os.R_OK):
        raise errors.ModelLoadError(f"model file {path!r} is not readable (permission denied)", path=path)
    return path


# Some GGUF conversions omit tokenizer.chat_template; their family's format is well known.
_ARCH_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma"}


class Model:
    """A GGUF model loaded into memory.

    Create it with :meth:`Model.load`. A model may serve several
    :class:`~mullama.Context` objects; closing the model closes them too.
    Tokenizing and reading metadata are thread-safe.
    """

    def __init__(self, handle: ModelHandle, tensors: frozenset[str] = frozenset()) -> None:
        self._handle = handle
        # a sequence-classification head (dense "cls" and/or projection "cls.output"): what reranking needs
        self._has_classifier = bool(tensors & {"cls.weight", "cls.output.weight"})
        self._info = handle.info()
        self._metadata: dict[str, str] | None = None
        self._contexts: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._grammars: OrderedDict[tuple[str, tuple[str, ...]], Grammar] = OrderedDict()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        n_gpu_layers: int = -1,
        use_mmap: bool = True,
        use_mlock: bool = False,
        vocab_only: bool = False,
        rpc_servers: "str | Sequence[str] | None" = None,
        tensor_split: Sequence[float] | None = None,
        in_process: bool = False,
    ) -> "Model":
        """Load a GGUF file.

        The file is checked first (it exists, is a regular readable file, and
        its GGUF header, metadata and tensor table are consistent with its
        size), so a malformed file raises :class:`ModelLoadError` instead of
        reaching llama.cpp's parser. ``n_gpu_layers=-1`` offloads every layer
        when a GPU backend is built in (ignored on a CPU build).
        Blocks the calling thread while loading; the GIL is released.

        ``rpc_servers`` (``["HOST:PORT", ...]`` or ``"HOST:PORT,..."``; servers started
        with ``mullama rpc-server``, build with ``MULLAMA_RPC=1``) puts the layers on those
        servers' devices only, shared out by ``tensor_split`` (one weight per device;
        default: by the servers' free memory). Each server must answer ggml's RPC handshake
        first (reachable, not busy with another client, the same protocol), else
        :class:`ModelLoadError`. The model then runs in a child process
        (:class:`~mullama.rpc_model.RpcModel`), because llama.cpp aborts the process
        whose RPC server dies: that turns into :class:`GenerationError` here.
        ``in_process=True`` loads it in this process instead (what ``AsyncModel`` and
        the server need), where a dying server ends the process.
        """
        if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int):
            raise TypeError("n_gpu_layers must be an integer")
        path = check_model_path(path)
        tensors = validate_gguf_file(path)
        if rpc_servers is None:
            if tensor_split is not None:
                raise ValueError("tensor_split shares layers among RPC servers: it needs rpc_servers")
            handle = ModelHandle(path, int(n_gpu_layers), bool(use_mmap), bool(use_mlock), bool(vocab_only))
            return cls(handle, tensors)
        from mullama import rpc

        servers = rpc.parse_endpoints(rpc_servers)
        split = rpc.check_tensor_split(tensor_split, len(servers))
        if vocab_only:
            raise ValueError("a vocabulary-only load has no layers to place on RPC servers")
        rpc.require_rpc()
        rpc.check_reachable(servers)
        if not in_process:
            from mullama.rpc_model import RpcModel

            return RpcModel(path, servers, {"n_gpu_layers": int(n_gpu_layers), "use_mmap": bool(use_mmap),
                                            "use_mlock": bool(use_mlock), "tensor_split": split})
        handle = ModelHandle(path, int(n_gpu_layers), bool(use_mmap), bool(use_mlock), False, servers, split)
        return cls(handle, tensors)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Free the model and every context made from it. Safe to call twice."""
        for ctx in list(self._contexts):
            ctx.close()
        with self._lock:
            self._grammars.clear()
        self._handle.close()

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.description
        return f"<mullama.Model {self.path!r} ({state})>"

    def _register(self, ctx: Any) -> None:
        self._contexts.add(ctx)

    # ------------------------------------------------------------ embeddings

    def embed(self, texts: "str | Iterable[str | TokenIds]",
              pooling: "Literal['mean', 'last', 'cls', 'rank'] | None" = "mean",
              normalize: bool | None = None, n_threads: int | None = None) -> Any:
        """Embeddings of ``texts`` (strings, tokenized with BOS, or token-id lists) as a
        float32 ``numpy.ndarray`` of shape ``(len(texts), dim)``; a single string gives
        shape ``(1, dim)``. ``pooling`` combines a text's token vectors: ``"mean"``,
        ``"last"`` (the last token's, what causal-LM embedding models use) or ``"cls"`` (the
        first token's); ``None`` returns one ``(n_tokens, dim)`` array per text. With
        ``normalize`` (the default) each vector has unit L2 norm.

        ``"rank"`` runs the model's classifier head (a cross-encoder's) on the pooled
        vector: shape ``(len(texts), n_cls_out)``, the head's raw outputs, never normalized;
        a model without a head raises :class:`UnsupportedModelError`. To score query and
        document pairs use :meth:`rerank`, which joins them as the model expects.

        Runs on an embedding context of the model's own (pooling fixed at creation, one
        micro-batch as large as the longest text, many texts per decode), separate from
        any generation context. Blocks the calling thread; calls from several threads
        run one after another.
        """
        from mullama.embeddings import embed

        return embed(self, texts, pooling, normalize, n_threads)

    def rerank(self, query: str, documents: "str | Sequence[str]", n_threads: int | None = None) -> Any:
        """Relevance of each of ``documents`` to ``query`` from the model's classifier head
        (a cross-encoder reranker): a float32 ``numpy.ndarray`` of shape
        ``(len(documents),)`` in the documents' order, higher meaning more relevant. The
        scores are the head's raw first output (logits for most rerankers; apply a sigmoid
        for a probability). Each pair is joined as llama.cpp's server joins it: the model's
        "rerank" template when it has one, else ``[BOS] query [EOS] [SEP] document [EOS]``
        with the special tokens the vocabulary adds.

        A model without a classifier head raises :class:`UnsupportedModelError`; an empty
        query or document, or a pair longer than the model's context, raises a
        ``ValueError``. Blocks like :meth:`embed`, with all pairs batched together.
        """
        from mullama.rerank import rerank

        return rerank(self, query, documents, n_threads)

    # ------------------------------------------------------------ facts

    @property
    def path(self) -> str:
        return self._handle.path

    @property
    def n_vocab(self) -> int:
        return self._info["n_vocab"]

    @property
    def n_ctx_train(self) -> int:
        return self._info["n_ctx_train"]

    @property
    def n_embd(self) -> int:
        return self._info["n_embd"]

    @property
    def n_layer(self) -> int:
        return self._info["n_layer"]

    @property
    def n_params(self) -> int:
        return self._info["n_params"]

    @property
    def size(self) -> int:
        """Bytes of tensor data."""
        return self._info["size"]

    @property
    def description(self) -> str:
        """llama.cpp's one-line description, e.g. ``gemma3 270M Q4_K - Medium``."""
        return self._info["desc"]

    @property
    def bos_token_id(self) -> int | None:
        tok = self._info["bos"]
        return tok if tok >= 0 else None

    @property
    def eos_token_id(self) -> int | None:
        tok = self._info["eos"]
        return tok if tok >= 0 else None

    @property
    def metadata(self) -> Mapping[str, str]:
        """GGUF key/value metadata, values rendered as strings."""
        if self._metadata is None:
            self._metadata = self._handle.metadata()
        return dict(self._metadata)

    @property
    def name(self) -> str:
        meta = self.metadata
        return meta.get("general.name") or Path(self.path).stem

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template stored in the file, if any."""
        return self._handle.chat_template()

    def _builtin_template(self) -> str | None:
        """A built-in template name for files that carry none, chosen by architecture."""
        return _ARCH_TEMPLATES.get(self.architecture or "")

    def is_eog(self, token_id: int) -> bool:
        """True for end-of-generation tokens (EOS, end-of-turn, ...)."""
        return self._handle.is_eog(self._token_id(token_id))

    def _token_id(self, token_id: int) -> int:
        """``token_id`` as an int in the vocabulary; IndexError (not OverflowError) when outside."""
        tok = int(token_id)
        if not 0 <= tok < self.n_vocab:
            raise IndexError(f"token id {tok} is outside the vocabulary [0, {self.n_vocab})")
        return tok

    # ------------------------------------------------------------ text

    def tokenize(self, text: str | bytes, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``.

        ``add_special`` adds the model's BOS token where the model wants one;
        ``parse_special`` turns special-token text such as ``<start_of_turn>``
        into the special token instead of tokenizing it as plain text.
        A ``str`` with lone surrogates raises ``UnicodeEncodeError``; a
        vocabulary llama.cpp's tokenizer fails on (for example a SentencePiece
        vocabulary without a byte token the text needs) raises
        :class:`TokenizerError`.
        """
        if isinstance(text, str):
            data = text.encode("utf-8")
        elif isinstance(text, (bytes, bytearray, memoryview)):
            data = bytes(text)
        else:
            raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
        return self._handle.tokenize(data, bool(add_special), bool(parse_special))

    def detokenize_bytes(self, ids: TokenIds, special: bool = False) -> bytes:
        """Raw bytes of ``ids``; ``special=True`` renders special tokens as their text."""
        arr = as_token_array(ids, self.n_vocab)
        return self._handle.detokenize(arr, False, bool(special))

    def detokenize(self, ids: TokenIds, special: bool = False) -> str:
        """Text of ``ids``. Bytes that are not valid UTF-8 become U+FFFD."""
        return self.detokenize_bytes(ids, special).decode("utf-8", "replace")

    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """Bytes of one token (may be part of a UTF-8 character)."""
        return self._handle.token_to_piece(self._token_id(token_id), bool(special))

    def apply_chat_template(
        self,
        messages: Iterable[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template: str | None = None,
        tools: list[Any] | None = None,
        tool_choice: str = "auto",
        **template_kwargs: Any,
    ) -> str:
        """Render chat ``messages`` (dicts with ``role`` and ``content``) into a prompt.

        The template is ``template`` if given, else the model's own
        (``tokenizer.chat_template``). Jinja source is rendered in mullama's
        sandbox (:mod:`mullama.chat_template`: no access to Python internals,
        bounded time and output), with ``bos_token`` / ``eos_token`` from the
        vocabulary and ``tools`` and ``template_kwargs`` as extra globals. A
        template name (``'chatml'``, ``'llama3'``, ``'gemma'``, ...) or a model
        without a template uses llama.cpp's built-in implementation, chosen
        by architecture for files that carry none. Raises
        :class:`TemplateError` when the template fails or is unknown.

        ``tools`` are OpenAI function tools; messages may hold assistant
        ``tool_calls`` and ``tool`` results. A template with a tool format of
        its own (:meth:`tool_format`) receives them as Hugging Face passes
        them; any other template gets the tools described in the system
        message (:func:`mullama.grammar.prepare_chat_messages`).
        ``tool_choice`` (``'auto'``, ``'required'``, ``'none'`` or a tool's
        name) only changes that description; ``'none'`` leaves the tools out.
        Bad tools raise :class:`~mullama.grammar.ToolError`.
        """
        tmpl = self._template_source(template)
        messages = list(messages)
        if tools is not None or any(isinstance(m, Mapping) and (m.get("tool_calls") or m.get("role") == "tool")
                                    for m in messages):
            from mullama.grammar.tools import check_choice, prepare_chat_messages, validate_tools

            checked = validate_tools(tools) if tools is not None else []
            choice = check_choice(checked, tool_choice) if tools is not None else "none"
            messages, tools = prepare_chat_messages(messages, checked, self.tool_format(tmpl), choice)
        if looks_like_jinja(tmpl):
            return render_chat_template(
                tmpl, messages, add_generation_prompt=bool(add_generation_prompt),
                bos_token=self._special_text(self.bos_token_id), eos_token=self._special_text(self.eos_token_id),
                tools=tools, **template_kwargs)
        if tools is not None or template_kwargs:
            raise errors.TemplateError(f"the built-in template {tmpl!r} takes no tools or extra arguments")
        pairs: list[tuple[bytes, bytes]] = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
                raise TypeError(f"message {i} must be a mapping with 'role' and 'content'")
            role, content = msg["role"], msg["content"]
            if not isinstance(role, str) or not isinstance(content, str):
                raise TypeError(f"message {i}: role and content must be strings")
            if "\x00" in role or "\x00" in content:
                raise ValueError(f"message {i} contains a NUL character")
            pairs.append((role.encode("utf-8"), content.encode("utf-8")))
        out = self._handle.apply_chat_template(tmpl.encode("utf-8"), pairs, bool(add_generation_prompt))
        return out.decode("utf-8", "replace")

    def _template_source(self, template: str | None) -> str:
        tmpl = template if template is not None else (self.chat_template or self._builtin_template())
        if not tmpl:
            raise errors.TemplateError(
                "the model has no chat template; pass template=... (Jinja source, or the name of a "
                "llama.cpp built-in template such as 'chatml', 'llama3' or 'gemma')")
        return tmpl

    def tool_format(self, template: str | None = None) -> str:
        """The tool-call format of ``template`` (default: the model's own): ``'generic'``,
        ``'llama3'``, ``'hermes'`` or ``'mistral'`` (see :mod:`mullama.grammar.tool_formats`)."""
        from mullama.grammar.tool_formats import detect_tool_format

        tmpl = template if template is not None else (self.chat_template or self._builtin_template())
        return detect_tool_format(tmpl if tmpl and looks_like_jinja(tmpl) else None)

    # ------------------------------------------------------------ grammars

    def compile_grammar(self, gbnf: str, triggers: Sequence[str] = ()) -> Grammar:
        """Parse GBNF text (start rule ``root``) for this model's vocabulary.

        Raises :class:`GrammarError` with the parser's message when the text is not a
        valid grammar. ``triggers`` (regex patterns) make it lazy, as in
        :class:`SamplerParams`. ``Grammar.accepts(token_ids)`` tells whether tokens
        form a complete sentence of it. Parsed grammars are kept (the last
        ``GRAMMAR_CACHE`` distinct ones), so a repeated constraint is parsed once."""
        if self.closed:
            raise errors.ClosedError("the model is closed")
        if not isinstance(gbnf, str):
            raise TypeError(f"grammar must be str, got {type(gbnf).__name__}")
        key = (gbnf, tuple(triggers))
        with self._lock:
            found = self._grammars.get(key)
            if found is not None:
                self._grammars.move_to_end(key)
                return found
        grammar = Grammar(self._handle, gbnf, key[1])
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > GRAMMAR_CACHE:
                self._grammars.popitem(last=False)
        return grammar

    def grammar_for(self, params: Any) -> Grammar | None:
        """The parsed grammar a :class:`SamplerParams` asks for, or None."""
        text = params.grammar_text
        return None if text is None else self.compile_grammar(text, params.grammar_triggers)

    def _special_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.token_to_piece(token_id, special=True).decode("utf-8", "replace")
