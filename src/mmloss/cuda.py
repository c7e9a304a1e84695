"""The CUDA C++ backend: `backend="cuda"`, the kernel contract of mmloss.backends on the ops
torch.ops.mmloss.contrastive_forward / contrastive_backward (mmloss.library) of mmloss._C.

Forward: one launch for the inverse norms, one for the loss tiles (tensor cores for bf16/fp16,
exact fp32 FMAs for fp32), one to combine column splits. Backward (the Triton backend's
design): per chunk of R rows x C columns a tile kernel writes H = a_i b_j G_ij / g into an
R x C scratch, two cuBLAS GEMMs, and a finish kernel for the normalisation's radial term.
`chunk_shape` keeps the scratch within MMLOSS_CUDA_SCRATCH_MB (default 1 GiB) for every M and
N. Rows of norm above 2^40 are scaled by a power of two in the glue (csrc/cuda/
contrastive_cuda.cpp). Kernels, tiles and resources: docs/cuda.md.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from mmloss import library  # noqa: F401  (the ops and their fakes)
from mmloss.kernel_common import check_gpu_dtype, inv_temp_tensor, rows_within, scratch_bytes
from mmloss.problem import LossProblem

TILE = 64  # the kernels' row and column tile: chunks are whole tiles (but the last)


def chunk_shape(M: int, N: int, element_size: int) -> Tuple[int, int]:
    """(rows R, columns C) of the backward's R x C scratch of `element_size`-byte elements,
    within scratch_bytes("cuda") for every M and N (at least one TILE x TILE tile). Whole rows
    (C = N) while min(M, S) of them fit, S the side of a square of the budget (a multiple of
    TILE); beyond that R = min(M, S) and C the largest multiple of TILE that fits, so that both
    GEMMs over a chunk (H K_C: inner size C, Hᵀ Q_R: inner size R) stay large."""
    budget = scratch_bytes("cuda")
    side = max(TILE, math.isqrt(budget // element_size) // TILE * TILE)
    rows = rows_within(budget, N * element_size, minimum=TILE, multiple=TILE, total=M)
    if rows * N * element_size <= budget and rows >= min(M, side):
        return rows, N
    rows = min(M, side)
    return rows, rows_within(budget, rows * element_size, minimum=TILE, multiple=TILE, total=N)


def check(query: torch.Tensor, problem: LossProblem) -> None:
    """Raise TypeError/ValueError (naming the argument) for what these kernels cannot serve."""
    check_gpu_dtype(query, "cuda")
    if query.device.type != "cuda":
        raise ValueError(f"query is on {query.device}: backend 'cuda' needs CUDA tensors")
    problem.reject_features("cuda")


def forward(query, key, inv_temp, problem: LossProblem) -> Tuple[torch.Tensor, torch.Tensor]:
    """lse (M,) float64 over this key block's allowed columns (-inf if none; the positive's
    logit plus the row's loss when the positive is here, so that lse - pos_logit keeps a nearly
    solved row's relative accuracy) and the positive's logit (M,) fp32 (0 when not here)."""
    return torch.ops.mmloss.contrastive_forward(
        query, key, inv_temp_tensor(inv_temp, query.device), *problem.kernel_args(), 0, 0
    )


def backward(
    query, key, inv_temp, problem: LossProblem, lse, row_weight, need_temp_grad: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of Σ_i w_i loss_i over this block's columns, P from the given lse: d_query
    (M, d), d_key (N, d) in the inputs' dtype, d_inv_temp 0-dim float64 (or None)."""
    rows, cols = chunk_shape(query.shape[0], key.shape[0], query.element_size())
    d_query, d_key, d_inv_temp = torch.ops.mmloss.contrastive_backward(
        query,
        key,
        inv_temp_tensor(inv_temp, query.device),
        *problem.kernel_args(),
        lse,
        row_weight,
        bool(need_temp_grad),
        rows,
        cols,
    )
    return d_query, d_key, d_inv_temp if need_temp_grad else None
