"""Group A of the test catalogue: untrusted GGUF files.

Every malformed file must make ``Model.load`` raise ``ModelLoadError`` (a missing
file: ``ModelNotFoundError``, which is also a ``FileNotFoundError``) whose
message names the path and the defect, within 2 seconds, with the process alive.
The Python validator rejects all of them before llama.cpp sees them, so the
cases run in-process; one subprocess test loads the whole batch again under an
address-space limit and checks that nothing aborted, and another hands the
valid tiny model to llama.cpp itself.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from gguf import GGUFValueType as VT

import gguf_factory as gf
import mullama
from mullama.gguf_check import validate_gguf_file

CRASH_MARKERS = ("GGML_ASSERT", "terminate called", "Segmentation", "Aborted", "core dumped")
TIME_LIMIT_S = 2.0
REPO_ROOT = Path(mullama.__file__).resolve().parent.parent


@functools.cache
def tiny() -> bytes:
    return gf.tiny_model_bytes()


@functools.cache
def tiny_layout() -> gf.Layout:
    return gf.layout(tiny())


def kv(key: str) -> gf.KV:
    return tiny_layout().kv[key]


def tensor(i: int) -> gf.TensorInfo:
    return tiny_layout().tensors[i]


def at(offset: int, fmt: str, value: object) -> Callable[[], bytes]:
    """Builder: the valid tiny model with the header field at ``offset`` overwritten."""
    return lambda: gf.patch(tiny(), offset, fmt, value)


def model(**options: object) -> Callable[[], bytes]:
    """Builder: a tiny model written with different metadata or tensors."""
    return lambda: gf.tiny_model_bytes(**options)


def rename_key(old: bytes, new: bytes) -> Callable[[], bytes]:
    assert len(old) == len(new)
    return lambda: tiny().replace(old, new, 1)


def duplicate_token() -> bytes:
    tokens = gf.vocab(gf.N_VOCAB)[0]
    tokens[-1] = tokens[-2]  # llama.cpp itself would GGML_ASSERT on this
    return gf.tiny_model_bytes(tokens=tokens)


def merge_length_past_eof() -> bytes:
    data = gf.tiny_model_bytes(kv={"tokenizer.ggml.merges": (["a b", "c d"], VT.ARRAY)})
    return gf.patch(data, gf.layout(data).kv["tokenizer.ggml.merges"].value_off + 12, "<Q", 2**40)


# id -> (builder of the file's bytes, a fragment the error message must contain)
CASES: dict[str, tuple[Callable[[], bytes], str | tuple[str, ...]]] = {
    # basic
    "empty": (lambda: b"", "too short"),
    "3-bytes": (lambda: b"GGU", "too short"),
    "24-zero-bytes": (lambda: bytes(24), "not a GGUF file"),
    "bad-magic": (lambda: b"GGML" + tiny()[4:], "not a GGUF file"),
    "version-0": (at(4, "<I", 0), "unsupported GGUF version 0"),
    "version-1": (at(4, "<I", 1), "unsupported GGUF version 1"),
    "version-99": (at(4, "<I", 99), "unsupported GGUF version 99"),
    "version-big-endian": (at(4, "<I", 3 << 24), "big-endian"),
    # counts and lengths
    "n-tensors-2^64-1": (at(8, "<Q", 2**64 - 1), "cannot fit"),
    "n-kv-2^64-1": (at(16, "<Q", 2**64 - 1), "cannot fit"),
    "n-kv-one-too-many": (lambda: gf.patch(tiny(), 16, "<Q", tiny_layout().n_kv + 1), "name of tensor 0"),
    "key-length-past-eof": (lambda: gf.patch(tiny(), kv("general.architecture").key_off, "<Q", 2**40),
                            "key of metadata entry 0"),
    "key-length-2^64-1": (lambda: gf.patch(tiny(), kv("general.name").key_off, "<Q", 2**64 - 1),
                          "key of metadata entry 1"),
    "key-empty": (lambda: gf.patch(tiny(), kv("general.name").key_off, "<Q", 0), "empty key"),
    "key-not-utf8": (lambda: gf.patch(tiny(), kv("general.name").key_off + 8, "<B", 0xFF), "not valid UTF-8"),
    "string-length-past-eof": (lambda: gf.patch(tiny(), kv("general.name").value_off, "<Q", len(tiny())),
                               "truncated: value of 'general.name'"),
    "string-length-2^64-1": (lambda: gf.patch(tiny(), kv("tokenizer.ggml.model").value_off, "<Q", 2**64 - 1),
                             "truncated"),
    "array-count-2^62": (lambda: gf.patch(tiny(), kv("tokenizer.ggml.tokens").value_off + 4, "<Q", 2**62),
                         "claims"),
    "float-array-count-2^62": (lambda: gf.patch(tiny(), kv("tokenizer.ggml.scores").value_off + 4, "<Q", 2**62),
                               "claims"),
    "token-length-2^40": (lambda: gf.patch(tiny(), kv("tokenizer.ggml.tokens").value_off + 12, "<Q", 2**40),
                          "tokenizer.ggml.tokens[0] is 1099511627776 bytes long"),
    "merge-length-past-eof": (merge_length_past_eof, "truncated: tokenizer.ggml.merges[0]"),
    "nested-array": (lambda: gf.patch(tiny(), kv("tokenizer.ggml.tokens").value_off, "<I", 9), "array of arrays"),
    "unknown-value-type": (lambda: gf.patch(tiny(), kv("general.name").type_off, "<I", 13), "unknown value type 13"),
    "unknown-value-type-2^32-1": (lambda: gf.patch(tiny(), kv("llama.block_count").type_off, "<I", 2**32 - 1),
                                  "unknown value type"),
    "unknown-array-element-type": (lambda: gf.patch(tiny(), kv("tokenizer.ggml.scores").value_off, "<I", 99),
                                   "unknown element type 99"),
    "duplicate-key": (rename_key(b"tokenizer.ggml.eos_token_id", b"tokenizer.ggml.bos_token_id"),
                      "duplicate metadata key"),
    # alignment
    "alignment-0": (model(kv={"general.alignment": (0, VT.UINT32)}), "general.alignment 0"),
    "alignment-13": (model(kv={"general.alignment": (13, VT.UINT32)}), "general.alignment 13"),
    "alignment-2^30": (model(kv={"general.alignment": (2**30, VT.UINT32)}), "general.alignment"),
    "alignment-int32": (model(kv={"general.alignment": (32, VT.INT32)}), "must be a u32"),
    # tensor infos
    "n-dims-5": (lambda: gf.patch(tiny(), tensor(0).ndims_off, "<I", 5), "5 dimensions"),
    "n-dims-0": (lambda: gf.patch(tiny(), tensor(0).ndims_off, "<I", 0), "0 dimensions"),
    "dim-2^42+1": (lambda: gf.patch(tiny(), tensor(-1).dims_off, "<q", 2**42 + 1), "past the end"),
    "dim-zero": (lambda: gf.patch(tiny(), tensor(1).dims_off, "<q", 0), "dimensions must be >= 1"),
    "dim-negative": (lambda: gf.patch(tiny(), tensor(1).dims_off, "<q", -1), "dimensions must be >= 1"),
    "dims-product-overflow": (lambda: gf.patch(gf.patch(tiny(), tensor(0).dims_off, "<q", 2**62),
                                               tensor(0).dims_off + 8, "<q", 2**62), "2^63-1"),
    "unknown-ggml-type": (lambda: gf.patch(tiny(), tensor(0).type_off, "<I", 1000), "ggml type 1000"),
    "removed-ggml-type-q4_2": (lambda: gf.patch(tiny(), tensor(0).type_off, "<I", 4), "ggml type 4"),
    "removed-ggml-type-q4_0_4_4": (lambda: gf.patch(tiny(), tensor(0).type_off, "<I", 31), "ggml type 31"),
    "row-not-multiple-of-block": (lambda: gf.patch(tiny(), tensor(1).type_off, "<I", 12), "block size 256"),
    "tensor-too-small-for-type": (lambda: gf.patch(tiny(), tensor(-1).type_off, "<I", 28),
                                  ("past the end", "cannot compute with")),
    "tensor-offset-past-eof": (lambda: gf.patch(tiny(), tensor(-1).offset_off, "<Q", 2**40), "past the end"),
    "tensor-offset-2^64-32": (lambda: gf.patch(tiny(), tensor(3).offset_off, "<Q", 2**64 - 32), "past the end"),
    "overlapping-tensors": (lambda: gf.patch(tiny(), tensor(2).offset_off, "<Q", tensor(1).offset), "overlap"),
    "misaligned-offset": (lambda: gf.patch(tiny(), tensor(2).offset_off, "<Q", tensor(2).offset + 4),
                          "not a multiple of the alignment"),
    "duplicate-tensor-name": (rename_key(b"blk.1.ffn_up.weight", b"blk.0.ffn_up.weight"), "duplicate tensor name"),
    "tensor-name-too-long": (model(extra_tensors={"x" * 70: np.zeros(32, np.float32)}), "longer than 63 bytes"),
    # vocabulary
    "bos-negative": (model(kv={"tokenizer.ggml.bos_token_id": (-1, VT.INT32)}), "bos_token_id is negative"),
    "bos-n_vocab": (model(kv={"tokenizer.ggml.bos_token_id": (gf.N_VOCAB, VT.UINT32)}), "bos_token_id = 300"),
    "eos-2^32-1": (model(kv={"tokenizer.ggml.eos_token_id": (2**32 - 1, VT.UINT32)}), "eos_token_id"),
    "padding-n_vocab": (model(kv={"tokenizer.ggml.padding_token_id": (gf.N_VOCAB, VT.UINT32)}),
                        "padding_token_id = 300"),
    "eot-n_vocab": (model(kv={"tokenizer.ggml.eot_token_id": (gf.N_VOCAB, VT.UINT32)}), "eot_token_id"),
    "unknown-token-id-string": (model(kv={"tokenizer.ggml.unknown_token_id": ("0", VT.STRING)}),
                                "unknown_token_id must be an integer"),
    "scores-shorter": (model(scores=[0.0] * (gf.N_VOCAB - 1)), "tokenizer.ggml.scores has 299 entries"),
    "token-type-longer": (model(token_types=[1] * (gf.N_VOCAB + 1)), "tokenizer.ggml.token_type has 301 entries"),
    "token-type-float": (model(token_types=[1.0] * gf.N_VOCAB), "token_type must be an array of i32"),
    "tokens-not-strings": (model(kv={"tokenizer.ggml.tokens": ([1, 2, 3], VT.ARRAY)}),
                           "tokens must be an array of string"),
    "duplicate-token": (duplicate_token, "duplicate token"),
    "token-embd-rows": (model(embd_rows=gf.N_VOCAB - 1), "token_embd.weight has shape [64, 299]"),
    # hyper-parameters
    "block-count-0": (model(kv={"llama.block_count": (0, VT.UINT32)}), "block_count is 0"),
    "block-count-smaller": (model(kv={"llama.block_count": (1, VT.UINT32)}), "blk.1 exist"),
    "block-count-larger": (model(kv={"llama.block_count": (3, VT.UINT32)}), "layer(s) [2] have no tensors"),
    "block-count-513": (model(kv={"llama.block_count": (513, VT.UINT32)}), "block_count is 513"),
    "block-count-string": (model(kv={"llama.block_count": ("2", VT.STRING)}), "block_count must be an integer"),
    "context-length-0": (model(kv={"llama.context_length": (0, VT.UINT32)}), "context_length is 0"),
    "embedding-length-0": (model(kv={"llama.embedding_length": (0, VT.UINT32)}), "embedding_length is 0"),
    "head-count-0": (model(kv={"llama.attention.head_count": (0, VT.UINT32)}), "head_count is 0"),
    "head-count-kv-0": (model(kv={"llama.attention.head_count_kv": (0, VT.UINT32)}), "head_count_kv is 0"),
    "head-count-not-dividing": (model(kv={"llama.attention.head_count": (5, VT.UINT32)}), "not divisible"),
    "experts-without-used-count": (model(kv={"llama.expert_count": (4, VT.UINT32)}), "expert_used_count"),
    "experts-used-above-count": (model(kv={"llama.expert_count": (2, VT.UINT32),
                                           "llama.expert_used_count": (3, VT.UINT32)}), "expert_used_count"),
    "nextn-above-block-count": (model(kv={"llama.nextn_predict_layers": (3, VT.UINT32)}), "nextn_predict_layers"),
    "rope-scaling-type-unknown": (model(kv={"llama.rope.scaling.type": ("bogus", VT.STRING)}), "rope.scaling.type"),
    "architecture-not-string": (model(kv={"general.architecture": (7, VT.UINT32)}), "general.architecture"),
}


def tiny_cuts() -> dict[str, int]:
    lay = tiny_layout()
    first, last = lay.tensors[0], lay.tensors[-1]
    first_end = lay.data_start + 4 * first.dims[0] * first.dims[1]
    return {
        "tiny-cut-at-10": 10, "tiny-cut-at-30": 30,
        "tiny-cut-inside-kv": lay.kv["tokenizer.ggml.tokens"].value_off + 500,
        "tiny-cut-at-kv-end": lay.kv_end, "tiny-cut-inside-infos": lay.kv_end + 40,
        "tiny-cut-at-infos-end": lay.infos_end, "tiny-cut-at-data-start": lay.data_start,
        "tiny-cut-at-first-tensor-end": first_end, "tiny-cut-inside-last-tensor": lay.data_start + last.offset + 1,
        "tiny-cut-1-byte-short": len(tiny()) - 1,
    }


TINY_CUTS = [
    "tiny-cut-at-10", "tiny-cut-at-30", "tiny-cut-inside-kv", "tiny-cut-at-kv-end", "tiny-cut-inside-infos",
    "tiny-cut-at-infos-end", "tiny-cut-at-data-start", "tiny-cut-at-first-tensor-end",
    "tiny-cut-inside-last-tensor", "tiny-cut-1-byte-short",
]
# A cut file is reported as truncated, or its counts as not fitting in what is left.
TRUNCATED = ("truncated", "too short", "past the end", "cannot fit", "more than the file can hold",
             "bytes left in the file")


# ------------------------------------------------------------------ the default model, cut


@functools.cache
def default_header() -> tuple[bytes, gf.Layout, int]:
    """The default model's header bytes (up to its data section), their layout and the file size."""
    path = mullama.default_model_path()
    with open(path, "rb") as fh:
        head = fh.read(16 << 20)
    lay = gf.layout(head)
    return head[:lay.data_start], lay, os.path.getsize(path)


