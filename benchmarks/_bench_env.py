"""Build and locate the peers that the benchmarks compare mullama against.

Both peers are built from the same llama.cpp that mullama vendors, with native
CPU optimisations, and cached under build/ so that only the first run pays for
compiling. Nothing here times anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import http.client
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "vendor"
PIN_FILE = VENDOR / "llama.cpp.pin"
# the same variables as setup.py: another checkout's llama.cpp and build folder (with its peers) are reused
LLAMA_SRC = Path(os.environ.get("MULLAMA_LLAMA_CPP_DIR", VENDOR / "llama.cpp"))
BUILD = Path(os.environ.get("MULLAMA_BUILD_DIR", ROOT / "build"))
TOOLS_BUILD = BUILD / "bench-tools"
LCP_VENV = BUILD / "bench-venv-lcp"
RESULTS = ROOT / "bench-results"

LCP_VERSION = "0.3.36"
LCP_SDIST = f"llama_cpp_python-{LCP_VERSION}.tar.gz"
LCP_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# llama-server's web UI needs scripts/ and assets that vendor/ does not carry,
# and no benchmark here needs it; the unified `llama` app is not needed either.
TOOLS_CMAKE_ARGS = [
    "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
]
TOOLS_TARGETS = ["llama-bench", "llama-batched-bench", "llama-perplexity"]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def read_pin() -> dict[str, str]:
    pin: dict[str, str] = {}
    for line in PIN_FILE.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            pin[key.strip()] = value.strip()
    return pin


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(cmd: list[str], logfile: Path, env: dict[str, str] | None = None) -> None:
    """Run a (long) build step with its output in a log file, not on the console."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                         f"log: {logfile}\n" + "\n".join(tail))


def ensure_llama_source() -> None:
    if not (LLAMA_SRC / "CMakeLists.txt").is_file():
        log("vendor/llama.cpp is missing: fetching it")
        subprocess.run([sys.executable, str(VENDOR / "fetch_llama_cpp.py")], check=True)


def ensure_llama_bench() -> Path:
    """llama-bench built from vendor/llama.cpp; configure once, then an (incremental) build."""
    ensure_llama_source()
    exe = TOOLS_BUILD / "bin" / "llama-bench"
    if not (TOOLS_BUILD / "CMakeCache.txt").is_file():
        log(f"configuring llama.cpp tools in {TOOLS_BUILD}")
        _run(["cmake", "-S", str(LLAMA_SRC), "-B", str(TOOLS_BUILD), *TOOLS_CMAKE_ARGS],
             TOOLS_BUILD.parent / "bench-tools-config.log")
    if not exe.is_file():
        log("building llama-bench (a few minutes on 2 cores; cached afterwards)")
    # ninja makes this a no-op when nothing changed, and rebuilds after a re-vendor
    _run(["cmake", "--build", str(TOOLS_BUILD), "--target", *TOOLS_TARGETS,
          "-j", str(os.cpu_count() or 2)], TOOLS_BUILD.parent / "bench-tools-build.log")
    return exe


