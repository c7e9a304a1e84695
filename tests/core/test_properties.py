"""Property-based: any shape and any combination of feature flags, cpu backend == reference."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmloss
from mmloss.reference import contrastive_loss_reference
from tests.cases import shifted_seed


@st.composite
def problems(draw):
    symmetric = draw(st.booleans())
    M = draw(st.integers(1, 24))
    N = M if symmetric else draw(st.integers(1, 24))
    d = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(shifted_seed(seed))
    q = torch.randn(M, d, generator=g, dtype=torch.float64)
    k = torch.randn(N, d, generator=g, dtype=torch.float64)
    kwargs = {
        "temperature": draw(st.floats(0.02, 2.0)),
        "symmetric": symmetric,
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
    }
    if draw(st.booleans()):
        kwargs["margin"] = draw(st.floats(0.0, 1.5))
        if draw(st.booleans()):
            kwargs["margin_teacher"] = (
                torch.randn(M, 3, generator=g, dtype=torch.float64),
                torch.randn(N, 3, generator=g, dtype=torch.float64),
            )
    if draw(st.booleans()):
        kwargs["filter_teacher"] = (
            torch.randn(M, 4, generator=g, dtype=torch.float64),
            torch.randn(N, 4, generator=g, dtype=torch.float64),
        )
        kwargs["filter_threshold"] = draw(st.floats(-2.0, 2.0))
        kwargs["filter_normalize"] = draw(st.booleans())
    if draw(st.booleans()):
        kwargs["key_groups"] = torch.randint(0, max(1, N // 2), (N,), generator=g)
    if not symmetric and (M > N or draw(st.booleans())):
        positives = torch.randint(0, N, (M,), generator=g)
        positives[torch.rand(M, generator=g) < 0.2] = mmloss.IGNORE_INDEX
        positives[0] = 0
        kwargs["positives"] = positives
    return q, k, kwargs


@settings(max_examples=60, deadline=None)
@given(problems())
def test_cpu_equals_reference(problem):
    q, k, kwargs = problem
    results = []
    for run in ("reference", "cpu"):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        loss = mmloss.contrastive_loss(qq, kk, backend=run, **kwargs)
        loss.sum().backward()
        results.append((loss.detach(), qq.grad, kk.grad))
    # atol: at c = -1 exactly (d = 1 makes every cosine ±1) the margin's slope is ~1e6 by
    # design (sqrt(max(1 - c², 1e-12))), which turns float64 rounding into ~1e-9 noise.
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-7)


def test_reference_backend_is_the_oracle():
    q, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(mmloss.contrastive_loss(q, k, backend="reference"), contrastive_loss_reference(q, k))
