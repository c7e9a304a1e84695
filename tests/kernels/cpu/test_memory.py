"""The cpu backend never builds the M × N matrix: its extra memory at N = 16,384 stays far
below that matrix's size (measured as the resident high-water mark of a fresh process)."""

from bench.harness import measure


def test_cpu_extra_memory_far_below_the_matrix():
    n, d = 16384, 64
    matrix_bytes = n * n * 4  # 1 GiB in fp32
    result = measure("mmloss-cpu", n, d, "fp32", repeats=1, timeout=600)
    assert "error" not in result, result
    grads = 2 * n * d * 4
    assert result["extra_bytes"] < matrix_bytes / 16, result
    assert result["scratch_bytes"] < 32 * 2**20, result  # strip tiles + BLAS buffers
    print(
        f"\nextra {result['extra_bytes'] / 2**20:.1f} MiB (grads {grads / 2**20:.1f} MiB), "
        f"M×N would be {matrix_bytes / 2**20:.0f} MiB; fwd+bwd {result['seconds']:.2f} s"
    )


_FEW_ROWS_MANY_COLUMNS = """
import json, sys, torch, mmloss
from bench.harness import reset_peak, status_bytes
torch.set_num_threads(1)  # memory is measured, not time: one thread is the quickest on a shared machine
M, N, d = 300, 2_000_000, 8
small = [torch.randn(8, d, requires_grad=True) for _ in range(2)]
mmloss.contrastive_loss(*small, backend="cpu").backward()
q, k = torch.randn(M, d, requires_grad=True), torch.randn(N, d, requires_grad=True)
baseline = reset_peak()
loss = mmloss.contrastive_loss(q, k, positives=torch.arange(M), backend="cpu")
loss.backward()
extra = status_bytes("VmHWM") - baseline
grads = (q.numel() + k.numel()) * 4
finite = bool(torch.isfinite(k.grad).all() and torch.isfinite(loss))
print(json.dumps({"scratch_bytes": extra - grads, "finite": finite}))
"""


def test_cpu_scratch_is_bounded_for_few_rows_and_many_columns():
    """M = 300, N = 2,000,000, d = 8 (strips once spanned every column: 2.1 GiB of scratch):
    column tiles keep the scratch at the budget plus what is O(N) anyway (the keys' inverse
    norms), in a fresh process with the harness's high-water mark."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17), "MMLOSS_CPU_SCRATCH_MB": "4"}
    out = subprocess.run(
        [sys.executable, "-c", _FEW_ROWS_MANY_COLUMNS], capture_output=True, text=True, timeout=600, env=env, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    inverse_norms = 2_000_000 * 4
    assert result["finite"], result
    assert result["scratch_bytes"] < inverse_norms + 16 * 2**20, result


def test_the_default_budget_gives_fp32_full_width_strips_up_to_16384_columns(monkeypatch):
    """fp32 strips span every column up to N = 16,384 by default (FP32_FULL_WIDTH_MB), bf16
    keeps the 4 MiB tiles, and a set MMLOSS_CPU_SCRATCH_MB is the budget whatever the dtype."""
    from types import SimpleNamespace

    import torch

    from mmloss.cpu import tile_shape

    plain = SimpleNamespace(adaptive_margin=False, has_filter=False)  # the fields tile_shape reads

    def shape(n, dtype):
        return tile_shape(torch.empty(n, 8, dtype=dtype), torch.empty(n, 8, dtype=dtype), plain)

    monkeypatch.delenv("MMLOSS_CPU_SCRATCH_MB", raising=False)
    assert shape(4096, torch.float32) == (256, 4096)  # 4 MiB, as before
    assert shape(16384, torch.float32) == (256, 16384)  # 16 MiB: one pass
    assert shape(32768, torch.float32) == (128, 32768)  # 16 MiB: still one pass, 128 rows
    assert shape(65536, torch.float32) == (256, 16384)  # the 16 MiB cap: column tiles
    assert shape(16384, torch.bfloat16) == (256, 4096)  # 4 MiB: column tiles
    monkeypatch.setenv("MMLOSS_CPU_SCRATCH_MB", "4")
    assert shape(16384, torch.float32) == (256, 4096)
