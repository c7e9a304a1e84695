"""`joint_contrastive_loss`: several (row vectors, key set) blocks sharing one softmax per row
(docs/contract.md §3), on the kernel block contract of `mmloss.backends`.

Row i of every block is the same training row (a query and its positive document, say); block
0 holds the positive. Each kernel backend serves every block unchanged: its forward gives the
block's per-row log-sum-exp and the positive's logit (0 outside block 0); its backward takes a
given log-sum-exp and row weights. "joint" combines the blocks' lse by log-sum-exp (one
softmax over the union of their columns) and hands the shared lse to every block's backward;
"per_block" averages them (sentence-transformers' per_direction), each block's backward getting
its own lse and weight w_i/B, and the positive's term, which block 0's backward counts with
weight w_i/B instead of w_i, is completed on the host: -(1 - 1/B)·w_i·d(logit_i,pos), O(M·d).
Nothing here allocates M × N; backend="reference" runs `mmloss.blockwise` (dense per block).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from mmloss import backends, blockwise, distributed
from mmloss.autograd import inverse_temperature
from mmloss.checks import (
    PARTITIONS,
    Temperature,
    _check_index_tensor,
    build_problem,
    check_embeddings,
    check_global_negatives,
)
from mmloss.constants import IGNORE_INDEX, NORM_EPS
from mmloss.problem import LossProblem

Pair = Tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class KeyBlock:
    """One (row vectors, key set) block of `joint_contrastive_loss`.

    rows (M, d): this block's row vectors (row i of every block is the same training row);
        keys (N_b, d): its columns. Both normalised inside; gradients flow to both.
    key_groups (N_0,) int, block 0 only: the group mask of `contrastive_loss` (columns of the
        positive's group other than the positive are not negatives).
    exclude (row_ids (M,), key_ids (N_b,)) int, blocks 1.. only: column j leaves row i when
        key_ids[j] == row_ids[i] (the row itself in a query-query block, its own documents in
        a document-document block).
    margin, margin_teacher, filter_teacher, filter_threshold (a float or (M,)),
        filter_normalize, hardness_strength, hardness_negatives, hardness_owners: as
        `contrastive_loss`, for this block's columns.
    local_keys: with global negatives, this block's columns are this rank's keys only
        (GISTEmbedLoss's anchor-anchor block); the other blocks see every rank's keys.
    """

    rows: torch.Tensor
    keys: torch.Tensor
    key_groups: Optional[torch.Tensor] = None
    exclude: Optional[Pair] = None
    margin: float = 0.0
    margin_teacher: Optional[Pair] = None
    filter_teacher: Optional[Pair] = None
    filter_threshold: Union[None, float, torch.Tensor] = None
    filter_normalize: bool = False
    hardness_strength: float = 0.0
    hardness_negatives: str = "all"
    hardness_owners: Optional[Pair] = None
    local_keys: bool = False


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _SharedSoftmax(torch.autograd.Function):
    """Row losses (M,) of blocks sharing a softmax: apply(inv_temp, spec, rows_0, keys_0,
    rows_1, keys_1, ...), spec = (problems, kernel modules, partition)."""

    @staticmethod
    def forward(ctx, inv_temp, spec, *tensors):
        problems, kernels, partition = spec
        lses, pos_logit = [], None
        for b, (problem, kernel) in enumerate(zip(problems, kernels)):
            lse, pos = kernel.forward(tensors[2 * b], tensors[2 * b + 1], inv_temp, problem)
            lses.append(lse)
            pos_logit = pos if b == 0 else pos_logit
        stacked = torch.stack(lses)
        lse = torch.logsumexp(stacked, dim=0) if partition == "joint" else stacked.mean(dim=0)
        valid = problems[0].valid_rows
        ctx.spec, ctx.inv_temp_is_tensor = spec, isinstance(inv_temp, torch.Tensor)
        saved = list(tensors) + [lse, stacked]
        if ctx.inv_temp_is_tensor:
            saved.append(inv_temp)
        else:
            ctx.inv_temp = inv_temp
        ctx.save_for_backward(*saved)
        rows = torch.where(valid, lse - pos_logit, torch.zeros_like(lse))
        return rows.to(_loss_dtype(tensors[0].dtype))

    @staticmethod
    def backward(ctx, grad_rows):
        problems, kernels, partition = ctx.spec
        count = len(problems)
        saved = ctx.saved_tensors
        tensors, lse, stacked = saved[: 2 * count], saved[2 * count], saved[2 * count + 1]
        inv_temp = saved[-1] if ctx.inv_temp_is_tensor else ctx.inv_temp
        need_temp_grad = ctx.inv_temp_is_tensor and ctx.needs_input_grad[0]
        weight = torch.where(problems[0].valid_rows, grad_rows, torch.zeros_like(grad_rows))
        share = 1.0 if partition == "joint" else 1.0 / count
        grads, d_inv_temp = [], None
        for b, (problem, kernel) in enumerate(zip(problems, kernels)):
            block_lse = lse if partition == "joint" else stacked[b]
            dr, dk, dt = kernel.backward(
                tensors[2 * b],
                tensors[2 * b + 1],
                inv_temp,
                problem,
                block_lse,
                (share * weight).contiguous(),
                need_temp_grad,
            )
            grads += [dr, dk]
            if need_temp_grad:
                d_inv_temp = dt if d_inv_temp is None else d_inv_temp + dt
        if partition != "joint" and count > 1:
            dr, dk, dt = _positive_term(
                tensors[0], tensors[1], inv_temp, problems[0], (share - 1.0) * weight, need_temp_grad
            )
            grads[0], grads[1] = grads[0] + dr, grads[1] + dk
            if need_temp_grad:
                d_inv_temp = d_inv_temp + dt
        return (d_inv_temp if need_temp_grad else None, None, *grads)


def _positive_term(rows, keys, inv_temp, problem: LossProblem, coefficient: torch.Tensor, need_temp_grad: bool):
    """Gradients of Σ_i coefficient_i · logit_i,pos(i) = Σ_i coefficient_i · ĉ(rows_i, keys_pos(i))/τ
    (the positive's logit: no margin, no penalty), O(M·d): (d_rows, d_keys, d_inv_temp or None)."""
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    in_block = problem.valid_rows & (problem.positives >= 0) & (problem.positives < keys.shape[0])
    index = torch.where(in_block, problem.positives, torch.zeros_like(problem.positives))
    with torch.enable_grad():
        r = rows.detach().requires_grad_(True)
        k = keys.detach().requires_grad_(True)
        inputs = [r, k]
        t = inv_temp
        if need_temp_grad:
            t = inv_temp.detach().requires_grad_(True)
            inputs.append(t)
        cos = (F.normalize(r.to(acc), dim=-1, eps=NORM_EPS) * F.normalize(k.to(acc)[index], dim=-1, eps=NORM_EPS)).sum(
            1
        )
        coefficient = torch.where(in_block, coefficient.to(acc), torch.zeros_like(cos))
        grads = torch.autograd.grad((coefficient * cos * t).sum(), inputs)
    return grads[0].to(rows.dtype), grads[1].to(keys.dtype), grads[2] if need_temp_grad else None


def _block_problem(block: KeyBlock, b: int, positives, temperature, reduction: str, backend: str) -> LossProblem:
    """The checked problem of block b (argument errors name `blocks[b].<field>`)."""
    try:
        if not isinstance(block, KeyBlock):
            raise TypeError(f"must be a mmloss.KeyBlock, got {type(block).__name__}")
        if b == 0 and block.exclude is not None:
            raise ValueError("exclude is for blocks 1.. (block 0 holds the positive: use key_groups)")
        if b > 0 and block.key_groups is not None:
            raise ValueError("key_groups is for block 0 (the positive's group); use exclude=(row_ids, key_ids)")
        if not isinstance(block.local_keys, bool):
            raise TypeError(f"local_keys must be a bool, got {type(block.local_keys).__name__}")
        check_embeddings(block.rows, block.keys, ("rows", "keys"))
        M = block.rows.shape[0]
        problem = build_problem(
            block.rows,
            block.keys,
            positives=positives if b == 0 else torch.full((M,), IGNORE_INDEX, device=block.rows.device),
            temperature=temperature,
            margin=block.margin,
            margin_teacher=block.margin_teacher,
            filter_teacher=block.filter_teacher,
            filter_threshold=block.filter_threshold,
            filter_normalize=block.filter_normalize,
            key_groups=block.key_groups,
            symmetric=False,
            reduction=reduction,
            backend=backend,
            hardness_strength=block.hardness_strength,
            hardness_negatives=block.hardness_negatives,
            hardness_owners=block.hardness_owners,
        )
        if b > 0 and block.exclude is not None:
            if not isinstance(block.exclude, Sequence) or len(block.exclude) != 2:
                raise TypeError("exclude must be a pair (row_ids (M,), key_ids (N_b,)) of integer tensors")
            row_ids = _check_index_tensor("exclude[0]", block.exclude[0], M, block.rows.device)
            key_ids = _check_index_tensor("exclude[1]", block.exclude[1], block.keys.shape[0], block.rows.device)
            problem = dataclasses.replace(problem, row_groups=row_ids, key_groups=key_ids)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"blocks[{b}]: {exc}") from None
    return problem


def joint_contrastive_loss(
    blocks: Sequence[KeyBlock],
    *,
    positives: Optional[torch.Tensor] = None,
    temperature: Temperature = 0.05,
    partition: str = "joint",
    reduction: str = "mean",
    backend: str = "auto",
    global_negatives: Optional[str] = None,
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> torch.Tensor:
    """InfoNCE whose softmax per row spans several key blocks (docs/contract.md §3).

    blocks: KeyBlocks with M rows each (row i of every block is one training row); block 0
        holds the positive. positives (M,) int: each row's positive column in block 0's keys,
        -100 ignores the row (in every block); None = arange(M) (needs M <= N_0).
    partition: "joint": loss_i = LSE over the union of the blocks' allowed columns - logit_i,pos;
        "per_block": the mean over blocks of each block's LSE - logit_i,pos
        (sentence-transformers' per_direction).
    temperature, reduction, backend, global_negatives, process_group: as `contrastive_loss`
        (with global negatives every block's keys, but those with local_keys, are all ranks';
        positives stay local; owner and exclude ids must be global).

    Returns the loss in fp32 (fp64 for fp64 inputs).
    """
    check_global_negatives(global_negatives, process_group)
    try:
        if not isinstance(blocks, Sequence) or isinstance(blocks, KeyBlock) or len(blocks) == 0:
            raise TypeError("blocks must be a non-empty sequence of mmloss.KeyBlock")
        if not isinstance(partition, str) or partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
        problems = [
            _block_problem(block, b, positives, temperature, reduction, backend) for b, block in enumerate(blocks)
        ]
        first = blocks[0].rows
        for b, block in enumerate(blocks[1:], start=1):
            check_embeddings(first, block.rows, ("blocks[0].rows", f"blocks[{b}].rows"))
            if block.rows.shape[0] != first.shape[0]:
                raise ValueError(
                    f"blocks[{b}].rows has {block.rows.shape[0]} rows, blocks[0].rows has {first.shape[0]}"
                )
        if global_negatives is None and any(block.local_keys for block in blocks):
            raise ValueError("local_keys is only used with global_negatives")
    except (TypeError, ValueError) as exc:
        if global_negatives is None:
            raise
        first_rows = getattr(blocks[0], "rows", None) if isinstance(blocks, Sequence) and len(blocks) else None
        distributed.fail_everywhere(exc, first_rows, process_group)
    valid = problems[0].valid_rows
    # Blocks 1.. hold no positive: no row is valid there, so a global shift keeps them out.
    problems = problems[:1] + [dataclasses.replace(p, valid_rows=torch.zeros_like(valid)) for p in problems[1:]]
    inv_temp = inverse_temperature(temperature)
    if global_negatives is None:
        size = max(block.keys.shape[0] for block in blocks)
        name = backends.choose(backend, first.device, first.dtype, size)
        kernel = blockwise if name == "reference" else backends.kernels(name)
        for block, problem in zip(blocks, problems):
            kernel.check(block.rows, problem)
        served = [(block.rows, block.keys, problem, kernel) for block, problem in zip(blocks, problems)]
    else:
        served, layout = distributed.global_blocks(
            [(blk.rows, blk.keys, p, blk.filter_normalize, blk.local_keys) for blk, p in zip(blocks, problems)],
            temperature=temperature,
            reduction=reduction,
            backend=backend,
            mode=global_negatives,
            process_group=process_group,
        )
    spec = ([s[2] for s in served], [s[3] for s in served], partition)
    rows = _SharedSoftmax.apply(inv_temp, spec, *[t for s in served for t in s[:2]])
    if global_negatives is not None:
        return distributed.reduce_across_ranks(rows, valid, reduction, layout)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)