def default_cuts() -> dict[str, int]:
    _, lay, size = default_header()
    first = lay.tensors[0]
    by_offset = sorted(lay.tensors, key=lambda t: t.offset)
    tokens = lay.kv["tokenizer.ggml.tokens"].value_off
    return {
        # inside the fixed header
        "default-cut-at-2": 2, "default-cut-at-12": 12, "default-cut-at-20": 20,
        # inside the metadata: a key, the token array (262144 strings), the tail
        "default-cut-at-25": 25, "default-cut-at-100": 100, "default-cut-at-1000": 1000,
        "default-cut-inside-token-count": tokens + 6, "default-cut-inside-tokens": tokens + 100_000,
        "default-cut-at-1MB": 1_000_000, "default-cut-at-3MB": 3_000_000, "default-cut-at-6MB": 6_000_000,
        "default-cut-before-kv-end": lay.kv_end - 1,
        # inside the tensor table
        "default-cut-after-kv-end": lay.kv_end + 1, "default-cut-inside-infos": lay.kv_end + 5000,
        "default-cut-before-infos-end": lay.infos_end - 1,
        # inside the tensor data (at tensor boundaries and between them)
        "default-cut-at-data-start": lay.data_start,
        "default-cut-at-second-tensor": lay.data_start + by_offset[1].offset,
        "default-cut-inside-first-tensor": lay.data_start + first.offset + 7,
        "default-cut-at-half": size // 2,
        "default-cut-1-byte-short": size - 1,
    }


