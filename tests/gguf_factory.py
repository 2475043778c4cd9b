"""Test helpers: write tiny GGUF models with ``gguf.GGUFWriter`` and locate the bytes to patch.

``tiny_model_bytes()`` builds a complete (if untrained) llama-architecture model:
2 layers, n_embd 64, 4 heads (2 KV heads), an SPM ("llama") vocabulary of 300
tokens with scores and token types, f32 tensors; about 400 KB. Keyword
arguments change the metadata or tensors so that tests can build files that
are malformed in one precise way. ``layout()`` walks a GGUF file that is known
to be well formed and returns the byte offsets of its fields, so that tests can
patch them; it is independent of ``mullama.gguf_check`` on purpose.
"""

from __future__ import annotations

import logging
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import gguf
from gguf import GGUFValueType as VT

N_VOCAB = 300
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_LAYER = 2

_REMOVE = object()


def vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, 256 byte tokens, then plain pieces: an SPM vocabulary llama.cpp can use."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # unknown, control, control, byte
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["\u2581"] + [f"\u2581{c}" for c in letters] + list(letters)
    i = 0
    while len(tokens) < n_vocab:
        tokens.append(words[i] if i < len(words) else f"\u2581w{i}")
        types.append(1)
        i += 1
    tokens, types = tokens[:n_vocab], types[:n_vocab]
    scores = [0.0] * 259 + [-float(j) for j in range(len(tokens) - 259)]
    return tokens, scores[:n_vocab], types


