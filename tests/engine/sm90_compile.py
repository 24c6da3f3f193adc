"""Running a test file's sm_90 compile checks in fresh interpreters without TRITON_INTERPRET (so its kernels are
JIT ones): this test run's Python, then each one SM90_COMPILE_PYTHONS names (os.pathsep-separated), such as a
Python with the GPU machine's Triton: the kernels must build with Triton 3.6 there and 3.9 here, and the two
front ends differ (3.6 asserts that an int8 dot's accumulator has the dot's out_dtype; 3.9 did not, so a limbs
kernel that compiled here failed on the H200). .ci/run sets it up."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def pythons() -> list[str]:
    extra = [p for p in os.environ.get("SM90_COMPILE_PYTHONS", "").split(os.pathsep) if p]
    return [sys.executable] + extra


def run_check(file: str, *args: str) -> None:
    """Run `python file *args` in each of pythons(); the file prints "SKIP: why" where it cannot compile for sm_90
    (no CUDA backend or ptxas): a skip for this run's Python, a failure for one asked for by name."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    for python in pythons():
        proc = subprocess.run([python, file, *args], env=env, capture_output=True, text=True, timeout=600)
        if "SKIP:" in proc.stdout:
            why = proc.stdout.split("SKIP:", 1)[1].strip()[:200]
            if python == sys.executable:
                pytest.skip(why)
            raise AssertionError(f"{python} (SM90_COMPILE_PYTHONS) cannot compile for sm_90: {why}")
        assert proc.returncode == 0, f"{python}:\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
