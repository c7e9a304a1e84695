"""`contrastive_loss`: checks -> backend choice -> autograd.Functions (one per direction, or one pass for both)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from mmloss import backends
from mmloss.checks import Temperature, build_problem, check_global_negatives
from mmloss.constants import SYMMETRIC_MAX_INV_TEMP
from mmloss.problem import LossProblem
from mmloss.reference import contrastive_loss_reference


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
    query, key, lses = saved[0], saved[1], saved[2: 2 + ctx.lse_count]
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


def _one_pass_symmetric(kernel_module, inv_temp) -> bool:
    """Whether a symmetric loss takes the backend's one-pass pair: it has one, and 1/τ is
    within SYMMETRIC_MAX_INV_TEMP (a tensor τ is not read back: no host sync)."""
    return hasattr(kernel_module, "forward_symmetric") and (
        isinstance(inv_temp, torch.Tensor) or abs(float(inv_temp)) <= SYMMETRIC_MAX_INV_TEMP)


def inverse_temperature(temperature: Temperature):
    """1/τ in float64 (a tensor τ keeps its autograd link): rounding it to fp32 first would
    cost ~1e-7 relative error in every logit."""
    return 1.0 / (temperature.double() if isinstance(temperature, torch.Tensor) else temperature)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _direction_sum(query, key, inv_temp, problem: LossProblem, kernel_module) -> torch.Tensor:
    """Σ of one direction's row losses, by the fused path where the backend has one."""
    if hasattr(kernel_module, "forward_with_grad") and _needs_grad(query, key, inv_temp):
        return ContrastiveSum.apply(query, key, inv_temp, problem, kernel_module)
    return ContrastiveRows.apply(query, key, inv_temp, problem, kernel_module).sum()


def contrastive_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    positives: Optional[torch.Tensor] = None,
    temperature: Temperature = 0.05,
    margin: float = 0.0,
    margin_teacher: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    filter_teacher: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    filter_threshold: Optional[float] = None,
    filter_normalize: bool = False,
    key_groups: Optional[torch.Tensor] = None,
    symmetric: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    global_negatives: Optional[str] = None,
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> torch.Tensor:
    """Masked, margined InfoNCE of rows `query` against columns `key` (SPEC §1).

    query (M, d), key (N, d): embeddings, normalised inside (fp32, bf16, fp16; fp64 on CPU).
    positives (M,) int: each row's positive column, -100 ignores the row; None = arange(M).
    temperature: τ as a float, or a 0-dim tensor (learnable when it requires grad).
    margin: angular margin m (radians, [0, π/2)) on negatives: f = cos(θ - m').
    margin_teacher (tq (M, dt), tk (N, dt)): adaptive m'_ij = m (1 - cos(tq_i, tk_j)).
    filter_teacher (fq (M, df), fk (N, df)) with filter_threshold: negative j is dropped from
        row i when <fq_i, fk_j> > filter_threshold (cosine when filter_normalize=True).
    key_groups (N,) int: columns sharing the positive's group (other than the positive) are
        not negatives.
    symmetric: CLIP-style mean of the row and column losses (M == N, positives None).
    reduction: "mean" over non-ignored rows, "sum", or "none" ((M,), 0 for ignored rows).
    backend: "auto" | "reference" | "cpu" | "triton" | "cuda"; `mmloss.last_backend()` says
        which one ran.
    global_negatives: None, "gather" or "ring": the keys of every rank of `process_group`
        (default: the world) join each row's negatives; see `mmloss.distributed` for the
        index and gradient conventions.

    Returns the loss in fp32 (fp64 for fp64 inputs).
    """
    check_global_negatives(global_negatives, process_group)
    if global_negatives is not None:
        from mmloss.distributed import global_contrastive_loss  # it imports this module

        return global_contrastive_loss(
            query, key, positives=positives, temperature=temperature, margin=margin,
            margin_teacher=margin_teacher, filter_teacher=filter_teacher,
            filter_threshold=filter_threshold, filter_normalize=filter_normalize,
            key_groups=key_groups, symmetric=symmetric, reduction=reduction, backend=backend,
            mode=global_negatives, process_group=process_group,
        )
    problem = build_problem(
        query, key, positives=positives, temperature=temperature, margin=margin,
        margin_teacher=margin_teacher, filter_teacher=filter_teacher,
        filter_threshold=filter_threshold, filter_normalize=filter_normalize,
        key_groups=key_groups, symmetric=symmetric, reduction=reduction, backend=backend,
    )
    name = backends.resolve(backend, query.device, query.dtype, key.shape[0])
    if name == "reference":
        backends.record(name)
        return contrastive_loss_reference(
            query, key, positives=problem.positives, temperature=temperature, margin=margin,
            margin_teacher=margin_teacher, filter_teacher=filter_teacher,
            filter_threshold=filter_threshold, filter_normalize=filter_normalize,
            key_groups=key_groups, symmetric=symmetric, reduction=reduction,
        )
    kernel_module = backends.kernels(name)
    kernel_module.check(query, problem)
    backends.record(name)
    inv_temp = inverse_temperature(temperature)
    if symmetric and _one_pass_symmetric(kernel_module, inv_temp):
        rows = ContrastiveSymmetricRows.apply(query, key, inv_temp, problem, kernel_module)
        return {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]
    directions = [(query, key, problem)]
    if symmetric:
        directions.append((key, query, problem.transposed()))
    share = 1.0 / len(directions)
    if reduction == "none":
        return share * sum(ContrastiveRows.apply(a, b, inv_temp, p, kernel_module) for a, b, p in directions)
    total = share * sum(_direction_sum(a, b, inv_temp, p, kernel_module) for a, b, p in directions)
    # A mean over no valid rows is a zero loss with zero gradients (not 0/0).
    return total if reduction == "sum" else total / problem.valid_rows.sum().clamp(min=1)