def ensure_llama_embedding() -> Path:
    """llama-embedding, linked into the tools build against the libraries it already has.

    llama-embedding is one of llama.cpp's examples/, which vendor/ does not carry (and
    which the tools build does not configure): its single source file is taken from
    the pinned sdist (sha256 checked) and compiled with the flags and libraries of
    llama-perplexity, a tool of the same build, so nothing else is rebuilt.
    """
    ensure_llama_bench()  # the tools build, with llama-perplexity's libraries
    exe = TOOLS_BUILD / "bin" / "llama-embedding"
    src = TOOLS_BUILD / "embedding" / "embedding.cpp"
    if exe.is_file() and src.is_file() and exe.stat().st_mtime >= (TOOLS_BUILD / "src" / "libllama.a").stat().st_mtime:
        return exe
    member = f"{read_pin()['sdist_folder']}/examples/embedding/embedding.cpp"
    with tarfile.open(_lcp_sdist()) as tar:
        data = tar.extractfile(member)
        if data is None:
            raise SystemExit(f"{member} is not in the sdist")
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(data.read())
    entries = json.loads((TOOLS_BUILD / "compile_commands.json").read_text())
    ref = next(e for e in entries if e["file"].endswith("tools/perplexity/main.cpp"))
    obj = src.with_suffix(".o")
    argv = shlex.split(ref["command"])
    argv[argv.index("-o") + 1] = str(obj)
    argv[argv.index("-c") + 1] = str(src)
    argv = [a for a in argv if not a.startswith("-I") or not a.endswith("tools/perplexity")]
    link = subprocess.run(["ninja", "-C", str(TOOLS_BUILD), "-t", "commands", "bin/llama-perplexity"],
                          capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    # ": && c++ FLAGS main.o -o bin/llama-perplexity LIBS && :" -> the same with our object
    link = link.strip(": &")
    head, _, libs = link.partition(" -o bin/llama-perplexity ")
    compiler_flags = [w for w in head.split() if not w.endswith(".o")]
    libs_list = [w for w in libs.split() if "perplexity" not in w]
    log("building llama-embedding (one file, linked against the cached tools libraries)")
    _run(argv, TOOLS_BUILD.parent / "bench-embedding-build.log")
    _run([*compiler_flags, str(obj), "-o", str(exe), *[
        w if w.startswith("-") or w.startswith("/") else str(TOOLS_BUILD / w) for w in libs_list]],
        TOOLS_BUILD.parent / "bench-embedding-link.log")
    return exe


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _lcp_sdist() -> Path:
    """The pinned sdist from mullama's cache (fetch_llama_cpp.py puts it there)."""
    cache = Path(os.environ.get("MULLAMA_CACHE_DIR", Path.home() / ".cache" / "mullama"))
    sdist = cache / "sdist" / LCP_SDIST
    if not sdist.is_file():
        log(f"{sdist} is missing: downloading it with pip")
        sdist.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "-d", str(sdist.parent), f"llama-cpp-python=={LCP_VERSION}"], check=True)
    if _sha256(sdist) != LCP_SHA256:
        raise SystemExit(f"{sdist}: sha256 mismatch, refusing to build it")
    return sdist


def lcp_python() -> Path:
    return LCP_VENV / "bin" / "python"


def ensure_llama_cpp_python() -> Path:
    """A venv with llama-cpp-python built from the pinned sdist; reused when it imports."""
    py = lcp_python()
    probe = "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != %r)" % LCP_VERSION
    if py.is_file() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return py
    sdist = _lcp_sdist()
    if LCP_VENV.exists():
        shutil.rmtree(LCP_VENV)
    log(f"creating {LCP_VENV}")
    subprocess.run([sys.executable, "-m", "venv", str(LCP_VENV)], check=True)
    env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON",
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    log(f"building llama-cpp-python {LCP_VERSION} from {sdist} (several minutes; cached afterwards)")
    _run([str(py), "-m", "pip", "install", "--no-cache-dir", str(sdist)],
         BUILD / "bench-venv-lcp-install.log", env=env)
    if subprocess.run([str(py), "-c", probe]).returncode != 0:
        raise SystemExit("llama-cpp-python was installed but does not import")
    return py


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(exe: Path, args: list[str], timeout: float = 120.0) -> tuple[subprocess.Popen, int]:
    """Start ``llama-server`` with ``args`` on a free loopback port; return it and the port once
    ``/health`` answers 200."""
    port = free_port()
    cmd = [str(exe), *args, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("llama-server did not become healthy: " + " ".join(cmd))


def stream_completion(port: int, body: dict) -> tuple[list[float], list[str], dict]:
    """POST ``body`` to llama-server's streamed ``/completion``: the arrival time of each
    event (``time.perf_counter()``), its text, and the final event."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    stamps: list[float] = []
    pieces: list[str] = []
    final: dict = {}
    conn.request("POST", "/completion", json.dumps(dict(body, stream=True)), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"llama-server answered {resp.status}: {resp.read()[:500]!r}")
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        event = json.loads(line[5:])
        if event.get("stop"):
            final = event
            break
        stamps.append(time.perf_counter())
        pieces.append(event.get("content", ""))
    conn.close()
    return stamps, pieces, final
