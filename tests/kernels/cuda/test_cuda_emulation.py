"""The CUDA backend's kernels executed without a GPU: csrc/cuda compiled by g++ against the
host emulation of tests/cuda_emulation (fibers for a CTA's threads, mma.sync computed from the
PTX ISA's fragment layouts), driven through the real launchers and a mirror of the ATen glue,
and routed in as backend="cuda" on CPU tensors. Every feature and dtype against the float64
reference at docs/contract.md §1's bar (as tests/test_cuda_gpu.py), at shapes off the 64 x 64 tile and
the 32-wide d chunks, with and without column splits and backward row chunks; bit-identical
results under another thread order and other strides and alignments; the 16-bit conversions."""

import ctypes
import functools
import shutil

import pytest
import torch

import mmloss
from mmloss import backends
from mmloss.checks import build_problem
from tests.cases import FEATURES, assert_kernel_matches_reference, make_case

if shutil.which("g++") is None:
    pytest.skip("needs g++", allow_module_level=True)

from tests.kernels.cuda.emulation import emulated  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, N, d): 1 row, partial tiles, exactly one tile plus one, two tiles plus two; d below one
# vector, two full 32-wide chunks, and a partial chunk that is not a multiple of 8.
SHAPES = [(1, 7, 3), (7, 65, 64), (65, 130, 100), (130, 65, 3), (130, 130, 64), (65, 1, 100)]


@pytest.fixture(scope="module", autouse=True)
def library():
    return emulated.library()


@pytest.fixture(autouse=True)
def as_cuda_backend(monkeypatch):
    """backend="cuda" served by the emulated kernels, on CPU tensors."""
    kernels, reason = backends.kernels, backends.unavailable_reason
    monkeypatch.setattr(
        backends, "unavailable_reason", lambda name, device: None if name == "cuda" else reason(name, device)
    )
    monkeypatch.setattr(backends, "kernels", lambda name: emulated if name == "cuda" else kernels(name))


def plan(monkeypatch, streamed: bool, chunked: bool) -> None:
    """streamed: one column split, so a CTA streams all column tiles (else one split per tile);
    chunked: the backward in 64-row chunks (a tiny scratch budget)."""
    if streamed:
        monkeypatch.setattr(emulated, "SMS", 1)
    if chunked:
        monkeypatch.setenv("MMLOSS_CUDA_SCRATCH_MB", "0")


