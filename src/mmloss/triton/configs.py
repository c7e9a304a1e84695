"""Launch configurations: autotune lists for sm_90, defaults for sm_80, a fixed small one
for the interpreter.

A call falls in one of four classes, each with its own lists (tests/test_triton_compile.py
compiles all of them and fails on spills):
* "plain16":   16-bit embeddings, no margin, no filter (groups allowed): 128 x 128 tiles fit.
* "feat16":    16-bit, with a margin and/or 16-bit teachers: the margin's extra live tiles
               spill at 128 x 128, so at most 128 x 64.
* "sym16":     16-bit, symmetric (column sums and the column softmax on top of any features,
               16-bit teachers): at most 128 x 64 / 64 x 128.
* "teacher32": 16-bit embeddings with an fp32 teacher: the teacher dot is exact fp32 on
               CUDA cores, whose operands take many registers: 64 x 64 tiles, 8 warps.
* "feat16x", "teacher32x": feat16 / teacher32 with the hardness penalty or several
               positives per row on top: the chunked backward tile, at the register limit
               with margin and teachers alone, spills with the owners' or the positive
               weights' few more live values, so it runs at 64 x 64 (8 warps; teacher32x one
               stage). feat16x's forward list is feat16's; teacher32x's forward takes one
               stage on sm_80.
* "fp32":      fp32 embeddings, exact fp32 dots (CUDA cores): 64 x 64, small d-chunks.

BLOCK_D is fixed per class and shared by the forward and backward lists: the backward
recomputes the forward's logits, and the same d-chunking keeps both sums in the same
order, so exp(logit - lse) sums to 1 to the last bits (in fp32 a mismatch shows in
d_temperature). BLOCK_T is the teacher's d-chunk.
"""

from __future__ import annotations

from typing import Dict, List

import triton

INTERPRETER_BLOCK = 64
CLASSES = ("plain16", "feat16", "sym16", "teacher32", "fp32", "feat16x", "teacher32x")
BLOCK_D = {"plain16": 64, "feat16": 64, "sym16": 64, "teacher32": 64, "fp32": 16, "feat16x": 64, "teacher32x": 64}
BLOCK_T = {"plain16": 32, "feat16": 32, "sym16": 32, "teacher32": 32, "fp32": 16, "feat16x": 32, "teacher32x": 32}
ELEMENTWISE = {"BLOCK_M": 32, "BLOCK_D": 64}
GROUP_M = 32  # row tiles per band of the backward's tile order (L2 reuse of K tiles)


