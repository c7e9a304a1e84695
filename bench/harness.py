"""One forward+backward of a contrastive loss, timed and with its peak memory, in a fresh process.

Peak memory on the CPU is the process's resident high-water mark (VmHWM): each measurement
runs in its own child process whose allocator returns large blocks to the system at once
(MALLOC_MMAP_THRESHOLD_), resets the mark once the inputs exist and a warm-up on tiny inputs
ran, runs one forward+backward, and reports the mark's growth over the resident size then.
"extra" counts everything the loss allocated beyond its inputs, the returned gradients
included; "scratch" subtracts the gradients, which every method must return.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

import mmloss

PROVIDERS = ("eager", "mmloss-cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def eager_loss(query: torch.Tensor, key: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """What users write today: the dense logits and F.cross_entropy (diagonal positives)."""
    logits = F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).T / temperature
    return F.cross_entropy(logits.float(), torch.arange(query.shape[0], device=query.device))


def loss_fn(provider: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if provider == "eager":
        return eager_loss
    backend = provider.split("-", 1)[1]
    return lambda q, k: mmloss.contrastive_loss(q, k, temperature=0.05, backend=backend)


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Resets the resident high-water mark to the current resident size, which it returns."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return status_bytes("VmRSS")


def _step(fn, q, k) -> None:
    q.grad = k.grad = None
    fn(q, k).backward()


def measure_here(provider: str, n: int, d: int, dtype: str, repeats: int) -> Dict[str, float]:
    """Runs in the child: returns seconds (median of `repeats`) and extra/scratch bytes."""
    fn = loss_fn(provider)
    torch.manual_seed(0)
    small = [torch.randn(8, d, dtype=DTYPES[dtype], requires_grad=True) for _ in range(2)]
    _step(fn, *small)  # loads kernels and thread pools before the baseline
    q = torch.randn(n, d, dtype=DTYPES[dtype], requires_grad=True)
    k = torch.randn(n, d, dtype=DTYPES[dtype], requires_grad=True)
    baseline = reset_peak()
    start = time.perf_counter()
    _step(fn, q, k)
    times = [time.perf_counter() - start]
    extra = status_bytes("VmHWM") - baseline
    for _ in range(repeats - 1):
        start = time.perf_counter()
        _step(fn, q, k)
        times.append(time.perf_counter() - start)
    grads = q.grad.numel() * q.grad.element_size() + k.grad.numel() * k.grad.element_size()
    return {"seconds": statistics.median(times), "extra_bytes": extra, "scratch_bytes": max(0, extra - grads)}


def measure(provider: str, n: int, d: int, dtype: str = "fp32", repeats: int = 3, threads: int = 2,
            timeout: float = 900) -> Dict[str, float]:
    """`measure_here` in a fresh process; {"error": text} if it fails (e.g. out of memory)."""
    cmd = [sys.executable, "-m", "bench.harness", provider, str(n), str(d), dtype, str(repeats), str(threads)]
    try:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("provider", choices=PROVIDERS)
    parser.add_argument("n", type=int)
    parser.add_argument("d", type=int)
    parser.add_argument("dtype", choices=list(DTYPES))
    parser.add_argument("repeats", type=int)
    parser.add_argument("threads", type=int)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(measure_here(args.provider, args.n, args.d, args.dtype, args.repeats)))


if __name__ == "__main__":
    _child()
