"""The Triton backend on a CUDA device: every feature and dtype against the float64
reference (docs/contract.md §1's bar), large N, row-chunked backward, key blocks, CUDA-graph capture.
Skipped without CUDA (the interpreter suite covers the logic on CPU)."""

import pytest
import torch

if not torch.cuda.is_available():  # checked before importing triton (see test_triton_interpreter)
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

import dataclasses  # noqa: E402
import functools  # noqa: E402

import mmloss  # noqa: E402
import mmloss.triton as tk  # noqa: E402
from mmloss.checks import build_problem  # noqa: E402
from tests.cases import FEATURES, assert_kernel_matches_reference, loss_and_grads, make_case, problem_of  # noqa: E402

pytestmark = pytest.mark.gpu
BACKEND = "triton"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["small", "chunked"])
def path(request, monkeypatch):
    """Both designs: the small-batch path and the chunked one (SMALL_MAX = 0 sends these
    sizes there)."""
    if request.param == "chunked":
        monkeypatch.setattr(tk.ops, "SMALL_MAX", 0)
    return request.param


assert_close_to_oracle = functools.partial(assert_kernel_matches_reference, backend=BACKEND)


# Each feature set x dtype class is a separate compiled variant: bf16 covers every feature,
# fp32 and fp16 the plain and the heaviest sets, docs/contract.md §3's included (set
# MMLOSS_TRITON_AUTOTUNE=0 to compile one config per variant instead of the whole autotune list).
@pytest.mark.parametrize("features", sorted(FEATURES))
def test_every_feature_bf16(features):
    assert_close_to_oracle(make_case(300, 520, 256, features, seed=11, device="cuda"), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("features", ["plain", "all", "symmetric_all", "hardness_own", "multi_positive_all"])
def test_dtypes(features, dtype, path):
    assert_close_to_oracle(make_case(300, 520, 256, features, seed=12, device="cuda"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,d", [(1, 1, 3), (7, 129, 100), (129, 1000, 768), (1000, 1000, 64)])
def test_odd_shapes(M, N, d, dtype, path):
    assert_close_to_oracle(make_case(M, N, d, "all", seed=M + N, device="cuda"), dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction):
    assert_close_to_oracle(make_case(200, 300, 128, "all", seed=12, device="cuda"), torch.bfloat16, reduction)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_large_n(dtype):
    """Many column tiles per row block (N = 131,072): the online LSE over hundreds of tiles."""
    assert_close_to_oracle(make_case(64, 131072, 256, "positives", seed=13, device="cuda"), dtype)


@pytest.mark.slow
def test_row_chunked_backward(monkeypatch):
    """A 1 MiB scratch budget forces 128-row chunks and the fp32 d_key accumulator."""
    monkeypatch.setenv("MMLOSS_TRITON_SCRATCH_MB", "1")
    assert tk.ops.chunk_shape(2000, 4096, 2)[0] < 2000
    assert_close_to_oracle(make_case(2000, 4096, 256, "all", seed=14, device="cuda"), torch.bfloat16)


def test_teacher_classes_agree():
    """fp32 teachers (class teacher32) and bf16 teachers (class feat16) both run and agree."""
    case = make_case(256, 512, 256, "all", seed=15, device="cuda")
    loss32, _ = loss_and_grads(case, BACKEND, torch.bfloat16, teacher_dtype=torch.float32)
    loss16, _ = loss_and_grads(case, BACKEND, torch.bfloat16, teacher_dtype=torch.bfloat16)
    assert abs(float(loss32) - float(loss16)) < 5e-2


@pytest.mark.parametrize("symmetric", [False, True])
def test_cuda_graph_capture(path, symmetric):
    """After warm-up calls (autotuning), forward + backward capture into a CUDA graph."""
    case = make_case(512, 512, 256, "margin", seed=16, device="cuda")
    q = case.query.to(torch.bfloat16).requires_grad_(True)
    k = case.key.to(torch.bfloat16).requires_grad_(True)

    def grads():
        loss = mmloss.contrastive_loss(q, k, temperature=0.05, margin=0.15, symmetric=symmetric, backend=BACKEND)
        return torch.autograd.grad(loss, (q, k))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            want = grads()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = grads()
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)  # atomics: equal up to summation order


def test_key_blocks_combine_by_logsumexp():
    """Two key blocks (fp32): block lse's combine by logsumexp into the whole's, and the
    backward with the global lse gives the whole's gradients block by block."""
    case = make_case(300, 700, 256, "all", seed=17, device="cuda")
    q, k = case.query.float(), case.key.float()
    kw = {n: (tuple(x.float() for x in v) if n.endswith("teacher") else v) for n, v in case.kwargs.items()}
    whole = build_problem(
        q,
        k,
        positives=kw["positives"],
        temperature=0.05,
        margin=kw["margin"],
        margin_teacher=kw["margin_teacher"],
        filter_teacher=kw["filter_teacher"],
        filter_threshold=kw["filter_threshold"],
        filter_normalize=kw["filter_normalize"],
        key_groups=kw["key_groups"],
        symmetric=False,
        reduction="mean",
        backend=BACKEND,
    )

    def block(lo, hi):
        cut = lambda x: None if x is None else x[lo:hi]  # noqa: E731
        return dataclasses.replace(
            whole,
            positives=whole.positives - lo,
            margin_key=cut(whole.margin_key),
            filter_key=cut(whole.filter_key),
            key_groups=cut(whole.key_groups),
        ), k[lo:hi]

    lse, pos = tk.forward(q, k, 20.0, whole)
    parts = [block(0, 450), block(450, 700)]
    outs = [tk.forward(q, kb, 20.0, p) for p, kb in parts]
    torch.testing.assert_close(torch.logsumexp(torch.stack([o[0] for o in outs]), 0), lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(outs[0][1] + outs[1][1], pos, rtol=1e-6, atol=1e-5)
    ramp = torch.linspace(0.5, 1.5, 300, device="cuda")
    weight = torch.where(whole.valid_rows, ramp, torch.zeros_like(ramp))
    dq, dk, dt = tk.backward(q, k, 20.0, whole, lse, weight, True)
    grads = [tk.backward(q, kb, 20.0, p, lse, weight, True) for p, kb in parts]
    torch.testing.assert_close(grads[0][0] + grads[1][0], dq, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([grads[0][1], grads[1][1]]), dk, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[0][2] + grads[1][2], dt, rtol=1e-4, atol=1e-5)


def _gpu_work(fn):
    """Names of the kernels, memsets and copies `fn` puts on the GPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("n", [64, 1024])
def test_small_batch_launches(n):
    """N = 64 ... 1,024 (float tau): the forward is one kernel, the backward two."""
    case = make_case(n, n, 768, "plain", seed=18, device="cuda")
    q, k = case.query.to(torch.bfloat16), case.key.to(torch.bfloat16)
    problem = problem_of(q, k, temperature=0.05, backend=BACKEND)
    weight = torch.full((n,), 1.0 / n, device="cuda")
    lse, _ = tk.forward(q, k, 20.0, problem)
    tk.backward(q, k, 20.0, problem, lse, weight, True)  # compile outside the profile
    assert _gpu_work(lambda: tk.forward(q, k, 20.0, problem)) == ["forward_kernel"]
    assert _gpu_work(lambda: tk.backward(q, k, 20.0, problem, lse, weight, True)) == [
        "grad_tile_kernel",
        "grad_gemm_kernel",
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_symmetric_tiny_learnable_temperature(dtype, path):
    """tau = 1e-3 (learnable) in one pass: the compare-and-swap column merge on the device
    gives the reference's finite loss (the old shift by 1/tau gave -inf)."""
    case = make_case(256, 256, 64, "symmetric", seed=30, device="cuda")
    case = type(case)(case.query, case.key, 1e-3, case.kwargs)
    assert_close_to_oracle(case, dtype, learn_temperature=True)


def test_fp32_rows_of_huge_and_tiny_norms(path):
    """fp32 rows of 1e30 / 1e-30 (exact fp32 dots, scaled rows): the float64 reference's loss."""
    g = torch.Generator().manual_seed(31)
    q = torch.randn(300, 64, generator=g, dtype=torch.float64)
    k = torch.randn(300, 64, generator=g, dtype=torch.float64)
    q = (q + 1.5 * k) * torch.tensor([1e30, 1e-30, 1.0], dtype=torch.float64).repeat(100)[:, None]
    k = k * torch.tensor([1.0, 1e30], dtype=torch.float64).repeat(150)[:, None]
    want = mmloss.contrastive_loss(q, k, reduction="none", backend="reference")
    got = mmloss.contrastive_loss(q.float().cuda(), k.float().cuda(), reduction="none", backend=BACKEND)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)
