"""Global negatives: the keys of every data-parallel rank join each row's softmax.

`contrastive_loss(..., global_negatives="gather" | "ring", process_group=None)` lands here.
Every rank passes its own rows and keys; the result is that of one process holding the
concatenated batch (rank 0's keys first, then rank 1's, ...).

Indices. `positives` are local: column j of this rank's `key` (they are offset by the rank's
key offset internally); a row's positive is always on its own rank. `key_groups` are labels
compared as they are across ranks: use global ids (dataset image ids), since local ids 0..n
of two ranks would mark different images as copies of one another; so are the owner ids of
`hardness_owners`, and with `multi_positive` |P_i| counts the group's columns on every rank.
Teacher key features (`margin_teacher[1]`, `filter_teacher[1]`) travel with their keys; a
per-row filter threshold stays with its row (lifted into the filter features, mmloss.checks). Local batch sizes may
differ between ranks (each needs at least one row and one key).

Modes.
- "gather": all-gather the keys (and their teacher features and groups), run the backend on
  the local rows against all keys; the backward reduce-scatters d_key back to its owners.
- "ring": key blocks pass from rank r to rank r+1 while each rank computes its rows against
  the block it holds (isend/irecv overlapping the kernel), combining per-block lse with
  logsumexp; the backward ring recomputes each block with the global lse and carries that
  block's d_key along until it arrives home. A rank holds its own keys and the blocks in
  transit, never all keys: memory O(local batch). Both modes use the kernel block contract of `mmloss.backends`
  (`mmloss.blockwise` for backend="reference").

Gradient convention (DDP / DeepSpeed average gradients over the data-parallel ranks). With
W ranks, reduction "mean" or "sum" returns on every rank the value of the single-process loss
L, while the gradient is that of W · (this rank's share of L): the rank's own rows' losses
(against all keys) divided by the global count of non-ignored rows for "mean". The gradient
that reaches this rank's embeddings is then W · dL/d(embeddings), and a replicated parameter
(encoder weights, a learnable temperature) gets gradients whose average over the ranks is
exactly the single-process dL/dθ. This is open_clip's convention (local mean against gathered
keys) extended to uneven batches and ignored rows. reduction="none" returns this rank's rows
(M_local,) unscaled: whatever they are reduced to, d_key sums the contributions of all ranks.

Before any data moves, the ranks exchange their shapes, dtypes and settings in one small
all-gather, so that a mismatch raises the same ValueError on every rank and a rank whose
arguments failed the checks (`fail_everywhere`) makes the others raise too. A rank that never
calls the loss is reported when the process group's timeout expires. The backend is then
chosen as for one process (`mmloss.backends.choose`, the auto table included), for the
number of keys each kernel call sees.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from mmloss import backends, blockwise
from mmloss.autograd import ContrastiveRows, inverse_temperature
from mmloss.checks import BACKENDS, FLOAT_DTYPES, HARDNESS_NEGATIVES, REDUCTIONS, Temperature, positive_counts
from mmloss.constants import IGNORE_INDEX
from mmloss.problem import LossProblem

MODES = ("gather", "ring")
_KEY_SIDE = ("margin_key", "filter_key", "key_groups", "key_owners")
# What every rank tells the others before any data moves; all but "ok", "rows" and "keys"
# must agree across ranks.
_FIELDS = (
    "ok",
    "rows",
    "keys",
    "width",
    "dtype",
    "query requires grad",
    "key requires grad",
    "symmetric",
    "reduction",
    "mode",
    "temperature",
    "margin",
    "margin_teacher width",
    "margin_teacher dtype",
    "filter_teacher width",
    "filter_teacher dtype",
    "filter_threshold",
    "filter_normalize",
    "key_groups",
    "multi_positive",
    "hardness_strength",
    "hardness_scope",
    "backend",
)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where this rank sits: local row and key counts of every rank of the group."""

    group: dist.ProcessGroup
    rank: int
    world: int
    row_sizes: Tuple[int, ...]
    key_sizes: Tuple[int, ...]

    def previous(self) -> int:
        return dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def next(self) -> int:
        return dist.get_global_rank(self.group, (self.rank + 1) % self.world)


