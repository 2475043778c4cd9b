"""Build switches of setup.py that need no build to check: CMake arguments and the cache key."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")


def _setup_module():
    spec = importlib.util.spec_from_file_location("mullama_setup_switches", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rpc_switch_adds_the_backend_and_its_own_build_folder(monkeypatch, tmp_path):
    setup = _setup_module()
    monkeypatch.setenv("MULLAMA_BUILD_DIR", str(tmp_path))
    monkeypatch.delenv("MULLAMA_CUDA", raising=False)
    monkeypatch.delenv("MULLAMA_RPC", raising=False)
    src = tmp_path / "llama.cpp"
    plain_args, plain_dir = setup.cmake_args(tmp_path), setup.llama_build_dir(src)
    assert "-DGGML_RPC=ON" not in plain_args
    monkeypatch.setenv("MULLAMA_RPC", "1")
    assert "-DGGML_RPC=ON" in setup.cmake_args(tmp_path)
    rpc_dir = setup.llama_build_dir(src)
    assert rpc_dir != plain_dir and rpc_dir.name.startswith("llama-cpu-rpc-")
    assert rpc_dir.parent == plain_dir.parent == tmp_path.resolve()
    monkeypatch.setenv("MULLAMA_RPC", "0")
    assert setup.llama_build_dir(src) == plain_dir
