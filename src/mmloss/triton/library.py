"""The Triton backend as torch.library custom ops, and the kernel contract on top of them.

    torch.ops.mmloss.triton_forward(query, key, inv_temp, inv_temp_value, <fields>)
        -> (lse (M,) fp64, pos_logit (M,) fp32)
    torch.ops.mmloss.triton_forward_symmetric(<the same>)
        -> (lse (M,) fp64, lse_col (N,) fp64, pos_logit (M,) fp32)
    torch.ops.mmloss.triton_backward(query, key, inv_temp, inv_temp_value, <fields>, lse,
        row_weight, need_temp_grad) -> (d_query (M, d), d_key (N, d), d_inv_temp () fp32)
    torch.ops.mmloss.triton_backward_symmetric(<the same>, lse_col, col_weight)
        -> (d_query, d_key, d_inv_temp)

<fields> are mmloss.problem.KERNEL_FIELDS, in that order and with LossProblem's types: the
schemas are generated from them (`_op`), as the mmloss._C ops' are from the same list in
C++. 1/tau is either the 0-dim tensor `inv_temp` (read on the device, as fp32: not
kernel_common.inv_temp_tensor's fp64, whose load spills a tile kernel) or, when it is None,
the float `inv_temp_value` (passed by value: no fill launch). d_inv_temp holds a value only
when need_temp_grad. The ops are opaque to torch.compile (fake implementations give the
output shapes), so a compiled step runs the same kernels and host code as eager. The bodies
are `ops.run_forward` and `ops.run_backward`.
"""

from __future__ import annotations

import inspect
import typing
from typing import Optional, Tuple

import torch
from torch import Tensor

from mmloss.problem import KERNEL_FIELDS, LossProblem
from mmloss.triton import ops

_LEAD = (("query", Tensor), ("key", Tensor), ("inv_temp", Optional[Tensor]), ("inv_temp_value", float))
_FIELD_TYPES = typing.get_type_hints(LossProblem)
_BACKWARD = (("lse", Tensor), ("row_weight", Tensor), ("need_temp_grad", bool))
_SYMMETRIC = (("lse_col", Tensor), ("col_weight", Tensor))


def _op(name: str, tail, returns):
    """Register the decorated body(*_LEAD, *KERNEL_FIELDS, *tail) as the custom op
    mmloss::<name>; its schema is inferred from a signature made of those (name, type) pairs."""
    pairs = (*_LEAD, *((f, _FIELD_TYPES[f]) for f in KERNEL_FIELDS), *tail)
    signature = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in pairs],
        return_annotation=returns,
    )

    def register(body):
        body.__signature__ = signature
        return torch.library.custom_op(f"mmloss::{name}", mutates_args=())(body)

    return register


def _split(args) -> Tuple[ops.Fields, tuple]:
    """The op arguments after inv_temp_value: (the problem's fields, the op's own inputs)."""
    return ops.Fields(*args[: len(KERNEL_FIELDS)]), tuple(args[len(KERNEL_FIELDS) :])


@_op("triton_forward", (), Tuple[Tensor, Tensor])
def _forward_op(query, key, inv_temp, inv_temp_value, *rest):
    f, _ = _split(rest)
    lse, pos_logit, _ = ops.run_forward(query, key, inv_temp, inv_temp_value, f, symmetric=False)
    return lse, pos_logit


@_op("triton_forward_symmetric", (), Tuple[Tensor, Tensor, Tensor])
def _forward_symmetric_op(query, key, inv_temp, inv_temp_value, *rest):
    f, _ = _split(rest)
    lse, pos_logit, lse_col = ops.run_forward(query, key, inv_temp, inv_temp_value, f, symmetric=True)
    return lse, lse_col, pos_logit


@_op("triton_backward", _BACKWARD, Tuple[Tensor, Tensor, Tensor])
def _backward_op(query, key, inv_temp, inv_temp_value, *rest):
    f, (lse, row_weight, need_temp_grad) = _split(rest)
    return ops.run_backward(query, key, inv_temp, inv_temp_value, f, lse, row_weight, need_temp_grad, None, None)


@_op("triton_backward_symmetric", _BACKWARD + _SYMMETRIC, Tuple[Tensor, Tensor, Tensor])
def _backward_symmetric_op(query, key, inv_temp, inv_temp_value, *rest):
    f, (lse, row_weight, need_temp_grad, lse_col, col_weight) = _split(rest)
    return ops.run_backward(
        query, key, inv_temp, inv_temp_value, f, lse, row_weight, need_temp_grad, lse_col, col_weight
    )


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
    """(inv_temp, inv_temp_value) of the ops: a tensor 1/tau as it is (the op body makes it the
    kernels' fp32), a float by value."""
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


def backward(
    query: Tensor, key: Tensor, inv_temp, problem: LossProblem, lse: Tensor, row_weight: Tensor, need_temp_grad: bool
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients of sum_i w_i loss_i over this block's columns, with P from the given lse:
    d_query (M, d), d_key (N, d) in the inputs' dtype, d_inv_temp 0-dim (or None)."""
    d_query, d_key, temp_grad = torch.ops.mmloss.triton_backward(
        query, key, *_temperature(inv_temp), *ops.fields(problem), lse, row_weight, bool(need_temp_grad)
    )
    return d_query, d_key, _d_inv_temp(temp_grad, inv_temp, need_temp_grad)


def backward_symmetric(
    query: Tensor,
    key: Tensor,
    inv_temp,
    problem: LossProblem,
    lse: Tensor,
    lse_col: Tensor,
    row_weight: Tensor,
    col_weight: Tensor,
    need_temp_grad: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients of sum_i w_i row_loss_i + sum_j v_j col_loss_j in one pass over the tiles:
    each tile's G carries both directions' softmax terms."""
    d_query, d_key, temp_grad = torch.ops.mmloss.triton_backward_symmetric(
        query,
        key,
        *_temperature(inv_temp),
        *ops.fields(problem),
        lse,
        row_weight,
        bool(need_temp_grad),
        lse_col,
        col_weight,
    )
    return d_query, d_key, _d_inv_temp(temp_grad, inv_temp, need_temp_grad)
