"""The oracle itself, checked against direct formulas written independently here."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmloss.reference import contrastive_loss_reference as reference
from tests.cases import shifted_seed


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("M,N,d", [(1, 1, 3), (5, 8, 4), (13, 13, 7)])
def test_plain_equals_cross_entropy(M, N, d):
    torch.manual_seed(shifted_seed(M * N + d))
    q, k = torch.randn(M, d, dtype=torch.float64), torch.randn(N, d, dtype=torch.float64)
    positives = torch.randint(0, N, (M,))
    logits = _unit(q) @ _unit(k).T / 0.07
    want = F.cross_entropy(logits, positives)
    torch.testing.assert_close(reference(q, k, positives=positives, temperature=0.07), want)
    rows = F.cross_entropy(logits, positives, reduction="none")
    torch.testing.assert_close(reference(q, k, positives=positives, temperature=0.07, reduction="none"), rows)


def test_ignored_rows_as_cross_entropy_ignore_index():
    torch.manual_seed(shifted_seed(0))
    q, k = torch.randn(6, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    positives = torch.tensor([0, -100, 3, 6, -100, 2])
    logits = _unit(q) @ _unit(k).T / 0.05
    for reduction in ("mean", "sum", "none"):
        want = F.cross_entropy(logits, positives, ignore_index=-100, reduction=reduction)
        got = reference(q, k, positives=positives, temperature=0.05, reduction=reduction)
        torch.testing.assert_close(got, want)


def _arc_loss(q, k, positives, tau, margin, teacher_cos=None, removed=None):
    """The official code's ArcSimilarity with explicit acos/cos, row by row."""
    c = _unit(q) @ _unit(k).T
    theta = torch.acos(c.clamp(-1, 1))
    m = torch.full_like(c, margin) if teacher_cos is None else margin * (1 - teacher_cos)
    losses = []
    for i in range(q.shape[0]):
        logits = []
        for j in range(k.shape[0]):
            if removed is not None and removed[i, j] and j != positives[i]:
                continue
            negative = j != positives[i] and theta[i, j] > margin
            value = torch.cos(theta[i, j] - m[i, j]) if negative else c[i, j]
            logits.append(value / tau)
            if j == positives[i]:
                pos = value / tau
        losses.append(torch.logsumexp(torch.stack(logits), 0) - pos)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("margin", [0.1, 0.15, 0.5])
def test_fixed_margin_equals_acos_formula(margin):
    torch.manual_seed(shifted_seed(1))
    q, k = torch.randn(6, 9, dtype=torch.float64), torch.randn(8, 9, dtype=torch.float64)
    positives = torch.randint(0, 8, (6,))
    want = _arc_loss(q, k, positives, 0.05, margin)
    torch.testing.assert_close(reference(q, k, positives=positives, margin=margin), want)


def test_adaptive_margin_and_filter_equal_direct_formula():
    torch.manual_seed(shifted_seed(2))
    q, k = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
    tq, tk = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    fq, fk = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    teacher_cos = _unit(tq) @ _unit(tk).T
    removed = (fq @ fk.T) > 0.8
    want = _arc_loss(q, k, torch.arange(7), 0.05, 0.3, teacher_cos, removed)
    got = reference(q, k, margin=0.3, margin_teacher=(tq, tk), filter_teacher=(fq, fk), filter_threshold=0.8)
    torch.testing.assert_close(got, want)


