"""The build: the compiled extension is importable and reports itself, and every CUDA source
compiles for sm_80 and sm_90 with nvcc (no GPU needed) without spills or warnings."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmloss
from mmloss.backends import build_info, compiled_extension, extension_error

ROOT = Path(__file__).resolve().parents[1]


def test_extension_is_built_and_reports_itself():
    ext = compiled_extension()
    assert ext is not None, f"mmloss._C is {extension_error()}"
    assert ext.openmp_threads() >= 1
    info = build_info()
    assert info["mmloss"] == mmloss.__version__ and info["mmloss._C"] == "built"
    out = subprocess.run([sys.executable, "-m", "mmloss.info"], capture_output=True, text=True, check=True).stdout
    assert "compiled CPU kernels" in out and torch.__version__ in out


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    configure = [
        "cmake", str(ROOT), "-G", "Ninja", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython3_EXECUTABLE={sys.executable}", f"-DMMLOSS_OUTPUT_DIR={tmp_path / 'out'}",
        "-DMMLOSS_CUDA_ARCHS=80;90",
    ]
    subprocess.run(configure, cwd=tmp_path, check=True, capture_output=True)
    build = subprocess.run(["cmake", "--build", ".", "--target", "cuda_compile_check"], cwd=tmp_path,
                           capture_output=True, text=True, env={**os.environ, "TERM": "dumb"})
    log = build.stdout + build.stderr
    assert build.returncode == 0, log
    assert "warning" not in log.lower(), log
    sources = sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources, "csrc/cuda holds no .cu file"
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", log)
    assert {arch for _, arch in kernels} == {"80", "90"}, log
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and all(n == 0 for n in spills), log
    print("\n" + "\n".join(line for line in log.splitlines() if "registers" in line or "entry function" in line))
