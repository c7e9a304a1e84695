"""The CUDA C++ backend: `backend="cuda"`, the kernel contract of mmloss.backends on the ops
torch.ops.mmloss.contrastive_forward / contrastive_backward (mmloss.library) of mmloss._C.

Forward: one launch for the inverse norms, one for the loss tiles (tensor cores for bf16/fp16,
exact fp32 FMAs for fp32), one to combine column splits. Backward (the Triton backend's
design): a tile kernel writes H = a_i b_j G_ij / g into an R x N scratch, two cuBLAS GEMMs,
and a finish kernel for the normalisation's radial term. R keeps the scratch within
`scratch_bytes()`. Kernels, tiles and resources: docs/cuda.md.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from mmloss import library  # noqa: F401  (the ops and their fakes)
from mmloss.problem import LossProblem

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_SCRATCH_BYTES = 1 << 30
ROW_TILE = 64  # the kernels' row tile: chunks are whole tiles


def scratch_bytes() -> int:
    """Budget of the backward's R x N scratch (env MMLOSS_CUDA_SCRATCH_MB, default 1 GiB)."""
    mb = os.environ.get("MMLOSS_CUDA_SCRATCH_MB")
    return int(mb) << 20 if mb else DEFAULT_SCRATCH_BYTES


def row_chunk(M: int, N: int, element_size: int) -> int:
    """Rows per backward chunk: the R x N scratch within the budget, a multiple of ROW_TILE."""
    fit = scratch_bytes() // max(1, N * element_size)
    return M if fit >= M else max(ROW_TILE, fit // ROW_TILE * ROW_TILE)


def check(query: torch.Tensor, problem: LossProblem) -> None:
    """Raise TypeError/ValueError (naming the argument) for what these kernels cannot serve."""
    if query.dtype not in SUPPORTED:
        raise TypeError(f"query dtype {query.dtype} is not supported by backend 'cuda' "
                        "(float32, bfloat16, float16); use backend='reference' or 'cpu' for float64")
    if query.device.type != "cuda":
        raise ValueError(f"query is on {query.device}: backend 'cuda' needs CUDA tensors")


def _inv_temp(inv_temp, device: torch.device) -> torch.Tensor:
    """1/τ as a 1-element device tensor (float64; the kernels read it in fp32)."""
    if isinstance(inv_temp, torch.Tensor):
        return inv_temp.detach().to(device=device).reshape(1)
    return torch.full((1,), float(inv_temp), dtype=torch.float64, device=device)


def _problem_args(problem: LossProblem) -> tuple:
    return (problem.positives, float(problem.margin), problem.margin_query, problem.margin_key,
            problem.filter_query, problem.filter_key, float(problem.filter_threshold),
            problem.row_groups, problem.key_groups)


def forward(query, key, inv_temp, problem: LossProblem) -> Tuple[torch.Tensor, torch.Tensor]:
    """lse (M,) float64 over this key block's allowed columns (-inf if none; the positive's
    logit plus the row's loss when the positive is here, so that lse - pos_logit keeps a nearly
    solved row's relative accuracy) and the positive's logit (M,) fp32 (0 when not here)."""
    lse, pos_logit = torch.ops.mmloss.contrastive_forward(
        query, key, _inv_temp(inv_temp, query.device), *_problem_args(problem), 0)
    return lse, pos_logit


def backward(query, key, inv_temp, problem: LossProblem, lse, row_weight, need_temp_grad: bool
             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of Σ_i w_i loss_i over this block's columns, P from the given lse: d_query
    (M, d), d_key (N, d) in the inputs' dtype, d_inv_temp 0-dim float64 (or None)."""
    rows = row_chunk(query.shape[0], key.shape[0], query.element_size())
    d_query, d_key, d_inv_temp = torch.ops.mmloss.contrastive_backward(
        query, key, _inv_temp(inv_temp, query.device), *_problem_args(problem), lse, row_weight,
        bool(need_temp_grad), rows)
    return d_query, d_key, d_inv_temp if need_temp_grad else None