DEFAULT_CUTS = [
    "default-cut-at-2", "default-cut-at-12", "default-cut-at-20", "default-cut-at-25", "default-cut-at-100",
    "default-cut-at-1000", "default-cut-inside-token-count", "default-cut-inside-tokens", "default-cut-at-1MB",
    "default-cut-at-3MB", "default-cut-at-6MB", "default-cut-before-kv-end", "default-cut-after-kv-end",
    "default-cut-inside-infos", "default-cut-before-infos-end", "default-cut-at-data-start",
    "default-cut-at-second-tensor", "default-cut-inside-first-tensor", "default-cut-at-half",
    "default-cut-1-byte-short",
]


def write_default_cut(path: Path, cut: int) -> None:
    """The default model cut to ``cut`` bytes.

    Past the header the file is extended sparsely: the tensor data reads as
    zeros, which the validator never reads; only the header and the size count.
    """
    head, _, _ = default_header()
    path.write_bytes(head[:cut])
    if cut > len(head):
        os.truncate(path, cut)


# ------------------------------------------------------------------ bad paths


def make_bad_path(kind: str, tmp_path: Path) -> str:
    if kind == "directory":
        (tmp_path / "dir.gguf").mkdir()
        return str(tmp_path / "dir.gguf")
    if kind == "fifo":
        os.mkfifo(tmp_path / "fifo.gguf")
        return str(tmp_path / "fifo.gguf")
    if kind == "missing":
        return str(tmp_path / "missing.gguf")
    if kind == "dangling-symlink":
        os.symlink(tmp_path / "nowhere.gguf", tmp_path / "dangling.gguf")
        return str(tmp_path / "dangling.gguf")
    if kind == "symlink-loop":
        os.symlink(tmp_path / "b.gguf", tmp_path / "a.gguf")
        os.symlink(tmp_path / "a.gguf", tmp_path / "b.gguf")
        return str(tmp_path / "a.gguf")
    if kind == "nul-byte":
        return str(tmp_path / "bad\x00name.gguf")
    if kind == "unreadable":
        p = tmp_path / "unreadable.gguf"
        p.write_bytes(tiny())
        p.chmod(0)
        if os.access(p, os.R_OK):
            pytest.skip("running as root: chmod 0 does not stop reads")
        return str(p)
    raise AssertionError(kind)


