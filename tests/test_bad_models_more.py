"""Group A, continued: more malformed model files, each loaded in a child process.

Unlike ``test_bad_models.py``, many of these files pass the Python validator
and reach llama.cpp (hyper-parameters that disagree with the tensors, unknown
architectures or tokenizers), or were found by ``test_fuzz_gguf.py`` to abort
llama.cpp before the validator learnt to reject them. So every file is loaded
by a :class:`load_worker.LoadWorker` child, with mmap on and off: the child
must survive, and each load must raise ``ModelLoadError`` (a missing file:
``ModelNotFoundError``) naming the defect, within 2 s, with its peak RSS less
than 64 MiB above what it was before the load.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from gguf import GGUFValueType as VT

import gguf_factory as gf
import test_bad_models as base
from load_worker import REPO_ROOT, LoadWorker, WorkerCrash
from test_bad_models import at, kv, model, tensor, tiny, tiny_layout

TIME_LIMIT_S = 2.0
RSS_LIMIT_KB = 64 << 10
ANY = ""  # a file so garbled that any ModelLoadError naming the path will do


def _vocab_changed(column: int, field: str, changes: dict) -> Callable[[], bytes]:
    """Builder: the tiny model with entries of one vocabulary column replaced (index -> value)."""
    def build() -> bytes:
        values = gf.vocab(gf.N_VOCAB)[column]
        for index, value in changes.items():
            values[int(index.lstrip("t"))] = value
        return gf.tiny_model_bytes(**{field: values})
    return build


def with_tokens(**changes: str) -> Callable[[], bytes]:
    return _vocab_changed(0, "tokens", changes)


def with_types(**changes: int) -> Callable[[], bytes]:
    return _vocab_changed(2, "token_types", changes)


def no_byte_types(**kv_changes: tuple) -> Callable[[], bytes]:
    """Builder: a vocabulary without byte-typed tokens (as WordPiece models have), other metadata changed."""
    types = [1 if t == 6 else t for t in gf.vocab(gf.N_VOCAB)[2]]
    return lambda: gf.tiny_model_bytes(token_types=types, kv=kv_changes)


def vocab_of(n: int) -> Callable[[], bytes]:
    """Builder: tokens, scores and types all of ``n`` entries (token_embd keeps N_VOCAB rows)."""
    def build() -> bytes:
        tokens, scores, types = gf.vocab(max(n, 259))
        if n > len(tokens):
            tokens += [f"\u2581x{i}" for i in range(n - len(tokens))]
            scores += [-1.0] * (n - len(scores))
            types += [1] * (n - len(types))
        return gf.tiny_model_bytes(tokens=tokens[:n], scores=scores[:n], token_types=types[:n],
                                   kv={"llama.vocab_size": (n, VT.UINT32)})
    return build


def patch_at(offset: Callable[[], int], fmt: str, value: object) -> Callable[[], bytes]:
    return lambda: gf.patch(tiny(), offset(), fmt, value)


def named_tensor(name: str) -> gf.TensorInfo:
    return next(t for t in tiny_layout().tensors if t.name == name)


def realigned(value: int, vtype: VT = VT.UINT32) -> Callable[[], bytes]:
    """Builder: general.alignment written as ``value`` after a file laid out with 32."""
    def build() -> bytes:
        data = gf.tiny_model_bytes(kv={"general.alignment": (32, VT.UINT32)})
        entry = gf.layout(data).kv["general.alignment"]
        return gf.patch(data, entry.value_off, {VT.UINT32: "<I"}[vtype], value)
    return build


def header_only(n_tensors: int = 0, n_kv: int = 0) -> bytes:
    return b"GGUF" + (3).to_bytes(4, "little") + n_tensors.to_bytes(8, "little") + n_kv.to_bytes(8, "little")


def lay_n_tensors() -> int:
    return tiny_layout().n_tensors


def lay_n_kv() -> int:
    return tiny_layout().n_kv


# id -> (builder, fragment(s) the message must contain)
MORE: dict[str, tuple[Callable[[], bytes], str | tuple[str, ...]]] = {
    # ---- fixed header
    "magic-only": (lambda: b"GGUF", "too short"),
    "magic-and-version": (lambda: tiny()[:8], "too short"),
    "23-bytes": (lambda: tiny()[:23], "too short"),
    "magic-lowercase": (lambda: b"gguf" + tiny()[4:], "not a GGUF file"),
    "magic-reversed": (lambda: b"FUGG" + tiny()[4:], "not a GGUF file"),
    "magic-zeros": (lambda: bytes(4) + tiny()[4:], "not a GGUF file"),
    "version-4": (at(4, "<I", 4), "unsupported GGUF version 4"),
    "version-2^31": (at(4, "<I", 2**31), "unsupported GGUF version"),
    "version-2^32-1": (at(4, "<I", 2**32 - 1), "unsupported GGUF version"),
    "header-only-no-metadata": (lambda: header_only(), "architecture"),
    "header-only-claims-tensors": (lambda: header_only(n_tensors=5), "cannot fit"),
    # ---- counts
    "n-tensors-2^32": (at(8, "<Q", 2**32), "cannot fit"),
    "n-tensors-2^63": (at(8, "<Q", 2**63), "cannot fit"),
    "n-kv-2^31": (at(16, "<Q", 2**31), "cannot fit"),
    "n-kv-2^32": (at(16, "<Q", 2**32), "cannot fit"),
    "n-kv-2^63": (at(16, "<Q", 2**63), "cannot fit"),
    "n-tensors-zero": (at(8, "<Q", 0), "not found"),
    "n-tensors-minus-one": (lambda: gf.patch(tiny(), 8, "<Q", lay_n_tensors() - 1), "not found"),
    "n-tensors-plus-one": (lambda: gf.patch(tiny(), 8, "<Q", lay_n_tensors() + 1), ANY),
    "n-kv-zero": (at(16, "<Q", 0), ANY),
    "n-kv-minus-one": (lambda: gf.patch(tiny(), 16, "<Q", lay_n_kv() - 1), ANY),
    # ---- metadata keys and values
    "key-length-past-eof-block-count": (patch_at(lambda: kv("llama.block_count").key_off, "<Q", 2**40), "truncated"),
    "key-length-past-eof-tokens": (patch_at(lambda: kv("tokenizer.ggml.tokens").key_off, "<Q", 2**33), "truncated"),
    "key-length-past-eof-last": (patch_at(lambda: kv("tokenizer.ggml.add_eos_token").key_off, "<Q", 10**9),
                                 "truncated"),
    "key-length-2^63": (patch_at(lambda: kv("llama.context_length").key_off, "<Q", 2**63), "truncated"),
    "key-length-65536": (patch_at(lambda: kv("llama.context_length").key_off, "<Q", 65536), "longer than"),
    "key-overlong-utf8": (patch_at(lambda: kv("llama.block_count").key_off + 8, "<H", 0x80C0), "not valid UTF-8"),
    "architecture-length-past-eof": (patch_at(lambda: kv("general.architecture").value_off, "<Q", 2**40),
                                     "truncated"),
    "architecture-length-2^64-1": (patch_at(lambda: kv("general.architecture").value_off, "<Q", 2**64 - 1),
                                   "truncated"),
    "tokenizer-model-length-past-eof": (patch_at(lambda: kv("tokenizer.ggml.model").value_off, "<Q", 2**40),
                                        "truncated"),
    "token-100-length-2^40": (lambda: gf.patch(tiny(), _token_offset(100), "<Q", 2**40), "tokens[100]"),
    "token-299-length-10^8": (lambda: gf.patch(tiny(), _token_offset(299), "<Q", 10**8),
                              "tokens[299] is 100000000 bytes long"),
    "tokens-count-2^61": (patch_at(lambda: kv("tokenizer.ggml.tokens").value_off + 4, "<Q", 2**61), "claims"),
    "tokens-count-plus-one": (patch_at(lambda: kv("tokenizer.ggml.tokens").value_off + 4, "<Q", gf.N_VOCAB + 1),
                              ANY),
    "tokens-count-zero": (patch_at(lambda: kv("tokenizer.ggml.tokens").value_off + 4, "<Q", 0), ANY),
    "token-type-count-2^62": (patch_at(lambda: kv("tokenizer.ggml.token_type").value_off + 4, "<Q", 2**62),
                              "claims"),
    "scores-count-past-eof": (patch_at(lambda: kv("tokenizer.ggml.scores").value_off + 4, "<Q", 10**6), "claims"),
    "value-type-14": (patch_at(lambda: kv("llama.block_count").type_off, "<I", 14), "unknown value type 14"),
    "value-type-2^31": (patch_at(lambda: kv("general.name").type_off, "<I", 2**31), "unknown value type"),
    "array-element-type-13": (patch_at(lambda: kv("tokenizer.ggml.token_type").value_off, "<I", 13),
                              "unknown element type 13"),
    "array-element-type-2^32-1": (patch_at(lambda: kv("tokenizer.ggml.scores").value_off, "<I", 2**32 - 1),
                                  "unknown element type"),
    "block-count-retyped-string": (patch_at(lambda: kv("llama.block_count").type_off, "<I", 8), ANY),
    "block-count-retyped-u64": (patch_at(lambda: kv("llama.block_count").type_off, "<I", 10), ANY),
    "block-count-retyped-bool": (patch_at(lambda: kv("llama.block_count").type_off, "<I", 7), ANY),
    "name-u32": (model(kv={"general.name": (1, VT.UINT32)}), "wrong type"),
    "add-bos-u32": (model(kv={"tokenizer.ggml.add_bos_token": (1, VT.UINT32)}), "wrong type"),
    # ---- architecture and tokenizer
    "architecture-unknown": (model(kv={"general.architecture": ("foobar", VT.STRING)}), "unknown model architecture"),
    "architecture-empty": (model(kv={"general.architecture": ("", VT.STRING)}), "general.architecture"),
    "architecture-5000-chars": (model(kv={"general.architecture": ("a" * 5000, VT.STRING)}), "general.architecture"),
    "architecture-gemma3-with-llama-keys": (model(kv={"general.architecture": ("gemma3", VT.STRING)}),
                                            "gemma3.context_length"),
    "tokenizer-none": (model(kv={"tokenizer.ggml.model": ("none", VT.STRING)}), "no tokenizer"),
    "tokenizer-no_vocab": (model(kv={"tokenizer.ggml.model": ("no_vocab", VT.STRING)}), "no tokenizer"),
    "tokenizer-unknown": (model(kv={"tokenizer.ggml.model": ("bogus", VT.STRING)}), "unknown tokenizer"),
    "tokenizer-missing": (model(kv={"tokenizer.ggml.model": None}), "tokenizer.ggml.model"),
    "tokenizer-int": (model(kv={"tokenizer.ggml.model": (1, VT.UINT32)}), "wrong type"),
    "tokens-missing": (model(kv={"tokenizer.ggml.tokens": None}), "tokenizer vocab"),
    "gpt2-without-merges": (model(kv={"tokenizer.ggml.model": ("gpt2", VT.STRING)}), "merges"),
    "merges-not-strings": (model(kv={"tokenizer.ggml.model": ("gpt2", VT.STRING),
                                     "tokenizer.ggml.merges": ([1, 2], VT.ARRAY)}), "merges"),
    "bert-with-byte-tokens": (model(kv={"tokenizer.ggml.model": ("bert", VT.STRING)}), "byte tokens"),
    "gemma4-without-bos": (no_byte_types(**{"tokenizer.ggml.model": ("gemma4", VT.STRING),
                                            "tokenizer.ggml.merges": (["a b"], VT.ARRAY),
                                            "tokenizer.ggml.bos_token_id": None}), "BOS"),
    "rwkv-adds-missing-bos": (model(kv={"tokenizer.ggml.model": ("rwkv", VT.STRING),
                                        "tokenizer.ggml.bos_token_id": None}), "BOS"),
    "rwkv-adds-missing-eos": (model(kv={"tokenizer.ggml.model": ("rwkv", VT.STRING),
                                        "tokenizer.ggml.add_bos_token": (False, VT.BOOL),
                                        "tokenizer.ggml.eos_token_id": None,
                                        "tokenizer.ggml.add_eos_token": (True, VT.BOOL)}), "EOS"),
    "spm-byte-token-renamed": (with_tokens(t68="<0x4G>"), "no byte token"),
    "spm-newline-byte-missing": (with_tokens(t13="\u2581nl"), "no byte token for 1 byte"),
    "spm-many-byte-tokens-missing": (with_tokens(**{f"t{i}": f"\u2581b{i}" for i in range(3, 259)}),
                                     "no byte token for"),
    "byte-token-short-text": (with_types(t299=6), "substr"),
    "duplicate-empty-token": (with_tokens(t298="", t299="[EMPTY_298]"), "duplicate token"),
    # ---- alignment
    "alignment-1": (model(kv={"general.alignment": (1, VT.UINT32)}), "not a multiple of 32"),
    "alignment-2": (model(kv={"general.alignment": (2, VT.UINT32)}), "not a multiple of 32"),
    "alignment-3": (model(kv={"general.alignment": (3, VT.UINT32)}), "general.alignment 3"),
    "alignment-48": (model(kv={"general.alignment": (48, VT.UINT32)}), "general.alignment 48"),
    "alignment-2^21": (model(kv={"general.alignment": (2**21, VT.UINT32)}), "general.alignment"),
    "alignment-2^31": (model(kv={"general.alignment": (2**31, VT.UINT32)}), "general.alignment"),
    "alignment-2^32-1": (model(kv={"general.alignment": (2**32 - 1, VT.UINT32)}), "general.alignment"),
    "alignment-u64": (model(kv={"general.alignment": (32, VT.UINT64)}), "must be a u32"),
    "alignment-u16": (model(kv={"general.alignment": (32, VT.UINT16)}), "must be a u32"),
    "alignment-string": (model(kv={"general.alignment": ("32", VT.STRING)}), "must be a u32"),
    "alignment-f32": (model(kv={"general.alignment": (32.0, VT.FLOAT32)}), "must be a u32"),
    "alignment-array": (model(kv={"general.alignment": ([32], VT.ARRAY)}), "must be a u32"),
    "alignment-key-64-data-at-32": (realigned(64), ("not a multiple of the alignment", "past the end")),
    "alignment-key-4096-data-at-32": (realigned(4096), ("not a multiple of the alignment", "past the end")),
    "alignment-key-0-after-layout": (realigned(0), "general.alignment 0"),
    "alignment-key-1-data-at-32": (realigned(1), "not a multiple of 32"),
    # ---- tensor infos
    "tensor-name-length-past-eof": (patch_at(lambda: tensor(3).name_off, "<Q", 2**40), "truncated"),
    "tensor-name-length-2^64-1": (patch_at(lambda: tensor(0).name_off, "<Q", 2**64 - 1), "truncated"),
    "tensor-name-empty": (patch_at(lambda: tensor(2).name_off, "<Q", 0), ANY),
    "tensor-name-64-bytes": (model(extra_tensors={"y" * 64: np.zeros(32, np.float32)}), "longer than 63"),
    "tensor-name-not-utf8": (patch_at(lambda: tensor(1).name_off + 8, "<B", 0xFF), "not valid UTF-8"),
    "n-dims-2^32-1": (patch_at(lambda: tensor(4).ndims_off, "<I", 2**32 - 1), "dimensions"),
    "n-dims-3": (patch_at(lambda: tensor(3).ndims_off, "<I", 3), ANY),
    "n-dims-1-for-matrix": (patch_at(lambda: tensor(3).ndims_off, "<I", 1), ANY),
    "dim-2^63-1": (patch_at(lambda: tensor(2).dims_off, "<q", 2**63 - 1), ("past the end", "2^63-1")),
    "dim-negative-first": (patch_at(lambda: tensor(0).dims_off, "<q", -64), "dimensions must be >= 1"),
    "dim-min-int64": (patch_at(lambda: tensor(5).dims_off + 8, "<q", -2**63), "dimensions must be >= 1"),
    "ggml-type-43": (patch_at(lambda: tensor(0).type_off, "<I", 43), "ggml type 43"),
    "ggml-type-2^31": (patch_at(lambda: tensor(2).type_off, "<I", 2**31), "ggml type"),
    "removed-ggml-type-5": (patch_at(lambda: tensor(3).type_off, "<I", 5), "ggml type 5"),
    "removed-ggml-type-32": (patch_at(lambda: tensor(3).type_off, "<I", 32), "ggml type 32"),
    "removed-ggml-type-36": (patch_at(lambda: tensor(3).type_off, "<I", 36), "ggml type 36"),
    "q8_1-weight": (patch_at(lambda: named_tensor("blk.1.ffn_down.weight").type_off, "<I", 9), "cannot compute"),
    "i8-weight": (patch_at(lambda: named_tensor("blk.1.ffn_down.weight").type_off, "<I", 24), "cannot compute"),
    "i16-weight": (patch_at(lambda: named_tensor("blk.0.attn_q.weight").type_off, "<I", 25), "cannot compute"),
    "i32-embedding": (patch_at(lambda: tensor(0).type_off, "<I", 26), "cannot compute"),
    "i32-norm": (patch_at(lambda: named_tensor("blk.0.attn_norm.weight").type_off, "<I", 26), "cannot compute"),
    "f16-norm-weight": (patch_at(lambda: named_tensor("blk.0.attn_norm.weight").type_off, "<I", 1), "failed"),
    "q4_0-embedding": (patch_at(lambda: tensor(0).type_off, "<I", 2), "failed"),
    "offset-first-past-eof": (patch_at(lambda: tensor(0).offset_off, "<Q", 2**30), "past the end"),
    "offset-2^63": (patch_at(lambda: tensor(6).offset_off, "<Q", 2**63), "past the end"),
    "offset-equal-data-size": (lambda: gf.patch(tiny(), tensor(-1).offset_off, "<Q",
                                                 len(tiny()) - tiny_layout().data_start), "past the end"),
    "offset-same-as-first": (patch_at(lambda: tensor(5).offset_off, "<Q", 0), "overlap"),
    "offset-partial-overlap": (lambda: gf.patch(tiny(), tensor(4).offset_off, "<Q", tensor(3).offset + 32),
                               "overlap"),
    "offset-last-onto-first": (patch_at(lambda: tensor(-1).offset_off, "<Q", 0), "overlap"),
    "offset-misaligned-by-1": (lambda: gf.patch(tiny(), tensor(1).offset_off, "<Q", tensor(1).offset + 1),
                               "not a multiple of the alignment"),
    "offset-misaligned-by-8": (lambda: gf.patch(tiny(), tensor(7).offset_off, "<Q", tensor(7).offset + 8),
                               "not a multiple of the alignment"),
    "offset-misaligned-by-16": (lambda: gf.patch(tiny(), tensor(9).offset_off, "<Q", tensor(9).offset - 16),
                                "not a multiple of the alignment"),
    "offset-misaligned-by-31": (lambda: gf.patch(tiny(), tensor(-1).offset_off, "<Q", tensor(-1).offset + 31),
                                "not a multiple of the alignment"),
    # ---- special tokens and vocabulary arrays
    "eos-negative": (model(kv={"tokenizer.ggml.eos_token_id": (-1, VT.INT32)}), "eos_token_id is negative"),
    "unk-negative": (model(kv={"tokenizer.ggml.unknown_token_id": (-5, VT.INT32)}), "unknown_token_id is negative"),
    "pad-negative": (model(kv={"tokenizer.ggml.padding_token_id": (-1, VT.INT64)}), "padding_token_id is negative"),
    "eot-negative": (model(kv={"tokenizer.ggml.eot_token_id": (-2**31, VT.INT32)}), "eot_token_id is negative"),
    "eos-n_vocab": (model(kv={"tokenizer.ggml.eos_token_id": (gf.N_VOCAB, VT.UINT32)}), "eos_token_id = 300"),
    "unk-n_vocab": (model(kv={"tokenizer.ggml.unknown_token_id": (gf.N_VOCAB, VT.UINT32)}), "unknown_token_id"),
    "sep-n_vocab": (model(kv={"tokenizer.ggml.seperator_token_id": (gf.N_VOCAB, VT.UINT32)}), "seperator_token_id"),
    "cls-n_vocab": (model(kv={"tokenizer.ggml.cls_token_id": (gf.N_VOCAB + 7, VT.UINT32)}), "cls_token_id"),
    "mask-n_vocab": (model(kv={"tokenizer.ggml.mask_token_id": (10**6, VT.UINT32)}), "mask_token_id"),
    "eom-n_vocab": (model(kv={"tokenizer.ggml.eom_token_id": (gf.N_VOCAB, VT.UINT32)}), "eom_token_id"),
    "fim-pre-n_vocab": (model(kv={"tokenizer.ggml.fim_pre_token_id": (gf.N_VOCAB, VT.UINT32)}), "fim_pre_token_id"),
    "fim-suf-n_vocab": (model(kv={"tokenizer.ggml.fim_suf_token_id": (gf.N_VOCAB, VT.UINT32)}), "fim_suf_token_id"),
    "fim-mid-n_vocab": (model(kv={"tokenizer.ggml.fim_mid_token_id": (gf.N_VOCAB, VT.UINT32)}), "fim_mid_token_id"),
    "fim-pad-n_vocab": (model(kv={"tokenizer.ggml.fim_pad_token_id": (gf.N_VOCAB, VT.UINT32)}), "fim_pad_token_id"),
    "fim-rep-n_vocab": (model(kv={"tokenizer.ggml.fim_rep_token_id": (gf.N_VOCAB, VT.UINT32)}), "fim_rep_token_id"),
    "fim-sep-n_vocab": (model(kv={"tokenizer.ggml.fim_sep_token_id": (gf.N_VOCAB, VT.UINT32)}), "fim_sep_token_id"),
    "prefix-n_vocab": (model(kv={"tokenizer.ggml.prefix_token_id": (gf.N_VOCAB, VT.UINT32)}), "prefix_token_id"),
    "bos-2^31": (model(kv={"tokenizer.ggml.bos_token_id": (2**31, VT.UINT32)}), "bos_token_id"),
    "bos-i64-2^40": (model(kv={"tokenizer.ggml.bos_token_id": (2**40, VT.INT64)}), "bos_token_id"),
    "bos-bool": (model(kv={"tokenizer.ggml.bos_token_id": (True, VT.BOOL)}), "must be an integer"),
    "bos-float": (model(kv={"tokenizer.ggml.bos_token_id": (1.0, VT.FLOAT32)}), "must be an integer"),
    "bos-string": (model(kv={"tokenizer.ggml.bos_token_id": ("1", VT.STRING)}), "must be an integer"),
    "bos-array": (model(kv={"tokenizer.ggml.bos_token_id": ([1], VT.ARRAY)}), "not a token id"),
    "bos-u64": (model(kv={"tokenizer.ggml.bos_token_id": (1, VT.UINT64)}), "wrong type"),
    "scores-longer": (model(scores=[0.0] * (gf.N_VOCAB + 1)), "scores has 301 entries"),
    "scores-one-entry": (model(scores=[0.0]), "scores has 1 entries"),
    "scores-strings": (model(kv={"tokenizer.ggml.scores": (["0"] * gf.N_VOCAB, VT.ARRAY)}), "must be an array of f32"),
    "token-type-shorter": (model(token_types=[1] * (gf.N_VOCAB - 1)), "token_type has 299 entries"),
    "token-type-one-entry": (model(token_types=[1]), "token_type has 1 entries"),
    "tokens-longer-than-embedding": (vocab_of(gf.N_VOCAB + 1), "token_embd.weight has shape"),
    "tokens-shorter-than-embedding": (vocab_of(gf.N_VOCAB - 1), "token_embd.weight has shape"),
    # ---- hyper-parameters against the tensors
    "embedding-length-32": (model(kv={"llama.embedding_length": (32, VT.UINT32)}), "n_rot"),
    "embedding-length-128": (model(kv={"llama.embedding_length": (128, VT.UINT32)}), "n_rot"),
    "embedding-length-2^31": (model(kv={"llama.embedding_length": (2**31, VT.UINT32)}), "embedding_length"),
    "head-count-8": (model(kv={"llama.attention.head_count": (8, VT.UINT32)}), "n_rot"),
    "head-count-2": (model(kv={"llama.attention.head_count": (2, VT.UINT32)}), "n_rot"),
    "head-count-kv-4": (model(kv={"llama.attention.head_count_kv": (4, VT.UINT32)}), "wrong shape"),
    "head-count-kv-3": (model(kv={"llama.attention.head_count_kv": (3, VT.UINT32)}), "not a multiple"),
    "head-count-kv-above-head-count": (model(kv={"llama.attention.head_count_kv": (8, VT.UINT32)}), "not a multiple"),
    "head-count-array-zero": (model(kv={"llama.attention.head_count": ([4, 0], VT.ARRAY)}), "head_count is 0"),
    "head-count-kv-array-zero": (model(kv={"llama.attention.head_count_kv": ([2, 0], VT.ARRAY)}),
                                 "head_count_kv is 0"),
    "head-count-array-short": (model(kv={"llama.attention.head_count": ([4], VT.ARRAY)}), "array length"),
    "head-count-array-negative": (model(kv={"llama.attention.head_count": ([4, -4], VT.ARRAY)}), "negative"),
    "rope-dimension-0": (model(kv={"llama.rope.dimension_count": (0, VT.UINT32)}), "n_rot"),
    "rope-dimension-1000": (model(kv={"llama.rope.dimension_count": (1000, VT.UINT32)}), "n_rot"),
    "feed-forward-64": (model(kv={"llama.feed_forward_length": (64, VT.UINT32)}), "wrong shape"),
    "feed-forward-0": (model(kv={"llama.feed_forward_length": (0, VT.UINT32)}), "wrong shape"),
    "feed-forward-missing": (model(kv={"llama.feed_forward_length": None}), "wrong shape"),
    "context-length-2^31": (model(kv={"llama.context_length": (2**31, VT.UINT32)}), "context_length"),
    "context-length-2^32-1": (model(kv={"llama.context_length": (2**32 - 1, VT.UINT32)}), "context_length"),
    "context-length-u64": (model(kv={"llama.context_length": (256, VT.UINT64)}), "wrong type"),
    "context-length-missing": (model(kv={"llama.context_length": None}), "context_length"),
    "rms-epsilon-nan": (model(kv={"llama.attention.layer_norm_rms_epsilon": (float("nan"), VT.FLOAT32)}),
                        "not a finite"),
    "rms-epsilon-negative": (model(kv={"llama.attention.layer_norm_rms_epsilon": (-1e-5, VT.FLOAT32)}),
                             "non-negative"),
    "rms-epsilon-inf": (model(kv={"llama.attention.layer_norm_rms_epsilon": (float("inf"), VT.FLOAT32)}),
                        "not a finite"),
    "rms-epsilon-missing": (model(kv={"llama.attention.layer_norm_rms_epsilon": None}), "layer_norm_rms_epsilon"),
    "rope-freq-base-nan": (model(kv={"llama.rope.freq_base": (float("nan"), VT.FLOAT32)}), "not a finite"),
    "rope-scaling-factor-inf": (model(kv={"llama.rope.scaling.factor": (float("-inf"), VT.FLOAT32)}),
                                "not a finite"),
    "block-count-array": (model(kv={"llama.block_count": ([2, 2], VT.ARRAY)}), "wrong type"),
    "block-count-2^32-1": (model(kv={"llama.block_count": (2**32 - 1, VT.UINT32)}), "block_count"),
    "layer-tensor-beyond-block-count": (model(extra_tensors={"blk.5.attn_norm.weight": np.ones(64, np.float32)}),
                                        "blk.5"),
    "layer-1-tensors-missing": (model(n_layer_tensors=1), "have no tensors"),
    "token-embd-renamed": (lambda: tiny().replace(b"token_embd.weight", b"token_embX.weight", 1), "not found"),
    "output-norm-renamed": (lambda: tiny().replace(b"output_norm.weight", b"output_norX.weight", 1), "not found"),
    "unknown-extra-tensor": (model(extra_tensors={"foo.weight": np.zeros(32, np.float32)}), "wrong number of tensors"),
    "output-weight-wrong-shape": (model(extra_tensors={"output.weight": np.zeros((10, 64), np.float32)}),
                                  "wrong shape"),
    "ffn-up-transposed": (lambda: gf.patch(gf.patch(tiny(), named_tensor("blk.0.ffn_up.weight").dims_off, "<q", 128),
                                           named_tensor("blk.0.ffn_up.weight").dims_off + 8, "<q", 64), "wrong shape"),
    "expert-count-without-expert-tensors": (model(kv={"llama.expert_count": (2, VT.UINT32),
                                                      "llama.expert_used_count": (1, VT.UINT32)}), "not found"),
    "expert-count-2000": (model(kv={"llama.expert_count": (2000, VT.UINT32),
                                    "llama.expert_used_count": (1, VT.UINT32)}), "exceeds"),
    "expert-used-count-0": (model(kv={"llama.expert_count": (4, VT.UINT32),
                                      "llama.expert_used_count": (0, VT.UINT32)}), "expert_used_count"),
}


def _token_offset(index: int) -> int:
    """Offset of the u64 length of token ``index`` in the tiny model."""
    data, off = tiny(), kv("tokenizer.ggml.tokens").value_off + 12
    for _ in range(index):
        off += 8 + int.from_bytes(data[off:off + 8], "little")
    return off


# ------------------------------------------------------------------ the default model, cut again


def more_default_cuts() -> dict[str, int]:
    """20 more cuts of the default model, spread evenly over metadata, tensor table and data."""
    _, lay, size = base.default_header()
    cuts = {f"default-cut-kv-{i}": 24 + (lay.kv_end - 24) * i // 11 for i in range(1, 11)}
    cuts |= {f"default-cut-infos-{i}": lay.kv_end + (lay.infos_end - lay.kv_end) * i // 6 for i in range(1, 6)}
    cuts |= {f"default-cut-data-{i}": lay.data_start + (size - lay.data_start) * i // 6 for i in range(1, 6)}
    return cuts


MORE_DEFAULT_CUTS = [f"default-cut-kv-{i}" for i in range(1, 11)] + \
    [f"default-cut-infos-{i}" for i in range(1, 6)] + [f"default-cut-data-{i}" for i in range(1, 6)]


# ------------------------------------------------------------------ more bad paths


def make_more_bad_path(kind: str, folder: Path) -> str:
    if kind == "trailing-slash":
        (folder / "file.gguf").write_bytes(tiny())
        return str(folder / "file.gguf") + "/"
    if kind == "file-as-directory":
        (folder / "plain.gguf").write_bytes(tiny())
        return str(folder / "plain.gguf" / "model.gguf")
    if kind == "name-too-long":
        return str(folder / ("n" * 5000 + ".gguf"))
    if kind == "empty-path":
        return ""
    if kind == "unix-socket":
        path = folder / "sock.gguf"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
        return str(path)
    if kind == "symlink-to-directory":
        (folder / "target-dir").mkdir()
        os.symlink(folder / "target-dir", folder / "link-dir.gguf")
        return str(folder / "link-dir.gguf")
    if kind == "symlink-to-fifo":
        os.mkfifo(folder / "target.fifo")
        os.symlink(folder / "target.fifo", folder / "link-fifo.gguf")
        return str(folder / "link-fifo.gguf")
    if kind in ("dev-null", "dev-zero"):
        return "/dev/" + kind[4:]
    raise AssertionError(kind)


MORE_BAD_PATHS = ["trailing-slash", "file-as-directory", "name-too-long", "empty-path", "unix-socket",
                  "symlink-to-directory", "symlink-to-fifo", "dev-null", "dev-zero"]
NOT_FOUND = {"empty-path"}


# ------------------------------------------------------------------ running them all in one child


ALL_CASES = list(MORE) + MORE_DEFAULT_CUTS + MORE_BAD_PATHS


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Each case loaded in the worker with mmap on and off; a crash is recorded as an answer."""
    folder = tmp_path_factory.mktemp("bad-more")
    cuts = more_default_cuts()
    results: dict[str, list[dict]] = {}
    with LoadWorker(timeout=20) as worker:
        for case in ALL_CASES:
            if case in MORE:
                path = folder / f"{case}.gguf"
                path.write_bytes(MORE[case][0]())
                path = str(path)
            elif case in cuts:
                path = folder / f"{case}.gguf"
                base.write_default_cut(path, cuts[case])
                path = str(path)
            else:
                sub = folder / case
                sub.mkdir()
                path = make_more_bad_path(case, sub)
            results[case] = []
            for use_mmap in (True, False):
                try:
                    results[case].append(dict(worker.load(path, use_mmap=use_mmap), path=path))
                except WorkerCrash as crash:
                    results[case].append({"status": "crashed", "msg": f"{crash}: {crash.stderr[-2000:]}",
                                          "path": path})
    return results


