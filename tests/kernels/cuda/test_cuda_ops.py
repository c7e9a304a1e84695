"""The CUDA backend's plumbing without a GPU: the torch.library ops it implements
(contrastive_forward / contrastive_backward; opcheck and fakes in
tests/kernels/cpu/test_cpu_ops.py) traced by torch.compile through their CPU implementation
(the same schema), the backend module's argument errors, and `auto`'s committed table, which
must never pick cuda without a committed GPU run that passed the CUDA suite."""

import json

import pytest
import torch

from mmloss import (
    backends,
    library,  # noqa: F401  (registers the fakes)
)
from tests.cases import make_case, problem_of


def _op_args(case, dtype=torch.float64):
    q, k, _ = case.inputs(dtype)
    q, k = q.detach(), k.detach()
    problem = problem_of(q, k, temperature=case.temperature, backend="cpu", **case.kwargs)
    inv_temp = torch.tensor([1.0 / case.temperature], dtype=torch.float64)
    return q, k, inv_temp, problem.kernel_args(), problem


def test_ops_match_the_cpu_backend_and_trace_under_torch_compile():
    case = make_case(10, 13, 7, "all", seed=8)
    q, k, inv_temp, rest, problem = _op_args(case)

    def loss_terms(q, k, inv_temp):
        lse, pos = torch.ops.mmloss.contrastive_forward(q, k, inv_temp, *rest, 3, 0)
        weight = problem.valid_rows.double()
        dq, dk, dt = torch.ops.mmloss.contrastive_backward(q, k, inv_temp, *rest, lse, weight, True, 3, 0)
        return lse, pos, dq, dk, dt

    eager = loss_terms(q, k, inv_temp)
    compiled = torch.compile(loss_terms, fullgraph=True, backend="aot_eager")(q, k, inv_temp)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    import mmloss.cpu

    lse, pos = mmloss.cpu.forward(q, k, 1.0 / case.temperature, problem)
    torch.testing.assert_close(eager[0], lse)
    torch.testing.assert_close(eager[1], pos)


def test_cuda_backend_rejects_what_it_cannot_serve():
    import mmloss.cuda as cuda

    case = make_case(3, 4, 2, "plain", seed=2)
    q, k, _, _, problem = _op_args(case)
    with pytest.raises(TypeError, match="query dtype torch.float64"):
        cuda.check(q, problem)
    with pytest.raises(ValueError, match="query is on cpu"):
        cuda.check(q.float(), problem)


def test_chunk_shape_is_within_budget_and_whole_tiles(monkeypatch):
    import mmloss.cuda as cuda

    monkeypatch.setenv("MMLOSS_CUDA_SCRATCH_MB", "1")
    assert cuda.chunk_shape(100, 10, 2) == (100, 10)  # fits: one chunk
    # Whole rows while at least a square's side of them fit (704 of 2^19 elements) ...
    assert cuda.chunk_shape(2000, 600, 2) == (832, 600)  # 1 MiB / 1,200 B = 873 rows
    # ... else a square-ish chunk: 128 whole rows of 4,096 would give Hᵀ Q_R an inner size of 128.
    assert cuda.chunk_shape(100_000, 4096, 2) == (704, 704)
    assert cuda.chunk_shape(100_000, 1 << 20, 2) == (704, 704)  # whole rows: 64 x 2^20 = 128 MiB
    assert cuda.chunk_shape(300, 1 << 20, 2) == (300, 1728)  # all rows, 1 MiB / 600 B columns
    monkeypatch.setenv("MMLOSS_CUDA_SCRATCH_MB", "0")
    assert cuda.chunk_shape(130, 130, 4) == (64, 64)  # at least one tile
    assert cuda.chunk_shape(7, 1, 4) == (7, 1)


@pytest.mark.parametrize("M,N", [(300, 2_000_000), (256, 30_000_000), (10**6, 10**6), (1, 10**9), (10**9, 1)])
@pytest.mark.parametrize("element_size", [2, 4])
@pytest.mark.parametrize("budget_mb", [None, "4", "1024"])
def test_backward_scratch_stays_within_the_budget(M, N, element_size, budget_mb, monkeypatch):
    """The backward's R x C scratch (what contrastive_cuda.cpp allocates from chunk_shape) is
    within MMLOSS_CUDA_SCRATCH_MB for every M and N, in whole column tiles but the last, and
    the chunks stay GEMM-sized (both sides at least min(M or N, 1024) at the default budget).
    Before: R x N with R >= 64, e.g. 64 x 3e7 x 2 bytes = 3.8 GB at M = 256, N = 3e7."""
    import mmloss.cuda as cuda
    from mmloss.kernel_common import scratch_bytes

    if budget_mb is None:
        monkeypatch.delenv("MMLOSS_CUDA_SCRATCH_MB", raising=False)
    else:
        monkeypatch.setenv("MMLOSS_CUDA_SCRATCH_MB", budget_mb)
    R, C = cuda.chunk_shape(M, N, element_size)
    assert 1 <= R <= M and 1 <= C <= N
    assert R * C * element_size <= scratch_bytes("cuda")
    assert C == N or C % cuda.TILE == 0
    assert R == M or R % cuda.TILE == 0
    if budget_mb is None:
        assert R >= min(M, 1024) and C >= min(N, 1024)


def test_committed_table_never_picks_cuda_without_a_passing_gpu_run():
    table = backends.auto_table()
    if not backends.cuda_proven(table):
        assert table["cuda_faster"] == [], "cuda ranges without a committed passing GPU run"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in (1, 64, 4096, 1 << 20):
            choice = backends.auto_cuda_choice(dtype, n, table)
            assert choice == "triton" or backends.cuda_proven(table)


def test_table_rules(tmp_path):
    faster = [{"dtype": "bf16", "min_n": 1, "max_n": 4096}]
    unproven = {"gpu_run": {"device": "H100", "cuda_tests": "failed"}, "cuda_faster": faster}
    proven = {"gpu_run": {"device": "H100", "cuda_tests": "passed"}, "cuda_faster": faster}
    assert backends.auto_cuda_choice(torch.bfloat16, 1024, unproven) == "triton"
    assert backends.auto_cuda_choice(torch.bfloat16, 1024, {"gpu_run": None, "cuda_faster": faster}) == "triton"
    assert backends.auto_cuda_choice(torch.bfloat16, 1024, proven) == "cuda"
    assert backends.auto_cuda_choice(torch.bfloat16, 8192, proven) == "triton"
    assert backends.auto_cuda_choice(torch.float16, 1024, proven) == "triton"
    assert backends.auto_cuda_choice(torch.bfloat16, None, proven) == "triton"
    path = tmp_path / "t.json"
    path.write_text(json.dumps(proven))
    assert backends.auto_table(path) == proven
