"""The command line and the default model."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mullama
from mullama import default_model


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(mullama.__file__).resolve().parent.parent))
    return subprocess.run([sys.executable, "-m", "mullama", *args], capture_output=True, text=True,
                          timeout=180, env=env, input=stdin, cwd=Path(__file__).resolve().parent)


def test_run_streams_text_and_prints_stats(model, greedy):
    proc = run_cli("run", "--max-tokens", "12", "--temperature", "0", "The capital of France is")
    assert proc.returncode == 0, proc.stderr
    with mullama.Context(model, n_ctx=2048) as ctx:
        expected = ctx.generate("The capital of France is", max_tokens=12, params=greedy)
    assert proc.stdout.rstrip("\n") == expected
    assert "prompt 6 tokens" in proc.stderr and "generated 12 tokens" in proc.stderr
    assert "first token" in proc.stderr and "tok/s" in proc.stderr


def test_run_with_chat_stop_seed_and_stdin():
    proc = run_cli("run", "--chat", "--seed", "3", "-n", "8", "--stop", "\n", "--no-stats", stdin="Hello!")
    assert proc.returncode == 0, proc.stderr
    assert "\n" not in proc.stdout.rstrip("\n") and proc.stderr == ""


def test_run_with_a_grammar_file(tmp_path):
    grammar = tmp_path / "answer.gbnf"
    grammar.write_text('root ::= ("yes" | "no") "."\n')
    proc = run_cli("run", "-t", "0", "-n", "8", "--no-stats", "--grammar-file", str(grammar), "Is water wet?")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") in ("yes.", "no.")
    grammar.write_text("root ::= nothing\n")
    proc = run_cli("run", "--grammar-file", str(grammar), "hi")
    assert proc.returncode == 1 and "Undefined rule identifier 'nothing'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_with_a_json_schema(tmp_path):
    import json

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    proc = run_cli("run", "-t", "0", "-n", "32", "--no-stats", "--json-schema", f"@{tmp_path / 'schema.json'}",
                   "Is water wet? Answer in JSON:")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["answer"] in ("yes", "no")
    proc = run_cli("run", "--json-schema", '{"type": "object", "not": {}}', "hi")
    assert proc.returncode == 1 and "unsupported keyword 'not'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_reports_errors_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    proc = run_cli("run", "--model", str(bad), "hi")
    assert proc.returncode == 1
    assert "mullama: error:" in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("run", "--temperature", "-1", "hi")
    assert proc.returncode == 1 and "temperature" in proc.stderr


def test_default_model_is_verified_and_cached(model_path):
    path = mullama.default_model_path()
    assert str(path) == model_path and path.stat().st_size > 200_000_000
    assert (path.parent / (path.name + ".verified")).exists()


def test_default_model_missing_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == default_model.DEFAULT_MODEL_PACKAGE:
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(mullama.DefaultModelMissingError, match=r"pip install \"mullama\[default-model\]\""):
        mullama.default_model_path()
