"""The CUDA C++ backend on a CUDA device: every feature and dtype against the float64
reference (docs/contract.md §1's bar), odd shapes, the row-chunked backward, key blocks, torch.compile,
and compute-sanitizer on a small case. Skipped without CUDA or without CUDA kernels in _C."""

import functools
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mmloss.backends import unavailable_reason

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if unavailable_reason("cuda", torch.device("cuda")) is not None:
    pytest.skip(unavailable_reason("cuda", torch.device("cuda")), allow_module_level=True)

import mmloss  # noqa: E402
from tests.cases import FEATURES, assert_kernel_matches_reference, make_case, shifted_seed  # noqa: E402

pytestmark = pytest.mark.gpu
BACKEND = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


assert_close_to_oracle = functools.partial(assert_kernel_matches_reference, backend=BACKEND)


@pytest.fixture(params=["one_chunk", "chunked"])
def chunks(request, monkeypatch):
    """The backward in one scratch chunk, or in 64 x 64 chunks (a tiny scratch budget)."""
    if request.param == "chunked":
        monkeypatch.setenv("MMLOSS_CUDA_SCRATCH_MB", "0")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("features", sorted(FEATURES))
def test_every_feature_and_dtype(features, dtype):
    assert_close_to_oracle(make_case(300, 520, 256, features, seed=11, device="cuda"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,d", [(1, 1, 3), (7, 129, 100), (129, 1000, 768), (1000, 1000, 64), (65, 67, 9)])
def test_odd_shapes(M, N, d, dtype, chunks):
    assert_close_to_oracle(make_case(M, N, d, "all", seed=M + N, device="cuda"), dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("features", ["plain", "all", "symmetric_all"])
def test_reductions(reduction, features):
    assert_close_to_oracle(make_case(70, 90, 40, features, seed=5, device="cuda"), torch.bfloat16, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_of_norm_1e30_and_column_chunks(dtype, monkeypatch):
    """Rows of 1e30 among queries and keys (raw products of 1e60 unless the glue scales them)
    in a backward of 64 x 128 chunks (3 column chunks of N = 300): the float64 reference's
    loss and gradients (times the rows' norms: O(1) whatever the scale)."""
    import mmloss.cuda as cuda

    monkeypatch.setattr(cuda, "chunk_shape", lambda m, n, e: (min(m, 64), min(n, 128)))
    g = torch.Generator().manual_seed(shifted_seed(12))
    k = torch.randn(300, 64, generator=g, dtype=torch.float64)
    q = k[:100] * 1.5 + torch.randn(100, 64, generator=g, dtype=torch.float64)
    q, k = (
        q * torch.tensor([1e30, 1.0]).repeat(50)[:, None].double(),
        k * torch.tensor([1.0, 1e30, 1e-25]).repeat(100)[:, None].double(),
    )
    q, k = q.to(dtype).double().cuda(), k.to(dtype).double().cuda()
    runs = []
    for x, y, backend in ((q, k, "reference"), (q.to(dtype), k.to(dtype), BACKEND)):
        x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
        loss = mmloss.contrastive_loss(x, y, temperature=0.05, reduction="none", backend=backend)
        runs.append(
            (loss.double(),)
            + tuple(
                gr.double() * z.double().norm(dim=1, keepdim=True)
                for gr, z in zip(torch.autograd.grad(loss.sum(), [x, y]), (q, k))
            )
        )
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(runs[1], runs[0]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def test_strided_and_expanded_inputs():
    base = torch.randn(80, 130, device="cuda")
    q = base[::2, ::2]  # row stride 260, unit stride after .contiguous() of the last dim
    k_expanded = torch.randn(1, 65, device="cuda").expand(33, 65)
    groups = torch.arange(66, device="cuda")[::2]
    for key in (torch.randn(33, 65, device="cuda")[:, :], k_expanded):
        got = mmloss.contrastive_loss(
            q, key, positives=torch.arange(40, device="cuda") % 33, key_groups=groups, margin=0.1, backend=BACKEND
        )
        want = mmloss.contrastive_loss(
            q.double(),
            key.double(),
            positives=torch.arange(40, device="cuda") % 33,
            key_groups=groups,
            margin=0.1,
            backend="reference",
        )
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["query", "filter_teacher", "temperature"])
def test_nan_in_gives_nan_out(where):
    case = make_case(5, 7, 4, "all", seed=9, device="cuda")
    q, k, t = case.inputs(torch.float32)
    kwargs = dict(case.kwargs)
    if where == "query":
        q = q.detach().clone()
        q[1, 2] = float("nan")
    elif where == "temperature":
        t = torch.tensor(float("nan"), device="cuda")  # a float NaN τ is a bad argument
    else:
        rows, cols = kwargs[where]
        kwargs[where] = (torch.full_like(rows, float("nan")), cols)
    assert torch.isnan(mmloss.contrastive_loss(q, k, temperature=t, backend=BACKEND, **kwargs))


def test_large_n_matches_triton_when_available():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    q = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(20000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(4096, device="cuda")
    out = {}
    for backend in ("cuda", "triton"):
        q.grad = k.grad = None
        loss = mmloss.contrastive_loss(q, k, positives=pos, margin=0.15, backend=backend)
        loss.backward()
        out[backend] = (loss.detach().float(), q.grad.float(), k.grad.float())
    for a, b in zip(out["cuda"], out["triton"]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-4)


def test_torch_compile_traces_the_op():
    case = make_case(64, 80, 32, "all", seed=3, device="cuda")
    q, k, t = case.inputs(torch.bfloat16, learn_temperature=True)

    def loss(q, k, t):
        return mmloss.contrastive_loss(q, k, temperature=t, backend=BACKEND, **case.kwargs)

    torch.testing.assert_close(torch.compile(loss)(q, k, t), loss(q, k, t))


SANITIZED = """
import torch, mmloss
from tests.cases import make_case
case = make_case(37, 70, 24, "all", seed=1, device="cuda")
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    q, k, t = case.inputs(dtype, learn_temperature=True)
    mmloss.contrastive_loss(q, k, temperature=t, backend="cuda", **case.kwargs).backward()
torch.cuda.synchronize()
"""


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_small_case(tool):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sanitizer, f"--tool={tool}", "--error-exitcode=3", sys.executable, "-c", SANITIZED],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
