"""The model store (mullama.store): references, safe file names, list / rm / resolve, and their CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from gguf import GGUFValueType as VT
from hypothesis import given, settings
from hypothesis import strategies as st

from mullama import ModelNotFoundError, cli, default_model, store
from gguf_factory import tiny_model_bytes


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MULLAMA_HF_ENDPOINT", raising=False)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tiny() -> bytes:
    return tiny_model_bytes()


@pytest.fixture()
def fake_default(home: Path, monkeypatch: pytest.MonkeyPatch, tiny: bytes) -> Path:
    """The default model as a tiny file, so that tests need not assemble 253 MB."""
    path = home / "models" / default_model.DEFAULT_MODEL_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(tiny)
    monkeypatch.setattr(default_model, "default_model_path", lambda: path)
    return path


def put(home: Path, name: str, data: bytes) -> Path:
    path = home / "models" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- references


def test_default_and_alias_references(home):
    ref = store.parse_ref("gemma3:270m")
    assert ref.embedded and ref.filename == default_model.DEFAULT_MODEL_FILE
    assert ref.sha256 == default_model.DEFAULT_MODEL_SHA256
    ref = store.parse_ref("Qwen2.5:0.5B")
    assert ref.name == "qwen2.5:0.5b" and not ref.embedded and ref.sha256 is None
    assert ref.url == ("https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF/resolve/main/"
                       "qwen2.5-0.5b-instruct-q4_k_m.gguf")
    for alias in ("llama3.2:1b", "smollm2:135m"):
        ref = store.parse_ref(alias)
        assert ref.url.startswith("https://huggingface.co/") and ref.filename.endswith(".gguf")
    with pytest.raises(ValueError, match="unknown model 'mystery:7b'.*hf:OWNER/REPO/FILE.gguf"):
        store.parse_ref("mystery:7b")


def test_hf_reference_and_endpoint_override(home, monkeypatch):
    ref = store.parse_ref("hf:me/my-repo/dir/My Model.gguf")
    assert ref.filename == "My Model.gguf"
    assert ref.url == "https://huggingface.co/me/my-repo/resolve/main/dir/My%20Model.gguf"
    monkeypatch.setenv("MULLAMA_HF_ENDPOINT", "http://127.0.0.1:8080/")
    assert store.parse_ref("hf:a/b/c.gguf").url == "http://127.0.0.1:8080/a/b/resolve/main/c.gguf"
    monkeypatch.setenv("MULLAMA_HF_ENDPOINT", "ftp://mirror")
    with pytest.raises(ValueError, match="MULLAMA_HF_ENDPOINT"):
        store.parse_ref("hf:a/b/c.gguf")


@pytest.mark.parametrize("ref", [
    "hf:a/b", "hf:a/b/", "hf:a/../c.gguf", "hf:a/b/../../c.gguf", "hf:a/b/./c.gguf", "hf:a//b/c.gguf",
    "hf:a/b/c.bin", "hf:a/b/.c.gguf", "hf:a/b/c%2F..gguf", "hf:a/b/c\\d.gguf",
])
def test_bad_hf_references(ref):
    with pytest.raises(ValueError):
        store.parse_ref(ref)


def test_url_references(home):
    ref = store.parse_ref("https://example.com/models/x-Q8_0.gguf?download=true")
    assert ref.filename == "x-Q8_0.gguf" and ref.url.endswith("?download=true")
    assert store.parse_ref("http://h/a%20b.gguf").filename == "a b.gguf"
    for url in ("https://example.com/", "https://example.com/dl?f=x.gguf", "https:///x.gguf",
                "https://h/..%2F..%2Fx.gguf", "https://h/%2E%2E", "https://h/.hidden.gguf",
                "https://h/a%00.gguf"):
        with pytest.raises(ValueError):
            store.parse_ref(url)


# ---------------------------------------------------------------- safe file names


@pytest.mark.parametrize("name", [
    "", ".gguf", "../x.gguf", "..", "a/b.gguf", "/etc/x.gguf", "a\\b.gguf", "a\x00.gguf", "a\n.gguf",
    ".hidden.gguf", "model.bin", "model.gguf.part", "x" * 300 + ".gguf",
])
def test_unsafe_file_names_are_rejected(home, name):
    with pytest.raises(ValueError):
        store.safe_filename(name)
    with pytest.raises(ValueError):
        store.store_path(name)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("./\\\x00a.~ ") | st.characters(), max_size=20))
def test_a_store_path_never_leaves_the_store(name):
    for candidate in (name, name + ".gguf"):
        try:
            path = store.store_path(candidate)
        except ValueError:
            continue
        folder = store.models_dir()
        assert path.parent == folder and Path(os.path.abspath(path)).parent == Path(os.path.abspath(folder))
        assert path.name == candidate and not candidate.startswith(".")


# ---------------------------------------------------------------- list, quantisation


def test_list_shows_name_size_and_quantisation(home, tiny, fake_default):
    q4 = tiny_model_bytes({"general.file_type": (15, VT.UINT32)})
    guessed = tiny_model_bytes({"general.file_type": (7 | 1024, VT.UINT32)})
    put(home, "SmolLM2-135M-Instruct-Q4_K_M.gguf", q4)
    put(home, "guessed.gguf", guessed)
    put(home, "broken.gguf", b"GGUF\x03\x00\x00\x00junk")
    put(home, "half.gguf.part", tiny[:100])
    put(home, ".hidden.gguf", tiny)
    records = {r.name: r for r in store.list_models()}
    assert sorted(records) == ["broken.gguf", "gemma3:270m", "guessed.gguf", "smollm2:135m"]
    assert records["smollm2:135m"].quantization == "Q4_K_M"
    assert records["smollm2:135m"].size == len(q4)
    assert records["guessed.gguf"].quantization == "Q8_0"
    assert records["gemma3:270m"].quantization == "F32"  # no file_type: the type of the matrices
    assert records["gemma3:270m"].path == fake_default
    assert records["broken.gguf"].quantization is None


def test_list_of_a_missing_store_is_empty(home):
    assert store.list_models() == []


def test_quantisation_of_the_real_default_model(model_path):
    assert store.read_quantization(model_path) == "Q4_K_M"


# ---------------------------------------------------------------- resolve, remove


def test_resolve(home, tiny, fake_default, tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(tiny)
    assert store.resolve(str(outside)) == outside
    assert store.resolve(outside) == outside
    assert store.resolve("gemma3:270m") == fake_default
    stored = put(home, "Llama-3.2-1B-Instruct-Q4_K_M.gguf", tiny)
    for name in ("llama3.2:1b", "Llama-3.2-1B-Instruct-Q4_K_M", "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
                 "hf:bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf"):
        assert store.resolve(name) == stored
    monkeypatch.chdir(tmp_path)
    assert store.resolve("elsewhere.gguf") == Path("elsewhere.gguf")  # a path in the current folder


def test_resolve_missing_models_says_what_to_do(home):
    with pytest.raises(ModelNotFoundError, match="run: mullama pull smollm2:135m"):
        store.resolve("smollm2:135m")
    with pytest.raises(ModelNotFoundError, match="not in the store.*pass the path of a GGUF file"):
        store.resolve("nothing-here")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        store.resolve("/no/such/model.gguf")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        store.resolve("../model.gguf")
    with pytest.raises(ModelNotFoundError, match="empty"):
        store.resolve(" ")


def test_remove(home, tiny, fake_default):
    path = put(home, "Qwen2.5-x.gguf", tiny)
    part = put(home, "Qwen2.5-x.gguf.part", tiny[:10])
    assert store.remove("Qwen2.5-x") == path
    assert not path.exists() and not part.exists()
    with pytest.raises(ModelNotFoundError, match="'Qwen2.5-x' is not in the store"):
        store.remove("Qwen2.5-x")
    stamp = put(home, default_model.DEFAULT_MODEL_FILE + ".verified", b"{}")
    assert store.remove("gemma3:270m") == fake_default
    assert not fake_default.exists() and not stamp.exists()
    with pytest.raises(ValueError):
        store.remove("../../etc/passwd.gguf")


# ---------------------------------------------------------------- CLI


def test_cli_list_table_and_json(home, tiny, fake_default, capsys):
    put(home, "a.gguf", tiny)
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "QUANT", "PATH"]
    assert lines[1].split()[0] == "a.gguf" and lines[1].split()[-1] == str(home / "models" / "a.gguf")
    assert lines[2].split()[:4] == ["gemma3:270m", f"{len(tiny) / 1000:.1f}", "kB", "F32"]
    assert cli.main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[1] == {"name": "gemma3:270m", "path": str(fake_default), "size": len(tiny),
                       "quantization": "F32"}


def test_cli_list_empty_and_rm_errors(home, capsys):
    assert cli.main(["list"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no models in" in captured.err and "mullama pull" in captured.err
    assert cli.main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli.main(["rm", "llama3.2:1b"]) == 1
    assert capsys.readouterr().err.startswith("mullama: error: model 'llama3.2:1b' is not in the store")
    assert cli.main(["rm", "../x.gguf"]) == 1
    assert "path separator" in capsys.readouterr().err


def test_cli_pull_default_model_offline(home, fake_default, capsys):
    assert cli.main(["pull", "gemma3:270m"]) == 0
    assert capsys.readouterr().out.strip() == str(fake_default)


def test_cli_run_accepts_store_names(home, capsys):
    assert cli.main(["run", "--model", "smollm2:135m", "--no-stats", "hi"]) == 1
    assert "run: mullama pull smollm2:135m" in capsys.readouterr().err
