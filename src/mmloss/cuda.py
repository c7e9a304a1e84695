"""The CUDA C++ backend: `backend="cuda"`, the kernel contract of mmloss.backends on the ops
torch.ops.mmloss.contrastive_forward / contrastive_backward (mmloss.library) of mmloss._C.

Forward: one launch for the inverse norms, one for the loss tiles (tensor cores for bf16/fp16,
exact fp32 FMAs for fp32), one to combine column splits. Backward (the Triton backend's
design): a tile kernel writes H = a_i b_j G_ij / g into an R x N scratch, two cuBLAS GEMMs,
and a finish kernel for the normalisation's radial term. R keeps the scratch within
MMLOSS_CUDA_SCRATCH_MB (default 1 GiB). Kernels, tiles and resources: docs/cuda.md.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from mmloss import library  # noqa: F401  (the ops and their fakes)
from mmloss.kernel_common import check_gpu_dtype, inv_temp_tensor, rows_within, scratch_bytes
from mmloss.problem import LossProblem

ROW_TILE = 64  # the kernels' row tile: chunks are whole tiles


def row_chunk(M: int, N: int, element_size: int) -> int:
    """Rows per backward chunk: the R x N scratch within the budget, a multiple of ROW_TILE."""
    return rows_within(scratch_bytes("cuda"), N * element_size, minimum=ROW_TILE, multiple=ROW_TILE, total=M)


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
    rows = row_chunk(query.shape[0], key.shape[0], query.element_size())
    d_query, d_key, d_inv_temp = torch.ops.mmloss.contrastive_backward(
        query,
        key,
        inv_temp_tensor(inv_temp, query.device),
        *problem.kernel_args(),
        lse,
        row_weight,
        bool(need_temp_grad),
        rows,
        0,
    )
    return d_query, d_key, d_inv_temp if need_temp_grad else None
