"""README command 1: the demo runs and shows what a newcomer needs to see."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_demo_catches_explains_and_frees() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "jupyter_gpumem", "demo"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "OutOfMemoryError: CUDA out of memory. Tried to allocate 128.00 MiB" in out
    assert "GPU out of memory: Tried to allocate 128 MiB" in out
    assert "`leftover` holds 256 MiB on the GPU; this cell does not use it." in out
    assert "Freed 512 MiB that the failed cell pinned" in out
    assert "allocated now: 384 MiB" in out
    assert "%gpumem retry batch" in out
