"""C++ exceptions thrown inside llama.cpp never reach Python's C extensions.

llama.cpp throws from paths its C API does not catch; through a C extension
such an exception calls std::terminate and the interpreter dies of SIGABRT.
mullama routes those calls through ``include/mullama/mll_guard.cpp``, which
catches every exception and returns an error code that becomes a Python
exception. Each case here builds a tiny model whose vocabulary makes
llama.cpp's tokenizer throw, loads it in a child process (the GGUF validator
switched off in that child only, so the file reaches llama.cpp), and checks
that the child gets a clear :class:`mullama.TokenizerError`, can still use the
model, and exits normally. Without the guard both children abort.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
from gguf import GGUFValueType as VT

import gguf_factory as gf
import mullama
from load_worker import CRASH_MARKERS, REPO_ROOT
from mullama.errors import cxx_exception

CHILD_TIMEOUT_S = 60
MARKER = "CHILD-EXITED-NORMALLY"


def spm_newline_byte_missing() -> bytes:
    """SentencePiece vocabulary whose <0x0A> is renamed: tokenizing a newline looks up a
    byte token that is not there (std::out_of_range from unordered_map::at)."""
    tokens = gf.vocab(gf.N_VOCAB)[0]
    tokens[3 + 0x0A] = "\u2581nl"
    return gf.tiny_model_bytes(tokens=tokens)


def ugm_charsmap_out_of_bounds() -> bytes:
    """T5 (Unigram) vocabulary whose precompiled charsmap holds a 128-node XCDA array:
    ASCII (all the loader itself tokenizes) stays inside it, a byte >= 0x80 indexes
    past its end (std::runtime_error "Index out of array bounds in XCDA array!").
    The GGUF validator accepts this file: without the guard, ``Model.load(path)`` followed
    by ``tokenize("café")`` killed the process even with validation on."""
    n_nodes = 128
    charsmap = struct.pack("<I", 4 * n_nodes) + bytes(4 * n_nodes) + b"\0"
    return gf.tiny_model_bytes(kv={"tokenizer.ggml.model": ("t5", VT.STRING),
                                   "tokenizer.ggml.precompiled_charsmap": (charsmap, VT.ARRAY)})


# id -> (builder, text that makes tokenize throw, text that tokenizes fine, fragments of the message)
CASES: dict[str, tuple[Callable[[], bytes], str, str, tuple[str, ...]]] = {
    "spm-newline-byte-missing": (spm_newline_byte_missing, "a\nb", "ab",
                                 ("std::out_of_range", "unordered_map::at")),
    "ugm-charsmap-out-of-bounds": (ugm_charsmap_out_of_bounds, "caf\u00e9", "cafe",
                                   ("std::runtime_error", "XCDA array")),
}

CHILD = """
    import json, sys
    import mullama, mullama.model
    # this child only: let the file reach llama.cpp
    mullama.model.validate_gguf_file = lambda path: frozenset()
    path, bad, good = sys.argv[1], sys.argv[2], sys.argv[3]
    out = {}
    model = mullama.Model.load(path)
    try:
        model.tokenize(bad)
    except Exception as exc:
        out["exc"] = type(exc).__name__
        out["mro"] = [c.__name__ for c in type(exc).__mro__]
        out["msg"] = str(exc)
    else:
        out["exc"] = None
    # the model is still usable after the failed call
    out["good"] = model.tokenize(good)
    ids = list(range(model.n_vocab))
    out["detok_len"] = len(model.detokenize_bytes(ids, special=True))
    out["pieces"] = sum(len(model.token_to_piece(i, special=True)) for i in ids)
    model.close()
    print(json.dumps(out))
    print(%r)
""" % MARKER


def run_child(path: Path, bad: str, good: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("MULLAMA_LOG", None)
    env["GGML_NO_BACKTRACE"] = "1"  # an abort would otherwise run gdb for a backtrace (slow)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(path), bad, good],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, cwd=REPO_ROOT)


@pytest.mark.parametrize("case", list(CASES))
def test_tokenizer_exception_becomes_python_error(case: str, tmp_path: Path) -> None:
    build, bad, good, fragments = CASES[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(build())
    proc = run_child(path, bad, good)
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        pytest.fail(f"the child was killed by {name}: a C++ exception crossed into Python\n"
                    f"{proc.stderr[-3000:]}")
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    for marker in CRASH_MARKERS:
        assert marker not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1:] == [MARKER], proc.stdout
    out = json.loads(lines[-2])
    assert out["exc"] == "TokenizerError", out
    assert {"MullamaError", "RuntimeError"} <= set(out["mro"]), out
    msg = out["msg"]
    assert msg.startswith("tokenize failed: llama.cpp threw "), msg
    assert all(f in msg for f in fragments), msg
    assert str(path) in msg, msg
    assert out["good"] and all(isinstance(t, int) for t in out["good"]), out
    assert out["detok_len"] > 0 and out["pieces"] > 0, out


def test_cxx_exception_message() -> None:
    exc = cxx_exception("tokenize", "std::out_of_range: unordered_map::at", mullama.TokenizerError,
                        "the vocabulary is broken")
    assert isinstance(exc, mullama.TokenizerError)
    assert isinstance(exc, mullama.MullamaError) and isinstance(exc, RuntimeError)
    assert str(exc) == ("tokenize failed: llama.cpp threw std::out_of_range: unordered_map::at "
                        "(the vocabulary is broken)")
    assert str(cxx_exception("decode", "")) == "decode failed: llama.cpp threw an unknown C++ exception"


def test_builders_change_what_they_claim() -> None:
    tokens = gf.vocab(gf.N_VOCAB)[0]
    assert tokens[3 + 0x0A] == "<0x0A>"
    assert "<0x0A>".encode() not in spm_newline_byte_missing()
    assert b"precompiled_charsmap" in ugm_charsmap_out_of_bounds()
