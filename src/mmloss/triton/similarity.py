"""Fused similarity kernel: out[i, j] = <a_i, b_j> · s_i · t_j, with s_i = 1/max(‖a_i‖, ε) and
t_j = 1/max(‖b_j‖, ε) when normalising (else 1), in one launch.

Each program owns one BLOCK_M × BLOCK_N output tile. Normalising, it first takes the inverse
norms of its rows and columns (squares summed in fp64, as the loss kernels: no overflow for
fp16 rows of norm > 65,504 or fp32 rows of 1e30), then streams d in BLOCK_D chunks: one
tl.dot per chunk (fp32 accumulation; exact fp32 products for fp32 inputs, tensor cores for
16-bit ones). fp32 rows enter the dot times the power of two of their inverse norm (exact),
so products neither overflow nor underflow. No normalised copy of an input exists; the tile
is scaled and cast to out's dtype on store.
The 1-D grid is ordered in bands of GROUP_M row tiles so tiles in flight share b in L2.
In the interpreter (TRITON_INTERPRET=1, CPU tensors) dot operands are upcast to fp32: its
bf16 tl.dot is wrong, and 16-bit products are exact in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmloss.constants import NORM_EPS
from mmloss.kernel_common import triton_interpreted
from mmloss.triton.kernels import NORM_CHUNK, cosine_tile, dot_tile, row_inv_norms

GROUP_M = 8


@triton.jit
def similarity_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    D,
    stride_a,
    stride_b,
    stride_out,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALED: tl.constexpr,
    EPS: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP * tiles_n)
    first_m = band * GROUP
    band_rows = tl.minimum(tiles_m - first_m, GROUP)
    pid_m = first_m + (pid % (GROUP * tiles_n)) % band_rows
    pid_n = (pid % (GROUP * tiles_n)) // band_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    if NORMALIZE:
        inv_a = row_inv_norms(a_ptr, stride_a, rows, M, D, NORM_CHUNK, EPS)
        inv_b = row_inv_norms(b_ptr, stride_b, cols, N, D, NORM_CHUNK, EPS)
        acc, _, _ = cosine_tile(
            a_ptr, b_ptr, stride_a, stride_b, rows, cols, M, N, D, inv_a, inv_b, BLOCK_D, PRECISION, UPCAST, SCALED
        )
    else:
        acc = dot_tile(a_ptr, b_ptr, stride_a, stride_b, rows, cols, M, N, D, BLOCK_D, PRECISION, UPCAST)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _meta(dtype: torch.dtype) -> dict:
    """Tile shape and launch settings per input dtype (the interpreter: 64-blocks, as the other kernels)."""
    if triton_interpreted():
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 16, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3}


def similarity_into(a: torch.Tensor, b: torch.Tensor, normalize: bool, out: torch.Tensor) -> torch.Tensor:
    """Write the (M, N) similarity of a (M, d) and b (N, d) into `out` (rows may be strided,
    columns contiguous); a and b have contiguous rows and one of kernel_common.GPU_DTYPES."""
    M, D = a.shape
    N = b.shape[0]
    meta = _meta(a.dtype)
    grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    similarity_kernel[grid](
        a_ptr=a,
        b_ptr=b,
        out_ptr=out,
        M=M,
        N=N,
        D=D,
        stride_a=a.stride(0),
        stride_b=b.stride(0),
        stride_out=out.stride(0),
        NORMALIZE=normalize,
        GROUP=GROUP_M,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        UPCAST=triton_interpreted(),
        SCALED=a.dtype == torch.float32,
        EPS=NORM_EPS,
        **meta,
    )
    return out