BAD_PATHS = ["directory", "fifo", "missing", "dangling-symlink", "symlink-loop", "nul-byte", "unreadable"]
NOT_FOUND = {"missing", "dangling-symlink"}


def write_case(case: str, tmp_path: Path) -> tuple[str, str | tuple[str, ...]]:
    """Create the file for ``case``; return its path and the expected message fragment(s)."""
    path = tmp_path / f"{case}.gguf"
    if case in CASES:
        build, expect = CASES[case]
        path.write_bytes(build())
        return str(path), expect
    if case in TINY_CUTS:
        path.write_bytes(tiny()[:tiny_cuts()[case]])
        return str(path), TRUNCATED
    if case in DEFAULT_CUTS:
        write_default_cut(path, default_cuts()[case])
        return str(path), TRUNCATED
    return make_bad_path(case, tmp_path), ""


def assert_rejected(path: str, expect: str | tuple[str, ...], exc: BaseException) -> None:
    """``exc`` is a ModelLoadError naming ``path`` and containing (one of) ``expect``."""
    msg = str(exc)
    assert isinstance(exc, mullama.ModelLoadError)
    assert exc.path == path
    assert path in msg or repr(path) in msg, msg
    expect = (expect,) if isinstance(expect, str) else expect
    detail = msg.replace(path, "")  # the path itself (e.g. a pytest folder name) must not match
    assert any(e in detail for e in expect), f"expected one of {expect!r} in {msg!r}"


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", list(CASES) + TINY_CUTS)
def test_malformed_tiny_model_is_rejected(case: str, tmp_path: Path) -> None:
    path, expect = write_case(case, tmp_path)
    start = time.monotonic()
    with pytest.raises(mullama.ModelLoadError) as info:
        mullama.Model.load(path)
    assert time.monotonic() - start < TIME_LIMIT_S
    assert_rejected(path, expect, info.value)