def _cfg(cls: str, bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": BLOCK_D[cls], "BLOCK_T": BLOCK_T[cls]}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def _table(cls: str, rows: Dict[int, list]) -> Dict[int, List[triton.Config]]:
    return {arch: [_cfg(cls, *r) for r in rs] for arch, rs in rows.items()}


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, class and arch; the first is the
# default (MMLOSS_TRITON_AUTOTUNE=0). The backward tile keeps more tiles live than the
# forward (P, G, H, G*c), so 128 x 128 spills there. Every list is compiled without spills
# under both Triton 3.6 and 3.7 (sm_80's feat16 backward needs 8 warps at 64 x 64 there,
# its fp32 forward one stage).
_SHAPES = {
    "forward": {
        "plain16": {
            90: [(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3)],
            80: [(128, 64, 8, 2), (64, 64, 4, 2)],
        },
        "feat16": {90: [(128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3)], 80: [(128, 64, 8, 2), (64, 64, 4, 2)]},
        "sym16": {90: [(64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)], 80: [(64, 64, 4, 2)]},
        "teacher32": {90: [(64, 64, 8, 2)], 80: [(64, 64, 8, 2)]},
        "fp32": {90: [(64, 64, 8, 2)], 80: [(64, 64, 8, 1)]},
    },
    "grad_tile": {
        "plain16": {90: [(128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3)], 80: [(128, 64, 8, 2), (64, 64, 4, 2)]},
        # feat16's 64 x 128 spills (16 bytes) since the fp64 lse and the column offset.
        "feat16": {90: [(128, 64, 8, 3), (64, 64, 4, 3)], 80: [(128, 64, 8, 2), (64, 64, 8, 2)]},
        "sym16": {90: [(64, 64, 8, 3)], 80: [(64, 64, 8, 2)]},
        "teacher32": {90: [(64, 64, 8, 2)], 80: [(64, 64, 8, 2)]},
        "fp32": {90: [(64, 64, 8, 2)], 80: [(64, 64, 8, 2)]},
        "feat16x": {90: [(64, 64, 8, 3)], 80: [(64, 64, 8, 2)]},
        "teacher32x": {90: [(64, 64, 8, 1)], 80: [(64, 64, 8, 1)]},
    },
}
_SHAPES["forward"]["feat16x"] = _SHAPES["forward"]["feat16"]
_SHAPES["forward"]["teacher32x"] = {90: [(64, 64, 8, 2)], 80: [(64, 64, 8, 1)]}
TABLES = {kind: {cls: _table(cls, shapes) for cls, shapes in by_cls.items()} for kind, by_cls in _SHAPES.items()}

# The small-batch path (`ops.SMALL_MAX`) runs one fixed config per kernel, never autotuned
# (a batch of a few hundred rows is launch-bound): 64-row tiles spread it over more SMs.
# grad_gemm's tile is (BLOCK_M rows of dQ or dK, BLOCK_D of d), its reduction BLOCK_K wide.
# Two-stage pipelines of the fp32-operand kernels (fp32, teacher32) spill, on sm_90 since the
# scaled fp32 rows and the compare-and-swap column merge: one stage there; sm_80's fp32
# grad_gemm (scaled rows) needs 8 warps.
_SMALL = {
    "forward": {"16": {90: (64, 64, 4, 3), 80: (64, 64, 4, 2)}, "32": {90: (64, 64, 8, 1), 80: (64, 64, 8, 1)}},
    "grad_tile": {"16": {90: (64, 64, 8, 3), 80: (64, 64, 8, 2)}, "32": {90: (64, 64, 8, 1), 80: (64, 64, 8, 1)}},
}
_SMALL_GEMM = {
    "16": {90: (64, 64, 64, 4, 3), 80: (64, 64, 64, 4, 1)},
    "32": {90: (64, 64, 16, 4, 2), 80: (64, 64, 16, 8, 2)},
}


def arch_key(capability: int) -> int:
    """The config table a compute capability (e.g. 90, 89, 80) uses."""
    return 90 if capability >= 90 else 80


def configs(kind: str, cls: str, capability: int) -> List[triton.Config]:
    """The autotune list of kernel `kind` ("forward", "grad_tile") for a class and arch."""
    return TABLES[kind][cls][arch_key(capability)]


def small_config(kind: str, cls: str, capability: int) -> triton.Config:
    """The fixed config of the small-batch path for a kernel ("forward", "grad_tile",
    "grad_gemm"), call class and arch."""
    width = "32" if cls in ("fp32", "teacher32", "teacher32x") else "16"
    arch = arch_key(capability)
    if kind == "grad_gemm":
        gemm_cls = "32" if cls == "fp32" else "16"
        bm, bd, bk, warps, stages = _SMALL_GEMM[gemm_cls][arch]
        return triton.Config({"BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
    return _cfg(cls, *_SMALL[kind][width][arch])


def interpreter_meta() -> Dict[str, int]:
    """The one configuration used in interpreter mode (small, so the CPU run is bearable)."""
    b = INTERPRETER_BLOCK
    return {"BLOCK_M": b, "BLOCK_N": b, "BLOCK_D": b, "BLOCK_T": 32}


def bucket(n: int) -> int:
    """Power-of-two bucket of a size: the autotuner retunes once per bucket, not per size."""
    return 1 << max(0, (n - 1).bit_length())