def _offset(sizes: Sequence[int], rank: int) -> int:
    return sum(sizes[:rank])


def _dtype_code(t: Optional[torch.Tensor]) -> int:
    return -1 if t is None else FLOAT_DTYPES.index(t.dtype)


def _metadata(query, key, problem: Optional[LossProblem], settings: Tuple[float, ...]) -> torch.Tensor:
    """This rank's line of the exchange (float64, len(_FIELDS)); zeros with ok=0 when its
    arguments failed the checks. `settings`: symmetric, reduction, mode, temperature,
    filter_normalize, backend as numbers."""
    values: Tuple[float, ...] = (0.0,) * len(_FIELDS)
    if problem is not None:
        symmetric, reduction, mode, temperature, filter_normalize, backend = settings
        width = lambda t: -1 if t is None else t.shape[1]  # noqa: E731
        values = (
            1,
            query.shape[0],
            key.shape[0],
            query.shape[1],
            _dtype_code(query),
            query.requires_grad,
            key.requires_grad,
            symmetric,
            reduction,
            mode,
            temperature,
            problem.margin,
            width(problem.margin_query),
            _dtype_code(problem.margin_query),
            width(problem.filter_query),
            _dtype_code(problem.filter_query),
            problem.filter_threshold,
            filter_normalize,
            problem.key_groups is not None,
            problem.multi_positive,
            problem.hardness_strength,
            problem.hardness_scope,
            backend,
        )
    device = query.device if isinstance(query, torch.Tensor) else torch.device("cpu")
    return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)


