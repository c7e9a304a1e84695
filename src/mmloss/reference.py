"""The oracle: docs/contract.md §1 in plain, dense PyTorch (builds the M × N matrix; any dtype, fp64 too).

Every other backend is tested against this; it is itself tested against a direct formula
(F.cross_entropy, and an explicit acos/cos for the margin). Imports only torch (and the contract's constants).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmloss.constants import IGNORE_INDEX, MARGIN_SIN_EPS, NORM_EPS


def normalize(x: torch.Tensor) -> torch.Tensor:
    """`F.normalize(x, dim=-1, eps=NORM_EPS)` that cannot overflow: a row whose largest entry
    exceeds 1 is first scaled by a power of two (exact) to bring it below 2, so its squares stay
    finite in x's dtype (fp16 rows of norm > 65,504, fp32 rows of 1e30). Ordinary rows give the
    same bits as F.normalize; the scale carries no gradient (x̂ does not depend on it)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    large = amax.isfinite() & (amax > 1)
    exponent = torch.floor(torch.log2(torch.where(large, amax, torch.ones_like(amax))))
    scaled = x * torch.exp2(-exponent).to(x.dtype)
    return F.normalize(scaled, dim=-1, eps=NORM_EPS)


def _sin_from_cos(c: torch.Tensor) -> torch.Tensor:
    """sqrt(max(1 - c², ε)) whose derivative is -c / sqrt(max(1 - c², ε)) everywhere (docs/contract.md §1).
    In fp16, where ε = 1e-12 rounds to 0, ε is fp16's smallest normal number instead: a
    near-duplicate (1 - c² = 0 in fp16) must not divide by zero."""
    u = 1.0 - c * c
    s = torch.sqrt(torch.clamp(u, min=max(MARGIN_SIN_EPS, torch.finfo(u.dtype).tiny)))
    return s.detach() + (u - u.detach()) / (2.0 * s.detach())


