"""Launch configurations: autotune lists for sm_90, defaults for sm_80, a fixed small one
for the interpreter.

A call falls in one of three classes, each with its own lists (tests/test_triton_compile.py
compiles all of them and fails on spills):
* "fast":      16-bit embeddings, teachers absent or 16-bit: every dot on tensor cores.
* "teacher32": 16-bit embeddings with an fp32 teacher: the teacher dot is exact fp32 on
               CUDA cores, whose operands take many registers: 64 x 64 tiles, 8 warps.
* "fp32":      fp32 embeddings, exact fp32 dots (CUDA cores): small d-chunks.

BLOCK_D is fixed per class and shared by the forward and backward lists: the backward
recomputes the forward's logits, and the same d-chunking keeps both sums in the same
order, so exp(logit - lse) sums to 1 to the last bits (in fp32 a mismatch shows in
d_temperature). BLOCK_T is the teacher's d-chunk.
"""

from __future__ import annotations

import os
from typing import Dict, List

import triton

INTERPRETER_BLOCK = 64
CLASSES = ("fast", "teacher32", "fp32")
BLOCK_D = {"fast": 64, "teacher32": 64, "fp32": 16}
BLOCK_T = {"fast": 32, "teacher32": 16, "fp32": 16}
ELEMENTWISE = {"BLOCK_M": 32, "BLOCK_D": 64}


def interpreted() -> bool:
    """True when kernels run in the Triton interpreter (CPU tensors, tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cfg(cls: str, bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": BLOCK_D[cls], "BLOCK_T": BLOCK_T[cls]}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def _table(cls: str, rows: Dict[int, list]) -> Dict[int, List[triton.Config]]:
    return {arch: [_cfg(cls, *r) for r in rs] for arch, rs in rows.items()}


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per arch; forward and grad_tile alike.
_SHAPES = {
    "fast": {90: [(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3)],
             80: [(128, 64, 8, 2), (64, 64, 4, 2)]},
    "teacher32": {90: [(64, 64, 8, 2), (64, 128, 8, 2)],
                  80: [(64, 64, 8, 2)]},
    "fp32": {90: [(64, 64, 8, 2), (128, 64, 8, 2)],
             80: [(64, 64, 8, 2)]},
}
TABLES = {cls: _table(cls, shapes) for cls, shapes in _SHAPES.items()}


def arch_key(capability: int) -> int:
    """The config table a compute capability (e.g. 90, 89, 80) uses."""
    return 90 if capability >= 90 else 80


def configs(cls: str, capability: int) -> List[triton.Config]:
    """The autotune list of a call class for an arch (both kernels use it)."""
    return TABLES[cls][arch_key(capability)]


def interpreter_meta() -> Dict[str, int]:
    """The one configuration used in interpreter mode (small, so the CPU run is bearable)."""
    b = INTERPRETER_BLOCK
    return {"BLOCK_M": b, "BLOCK_N": b, "BLOCK_D": b, "BLOCK_T": 32}


def bucket(n: int) -> int:
    """Power-of-two bucket of a size: the autotuner retunes once per bucket, not per size."""
    return 1 << max(0, (n - 1).bit_length())