def tiny_model_bytes(
    kv: dict[str, Any] | None = None,
    *,
    tokens: list[str] | None = None,
    scores: list[float] | None = None,
    token_types: list[int] | None = None,
    n_layer_tensors: int = N_LAYER,
    embd_rows: int | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> bytes:
    """Bytes of a tiny model.

    ``kv`` overrides metadata: ``key: (value, GGUFValueType)`` sets a key,
    ``key: None`` removes it. ``tokens`` / ``scores`` / ``token_types`` replace
    the vocabulary arrays; ``n_layer_tensors`` is how many ``blk.N`` layers get
    tensors; ``embd_rows`` is the vocabulary dimension of ``token_embd.weight``;
    ``extra_tensors`` are added after the others.
    """
    logging.getLogger("gguf").setLevel(logging.ERROR)  # quiet "duplicated key" notices
    d_tokens, d_scores, d_types = vocab(N_VOCAB)
    tokens = d_tokens if tokens is None else tokens
    scores = d_scores if scores is None else scores
    token_types = d_types if token_types is None else token_types
    meta: dict[str, tuple[Any, VT]] = {
        "general.name": ("tiny-test", VT.STRING),
        "llama.context_length": (256, VT.UINT32),
        "llama.embedding_length": (N_EMBD, VT.UINT32),
        "llama.block_count": (N_LAYER, VT.UINT32),
        "llama.feed_forward_length": (N_FF, VT.UINT32),
        "llama.attention.head_count": (N_HEAD, VT.UINT32),
        "llama.attention.head_count_kv": (N_HEAD_KV, VT.UINT32),
        "llama.rope.dimension_count": (N_EMBD // N_HEAD, VT.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32),
        "llama.vocab_size": (N_VOCAB, VT.UINT32),
        "tokenizer.ggml.model": ("llama", VT.STRING),
        "tokenizer.ggml.tokens": (tokens, VT.ARRAY),
        "tokenizer.ggml.scores": (scores, VT.ARRAY),
        "tokenizer.ggml.token_type": (token_types, VT.ARRAY),
        "tokenizer.ggml.unknown_token_id": (0, VT.UINT32),
        "tokenizer.ggml.bos_token_id": (1, VT.UINT32),
        "tokenizer.ggml.eos_token_id": (2, VT.UINT32),
        "tokenizer.ggml.add_bos_token": (True, VT.BOOL),
        "tokenizer.ggml.add_eos_token": (False, VT.BOOL),
    }
    for key, value in (kv or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value

    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    head_dim = N_EMBD // N_HEAD
    tensors: dict[str, np.ndarray] = {
        # numpy shapes are (rows, columns); GGUF stores them reversed (ne0 = columns).
        "token_embd.weight": weight(N_VOCAB if embd_rows is None else embd_rows, N_EMBD),
        "output_norm.weight": np.ones(N_EMBD, dtype=np.float32),
    }
    for i in range(n_layer_tensors):
        tensors.update({
            f"blk.{i}.attn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            f"blk.{i}.attn_q.weight": weight(N_HEAD * head_dim, N_EMBD),
            f"blk.{i}.attn_k.weight": weight(N_HEAD_KV * head_dim, N_EMBD),
            f"blk.{i}.attn_v.weight": weight(N_HEAD_KV * head_dim, N_EMBD),
            f"blk.{i}.attn_output.weight": weight(N_EMBD, N_HEAD * head_dim),
            f"blk.{i}.ffn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            f"blk.{i}.ffn_gate.weight": weight(N_FF, N_EMBD),
            f"blk.{i}.ffn_up.weight": weight(N_FF, N_EMBD),
            f"blk.{i}.ffn_down.weight": weight(N_EMBD, N_FF),
        })
    tensors.update(extra_tensors or {})

    align = meta.get("general.alignment", (0, None))
    # lay the data out as the key says (absurd values: not)
    ok = align[1] == VT.UINT32 and 0 < align[0] <= 4096 and align[0] & (align[0] - 1) == 0
    return _write_gguf("llama", meta, tensors, align[0] if ok else None)


def _write_gguf(arch: str, meta: dict[str, tuple[Any, VT]], tensors: dict[str, np.ndarray],
                alignment: int | None = None) -> bytes:
    """The bytes of a GGUF file with these keys and tensors."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.gguf"
        writer = gguf.GGUFWriter(str(out), arch)
        for key, (value, vtype) in meta.items():
            writer.add_key_value(key, value, vtype)
        if alignment is not None:
            writer.data_alignment = alignment
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return out.read_bytes()


# ---------------------------------------------------------------- layout of a well-formed file

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class KV:
    key_off: int          # offset of the key's u64 length
    type_off: int         # offset of the u32 value type
    value_off: int        # offset of the value (for arrays: of the element type)
    vtype: int
    count: int = 1        # arrays: number of elements


@dataclass
class TensorInfo:
    name: str
    name_off: int         # offset of the name's u64 length
    ndims_off: int
    dims_off: int
    type_off: int
    offset_off: int
    dims: list[int]
    offset: int           # relative to the data section


@dataclass
class Layout:
    n_tensors: int
    n_kv: int
    kv: dict[str, KV] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    kv_end: int = 0       # where the tensor infos start
    infos_end: int = 0    # where the tensor infos end
    data_start: int = 0


def layout(data: bytes, alignment: int = 32) -> Layout:
    """Offsets of every field of a well-formed GGUF file given as ``data`` (the header suffices)."""
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    lay = Layout(n_tensors, n_kv)

    def u(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> bytes:
        nonlocal pos
        n = u("<Q")
        pos += n
        return data[pos - n:pos]

    for _ in range(n_kv):
        key_off = pos
        key = string().decode()
        type_off = pos
        vtype = u("<I")
        entry = KV(key_off, type_off, pos, vtype)
        if vtype == 9:
            etype, entry.count = u("<I"), u("<Q")
            for _ in range(entry.count):
                if etype == 8:
                    string()
                else:
                    pos += _SIZES[etype]
        elif vtype == 8:
            string()
        else:
            pos += _SIZES[vtype]
        lay.kv[key] = entry
    lay.kv_end = pos
    for _ in range(n_tensors):
        name_off = pos
        name = string().decode()
        ndims_off = pos
        ndims = u("<I")
        dims_off = pos
        dims = [u("<q") for _ in range(ndims)]
        type_off = pos
        u("<I")
        offset_off = pos
        lay.tensors.append(TensorInfo(name, name_off, ndims_off, dims_off, type_off, offset_off, dims, u("<Q")))
    lay.infos_end = pos
    lay.data_start = -(-pos // alignment) * alignment
    return lay


def patch(data: bytes, offset: int, fmt: str, value: Any) -> bytes:
    """``data`` with ``struct.pack(fmt, value)`` written at ``offset``."""
    raw = struct.pack(fmt, value)
    return data[:offset] + raw + data[offset + len(raw):]


# ---------------------------------------------------------------- a tiny BERT reranker

RERANK_WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "in", "park", "sun", "is", "hot", "cold",
                "sea", "ship", "lighthouse", "keeper", "wrote", "log", "wind", "what", "where", "who"]


def reranker_vocab() -> list[str]:
    """A WordPiece vocabulary as llama.cpp reads it: specials, whole words with the phantom-space
    prefix, and single letters (continuation pieces) so that any lowercase word tokenizes."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"\u2581{w}" for w in RERANK_WORDS]
            + [f"\u2581{c}" for c in letters] + list(letters) + ["\u2581.", "\u2581?", "\u2581,"])


def reranker_tensors(head: bool = True, n_labels: int = 1) -> dict[str, np.ndarray]:
    """The weights of a 2-layer BERT (n_embd 64, 4 heads, GELU FFN 128) with, when ``head``, a
    sequence-classification head: ``cls`` (dense + tanh) then ``cls.output`` (n_labels outputs).
    Deterministic, so tests can recompute the model's outputs from them."""
    rng = np.random.default_rng(7)
    n_vocab = len(reranker_vocab())

    def w(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + rng.standard_normal(N_EMBD) * 0.1).astype(np.float32)

    t: dict[str, np.ndarray] = {
        "token_embd.weight": w(n_vocab, N_EMBD, scale=1.0),
        "token_types.weight": w(2, N_EMBD),
        "position_embd.weight": w(RERANK_CTX, N_EMBD),
        "token_embd_norm.weight": norm(), "token_embd_norm.bias": w(N_EMBD, scale=0.05),
    }
    for i in range(N_LAYER):
        p = f"blk.{i}."
        t.update({
            p + "attn_q.weight": w(N_EMBD, N_EMBD), p + "attn_q.bias": w(N_EMBD, scale=0.05),
            p + "attn_k.weight": w(N_EMBD, N_EMBD), p + "attn_k.bias": w(N_EMBD, scale=0.05),
            p + "attn_v.weight": w(N_EMBD, N_EMBD), p + "attn_v.bias": w(N_EMBD, scale=0.05),
            p + "attn_output.weight": w(N_EMBD, N_EMBD), p + "attn_output.bias": w(N_EMBD, scale=0.05),
            p + "attn_output_norm.weight": norm(), p + "attn_output_norm.bias": w(N_EMBD, scale=0.05),
            p + "ffn_up.weight": w(N_FF, N_EMBD), p + "ffn_up.bias": w(N_FF, scale=0.05),
            p + "ffn_down.weight": w(N_EMBD, N_FF), p + "ffn_down.bias": w(N_EMBD, scale=0.05),
            p + "layer_output_norm.weight": norm(), p + "layer_output_norm.bias": w(N_EMBD, scale=0.05),
        })
    if head:
        t.update({"cls.weight": w(N_EMBD, N_EMBD), "cls.bias": w(N_EMBD, scale=0.05),
                  "cls.output.weight": w(n_labels, N_EMBD, scale=1.0), "cls.output.bias": w(n_labels, scale=0.1)})
    return t


RERANK_CTX = 128


def tiny_reranker_bytes(head: bool = True, n_labels: int = 1) -> bytes:
    """Bytes of a tiny BERT cross-encoder (``reranker_tensors``) with a WordPiece vocabulary;
    with ``head`` it carries a classifier head and RANK pooling, as converted rerankers do."""
    logging.getLogger("gguf").setLevel(logging.ERROR)
    tokens = reranker_vocab()
    a = "bert."
    meta: dict[str, tuple[Any, VT]] = {
        "general.name": ("tiny-reranker" if head else "tiny-bert", VT.STRING),
        a + "context_length": (RERANK_CTX, VT.UINT32),
        a + "embedding_length": (N_EMBD, VT.UINT32),
        a + "block_count": (N_LAYER, VT.UINT32),
        a + "feed_forward_length": (N_FF, VT.UINT32),
        a + "attention.head_count": (N_HEAD, VT.UINT32),
        a + "attention.layer_norm_epsilon": (1e-12, VT.FLOAT32),
        a + "attention.causal": (False, VT.BOOL),
        a + "pooling_type": (4 if head else 2, VT.UINT32),  # RANK, or CLS for a plain encoder
        "tokenizer.ggml.model": ("bert", VT.STRING),
        "tokenizer.ggml.tokens": (tokens, VT.ARRAY),
        "tokenizer.ggml.token_type": ([3, 2, 3, 3, 3] + [1] * (len(tokens) - 5), VT.ARRAY),
        "tokenizer.ggml.token_type_count": (2, VT.UINT32),
        "tokenizer.ggml.padding_token_id": (0, VT.UINT32),
        "tokenizer.ggml.unknown_token_id": (1, VT.UINT32),
        "tokenizer.ggml.bos_token_id": (2, VT.UINT32),
        "tokenizer.ggml.seperator_token_id": (3, VT.UINT32),
        "tokenizer.ggml.eos_token_id": (3, VT.UINT32),
        "tokenizer.ggml.mask_token_id": (4, VT.UINT32),
    }
    if head and n_labels > 1:
        meta[a + "classifier.output_labels"] = ([f"label{i}" for i in range(n_labels)], VT.ARRAY)
    return _write_gguf("bert", meta, reranker_tensors(head, n_labels))
