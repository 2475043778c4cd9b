"""Bounded mutation fuzzing of GGUF loading.

Small valid GGUF files from ``gguf_factory`` are mutated by a seeded random
mutator (bit flips, field-aware overwrites with boundary values, truncation,
insertions and deletions, chunk copies) and each result goes through
``Model.load`` (the Python validator, then llama.cpp) in a long-lived child
process; a file that loads is also tokenized and asked for a few tokens, since
some hyper-parameters only matter once a graph runs. The parent fails the test
if the child aborts, hangs, prints a crash marker, or raises anything but
``ModelLoadError`` from ``Model.load``.

The run lasts ``MULLAMA_FUZZ_SECONDS`` (default 20) and starts from seed
``MULLAMA_FUZZ_SEED`` (default 0); every iteration is reproducible from its
seed: ``python tests/test_fuzz_gguf.py SEED`` writes the mutated file and
prints what was changed.
"""

from __future__ import annotations

import functools
import os
import random
import struct
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from gguf import GGUFValueType as VT

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gguf_factory as gf  # noqa: E402
from load_worker import LoadWorker, WorkerCrash  # noqa: E402

FUZZ_SECONDS = float(os.environ.get("MULLAMA_FUZZ_SECONDS", "20"))
FUZZ_SEED = int(os.environ.get("MULLAMA_FUZZ_SEED", "0"))
GENERATE_TOKENS = 2
MAX_REJECT_SECONDS = 2.0

# Boundary values per field width; "orig" entries are derived from the current value.
_INTERESTING = {
    1: [0, 1, 0x7F, 0x80, 0xFF],
    4: [0, 1, 2, 3, 7, 8, 9, 12, 13, 31, 32, 33, 64, 255, 256, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFE,
        0xFFFF_FFFF],
    8: [0, 1, 2, 31, 32, 33, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 32],
}
_FLOATS = [0.0, -0.0, -1.0, 1e-30, 1e30, float("inf"), float("-inf"), float("nan")]


@functools.cache
def base_files() -> tuple[bytes, ...]:
    """The valid seeds: the plain tiny model and one with per-layer arrays and optional keys."""
    plain = gf.tiny_model_bytes()
    rich = gf.tiny_model_bytes(kv={
        "general.alignment": (64, VT.UINT32),
        "llama.attention.head_count": ([gf.N_HEAD] * gf.N_LAYER, VT.ARRAY),
        "llama.attention.head_count_kv": ([gf.N_HEAD_KV] * gf.N_LAYER, VT.ARRAY),
        "llama.feed_forward_length": ([gf.N_FF] * gf.N_LAYER, VT.ARRAY),
        "llama.rope.freq_base": (10000.0, VT.FLOAT32),
        "llama.attention.layer_norm_epsilon": (1e-5, VT.FLOAT32),
        "tokenizer.ggml.padding_token_id": (0, VT.UINT32),
        "tokenizer.ggml.merges": (["a b", "c d"], VT.ARRAY),
        "tokenizer.chat_template": ("{{ messages[0]['content'] }}", VT.STRING),
    })
    tokens, scores, types = gf.vocab(gf.N_VOCAB)
    bpe = gf.tiny_model_bytes(kv={
        "tokenizer.ggml.model": ("gpt2", VT.STRING),
        "tokenizer.ggml.pre": ("default", VT.STRING),
        "tokenizer.ggml.merges": (["a b", "\u2581 a", "c d", "ab c"], VT.ARRAY),
        "tokenizer.ggml.add_bos_token": (False, VT.BOOL),
    })
    wordpiece = gf.tiny_model_bytes(token_types=[1 if t == 6 else t for t in types], kv={
        "tokenizer.ggml.model": ("bert", VT.STRING),
        "tokenizer.ggml.seperator_token_id": (2, VT.UINT32),
    })
    return plain, rich, bpe, wordpiece


