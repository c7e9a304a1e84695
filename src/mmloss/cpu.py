"""The compiled CPU backend: `backend="cpu"`, the kernel contract of mmloss.backends on the
torch.ops.mmloss.* ops of mmloss._C (schemas: csrc/ops.cpp; fakes: mmloss.library).

Rows are processed in strips, each strip in column tiles of the key block. A strip's tiles
(similarity, and one per teacher) take at most MMLOSS_CPU_SCRATCH_MB (default 4 MiB), whatever
M and N: a strip spans every column while that leaves it MIN_FULL_ROWS rows (then the fused
forward+gradient is one pass of 3 GEMMs), else tiles are MIN_STRIP_ROWS rows by what the budget
leaves of columns (at least MIN_TILE_COLS), which keeps the GEMMs compute-bound; the fused path
then takes a second pass over the tiles (4 GEMMs). Unless MMLOSS_CPU_SCRATCH_MB is set, fp32
inputs get up to FP32_FULL_WIDTH_MB so that strips of MIN_STRIP_ROWS rows span every column up to
N = 16,384 (measured there, d = 768, one thread: 14.8 s against 20.2–21.0 s with 4 MiB); bf16
keeps 4 MiB (there full-width strips measured 1.6x slower: the tiles no longer stay in cache
for its faster GEMMs). bf16 inputs on the 16-bit GEMMs (`_C.cpu_gemm16()`) add two bf16
copies of the gradient tile (together the tile's size) and the keys packed twice (each the
keys' size; docs/ARCHITECTURE.md, "The CPU kernels").
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional, Tuple

import torch

from mmloss import library  # noqa: F401  (the ops and their fakes)
from mmloss.kernel_common import inv_temp_tensor, rows_within, scratch_bytes, scratch_env
from mmloss.problem import LossProblem

MIN_FULL_ROWS = 128
MIN_STRIP_ROWS = 256
MIN_TILE_COLS = 64
FP32_FULL_WIDTH_MB = 16.0
ops = torch.ops.mmloss


@functools.lru_cache(maxsize=None)
def _warn_if_bf16_on_fp32_gemms() -> None:
    """Warn once when bf16 inputs take the fp32 GEMMs although MMLOSS_CPU_GEMM16 does not ask for
    it: this CPU's bf16 microkernel failed the exactness probe (exact results, fp32's speed)."""
    from mmloss.backends import compiled_extension

    if compiled_extension().cpu_gemm16() == "fp32" and os.environ.get("MMLOSS_CPU_GEMM16") != "0":
        warnings.warn(
            "mmloss cpu backend: bf16 inputs run on fp32 GEMMs (exact, at fp32's speed): this CPU's bf16 "
            "microkernel failed mmloss's exactness probe (_C.cpu_gemm16() == 'fp32')",
            RuntimeWarning,
            stacklevel=3,
        )


def tile_shape(query: torch.Tensor, key: torch.Tensor, problem: LossProblem) -> Tuple[int, int]:
    """(rows, columns) of a strip's tiles within the scratch budget (see the module docstring)."""
    tiles = 1 + problem.adaptive_margin + problem.has_filter
    item = (8 if query.dtype == torch.float64 else 4) * tiles
    budget = scratch_bytes("cpu")
    n = max(key.shape[0], 1)
    if query.dtype == torch.float32 and os.environ.get(scratch_env("cpu")) is None:
        budget = max(budget, min(int(FP32_FULL_WIDTH_MB * 2**20), MIN_STRIP_ROWS * n * item))
    if budget >= MIN_FULL_ROWS * n * item:
        return rows_within(budget, item * n), n
    return MIN_STRIP_ROWS, rows_within(budget, item * MIN_STRIP_ROWS, minimum=MIN_TILE_COLS)


def check(query: torch.Tensor, problem: LossProblem) -> None:
    if query.device.type != "cpu":
        raise ValueError(f"query is on {query.device}: backend 'cpu' needs CPU tensors")
    if query.dtype == torch.bfloat16:
        _warn_if_bf16_on_fp32_gemms()


def _args(query, key, inv_temp, problem: LossProblem) -> tuple:
    """(query, key, 1/τ, the problem's fields): the leading arguments of every op."""
    return (query, key, inv_temp_tensor(inv_temp, query.device), *problem.kernel_args())


def forward(query, key, inv_temp, problem: LossProblem) -> Tuple[torch.Tensor, torch.Tensor]:
    return ops.contrastive_forward(*_args(query, key, inv_temp, problem), *tile_shape(query, key, problem))


def forward_with_grad(query, key, inv_temp, problem: LossProblem):
    """lse, pos_logit and the gradients of Σ_{valid i} loss_i in one pass (3 GEMMs, no recompute)."""
    weight = problem.valid_rows.to(torch.float64 if query.dtype == torch.float64 else torch.float32)
    return ops.contrastive_forward_with_grad(
        *_args(query, key, inv_temp, problem), weight, *tile_shape(query, key, problem)
    )


def backward(
    query, key, inv_temp, problem: LossProblem, lse, row_weight, need_temp_grad: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    d_query, d_key, d_inv_temp = ops.contrastive_backward(
        *_args(query, key, inv_temp, problem), lse, row_weight, bool(need_temp_grad), *tile_shape(query, key, problem)
    )
    return d_query, d_key, d_inv_temp if need_temp_grad else None


def forward_symmetric(query, key, inv_temp, problem: LossProblem):
    """Row lse (M,), column lse (N,) and the diagonal logit (M,) of a symmetric loss in one
    pass: the column sums come from the same strips (one more exp per element)."""
    return ops.contrastive_forward_symmetric(*_args(query, key, inv_temp, problem), *tile_shape(query, key, problem))


def backward_symmetric(
    query, key, inv_temp, problem: LossProblem, lse, lse_col, row_weight, col_weight, need_temp_grad: bool
):
    """Gradients of both directions in one pass (recompute + 2 GEMMs: 4 in all with the
    forward, against 6 for two directions)."""
    d_query, d_key, d_inv_temp = ops.contrastive_backward_symmetric(
        *_args(query, key, inv_temp, problem),
        lse,
        lse_col,
        row_weight,
        col_weight,
        bool(need_temp_grad),
        *tile_shape(query, key, problem),
    )
    return d_query, d_key, d_inv_temp if need_temp_grad else None