@pytest.mark.parametrize("case", DEFAULT_CUTS)
def test_truncated_default_model_is_rejected(case: str, tmp_path: Path) -> None:
    path, expect = write_case(case, tmp_path)
    assert os.path.getsize(path) == default_cuts()[case]
    start = time.monotonic()
    with pytest.raises(mullama.ModelLoadError) as info:
        mullama.Model.load(path)
    assert time.monotonic() - start < TIME_LIMIT_S
    assert_rejected(path, expect, info.value)


@pytest.mark.parametrize("kind", BAD_PATHS)
def test_bad_path_is_rejected(kind: str, tmp_path: Path) -> None:
    path = make_bad_path(kind, tmp_path)
    start = time.monotonic()
    with pytest.raises(mullama.ModelLoadError) as info:
        mullama.Model.load(path)
    assert time.monotonic() - start < TIME_LIMIT_S
    assert_rejected(path, "", info.value)
    assert isinstance(info.value, FileNotFoundError) == (kind in NOT_FOUND)


@pytest.mark.parametrize("kind", ["directory", "fifo", "missing", "nul-byte"])
def test_validator_alone_rejects_bad_paths(kind: str, tmp_path: Path) -> None:
    # validate_gguf_file is public: it must not hang on a FIFO or crash on a directory by itself.
    path = make_bad_path(kind, tmp_path)
    with pytest.raises(mullama.ModelLoadError) as info:
        validate_gguf_file(path)
    assert_rejected(path, "", info.value)


