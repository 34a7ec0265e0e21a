"""Runs the interpreter kernel tests (tests/test_kernels_interpreted.py) in a child process.

The child gets TRITON_INTERPRET=1 before anything imports triton; this process, and every
other test file in it, is left alone.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_kernels_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", SPHKV_KERNEL_TESTS_CHILD="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(HERE / "test_kernels_interpreted.py")], env=env, capture_output=True, text=True,
                          cwd=HERE.parent)
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
