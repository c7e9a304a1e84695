"""The losses mmloss is measured against, as one-direction InfoNCE (diagonal positives):
dense eager PyTorch, cut-cross-entropy and Inf-CL. Shared by the CPU table (`python -m
bench`) and the GPU benchmark (bench/gpu_bench.py).

Each takes raw query (N, d) and key (N, d) embeddings and τ, and returns the mean loss
−1/N Σ_i log softmax_j(cos(q_i, k_j) / τ)_i, the same function as
`mmloss.contrastive_loss(query, key, temperature=τ)`.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.nn.functional as F


def eager_loss(query: torch.Tensor, key: torch.Tensor, temperature: float = 0.05, upcast: bool = False) -> torch.Tensor:
    """What users write: dense N × N logits in the inputs' dtype and F.cross_entropy (on
    fp32 logits with `upcast`, the CPU table's baseline)."""
    logits = F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).T / temperature
    if upcast:
        logits = logits.float()
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


def cce_loss(
    query: torch.Tensor, key: torch.Tensor, temperature: float = 0.05, impl: str = "cce", filter_eps="high"
) -> torch.Tensor:
    """cut-cross-entropy's linear cross-entropy of the τ-scaled normalised queries (the
    "embeddings") against the normalised keys (the "classifier"), targets = the diagonal.
    impl="cce": its fused Triton kernels (GPU), with its gradient filtering by default
    (filter_eps="high": gradient blocks whose softmax entries are all below eps/32 of the
    dtype are skipped, which drops Σ p_ij k_j where the softmax is flat) or none (None);
    impl="torch_compile": its compiled dense path (materialises the logits; runs on the CPU;
    no filtering)."""
    from cut_cross_entropy import linear_cross_entropy

    targets = torch.arange(query.shape[0], device=query.device)
    embeddings = F.normalize(query, dim=-1) * (1.0 / temperature)
    return linear_cross_entropy(embeddings, F.normalize(key, dim=-1), targets, impl=impl, filter_eps=filter_eps)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def infcl_loss(query: torch.Tensor, key: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Inf-CL 1.x's `cal_inf_loss` (its ring kernel; needs a process group, here one of
    world size 1 on NCCL, created on first use) on normalised inputs, scale 1/τ."""
    import torch.distributed as dist
    from inf_cl import cal_inf_loss

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1)
    return cal_inf_loss(F.normalize(query, dim=-1), F.normalize(key, dim=-1), scale=1.0 / temperature)
