"""Every shipped Triton kernel and autotune config compiles for sm_90 and sm_80 without a GPU.

triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) runs the whole pipeline
down to the cubin; `cuobjdump --dump-resource-usage` reads registers and stack (spills land
in the stack frame) from it, the metadata gives shared memory. Fails on any spill or on
shared memory above the arch's per-block limit, and prints the resource table.
Compiles run in two processes; Triton's cache makes reruns fast.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, List, NamedTuple

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mmloss.triton import configs, kernels  # noqa: E402

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
INTS = {"stride_q", "stride_k", "stride_tq", "stride_tk", "stride_fq", "stride_fk", "stride_h",
        "stride_prod", "stride_x", "stride_out", "M", "N", "D", "DT", "DF", "row0",
        "N_BUCKET", "D_BUCKET"}
FLOATS = {"threshold", "margin", "cos_margin", "cos_m", "sin_m"}
EMBEDDINGS = {"q_ptr", "k_ptr", "h_ptr", "x_ptr", "prod_ptr", "out_ptr"}
TEACHERS = {"tq_ptr", "tk_ptr", "fq_ptr", "fk_ptr"}
INDICES = {"pos_ptr", "rg_ptr", "kg_ptr"}
CLASS_DTYPES = {"fast": ("bf16", "bf16"), "teacher32": ("bf16", "fp32"), "fp32": ("fp32", "fp32")}
FEATURES = {
    "plain": dict(HAS_MARGIN=False, ADAPTIVE=False, HAS_FILTER=False, HAS_GROUPS=False),
    "margin+groups": dict(HAS_MARGIN=True, ADAPTIVE=False, HAS_FILTER=False, HAS_GROUPS=True),
    "all": dict(HAS_MARGIN=True, ADAPTIVE=True, HAS_FILTER=True, HAS_GROUPS=True),
}
CLASS_FEATURES = {"fast": ("plain", "margin+groups", "all"), "teacher32": ("all",), "fp32": ("plain", "all")}


class Job(NamedTuple):
    kernel: str
    arch: int
    cls: str
    features: str
    constexprs: Dict[str, object]
    warps: int
    stages: int


def _precision(dtype: str) -> str:
    return "ieee" if dtype == "fp32" else "tf32"


def jobs() -> List[Job]:
    """Every (kernel, arch, class, feature set, config) that can run on a GPU."""
    out = []
    for arch in (90, 80):
        for cls, (emb, teach) in CLASS_DTYPES.items():
            prec = dict(PRECISION=_precision(emb), T_PRECISION=_precision(teach),
                        F_PRECISION=_precision(teach), UPCAST=False, SIN_EPS=1e-12, EPS=1e-12)
            for feat in CLASS_FEATURES[cls]:
                for cfg in configs.configs(cls, arch):
                    const = dict(prec, **FEATURES[feat], **cfg.kwargs)
                    out.append(Job("forward_kernel", arch, cls, feat, const, cfg.num_warps, cfg.num_stages))
                    out.append(Job("grad_tile_kernel", arch, cls, feat, dict(const, NEED_TEMP=True),
                                   cfg.num_warps, cfg.num_stages))
        for emb in ("bf16", "fp32"):
            small = dict(configs.ELEMENTWISE, EPS=1e-12)
            out.append(Job("inv_norm_kernel", arch, emb, "-", small, 4, 1))
            out.append(Job("finish_kernel", arch, emb, "-", small, 4, 1))
    return out


def _signature(fn, job: Job) -> Dict[str, str]:
    emb, teach = CLASS_DTYPES.get(job.cls, (job.cls, job.cls))
    sig = {}
    for name in fn.arg_names:
        if name in job.constexprs:
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in EMBEDDINGS:
            sig[name] = "*" + emb
        elif name in TEACHERS:
            sig[name] = "*" + teach
        elif name in INDICES:
            sig[name] = "*i64"
        else:
            sig[name] = "*fp32"
    return sig


def _cuobjdump() -> str:
    try:
        return triton.knobs.nvidia.cuobjdump.path
    except AttributeError:
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(job: Job) -> Dict[str, object]:
    """Compile one job; registers, stack bytes and shared memory of the result."""
    fn = getattr(kernels, job.kernel)
    sig = _signature(fn, job)
    # As the launcher sees real tensors: 16-byte aligned pointers and strides.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n, t in sig.items() if t.startswith("*") or n.startswith("stride")}
    compiled = triton.compile(ASTSource(fn, sig, job.constexprs, attrs), target=GPUTarget("cuda", job.arch, 32),
                              options=dict(num_warps=job.warps, num_stages=job.stages))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return {"job": job, "regs": int(fields["REG"]), "stack": int(fields["STACK"]) + int(fields.get("LOCAL", 0)),
            "smem": int(compiled.metadata.shared)}


@pytest.fixture(scope="module")
def resources():
    if not os.path.exists(_cuobjdump()) and shutil.which(_cuobjdump()) is None:
        pytest.skip("cuobjdump (shipped with Triton's NVIDIA backend) not found")
    ctx = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        return list(pool.map(compile_one, jobs()))


def _label(job: Job) -> str:
    meta = job.constexprs
    tile = f"{meta.get('BLOCK_M')}x{meta.get('BLOCK_N', '-')}x{meta.get('BLOCK_D')}"
    return f"sm_{job.arch} {job.kernel:<17} {job.cls:<9} {job.features:<13} {tile:<11} w{job.warps} s{job.stages}"


def test_every_config_compiles_without_spills(resources, capsys):
    lines = [f"{'target/kernel/class/features/tile/warps/stages':<74} regs  spill  smem(KiB)"]
    lines += [f"{_label(r['job']):<74} {r['regs']:>4}  {r['stack']:>5}  {r['smem'] / 1024:>8.1f}" for r in resources]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    spills = [_label(r["job"]) for r in resources if r["stack"] > 0]
    assert not spills, f"register spills in: {spills}"


def test_shared_memory_within_limits(resources):
    over = [_label(r["job"]) for r in resources if r["smem"] > SMEM_LIMIT[r["job"].arch]]
    assert not over, f"shared memory over the per-block limit in: {over}"


def test_every_autotune_config_is_covered():
    """The jobs include each config of each class and arch (nothing shipped goes unchecked)."""
    seen = {(j.arch, j.cls, j.kernel, tuple(sorted((k, v) for k, v in j.constexprs.items() if k.startswith("BLOCK"))),
             j.warps, j.stages) for j in jobs()}
    for arch in (90, 80):
        for cls in configs.CLASSES:
            for cfg in configs.configs(cls, arch):
                for kernel in ("forward_kernel", "grad_tile_kernel"):
                    assert (arch, cls, kernel, tuple(sorted(cfg.kwargs.items())), cfg.num_warps,
                            cfg.num_stages) in seen
