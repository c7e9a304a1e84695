"""`contrastive_loss`: checks -> backend choice -> autograd.Functions (one per direction, or
one pass for both); with global negatives, the checked problem goes to `mmloss.distributed`."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from mmloss import backends, distributed
from mmloss.autograd import ContrastiveRows, ContrastiveSum, ContrastiveSymmetricRows, inverse_temperature
from mmloss.checks import Temperature, build_problem, check_global_negatives
from mmloss.problem import LossProblem
from mmloss.reference import contrastive_loss_reference


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
    filter_threshold: Union[None, float, torch.Tensor] = None,
    filter_normalize: bool = False,
    key_groups: Optional[torch.Tensor] = None,
    multi_positive: bool = False,
    hardness_strength: float = 0.0,
    hardness_negatives: str = "all",
    hardness_owners: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    symmetric: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    global_negatives: Optional[str] = None,
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> torch.Tensor:
    """Masked, margined InfoNCE of rows `query` against columns `key` (docs/contract.md §1).

    query (M, d), key (N, d): embeddings, normalised inside (fp32, bf16, fp16; fp64 on CPU).
    positives (M,) int: each row's positive column, -100 ignores the row; None = arange(M).
    temperature: τ as a float, or a 0-dim tensor (learnable when it requires grad).
    margin: angular margin m (radians, [0, π/2)) on negatives: f = cos(θ - m').
    margin_teacher (tq (M, dt), tk (N, dt)): adaptive m'_ij = m (1 - cos(tq_i, tk_j)).
    filter_teacher (fq (M, df), fk (N, df)) with filter_threshold: negative j is dropped from
        row i when <fq_i, fk_j> > filter_threshold (cosine when filter_normalize=True); the
        threshold is a float or an (M,) tensor t (row i drops s_ij > t_i: GISTEmbed's
        row-relative filter, docs/contract.md §3).
    key_groups (N,) int: columns sharing the positive's group (other than the positive) are
        not negatives.
    multi_positive: with key_groups, every column of the positive's group is a positive P_i:
        loss_i = LSE over the allowed columns - mean over P_i of logit_ip (supervised
        contrastive "L_out"); nothing is removed by the group mask.
    hardness_strength: α >= 0: logit_ij += α·stopgrad(cos_ij) on the penalised negatives
        (sentence-transformers' hardness_mode); 0 = off.
    hardness_negatives: which negatives are penalised: "all", "others" (columns j with
        key_owners[j] != row_owners[i]) or "own" (key_owners[j] == row_owners[i]).
    hardness_owners (row_owners (M,), key_owners (N,)) int: required with "others" / "own".
    symmetric: CLIP-style mean of the row and column losses (M == N, positives None; none of
        multi_positive, hardness or a per-row filter_threshold).
    reduction: "mean" over non-ignored rows, "sum", or "none" ((M,), 0 for ignored rows).
    backend: "auto" | "reference" | "cpu" | "triton" | "cuda"; `mmloss.last_backend()` says
        which one ran. `auto` warns (once per reason) when it has to run the reference.
    global_negatives: None, "gather" or "ring": the keys of every rank of `process_group`
        (default: the world) join each row's negatives; see `mmloss.distributed` for the
        index and gradient conventions.

    Returns the loss in fp32 (fp64 for fp64 inputs).
    """
    check_global_negatives(global_negatives, process_group)
    try:
        problem = build_problem(
            query,
            key,
            positives=positives,
            temperature=temperature,
            margin=margin,
            margin_teacher=margin_teacher,
            filter_teacher=filter_teacher,
            filter_threshold=filter_threshold,
            filter_normalize=filter_normalize,
            key_groups=key_groups,
            symmetric=symmetric,
            reduction=reduction,
            backend=backend,
            hardness_strength=hardness_strength,
            hardness_negatives=hardness_negatives,
            hardness_owners=hardness_owners,
            multi_positive=multi_positive,
        )
    except (TypeError, ValueError) as exc:
        if global_negatives is None:
            raise
        distributed.fail_everywhere(exc, query, process_group)  # every rank raises
    if global_negatives is not None:
        return distributed.global_contrastive_loss(
            query,
            key,
            problem,
            temperature=temperature,
            filter_normalize=filter_normalize,
            symmetric=symmetric,
            reduction=reduction,
            backend=backend,
            mode=global_negatives,
            process_group=process_group,
        )
    name = backends.choose(backend, query.device, query.dtype, key.shape[0])
    if name == "reference":
        return contrastive_loss_reference(
            query,
            key,
            positives=problem.positives,
            temperature=temperature,
            margin=margin,
            margin_teacher=margin_teacher,
            filter_teacher=filter_teacher,
            filter_threshold=filter_threshold,
            filter_normalize=filter_normalize,
            key_groups=key_groups,
            symmetric=symmetric,
            reduction=reduction,
            hardness_strength=hardness_strength,
            hardness_negatives=hardness_negatives,
            hardness_owners=hardness_owners,
            multi_positive=multi_positive,
        )
    kernel_module = backends.kernels(name)
    kernel_module.check(query, problem)
    inv_temp = inverse_temperature(temperature)
    if symmetric and hasattr(kernel_module, "forward_symmetric"):  # exact for every τ (running column max)
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