@functools.cache
def fields(index: int) -> tuple[list[tuple[int, int, str]], int]:
    """(offset, width, kind) of every header field of base file ``index``, and its data start."""
    data = base_files()[index]
    alignment = 64 if index == 1 else 32
    lay = gf.layout(data, alignment)
    out: list[tuple[int, int, str]] = [(8, 8, "u"), (16, 8, "u")]
    for entry in lay.kv.values():
        out += [(entry.key_off, 8, "u"), (entry.type_off, 4, "u")]
        if entry.vtype == 9:
            out += [(entry.value_off, 4, "u"), (entry.value_off + 4, 8, "u")]
        elif entry.vtype == 8:
            out.append((entry.value_off, 8, "u"))
        elif entry.vtype == 6:
            out.append((entry.value_off, 4, "f"))
        elif entry.vtype in (4, 5):
            out.append((entry.value_off, 4, "u"))
        elif entry.vtype in (10, 11):
            out.append((entry.value_off, 8, "u"))
        elif entry.vtype in (0, 1, 7):
            out.append((entry.value_off, 1, "u"))
    for t in lay.tensors:
        out += [(t.name_off, 8, "u"), (t.ndims_off, 4, "u"), (t.type_off, 4, "u"), (t.offset_off, 8, "u")]
        out += [(t.dims_off + 8 * i, 8, "u") for i in range(len(t.dims))]
    return out, lay.data_start


def _field_value(rng: random.Random, old: int, width: int) -> int:
    mask = (1 << (8 * width)) - 1
    pick = rng.random()
    if pick < 0.6:
        return rng.choice(_INTERESTING[width]) & mask
    if pick < 0.85:
        return (old + rng.choice([-64, -32, -8, -2, -1, 1, 2, 8, 32, 64])) & mask
    return rng.getrandbits(8 * width)


def mutate(seed: int) -> tuple[bytes, list[str]]:
    """A mutated copy of one base file, and a description of each change (reproducible by seed)."""
    rng = random.Random(seed)
    index = rng.randrange(len(base_files()))
    data = bytearray(base_files()[index])
    header_fields, data_start = fields(index)
    notes = [f"base {index}"]
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        op = rng.random()
        header = min(data_start, len(data))
        if op < 0.45:  # a header field set to a boundary value
            off, width, kind = rng.choice(header_fields)
            if off + width > len(data):
                continue
            if kind == "f":
                value = rng.choice(_FLOATS)
                data[off:off + 4] = struct.pack("<f", value)
            else:
                fmt = {1: "<B", 4: "<I", 8: "<Q"}[width]
                value = _field_value(rng, struct.unpack_from(fmt, data, off)[0], width)
                data[off:off + width] = struct.pack(fmt, value)
            notes.append(f"field@{off}/{width}={value!r}")
        elif op < 0.65:  # bit flips in the header
            for _ in range(rng.randint(1, 8)):
                off = rng.randrange(header)
                data[off] ^= 1 << rng.randrange(8)
            notes.append("bitflips")
        elif op < 0.72:  # random bytes in the header
            off = rng.randrange(header)
            n = rng.randint(1, 16)
            data[off:off + n] = rng.randbytes(n)
            notes.append(f"bytes@{off}+{n}")
        elif op < 0.80:  # truncation (anywhere)
            cut = rng.randrange(len(data)) if rng.random() < 0.5 else rng.randrange(header + 64)
            del data[cut:]
            notes.append(f"cut@{cut}")
        elif op < 0.87:  # bytes inserted into or deleted from the header
            off = rng.randrange(header)
            n = rng.choice([1, 4, 8, 16, 33])
            if rng.random() < 0.5:
                data[off:off] = rng.randbytes(n)
                notes.append(f"insert@{off}+{n}")
            else:
                del data[off:off + n]
                notes.append(f"delete@{off}+{n}")
        elif op < 0.94:  # a header chunk copied over another place
            src, dst = rng.randrange(header), rng.randrange(header)
            n = rng.randint(4, 64)
            data[dst:dst + n] = data[src:src + n]
            notes.append(f"copy {src}->{dst}+{n}")
        else:  # weights: NaN, inf or garbage in the tensor data
            if len(data) > data_start + 4:
                off = rng.randrange(data_start, len(data) - 3) & ~3
                data[off:off + 4] = struct.pack("<f", rng.choice(_FLOATS))
                notes.append(f"weight@{off}")
    return bytes(data), notes


def check_answer(answer: dict, notes: list[str]) -> str | None:
    """What is wrong with the child's answer for one file, or None."""
    if answer["status"] == "error":
        return f"Model.load raised {answer['exc']}: {answer['msg']} ({notes})"
    if answer["status"] == "rejected" and answer["elapsed"] > MAX_REJECT_SECONDS:
        return f"rejecting took {answer['elapsed']:.2f} s ({notes})"
    gen_exc = answer.get("gen_exc")
    if gen_exc and gen_exc not in ("GenerationError", "ContextOverflowError", "ValueError", "IndexError",
                                   "MullamaError", "UnicodeDecodeError"):
        return f"a loaded model raised {gen_exc}: {answer.get('gen_msg')} ({notes})"
    return None


