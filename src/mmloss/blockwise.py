"""The kernel block contract of `mmloss.backends` in dense torch, for backend="reference".

`mmloss.distributed` combines key blocks held by different ranks through `forward` and
`backward` below, exactly as it does with the compiled and Triton kernels. This module builds
the (M × N_block) logits of one block, so it is only for the reference backend (small batches,
float64 checks); the margin's sine comes from `mmloss.reference`.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from mmloss.constants import NORM_EPS
from mmloss.problem import HARDNESS_ALL, HARDNESS_OWN, LossProblem
from mmloss.reference import _sin_from_cos

InvTemp = Union[float, torch.Tensor]


def check(query: torch.Tensor, problem: LossProblem) -> None:
    """Every input the public argument checks accept is served here."""


def _logits(query, key, inv_temp: InvTemp, problem: LossProblem) -> Tuple[torch.Tensor, torch.Tensor]:
    """logit_ij (M, N) of docs/contract.md §1 and §3 for this block (-inf where column j is not
    allowed in row i, NaN where the filter's teacher score is NaN) and the mask (M, N) of each
    row's positives (its group's columns with multi_positive)."""
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    cos = F.normalize(query.to(acc), dim=-1, eps=NORM_EPS) @ F.normalize(key.to(acc), dim=-1, eps=NORM_EPS).T
    columns = torch.arange(key.shape[0], device=key.device)
    is_pos = problem.positives[:, None] == columns[None, :]
    removed = torch.zeros_like(is_pos)
    if problem.key_groups is not None:
        same_group = problem.key_groups[None, :] == problem.row_groups[:, None]
        if problem.multi_positive:
            is_pos = same_group
        else:
            removed |= same_group
    scores = None
    if problem.has_filter:
        scores = problem.filter_query @ problem.filter_key.T
        removed |= scores > problem.filter_threshold
    f = cos
    if problem.margin > 0:
        if problem.adaptive_margin:
            m_eff = problem.margin * (1.0 - (problem.margin_query @ problem.margin_key.T).to(acc))
        else:
            m_eff = torch.full_like(cos, problem.margin)
        arc = cos * torch.cos(m_eff) + _sin_from_cos(cos) * torch.sin(m_eff)
        f = torch.where(~is_pos & (cos < problem.cos_threshold), arc, cos)
    logits = f * inv_temp
    if problem.has_hardness:
        penalised = ~is_pos
        if problem.hardness_scope != HARDNESS_ALL:
            same_owner = problem.row_owners[:, None] == problem.key_owners[None, :]
            penalised &= same_owner if problem.hardness_scope == HARDNESS_OWN else ~same_owner
        logits = torch.where(penalised, logits + problem.hardness_strength * cos.detach(), logits)
    logits = logits.masked_fill(removed & ~is_pos, float("-inf"))
    if scores is not None:
        logits = logits.masked_fill(torch.isnan(scores), float("nan"))
    return logits, is_pos


def forward(query, key, inv_temp: InvTemp, problem: LossProblem) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lse (M,), pos_logit (M,)) over this key block, as `mmloss.backends` specifies."""
    with torch.no_grad():
        inv_temp = inv_temp.detach() if isinstance(inv_temp, torch.Tensor) else inv_temp
        logits, is_pos = _logits(query, key, inv_temp, problem)
        return torch.logsumexp(logits, dim=1), (
            torch.where(is_pos, logits, 0.0) * _positive_weight(problem, logits)
        ).sum(dim=1)


def _positive_weight(problem: LossProblem, logits: torch.Tensor):
    """(M, 1) weight of each positive's logit: positive_weights (1/|P_i|) with multi_positive, else 1."""
    if not problem.multi_positive:
        return 1.0
    return problem.positive_weights[:, None].to(logits.dtype)


def backward(
    query,
    key,
    inv_temp: InvTemp,
    problem: LossProblem,
    lse: torch.Tensor,
    row_weight: torch.Tensor,
    need_temp_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of sum_i row_weight_i * loss_i over this block's columns, with P_ij taken
    against the given (global) lse: (d_query (M, d), d_key (N, d), d_inv_temp or None)."""
    with torch.enable_grad():
        q = query.detach().requires_grad_(True)
        k = key.detach().requires_grad_(True)
        inputs = [q, k]
        if isinstance(inv_temp, torch.Tensor):
            inv_temp = inv_temp.detach().requires_grad_(need_temp_grad)
            if need_temp_grad:
                inputs.append(inv_temp)
        logits, is_pos = _logits(q, k, inv_temp, problem)
        prob = torch.exp(logits.detach() - lse[:, None].to(logits.dtype))
        weight = row_weight[:, None].to(logits.dtype) * (
            prob - is_pos.to(logits.dtype) * _positive_weight(problem, logits)
        )
        weight = torch.where(row_weight[:, None] != 0, weight, 0.0)
        surrogate = (weight * logits.masked_fill(logits == float("-inf"), 0.0)).sum()
        grads = torch.autograd.grad(surrogate, inputs)
    d_inv_temp = grads[2] if need_temp_grad else None
    return grads[0].to(query.dtype), grads[1].to(key.dtype), d_inv_temp
