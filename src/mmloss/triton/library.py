"""The Triton backend as torch.library custom ops, and the kernel contract on top of them.

    torch.ops.mmloss.triton_forward(query, key, inv_temp, inv_temp_value, <fields>)
        -> (lse (M,) fp64, pos_logit (M,) fp32)
    torch.ops.mmloss.triton_forward_symmetric(<the same>)
        -> (lse (M,) fp64, lse_col (N,) fp64, pos_logit (M,) fp32)
    torch.ops.mmloss.triton_backward(query, key, inv_temp, inv_temp_value, <fields>, lse,
        row_weight, need_temp_grad) -> (d_query (M, d), d_key (N, d), d_inv_temp () fp32)
    torch.ops.mmloss.triton_backward_symmetric(<the same>, lse_col, col_weight)
        -> (d_query, d_key, d_inv_temp)

<fields> are those of `ops.Fields` (positives, margin, margin_query, margin_key,
filter_query, filter_key, filter_threshold, row_groups, key_groups). 1/tau is either the
0-dim tensor `inv_temp` (read on the device) or, when it is None, the float
`inv_temp_value`. d_inv_temp holds a value only when need_temp_grad. The ops are opaque
to torch.compile (fake implementations give the output shapes), so a compiled step runs
the same kernels and host code as eager. The bodies are `ops.run_forward` and
`ops.run_backward`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mmloss.problem import LossProblem
from mmloss.triton import ops

@torch.library.custom_op("mmloss::triton_forward", mutates_args=())
def _forward_op(query: Tensor, key: Tensor, inv_temp: Optional[Tensor], inv_temp_value: float,
                positives: Tensor, margin: float, margin_query: Optional[Tensor], margin_key: Optional[Tensor],
                filter_query: Optional[Tensor], filter_key: Optional[Tensor], filter_threshold: float,
                row_groups: Optional[Tensor], key_groups: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    f = ops.Fields(positives, margin, margin_query, margin_key, filter_query, filter_key, filter_threshold,
                   row_groups, key_groups)
    lse, pos_logit, _ = ops.run_forward(query, key, inv_temp, inv_temp_value, f, symmetric=False)
    return lse, pos_logit


@torch.library.custom_op("mmloss::triton_forward_symmetric", mutates_args=())
def _forward_symmetric_op(query: Tensor, key: Tensor, inv_temp: Optional[Tensor], inv_temp_value: float,
                          positives: Tensor, margin: float, margin_query: Optional[Tensor],
                          margin_key: Optional[Tensor], filter_query: Optional[Tensor],
                          filter_key: Optional[Tensor], filter_threshold: float, row_groups: Optional[Tensor],
                          key_groups: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    f = ops.Fields(positives, margin, margin_query, margin_key, filter_query, filter_key, filter_threshold,
                   row_groups, key_groups)
    lse, pos_logit, lse_col = ops.run_forward(query, key, inv_temp, inv_temp_value, f, symmetric=True)
    return lse, lse_col, pos_logit


@torch.library.custom_op("mmloss::triton_backward", mutates_args=())
def _backward_op(query: Tensor, key: Tensor, inv_temp: Optional[Tensor], inv_temp_value: float,
                 positives: Tensor, margin: float, margin_query: Optional[Tensor], margin_key: Optional[Tensor],
                 filter_query: Optional[Tensor], filter_key: Optional[Tensor], filter_threshold: float,
                 row_groups: Optional[Tensor], key_groups: Optional[Tensor], lse: Tensor, row_weight: Tensor,
                 need_temp_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    f = ops.Fields(positives, margin, margin_query, margin_key, filter_query, filter_key, filter_threshold,
                   row_groups, key_groups)
    return ops.run_backward(query, key, inv_temp, inv_temp_value, f, lse, row_weight, need_temp_grad, None, None)


@torch.library.custom_op("mmloss::triton_backward_symmetric", mutates_args=())
def _backward_symmetric_op(query: Tensor, key: Tensor, inv_temp: Optional[Tensor], inv_temp_value: float,
                           positives: Tensor, margin: float, margin_query: Optional[Tensor],
                           margin_key: Optional[Tensor], filter_query: Optional[Tensor],
                           filter_key: Optional[Tensor], filter_threshold: float, row_groups: Optional[Tensor],
                           key_groups: Optional[Tensor], lse: Tensor, row_weight: Tensor, need_temp_grad: bool,
                           lse_col: Tensor, col_weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    f = ops.Fields(positives, margin, margin_query, margin_key, filter_query, filter_key, filter_threshold,
                   row_groups, key_groups)
    return ops.run_backward(query, key, inv_temp, inv_temp_value, f, lse, row_weight, need_temp_grad,
                            lse_col, col_weight)


def _row_stats(query: Tensor) -> Tuple[Tensor, Tensor]:
    rows = query.shape[0]
    return query.new_empty(rows, dtype=torch.float64), query.new_empty(rows, dtype=torch.float32)


@_forward_op.register_fake
def _(query, key, *args):
    return _row_stats(query)


@_forward_symmetric_op.register_fake
def _(query, key, *args):
    lse, pos_logit = _row_stats(query)
    return lse, key.new_empty(key.shape[0], dtype=torch.float64), pos_logit


def _gradients(query: Tensor, key: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return query.new_empty(query.shape), key.new_empty(key.shape), query.new_empty((), dtype=torch.float32)


@_backward_op.register_fake
def _(query, key, *args):
    return _gradients(query, key)


@_backward_symmetric_op.register_fake
def _(query, key, *args):
    return _gradients(query, key)


# The kernel contract of mmloss.backends, on the ops.

def _temperature(inv_temp) -> Tuple[Optional[Tensor], float]:
    return (inv_temp, 0.0) if isinstance(inv_temp, Tensor) else (None, float(inv_temp))


def _d_inv_temp(temp_grad: Tensor, inv_temp, need_temp_grad: bool) -> Optional[Tensor]:
    if not need_temp_grad:
        return None
    return temp_grad.to(inv_temp.dtype if isinstance(inv_temp, Tensor) else torch.float32)


def forward(query: Tensor, key: Tensor, inv_temp, problem: LossProblem) -> Tuple[Tensor, Tensor]:
    """lse (M,) fp64 over this key block's allowed columns and the positive's logit (M,)
    fp32 (0 when the positive is not in this block). One launch for small batches (norms
    fused), else two (norms, loss) and a combine when the columns are split."""
    return torch.ops.mmloss.triton_forward(query, key, *_temperature(inv_temp), *ops.fields(problem))


def forward_symmetric(query: Tensor, key: Tensor, inv_temp, problem: LossProblem) -> Tuple[Tensor, Tensor, Tensor]:
    """Both directions of a symmetric loss (M == N, diagonal positives) in one pass over the
    tiles: row lse (M,) fp64, column lse (N,) fp64 and the diagonal logit (M,) fp32."""
    return torch.ops.mmloss.triton_forward_symmetric(query, key, *_temperature(inv_temp), *ops.fields(problem))


def backward(query: Tensor, key: Tensor, inv_temp, problem: LossProblem, lse: Tensor, row_weight: Tensor,
             need_temp_grad: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients of sum_i w_i loss_i over this block's columns, with P from the given lse:
    d_query (M, d), d_key (N, d) in the inputs' dtype, d_inv_temp 0-dim (or None)."""
    d_query, d_key, temp_grad = torch.ops.mmloss.triton_backward(
        query, key, *_temperature(inv_temp), *ops.fields(problem), lse, row_weight, bool(need_temp_grad))
    return d_query, d_key, _d_inv_temp(temp_grad, inv_temp, need_temp_grad)


def backward_symmetric(query: Tensor, key: Tensor, inv_temp, problem: LossProblem, lse: Tensor, lse_col: Tensor,
                       row_weight: Tensor, col_weight: Tensor, need_temp_grad: bool
                       ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients of sum_i w_i row_loss_i + sum_j v_j col_loss_j in one pass over the tiles:
    each tile's G carries both directions' softmax terms."""
    d_query, d_key, temp_grad = torch.ops.mmloss.triton_backward_symmetric(
        query, key, *_temperature(inv_temp), *ops.fields(problem), lse, row_weight, bool(need_temp_grad),
        lse_col, col_weight)
    return d_query, d_key, _d_inv_temp(temp_grad, inv_temp, need_temp_grad)
