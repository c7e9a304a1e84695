"""The compiled CPU backend: `backend="cpu"`, the kernel contract of mmloss.backends on mmloss._C.

Rows are processed in strips against the whole key block. A strip's tiles (similarity, and
one per teacher) take at most MMLOSS_CPU_SCRATCH_MB (default 4 MiB) unless that leaves fewer
than MIN_STRIP_ROWS rows, which keep the GEMMs compute-bound: never M × N.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from mmloss import _C
from mmloss.problem import LossProblem

SCRATCH_BYTES = int(float(os.environ.get("MMLOSS_CPU_SCRATCH_MB", "4")) * 2**20)
MIN_STRIP_ROWS = 256


def strip_rows(query: torch.Tensor, key: torch.Tensor, problem: LossProblem) -> int:
    """Rows per strip: what SCRATCH_BYTES allows for the strip's tiles, at least MIN_STRIP_ROWS."""
    tiles = 1 + problem.adaptive_margin + problem.has_filter
    item = 8 if query.dtype == torch.float64 else 4
    return max(MIN_STRIP_ROWS, SCRATCH_BYTES // (item * key.shape[0] * tiles), 1)


def check(query: torch.Tensor, problem: LossProblem) -> None:
    if query.device.type != "cpu":
        raise ValueError(f"query is on {query.device}: backend 'cpu' needs CPU tensors")


def _call(query, key, inv_temp, problem: LossProblem, lse=None, row_weight=None, **symmetric):
    return _C.contrastive_cpu(
        query, key, float(inv_temp), problem.positives, problem.margin,
        problem.margin_query, problem.margin_key, problem.filter_query, problem.filter_key,
        problem.filter_threshold, problem.row_groups, problem.key_groups, lse, row_weight,
        strip_rows(query, key, problem), **symmetric,
    )


def forward(query, key, inv_temp, problem: LossProblem) -> Tuple[torch.Tensor, torch.Tensor]:
    lse, pos_logit = _call(query, key, inv_temp, problem)
    return lse, pos_logit


def forward_with_grad(query, key, inv_temp, problem: LossProblem):
    """lse, pos_logit and the gradients of Σ_{valid i} loss_i in one pass (3 GEMMs, no recompute)."""
    weight = problem.valid_rows.to(torch.float64 if query.dtype == torch.float64 else torch.float32)
    lse, pos_logit, d_query, d_key, d_inv_temp = _call(query, key, inv_temp, problem, row_weight=weight)
    return lse, pos_logit, d_query, d_key, d_inv_temp


def forward_symmetric(query, key, inv_temp, problem: LossProblem):
    """Row lse (M,), column lse (N,) and the diagonal logit (M,) of a symmetric loss in one
    pass: the column sums come from the same strips (one more exp per element)."""
    lse, pos_logit, lse_col = _call(query, key, inv_temp, problem, symmetric=True)
    return lse, lse_col, pos_logit


def backward_symmetric(query, key, inv_temp, problem: LossProblem, lse, lse_col, row_weight, col_weight,
                       need_temp_grad: bool):
    """Gradients of both directions in one pass (recompute + 2 GEMMs: 4 in all with the
    forward, against 6 for two directions)."""
    _, _, d_query, d_key, d_inv_temp = _call(query, key, inv_temp, problem, lse=lse, row_weight=row_weight,
                                             symmetric=True, col_lse=lse_col, col_weight=col_weight)
    return d_query, d_key, d_inv_temp if need_temp_grad else None


def backward(query, key, inv_temp, problem: LossProblem, lse, row_weight, need_temp_grad: bool
             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    _, _, d_query, d_key, d_inv_temp = _call(query, key, inv_temp, problem, lse=lse, row_weight=row_weight)
    return d_query, d_key, d_inv_temp if need_temp_grad else None
