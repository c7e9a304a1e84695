"""Every kernel backend against the float64 reference: every feature, reduction and dtype, at
awkward sizes (1, primes, strips that do not divide M, d not a power of two)."""

import pytest
import torch

import mmloss
from tests.cases import FEATURES, assert_matches_reference, make_case

SIZES = [(1, 1, 1), (1, 6, 3), (2, 1, 4), (13, 17, 769), (37, 41, 3), (64, 61, 32)]


def widest(backend: str) -> torch.dtype:
    """The widest dtype a backend serves: float64 on the CPU, float32 on the GPU kernels."""
    return torch.float64 if backend == "cpu" else torch.float32


@pytest.fixture
def small_strips(monkeypatch, backend):
    """Makes the cpu backend cut its rows into strips of 3 rows and its columns into tiles of 5."""
    if backend == "cpu":
        monkeypatch.setenv("MMLOSS_CPU_SCRATCH_MB", "0")
        monkeypatch.setattr("mmloss.cpu.MIN_STRIP_ROWS", 3)
        monkeypatch.setattr("mmloss.cpu.MIN_TILE_COLS", 5)


@pytest.mark.parametrize("features", list(FEATURES))
@pytest.mark.parametrize("M,N,d", SIZES)
def test_float64_every_feature(backend, device, features, M, N, d, small_strips):
    if widest(backend) != torch.float64:
        pytest.skip(f"{backend} has no float64 path")
    case = make_case(M, N, d, features, seed=M * 1000 + N + d, device=device)
    assert_matches_reference(case, backend, torch.float64, learn_temperature=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("features", ["plain", "all", "symmetric_all"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reductions(backend, device, reduction, features, dtype):
    if dtype == torch.float64 and widest(backend) != torch.float64:
        pytest.skip(f"{backend} has no float64 path")
    case = make_case(19, 23, 10, features, seed=7, device=device)
    assert_matches_reference(case, backend, dtype, reduction=reduction, learn_temperature=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("features", list(FEATURES))
def test_low_precision_meets_error_bar(backend, device, dtype, features):
    """docs/contract.md §1's bar: at most 2x (+1e-6) the reference's own error in the same dtype."""
    case = make_case(64, 71, 48, features, seed=11, device=device)
    assert_matches_reference(case, backend, dtype, learn_temperature=True)


def test_gradcheck(backend, device):
    if backend != "cpu":
        pytest.skip("gradcheck needs float64")
    for features in ("plain", "all", "symmetric_all"):
        case = make_case(4, 6, 3, features, seed=3, device=device)
        q, k, t = case.inputs(torch.float64, learn_temperature=True)

        def loss(q, k, t):
            return mmloss.contrastive_loss(q, k, temperature=t, backend=backend, reduction="none", **case.kwargs)

        assert torch.autograd.gradcheck(loss, (q, k, t))


def test_near_duplicate_positives_have_finite_gradients(backend, device):
    for features in ("margin", "all"):
        case = make_case(16, 20, 8, features, seed=5, device=device, duplicates=True)
        for dtype in sorted({widest(backend), torch.float32}, key=str):
            q, k, t = case.inputs(dtype, learn_temperature=True)
            loss = mmloss.contrastive_loss(q, k, temperature=t, backend=backend, **case.kwargs)
            loss.backward()
            for g in (q.grad, k.grad, t.grad):
                assert torch.isfinite(g).all()


def test_non_contiguous_and_expanded_inputs(backend, device):
    torch.manual_seed(0)
    dtype = widest(backend)
    base = torch.randn(12, 10, dtype=dtype, device=device)
    q = base[::2, ::2]  # strided view (6, 5)
    k = torch.randn(1, 5, dtype=dtype, device=device).expand(7, 5) + 0  # materialised
    k_expanded = torch.randn(1, 5, dtype=dtype, device=device).expand(7, 5)  # stride 0
    groups = torch.arange(14, device=device)[::2]
    for key in (k, k_expanded):
        got = mmloss.contrastive_loss(q, key, key_groups=groups, margin=0.1, backend=backend)
        want = mmloss.contrastive_loss(
            q.contiguous(), key.contiguous(), key_groups=groups.contiguous(), margin=0.1, backend="reference"
        )
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("where", ["query", "key", "margin_teacher", "filter_teacher", "temperature"])
def test_nan_in_gives_nan_out(backend, device, where):
    case = make_case(5, 7, 4, "all", seed=9, device=device)
    q, k, t = case.inputs(widest(backend))
    kwargs = dict(case.kwargs)
    if where == "query":
        q = q.detach().clone()
        q[1, 2] = float("nan")
    elif where == "key":
        k = k.detach().clone()
        k[:, 0] = float("inf")
    elif where == "temperature":
        t = torch.tensor(float("nan"), device=device)  # a float NaN τ is a bad argument
    else:
        rows, cols = kwargs[where]
        rows = rows.clone()
        rows[:] = float("nan")
        kwargs[where] = (rows, cols)
    loss = mmloss.contrastive_loss(q, k, temperature=t, backend=backend, **kwargs)
    assert torch.isnan(loss)


def test_no_grad_and_eval_paths_agree(backend, device):
    case = make_case(9, 12, 6, "all", seed=13, device=device)
    q, k, t = case.inputs(widest(backend))
    with torch.no_grad():
        free = mmloss.contrastive_loss(q, k, temperature=t, backend=backend, **case.kwargs)
    tracked = mmloss.contrastive_loss(q, k, temperature=t, backend=backend, **case.kwargs)
    torch.testing.assert_close(free, tracked.detach())


def test_cpu_symmetric_is_one_pass(backend, device, monkeypatch):
    """backend='cpu': a symmetric loss is one call of the kernel forward (row and column lse)
    and one backward (both directions' gradients), not one per direction."""
    if backend != "cpu":
        pytest.skip("the cpu backend's calls")
    import mmloss.cpu

    calls = []

    class Counted:
        def __getattr__(self, name):
            op = getattr(torch.ops.mmloss, name)
            return lambda *args: calls.append(name) or op(*args)

    monkeypatch.setattr(mmloss.cpu, "ops", Counted())
    case = make_case(30, 30, 12, "symmetric_all", seed=17, device=device)
    assert_matches_reference(case, backend, torch.float64, learn_temperature=True)
    assert calls == ["contrastive_forward_symmetric", "contrastive_backward_symmetric"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["reference", "kernel"])
def test_all_rows_ignored_is_a_zero_loss_with_zero_gradients(backend, device, reduction, name):
    """A term whose rows are all ignored (a mean over no rows): loss 0 and zero gradients on
    every backend and reduction (the cpu fused path gave NaN gradients: 0 · 1/0)."""
    torch.manual_seed(0)
    dtype = widest(backend)
    q = torch.randn(4, 8, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(5, 8, dtype=dtype, device=device, requires_grad=True)
    t = torch.tensor(0.05, dtype=dtype, device=device, requires_grad=True)
    positives = torch.full((4,), -100, device=device)
    loss = mmloss.contrastive_loss(
        q,
        k,
        positives=positives,
        temperature=t,
        reduction=reduction,
        margin=0.1,
        backend=backend if name == "kernel" else "reference",
    )
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    for g in (q.grad, k.grad, t.grad):
        assert g is not None and torch.equal(g, torch.zeros_like(g))


def test_symmetric_with_a_small_tensor_temperature(backend, device):
    """A learnable τ below 1/350 through the public call (the one pass once shifted its column
    sums by 1/τ and returned -inf there): the float64 reference's value and gradients."""
    torch.manual_seed(0)  # the inputs of the report: torch.randn(16, 256) twice
    q32, k32 = torch.randn(16, 256), torch.randn(16, 256)
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k = (x.to(device, dtype).requires_grad_() for x in (q32, k32))
    results = []
    for name in (backend, "reference"):
        t = torch.tensor(1e-3, dtype=q.dtype, device=device, requires_grad=True)
        loss = mmloss.contrastive_loss(q, k, symmetric=True, temperature=t, backend=name)
        grads = torch.autograd.grad(loss, (q, k, t))
        results.append((loss, *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert abs(float(results[0][0]) - 119.4) < 0.1
