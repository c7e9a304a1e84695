"""The cpu backend at the edges of the input range, against the float64 reference: the
symmetric one pass at a tiny temperature, and rows whose norms overflow their precision."""

import pytest
import torch

import mmloss
import mmloss.cpu as cpu
from mmloss.contrastive import inverse_temperature
from mmloss.reference import contrastive_loss_reference
from tests.cases import problem_of, shifted_seed


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 3 rows by 5 columns: running lse merged across threads, strips and tiles."""
    monkeypatch.setenv("MMLOSS_CPU_SCRATCH_MB", "0")
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
    torch.manual_seed(shifted_seed(0))
    q64, k64 = torch.randn(16, 256).double(), torch.randn(16, 256).double()  # the inputs
    t64 = torch.tensor(1e-3, dtype=torch.float64, requires_grad=True)
    q64.requires_grad_(True)
    k64.requires_grad_(True)
    want = contrastive_loss_reference(q64, k64, temperature=t64, symmetric=True)
    want.backward()
    assert float(want.detach()) > 50  # far beyond where a shift by 1/τ = 1000 underflows
    if shifted_seed(0) == 0:
        assert abs(float(want.detach()) - 119.4) < 0.05  # the inputs

    q, k = q64.detach().to(dtype), k64.detach().to(dtype)
    t = torch.tensor(1e-3, dtype=torch.float64, requires_grad=True)
    problem = problem_of(q, k, temperature=t, symmetric=True, backend="cpu")
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


# (dtype, power-of-two row scale): fp16 rows of norm above 65,504 (entries below it), fp32 rows
# whose squares and raw products overflow fp32, float64 rows whose squares overflow float64.
HUGE_ROWS = [(torch.float16, 2.0**14), (torch.float32, 2.0**100), (torch.float32, 2.0**125), (torch.float64, 2.0**900)]


def _huge(x: torch.Tensor, dtype, scale) -> torch.Tensor:
    return (x.double().clamp(-3.5, 3.5) * scale).to(dtype)


# bf16 rows whose raw products overflow fp32 (the 16-bit GEMMs' sums) where this CPU has them.
@pytest.mark.parametrize("dtype,scale", HUGE_ROWS + [(torch.bfloat16, 2.0**100)], ids=str)
@pytest.mark.parametrize("features", ["plain", "all", "symmetric_all"])
def test_rows_whose_norms_overflow_their_dtype(dtype, scale, features):
    """Norms in float64 and rows scaled by a power of two before the GEMM: the loss and
    gradients of rows far beyond their dtype's squares are those of the float64 reference on
    the same rows (computed there at scale 1: cosines do not change, gradients scale by 1/s).
    Before: NaN (cpu), a wrong loss for fp16 norms above 65,504."""
    from tests.cases import make_case

    case = make_case(13, 13, 16, features, seed=4)
    q = _huge(case.query, dtype, scale).requires_grad_(True)
    k = _huge(case.key, dtype, scale).requires_grad_(True)
    q0 = (q.detach().double() / scale).requires_grad_(True)
    k0 = (k.detach().double() / scale).requires_grad_(True)
    got = mmloss.contrastive_loss(q, k, temperature=case.temperature, backend="cpu", **case.kwargs)
    want = mmloss.contrastive_loss(q0, k0, temperature=case.temperature, backend="reference", **case.kwargs)
    got.backward()
    want.backward()
    rtol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(got.double(), want.detach(), rtol=rtol, atol=0)
    # fp16 gradients of ~1/scale are subnormal there: their spacing 2^-24 bounds the error.
    floor = 2.0**-24 if dtype == torch.float16 else 0.0
    for g, ref in ((q.grad, q0.grad / scale), (k.grad, k0.grad / scale)):
        torch.testing.assert_close(g.double(), ref, rtol=rtol, atol=max(rtol * float(ref.abs().max()), floor))


@pytest.mark.parametrize("dtype,scale", HUGE_ROWS, ids=str)
def test_similarity_and_topk_of_rows_whose_norms_overflow(dtype, scale):
    """mmloss.similarity/topk_similarity on the cpu gave all-zero cosines and columns 0, 1."""
    g = torch.Generator().manual_seed(shifted_seed(1))
    a, b = torch.randn(9, 24, generator=g), torch.randn(31, 24, generator=g)
    a, b = _huge(a, dtype, scale), _huge(b, dtype, scale)
    want = (
        torch.nn.functional.normalize(a.double() / scale, dim=1)
        @ torch.nn.functional.normalize(b.double() / scale, dim=1).T
    )
    got = mmloss.similarity(a, b, backend="cpu")
    tol = 1e-3 if dtype == torch.float16 else 1e-6
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
    scores, indices = mmloss.topk_similarity(a, b, 3, backend="cpu")
    torch.testing.assert_close(scores.double(), want.topk(3, dim=1).values, rtol=0, atol=tol)
    assert torch.equal(indices, want.topk(3, dim=1).indices)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_tiny_temperature_is_exact(dtype):
    """τ = 1e-30: logits of 1e30 are fine in the kernel's float64 element math, but an exp of
    f/τ - shift with the product fused into the subtraction (an FMA) kept its rounding error
    (~1e14) in the exponent: -inf and NaN row lse. The logit is now rounded once and stored."""
    torch.manual_seed(shifted_seed(0))
    q = torch.randn(6, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(6, 16, dtype=dtype, requires_grad=True)
    q0 = q.detach().double().requires_grad_(True)
    k0 = k.detach().double().requires_grad_(True)
    got = mmloss.contrastive_loss(q, k, temperature=1e-30, backend="cpu")
    want = mmloss.contrastive_loss(q0, k0, temperature=1e-30, backend="reference")
    got.backward()
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=0)
    for g, ref in ((q.grad, q0.grad), (k.grad, k0.grad)):
        torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