def test_validator_accepts_the_tiny_model(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny())
    validate_gguf_file(str(path))


def test_validator_accepts_variants_llama_cpp_allows(tmp_path: Path) -> None:
    # Legal but unusual: a 64-byte alignment, i32 scores, no scores or token types, an
    # explicit key_length (so head_count need not divide embedding_length), yarn scaling,
    # a long merges array and a 140 KB chat template (skipped, not read).
    for i, data in enumerate([
        gf.tiny_model_bytes(kv={"general.alignment": (64, VT.UINT32)}),
        gf.tiny_model_bytes(kv={"tokenizer.ggml.scores": ([0] * gf.N_VOCAB, VT.ARRAY)}),
        gf.tiny_model_bytes(kv={"tokenizer.ggml.scores": None, "tokenizer.ggml.token_type": None}),
        gf.tiny_model_bytes(kv={"llama.attention.key_length": (16, VT.UINT32),
                                "llama.attention.head_count": (5, VT.UINT32),
                                "llama.attention.head_count_kv": (1, VT.UINT32)}),
        gf.tiny_model_bytes(kv={"llama.rope.scaling.type": ("yarn", VT.STRING)}),
        gf.tiny_model_bytes(kv={"tokenizer.ggml.merges": (["a b", "c d"] * 5000, VT.ARRAY),
                                "tokenizer.chat_template": ("{{ x }}" * 20000, VT.STRING)}),
    ]):
        path = tmp_path / f"variant-{i}.gguf"
        path.write_bytes(data)
        validate_gguf_file(str(path))