@pytest.mark.parametrize("case", ALL_CASES)
def test_more_malformed_models_are_rejected(case: str, answers: dict[str, list[dict]]) -> None:
    if case in MORE:
        expect = MORE[case][1]
    elif case in MORE_DEFAULT_CUTS:
        expect = base.TRUNCATED
    else:
        expect = ANY
    expect = (expect,) if isinstance(expect, str) else expect
    for answer in answers[case]:
        assert answer["status"] == "rejected", answer
        assert answer["exc"] in ("ModelLoadError", "ModelNotFoundError"), answer
        assert answer["oserror"] == (case in NOT_FOUND), answer
        assert answer["path"] in answer["msg"] or repr(answer["path"]) in answer["msg"], answer
        detail = answer["msg"].replace(answer["path"], "")
        assert any(e in detail for e in expect), f"expected one of {expect} in {answer['msg']!r}"
        assert answer["elapsed"] < TIME_LIMIT_S, answer
        assert answer["rss_growth_kb"] < RSS_LIMIT_KB, answer


FIRST_CATALOGUE = list(base.CASES) + base.TINY_CUTS + base.DEFAULT_CUTS + \
    [k for k in base.BAD_PATHS if k != "unreadable"]


@pytest.fixture(scope="module")
def first_answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, str | tuple[str, ...]]]:
    """The cases of test_bad_models.py again, in the worker, for the time and memory bounds."""
    folder = tmp_path_factory.mktemp("bad-first")
    results = {}
    with LoadWorker(timeout=20) as worker:
        for case in FIRST_CATALOGUE:
            sub = folder / case
            sub.mkdir()
            path, expect = base.write_case(case, sub)
            try:
                results[case] = (dict(worker.load(path), path=path), expect)
            except WorkerCrash as crash:
                results[case] = ({"status": "crashed", "msg": f"{crash}: {crash.stderr[-2000:]}"}, expect)
    return results


