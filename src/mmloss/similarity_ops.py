"""Similarity ops for evaluation: `similarity` (the whole matrix) and `topk_similarity` (the best
k_top columns of each row, streamed over column tiles: no M × N matrix exists). Both are
exported as `mmloss.similarity` and `mmloss.topk_similarity`; this module is
`mmloss.similarity_ops`.

Both normalise rows as F.normalize does (â = a / max(‖a‖, 1e-12)) unless normalize=False, form
products in fp32 (fp64 for fp64 inputs, CPU only) and are not differentiable (evaluation ops:
outputs carry no autograd history).

Backends (`backend="auto"` picks by device; a named one runs or raises):
* "cpu"    CPU tensors: csrc/cpu/similarity_cpu.cpp in mmloss._C (unit rows once, BLAS GEMMs,
           per-row heaps for top-k).
* "triton" CUDA tensors (or CPU tensors under TRITON_INTERPRET=1): mmloss/triton/similarity.py
           for the matrix and for each top-k tile; top-k merges tiles by torch.topk on keys.

Top-k order: higher score first; equal scores go to the lower column index (deterministic, the
same on both backends). Scores are compared as the IEEE 754 total order with -0 = +0, so a
NaN score (from NaN inputs) ranks above +inf when its sign bit is clear, below -inf when set.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from mmloss.backends import compiled_extension, unavailable_reason
from mmloss.checks import FLOAT_DTYPES, check_embeddings
from mmloss.kernel_common import GPU_DTYPES, rows_within

SIM_BACKENDS = ("auto", "cpu", "triton")
DEFAULT_BLOCK = 4096
CPU_SCRATCH_BYTES = 16 * 2**20
TRITON_SCRATCH_BYTES = 256 * 2**20
CPU_MIN_STRIP_ROWS = 32
HEAP_ENTRY_BYTES = 24  # (key, index, value) per kept candidate in the CPU kernel
TILE_BYTES_PER_ELEMENT = 28  # Triton path: fp32 tile, its int64 keys, the concatenation and topk's copy


def _check_pair(names: Tuple[str, str], a, b, normalize, backend: str) -> str:
    """Validate two embedding matrices and the flags; return the backend that will run."""
    check_embeddings(a, b, names)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if backend not in SIM_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(SIM_BACKENDS)}; got {backend!r}")
    if backend == "auto":
        backend = "cpu" if a.device.type == "cpu" else "triton"
    reason = unavailable_reason(backend, a.device)
    if reason is not None:
        raise RuntimeError(reason)
    if backend == "triton" and a.dtype not in GPU_DTYPES:
        raise TypeError(f"{names[0]} dtype float64 is not supported by backend 'triton' (float32, bfloat16, float16)")
    return backend


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def similarity(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    normalize: bool = True,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """(M, N) matrix of cosines â_i·b̂_j (dot products a_i·b_j with normalize=False).

    a (M, d), b (N, d): float32, bfloat16, float16 (float64 on the CPU), same dtype and device.
    out_dtype: the result's dtype (default a's dtype): float32, bfloat16, float16, or float64
    (CPU). Products accumulate in fp32 (fp64 for fp64 inputs) whatever out_dtype is.
    """
    backend = _check_pair(("a", "b"), a, b, normalize, backend)
    out_dtype = a.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of float32, bfloat16, float16, float64; got {out_dtype}")
    if out_dtype == torch.float64 and backend == "triton":
        raise TypeError("out_dtype float64 is not supported by backend 'triton'")
    out = torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    with torch.no_grad():
        if backend == "cpu":
            compiled_extension().similarity_cpu(a, b, normalize, out, rows_within(CPU_SCRATCH_BYTES, 8 * b.shape[0]))
        else:
            from mmloss.triton.similarity import similarity_into

            similarity_into(a.contiguous(), b.contiguous(), normalize, out)
    return out


def topk_similarity(
    q: torch.Tensor,
    k: torch.Tensor,
    k_top: int,
    *,
    normalize: bool = True,
    block: int = DEFAULT_BLOCK,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k_top best columns of each row: (scores (M, k_top), indices (M, k_top) int64), best first.

    q (M, d) queries, k (N, d) candidates (same dtype/device rules as `similarity`); scores are
    cosines (dot products with normalize=False) in fp32 (fp64 for fp64 inputs). Columns are
    streamed in tiles of `block`, rows in strips bounded by a scratch budget (CPU 16 MiB, GPU
    256 MiB), so memory is O((M + N) d + M k_top). Ties: lower column index first.
    """
    backend = _check_pair(("q", "k"), q, k, normalize, backend)
    k_top = _positive_int("k_top", k_top)
    block = _positive_int("block", block)
    M, N = q.shape[0], k.shape[0]
    if k_top > N:
        raise ValueError(f"k_top={k_top} exceeds the number of candidates N={N} (rows of k)")
    if N >= 2**32:
        raise ValueError(f"k has {N} rows: at most 2^32 - 1 candidates are supported")
    block = min(block, N)
    with torch.no_grad():
        if backend == "cpu":
            item = 8 if q.dtype == torch.float64 else 4
            strip = rows_within(
                CPU_SCRATCH_BYTES, item * block + HEAP_ENTRY_BYTES * k_top, minimum=CPU_MIN_STRIP_ROWS, total=M
            )
            scores, indices = compiled_extension().topk_similarity_cpu(q, k, k_top, normalize, strip, block)
            return scores, indices
        strip = rows_within(TRITON_SCRATCH_BYTES, TILE_BYTES_PER_ELEMENT * (block + k_top), total=M)
        return _topk_triton(q.contiguous(), k.contiguous(), k_top, normalize, block, strip)


def _score_keys(tile: torch.Tensor, first_col: int) -> torch.Tensor:
    """(R, C) fp32 scores of columns first_col.. -> unique int64 keys ordered as (score, -column)."""
    bits = tile.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    ordered = torch.where(ordered == -1, 0, ordered)  # -0.0 ranks as +0.0
    cols = torch.arange(first_col, first_col + tile.shape[1], device=tile.device, dtype=torch.int64)
    return (ordered.to(torch.int64) << 32) | (0xFFFFFFFF - cols)


def _decode_keys(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of _score_keys: (scores fp32, column indices int64)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def _topk_triton(q: torch.Tensor, k: torch.Tensor, k_top: int, normalize: bool, block: int, strip: int):
    """Row strips × column tiles: each tile from the Triton kernel into an fp32 scratch, merged with
    the strip's running best keys by torch.topk (keys are unique, so the result is deterministic)."""
    from mmloss.triton.similarity import similarity_into

    M, N = q.shape[0], k.shape[0]
    scratch = torch.empty(strip, block, dtype=torch.float32, device=q.device)
    scores = torch.empty(M, k_top, dtype=torch.float32, device=q.device)
    indices = torch.empty(M, k_top, dtype=torch.int64, device=q.device)
    for r0 in range(0, M, strip):
        rows = min(strip, M - r0)
        best = None
        for c0 in range(0, N, block):
            cols = min(block, N - c0)
            tile = similarity_into(q[r0 : r0 + rows], k[c0 : c0 + cols], normalize, scratch[:rows, :cols])
            keys = _score_keys(tile, c0)
            if best is not None:
                keys = torch.cat([best, keys], dim=1)
            best = keys.topk(min(k_top, keys.shape[1]), dim=1).values
        scores[r0 : r0 + rows], indices[r0 : r0 + rows] = _decode_keys(best)
    return scores, indices
