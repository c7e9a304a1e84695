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
from tests.cases import FEATURES, assert_kernel_matches_reference, make_case, problem_of, scaled_rows, unit_scaled

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
    chunked: the backward in 64 x 64 chunks (a tiny scratch budget)."""
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
    problem = problem_of(q, k, temperature=case.temperature, backend="cuda", **case.kwargs)
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
    the radial terms cancel in the finish). The kernels read the strided rows themselves for
    fp16; fp32 and bf16 rows reach them as the glue's scaled, contiguous copies."""
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
    problem = problem_of(q.detach(), k.detach(), temperature=0.1, backend="cuda")
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


# (rows R, columns C) of the backward's chunks: several column chunks of one row chunk (each
# key chunk finished on its own), several of both (dK summed in fp32 over row chunks, dQ over
# column chunks), and a last column chunk of a single column.
CHUNKS = [(70, 64), (64, 64), (64, 128), (128, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunks", CHUNKS, ids=str)
@pytest.mark.parametrize("features", ["all", "symmetric_all", "plain"])
def test_column_chunks_of_the_backward(features, chunks, dtype, monkeypatch):
    """The backward in R x C chunks that cross column tiles (N = 129 and 193: 3 and 4 column
    chunks of 64, the last partial) against the float64 reference at the usual bar, and against
    the one-chunk run: the same loss bits, gradients up to the fp32 sums over chunks."""
    M, N = (70, 193) if features != "symmetric_all" else (129, 129)
    case = make_case(M, N, 40, features, seed=7)
    monkeypatch.setattr(emulated.ck, "chunk_shape", lambda m, n, e: (min(m, chunks[0]), min(n, chunks[1])))
    assert_close_to_oracle(case, dtype)
    q, k, _ = case.inputs(dtype)
    tiled = _kernel_outputs(q.detach(), k.detach(), case)
    monkeypatch.setattr(emulated.ck, "chunk_shape", lambda m, n, e: (m, n))
    whole = _kernel_outputs(q.detach(), k.detach(), case)
    assert torch.equal(tiled[0], whole[0]) and torch.equal(tiled[1], whole[1])
    for a, b in zip(tiled[2:], whole[2:]):
        eps = torch.finfo(b.dtype).eps
        torch.testing.assert_close(a, b, rtol=0, atol=8 * eps * float(b.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("learn", [False, True])
def test_rows_of_huge_and_tiny_norms(dtype, learn, monkeypatch):
    """Rows of 1e30 and 1e-30 (and ordinary ones) among queries and keys, fp32 and bf16: the
    loss and gradients are the float64 reference's on the same inputs. Two rows of 1e30 have a
    raw product of 1e60 (beyond fp32) in the tiles and the GEMMs unless the glue scales them
    by a power of two (row_scale) and scales their gradients back. Before: NaN."""
    plan(monkeypatch, streamed=learn, chunked=True)
    q, k = scaled_rows(70, 130, 40, 40, [1e30, 1e-30, 1.0], [1e30, 1.0, 1e-25, 1.0])
    q, k = q.to(dtype).double(), k.to(dtype).double()  # the inputs, exactly
    ref_inputs = (q.clone().requires_grad_(), k.clone().requires_grad_())
    t64 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    want = mmloss.contrastive_loss(
        *ref_inputs, temperature=t64 if learn else 0.05, reduction="none", backend="reference"
    )
    want_grads = torch.autograd.grad(want.sum(), list(ref_inputs) + ([t64] if learn else []))
    qf, kf = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
    t32 = torch.tensor(0.05, requires_grad=True)
    got = mmloss.contrastive_loss(qf, kf, temperature=t32 if learn else 0.05, reduction="none", backend="cuda")
    grads = torch.autograd.grad(got.sum(), [qf, kf] + ([t32] if learn else []))
    assert torch.isfinite(got).all()
    tol = 2e-5 if dtype == torch.float32 else 2e-2  # bf16: H and the GEMMs' operands in bf16
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol)
    for g, w, x in zip(grads[:2], want_grads[:2], (q, k)):
        g, w = unit_scaled(g, x), unit_scaled(w, x)
        torch.testing.assert_close(g, w, rtol=0, atol=tol * float(w.abs().max()))
    if learn:
        torch.testing.assert_close(grads[2].double(), want_grads[2], rtol=tol, atol=0)


def test_power_of_two_row_scales_change_nothing(monkeypatch):
    """fp32 rows times 2^100 ... 2^-30 give the unscaled rows' loss to the last bit and their
    gradients times the inverse scales: the glue's scaling is by powers of two, and brings a
    row of norm above 2^40 to a norm in [1, 2)."""
    plan(monkeypatch, streamed=False, chunked=True)
    q, k = scaled_rows(70, 130, 40, 41, [1.0], [1.0])
    s_q = torch.tensor([2.0**100, 2.0**-30, 1.0]).repeat(24)[:70, None]
    s_k = torch.tensor([2.0**-30, 1.0, 2.0**100, 2.0**60]).repeat(33)[:130, None]
    q0, k0 = q.float() / q.float().norm(dim=1, keepdim=True), k.float() / k.float().norm(dim=1, keepdim=True)
    q0, k0 = q0 * torch.exp2(torch.rand(70, 1).mul(0.9).floor()), k0  # norms in [1, 2)
    runs = []
    for a, b in ((q0, k0), (q0 * s_q, k0 * s_k)):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = mmloss.contrastive_loss(a, b, temperature=0.05, reduction="none", backend="cuda")
        runs.append((loss,) + torch.autograd.grad(loss.sum(), [a, b]))
    (l0, dq0, dk0), (l1, dq1, dk1) = runs
    assert torch.equal(l0, l1)
    torch.testing.assert_close(dq1 * s_q, dq0, rtol=1e-6, atol=0)
    torch.testing.assert_close(dk1 * s_k, dk0, rtol=1e-6, atol=1e-6 * float(dk0.abs().max()))


def test_fp16_rows_of_norm_above_65504(monkeypatch):
    """fp16 rows whose norm exceeds fp16's range (entries ~1e4, d = 64): loss and gradients
    are the float64 reference's on the same inputs (the fp16 reference itself overflows)."""
    plan(monkeypatch, streamed=False, chunked=True)
    q, k = scaled_rows(70, 130, 64, 42, [1e4, 1.0], [2e4])
    q, k = q.clamp(-6e4, 6e4).half(), k.clamp(-6e4, 6e4).half()
    assert float(q.double().norm(dim=1).max()) > 65504 and float(k.double().norm(dim=1).min()) > 65504
    ref_inputs = (q.double().requires_grad_(), k.double().requires_grad_())
    want = mmloss.contrastive_loss(*ref_inputs, temperature=0.05, reduction="none", backend="reference")
    want_grads = torch.autograd.grad(want.sum(), ref_inputs)
    qh, kh = q.clone().requires_grad_(), k.clone().requires_grad_()
    got = mmloss.contrastive_loss(qh, kh, temperature=0.05, reduction="none", backend="cuda")
    grads = torch.autograd.grad(got.sum(), [qh, kh])
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)
    # The keys' gradients (~4e-8) are fp16 subnormals, spaced 2^-24; H and H K enter the finish
    # in fp16 (as for every fp16 input): a few fp16 ulps (2^-11) of the largest gradient.
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(
            g.double(), w, rtol=2e-3, atol=max(4 * 2.0**-24, 4 * 2.0**-11 * float(w.abs().max()))
        )