@pytest.mark.parametrize("case", FIRST_CATALOGUE)
def test_first_catalogue_in_a_child(case: str, first_answers: dict) -> None:
    answer, expect = first_answers[case]
    expect = (expect,) if isinstance(expect, str) else expect
    assert answer["status"] == "rejected", answer
    assert any(e in answer["msg"].replace(answer["path"], "") for e in expect), answer["msg"]
    assert answer["elapsed"] < TIME_LIMIT_S, answer
    assert answer["rss_growth_kb"] < RSS_LIMIT_KB, answer


def test_unreadable_file_as_non_root(tmp_path: Path) -> None:
    """chmod 0 stops a non-root user; as root, the check runs in a child that drops to 'nobody'."""
    folder = tmp_path / "public"
    folder.mkdir()
    folder.chmod(0o755)
    tmp_path.chmod(0o755)
    path = folder / "unreadable.gguf"
    path.write_bytes(tiny())
    path.chmod(0)
    code = textwrap.dedent("""
        import os, sys
        import mullama
        from mullama.gguf_check import validate_gguf_file
        if os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
        for check in (mullama.Model.load, validate_gguf_file):
            try:
                check(sys.argv[1])
            except mullama.ModelLoadError as exc:
                print("REJECTED", type(exc).__name__, "|", exc)
            else:
                print("LOADED")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          timeout=60, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("REJECTED ModelLoadError") for line in lines), proc.stdout
    assert "permission denied" in lines[0].lower() or "not readable" in lines[0], lines[0]


def test_case_count() -> None:
    """The malformed-model catalogue: this file plus test_bad_models.py (printed with -s)."""
    first = len(base.CASES) + len(base.TINY_CUTS) + len(base.DEFAULT_CUTS) + len(base.BAD_PATHS)
    more = len(ALL_CASES) + 1  # + the non-root unreadable file
    assert len(set(ALL_CASES)) == len(ALL_CASES) and not set(ALL_CASES) & set(base.CASES)
    assert len(base.DEFAULT_CUTS) + len(MORE_DEFAULT_CUTS) >= 40
    assert len(set(more_default_cuts().values()) | set(base.default_cuts().values())) >= 40
    assert first + more >= 200, (first, more)
    for case, (build, _) in MORE.items():
        assert build() != tiny(), case
    print(f"\nmalformed-model cases: {first} + {more} = {first + more}")