def _row_losses(
    query,
    key,
    positives,
    temperature,
    margin,
    margin_teacher,
    filter_teacher,
    filter_threshold,
    filter_normalize,
    key_groups,
    hardness_strength=0.0,
    hardness_negatives="all",
    hardness_owners=None,
    multi_positive=False,
):
    """Per-row losses (M,) of one direction, 0 for ignored rows."""
    M, N = query.shape[0], key.shape[0]
    qn, kn = normalize(query), normalize(key)
    cos = qn @ kn.T

    if positives is None:
        positives = torch.arange(M, device=query.device)
    positives = positives.long()
    valid = positives != IGNORE_INDEX
    pos_col = torch.where(valid, positives, torch.zeros_like(positives))
    is_pos = torch.zeros(M, N, dtype=torch.bool, device=query.device)
    is_pos[torch.arange(M, device=query.device), pos_col] = valid

    removed = torch.zeros_like(is_pos)
    if key_groups is not None:
        groups = key_groups.long()
        same_group = groups[None, :] == groups[pos_col][:, None]
        if multi_positive:  # every column of the positive's group is a positive (P_i)
            is_pos = same_group & valid[:, None]
        else:
            removed |= same_group
    poison = None
    if filter_teacher is not None:
        fq, fk = (t.detach() for t in filter_teacher)
        if filter_normalize:
            fq, fk = normalize(fq), normalize(fk)
        scores = fq @ fk.T
        if isinstance(filter_threshold, torch.Tensor):  # one threshold per row, compared in the wider dtype
            threshold = filter_threshold.detach()[:, None].to(torch.promote_types(scores.dtype, filter_threshold.dtype))
            removed |= scores.to(threshold.dtype) > threshold
            poison = torch.isnan(scores) | torch.isnan(threshold)
        else:
            removed |= scores > filter_threshold
            poison = torch.isnan(scores)  # a NaN teacher score gives a NaN loss, never a silent number
    allowed = ~removed | is_pos

    f = cos
    if margin > 0:
        if margin_teacher is None:
            m_eff = torch.full_like(cos, margin)
        else:
            tq, tk = (normalize(t.detach()) for t in margin_teacher)
            m_eff = margin * (1.0 - (tq @ tk.T).to(cos.dtype))
        transformed = ~is_pos & (cos < math.cos(margin))
        arc = cos * torch.cos(m_eff) + _sin_from_cos(cos) * torch.sin(m_eff)
        f = torch.where(transformed, arc, cos)

    logits = f / temperature
    if hardness_strength > 0:  # + alpha·sg(c) on the penalised negatives (docs/contract.md §3)
        penalised = ~is_pos
        if hardness_negatives != "all":
            row_owners, key_owners = (o.long() for o in hardness_owners)
            same_owner = row_owners[:, None] == key_owners[None, :]
            penalised &= same_owner if hardness_negatives == "own" else ~same_owner
        logits = torch.where(penalised, logits + hardness_strength * cos.detach(), logits)
    logits = logits.masked_fill(~allowed, float("-inf"))
    if poison is not None:
        logits = logits.masked_fill(poison, float("nan"))
    wide = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if multi_positive:  # the mean of the positives' logits
        pos_logit = torch.where(is_pos, wide, 0.0).sum(dim=1) / is_pos.sum(dim=1).clamp(min=1)
        loss = torch.logsumexp(wide, dim=1) - pos_logit
    else:
        pos_logit = wide.gather(1, pos_col[:, None]).squeeze(1)
        loss = torch.logsumexp(wide, dim=1) - pos_logit
    if wide.dtype != torch.float64 and not multi_positive:
        # The value of the relative form (accurate for nearly solved rows), the gradient of
        # the logsumexp form (the same derivative; the low-precision bars of the other
        # backends' tests are unchanged).
        loss = loss + (_loss_relative_to_positive(wide.detach(), pos_logit.detach(), is_pos) - loss.detach())
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def _loss_relative_to_positive(logits: torch.Tensor, pos_logit: torch.Tensor, is_pos: torch.Tensor) -> torch.Tensor:
    """logsumexp(logits_i) - pos_logit_i (M,) without the cancellation of two fp32 numbers:
    with top_i the row's max, delta = top - pos >= 0 and s the sum of exp(logit - top) over
    the other columns, the loss is delta + log1p(expm1(-delta) + s): a nearly solved row
    (delta = 0, s << 1) keeps its relative accuracy. Equal to the logsumexp form in exact
    arithmetic; used for its value only (the caller passes detached tensors)."""
    top = logits.amax(dim=1)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)  # logsumexp's shift convention
    others = torch.where(is_pos, torch.zeros_like(logits), torch.exp(logits - top[:, None])).sum(dim=1)
    delta = top - pos_logit
    return delta + torch.log1p(torch.expm1(-delta) + others)


def reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row losses (M,) to the requested reduction; "mean" divides by the non-ignored rows
    (a mean over none is 0, with zero gradients)."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp(min=1)


def contrastive_loss_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    positives=None,
    temperature=0.05,
    margin: float = 0.0,
    margin_teacher=None,
    filter_teacher=None,
    filter_threshold=None,
    filter_normalize: bool = False,
    key_groups=None,
    symmetric: bool = False,
    reduction: str = "mean",
    hardness_strength: float = 0.0,
    hardness_negatives: str = "all",
    hardness_owners=None,
    multi_positive: bool = False,
) -> torch.Tensor:
    """docs/contract.md §1 and §3 densely; same arguments as `mmloss.contrastive_loss` less
    `backend` and the distributed ones.

    Assumes valid arguments (the public call checks them; symmetric takes none of the §3
    features). Returns fp32 for 16-bit inputs.
    """
    common = dict(
        temperature=temperature,
        margin=margin,
        filter_threshold=filter_threshold,
        filter_normalize=filter_normalize,
        key_groups=key_groups,
    )
    rows, valid = _row_losses(
        query,
        key,
        positives,
        margin_teacher=margin_teacher,
        filter_teacher=filter_teacher,
        hardness_strength=hardness_strength,
        hardness_negatives=hardness_negatives,
        hardness_owners=hardness_owners,
        multi_positive=multi_positive,
        **common,
    )
    if symmetric:
        swap = lambda pair: None if pair is None else (pair[1], pair[0])  # noqa: E731
        cols, _ = _row_losses(
            key, query, None, margin_teacher=swap(margin_teacher), filter_teacher=swap(filter_teacher), **common
        )
        rows = 0.5 * (rows + cols)
    return reduce_rows(rows, valid, reduction)