assert_close_to_oracle = functools.partial(assert_kernel_matches_reference, backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("features", sorted(FEATURES))
def test_every_feature_and_dtype(features, dtype, monkeypatch):
    i = sorted(FEATURES).index(features) + DTYPES.index(dtype)
    M, N, d = SHAPES[i % len(SHAPES)]
    plan(monkeypatch, streamed=i % 2 == 0, chunked=i % 3 == 0)
    assert_close_to_oracle(make_case(M, N, d, features, seed=i), dtype)


@pytest.mark.parametrize("N", [1, 7, 65, 130])
@pytest.mark.parametrize("M", [1, 7, 65, 130])
def test_odd_shapes(M, N, monkeypatch):
    i = M + N
    plan(monkeypatch, streamed=i % 2 == 1, chunked=M > 64)
    dtype = DTYPES[i % 3]
    case = make_case(M, N, (3, 64, 100)[i % 3], "all", seed=i)  # shuffled positives: N may be below M
    assert_close_to_oracle(case, dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction):
    assert_close_to_oracle(make_case(70, 90, 40, "symmetric_all", seed=5), torch.bfloat16, reduction)


def _kernel_outputs(q, k, case):
    """forward and backward of the backend contract (lse, pos_logit, d_query, d_key, d_inv_temp)."""
    kwargs = {
        **dict.fromkeys(("positives", "margin_teacher", "filter_teacher", "filter_threshold", "key_groups")),
        "filter_normalize": False,
        "reduction": "mean",
        "backend": "cuda",
        **case.kwargs,
    }
    problem = build_problem(q, k, temperature=case.temperature, **kwargs)
    inv_temp = 1.0 / case.temperature
    lse, pos = emulated.forward(q, k, inv_temp, problem)
    weight = torch.linspace(0.5, 1.5, q.shape[0]) * problem.valid_rows
    return (lse, pos, *emulated.backward(q, k, inv_temp, problem, lse, weight, True))


def _in_nan_frame(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x as a view `offset` elements into a NaN-filled buffer (NaN rows around it, NaN padding
    of 2 * offset after each row): a read outside x makes the results NaN."""
    M, d = x.shape
    frame = torch.full((M + 2, d + 2 * offset), float("nan"), dtype=x.dtype)
    view = frame[1 : M + 1, offset : offset + d]
    view.copy_(x)
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thread_order_strides_and_alignment_change_no_bit(dtype, monkeypatch):
    """Row strides with NaN padding and a misaligned base (the scalar-load path) give the very
    same bits as the contiguous run (vector loads at d = 64); fibers in reverse order between
    barriers (a missing barrier would read stale shared memory) the same forward bits and the
    same gradients up to the order of the fp32 atomic adds (a few ulps of the largest gradient:
    the radial terms cancel in the finish)."""
    plan(monkeypatch, streamed=True, chunked=True)
    case = make_case(130, 70, 64, "all", seed=2)
    q, k, _ = case.inputs(dtype)
    q, k = q.detach(), k.detach()
    want = _kernel_outputs(q, k, case)
    vector = 16 // q.element_size()
    for offset in (vector, 1):
        got = _kernel_outputs(_in_nan_frame(q, offset), _in_nan_frame(k, offset), case)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), offset
    try:
        emulated.set_reverse_order(True)
        got = _kernel_outputs(q, k, case)
    finally:
        emulated.set_reverse_order(False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for a, b in zip(got[2:], want[2:]):
        eps = torch.finfo(b.dtype).eps
        torch.testing.assert_close(a, b, rtol=0, atol=8 * eps * float(b.abs().max()))
    assert all(torch.isfinite(x).all() for x in want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_conversions_round_to_nearest_even_as_torch(dtype):
    g = torch.Generator().manual_seed(0)
    finfo = torch.finfo(dtype)
    mags = torch.exp2(torch.empty(200000).uniform_(-30, 18, generator=g)) * torch.empty(200000).uniform_(
        1, 2, generator=g
    )
    signs = torch.where(torch.rand(200000, generator=g) < 0.5, -1.0, 1.0)
    # Every value of the 16-bit type, the midpoints between neighbours, and special values.
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    every = every[torch.isfinite(every)].unique()
    midpoints = ((every[1:].double() + every[:-1].double()) / 2).float()
    special = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), finfo.max, finfo.tiny, 65520.0, 65519.99, 3e38, 1e-45]
    )
    x = torch.cat([mags * signs, every, midpoints, special])
    got = emulated.round_trip(x, dtype)
    want = x.to(dtype).float()
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    assert torch.isnan(emulated.round_trip(torch.tensor([float("nan")]), dtype)).all()


def test_a_bad_launch_reaches_the_launchers_error():
    """A grid the GPU would refuse (65,536 column splits) fails the launch, and launch_forward
    returns that error through cudaGetLastError like on the device."""
    case = make_case(1, 7, 3, "plain", seed=1)
    q, k, _ = case.inputs(torch.float32)
    problem = build_problem(
        q.detach(),
        k.detach(),
        temperature=0.1,
        positives=None,
        margin=0.0,
        margin_teacher=None,
        filter_teacher=None,
        filter_threshold=None,
        filter_normalize=False,
        key_groups=None,
        symmetric=False,
        reduction="mean",
        backend="cuda",
    )
    lib, p = emulated.library(), emulated._prepare(q.detach(), k.detach(), 10.0, problem)
    splits = 65536
    partial, lse, pos_logit = torch.zeros(3 * splits), torch.zeros(1), torch.zeros(1)
    try:
        err = lib.emu_forward(
            ctypes.c_void_p(p.args), splits, emulated._ptr(partial), emulated._ptr(lse), emulated._ptr(pos_logit)
        )
    finally:
        lib.emu_free_tile_args(ctypes.c_void_p(p.args))
    assert err != 0 and lib.emu_error_string(err) == b"invalid launch configuration"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_query_rows_whose_squares_overflow_fp32(dtype, monkeypatch):
    """Query rows of norm ~2^82 (their fp32 sums of squares overflow; keys of norm ~1, so the
    raw products stay in range): float64 sums of squares in the norm kernel, and the finish's
    radial term as (inv · radial) · (inv · x) (inv² underflows fp32). Loss and gradients against
    the float64 reference on the same rows at scale 1 (cosines do not change, dL/dq scales by
    1/s). Before: inverse norm 0, so every cosine 0 and a loss of log N."""
    plan(monkeypatch, streamed=False, chunked=True)
    case = make_case(70, 66, 40, "all", seed=3)
    scale = 2.0**80
    q = (case.query.double() * scale).to(dtype).requires_grad_(True)
    k = case.key.to(dtype).requires_grad_(True)
    q0 = (q.detach().double() / scale).requires_grad_(True)
    k0 = k.detach().double().requires_grad_(True)
    got = mmloss.contrastive_loss(q, k, temperature=case.temperature, backend="cuda", **case.kwargs)
    want = mmloss.contrastive_loss(q0, k0, temperature=case.temperature, backend="reference", **case.kwargs)
    got.backward()
    want.backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=0)
    for g, ref in ((q.grad, q0.grad / scale), (k.grad, k0.grad)):
        torch.testing.assert_close(g.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_nearly_solved_rows_keep_their_relative_accuracy_in_fp32():
    """A near-duplicate positive at τ = 0.05 (true loss ~1e-6): lse - pos_logit once cancelled
    in fp32 (0.0 or a few ulps of lse ~ 20); the kernels carry the loss relative to the
    positive's logit (log1p of the off-positive sum), so each row loss keeps fp32's relative
    accuracy, in the streamed and the split forward alike."""
    g = torch.Generator().manual_seed(0)
    key = torch.randn(70, 32, generator=g, dtype=torch.float64)
    query = key + 1e-3 * torch.randn(70, 32, generator=g, dtype=torch.float64)
    t = 0.05
    want = mmloss.contrastive_loss(query, key, temperature=t, reduction="none", backend="reference")
    assert 0 < float(want.min()) and float(want.max()) < 1e-3
    for sms in (1, 100):
        emulated.SMS, saved = sms, emulated.SMS
        try:
            got = mmloss.contrastive_loss(query.float(), key.float(), temperature=t, reduction="none", backend="cuda")
        finally:
            emulated.SMS = saved
        torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=0)