def _exchange(line: torch.Tensor, group) -> torch.Tensor:
    """All ranks' metadata lines (W, len(_FIELDS)), or a clear error when a rank is missing."""
    lines = [torch.empty_like(line) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(lines, line, group=group)
    except RuntimeError as exc:
        raise RuntimeError(
            "mmloss global negatives: exchanging batch shapes with the other ranks failed; a rank "
            "failed or did not call the loss (every rank must make the same calls in the same order)"
        ) from exc
    return torch.stack(lines).cpu()


def _describe(field: str, value: float) -> str:
    if field.endswith("dtype"):
        return "none" if value < 0 else str(FLOAT_DTYPES[int(value)])
    if field == "reduction":
        return REDUCTIONS[int(value)]
    if field == "mode":
        return MODES[int(value)]
    if field == "backend":
        return BACKENDS[int(value)]
    if field == "hardness_scope":
        return tuple(HARDNESS_NEGATIVES)[int(value)]
    return "none" if field.endswith("width") and value < 0 else f"{value:g}"


def _check_agreement(table: torch.Tensor) -> None:
    """Raise the same ValueError on every rank when the ranks' calls do not match."""
    failed = [r for r in range(table.shape[0]) if table[r, 0] == 0]
    if failed:
        raise RuntimeError(
            f"mmloss global negatives: the arguments of rank(s) {failed} failed their checks "
            "(see the error raised on that rank)"
        )
    for j, field in enumerate(_FIELDS[3:], start=3):
        column = table[:, j]
        same = (column == column[0]) | (torch.isnan(column) & torch.isnan(column[0]))
        if not bool(same.all()):
            values = ", ".join(f"rank {r}: {_describe(field, float(v))}" for r, v in enumerate(column))
            raise ValueError(f"global negatives: {field} differs across ranks ({values})")


def _all_gather(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Concatenation over ranks of x (sizes[r], ...) (padded to one size for the collective)."""
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather forward; the backward sums every rank's gradient of this rank's block and
    returns it (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, layout: _Layout):
        ctx.layout = layout
        return _all_gather(x, layout.key_sizes, layout.group)

    @staticmethod
    def backward(ctx, grad):
        layout = ctx.layout
        n = max(layout.key_sizes)
        stacked = grad.new_zeros((layout.world * n,) + tuple(grad.shape[1:]))
        for r, part in enumerate(torch.split(grad, list(layout.key_sizes))):
            stacked[r * n : r * n + part.shape[0]] = part
        mine = grad.new_empty((n,) + tuple(grad.shape[1:]))
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        reduce_scatter(mine, stacked, group=layout.group)
        return mine[: layout.key_sizes[layout.rank]], None


def _global_positives(problem: LossProblem, shift: int) -> torch.Tensor:
    """Positives moved by `shift` columns; ignored rows stay ignored (outside every block)."""
    return torch.where(problem.valid_rows, problem.positives + shift, IGNORE_INDEX)


def _gather_rows(query, key, inv_temp, problem: LossProblem, layout: _Layout, kernel_module) -> torch.Tensor:
    """Per-row losses (M_local,) of local rows against the keys of all ranks, all gathered."""
    side = {
        name: _all_gather(getattr(problem, name), layout.key_sizes, layout.group)
        for name in _KEY_SIDE
        if getattr(problem, name) is not None
    }
    shift = _offset(layout.key_sizes, layout.rank)
    problem = dataclasses.replace(problem, positives=_global_positives(problem, shift), **side)
    return ContrastiveRows.apply(query, _GatherWithGrad.apply(key, layout), inv_temp, problem, kernel_module)


_KEY_TAG, _GRAD_TAG = 0, 100  # message tags of the key blocks and of their travelling d_key


class _Ring:
    """A kernel module (the block contract of `mmloss.backends`) whose key set is the keys of
    every rank: it passes key blocks around the ring and runs `block_kernel` on each, so
    `ContrastiveRows` serves it as any backend. `problem` is the local one (local positives)."""

    def __init__(self, layout: _Layout, block_kernel):
        self.layout, self.block_kernel = layout, block_kernel

    @staticmethod
    def _side(problem: LossProblem) -> List[str]:
        return [name for name in _KEY_SIDE if getattr(problem, name) is not None]

    def _own_block(self, key: torch.Tensor, problem: LossProblem) -> List[torch.Tensor]:
        """[key, then the key-side tensors of the problem] of this rank."""
        return [key] + [getattr(problem, name) for name in self._side(problem)]

    def _block_problem(self, problem: LossProblem, block: List[torch.Tensor], source: int) -> LossProblem:
        """The problem of the local rows against the block that rank `source` owns."""
        sizes = self.layout.key_sizes
        shift = _offset(sizes, self.layout.rank) - _offset(sizes, source)
        return dataclasses.replace(
            problem, positives=_global_positives(problem, shift), **dict(zip(self._side(problem), block[1:]))
        )

    def _shift(self, tensors: List[torch.Tensor], incoming_rows: int, tag: int):
        """Send `tensors` to the next rank and receive the previous rank's (`incoming_rows`
        rows each, same widths and dtypes); returns (requests, received buffers)."""
        layout = self.layout
        received = [t.new_empty((incoming_rows,) + tuple(t.shape[1:])) for t in tensors]
        requests = []
        for i, (out, into) in enumerate(zip(tensors, received)):
            requests.append(dist.irecv(into, src=layout.previous(), group=layout.group, tag=tag + i))
            requests.append(dist.isend(out.contiguous(), dst=layout.next(), group=layout.group, tag=tag + i))
        return requests, received

    @staticmethod
    def _wait(requests) -> None:
        for request in requests:
            request.wait()

    def forward(self, query, key, inv_temp, problem: LossProblem):
        """(lse (M,), pos_logit (M,)) over all ranks' keys, block by block: each step computes
        the block it holds while the next one arrives."""
        world, rank, sizes = self.layout.world, self.layout.rank, self.layout.key_sizes
        block, lse, pos_logit = self._own_block(key, problem), None, None
        for step in range(world):
            source = (rank - step) % world
            if step + 1 < world:
                requests, incoming = self._shift(block, sizes[(source - 1) % world], _KEY_TAG)
            block_lse, block_pos = self.block_kernel.forward(
                query, block[0], inv_temp, self._block_problem(problem, block, source)
            )
            lse = block_lse if lse is None else torch.logaddexp(lse, block_lse)
            pos_logit = block_pos if pos_logit is None else pos_logit + block_pos
            if step + 1 < world:
                self._wait(requests)
                block = incoming
        return lse, pos_logit

    def backward(self, query, key, inv_temp, problem: LossProblem, lse, row_weight, need_temp_grad):
        """(d_query, d_key of this rank's keys from every rank's rows, d_inv_temp or None): the
        keys go round again, each block's d_key travelling with it until it is home."""
        world, rank, sizes = self.layout.world, self.layout.rank, self.layout.key_sizes
        accumulate = torch.float64 if key.dtype == torch.float64 else torch.float32
        block, d_block = self._own_block(key, problem), torch.zeros(key.shape, dtype=accumulate, device=key.device)
        d_query, d_inv_temp = None, None
        for step in range(world):
            source = (rank - step) % world
            incoming_rows = sizes[(source - 1) % world]
            if step + 1 < world:
                key_requests, incoming = self._shift(block, incoming_rows, _KEY_TAG)
            dq, dk, dt = self.block_kernel.backward(
                query, block[0], inv_temp, self._block_problem(problem, block, source), lse, row_weight, need_temp_grad
            )
            d_query = dq.to(accumulate) if d_query is None else d_query + dq
            d_inv_temp = dt if d_inv_temp is None else d_inv_temp + dt
            d_block = d_block + dk
            if world > 1:
                # d_block travels on with its block; after the last step it reaches its owner.
                grad_requests, (d_block,) = self._shift([d_block], incoming_rows, _GRAD_TAG)
                self._wait(grad_requests)
            if step + 1 < world:
                self._wait(key_requests)
                block = incoming
        return d_query.to(query.dtype), d_block.to(key.dtype), d_inv_temp


def _ring_rows(query, key, inv_temp, problem: LossProblem, layout: _Layout, kernel_module) -> torch.Tensor:
    """Per-row losses (M_local,) of local rows against the keys of all ranks, passed in a ring."""
    return ContrastiveRows.apply(query, key, inv_temp, problem, _Ring(layout, kernel_module))


def _layout(group, problem_sizes: torch.Tensor) -> _Layout:
    return _Layout(
        group=group,
        rank=dist.get_rank(group),
        world=dist.get_world_size(group),
        row_sizes=tuple(int(n) for n in problem_sizes[:, 0]),
        key_sizes=tuple(int(n) for n in problem_sizes[:, 1]),
    )


def fail_everywhere(error: Exception, query, process_group=None):
    """Raise `error` (this rank's arguments failed the checks) after telling the other ranks,
    whose exchange then raises a RuntimeError naming this rank."""
    group = process_group if process_group is not None else dist.group.WORLD
    _exchange(_metadata(query, None, None, ()), group)
    raise error


def global_contrastive_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    problem: LossProblem,
    *,
    temperature: Temperature,
    filter_normalize: bool,
    symmetric: bool,
    reduction: str,
    backend: str,
    mode: str,
    process_group=None,
) -> torch.Tensor:
    """`mmloss.contrastive_loss` with the keys of every rank of `process_group` (default: the
    world) as negatives: `problem` is this rank's checked problem (`mmloss.checks.build_problem`,
    local positives), the other arguments as there, `mode` "gather" or "ring" (the module doc)."""
    group = process_group if process_group is not None else dist.group.WORLD
    settings = (
        symmetric,
        REDUCTIONS.index(reduction),
        MODES.index(mode),
        float(temperature.detach() if isinstance(temperature, torch.Tensor) else temperature),
        filter_normalize,
        BACKENDS.index(backend),
    )
    table = _exchange(_metadata(query, key, problem, settings), group)
    _check_agreement(table)
    layout = _layout(group, table[:, 1:3])
    if problem.multi_positive:  # |P_i| counts the positive's group over every rank's keys
        every_group = _all_gather(problem.key_groups, layout.key_sizes, group)
        problem = dataclasses.replace(
            problem, positive_weights=1.0 / positive_counts(problem.row_groups, every_group).double()
        )
    seen = sum(layout.key_sizes) if mode == "gather" else max(layout.key_sizes)  # keys per kernel call
    name = backends.choose(backend, query.device, query.dtype, seen)
    kernel_module = blockwise if name == "reference" else backends.kernels(name)
    kernel_module.check(query, problem)
    inv_temp = inverse_temperature(temperature)
    direction = _gather_rows if mode == "gather" else _ring_rows
    rows = direction(query, key, inv_temp, problem, layout, kernel_module)
    if symmetric:
        transposed_layout = dataclasses.replace(layout, row_sizes=layout.key_sizes, key_sizes=layout.row_sizes)
        cols = direction(key, query, inv_temp, problem.transposed(), transposed_layout, kernel_module)
        rows = 0.5 * (rows + cols)
    return reduce_across_ranks(rows, problem.valid_rows, reduction, layout)


