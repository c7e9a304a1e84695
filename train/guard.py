"""No NaN model: the trainer's checks for non-finite losses, gradients and weights.

A micro-step whose loss or a loss part (LossOutput.parts) is not finite, or an optimizer step
whose gradients are not finite, stops the run with a `NonFiniteError` that names the step,
the part and the batch's source lines, before the optimizer applies it and so before any
checkpoint holds it; with `train.skip_nonfinite` the step is skipped instead (its gradients
dropped, no optimizer update) and counted. The ranks agree on every decision (one small
all-gather), so that they stop or skip together. Weights are checked again before every
checkpoint and saved model.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss, gradient or weight; nothing was saved from that state."""


def describe_sources(sources: Sequence[str]) -> str:
    """["a.jsonl:3", "a.jsonl:9", "b.txt:2"] -> "a.jsonl lines 3, 9; b.txt line 2"."""
    lines: Dict[str, List[str]] = {}
    for source in sources:
        path, _, line = source.rpartition(":")
        lines.setdefault(path, []).append(line)
    return "; ".join(f"{path} line{'s' if len(n) > 1 else ''} {', '.join(n)}" for path, n in lines.items())


def ranks_flagging(flag: bool, device: torch.device) -> List[int]:
    """The ranks whose `flag` is True (every rank calls this at the same point)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [0] if flag else []
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    flags[dist.get_rank()] = int(flag)
    dist.all_reduce(flags)
    return flags.nonzero().flatten().tolist()


def nonfinite_part(loss: torch.Tensor, parts: Dict[str, torch.Tensor]) -> Optional[str]:
    """The first loss part that is not finite ("total" when only the total is), else None."""
    names = [*parts, "total"]
    values = torch.stack([v.detach().double().reshape(()) for v in (*parts.values(), loss)])
    bad = (~torch.isfinite(values)).nonzero()
    return names[int(bad[0])] if len(bad) else None


def nonfinite_parameter(module: torch.nn.Module, gradients: bool) -> Optional[str]:
    """The first parameter of `module` whose gradient (`gradients`) or value is not finite, else None."""
    named = [(n, p.grad if gradients else p) for n, p in module.named_parameters()]
    named = [(n, t) for n, t in named if t is not None]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
    bad = (~finite).nonzero()
    return named[int(bad[0])][0] if len(bad) else None


def format_parts(loss: torch.Tensor, parts: Dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in {"total": loss, **parts}.items())


@contextlib.contextmanager
def skipped_update(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside, `optimizer.step()` (a torch optimizer's) does nothing and the gradients of
    `module` are zeros: the engine's step runs its bookkeeping (clipping, zero_grad, the
    learning-rate schedule) without updating a weight or the optimizer's state."""
    for p in module.parameters():
        if p.grad is not None:
            p.grad.zero_()
    optimizer.step = lambda closure=None: None
    try:
        yield
    finally:
        del optimizer.step
