"""The compiled CPU backend: `backend="cpu"`, the kernel contract of mmloss.backends on mmloss._C.

Rows are processed in strips, each strip in column tiles of the key block. A strip's tiles
(similarity, and one per teacher) take at most MMLOSS_CPU_SCRATCH_MB (default 4 MiB), whatever
M and N: a strip spans every column while that leaves it MIN_FULL_ROWS rows (then the fused
forward+gradient is one pass of 3 GEMMs), else tiles are MIN_STRIP_ROWS rows by what the budget
leaves of columns (at least MIN_TILE_COLS), which keeps the GEMMs compute-bound; the fused path
then takes a second pass over the tiles (4 GEMMs).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from mmloss import _C
from mmloss.problem import LossProblem

SCRATCH_BYTES = int(float(os.environ.get("MMLOSS_CPU_SCRATCH_MB", "4")) * 2**20)
MIN_FULL_ROWS = 128
MIN_STRIP_ROWS = 256
MIN_TILE_COLS = 64


def tile_shape(query: torch.Tensor, key: torch.Tensor, problem: LossProblem) -> Tuple[int, int]:
    """(rows, columns) of a strip's tiles within SCRATCH_BYTES (see the module docstring)."""
    tiles = 1 + problem.adaptive_margin + problem.has_filter
    item = 8 if query.dtype == torch.float64 else 4
    elements = max(SCRATCH_BYTES // (item * tiles), 1)
    n = max(key.shape[0], 1)
    if elements >= MIN_FULL_ROWS * n:
        return elements // n, n
    return MIN_STRIP_ROWS, max(elements // MIN_STRIP_ROWS, MIN_TILE_COLS)


def check(query: torch.Tensor, problem: LossProblem) -> None:
    if query.device.type != "cpu":
        raise ValueError(f"query is on {query.device}: backend 'cpu' needs CPU tensors")


def _call(query, key, inv_temp, problem: LossProblem, lse=None, row_weight=None, **symmetric):
    rows, cols = tile_shape(query, key, problem)
    return _C.contrastive_cpu(
        query, key, float(inv_temp), problem.positives, problem.margin,
        problem.margin_query, problem.margin_key, problem.filter_query, problem.filter_key,
        problem.filter_threshold, problem.row_groups, problem.key_groups, lse, row_weight,
        rows, **symmetric, block_cols=cols,
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
