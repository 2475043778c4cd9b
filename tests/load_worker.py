"""A child process that loads model files one by one, and the parent-side handle to it.

Loading a malformed file could abort the process (a ``GGML_ASSERT``, an
uncaught C++ exception, a segfault), so tests never load such files in the
pytest process. :class:`LoadWorker` starts ``python load_worker.py``, sends it
one JSON request per line and reads one JSON answer per line; a child that
dies, hangs or prints a crash marker is reported as :class:`WorkerCrash` and
restarted for the next request. One long-lived child keeps the per-file cost
to the load itself (no interpreter start-up per file).

Each answer carries how the load ended (``rejected`` with the exception type
and message, ``loaded``, or ``error`` for any other exception), the wall time,
and the growth of peak RSS during the request (the peak is reset before each
request through ``/proc/self/clear_refs``), so tests can bound time and memory
per file.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _package_parent() -> Path:
    """The folder holding the mullama the tests import (site-packages when installed, the
    checkout when built in place): children get it on PYTHONPATH, never the bare source tree."""
    spec = importlib.util.find_spec("mullama")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).resolve().parent.parent


REPO_ROOT = _package_parent()
CRASH_MARKERS = ("GGML_ASSERT", "terminate called", "Segmentation fault", "Aborted", "core dumped",
                 "AddressSanitizer", "Fatal Python error")
ADDRESS_SPACE_CAP = 4 << 30  # a runaway allocation fails in the child instead of swapping


class WorkerCrash(Exception):
    """The child died or hung while handling a request."""

    def __init__(self, message: str, returncode: int | None, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class LoadWorker:
    """Parent side: ``load(path)`` returns the child's answer or raises :class:`WorkerCrash`."""

    def __init__(self, timeout: float = 20.0, address_space: int = ADDRESS_SPACE_CAP) -> None:
        self.timeout = timeout
        self.address_space = address_space
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._err_path: str | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        env.pop("MULLAMA_LOG", None)
        env["GGML_NO_BACKTRACE"] = "1"  # an abort would otherwise run gdb for a backtrace (slow)
        # stderr goes to a file: a pipe nobody drains could fill up and block the child
        err = tempfile.NamedTemporaryFile(prefix="load-worker-", suffix=".err", delete=False)
        self._err_path = err.name
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(self.address_space)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, cwd=REPO_ROOT)
        err.close()
        return self.proc

    def _stderr(self) -> str:
        if not self._err_path:
            return ""
        try:
            with open(self._err_path, "rb") as fh:
                return fh.read()[-20000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def load(self, path: str, use_mmap: bool = True, generate: int = 0) -> dict[str, Any]:
        """Load ``path`` in the child; with ``generate=n``, also generate n tokens if it loads."""
        proc = self.proc if self.proc is not None and self.proc.poll() is None else self._start()
        request = json.dumps({"path": path, "mmap": use_mmap, "generate": generate}) + "\n"
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(request.encode())
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
            line = proc.stdout.readline() if ready else b""
        except (BrokenPipeError, OSError):
            line = b""
        stderr = self._stderr()
        if not line:
            hung = proc.poll() is None
            self._kill()
            self.restarts += 1
            what = f"hung for {self.timeout} s" if hung else f"died with status {proc.returncode}"
            raise WorkerCrash(f"worker {what} on {path}", proc.returncode, stderr)
        answer = json.loads(line)
        markers = [m for m in CRASH_MARKERS if m in stderr]
        if markers:
            self._kill()
            raise WorkerCrash(f"worker printed {markers} on {path}", None, stderr)
        return answer

    def _kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for fh in (self.proc.stdin, self.proc.stdout):
                if fh is not None:
                    fh.close()
            self.proc = None
        if self._err_path:
            try:
                os.unlink(self._err_path)
            except OSError:
                pass
            self._err_path: str | None = None

    def close(self) -> None:
        """Ask the child to exit and check that it exits cleanly; raises WorkerCrash if not."""
        proc = self.proc
        if proc is None:
            return
        stderr = ""
        try:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=30)
            stderr = self._stderr()
        except (subprocess.TimeoutExpired, OSError):
            pass
        code = proc.poll()
        self._kill()
        if code != 0 or any(m in stderr for m in CRASH_MARKERS):
            raise WorkerCrash(f"worker exited with status {code}", code, stderr)

    def __enter__(self) -> "LoadWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- child side


def _peak_rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # "5" resets the peak RSS (VmHWM) to the current RSS
    except OSError:
        pass


def _rss_kb() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _handle(request: dict[str, Any]) -> dict[str, Any]:
    import mullama

    _reset_peak()
    before = _rss_kb()
    start = time.monotonic()
    answer: dict[str, Any] = {}
    try:
        model = mullama.Model.load(request["path"], use_mmap=request["mmap"])
    except mullama.ModelLoadError as exc:
        answer = {"status": "rejected", "exc": type(exc).__name__, "msg": str(exc),
                  "oserror": isinstance(exc, OSError)}
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        answer = {"status": "error", "exc": type(exc).__name__, "msg": str(exc)}
    else:
        answer = {"status": "loaded", "n_vocab": model.n_vocab}
        try:
            if request.get("generate"):
                answer["text"] = _generate(model, int(request["generate"]))
        except Exception as exc:  # noqa: BLE001
            answer.update(gen_exc=type(exc).__name__, gen_msg=str(exc))
        finally:
            model.close()
    answer["elapsed"] = time.monotonic() - start
    answer["rss_growth_kb"] = max(0, _peak_rss_kb() - before)
    return answer


def _generate(model: Any, n: int) -> str:
    """Tokenize, evaluate and sample a few tokens: hyper-parameters only matter once a graph runs."""
    import mullama

    model.detokenize(model.tokenize("hello world", add_special=True))
    with mullama.Context(model, n_ctx=32, n_batch=16, n_threads=1) as ctx:
        return ctx.generate("ab", max_tokens=n, params=mullama.SamplerParams(temperature=0.0))


def _child_main(address_space: int) -> None:
    import resource

    if address_space > 0:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    # Answers go to a private copy of stdout; fd 1 then points at stderr, so that
    # anything the C++ side prints cannot corrupt the protocol.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    import mullama  # noqa: F401 - imported before the first request, outside its measurement

    for line in sys.stdin:
        if line.strip():
            out.write(json.dumps(_handle(json.loads(line))) + "\n")


if __name__ == "__main__":
    _child_main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
