"""transformers 4.x's AdamW, the optimizer of the official SimCSE, MCSE and KDMCSE scripts.

transformers.AdamW (removed from transformers 5) differs from torch.optim.AdamW in where eps
goes: it adds eps to the uncorrected sqrt(v) and folds both bias corrections into the step,

    p <- p - lr · sqrt(1 - β2^t) / (1 - β1^t) · m / (sqrt(v) + eps)

where torch divides by sqrt(v) / sqrt(1 - β2^t) + eps. The two agree at eps = 0; with the
MCSE/KDMCSE eps of 1e-6 (transformers 4.8's default) the early steps differ. Weight decay is
decoupled and applied after the Adam step (p <- p - lr · wd · p), as there.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


class AdamWHF(torch.optim.Optimizer):
    """transformers 4.8 AdamW with correct_bias=True (the module docstring)."""

    def __init__(
        self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0
    ):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss
