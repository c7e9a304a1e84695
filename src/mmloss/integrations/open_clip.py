"""OpenCLIP's ClipLoss computed by `mmloss.contrastive_loss` (open-clip-torch 3.3 semantics).

    from mmloss.integrations.open_clip import ClipLoss   # was: from open_clip.loss import ClipLoss
    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    total = loss(image_features, text_features, logit_scale)

`total = ½[CE(s·I Tᵀ) + CE(s·T Iᵀ)]` with s = logit_scale (learnable), on raw dot products as
OpenCLIP (its models normalise the features; this class does not need them normalised). The
op normalises its inputs, so the features go in lifted onto spheres: Ĩ_i = [I_i, a_i, 0],
T̃_j = [T_j, 0, b_j] with a_i = sqrt(R_I² − ‖I_i‖²), R_I² = 2·max_i ‖I_i‖² (b, R_T likewise;
maxima over all ranks). Then cos(Ĩ_i, T̃_j)·R_I·R_T = ⟨I_i, T_j⟩ exactly, and since ‖Ĩ_i‖ ≡ R_I
the gradients are those of the raw dot products too. No B × B matrix is built on any rank.

Across ranks (world_size > 1, torch.distributed initialised, rank/world_size those of the
default group), the four (local_loss, gather_with_grad) settings give OpenCLIP's value on every
rank and OpenCLIP's gradients on every rank (so also after DDP's averaging):
- local_loss: this rank's rows against every rank's columns, its mean; without
  gather_with_grad the gathered copies carry no gradient (this rank's own copy neither, as in
  OpenCLIP);
- not local_loss: the loss of the whole global batch on every rank; without gather_with_grad
  only this rank's own copy carries gradient (OpenCLIP's gradient is then 1/W of the global one).
`use_horovod` is not supported. `cache_labels` is accepted and has no effect (no label tensor is
built). A `logit_bias` shifts every logit alike, which leaves the loss unchanged: it is
accepted and gets a zero gradient.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

import mmloss

__all__ = ["ClipLoss"]


def _lift(image: Tensor, text: Tensor, across_ranks: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(Ĩ (B, d+2), T̃ (B, d+2), R_I·R_T detached) as in the module doc: constant row norms,
    so that the op's cosines times R_I·R_T are the raw dot products."""
    wide = torch.float64 if image.dtype == torch.float64 else torch.float32
    sq_image, sq_text = image.to(wide).square().sum(1), text.to(wide).square().sum(1)
    peaks = torch.stack([sq_image.detach().max(), sq_text.detach().max()])
    if across_ranks:
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    radii_sq = 2.0 * peaks
    pad_image = torch.sqrt(radii_sq[0] - sq_image).to(image.dtype)[:, None]
    pad_text = torch.sqrt(radii_sq[1] - sq_text).to(text.dtype)[:, None]
    lifted_image = torch.cat([image, pad_image, torch.zeros_like(pad_image)], dim=1)
    lifted_text = torch.cat([text, torch.zeros_like(pad_text), pad_text], dim=1)
    return lifted_image, lifted_text, torch.sqrt(radii_sq[0] * radii_sq[1])


class _SumGradOverRanks(torch.autograd.Function):
    """Identity whose backward all-reduces (sums) the gradient and multiplies it by `factor`."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad * ctx.factor, None


def _gradient_scaled(loss: Tensor, factor: float) -> Tensor:
    """`loss`'s value with `factor` × its gradient."""
    return loss * factor + (loss - loss * factor).detach()


class ClipLoss(nn.Module):
    """open_clip.loss.ClipLoss (same arguments and call), computed by mmloss's fused kernels."""

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
    ) -> None:
        super().__init__()
        if use_horovod:
            raise NotImplementedError(
                "ClipLoss(use_horovod=True) is not supported: mmloss exchanges features "
                "with torch.distributed (launch with torchrun and use_horovod=False)"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod

    def _check_world(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                f"ClipLoss(world_size={self.world_size}) needs an initialised torch.distributed "
                "process group (torch.distributed.init_process_group)"
            )
        if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world_size):
            raise ValueError(
                f"ClipLoss(rank={self.rank}, world_size={self.world_size}) differs from the default "
                f"process group's rank {dist.get_rank()} of {dist.get_world_size()}"
            )

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Union[Tensor, float],
        logit_bias: Optional[Union[Tensor, float]] = None,
        output_dict: bool = False,
    ):
        """image_features (B, d), text_features (B, d) (this rank's), logit_scale s (0-dim tensor,
        learnable, or float). Returns the loss (fp32; fp64 for fp64 features), or
        {"contrastive_loss": loss} with output_dict."""
        across_ranks = self.world_size > 1
        if across_ranks:
            self._check_world()
        image, text, radii = _lift(image_features, text_features, across_ranks)
        scale = logit_scale.reshape(()) if isinstance(logit_scale, Tensor) else logit_scale
        if across_ranks and not self.local_loss and isinstance(scale, Tensor) and scale.requires_grad:
            # every rank's loss is the global one: its scale gradient sums every rank's share
            scale = _SumGradOverRanks.apply(scale, 1.0 / self.world_size if self.gather_with_grad else 1.0)
        # in float64: the op takes 1/τ in float64, and an fp32 τ would round every logit's scale
        temperature = 1.0 / ((scale.double() if isinstance(scale, Tensor) else scale) * radii.double())
        if not across_ranks:
            total = self._one_process(image, text, temperature)
        elif self.local_loss:
            total = self._local(image, text, temperature)
        else:
            total = mmloss.contrastive_loss(
                image, text, temperature=temperature, symmetric=True, global_negatives="gather"
            )
            if not self.gather_with_grad:  # only this rank's copy is differentiated
                total = _gradient_scaled(total, 1.0 / self.world_size)
        if isinstance(logit_bias, Tensor):
            total = total + (logit_bias * 0).sum()  # a common shift: no effect, NaN stays NaN
        return {"contrastive_loss": total} if output_dict else total

    @staticmethod
    def _one_process(image: Tensor, text: Tensor, temperature: Tensor) -> Tensor:
        return mmloss.contrastive_loss(image, text, temperature=temperature, symmetric=True)

    def _local(self, image: Tensor, text: Tensor, temperature: Tensor) -> Tensor:
        """This rank's rows against all ranks' columns, its mean (OpenCLIP's local_loss)."""

        def rows(query, key, **kwargs):
            return mmloss.contrastive_loss(
                query, key, temperature=temperature, reduction="none", global_negatives="gather", **kwargs
            ).mean()

        if self.gather_with_grad:
            return rows(image, text, symmetric=True)
        return 0.5 * (rows(image, text.detach()) + rows(text, image.detach()))
