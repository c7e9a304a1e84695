"""Every shipped Triton kernel and autotune config compiles for sm_90 and sm_80 without a GPU.

triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) runs the whole pipeline
down to the cubin; `cuobjdump --dump-resource-usage` reads registers and stack (spills land
in the stack frame) from it, the metadata gives shared memory. Fails on any spill or on
shared memory above the arch's per-block limit, and prints the resource table.
Compiles run in two fresh ("spawn") processes with TRITON_INTERPRET=0, so that this works in
a session that interprets kernels; Triton's cache makes reruns fast.
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
INTS = {
    "stride_q",
    "stride_k",
    "stride_tq",
    "stride_tk",
    "stride_fq",
    "stride_fk",
    "stride_h",
    "stride_prod",
    "stride_x",
    "stride_y",
    "stride_out",
    "stride_a",
    "stride_b",
    "M",
    "N",
    "D",
    "DT",
    "DF",
    "row0",
    "col0",
    "M_BUCKET",
    "N_BUCKET",
    "D_BUCKET",
    "stride_dq",
    "stride_dk",
    "row_parts",
    "col_parts",
    "temp_parts",
    "SPLITS",
    "own_scope",
}
FLOATS = {"threshold", "margin", "cos_threshold", "cos_m", "sin_m", "eps", "inv_temp_value", "hardness"}
EMBEDDINGS = {"q_ptr", "k_ptr", "h_ptr", "x_ptr", "y_ptr", "prod_ptr", "out_ptr", "dq_ptr", "dk_ptr"}
# The forward's lse (the backward reads it as given) and positive_weights.
FP64 = {"lse_ptr", "part_lse_ptr", "lse_col_ptr", "pw_ptr"}
TEACHERS = {"tq_ptr", "tk_ptr", "fq_ptr", "fk_ptr"}
INDICES = {"pos_ptr", "rg_ptr", "kg_ptr", "ro_ptr", "ko_ptr", "col_acc_ptr"}  # int64 (col_acc: packed column pairs)
CLASS_DTYPES = {
    "plain16": ("bf16", "bf16"),
    "feat16": ("bf16", "bf16"),
    "sym16": ("bf16", "bf16"),
    "teacher32": ("bf16", "fp32"),
    "fp32": ("fp32", "fp32"),
    "feat16x": ("bf16", "bf16"),
    "teacher32x": ("bf16", "fp32"),
}
_OFF = dict(
    HAS_MARGIN=False,
    ADAPTIVE=False,
    HAS_FILTER=False,
    HAS_GROUPS=False,
    HARDNESS=False,
    BY_OWNER=False,
    MULTI_POS=False,
    SYMMETRIC=False,
)
_ALL = dict(_OFF, HAS_MARGIN=True, ADAPTIVE=True, HAS_FILTER=True, HAS_GROUPS=True)
# The hardness penalty by owner and several positives per row (the group mask is off then).
_HARD_MULTI = dict(HARDNESS=True, BY_OWNER=True, MULTI_POS=True, HAS_GROUPS=False)
FEATURES = {
    "plain": _OFF,
    "groups": dict(_OFF, HAS_GROUPS=True),
    "clip": dict(_OFF, SYMMETRIC=True),
    "margin+groups": dict(_OFF, HAS_MARGIN=True, HAS_GROUPS=True),
    "all": _ALL,
    "all+sym": dict(_ALL, SYMMETRIC=True),
    "hard+multi": dict(_OFF, **_HARD_MULTI),
    "all+hard": dict(_ALL, HARDNESS=True, BY_OWNER=True),
    "all+hard+multi": dict(_ALL, **_HARD_MULTI),
}
# The heaviest feature sets each class serves (and plain where it is the common case). The
# symmetric one pass takes neither the hardness penalty nor several positives (ops.check_features).
CLASS_FEATURES = {
    "plain16": ("groups", "hard+multi"),
    "feat16": ("margin+groups", "all"),
    "sym16": ("clip", "all+sym"),
    "teacher32": ("all", "all+sym"),
    "fp32": ("plain", "all", "all+sym", "all+hard+multi"),
    "feat16x": ("all+hard", "all+hard+multi"),
    "teacher32x": ("all+hard", "all+hard+multi"),
}
# The small-batch path's own variants (norms in the kernels, per-tile partials).
CHUNKED = dict(FUSED_NORMS=False, FUSED=False, TEMP_PTR=True)
SMALL = dict(FUSED_NORMS=True, FUSED=True, TEMP_PTR=False)


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


def _variants(kind: str, cls: str, arch: int):
    """(config, path constexprs): every autotune config of the chunked path and the small
    path's one."""
    chunked = [(cfg, CHUNKED) for cfg in configs.configs(kind, cls, arch)]
    return chunked + [(configs.small_config(kind, cls, arch), SMALL)]


def jobs() -> List[Job]:
    """Every (kernel, arch, class, feature set, config) that can run on a GPU."""
    out = []
    for arch in (90, 80):
        for cls, (emb, teach) in CLASS_DTYPES.items():
            prec = dict(
                PRECISION=_precision(emb),
                T_PRECISION=_precision(teach),
                F_PRECISION=_precision(teach),
                UPCAST=False,
                SIN_EPS=1e-12,
                EPS=1e-12,
                SCALED=emb == "fp32",
            )
            for feat in CLASS_FEATURES[cls]:
                for cfg, path in _variants("forward", cls, arch):
                    const = dict(
                        prec, **FEATURES[feat], **cfg.kwargs, FUSED_NORMS=path["FUSED_NORMS"], TEMP_PTR=path["TEMP_PTR"]
                    )
                    label = feat + ("/small" if path is SMALL else "")
                    out.append(Job("forward_kernel", arch, cls, label, const, cfg.num_warps, cfg.num_stages))
                for cfg, path in _variants("grad_tile", cls, arch):
                    const = dict(
                        prec,
                        **FEATURES[feat],
                        **cfg.kwargs,
                        NEED_TEMP=True,
                        GROUP_M=configs.GROUP_M,
                        FUSED=path["FUSED"],
                        TEMP_PTR=path["TEMP_PTR"],
                    )
                    label = feat + ("/small" if path is SMALL else "")
                    out.append(Job("grad_tile_kernel", arch, cls, label, const, cfg.num_warps, cfg.num_stages))
        for emb, cls, symmetric in (("bf16", "plain16", False), ("fp16", "plain16", True), ("fp32", "fp32", False)):
            cfg = configs.small_config("grad_gemm", cls, arch)
            const = dict(
                cfg.kwargs,
                NEED_TEMP=True,
                PRECISION=_precision(emb),
                UPCAST=False,
                TEMP_PTR=False,
                SYMMETRIC=symmetric,
                SCALE16=emb == "fp16",
                SCALED=emb == "fp32",
                EPS=1e-12,
            )
            out.append(
                Job("grad_gemm_kernel", arch, emb, "sym" if symmetric else "-", const, cfg.num_warps, cfg.num_stages)
            )
        for emb in ("bf16", "fp32"):
            small = dict(configs.ELEMENTWISE, EPS=1e-12)
            out.append(Job("inv_norm_kernel", arch, emb, "-", small, 4, 1))
            for scaled in sorted({False, emb == "fp32"}):
                label = "scaled" if scaled else "-"
                out.append(Job("finish_kernel", arch, emb, label, dict(small, SCALED=scaled), 4, 1))
        for name in ("combine_kernel", "column_lse_kernel"):
            out.append(Job(name, arch, "fp32", "-", dict(BLOCK=configs.ELEMENTWISE["BLOCK_M"] * 8), 4, 1))
        out += _similarity_jobs(arch)
    return out


def _similarity_jobs(arch: int) -> List[Job]:
    """mmloss/triton/similarity.py's kernel (another module's), when it is there."""
    try:
        from mmloss.triton import similarity
    except ImportError:
        return []
    jobs_ = []
    for emb, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "0")
            meta = dict(similarity._meta(getattr(__import__("torch"), dtype)))
        warps, stages = meta.pop("num_warps", 4), meta.pop("num_stages", 3)
        for normalize in (False, True):
            const = dict(
                meta,
                NORMALIZE=normalize,
                GROUP=similarity.GROUP_M,
                PRECISION=_precision(emb),
                UPCAST=False,
                SCALED=emb == "fp32",
                EPS=1e-12,
            )
            jobs_.append(Job("similarity_kernel", arch, emb, "normalize" if normalize else "-", const, warps, stages))
    return jobs_


