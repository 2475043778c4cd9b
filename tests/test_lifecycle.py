"""Lifecycle and process safety: closing, exit with live objects, build switches."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mullama
from mullama import Context, Model, SamplerParams

ROOT = Path(__file__).resolve().parent.parent
CRASH_MARKERS = ("GGML_ASSERT", "terminate called", "Segmentation", "Aborted", "Exception ignored")


def run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(mullama.__file__).resolve().parent.parent))
    # run from the tests folder: `python -c` puts the working directory first on sys.path,
    # and a source checkout's mullama/ there would shadow the installed package
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=Path(__file__).resolve().parent)
    for marker in CRASH_MARKERS:
        assert marker not in proc.stderr, proc.stderr
    return proc


def test_model_close_closes_its_contexts(model_path):
    m = Model.load(model_path)
    c = Context(m, n_ctx=128)
    stream = c.generate_stream("Hello", max_tokens=50, params=SamplerParams(temperature=0))
    next(stream)
    m.close()
    m.close()
    assert c.closed and m.closed
    with pytest.raises(mullama.ClosedError):
        next(stream)
    with pytest.raises(mullama.ClosedError):
        c.generate("Hello", max_tokens=1)
    with pytest.raises(mullama.ClosedError):
        m.tokenize("Hello")
    with pytest.raises(mullama.ClosedError):
        Context(m)


def test_two_models_free_one_keep_the_other(model_path):
    a, b = Model.load(model_path), Model.load(model_path)
    ca, cb = Context(a, n_ctx=128), Context(b, n_ctx=128)
    expected = ca.generate("Hi", max_tokens=4, params=SamplerParams(temperature=0))
    a.close()
    assert cb.generate("Hi", max_tokens=4, params=SamplerParams(temperature=0)) == expected
    b.close()


def test_exit_with_live_objects_is_clean(model_path):
    proc = run_child(f"""
        import mullama
        m = mullama.Model.load({model_path!r})
        c = mullama.Context(m, n_ctx=256)
        s = c.generate_stream("Hello there", max_tokens=100)
        print(next(s) is not None)
        # exit without closing anything, mid-stream
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_keyboard_interrupt_during_generation(model_path):
    proc = run_child(f"""
        import _thread, threading, mullama
        m = mullama.Model.load({model_path!r})
        c = mullama.Context(m, n_ctx=512)
        threading.Timer(0.5, _thread.interrupt_main).start()
        try:
            for _ in c.generate_stream("Tell me a long story", max_tokens=100000):
                pass
        except KeyboardInterrupt:
            print("interrupted")
        print(c.generate("The capital of France is", max_tokens=3,
                         params=mullama.SamplerParams(temperature=0)) != "")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["interrupted", "True"]


def _load_setup_module():
    spec = importlib.util.spec_from_file_location("mullama_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_cuda_request_without_toolkit_fails_clearly(monkeypatch, tmp_path):
    setup = _load_setup_module()
    monkeypatch.setenv("MULLAMA_CUDA", "1")
    monkeypatch.setenv("PATH", str(tmp_path))
    for var in ("CUDAToolkit_ROOT", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match="CUDA toolkit"):
        setup.check_cuda_toolkit()
    monkeypatch.setenv("MULLAMA_CUDA", "0")
    setup.check_cuda_toolkit()
    assert "-DGGML_CUDA=ON" not in setup.cmake_args(tmp_path)


def test_exit_with_a_running_batch_engine_is_clean(model_path):
    proc = run_child(f"""
        import anyio, mullama
        async def main():
            m = mullama.AsyncModel(mullama.Model.load({model_path!r}), n_ctx=256, n_parallel=2)
            s = await m.generate_stream("Hello there", mullama.StreamConfig(max_tokens=10000))
            print((await s.next()) is not None)
            # leave without closing: the engine is still decoding
        anyio.run(main)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
