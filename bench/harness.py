"""One forward+backward of a contrastive loss, timed and with its peak memory, in a fresh process.

Peak memory on the CPU is the process's resident high-water mark (VmHWM): each measurement
runs in its own child process whose allocator returns large blocks to the system at once
(MALLOC_MMAP_THRESHOLD_), resets the mark once the inputs exist and a warm-up on tiny inputs
ran, runs one forward+backward, and reports the mark's growth over the resident size then.
"extra" counts everything the loss allocated beyond its inputs, the returned gradients
included; "scratch" subtracts the gradients, which every method must return.

Providers: eager (dense logits, bench.anchors.eager_loss), mmloss-cpu (the compiled backend),
cce (cut-cross-entropy's torch_compile path, which materialises the logits) and floor (the
three GEMMs of N × N × d that any exact method does, S = QKᵀ, S K, Sᵀ Q, in the inputs'
dtype, no loss). Inputs: standard normal keys, queries = keys + standard normal noise (a
peaked softmax, as in training). Up to ERROR_MAX_N the child also reports the loss's relative
error against the float64 reference on the same (rounded) inputs.
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

import mmloss
from bench.anchors import cce_loss, eager_loss

PROVIDERS = ("floor", "eager", "mmloss-cpu", "cce")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE = 0.05
ERROR_MAX_N = 4096  # the float64 reference is dense: N × N doubles


def loss_fn(provider: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if provider == "eager":
        return lambda q, k: eager_loss(q, k, TEMPERATURE, upcast=True)
    if provider == "cce":
        return lambda q, k: cce_loss(q, k, TEMPERATURE, impl="torch_compile")
    backend = provider.split("-", 1)[1]
    return lambda q, k: mmloss.contrastive_loss(q, k, temperature=TEMPERATURE, backend=backend)


def floor_step(q: torch.Tensor, k: torch.Tensor) -> None:
    """The three GEMMs of a forward+backward (S = QKᵀ, dQ-like S K, dK-like Sᵀ Q), no loss."""
    with torch.no_grad():
        s = q @ k.T
        s @ k
        s.T @ q


def loss_error(provider: str, q: torch.Tensor, k: torch.Tensor) -> float:
    """|loss − loss₆₄| / loss₆₄ on the same inputs, loss₆₄ by the float64 reference."""
    with torch.no_grad():
        got = float(loss_fn(provider)(q, k))
        want = float(mmloss.contrastive_loss(q.double(), k.double(), temperature=TEMPERATURE, backend="reference"))
    return abs(got - want) / abs(want)


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


def _step(provider: str, fn, q, k) -> None:
    if provider == "floor":
        floor_step(q, k)
        return
    q.grad = k.grad = None
    fn(q, k).backward()


def measure_here(provider: str, n: int, d: int, dtype: str, repeats: int) -> Dict[str, float]:
    """Runs in the child: returns seconds (median of `repeats`), the process's CPU seconds
    (all threads; median), extra/scratch bytes and, up to ERROR_MAX_N, the loss's relative
    error against float64 (NaN for the floor)."""
    fn = None if provider == "floor" else loss_fn(provider)
    torch.manual_seed(0)
    small = [torch.randn(8, d, dtype=DTYPES[dtype], requires_grad=True) for _ in range(2)]
    _step(provider, fn, *small)  # loads kernels and thread pools (and compiles) before the baseline
    k = torch.randn(n, d)
    q = (k + torch.randn(n, d)).to(DTYPES[dtype]).requires_grad_(True)  # cos ≈ 0.7 with its positive
    k = k.to(DTYPES[dtype]).requires_grad_(True)
    baseline = reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    _step(provider, fn, q, k)
    times, cpu_times = [time.perf_counter() - start], [time.process_time() - cpu]
    extra = status_bytes("VmHWM") - baseline
    for _ in range(repeats - 1):
        start, cpu = time.perf_counter(), time.process_time()
        _step(provider, fn, q, k)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    grads = 0 if provider == "floor" else 2 * q.numel() * q.element_size()
    error = loss_error(provider, q, k) if provider != "floor" and n <= ERROR_MAX_N else float("nan")
    return {
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu_times),
        "extra_bytes": extra,
        "scratch_bytes": max(0, extra - grads),
        "loss_error": error,
    }


def measure(
    provider: str, n: int, d: int, dtype: str = "fp32", repeats: int = 3, threads: int = 2, timeout: float = 900
) -> Dict[str, float]:
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
