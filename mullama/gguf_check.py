"""Check a GGUF file in Python before llama.cpp parses it.

llama.cpp trusts much of what a GGUF file says: a failed ``GGML_ASSERT`` or an
uncaught C++ exception in its loader aborts the whole Python process. So
:func:`validate_gguf_file` walks the header (key/value metadata and tensor
table) itself and rejects anything inconsistent with a clear
:class:`~mullama.errors.ModelLoadError`. Only the header is read, never the
tensor data; every count and length read from the file is checked against the
bytes that remain before anything is allocated or skipped.

Limits follow the pinned ``ggml/src/gguf.cpp``, ``ggml/src/ggml.c`` (type
traits), ``src/llama-model.cpp`` (hyper-parameters) and ``src/llama-vocab.cpp``.
"""

from __future__ import annotations

import array
import math
import os
import re
import stat
import struct
import sys
from typing import Any, BinaryIO, NamedTuple

from mullama.errors import ModelLoadError, ModelNotFoundError

__all__ = ["validate_gguf_file"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20        # llama.cpp only needs a power of two; real files use 32
MAX_HEADER_BYTES = 1 << 30     # metadata + tensor table; real headers are a few MiB
MAX_KEY_BYTES = 65535          # GGUF spec: keys are at most 2^16-1 bytes
MAX_TENSOR_NAME = 63           # GGML_MAX_NAME (64) including the NUL
MAX_TOKEN_BYTES = 65535        # real tokens are short; bounds what the duplicate check holds
MAX_KEPT_STRING = 4096         # longer values (chat templates) are skipped, not read
MAX_DIMS = 4                   # GGML_MAX_DIMS
MAX_LAYERS = 512               # LLAMA_MAX_LAYERS: llama.cpp asserts block_count <= this
MAX_EXPERTS = 1024             # LLAMA_MAX_EXPERTS
MAX_KEPT_ARRAY = 1024          # numeric arrays up to this length (per-layer values) are read
TENSOR_ALIGNMENT = 32          # ggml's CPU buffers GGML_ASSERT this alignment of mmapped data
INT32_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
_CHUNK = 1 << 20

# GGUF value types: id -> (name, struct format); string (8) and array (9) are variable-sized.
_T_STRING, _T_ARRAY = 8, 9
_SCALARS = {0: ("u8", "<B"), 1: ("i8", "<b"), 2: ("u16", "<H"), 3: ("i16", "<h"), 4: ("u32", "<I"),
            5: ("i32", "<i"), 6: ("f32", "<f"), 7: ("bool", "<B"), 10: ("u64", "<Q"), 11: ("i64", "<q"),
            12: ("f64", "<d")}
_STRUCTS = {t: struct.Struct(fmt) for t, (_, fmt) in _SCALARS.items()}
_TYPE_NAMES = {**{t: name for t, (name, _) in _SCALARS.items()}, _T_STRING: "string", _T_ARRAY: "array"}
_INT_TYPES = frozenset((0, 1, 2, 3, 4, 5, 10, 11))
_U32, _U64, _I64, _MAGIC = (struct.Struct(f) for f in ("<I", "<Q", "<q", "4s"))

# ggml tensor types that can appear in a file: id -> (name, block size, bytes per block),
# from ggml.h and ggml.c's type_traits. Ids 4, 5, 31-33 and 36-38 were removed
# (block size 0 in ggml, which would divide by zero) and are absent on purpose.
_GGML_TYPES = {
    0: ("f32", 1, 4), 1: ("f16", 1, 2), 2: ("q4_0", 32, 18), 3: ("q4_1", 32, 20), 6: ("q5_0", 32, 22),
    7: ("q5_1", 32, 24), 8: ("q8_0", 32, 34), 9: ("q8_1", 32, 36), 10: ("q2_K", 256, 84),
    11: ("q3_K", 256, 110), 12: ("q4_K", 256, 144), 13: ("q5_K", 256, 176), 14: ("q6_K", 256, 210),
    15: ("q8_K", 256, 292), 16: ("iq2_xxs", 256, 66), 17: ("iq2_xs", 256, 74), 18: ("iq3_xxs", 256, 98),
    19: ("iq1_s", 256, 50), 20: ("iq4_nl", 32, 18), 21: ("iq3_s", 256, 110), 22: ("iq2_s", 256, 82),
    23: ("iq4_xs", 256, 136), 24: ("i8", 1, 1), 25: ("i16", 1, 2), 26: ("i32", 1, 4), 27: ("i64", 1, 8),
    28: ("f64", 1, 8), 29: ("iq1_m", 256, 56), 30: ("bf16", 1, 2), 34: ("tq1_0", 256, 54),
    35: ("tq2_0", 256, 66), 39: ("mxfp4", 32, 17), 40: ("nvfp4", 64, 36), 41: ("q1_0", 128, 18),
    42: ("q2_0", 64, 18),
}

# Types ggml uses only for intermediate results or integer data: as a weight, the CPU matrix
# product has no kernel for them (a segfault) and the binary ops abort.
_NOT_WEIGHT_TYPES = frozenset((9, 15, 24, 25, 26, 27, 28))  # q8_1, q8_K, i8, i16, i32, i64, f64

_ROPE_SCALING_TYPES = (b"none", b"linear", b"yarn", b"longrope")
_SPECIAL_ID = re.compile(r"tokenizer\.ggml\.\w+_token_id\Z")
# Tokenizer models that load but leave llama.cpp without a tokenizer: tokenizing then aborts.
_NO_TOKENIZER = (b"none", b"no_vocab")
# llama.cpp's defaults per tokenizer model: BOS, EOS and SEP ids (None: no such token) and
# whether it adds BOS / EOS (None: depends on the pre-tokenizer). It GGML_ASSERTs when it
# must add a special token that the vocabulary lacks, so the effective ids are checked.
_BPE = (11, 11, None, None, False)
_TOKENIZER_DEFAULTS = {
    b"llama": (1, 2, None, True, False), b"bert": (101, None, 102, True, False),
    b"gpt2": _BPE, b"hybriddna": _BPE, b"whitespace": _BPE, b"gemma4": (None, None, None, True, False),
    b"t5": (None, 1, None, False, True), b"rwkv": (None, None, None, False, False),
    b"plamo2": (1, 2, None, False, False), b"test": (None, None, None, False, False),
}
_TOKEN_TYPE_BYTE = 6
_LAYER = re.compile(r"blk\.(\d+)\.")


# Parsed header: key -> (value type, value); tensor name -> (shape, data offset, size in bytes).
_KV = dict[str, tuple[int, Any]]
_Tensors = dict[str, tuple[list[int], int, int]]


class _Bad(Exception):
    """Internal: what is wrong with the file (turned into ModelLoadError)."""


# values: the elements of short numeric arrays (per-layer hyper-parameters), else None
_Array = NamedTuple("_Array", [("etype", int), ("count", int), ("values", "tuple | None")])


class _Reader:
    """Sequential, buffered reader of the header; never reads past ``size``."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.size = fh, size
        self.buf, self.off, self.base = b"", 0, 0  # buf[off] is at file offset base + off
        self.vocab: set[bytes] = set()  # the texts of tokenizer.ggml.tokens

    @property
    def pos(self) -> int:  # file offset of the next byte
        return self.base + self.off

    def _fits(self, n: int, what: str) -> None:
        left = self.size - self.pos
        if n > left:
            raise _Bad(f"truncated: {what} needs {n} bytes at offset {self.pos}, but only {left} remain")
        if self.pos + n > MAX_HEADER_BYTES:
            raise _Bad(f"header is larger than {MAX_HEADER_BYTES >> 20} MiB ({what} at offset {self.pos})")

    def need(self, n: int, what: str) -> None:
        """Make ``n`` bytes available at ``buf[off:]``."""
        self._fits(n, what)
        if self.off + n > len(self.buf):
            rest = self.buf[self.off:]
            self.fh.seek(self.pos + len(rest))
            self.buf = rest + self.fh.read(max(n - len(rest), _CHUNK))
            self.base, self.off = self.pos, 0
            if len(self.buf) < n:
                raise _Bad("the file changed size while it was being checked")

    def skip(self, n: int, what: str) -> None:
        self._fits(n, what)
        if self.off + n <= len(self.buf):
            self.off += n
        else:  # drop the buffer; the next read seeks
            self.base, self.buf, self.off = self.pos + n, b"", 0

    def scalar(self, st: struct.Struct, what: str) -> Any:
        self.need(st.size, what)
        (value,) = st.unpack_from(self.buf, self.off)
        self.off += st.size
        return value

    def string(self, what: str, cap: int) -> bytes | None:
        """A string of at most ``cap`` bytes; longer ones are skipped (None) without being read."""
        n = self.scalar(_U64, f"length of {what}")
        if n > cap:
            self.skip(n, what)
            return None
        self.need(n, what)
        self.off += n
        return self.buf[self.off - n:self.off]

    def text(self, what: str, cap: int) -> str:
        data = self.string(what, cap)
        if data is None:
            raise _Bad(f"{what} is longer than {cap} bytes")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} {data[:80]!r} is not valid UTF-8") from None

    def strings(self, count: int, what: str, unique: bool) -> set[bytes]:
        """Skip ``count`` strings; with ``unique``, reject repeats as llama.cpp's vocabulary
        does (after it renames "" to "[EMPTY_<id>]") and return them as a set.
        Hot loop: 262k tokens in real models."""
        seen: set[bytes] = set()
        unpack, buf, off = _U64.unpack_from, self.buf, self.off
        end = len(buf)
        for i in range(count):
            if off + 8 > end:
                self.off = off
                self.need(8, f"length of {what}[{i}]")
                buf, off, end = self.buf, self.off, len(self.buf)
            n = unpack(buf, off)[0]
            off += 8
            if not unique:
                if off + n <= end:
                    off += n
                else:  # a long string past the buffer: skip it without reading it
                    self.off = off
                    self.skip(n, f"{what}[{i}]")
                    buf, off, end = self.buf, self.off, len(self.buf)
                continue
            if n > MAX_TOKEN_BYTES:
                raise _Bad(f"{what}[{i}] is {n} bytes long (at most {MAX_TOKEN_BYTES} allowed)")
            if off + n > end:
                self.off = off
                self.need(n, f"{what}[{i}]")
                buf, off, end = self.buf, self.off, len(self.buf)
            tok = buf[off:off + n] or b"[EMPTY_%d]" % i
            if tok in seen:
                raise _Bad(f"{what} has a duplicate token {tok[:80]!r} (id {i})")
            seen.add(tok)
            off += n
        self.off = off
        return seen


def validate_gguf_file(path: str) -> frozenset[str]:
    """Raise ModelLoadError unless ``path`` is a GGUF file that is safe to hand to llama.cpp;
    return the names of its tensors.

    Checks the header, every metadata entry, the tensor table (shapes, types, data
    ranges), the vocabulary and the hyper-parameters llama.cpp asserts on. Reads
    only the header (a few MiB at most), blocking the calling thread meanwhile.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ModelNotFoundError(f"model file {path!r} does not exist", path=path) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ModelLoadError(f"cannot open model file {path!r}: {reason}", path=path) from None
    # Opened non-blocking so that a FIFO cannot hang us; only regular files are read.
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ModelLoadError(f"model path {path!r} is not a regular file", path=path)
    with os.fdopen(fd, "rb") as fh:
        try:
            return _check(_Reader(fh, st.st_size))
        except _Bad as exc:
            raise ModelLoadError(f"invalid GGUF file {path!r}: {exc}", path=path) from None
        except OSError as exc:
            raise ModelLoadError(f"cannot read model file {path!r}: {exc.strerror or exc}", path=path) from None


def _check(r: _Reader) -> frozenset[str]:
    if r.size < 24:
        raise _Bad(f"file is only {r.size} bytes, too short for a GGUF header")
    magic = r.scalar(_MAGIC, "magic")
    if magic != GGUF_MAGIC:
        raise _Bad(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = r.scalar(_U32, "version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (big-endian file?)" if version and (version & 0xFFFF) == 0 else ""
        raise _Bad(f"unsupported GGUF version {version}{hint}; supported: 2, 3")
    n_tensors = r.scalar(_U64, "tensor count")
    n_kv = r.scalar(_U64, "metadata count")
    # Smallest possible entries: a KV is 8 (key length) + 1 + 4 (type) + 1 bytes; a tensor
    # info is 8 (name length) + 1 + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset).
    if n_kv * 14 + n_tensors * 33 > r.size - r.pos:
        raise _Bad(f"{n_tensors} tensors and {n_kv} metadata entries cannot fit in "
                   f"the {r.size}-byte file")
    kv = _read_metadata(r, n_kv)
    alignment = _alignment(kv)
    tensors = _read_tensor_infos(r, n_tensors, alignment)
    data_start = -(-r.pos // alignment) * alignment if n_tensors else r.pos
    if data_start > r.size:
        raise _Bad(f"data section would start at {data_start}, past the end of the {r.size}-byte file")
    if data_start > MAX_HEADER_BYTES:
        raise _Bad(f"header is larger than {MAX_HEADER_BYTES >> 20} MiB")
    _check_tensor_ranges(tensors, data_start, r.size)
    _check_vocab(kv, tensors, r.vocab)
    _check_hparams(kv, tensors)
    return frozenset(tensors)


def _new_name(r: _Reader, seen: dict, what: str, limit: int, if_empty: str, kind: str) -> str:
    """A non-empty name (metadata key or tensor name) not seen before."""
    name = r.text(what, limit)
    if not name:
        raise _Bad(if_empty)
    if name in seen:
        raise _Bad(f"duplicate {kind} {name!r}")
    return name


def _read_metadata(r: _Reader, n_kv: int) -> _KV:
    kv: _KV = {}
    for i in range(n_kv):
        key = _new_name(r, kv, f"key of metadata entry {i}", MAX_KEY_BYTES,
                        f"metadata entry {i} has an empty key", "metadata key")
        vtype = r.scalar(_U32, f"type of {key!r}")
        kv[key] = (vtype, _read_value(r, key, vtype))
    return kv


def _read_value(r: _Reader, key: str, vtype: int) -> Any:
    if vtype in _STRUCTS:
        return r.scalar(_STRUCTS[vtype], f"value of {key!r}")
    if vtype == _T_STRING:
        return r.string(f"value of {key!r}", MAX_KEPT_STRING)
    if vtype != _T_ARRAY:
        raise _Bad(f"metadata {key!r} has unknown value type {vtype}")
    etype = r.scalar(_U32, f"element type of {key!r}")
    count = r.scalar(_U64, f"element count of {key!r}")
    if etype == _T_ARRAY:  # llama.cpp rejects nested arrays; refusing them also bounds recursion
        raise _Bad(f"metadata {key!r} is an array of arrays, which llama.cpp does not support")
    left = r.size - r.pos
    values = None
    if etype in _STRUCTS:
        size = _STRUCTS[etype].size
        if count > left // size:
            raise _Bad(f"array {key!r} claims {count} elements of {size} bytes, "
                       f"more than the {left} bytes left in the file")
        if key == "tokenizer.ggml.token_type" and etype == 5:  # read whole: tokenizer checks need it
            r.need(count * 4, f"array {key!r}")
            values = array.array("i", r.buf[r.off:r.off + count * 4])
            if sys.byteorder == "big":
                values.byteswap()
            r.off += count * 4
        elif count <= MAX_KEPT_ARRAY:
            r.need(count * size, f"array {key!r}")
            values = struct.unpack_from(f"<{count}{_SCALARS[etype][1][1]}", r.buf, r.off)
            r.off += count * size
        else:
            r.skip(count * size, f"array {key!r}")
    elif etype == _T_STRING:
        if count > left // 8:  # each string needs at least its 8-byte length
            raise _Bad(f"array {key!r} claims {count} strings, more than the file can hold")
        # llama.cpp asserts (aborts) unless token texts are unique.
        if key == "tokenizer.ggml.tokens":
            r.vocab = r.strings(count, key, unique=True)
        else:
            r.strings(count, key, unique=False)
    else:
        raise _Bad(f"array {key!r} has unknown element type {etype}")
    return _Array(etype, count, values)


def _alignment(kv: _KV) -> int:
    if "general.alignment" not in kv:
        return DEFAULT_ALIGNMENT
    vtype, value = kv["general.alignment"]
    if vtype != 4:  # llama.cpp requires exactly u32
        raise _Bad(f"general.alignment must be a u32, not {_TYPE_NAMES[vtype]}")
    if value == 0 or value & (value - 1) or value > MAX_ALIGNMENT:
        raise _Bad(f"general.alignment {value} is not a power of two up to {MAX_ALIGNMENT}")
    return value


def _read_tensor_infos(r: _Reader, n_tensors: int, alignment: int) -> _Tensors:
    tensors: _Tensors = {}
    for i in range(n_tensors):
        name = _new_name(r, tensors, f"name of tensor {i}", MAX_TENSOR_NAME,
                         f"tensor {i} has an empty name", "tensor name")
        n_dims = r.scalar(_U32, f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape = [r.scalar(_I64, f"shape of tensor {name!r}") for _ in range(n_dims)]
        n_elements = 1
        for dim in shape:
            # ggml allows empty tensors, but no model weight is empty and llama.cpp's
            # shape checks assume every dimension is >= 1.
            if dim < 1:
                raise _Bad(f"tensor {name!r} has shape {shape}: dimensions must be >= 1")
            n_elements *= dim
        if n_elements > INT64_MAX:
            raise _Bad(f"tensor {name!r} with shape {shape} has more than 2^63-1 elements")
        gtype = r.scalar(_U32, f"type of tensor {name!r}")
        if gtype not in _GGML_TYPES:
            raise _Bad(f"tensor {name!r} has unknown or removed ggml type {gtype}")
        type_name, block, type_size = _GGML_TYPES[gtype]
        if gtype in _NOT_WEIGHT_TYPES:
            raise _Bad(f"tensor {name!r} has type {type_name}, which llama.cpp cannot compute with")
        if shape[0] % block:
            raise _Bad(f"tensor {name!r} of type {type_name} has rows of {shape[0]} elements, "
                       f"not a multiple of its block size {block}")
        offset = r.scalar(_U64, f"data offset of tensor {name!r}")
        if offset % alignment:
            raise _Bad(f"tensor {name!r} has data offset {offset}, not a multiple of the alignment {alignment}")
        tensors[name] = (shape, offset, n_elements // block * type_size)
    return tensors


def _check_tensor_ranges(tensors: _Tensors, data_start: int, size: int) -> None:
    # Sorted by offset, each tensor must end inside the file and before the next one starts.
    prev_end, prev_name = 0, ""
    for offset, nbytes, name in sorted((off, nb, name) for name, (_, off, nb) in tensors.items()):
        if (data_start + offset) % TENSOR_ALIGNMENT:
            # a general.alignment below 32 allows this, but mmapping it aborts in ggml
            raise _Bad(f"data of tensor {name!r} starts at file offset {data_start + offset}, "
                       f"not a multiple of {TENSOR_ALIGNMENT}")
        if data_start + offset + nbytes > size:
            raise _Bad(f"data of tensor {name!r} (bytes {data_start + offset} to {data_start + offset + nbytes}) "
                       f"runs past the end of the {size}-byte file")
        if offset < prev_end:
            raise _Bad(f"data of tensors {prev_name!r} and {name!r} overlap")
        prev_end, prev_name = offset + nbytes, name


def _check_vocab(kv: _KV, tensors: _Tensors, vocab: set[bytes]) -> None:
    """The vocabulary arrays, special-token ids and the embedding matrix agree on n_vocab."""
    n_vocab = None
    if "tokenizer.ggml.tokens" in kv:
        n_vocab = _array_len(kv, "tokenizer.ggml.tokens", (_T_STRING,))
        if n_vocab == 0:
            raise _Bad("tokenizer.ggml.tokens is empty")
        for key, etypes in (("tokenizer.ggml.scores", (6, 5)), ("tokenizer.ggml.token_type", (5,))):
            if key in kv and _array_len(kv, key, etypes) != n_vocab:
                raise _Bad(f"{key} has {kv[key][1].count} entries but the vocabulary has {n_vocab} tokens")
    for key in kv:
        if _SPECIAL_ID.match(key):
            tok = _uint(kv, key)
            if tok is None or (n_vocab is not None and tok >= n_vocab):
                raise _Bad(f"{key} = {kv[key][1]!r} is not a token id in [0, {n_vocab})")
    embd = tensors.get("token_embd.weight")
    if n_vocab is not None and embd is not None and (len(embd[0]) < 2 or embd[0][1] != n_vocab):
        raise _Bad(f"token_embd.weight has shape {embd[0]} but the vocabulary has {n_vocab} tokens")
    if n_vocab is not None:
        _check_tokenizer(kv, n_vocab, vocab)


def _check_tokenizer(kv: _KV, n_vocab: int, vocab: set[bytes]) -> None:
    """What llama.cpp's tokenizer asserts on (or throws through its C API) at run time."""
    model = kv.get("tokenizer.ggml.model", (None, None))[1]
    if model in _NO_TOKENIZER:
        raise _Bad("tokenizer.ggml.model says the model has no tokenizer; mullama needs one")
    if model == b"llama":
        # SentencePiece falls back to byte tokens for unknown text; llama.cpp looks them up
        # with unordered_map::at, and a missing one ends the process (std::out_of_range).
        missing = [b for b in range(256) if b"<0x%02X>" % b not in vocab and bytes((b,)) not in vocab]
        if missing:
            raise _Bad(f"the SentencePiece vocabulary has no byte token for {len(missing)} byte(s), "
                       f"e.g. <0x{missing[0]:02X}>")
    types = kv.get("tokenizer.ggml.token_type", (None, None))[1]
    if model == b"bert" and types is not None and _TOKEN_TYPE_BYTE in (types.values or ()):
        raise _Bad("a WordPiece (bert) vocabulary has byte tokens, which llama.cpp aborts on")
    if model not in _TOKENIZER_DEFAULTS:
        return  # llama.cpp rejects unknown tokenizers itself
    *ids, add_bos, add_eos = _TOKENIZER_DEFAULTS[model]
    bos, eos, sep = (
        _uint(kv, f"tokenizer.ggml.{name}_token_id") if f"tokenizer.ggml.{name}_token_id" in kv
        else (default if default is not None and default < n_vocab else None)  # llama.cpp drops those
        for name, default in zip(("bos", "eos", "seperator"), ids))
    for key, default in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
        vtype, value = kv.get("tokenizer.ggml." + key, (7, default))
        if vtype == 7 and value is not None and key == "add_bos_token":
            add_bos = bool(value) or model == b"gemma4"  # llama.cpp forces BOS for gemma4
        elif vtype == 7 and value is not None:
            add_eos = bool(value)
    if bos is None and add_bos is not False:
        raise _Bad("the tokenizer adds a BOS token but the vocabulary has none (tokenizer.ggml.bos_token_id)")
    if eos is None and add_eos:
        raise _Bad("the tokenizer adds an EOS token but the vocabulary has none (tokenizer.ggml.eos_token_id)")
    if model == b"bert" and sep is None:
        raise _Bad("a WordPiece (bert) tokenizer needs a separator token (tokenizer.ggml.seperator_token_id)")


def _check_hparams(kv: _KV, tensors: _Tensors) -> None:
    """The hyper-parameters that llama.cpp GGML_ASSERTs on or divides by."""
    if "general.architecture" not in kv:
        return  # llama.cpp reports the missing architecture itself
    vtype, arch = kv["general.architecture"]
    if vtype != _T_STRING or not arch:
        raise _Bad("general.architecture must be a short non-empty string")
    a = arch.decode("utf-8", "replace") + "."

    n_layer = _uint(kv, a + "block_count")
    if n_layer is not None and not 1 <= n_layer <= MAX_LAYERS:
        raise _Bad(f"{a}block_count is {n_layer} (1 to {MAX_LAYERS} allowed)")
    layers = {int(m.group(1)) for m in map(_LAYER.match, tensors) if m}
    if n_layer is not None and tensors:
        if layers and max(layers) >= n_layer:
            raise _Bad(f"tensors of layer blk.{max(layers)} exist but {a}block_count is {n_layer}")
        missing = sorted(set(range(n_layer)) - layers)
        if missing:
            raise _Bad(f"{a}block_count is {n_layer} but layer(s) {missing[:8]} have no tensors")
    nextn = _uint(kv, a + "nextn_predict_layers")
    if nextn and (n_layer is None or nextn > n_layer):
        raise _Bad(f"{a}nextn_predict_layers {nextn} exceeds the block count {n_layer}")

    for key in ("context_length", "embedding_length"):
        value = _uint(kv, a + key)
        if value == 0 or (value or 0) > INT32_MAX:  # llama.cpp returns them as int32
            raise _Bad(f"{a}{key} is {value} (1 to 2^31-1 allowed)")
    _check_floats(kv, a)
    n_embd, n_head = _uint(kv, a + "embedding_length"), _uint(kv, a + "attention.head_count")
    if n_head and n_embd and a + "attention.key_length" not in kv and n_embd % n_head:
        raise _Bad(f"{a}embedding_length {n_embd} is not divisible by attention.head_count {n_head}")
    _check_heads(kv, a, tensors, n_layer)

    # Mirrors llama.cpp's GGML_ASSERTs on the expert (mixture-of-experts) counts.
    n_expert, n_used = _uint(kv, a + "expert_count") or 0, _uint(kv, a + "expert_used_count")
    groups, groups_used = _uint(kv, a + "expert_group_count") or 0, _uint(kv, a + "expert_group_used_count") or 0
    if n_expert > MAX_EXPERTS:
        raise _Bad(f"{a}expert_count {n_expert} exceeds {MAX_EXPERTS}")
    if n_expert == 0 and (n_used or groups):
        raise _Bad(f"{a}expert_used_count / expert_group_count set without experts")
    if n_expert and ((n_used is None and a + "expert_used_count" not in kv) or n_used == 0
                     or (n_used or 0) > n_expert):
        raise _Bad(f"{a}expert_used_count must be in [1, {n_expert}]")
    if n_expert and (groups >= n_expert or groups > 1 and (n_expert % groups or not 0 < groups_used < groups)):
        raise _Bad(f"{a}expert_group_count {groups} / expert_group_used_count {groups_used} "
                   f"do not fit {n_expert} experts")

    scaling = kv.get(a + "rope.scaling.type", (_T_STRING, b"linear"))[1]
    if scaling not in _ROPE_SCALING_TYPES:  # also rejects non-strings
        raise _Bad(f"{a}rope.scaling.type {scaling!r} is not one of none, linear, yarn, longrope")


def _check_floats(kv: _KV, a: str) -> None:
    """Float hyper-parameters are finite; epsilons are >= 0 (ggml's norm kernels assert it)."""
    for key, (vtype, value) in kv.items():
        if not key.startswith(a):
            continue
        if vtype == _T_ARRAY:
            if value.etype not in (6, 12) or value.values is None:
                continue
            values = value.values
        elif vtype in (6, 12):
            values = (value,)
        else:
            continue
        for v in values:
            if not math.isfinite(v) or (v < 0 and key.endswith("epsilon")):
                raise _Bad(f"{key} is {v}, not a finite{' non-negative' * key.endswith('epsilon')} number")


def _check_heads(kv: _KV, a: str, tensors: _Tensors, n_layer: int | None) -> None:
    """Layers with attention tensors need heads, and their query heads must be a multiple of
    their KV heads (ggml's matrix product asserts that it can broadcast them). Layers without
    attention (the recurrent layers of hybrid models) may have 0 heads."""
    heads = _per_layer(kv, a + "attention.head_count", n_layer)
    kv_heads = _per_layer(kv, a + "attention.head_count_kv", n_layer) or heads
    if not heads:
        return
    attn_layers = {int(m.group(1)) for m in map(_LAYER.match, tensors)
                   if m and any(p in m.string for p in (".attn_q.", ".attn_k.", ".attn_qkv."))}
    per_layer = max(len(heads), len(kv_heads)) > 1
    for i in range(max(len(heads), len(kv_heads))):
        if not (i in attn_layers if per_layer else attn_layers):
            continue
        h, k = heads[min(i, len(heads) - 1)], kv_heads[min(i, len(kv_heads) - 1)]
        where = f" for layer {i}" if per_layer else ""
        if h == 0:  # 0 is how recurrent models say "no attention"; with attention tensors it is wrong
            raise _Bad(f"{a}attention.head_count is 0{where}, but there are attention tensors")
        if k == 0:
            raise _Bad(f"{a}attention.head_count_kv is 0{where}, but there are attention tensors")
        if h % k:
            raise _Bad(f"{a}attention.head_count {h} is not a multiple of head_count_kv {k}{where}")


def _per_layer(kv: _KV, key: str, n_layer: int | None) -> list[int]:
    """A scalar as a one-element list, a per-layer array as its values; [] when absent or
    when llama.cpp will reject the array's length itself."""
    if key not in kv:
        return []
    vtype, value = kv[key]
    if vtype != _T_ARRAY:
        scalar = _uint(kv, key)
        return [] if scalar is None else [scalar]
    if value.etype not in _INT_TYPES or value.values is None or value.count != n_layer:
        return []
    if any(v < 0 for v in value.values):
        raise _Bad(f"{key} has a negative entry")
    return list(value.values)


def _array_len(kv: _KV, key: str, etypes: tuple[int, ...]) -> int:
    vtype, value = kv[key]
    if vtype != _T_ARRAY or value.etype not in etypes:
        raise _Bad(f"{key} must be an array of {' or '.join(_TYPE_NAMES[t] for t in etypes)}")
    return value.count


def _uint(kv: _KV, key: str) -> int | None:
    """Integer scalar ``key``; None when absent or a per-layer array (llama.cpp checks those)."""
    if key not in kv:
        return None
    vtype, value = kv[key]
    if vtype == _T_ARRAY:
        return None
    if vtype not in _INT_TYPES:
        raise _Bad(f"{key} must be an integer, not {_TYPE_NAMES[vtype]}")
    if value < 0:
        raise _Bad(f"{key} is negative ({value})")
    return value
