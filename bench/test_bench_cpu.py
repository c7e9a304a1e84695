"""pytest-benchmark suite: `python -m pytest bench/test_bench_cpu.py --benchmark-only`.

Forward+backward of InfoNCE on the CPU, fp32, in this process (memory is measured by
`python -m bench`, which isolates each run in its own process)."""

import pytest
import torch

from bench.harness import loss_fn


@pytest.mark.parametrize("provider", ["eager", "mmloss-cpu"])
@pytest.mark.parametrize("d", [256, 768])
@pytest.mark.parametrize("n", [1024, 4096])
def test_forward_backward(benchmark, provider, n, d):
    torch.manual_seed(0)
    q = torch.randn(n, d, requires_grad=True)
    k = torch.randn(n, d, requires_grad=True)
    fn = loss_fn(provider)

    def step():
        q.grad = k.grad = None
        fn(q, k).backward()

    benchmark.group = f"N={n} d={d}"
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
