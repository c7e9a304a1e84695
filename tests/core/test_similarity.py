"""mmloss.similarity and mmloss.topk_similarity against dense torch (F.normalize, mm, a stable sort).

The "cpu" backend is mmloss._C; the "triton" backend runs on CPU tensors in the Triton
interpreter (TRITON_INTERPRET=1, as the CI command sets it) at small sizes, or on CUDA.
Ties are built from exactly representable scores (small integers, normalize=False, or
repeated unit rows) so that both sides see equal numbers.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import mmloss
from mmloss.backends import unavailable_reason
from mmloss.similarity_ops import _decode_keys, _score_keys
from tests.cases import shifted_seed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_param():
    reason = unavailable_reason("triton", torch.device(DEVICE))
    if reason is None and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        reason = "TRITON_INTERPRET=1 is not set"
    marks = [pytest.mark.skip(reason=f"triton: {reason}")] if reason else []
    return pytest.param("triton", DEVICE, marks=marks, id="triton")


def _cpu_param():
    reason = unavailable_reason("cpu", torch.device("cpu"))
    marks = [pytest.mark.skip(reason=f"cpu: {reason}")] if reason else []
    return pytest.param("cpu", "cpu", marks=marks, id="cpu")


BACKENDS = [_cpu_param(), _triton_param()]


def dense(a, b, normalize=True):
    """float64 reference matrix."""
    a, b = a.double(), b.double()
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return a @ b.T


def reference_topk(scores, k_top):
    """torch's answer with the documented tie rule: stable descending sort (lower index first)."""
    values, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k_top], order[:, :k_top]


def tolerance(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


def inputs(M, N, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(shifted_seed(seed))
    return (torch.randn(M, d, generator=g).to(device, dtype), torch.randn(N, d, generator=g).to(device, dtype))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("M,N,d", [(1, 1, 3), (37, 53, 19), (67, 131, 70)])
@pytest.mark.parametrize("normalize", [True, False])
def test_similarity_matches_dense(backend, device, dtype, M, N, d, normalize):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only")
    a, b = inputs(M, N, d, dtype, device)
    got = mmloss.similarity(a, b, normalize=normalize, backend=backend)
    assert got.dtype == dtype and got.shape == (M, N)
    want = dense(a, b, normalize)
    scale = 1.0 if normalize else float(want.abs().max())
    # 16-bit outputs: the error is the output's rounding (products are exact or fp32).
    torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=tolerance(dtype), atol=tolerance(dtype) * scale)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_similarity_out_dtype_accumulates_in_fp32(backend, device, out_dtype):
    a, b = inputs(29, 41, 130, torch.bfloat16, device)
    got = mmloss.similarity(a, b, out_dtype=out_dtype, backend=backend)
    assert got.dtype == out_dtype
    want = dense(a, b).to(out_dtype)  # exact products of the bf16 inputs, rounded once
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=1e-5 if out_dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_similarity_zero_rows_give_zero(backend, device):
    a, b = inputs(5, 7, 8, torch.float32, device)
    a[2] = 0
    got = mmloss.similarity(a, b, backend=backend)
    assert torch.all(got[2] == 0) and torch.isfinite(got).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "M,N,k_top,block", [(1, 1, 1, 64), (13, 97, 5, 64), (31, 131, 131, 64), (7, 257, 10, 100), (61, 127, 1, 64)]
)
def test_topk_matches_dense(backend, device, dtype, M, N, k_top, block):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only")
    q, k = inputs(M, N, 23, dtype, device, seed=M + N)
    scores, idx = mmloss.topk_similarity(q, k, k_top, block=block, backend=backend)
    assert scores.shape == idx.shape == (M, k_top) and idx.dtype == torch.int64
    assert scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want_scores, want_idx = reference_topk(dense(q, k), k_top)
    torch.testing.assert_close(scores.double().cpu(), want_scores, rtol=0, atol=tolerance(dtype))
    # Indices may differ only between scores closer than the rounding: compare the scores they point to.
    picked = dense(q, k).gather(1, idx.cpu())
    torch.testing.assert_close(picked, want_scores, rtol=0, atol=2 * tolerance(dtype))
    assert (idx.cpu() == want_idx).float().mean() > 0.95


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_topk_ties_go_to_the_lower_index(backend, device, normalize):
    g = torch.Generator().manual_seed(shifted_seed(3))
    # Integer rows (exact dot products); normalised: signed unit rows ±e_j, whose cosines ±q_j/‖q‖
    # every backend computes alike, so mathematically equal scores are equal numbers.
    base = (
        torch.randint(-2, 3, (6, 4), generator=g).float()
        if not normalize
        else torch.cat([torch.eye(4), -torch.eye(4)[:2]])
    )
    base[base.abs().sum(1) == 0, 0] = 1
    k = base[torch.randint(0, 6, (150,), generator=g)]  # 150 candidates, 6 distinct: many ties
    q = torch.randint(-2, 3, (9, 4), generator=g).float()
    q[3] = 0  # every score 0: the first k_top columns
    scores, idx = mmloss.topk_similarity(q.to(device), k.to(device), 17, normalize=normalize, block=64, backend=backend)
    want_scores, want_idx = reference_topk(dense(q, k, normalize), 17)
    assert torch.equal(idx.cpu(), want_idx)
    torch.testing.assert_close(scores.double().cpu(), want_scores, rtol=0, atol=1e-6)
    assert torch.equal(idx[3].cpu(), torch.arange(17))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_topk_zero_and_negative_scores(backend, device):
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [-0.5, 0.5], [0.0, -1.0], [-2.0, 1.0]])
    scores, idx = mmloss.topk_similarity(q.to(device), k.to(device), 5, normalize=False, block=64, backend=backend)
    assert idx.cpu().tolist() == [[1, 3, 2, 0, 4]]
    assert scores.cpu().tolist() == [[0.0, 0.0, -0.5, -1.0, -2.0]]


