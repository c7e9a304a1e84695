"""The CUDA sources without a GPU: every .cu compiles for sm_80 and sm_90 (and the ATen glue
against the installed torch's headers) with no warning; ptxas reports no spills and no stack
frame for any kernel; the SASS of the loss kernels' inner loops uses tensor-core instructions
(HMMA) for bf16/fp16 and exact fp32 FMAs (FFMA, no HMMA) for fp32, and no local memory."""

import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tests.repo import REPO

ROOT = REPO
ARCHS = {"80", "90"}
TILE_KERNELS = ("forward_kernel", "grad_tile_kernel")
# Mangled template argument of the embeddings' type: bf16, fp16, fp32.
TYPES = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")


def _tool(name: str):
    """cuobjdump/nvdisasm from the toolkit, else the copies in Triton's wheel."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """(log, build dir) of `cmake --build --target cuda_compile_check` in a fresh tree."""
    tmp = tmp_path_factory.mktemp("cuda_check")
    configure = [
        "cmake",
        str(ROOT),
        "-G",
        "Ninja",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython3_EXECUTABLE={sys.executable}",
        f"-DMMLOSS_OUTPUT_DIR={tmp / 'out'}",
        "-DMMLOSS_CUDA_ARCHS=80;90",
    ]
    subprocess.run(configure, cwd=tmp, check=True, capture_output=True)
    jobs = ["-j", os.environ["MAX_JOBS"]] if os.environ.get("MAX_JOBS") else []
    done = subprocess.run(
        ["cmake", "--build", ".", "--target", "cuda_compile_check", *jobs],
        cwd=tmp,
        capture_output=True,
        text=True,
        env={**os.environ, "TERM": "dumb"},
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    return log, tmp


def resources(log: str):
    """{(kernel, arch): ptxas report line(s)} from the -Xptxas=-v output."""
    out = {}
    for name, arch, body in re.findall(
        r"Compiling entry function '(\w+)' for 'sm_(\d+)'(.*?)(?=Compiling entry|\Z)", log, re.S
    ):
        out[(name, arch)] = body
    return out


def sass_by_function(objects, cuobjdump):
    """{(mangled kernel, arch): SASS text} of the objects' cubins."""
    out = defaultdict(str)
    for obj in objects:
        text = subprocess.run([cuobjdump, "-sass", str(obj)], check=True, capture_output=True, text=True).stdout
        arch = name = None
        for line in text.splitlines():
            m = re.search(r"code for sm_(\d+)", line)
            if m:
                arch = m.group(1)
                continue
            m = re.search(r"Function : (\S+)", line)
            if m:
                name = m.group(1)
                continue
            if name is not None:
                out[(name, arch)] += line + "\n"
    return out


def tile_kernel_type(name: str):
    m = re.search(r"(forward_kernel|grad_tile_kernel)I(13__nv_bfloat16|6__half|f)Lb", name)
    return (m.group(1), TYPES[m.group(2)]) if m else None


def test_every_source_compiles_for_sm80_and_sm90_without_warnings(build):
    log, _ = build
    assert "warning" not in log.lower(), log
    sources = sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert {"contrastive_forward.cu", "contrastive_backward.cu"} <= set(sources)
    assert "contrastive_cuda.cpp" in log, "the ATen glue was not compiled"
    kernels = resources(log)
    assert {arch for _, arch in kernels} == ARCHS, log
    for kind in TILE_KERNELS:
        for dtype in TYPES.values():
            for arch in ARCHS:
                assert any(tile_kernel_type(n) == (kind, dtype) and a == arch for n, a in kernels), (kind, dtype, arch)


def test_no_spills_and_no_stack_frame(build):
    log, _ = build
    kernels = resources(log)
    for (name, arch), body in kernels.items():
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        frame = re.search(r"(\d+) bytes stack frame", body)
        assert spills and frame, body
        assert spills.group(1) == spills.group(2) == "0", f"{name} sm_{arch} spills: {body}"
        assert frame.group(1) == "0", f"{name} sm_{arch} uses local memory: {body}"
    lines = []
    for (name, arch), body in sorted(kernels.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        regs = re.search(r"Used (\d+) registers", body).group(1)
        smem = re.search(r"(\d+) bytes smem", body)
        lines.append(f"sm_{arch} {name[:100]}: {regs} registers, {smem.group(1) if smem else 0} bytes smem")
    print("\n" + "\n".join(lines))


def test_sass_uses_tensor_cores_for_16bit_and_exact_fma_for_fp32(build):
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (toolkit or Triton's wheel)")
    _, tmp = build
    objects = sorted(tmp.rglob("cuda_kernels_check.dir/**/*.cu.o"))
    assert objects, "no kernel objects"
    sass = sass_by_function(objects, cuobjdump)
    seen = set()
    for (name, arch), text in sass.items():
        assert not re.search(r"\b(LDL|STL)\b", text), f"{name} sm_{arch} touches local memory"
        kind = tile_kernel_type(name)
        if kind is None:
            continue
        seen.add((kind, arch))
        if kind[1] == "fp32":
            assert "HMMA" not in text and "FFMA" in text, f"{name} sm_{arch}: fp32 must use exact FMAs, not tf32"
        else:
            assert re.search(r"HMMA\.16816\.F32", text), f"{name} sm_{arch}: no fp32-accumulating HMMA"
    assert seen == {((k, t), a) for k in TILE_KERNELS for t in TYPES.values() for a in ARCHS}, seen
