"""Soak: resources stay flat over many generations, cancels, disconnects and loads.

The default run is a reduced count (MULLAMA_SOAK_SCALE, default 0.04); the
full run is ``MULLAMA_SOAK_SCALE=1 pytest tests/test_soak.py -s`` (about ten minutes here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mullama

SCALE = float(os.environ.get("MULLAMA_SOAK_SCALE", "0.04"))


@pytest.mark.timeout(300 + int(3600 * SCALE))
def test_soak_keeps_memory_fds_and_threads_flat(model_path):
    root = str(Path(mullama.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("soak_worker.py")), model_path, str(SCALE)],
                          capture_output=True, text=True, timeout=240 + int(3600 * SCALE), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GGML_ASSERT" not in proc.stderr and "terminate called" not in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for phase in report["phases"]:
        rss0, fds0, threads0 = phase["after_warmup"]
        rss1, fds1, threads1 = phase["end"]
        print(f"{phase['phase']:<26} n={phase['count']:<5} {phase['seconds']:>6}s  "
              f"RSS {rss0 / 2**20:.1f}->{rss1 / 2**20:.1f} MiB "
              f"(slope {phase['rss_slope_bytes_per_iter'] / 1024:.2f} KiB/iter)  "
              f"fds {fds0}->{fds1}  threads {threads0}->{threads1}")
        assert fds1 <= fds0 + 2, phase  # a leaked socket or eventfd per iteration would show at once
        assert threads1 <= threads0, phase
        assert rss1 - rss0 < 48 * 2**20, phase
        if phase["count"] >= 100:  # a slope over a handful of samples is mostly allocator noise
            assert phase["rss_slope_bytes_per_iter"] < 64 * 1024, phase
