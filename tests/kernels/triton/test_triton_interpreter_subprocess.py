"""Runs tests/test_triton_interpreter.py in a process of its own, with TRITON_INTERPRET=1,
when this session cannot interpret Triton kernels (triton was imported without it)."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")


def test_interpreter_suite_in_its_own_process():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this session interprets Triton: the suite runs in-process")
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: tests/test_triton_gpu.py covers the backend")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            os.path.join(here, "test_triton_interpreter.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::RuntimeWarning",
        ],
        env=env,
        cwd=os.path.dirname(here),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
