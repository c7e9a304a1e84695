"""Helpers every kernel backend shares (cpu, cuda, triton, the similarity ops): scratch budgets
and their environment variables, the dtypes the GPU kernels serve, the Triton interpreter
switch, 1/τ as an op argument, and the fp16 scratch scale. Imports only torch and constants.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from mmloss.constants import NORM_EPS

GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Embedding dtypes of the GPU kernels (Triton, CUDA); float64 runs on the CPU or the reference."""

DEFAULT_SCRATCH_MB = {"cpu": 4.0, "cuda": 1024.0, "triton": 1024.0}
"""Default scratch budget per backend in MiB: the CPU's strip tiles, the GPU backwards' R x C
scratch. `MMLOSS_<BACKEND>_SCRATCH_MB` overrides it (read at each call)."""


def scratch_env(backend: str) -> str:
    """The environment variable of a backend's scratch budget, e.g. MMLOSS_CPU_SCRATCH_MB."""
    return f"MMLOSS_{backend.upper()}_SCRATCH_MB"


def scratch_bytes(backend: str) -> int:
    """The scratch budget of `backend` ("cpu", "cuda", "triton") in bytes."""
    name = scratch_env(backend)
    value = os.environ.get(name)
    if value is None:
        return int(DEFAULT_SCRATCH_MB[backend] * 2**20)
    try:
        mib = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of MiB, got {value!r}") from None
    if not mib >= 0:
        raise ValueError(f"{name} must be >= 0 MiB, got {value!r}")
    return int(mib * 2**20)


def rows_within(
    budget: int, row_bytes: int, *, minimum: int = 1, multiple: int = 1, total: Optional[int] = None
) -> int:
    """Rows of `row_bytes` each that fit in `budget` bytes, rounded down to a `multiple` and at
    least `minimum`; all `total` rows (and never more) when they fit."""
    fit = budget // max(1, row_bytes)
    if total is not None and fit >= total:
        return total
    rows = max(minimum, fit // multiple * multiple)
    return rows if total is None else min(rows, max(total, 1))


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in the interpreter on CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_gpu_dtype(query: torch.Tensor, backend: str) -> None:
    """TypeError naming query's dtype when the GPU kernels of `backend` cannot serve it."""
    if query.dtype not in GPU_DTYPES:
        raise TypeError(
            f"query dtype {query.dtype} is not supported by backend {backend!r} "
            "(float32, bfloat16, float16); use backend='reference' or 'cpu' for float64"
        )


def inv_temp_tensor(inv_temp: Union[float, torch.Tensor], device: torch.device) -> torch.Tensor:
    """1/τ as the ops take it: a 1-element float64 tensor on `device` (a tensor τ is detached
    and stays on the device: no host sync)."""
    if isinstance(inv_temp, torch.Tensor):
        return inv_temp.detach().to(device=device, dtype=torch.float64).reshape(1)
    return torch.full((1,), float(inv_temp), dtype=torch.float64, device=device)


def regular_max(inv_norm: torch.Tensor) -> torch.Tensor:
    """max of the inverse norms of rows with ‖x‖ > ε (0-dim): a degenerate row's 1/ε left out."""
    return torch.where(inv_norm < 1.0 / NORM_EPS, inv_norm, torch.zeros_like(inv_norm)).amax()


def fp16_scratch_scale(
    weight_max: torch.Tensor, inv_norm_q: torch.Tensor, inv_norm_k: torch.Tensor, inv_temp: Union[float, torch.Tensor]
) -> torch.Tensor:
    """The fp16 backward scratch's scale g = max|w| max(a) max(b) / τ (1-element tensor), so
    that |H| = |G| a b / g <= |f'| fits fp16 whatever the weights, τ and norms. Rows of norm
    <= ε are left out of the maxima: their own H entries overflow in fp16 (as the reference's
    fp16 gradient of such rows does), but they do not flush everyone else's to zero. The
    Triton backend's chunked path uses this on the host; its small-batch path forms the same
    g in-kernel (triton/kernels.py, _fp16_scale), the CUDA glue (csrc/cuda/contrastive_cuda.cpp)
    in C++."""
    inv_t = inv_temp.abs().reshape(()) if isinstance(inv_temp, torch.Tensor) else abs(inv_temp)
    return (weight_max * regular_max(inv_norm_q) * regular_max(inv_norm_k) * inv_t).clamp_min(1e-30).reshape(1)
