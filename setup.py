"""Build mullama: llama.cpp with CMake (cached), then the Cython extensions.

Environment variables:
  MULLAMA_LLAMA_CPP_DIR   build against this llama.cpp checkout instead of the
                          pinned source in vendor/llama.cpp
  MULLAMA_CUDA=1          build ggml's CUDA backend (needs the CUDA toolkit)
  MULLAMA_RPC=1           build ggml's RPC backend into the libraries (own cached build folder)
  MULLAMA_CMAKE_ARGS      extra arguments for llama.cpp's CMake configure step
  MULLAMA_NATIVE=0        do not optimise for the build machine's CPU
  MULLAMA_BUILD_DIR       where the cached CMake build lives (default: build/)
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "mullama"


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("", "0", "false", "no", "off")


def llama_source_dir() -> Path:
    custom = os.environ.get("MULLAMA_LLAMA_CPP_DIR")
    if custom:
        path = Path(custom).expanduser().resolve()
        if not (path / "include" / "llama.h").exists():
            raise SystemExit(f"MULLAMA_LLAMA_CPP_DIR={custom} does not look like a llama.cpp checkout")
        return path
    sys.path.insert(0, str(ROOT / "vendor"))
    try:
        import fetch_llama_cpp
    finally:
        sys.path.pop(0)
    return fetch_llama_cpp.ensure()


def cmake_args(install_dir: Path) -> list[str]:
    native = _flag("MULLAMA_NATIVE", "1")
    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_INSTALL_PREFIX={install_dir}",
        "-DCMAKE_INSTALL_LIBDIR=lib",
        "-DCMAKE_INSTALL_RPATH=$ORIGIN",
        "-DBUILD_SHARED_LIBS=ON",
        "-DLLAMA_BUILD_COMMON=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_TOOLS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DGGML_BACKEND_DL=OFF",
        f"-DGGML_NATIVE={'ON' if native else 'OFF'}",
    ]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    if shutil.which("ccache"):
        args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    if _flag("MULLAMA_CUDA"):
        args.append("-DGGML_CUDA=ON")
    if _flag("MULLAMA_RPC"):
        args.append("-DGGML_RPC=ON")
    # ggml's own thread pool (persistent per context, hybrid polling) instead of OpenMP:
    # OpenMP's spinning teams lose a core whenever another thread of the process (the
    # event loop taking tokens, a second context's team) wakes, which cost async streams
    # 6-10% of decode speed on a 2-core machine; with the pool they run at 0.97x sync.
    args.append("-DGGML_OPENMP=OFF")
    args += shlex.split(os.environ.get("MULLAMA_CMAKE_ARGS", ""))
    return args


def check_cuda_toolkit() -> None:
    if not _flag("MULLAMA_CUDA"):
        return
    roots = [os.environ.get(k) for k in ("CUDAToolkit_ROOT", "CUDA_HOME", "CUDA_PATH")]
    has_nvcc = shutil.which("nvcc") or any(r and (Path(r) / "bin" / "nvcc").exists() for r in roots)
    if not has_nvcc:
        raise SystemExit(
            "mullama: MULLAMA_CUDA=1 asks for ggml's CUDA backend, but no CUDA toolkit was found "
            "(no nvcc on PATH, and CUDAToolkit_ROOT / CUDA_HOME do not point at one). Install the "
            "CUDA toolkit, or unset MULLAMA_CUDA for a CPU build."
        )


def llama_build_dir(src: Path) -> Path:
    """The cached CMake build folder for ``src``: its key hashes every CMake argument (the switches too)."""
    base = Path(os.environ.get("MULLAMA_BUILD_DIR", ROOT / "build")).resolve()
    probe = cmake_args(Path("/"))
    key = hashlib.sha256(("\0".join([str(src)] + probe)).encode()).hexdigest()[:10]
    backends = ("cuda" if _flag("MULLAMA_CUDA") else "cpu") + ("-rpc" if _flag("MULLAMA_RPC") else "")
    return base / f"llama-{backends}-{key}"


def build_llama(src: Path) -> Path:
    """Configure, build and install llama.cpp; return the install prefix.

    The build folder is keyed by the source path and the CMake arguments, so a
    rebuild after editing a .pyx reuses it and ninja finds nothing to do.
    """
    check_cuda_toolkit()
    build_dir = llama_build_dir(src)
    install_dir = build_dir / "install"
    args = cmake_args(install_dir)
    cmake = shutil.which("cmake") or "cmake"
    jobs = str(os.cpu_count() or 2)
    ninja = shutil.which("ninja")
    if ninja:
        # pip builds in a fresh temporary environment each time: point the cached build
        # at this run's ninja (the one recorded last time may be gone)
        args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
    try:
        # configuring again is quick, and it also refreshes the cmake path recorded in the cache
        subprocess.run([cmake, "-S", str(src), "-B", str(build_dir), *args], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([cmake, "--build", str(build_dir), "--config", "Release", "-j", jobs], check=True)
        subprocess.run([cmake, "--install", str(build_dir), "--config", "Release"], check=True,
                       stdout=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        hint = ""
        if _flag("MULLAMA_CUDA"):
            hint = " (MULLAMA_CUDA=1: check that the CUDA toolkit is complete and matches your compiler)"
        raise SystemExit(f"mullama: building llama.cpp failed: {exc}{hint}") from exc
    return install_dir


def shared_libraries(install_dir: Path) -> list[tuple[str, Path]]:
    """The llama/ggml shared objects under the names the dynamic linker asks for.

    CMake installs libX.so.MAJOR.MINOR.PATCH plus the links libX.so.MAJOR (the
    soname, recorded in the extensions) and libX.so; only the soname is needed.
    """
    soname = re.compile(r"^lib[\w.+-]+?\.so\.\d+$")
    return [(lib.name, lib.resolve()) for lib in sorted((install_dir / "lib").iterdir())
            if soname.match(lib.name)]


def _replace_file(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)


class BuildExt(build_ext):
    """Build llama.cpp first, then link the extensions against its shared libraries."""

    def run(self) -> None:
        src = llama_source_dir()
        install_dir = build_llama(src)
        include_dirs = [str(ROOT / "include"), str(install_dir / "include")]
        for ext in self.extensions:
            ext.include_dirs[:0] = include_dirs
            if getattr(ext, "_links_llama", False):
                ext.library_dirs.append(str(install_dir / "lib"))
                ext.libraries += ["llama", "ggml", "ggml-cpu", "ggml-base"]
                ext.runtime_library_dirs.append("$ORIGIN/../lib")
        from Cython.Build import cythonize

        compiled = cythonize(
            list(self.extensions),
            compiler_directives={"language_level": "3", "boundscheck": False,
                                 "cdivision": True, "embedsignature": True},
            quiet=True,
        )
        # keep setuptools' own Extension objects (they carry its build state)
        for ext, done in zip(self.extensions, compiled):
            ext.sources = done.sources
        super().run()
        self._install_libraries(install_dir)

    def build_extensions(self) -> None:
        # The Cython output is C and the guard is C++: the C++ standard flag goes to
        # .cpp files only (gcc warns about it on C). Linking a module with a .cpp
        # source uses the C++ driver, so libstdc++ comes along.
        compile_one = getattr(self.compiler, "_compile", None)
        if compile_one is None:  # not a Unix compiler: leave its defaults alone
            super().build_extensions()
            return

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):  # type: ignore[no-untyped-def]
            if Path(src).suffix == ".cpp":
                extra_postargs = [*extra_postargs, CXX_STD]
            compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = _compile
        super().build_extensions()

    def copy_extensions_to_source(self) -> None:
        # Replace in-place modules atomically: overwriting a loaded .so in place
        # crashes every process that has it mapped.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            fullname = self.get_ext_fullname(ext.name)
            filename = self.get_ext_filename(fullname)
            package = ".".join(fullname.split(".")[:-1])
            dest = Path(build_py.get_package_dir(package)) / Path(filename).name
            _replace_file(Path(self.build_lib) / filename, dest)

    def _install_libraries(self, install_dir: Path) -> None:
        targets = [Path(self.build_lib) / "mullama" / "lib"]
        if self.inplace:
            targets = [PACKAGE / "lib"]
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
            for name, real in shared_libraries(install_dir):
                dest = target / name
                if not dest.exists() or dest.stat().st_mtime < real.stat().st_mtime or \
                        dest.stat().st_size != real.stat().st_size:
                    _replace_file(real, dest)


# llama.cpp throws C++ exceptions from some calls; every extension that calls it
# gets this small C++ layer, which catches them (mll_guard.h)
GUARD_SOURCE = "include/mullama/mll_guard.cpp"
CXX_STD = "-std=c++17"


def extension(name: str, links_llama: bool) -> Extension:
    native = _flag("MULLAMA_NATIVE", "1")
    # no errno and no trapping math: lets the compiler vectorise the logits reductions
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math"] + (["-march=native"] if native else [])
    include = ROOT / "include" / "mullama"
    ext = Extension(
        f"mullama._engine.{name}",
        [f"mullama/_engine/{name}.pyx"] + ([GUARD_SOURCE] if links_llama else []),
        # our C/C++ sources and declarations: editing one rebuilds the modules that use it
        depends=sorted(str(p.relative_to(ROOT)) for p in [*include.glob("*.h"), *include.glob("*.cpp"),
                                                          *(PACKAGE / "_engine").glob("*.pxd")]),
        include_dirs=[],
        extra_compile_args=flags,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    ext._links_llama = links_llama  # type: ignore[attr-defined]
    return ext


if __name__ == "__main__":
    setup(
        ext_modules=[
            extension("_text", links_llama=False),
            extension("_ring", links_llama=False),
            extension("_model", links_llama=True),
            extension("_sampler", links_llama=True),
            extension("_core", links_llama=True),
            extension("_engine", links_llama=True),
        ],
        cmdclass={"build_ext": BuildExt},
    )