def test_groups_remove_same_group_negatives():
    torch.manual_seed(shifted_seed(3))
    q, k = torch.randn(4, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    positives = torch.tensor([0, 3, 4, 1])
    logits = _unit(q) @ _unit(k).T / 0.05
    same = groups[None, :] == groups[positives][:, None]
    same[torch.arange(4), positives] = False
    want = F.cross_entropy(logits.masked_fill(same, -math.inf), positives)
    torch.testing.assert_close(reference(q, k, positives=positives, key_groups=groups), want)


def test_symmetric_is_mean_of_both_directions():
    torch.manual_seed(shifted_seed(4))
    q, k = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    logits = _unit(q) @ _unit(k).T / 0.1
    labels = torch.arange(5)
    want = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(reference(q, k, temperature=0.1, symmetric=True), want)


def test_margin_gradient_is_finite_at_antipodal_vectors():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = reference(q, k, positives=torch.tensor([0, 0]), margin=0.2)
    loss.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_margin_is_finite_at_duplicates_in_low_precision(dtype):
    """A negative equal to the row (1 - c² = 0 in the dtype) and a margin: loss and gradients
    stay finite (in fp16 the contract's ε = 1e-12 would round to 0)."""
    q = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], dtype=dtype, requires_grad=True)
    k = torch.tensor([[3.0, -1.0, 0.5], [1.0, 2.0, 3.0]], dtype=dtype, requires_grad=True)
    loss = reference(q, k, positives=torch.tensor([0, 1]), margin=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_fp32_loss_of_nearly_solved_rows_keeps_relative_accuracy():
    """fp32, tau = 0.05, positives that are near-duplicates of their rows: losses of ~1e-7,
    where lse and the positive's logit (~20) agree to 8 digits and their fp32 difference
    cancels; the fp32 reference gives them with a small relative error. Rows orthonormal (times
    random norms) and negatives orthogonal to them, so that every row is nearly solved for any
    seed (random rows and negatives anti-aligned with one row left a row at 1.5e-3 for seed
    offset 3000)."""
    g = torch.Generator().manual_seed(shifted_seed(34))
    basis = torch.linalg.qr(torch.randn(32, 5, generator=g, dtype=torch.float64)).Q.T  # (5, 32) orthonormal
    q = basis * (1 + torch.rand(5, 1, generator=g, dtype=torch.float64))
    k = torch.randn(70, 32, generator=g, dtype=torch.float64)
    k[:5] = q + 1e-4 * torch.randn(5, 32, generator=g, dtype=torch.float64)
    k[5:] -= (k[5:] @ basis.T) @ basis  # orthogonal to every row
    want = reference(q, k, temperature=0.05, reduction="none")
    assert float(want.max()) < 1e-4 and float(want.min()) > 0
    qf, kf = q.float().requires_grad_(), k.float().requires_grad_()
    got = reference(qf, kf, temperature=0.05, reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)
    got.sum().backward()  # and the gradient through the relative form is finite
    assert torch.isfinite(qf.grad).all() and torch.isfinite(kf.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_loss_matches_logsumexp_form(dtype):
    """The relative form equals logsumexp - positive (to rounding), every feature that masks
    columns included (groups, ignored rows), and so do its gradients."""
    torch.manual_seed(shifted_seed(3))
    q, k = torch.randn(9, 8), torch.randn(12, 8)
    positives = torch.tensor([0, -100, 3, 6, 11, 2, 2, -100, 5])
    groups = torch.randint(0, 4, (12,))
    qd, kd = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
    got = reference(qd, kd, positives=positives, key_groups=groups, temperature=0.1, reduction="none")
    gq, gk = torch.autograd.grad(got.sum(), [qd, kd])
    logits = ((F.normalize(qd, dim=1) @ F.normalize(kd, dim=1).T) / 0.1).float()  # the reference's rounding
    cols = torch.where(positives >= 0, positives, 0)
    same = groups[None, :] == groups[cols][:, None]
    same[torch.arange(9), cols] = False
    logits = logits.masked_fill(same, float("-inf"))
    want = torch.where(positives >= 0, torch.logsumexp(logits, 1) - logits.gather(1, cols[:, None])[:, 0], 0.0)
    wq, wk = torch.autograd.grad(want.sum(), [qd, kd])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(gq.float(), wq.float(), **tol)
    torch.testing.assert_close(gk.float(), wk.float(), **tol)


@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float16, 2e4), (torch.float32, 1e30), (torch.float32, 1e-30), (torch.bfloat16, 1e30)],
)
def test_rows_whose_squares_overflow(dtype, scale):
    """fp16 rows of norm > 65,504 and fp32 rows of 1e30 are valid: the reference in their dtype
    gives the float64 answer (F.normalize alone overflowed: 1.386 instead of 3.234 in fp16)."""
    g = torch.Generator().manual_seed(shifted_seed(5))
    q = (torch.randn(6, 40, generator=g, dtype=torch.float64).clamp(-3, 3) * scale).to(dtype)  # fp16: |x| < 65,504
    k = (torch.randn(9, 40, generator=g, dtype=torch.float64).clamp(-3, 3) * scale).to(dtype)
    teacher = tuple((torch.randn(n, 8, generator=g).clamp(-3, 3) * scale).to(dtype) for n in (6, 9))
    kwargs = dict(positives=torch.tensor([0, 3, 8, 1, -100, 5]), margin=0.2, margin_teacher=teacher)
    want = reference(
        q.double(),
        k.double(),
        positives=kwargs["positives"],
        margin=0.2,
        margin_teacher=tuple(t.double() for t in teacher),
    )
    got = reference(q, k, **kwargs)
    assert torch.isfinite(got)
    tolerance = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5}[dtype]
    assert abs(float(got) - float(want)) <= tolerance * abs(float(want))


def test_normalize_gives_f_normalize_bits_on_ordinary_rows():
    from mmloss.reference import normalize

    x = torch.randn(50, 33) * torch.logspace(-3, 3, 50)[:, None]
    assert torch.equal(normalize(x), torch.nn.functional.normalize(x, dim=-1, eps=1e-12))