def run_fuzz(seconds: float, first_seed: int, folder: Path,
             log: Callable[[str], None] = lambda s: None, keep_going: bool = False) -> dict[str, int]:
    """Fuzz for ``seconds``; returns counts by outcome. Raises AssertionError on the first
    failure, or with ``keep_going`` logs each failure, keeps its file in ``folder`` and goes on."""
    counts = {"iterations": 0, "rejected": 0, "loaded": 0, "gen_errors": 0, "failures": 0}
    path = folder / "fuzz.gguf"
    deadline = time.monotonic() + seconds
    seed = first_seed
    with LoadWorker(timeout=30) as worker:
        while time.monotonic() < deadline:
            data, notes = mutate(seed)
            path.write_bytes(data)
            try:
                answer = worker.load(str(path), use_mmap=seed % 4 != 3, generate=GENERATE_TOKENS)
            except WorkerCrash as crash:
                answer, problem = {"status": "crashed"}, f"{crash} ({notes})\n{crash.stderr[-3000:]}"
            else:
                problem = check_answer(answer, notes)
            if problem:
                keep = folder / f"fail-seed-{seed}.gguf"
                keep.write_bytes(data)
                if not keep_going:
                    raise AssertionError(f"seed {seed}: {problem}\nfile kept at {keep}")
                log(f"FAILURE seed {seed}: {problem[-600:]}")
                counts["failures"] += 1
                seed += 1
                continue
            counts["iterations"] += 1
            counts[answer["status"]] += 1
            counts["gen_errors"] += bool(answer.get("gen_exc"))
            seed += 1
            if counts["iterations"] % 500 == 0:
                log(f"{counts} after {seconds - (deadline - time.monotonic()):.0f} s")
    counts["last_seed"] = seed - 1
    return counts


def test_mutator_is_deterministic_and_mutates() -> None:
    for seed in range(50):
        data, notes = mutate(seed)
        assert (data, notes) == mutate(seed)
        assert len(notes) >= 1
    assert sum(mutate(seed)[0] not in base_files() for seed in range(50)) >= 45


def test_base_files_load_and_generate(tmp_path: Path) -> None:
    with LoadWorker() as worker:
        for i, data in enumerate(base_files()):
            path = tmp_path / f"base-{i}.gguf"
            path.write_bytes(data)
            answer = worker.load(str(path), generate=GENERATE_TOKENS)
            assert answer["status"] == "loaded", answer
            assert "gen_exc" not in answer, answer


def test_fuzz_gguf_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Mutated files are rejected cleanly or load cleanly: never an abort, hang or stray exception."""
    start = time.monotonic()
    counts = run_fuzz(FUZZ_SECONDS, FUZZ_SEED, tmp_path)
    elapsed = time.monotonic() - start
    with capsys.disabled():
        print(f"\nfuzz: {counts} in {elapsed:.1f} s ({counts['iterations'] / elapsed:.0f}/s)")
    assert counts["iterations"] > 0
    # the mutator must exercise both outcomes, or it is not testing much
    assert counts["rejected"] > 0 and counts["loaded"] > 0, counts


def _main(argv: list[str]) -> None:
    """``test_fuzz_gguf.py SEED [OUT]``: write the file of one seed; ``--run SECONDS [SEED]``: fuzz."""
    if argv and argv[0] == "--run":
        import tempfile
        seconds = float(argv[1]) if len(argv) > 1 else 60.0
        seed = int(argv[2]) if len(argv) > 2 else FUZZ_SEED
        folder = Path(os.environ.get("MULLAMA_FUZZ_DIR") or tempfile.mkdtemp(prefix="fuzz-gguf-"))
        start = time.monotonic()
        counts = run_fuzz(seconds, seed, folder, log=lambda s: print(s, flush=True), keep_going=True)
        print(f"{counts} in {time.monotonic() - start:.1f} s; failing files in {folder}")
        return
    seed = int(argv[0])
    data, notes = mutate(seed)
    out = Path(argv[1]) if len(argv) > 1 else Path(f"fuzz-seed-{seed}.gguf")
    out.write_bytes(data)
    print(f"seed {seed}: {notes} -> {out} ({len(data)} bytes)")


if __name__ == "__main__":
    _main(sys.argv[1:])
