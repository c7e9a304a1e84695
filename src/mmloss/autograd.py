"""The autograd.Functions of `contrastive_loss` over a kernel module (the block contract of
`mmloss.backends`): per-row losses of one direction, their sum with the gradient formed in the
forward pass, and both directions of a symmetric loss in one pass. `mmloss.contrastive` and
`mmloss.distributed` use them; torch.compile traces them (the kernels are torch.library ops
with fake implementations).
"""

from __future__ import annotations

import torch

from mmloss.checks import Temperature
from mmloss.problem import LossProblem


def inverse_temperature(temperature: Temperature):
    """1/τ in float64 (a tensor τ keeps its autograd link): rounding it to fp32 first would
    cost ~1e-7 relative error in every logit."""
    return 1.0 / (temperature.double() if isinstance(temperature, torch.Tensor) else temperature)


def _loss_dtype(input_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def _row_losses(lse, pos_logit, problem: LossProblem) -> torch.Tensor:
    """lse - pos_logit for valid rows, 0 for ignored ones, in the kernel's (wide) dtype."""
    return torch.where(problem.valid_rows, lse - pos_logit, torch.zeros_like(lse))


def _save_inputs(ctx, query, key, lses: tuple, inv_temp, problem: LossProblem, kernel_module) -> None:
    ctx.problem, ctx.kernel_module = problem, kernel_module
    ctx.inv_temp_is_tensor = isinstance(inv_temp, torch.Tensor)
    ctx.lse_count = len(lses)
    if ctx.inv_temp_is_tensor:
        ctx.save_for_backward(query, key, *lses, inv_temp)
    else:
        ctx.save_for_backward(query, key, *lses)
        ctx.inv_temp = inv_temp


def _saved(ctx):
    """(query, key, lses, inv_temp, need_temp_grad) as `_save_inputs` kept them."""
    saved = ctx.saved_tensors
    query, key, lses = saved[0], saved[1], saved[2 : 2 + ctx.lse_count]
    inv_temp = saved[-1] if ctx.inv_temp_is_tensor else ctx.inv_temp
    return query, key, lses, inv_temp, ctx.inv_temp_is_tensor and ctx.needs_input_grad[2]


def _recompute_grads(ctx, row_weight: torch.Tensor):
    """d_query, d_key, d_inv_temp (or None) of Σ_i row_weight_i loss_i, recomputing the tiles."""
    query, key, (lse,), inv_temp, need_temp_grad = _saved(ctx)
    row_weight = torch.where(ctx.problem.valid_rows, row_weight, torch.zeros_like(row_weight))
    d_query, d_key, d_inv_temp = ctx.kernel_module.backward(
        query, key, inv_temp, ctx.problem, lse, row_weight.contiguous(), need_temp_grad
    )
    return d_query, d_key, d_inv_temp if need_temp_grad else None


class ContrastiveRows(torch.autograd.Function):
    """Per-row losses (M,) of one direction (0 for ignored rows), by a kernel backend that
    never builds the M × N matrix; backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, query, key, inv_temp, problem: LossProblem, kernel_module):
        lse, pos_logit = kernel_module.forward(query, key, inv_temp, problem)
        _save_inputs(ctx, query, key, (lse,), inv_temp, problem, kernel_module)
        return _row_losses(lse, pos_logit, problem).to(_loss_dtype(query.dtype))

    @staticmethod
    def backward(ctx, grad_rows):
        return (*_recompute_grads(ctx, grad_rows), None, None)


class ContrastiveSum(torch.autograd.Function):
    """Σ over non-ignored rows of one direction's losses, with the gradient formed during the
    forward pass (the kernel's `forward_with_grad`): the loss is the last node, so the first
    backward only scales it by the incoming scalar, saving the recompute GEMM. The gradients
    are handed over (not copied); a second backward (retain_graph) recomputes the tiles."""

    @staticmethod
    def forward(ctx, query, key, inv_temp, problem: LossProblem, kernel_module):
        lse, pos_logit, d_query, d_key, d_inv_temp = kernel_module.forward_with_grad(query, key, inv_temp, problem)
        _save_inputs(ctx, query, key, (lse,), inv_temp, problem, kernel_module)
        ctx.precomputed = (d_query, d_key, d_inv_temp)
        return _row_losses(lse, pos_logit, problem).sum().to(_loss_dtype(query.dtype))

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.precomputed is None:
            rows = ctx.problem.valid_rows.to(grad_total.dtype) * grad_total
            return (*_recompute_grads(ctx, rows), None, None)
        d_query, d_key, d_inv_temp = ctx.precomputed
        ctx.precomputed = None  # the only references now: autograd may keep them as .grad
        d_query.mul_(grad_total.to(d_query.dtype))
        d_key.mul_(grad_total.to(d_key.dtype))
        d_inv_temp = d_inv_temp * grad_total if ctx.needs_input_grad[2] else None
        return d_query, d_key, d_inv_temp, None, None


class ContrastiveSymmetricRows(torch.autograd.Function):
    """Per-index losses ½(row_i + col_i) (M,) of a symmetric loss (M == N, diagonal
    positives) by a backend with `forward_symmetric`: one pass over the tiles gives both
    directions' lse, and one backward pass both directions' gradients."""

    @staticmethod
    def forward(ctx, query, key, inv_temp, problem: LossProblem, kernel_module):
        lse, lse_col, pos_logit = kernel_module.forward_symmetric(query, key, inv_temp, problem)
        _save_inputs(ctx, query, key, (lse, lse_col), inv_temp, problem, kernel_module)
        return (0.5 * ((lse - pos_logit) + (lse_col - pos_logit))).to(_loss_dtype(query.dtype))

    @staticmethod
    def backward(ctx, grad_rows):
        query, key, (lse, lse_col), inv_temp, need_temp_grad = _saved(ctx)
        weight = (0.5 * grad_rows).contiguous()
        d_query, d_key, d_inv_temp = ctx.kernel_module.backward_symmetric(
            query, key, inv_temp, ctx.problem, lse, lse_col, weight, weight, need_temp_grad
        )
        return d_query, d_key, d_inv_temp if need_temp_grad else None, None, None
