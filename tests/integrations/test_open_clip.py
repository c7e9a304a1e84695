"""mmloss.integrations.open_clip.ClipLoss against the installed open-clip-torch 3.3.0 ClipLoss
in one process: the loss and the gradients of both feature sets and of the learnable
logit_scale (float64 1e-10, float32 within 2× OpenCLIP's own error), normalised or not; the
call's options and errors. tests/integrations/test_distributed.py covers 2 and 3 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmloss.integrations.open_clip import ClipLoss
from tests.integrations.support import assert_matches_peer, open_clip_loss

NAMES = ["loss", "d_image", "d_text", "d_logit_scale"]


def _features(batch: int, width: int, seed: int, normalise: bool, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, width, generator=g) * spread
    text = image + torch.randn(batch, width, generator=g) * spread
    if normalise:
        image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    return image.double(), text.double()


def _run(image, text, scale, **kwargs):
    peer = open_clip_loss().ClipLoss

    def run(impl, dtype):
        i, t = image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_()
        s = torch.tensor(scale, dtype=dtype, requires_grad=True)
        loss = (peer if impl == "peer" else ClipLoss)(**kwargs)(i, t, s)
        return [loss.detach(), *torch.autograd.grad(loss, (i, t, s))]

    return run


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("batch,width", [(1, 4), (7, 10), (40, 33)])
def test_equals_open_clip(batch, width, normalise):
    image, text = _features(batch, width, batch + width, normalise)
    assert_matches_peer(_run(image, text, 14.3), NAMES)


def test_large_scale_and_small_or_large_features():
    """1/τ = s·R_I·R_T beyond the one-pass bound (OpenCLIP clamps s at 100), and feature norms
    far from 1: the lift keeps the raw dot products."""
    image, text = _features(9, 6, 0, True)
    assert_matches_peer(_run(image, text, 200.0), NAMES)
    for spread, scale in ((30.0, 0.01), (0.05, 50.0)):
        image, text = _features(9, 6, 1, False, spread)
        assert_matches_peer(_run(image, text, scale), NAMES)


def test_options_of_the_call():
    image, text = _features(6, 5, 3, True)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    peer = open_clip_loss().ClipLoss(cache_labels=True)
    ours = ClipLoss(cache_labels=True)
    for _ in range(2):  # cached labels on OpenCLIP's side
        want = peer(image, text, scale, bias, output_dict=True)
        got = ours(image, text, scale, logit_bias=bias, output_dict=True)
        assert set(got) == set(want) == {"contrastive_loss"}
        torch.testing.assert_close(got["contrastive_loss"], want["contrastive_loss"], rtol=1e-12, atol=0)
    (d_bias,) = torch.autograd.grad(got["contrastive_loss"], bias)
    assert float(d_bias.abs()) == 0.0  # a common shift of all logits
    # a Python float scale and a shape-[1] tensor
    torch.testing.assert_close(ours(image, text, 10.0), peer(image, text, 10.0), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        ours(image, text, scale.reshape(1)), peer(image, text, scale.reshape(1)), rtol=1e-12, atol=0
    )


def test_nan_in_gives_nan_out():
    image, text = _features(4, 3, 0, True)
    image[1, 1] = float("nan")
    assert torch.isnan(ClipLoss()(image, text, 5.0))


def test_errors():
    with pytest.raises(NotImplementedError, match="use_horovod"):
        ClipLoss(use_horovod=True)
    image, text = _features(4, 3, 0, True)
    with pytest.raises(ValueError, match="world_size=2.*torch.distributed"):
        ClipLoss(rank=0, world_size=2)(image, text, 5.0)
