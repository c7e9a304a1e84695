"""The helpers every kernel backend shares: scratch budgets from their environment variables,
rows within a budget, 1/τ as an op argument, the fp16 scratch scale."""

import pytest
import torch

from mmloss import kernel_common as kc
from mmloss.constants import NORM_EPS


def test_scratch_budget_defaults_and_environment(monkeypatch):
    for backend in ("cpu", "cuda", "triton"):
        monkeypatch.delenv(kc.scratch_env(backend), raising=False)
    assert kc.scratch_bytes("cpu") == 4 << 20
    assert kc.scratch_bytes("cuda") == kc.scratch_bytes("triton") == 1 << 30
    monkeypatch.setenv("MMLOSS_CPU_SCRATCH_MB", "0.5")
    assert kc.scratch_bytes("cpu") == 1 << 19
    monkeypatch.setenv("MMLOSS_CUDA_SCRATCH_MB", "lots")
    with pytest.raises(ValueError, match="MMLOSS_CUDA_SCRATCH_MB must be a number of MiB, got 'lots'"):
        kc.scratch_bytes("cuda")
    monkeypatch.setenv("MMLOSS_TRITON_SCRATCH_MB", "-1")
    with pytest.raises(ValueError, match="MMLOSS_TRITON_SCRATCH_MB must be >= 0"):
        kc.scratch_bytes("triton")


def test_rows_within():
    assert kc.rows_within(1000, 10) == 100
    assert kc.rows_within(1000, 10, total=50) == 50  # all rows fit
    assert kc.rows_within(1000, 10, total=500, multiple=64) == 64  # whole multiples
    assert kc.rows_within(0, 10, minimum=256) == 256  # at least the minimum
    assert kc.rows_within(0, 10, minimum=64, total=5) == 5  # never more than all rows
    assert kc.rows_within(1000, 0) == 1000  # empty rows: one byte each


def test_inv_temp_tensor():
    t = kc.inv_temp_tensor(20.0, torch.device("cpu"))
    assert t.shape == (1,) and t.dtype == torch.float64 and float(t) == 20.0
    learnable = torch.tensor(0.5, requires_grad=True)
    t = kc.inv_temp_tensor(1 / learnable, torch.device("cpu"))
    assert not t.requires_grad and t.dtype == torch.float64 and float(t) == 2.0


def test_fp16_scale_leaves_degenerate_rows_out():
    inv_q = torch.tensor([2.0, 1.0 / NORM_EPS])  # the second row has norm <= eps
    inv_k = torch.tensor([3.0, 0.5])
    scale = kc.fp16_scratch_scale(torch.tensor(0.25), inv_q, inv_k, torch.tensor([-20.0]))
    torch.testing.assert_close(scale, torch.tensor([0.25 * 2.0 * 3.0 * 20.0]))
    assert float(kc.fp16_scratch_scale(torch.tensor(0.0), inv_q, inv_k, 20.0)) == float(torch.tensor(1e-30))
