"""The cpu backend at the edges of the input range, against the float64 reference: the
symmetric one pass at a tiny temperature, and rows whose norms overflow their precision."""

import pytest
import torch

import mmloss
import mmloss.cpu as cpu
from mmloss.checks import build_problem
from mmloss.contrastive import inverse_temperature
from mmloss.reference import contrastive_loss_reference

NO_FEATURES = dict(positives=None, margin=0.0, margin_teacher=None, filter_teacher=None, filter_threshold=None,
                   filter_normalize=False, key_groups=None, reduction="mean")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 3 rows by 5 columns: running lse merged across threads, strips and tiles."""
    monkeypatch.setattr(cpu, "SCRATCH_BYTES", 0)
    monkeypatch.setattr(cpu, "MIN_STRIP_ROWS", 3)
    monkeypatch.setattr(cpu, "MIN_TILE_COLS", 5)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_symmetric_one_pass_is_exact_at_a_tiny_temperature(dtype, tiled, request):
    """τ = 1e-3 (a learnable tensor, so no host-side gate): the column sums once shared the
    shift 1/τ and underflowed (-inf); a running column maximum keeps them exact. The kernel's
    one-pass pair itself against the float64 reference (119.4 here), loss and gradients."""
    if tiled:
        request.getfixturevalue("small_tiles")
    torch.manual_seed(0)
    q64, k64 = torch.randn(16, 256).double(), torch.randn(16, 256).double()  # the inputs
    t64 = torch.tensor(1e-3, dtype=torch.float64, requires_grad=True)
    q64.requires_grad_(True)
    k64.requires_grad_(True)
    want = contrastive_loss_reference(q64, k64, temperature=t64, symmetric=True)
    want.backward()
    assert abs(float(want.detach()) - 119.4) < 0.05

    q, k = q64.detach().to(dtype), k64.detach().to(dtype)
    t = torch.tensor(1e-3, dtype=torch.float64, requires_grad=True)
    problem = build_problem(q, k, temperature=t, symmetric=True, backend="cpu", **NO_FEATURES)
    inv_temp = inverse_temperature(t)
    lse, lse_col, pos = cpu.forward_symmetric(q, k, inv_temp.detach(), problem)
    rows = 0.5 * ((lse - pos) + (lse_col - pos))
    weight = torch.full((16,), 0.5 / 16, dtype=torch.float64)
    dq, dk, d_inv_temp = cpu.backward_symmetric(q, k, inv_temp.detach(), problem, lse, lse_col, weight, weight, True)
    (d_t,) = torch.autograd.grad(inv_temp, t, d_inv_temp.to(inv_temp.dtype))
    rtol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(rows.mean(), want.detach(), rtol=rtol, atol=0)
    for got, ref in ((dq, q64.grad), (dk, k64.grad), (d_t, t64.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol * float(ref.abs().max()))