def reduce_across_ranks(rows: torch.Tensor, valid_rows: torch.Tensor, reduction: str, layout: _Layout) -> torch.Tensor:
    """This rank's row losses (M_local,) to `reduction` under the gradient convention of the
    module doc: the single-process value, the gradient of W times this rank's share
    ("none": the rows themselves)."""
    if reduction == "none":
        return rows
    totals = torch.stack([rows.detach().sum().double(), valid_rows.sum().double()])
    dist.all_reduce(totals, group=layout.group)
    share = layout.world * rows.sum()
    value = totals[0]
    if reduction == "mean":  # a mean over no valid row is 0 (docs/contract.md §1)
        count = totals[1].clamp(min=1)
        share, value = share / count.to(share.dtype), value / count
    # The value of the single-process loss with the gradient of W times this rank's share.
    return share + (value.to(share.dtype) - share).detach()


def global_blocks(blocks, *, temperature: Temperature, reduction: str, backend: str, mode: str, process_group=None):
    """The key blocks of `mmloss.joint_contrastive_loss` with every rank's keys: `blocks` is
    this rank's checked [(rows, keys, problem, filter_normalize, local_keys)], block 0 holding
    the positives (local indices; the other blocks' positives are IGNORE_INDEX and their
    valid_rows all False). Returns ([(rows, keys, problem, kernel module)], layout of block 0):
    in "gather" mode the keys gathered (with gradient) and block 0's positives global; in
    "ring" mode the local keys and a ring kernel module per block. A block with `local_keys`
    keeps this rank's keys only. Every rank must pass the same number of blocks."""
    group = process_group if process_group is not None else dist.group.WORLD
    tables = []
    for b, (rows, keys, problem, filter_normalize, _) in enumerate(blocks):
        settings = (
            False,
            REDUCTIONS.index(reduction),
            MODES.index(mode),
            float(temperature.detach() if isinstance(temperature, torch.Tensor) else temperature),
            filter_normalize,
            BACKENDS.index(backend),
        )
        tables.append(_exchange(_metadata(rows, keys, problem, settings), group))
        _check_agreement(tables[-1])
        if b == 0:  # the block count, once every rank has passed its checks
            counts = _exchange(torch.tensor([float(len(blocks))], dtype=torch.float64, device=rows.device), group)
            if not bool((counts == counts[0]).all()):
                raise ValueError(
                    f"global negatives: the number of key blocks differs across ranks ({counts[:, 0].tolist()})"
                )
    layouts = [_layout(group, table[:, 1:3]) for table in tables]
    seen = max(sum(lay.key_sizes) if mode == "gather" else max(lay.key_sizes) for lay in layouts)
    rows0 = blocks[0][0]
    name = backends.choose(backend, rows0.device, rows0.dtype, seen)
    kernel_module = blockwise if name == "reference" else backends.kernels(name)
    served = []
    for (rows, keys, problem, _, local_keys), layout in zip(blocks, layouts):
        kernel_module.check(rows, problem)
        if local_keys:
            served.append((rows, keys, problem, kernel_module))
        elif mode == "ring":
            served.append((rows, keys, problem, _Ring(layout, kernel_module)))
        else:
            side = {
                field: _all_gather(getattr(problem, field), layout.key_sizes, layout.group)
                for field in _KEY_SIDE
                if getattr(problem, field) is not None
            }
            positives = _global_positives(problem, _offset(layout.key_sizes, layout.rank))
            problem = dataclasses.replace(problem, positives=positives, **side)
            served.append((rows, _GatherWithGrad.apply(keys, layout), problem, kernel_module))
    return served, layouts[0]