def _signature(fn, job: Job) -> Dict[str, str]:
    emb, teach = CLASS_DTYPES.get(job.cls, (job.cls, job.cls))
    embeddings = EMBEDDINGS | ({"a_ptr", "b_ptr"} if job.kernel == "similarity_kernel" else set())
    fused = job.constexprs.get("FUSED", False) or job.kernel == "grad_gemm_kernel"
    sig = {}
    for name in fn.arg_names:
        if name in job.constexprs:
            sig[name] = "constexpr"
        elif name == "h_ptr" and fused:  # the small path's scratch is fp32
            sig[name] = "*fp32"
        elif name in FP64:
            sig[name] = "*fp64"
        elif name in INTS:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in embeddings:
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
    if job.kernel == "similarity_kernel":
        from mmloss.triton import similarity

        fn = similarity.similarity_kernel
    else:
        fn = getattr(kernels, job.kernel)
    sig = _signature(fn, job)
    # As the launcher sees real tensors: 16-byte aligned pointers and strides.
    attrs = {
        (fn.arg_names.index(n),): [["tt.divisibility", 16]]
        for n, t in sig.items()
        if t.startswith("*") or n.startswith("stride")
    }
    compiled = triton.compile(
        ASTSource(fn, sig, job.constexprs, attrs),
        target=GPUTarget("cuda", job.arch, 32),
        options=dict(num_warps=job.warps, num_stages=job.stages),
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return {
        "job": job,
        "regs": int(fields["REG"]),
        "stack": int(fields["STACK"]) + int(fields.get("LOCAL", 0)),
        "smem": int(compiled.metadata.shared),
    }


@pytest.fixture(scope="module")
def resources(monkeypatch_module):
    if not os.path.exists(_cuobjdump()) and shutil.which(_cuobjdump()) is None:
        pytest.skip("cuobjdump (shipped with Triton's NVIDIA backend) not found")
    monkeypatch_module.setenv("TRITON_INTERPRET", "0")  # inherited by the spawned workers
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        return list(pool.map(compile_one, jobs()))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _label(job: Job) -> str:
    meta = job.constexprs
    tile = f"{meta.get('BLOCK_M')}x{meta.get('BLOCK_N', meta.get('BLOCK_K', '-'))}x{meta.get('BLOCK_D')}"
    return f"sm_{job.arch} {job.kernel:<17} {job.cls:<9} {job.features:<20} {tile:<11} w{job.warps} s{job.stages}"


def test_every_config_compiles_without_spills(resources, capsys):
    lines = [f"{'target/kernel/class/features/tile/warps/stages':<81} regs  spill  smem(KiB)"]
    lines += [f"{_label(r['job']):<81} {r['regs']:>4}  {r['stack']:>5}  {r['smem'] / 1024:>8.1f}" for r in resources]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    spills = [_label(r["job"]) for r in resources if r["stack"] > 0]
    assert not spills, f"register spills in: {spills}"


def test_shared_memory_within_limits(resources):
    over = [_label(r["job"]) for r in resources if r["smem"] > SMEM_LIMIT[r["job"].arch]]
    assert not over, f"shared memory over the per-block limit in: {over}"


def test_every_autotune_config_is_covered():
    """The jobs include each config of each class and arch (nothing shipped goes unchecked)."""
    seen = {
        (
            j.arch,
            j.cls,
            j.kernel,
            tuple(sorted((k, v) for k, v in j.constexprs.items() if k.startswith("BLOCK"))),
            j.warps,
            j.stages,
        )
        for j in jobs()
    }
    for arch in (90, 80):
        for cls in configs.CLASSES:
            for kind in ("forward", "grad_tile"):
                for cfg in configs.configs(kind, cls, arch):
                    assert (
                        arch,
                        cls,
                        f"{kind}_kernel",
                        tuple(sorted(cfg.kwargs.items())),
                        cfg.num_warps,
                        cfg.num_stages,
                    ) in seen
                small = configs.small_config(kind, cls, arch)
                assert (
                    arch,
                    cls,
                    f"{kind}_kernel",
                    tuple(sorted(small.kwargs.items())),
                    small.num_warps,
                    small.num_stages,
                ) in seen
