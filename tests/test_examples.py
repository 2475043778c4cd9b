"""Every example runs to completion on the default model (with few tokens)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mullama

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ALL = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("name", ALL)
def test_example_runs(name, model_path):
    # the examples import the same mullama as the tests (installed or built in place)
    root = str(Path(mullama.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, MULLAMA_EXAMPLE_MAX_TOKENS="8", MULLAMA_MODEL=model_path, PYTHONPATH=path)
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=EXAMPLES, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "GGML_ASSERT" not in proc.stderr and "Traceback" not in proc.stderr
