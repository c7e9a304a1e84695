"""Launch configurations: autotune lists for sm_90, defaults for sm_80, a fixed small one
for the interpreter. Each is a `triton.Config` over BLOCK_M/BLOCK_N (BLOCK_T, the teacher
chunk, is fixed at 32: teachers are narrow or cheap next to d).

BLOCK_D is the same (64) in every config of both kernels: the backward recomputes the
forward's logits, and the same d-chunking keeps the two sums in the same order, so that
exp(logit - lse) sums to 1 to the last bits (in fp32 a mismatch is visible in d_temperature).
"""

from __future__ import annotations

import functools
import os
from typing import Dict, List

import triton

BLOCK_T = 32
INTERPRETER_BLOCK = 64


def interpreted() -> bool:
    """True when kernels run in the Triton interpreter (CPU tensors, tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


BLOCK_D = 64


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": BLOCK_D},
                         num_warps=warps, num_stages=stages)


# forward: one program per row block; the fp32 accumulator is only the S tile.
FORWARD = {
    90: [_cfg(128, 128, 8, 3), _cfg(128, 64, 4, 4), _cfg(64, 128, 4, 3), _cfg(64, 64, 4, 2)],
    80: [_cfg(128, 64, 4, 3), _cfg(64, 64, 4, 2)],
}
# backward tile kernel: 2-D grid, one tile each, writes the H scratch.
GRAD_TILE = {
    90: [_cfg(128, 128, 8, 3), _cfg(128, 64, 4, 3), _cfg(64, 128, 4, 3), _cfg(64, 64, 4, 2)],
    80: [_cfg(128, 64, 4, 3), _cfg(64, 64, 4, 2)],
}
# the two small streaming kernels are not tuned.
ELEMENTWISE = {"BLOCK_M": 32, "BLOCK_D": BLOCK_D}


def arch_key(capability: int) -> int:
    """The config table a compute capability (e.g. 90, 89, 80) uses."""
    return 90 if capability >= 90 else 80


def configs(kind: str, capability: int) -> List[triton.Config]:
    """The autotune list of kernel `kind` ("forward" or "grad_tile") for an arch."""
    table: Dict[int, List[triton.Config]] = {"forward": FORWARD, "grad_tile": GRAD_TILE}[kind]
    return table[arch_key(capability)]


def interpreter_meta() -> Dict[str, int]:
    """The one configuration used in interpreter mode (small, so the CPU run is bearable)."""
    b = INTERPRETER_BLOCK
    return {"BLOCK_M": b, "BLOCK_N": b, "BLOCK_D": BLOCK_D}


@functools.lru_cache(maxsize=None)
def bucket(n: int) -> int:
    """Power-of-two bucket of a size: the autotuner retunes once per bucket, not per size."""
    return 1 << max(0, (n - 1).bit_length())
