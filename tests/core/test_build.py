"""The build: the compiled extension is importable and reports itself (the CUDA sources'
compile-only check is tests/test_cuda_build.py)."""

import subprocess
import sys

import torch

import mmloss
from mmloss.backends import build_info, compiled_extension, extension_error


def test_extension_is_built_and_reports_itself():
    ext = compiled_extension()
    assert ext is not None, f"mmloss._C is {extension_error()}"
    assert ext.openmp_threads() >= 1
    info = build_info()
    assert info["mmloss"] == mmloss.__version__ and info["mmloss._C"] == "built"
    out = subprocess.run([sys.executable, "-m", "mmloss.info"], capture_output=True, text=True, check=True).stdout
    assert "compiled CPU kernels" in out and torch.__version__ in out
