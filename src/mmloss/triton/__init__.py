"""Triton backend of `contrastive_loss` (the kernel contract of `mmloss.backends`).

check(query, problem), forward(query, key, inv_temp, problem) -> (lse, pos_logit),
backward(...) -> (d_query, d_key, d_inv_temp), and the optional symmetric pair
forward_symmetric / backward_symmetric (both directions in one pass), each through a
torch.library custom op (`torch.ops.mmloss.triton_*`, library.py). Runs on CUDA tensors, or
on CPU tensors in the Triton interpreter (TRITON_INTERPRET=1, set before this module is imported).
Design, precision and tuning: docs/triton.md.
"""

from __future__ import annotations

import torch

from mmloss.kernel_common import check_gpu_dtype, triton_interpreted
from mmloss.problem import LossProblem
from mmloss.triton.library import backward, backward_symmetric, forward, forward_symmetric

__all__ = ["backward", "backward_symmetric", "check", "forward", "forward_symmetric"]


def check(query: torch.Tensor, problem: LossProblem) -> None:
    """Raise TypeError/ValueError (naming the argument) for what these kernels cannot serve."""
    check_gpu_dtype(query, "triton")
    if query.device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"query is on {query.device}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        )