def test_score_keys_order_and_round_trip():
    """The Triton path's keys: total order on (score, -column), -0.0 equal to +0.0, exact decode."""
    values = torch.tensor([[float("-inf"), -1.5, -0.0, 0.0, 1e-30, 2.0, float("inf"), 0.0]])
    keys = _score_keys(values, 10)
    order = keys.argsort(dim=1, descending=True)[0].tolist()
    assert order == [6, 5, 4, 2, 3, 7, 1, 0]
    scores, cols = _decode_keys(keys)
    assert torch.equal(cols, torch.arange(10, 18)[None])
    assert torch.equal(scores, torch.where(values == 0, 0.0, values))
    assert not torch.signbit(scores[0, 2])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_topk_equal_across_block_sizes(backend, device):
    q, k = inputs(11, 300, 16, torch.float32, device)
    results = [mmloss.topk_similarity(q, k, 7, block=b, backend=backend) for b in (64, 100, 300, 1000)]
    for scores, idx in results[1:]:
        assert torch.equal(idx, results[0][1])
        torch.testing.assert_close(scores, results[0][0], rtol=0, atol=1e-6)


def test_auto_backend_and_export():
    q, k = inputs(4, 9, 5, torch.float32, "cpu")
    scores, idx = mmloss.topk_similarity(q, k, 3)
    want, want_idx = reference_topk(dense(q, k), 3)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(scores.double(), want, rtol=0, atol=1e-6)
    assert "similarity" in mmloss.__all__ and "topk_similarity" in mmloss.__all__


def test_no_autograd_history():
    a = torch.randn(3, 4, requires_grad=True)
    assert not mmloss.similarity(a, a.detach()).requires_grad
    assert not mmloss.topk_similarity(a, a.detach(), 2)[0].requires_grad


BAD_CALLS = [
    (lambda q, k: mmloss.topk_similarity(q, k, 10), ValueError, "k_top=10 exceeds"),
    (lambda q, k: mmloss.topk_similarity(q, k, 0), ValueError, "k_top"),
    (lambda q, k: mmloss.topk_similarity(q, k, 2.0), TypeError, "k_top"),
    (lambda q, k: mmloss.topk_similarity(q, k, True), TypeError, "k_top"),
    (lambda q, k: mmloss.topk_similarity(q, k, 2, block=0), ValueError, "block"),
    (lambda q, k: mmloss.topk_similarity(q.numpy(), k, 2), TypeError, "q must be a torch.Tensor"),
    (lambda q, k: mmloss.topk_similarity(q, k[:, :3], 2), ValueError, "k width"),
    (lambda q, k: mmloss.topk_similarity(q, k.double(), 2), TypeError, "k dtype"),
    (lambda q, k: mmloss.topk_similarity(q[0], k, 2), ValueError, "q must be 2-D"),
    (lambda q, k: mmloss.topk_similarity(q, k[:0], 1), ValueError, "k is empty"),
    (lambda q, k: mmloss.topk_similarity(q.long(), k.long(), 1), TypeError, "q dtype"),
    (lambda q, k: mmloss.topk_similarity(q, k, 1, normalize=1), TypeError, "normalize"),
    (lambda q, k: mmloss.topk_similarity(q, k, 1, backend="gpu"), ValueError, "backend"),
    (lambda q, k: mmloss.similarity(q, k, out_dtype=torch.int32), TypeError, "out_dtype"),
    (lambda q, k: mmloss.similarity(q, k[:, :2]), ValueError, "b width"),
    (lambda q, k: mmloss.similarity(q, "k"), TypeError, "b must be a torch.Tensor"),
]


@pytest.mark.parametrize("call,error,message", BAD_CALLS)
def test_bad_inputs_name_the_argument(call, error, message):
    q, k = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(error, match=message):
        call(q, k)


def test_named_backend_that_cannot_run_raises():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs triton on CPU tensors")
    with pytest.raises(RuntimeError, match="triton"):
        mmloss.similarity(torch.randn(2, 3), torch.randn(2, 3), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_large_candidate_set():
    q, k = inputs(300, 50_000, 256, torch.bfloat16, "cuda")
    scores, idx = mmloss.topk_similarity(q, k, 10, block=8192)
    want, _ = reference_topk(dense(q, k), 10)
    torch.testing.assert_close(scores.double(), want, rtol=0, atol=1e-2)
