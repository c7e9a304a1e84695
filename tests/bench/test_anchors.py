"""The benchmark's anchors compute the loss mmloss does: cut-cross-entropy's InfoNCE (linear
cross-entropy of τ-scaled normalised queries against normalised keys) and the dense eager
loss equal mmloss's one-direction InfoNCE, value and gradients (small shape, CPU)."""

import pytest
import torch

import mmloss
from bench import anchors


def _loss_and_grads(fn, q, k):
    q, k = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    loss = fn(q, k)
    return (loss.detach(), *torch.autograd.grad(loss, (q, k)))


@pytest.mark.parametrize("name", ["cce", "eager"])
def test_anchor_equals_mmloss(name):
    pytest.importorskip("cut_cross_entropy")
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(37, 24, generator=g), torch.randn(37, 24, generator=g)
    q = q + 0.8 * k  # positives that stand out: losses far from log N
    fn = {
        "cce": lambda a, b: anchors.cce_loss(a, b, 0.07, impl="torch_compile"),
        "eager": lambda a, b: anchors.eager_loss(a, b, 0.07),
    }[name]
    got = _loss_and_grads(fn, q, k)
    want = _loss_and_grads(lambda a, b: mmloss.contrastive_loss(a, b, temperature=0.07, backend="reference"), q, k)
    assert float(want[0]) < 0.9 * float(torch.log(torch.tensor(37.0)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