def test_validator_accepts_the_default_model_quickly(model_path: str) -> None:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        validate_gguf_file(model_path)
        best = min(best, time.perf_counter() - start)
    # only the header is read: a generous bound that a full read of 253 MB would still miss
    assert best < 5.0, f"validating the default model took {best:.3f} s"


def _run_child(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO_ROOT)


def _assert_no_crash(proc: subprocess.CompletedProcess[str]) -> None:
    for marker in CRASH_MARKERS:
        assert marker not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stderr[-3000:]}"


def test_tiny_model_loads_in_llama_cpp_without_crashing(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny())
    proc = _run_child("""
        import sys, mullama
        try:
            model = mullama.Model.load(sys.argv[1])
        except mullama.ModelLoadError as exc:
            print("REJECTED", exc)
        else:
            print("LOADED", model.n_vocab, model.n_layer, len(model.tokenize("hello")))
            model.close()
    """, str(path))
    _assert_no_crash(proc)
    out = proc.stdout.split()
    assert out[:1] in (["LOADED"], ["REJECTED"]), proc.stdout
    if out[0] == "LOADED":
        assert out[1:3] == [str(gf.N_VOCAB), str(gf.N_LAYER)]


def test_all_malformed_files_in_one_child_process(tmp_path: Path) -> None:
    """Every malformed file again, in a child with a 1 GiB address-space cap, mmap on and off."""
    cases = list(CASES) + TINY_CUTS + DEFAULT_CUTS + [k for k in BAD_PATHS if k != "unreadable"]
    paths = {}
    for case in cases:
        folder = tmp_path / case
        folder.mkdir()
        paths[case] = write_case(case, folder)[0]
    listing = tmp_path / "cases.json"
    listing.write_text(json.dumps(paths))
    proc = _run_child("""
        import json, resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        import mullama
        paths = json.load(open(sys.argv[1]))
        bad = []
        for case, path in paths.items():
            for use_mmap in (True, False):
                start = time.monotonic()
                try:
                    mullama.Model.load(path, use_mmap=use_mmap)
                    bad.append(f"{case}: loaded")
                except mullama.ModelLoadError:
                    if time.monotonic() - start > 2.0:
                        bad.append(f"{case}: took {time.monotonic() - start:.1f} s")
                except BaseException as exc:
                    bad.append(f"{case}: {type(exc).__name__}: {exc}")
        print("REJECTED", len(paths), "FAILURES", json.dumps(bad))
    """, str(listing), timeout=120)
    _assert_no_crash(proc)
    assert proc.stdout.split()[:4] == ["REJECTED", str(len(cases)), "FAILURES", "[]"], proc.stdout


def test_case_ids_cover_the_catalogue() -> None:
    # The brief's list of malformed inputs, each present as its own case.
    required = {
        "empty", "3-bytes", "bad-magic", "version-0", "version-1", "version-99", "n-tensors-2^64-1",
        "n-kv-2^64-1", "key-length-past-eof", "string-length-past-eof", "array-count-2^62",
        "unknown-value-type", "duplicate-key", "alignment-0", "alignment-13", "alignment-int32", "n-dims-5",
        "dim-2^42+1", "unknown-ggml-type", "tensor-offset-past-eof", "overlapping-tensors",
        "misaligned-offset", "bos-negative", "bos-n_vocab", "scores-shorter", "token-embd-rows",
        "block-count-0", "block-count-smaller",
    }
    assert required <= set(CASES)
    assert len(DEFAULT_CUTS) == len(set(default_cuts())) == 20
    assert set(TINY_CUTS) == set(tiny_cuts())
    # The patched builders must really differ from the valid model (a patch at a wrong offset
    # could silently produce the valid file again).
    for case, (build, _) in CASES.items():
        assert build() != tiny(), case
    assert struct.unpack_from("<I", tiny(), 4)[0] == 3
