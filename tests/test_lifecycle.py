"""Lifecycle and process safety: closing, exit with live objects, build switches."""

from __future__ import annotations

import importlib.util
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import mullama
from mullama import Context, Model, SamplerParams

ROOT = Path(__file__).resolve().parent.parent
CRASH_MARKERS = ("GGML_ASSERT", "terminate called", "Segmentation", "Aborted", "Exception ignored")


def _child_args(code: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(mullama.__file__).resolve().parent.parent))
    # run from the tests folder: `python -c` puts the working directory first on sys.path,
    # and a source checkout's mullama/ there would shadow the installed package
    return dict(args=[sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=Path(__file__).resolve().parent)


def _check_no_crash(stderr: str) -> None:
    for marker in CRASH_MARKERS:
        assert marker not in stderr, stderr


def run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(**_child_args(code), capture_output=True, text=True, timeout=timeout)
    _check_no_crash(proc.stderr)
    return proc


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The child's next line of stdout, waiting at most ``timeout`` seconds for it."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            proc.kill()
            pytest.fail(f"no line from the child within {timeout} s (so far {data!r})")
        chunk = os.read(proc.stdout.fileno(), 1)   # one byte: nothing past the line is taken
        if not chunk:
            proc.wait(timeout)
            pytest.fail(f"the child ended (rc {proc.returncode}) after {data!r}: {proc.stderr.read().decode()}")
        data += chunk
    return data.decode()


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
    """Ctrl-C while a stream decodes raises KeyboardInterrupt there and leaves the context usable.

    No step depends on timing: the child says when its first token is out and only then gets
    SIGINT, and its generation cannot end first (end-of-generation tokens are banned, so only
    the 4096-token context would end it: seconds of decoding even on a fast machine). The child
    sets Python's own SIGINT handler, as an interactive session has it: a runner started in the
    background hands its children SIGINT ignored, and then Ctrl-C does nothing."""
    proc = subprocess.Popen(**_child_args(f"""
        import signal, mullama
        signal.signal(signal.SIGINT, signal.default_int_handler)
        m = mullama.Model.load({model_path!r})
        c = mullama.Context(m, n_ctx=4096)
        no_end = {{t: float("-inf") for t in range(m.n_vocab) if m.is_eog(t)}}
        n = 0
        try:
            for _ in c.generate_stream("Tell me a long story", max_tokens=100000,
                                       params=mullama.SamplerParams(temperature=0, logit_bias=no_end)):
                n += 1
                if n == 1:
                    print("generating", flush=True)
            print("finished", n)
        except KeyboardInterrupt:
            print("interrupted", n < 4000)
        print(c.generate("The capital of France is", max_tokens=3,
                         params=mullama.SamplerParams(temperature=0)) != "")
    """), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _read_line(proc, timeout=120) == "generating\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _check_no_crash(err.decode())
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["interrupted", "True", "True"]


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
