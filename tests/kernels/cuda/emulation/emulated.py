"""The CUDA backend's kernels (csrc/cuda) on CPU tensors, in the host emulation.

`library()` compiles csrc/cuda/*.cu with g++ against the stand-in CUDA headers of include/
(MMLOSS_CUDA_HOST_EMULATION; cached under the temp dir by a hash of the sources). This module
has mmloss.cuda's interface (check / forward / backward) and mirrors the ATen glue
(csrc/cuda/contrastive_cuda.cpp) step by step, at::mm as torch.mm on CPU tensors. Where the
glue allocates with at::empty, outputs and scratch here start as NaN, so that anything the
kernels fail to write shows.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

import mmloss.cuda as ck
from mmloss.kernel_common import GPU_DTYPES, fp16_scratch_scale, inv_temp_tensor
from mmloss.problem import LossProblem
from tests.repo import REPO

HERE = Path(__file__).resolve().parent
ROOT = REPO
SOURCES = [
    ROOT / "csrc/cuda/contrastive_forward.cu",
    ROOT / "csrc/cuda/contrastive_backward.cu",
    HERE / "emulator.cpp",
    HERE / "driver.cpp",
]
HEADERS = [
    ROOT / "csrc/cuda/tile.cuh",
    ROOT / "csrc/cuda/contrastive_cuda.h",
    ROOT / "csrc/include/mmloss/tile_math.h",
    *sorted((HERE / "include").glob("*.h")),
]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # mmloss::cuda::DType
SMS = 132  # multiprocessors forward_splits plans for (an H100); tests lower it to stream tiles


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The emulated kernels and driver.cpp's entry points, compiled once per source version."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / "mmloss_cuda_emulation" / digest / "libmmloss_emulation.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        cmd = [
            "g++",
            "-std=c++20",
            "-O1",
            "-fPIC",
            "-shared",
            "-DMMLOSS_CUDA_HOST_EMULATION",
            f"-I{HERE / 'include'}",
            f"-I{ROOT / 'csrc/cuda'}",
            f"-I{ROOT / 'csrc/include'}",
            "-x",
            "c++",
            *map(str, SOURCES[:2]),
            "-x",
            "none",
            *map(str, SOURCES[2:]),
            "-o",
            str(partial),
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        partial.rename(out)
    lib = ctypes.CDLL(str(out))
    lib.emu_tile_args.restype = ctypes.c_void_p
    lib.emu_error_string.restype = ctypes.c_char_p
    return lib


def _ptr(x: Optional[torch.Tensor]) -> ctypes.c_void_p:
    return ctypes.c_void_p(x.data_ptr() if x is not None else None)


def _i64(v: int) -> ctypes.c_int64:
    return ctypes.c_int64(v)


def _check(err: int, what: str) -> None:
    if err != 0:
        raise RuntimeError(f"mmloss cuda emulation: {what} failed: {library().emu_error_string(err).decode()}")


def set_reverse_order(reverse: bool) -> None:
    """Run each CTA's threads in decreasing order between barriers (a missing barrier shows)."""
    library().emu_set_reverse_order(int(reverse))


def round_trip(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 `x` through the emulation's conversion to bf16/fp16 and back."""
    x = x.float().contiguous()
    out = torch.empty_like(x)
    library().emu_round_trip(DTYPES[dtype], _ptr(x), _ptr(out), _i64(x.numel()))
    return out


def check(query: torch.Tensor, problem: LossProblem) -> None:
    if query.dtype not in GPU_DTYPES:
        raise TypeError(f"query dtype {query.dtype} is not supported by the CUDA kernels")
    problem.reject_features("cuda")  # as mmloss.cuda.check


def _teachers(rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]):
    """bind_teachers: fp32 contiguous copies, or (None, None)."""
    if rows is None:
        return None, None
    return rows.to(torch.float32).contiguous(), cols.to(torch.float32).contiguous()


def _inv_norms(x: torch.Tensor) -> torch.Tensor:
    """inv_norm_kernel on the rows of x: (rows,) fp32."""
    out = torch.full((x.shape[0],), float("nan"))
    _check(
        library().emu_inv_norms(DTYPES[x.dtype], _ptr(x), _i64(x.stride(0)), _i64(x.shape[0]), x.shape[1], _ptr(out)),
        "inv_norm_kernel",
    )
    return out


def row_scale(inv_norm: torch.Tensor) -> torch.Tensor:
    """row_scale(): 2^-e, e = floor(log2 |x_i|) at most 126, for rows of finite norm above 2^40, else 1."""
    big = (inv_norm < float(2.0**-40)) & (inv_norm > 0)
    e = torch.floor(-torch.log2(inv_norm.double())).clamp_max(126.0)
    return torch.where(big, torch.exp2(-e), torch.ones_like(e)).float()


def _prepare(query, key, inv_temp, problem: LossProblem) -> SimpleNamespace:
    """prepare(): the kernels' arguments, the tensors they point into, the inverse norms, and
    the rows the kernels see (scaled by scale_q / scale_k for fp32 and bf16)."""
    lib = library()
    rows_of = lambda x: x if x.stride(1) == 1 else x.contiguous()  # noqa: E731
    p = SimpleNamespace(
        query=rows_of(query),
        key=rows_of(key),
        positives=problem.positives.contiguous(),
        inv_temp=inv_temp_tensor(inv_temp, query.device).to(torch.float32).contiguous(),
        scale_q=None,
        scale_k=None,
    )
    M, N, D = query.shape[0], key.shape[0], query.shape[1]
    p.M, p.N, p.D, p.dtype = M, N, D, DTYPES[query.dtype]
    p.inv_q, p.inv_k = _inv_norms(p.query), _inv_norms(p.key)
    if query.dtype != torch.float16:
        p.scale_q, p.scale_k = row_scale(p.inv_q), row_scale(p.inv_k)
        p.query = (p.query * p.scale_q.to(query.dtype)[:, None]).contiguous()
        p.key = (p.key * p.scale_k.to(key.dtype)[:, None]).contiguous()
        p.inv_q, p.inv_k = _inv_norms(p.query), _inv_norms(p.key)
    groups = problem.key_groups is not None
    p.row_groups = problem.row_groups.contiguous() if groups else None
    p.key_groups = problem.key_groups.contiguous() if groups else None
    p.mq, p.mk = _teachers(problem.margin_query, problem.margin_key) if problem.margin > 0 else (None, None)
    p.fq, p.fk = _teachers(problem.filter_query, problem.filter_key)
    width = lambda t: t.shape[1] if t is not None else 0  # noqa: E731
    stride = lambda t: _i64(t.stride(0) if t is not None else 0)  # noqa: E731
    p.args = lib.emu_tile_args(
        p.dtype,
        _ptr(p.query),
        _ptr(p.key),
        _i64(p.query.stride(0)),
        _i64(p.key.stride(0)),
        _i64(M),
        _i64(N),
        D,
        _ptr(p.inv_q),
        _ptr(p.inv_k),
        _ptr(p.positives),
        _ptr(p.row_groups),
        _ptr(p.key_groups),
        _ptr(p.mq),
        _ptr(p.mk),
        stride(p.mq),
        stride(p.mk),
        width(p.mq),
        _ptr(p.fq),
        _ptr(p.fk),
        stride(p.fq),
        stride(p.fk),
        width(p.fq),
        ctypes.c_double(problem.filter_threshold),
        ctypes.c_double(problem.margin),
        _ptr(p.inv_temp),
    )
    return p


def forward(query, key, inv_temp, problem: LossProblem) -> Tuple[torch.Tensor, torch.Tensor]:
    """forward_cuda."""
    lib = library()
    p = _prepare(query, key, inv_temp, problem)
    try:
        splits = lib.emu_forward_splits(_i64(p.M), _i64(p.N), SMS)
        partial = torch.full((3 * splits * p.M,), float("nan"))
        lse = torch.full((p.M,), float("nan"), dtype=torch.float64)
        pos_logit = torch.full((p.M,), float("nan"))
        _check(
            lib.emu_forward(ctypes.c_void_p(p.args), splits, _ptr(partial), _ptr(lse), _ptr(pos_logit)),
            "forward_kernel",
        )
    finally:
        lib.emu_free_tile_args(ctypes.c_void_p(p.args))
    return lse, pos_logit


def backward(
    query, key, inv_temp, problem: LossProblem, lse, row_weight, need_temp_grad: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """mmloss.cuda.backward + backward_cuda."""
    lib = library()
    p = _prepare(query, key, inv_temp, problem)
    try:
        d_query, d_key, d_inv_temp = _backward(
            lib, p, lse, row_weight, need_temp_grad, *ck.chunk_shape(p.M, p.N, query.element_size())
        )
    finally:
        lib.emu_free_tile_args(ctypes.c_void_p(p.args))
    return d_query, d_key, d_inv_temp if need_temp_grad else None


def _finish(lib, p, prod_fp32: bool, prod, x, out, inv_norm, radial, scale, what: str) -> None:
    _check(
        lib.emu_finish(
            p.dtype,
            int(prod_fp32),
            _ptr(prod),
            _i64(prod.stride(0)),
            _ptr(x),
            _i64(x.stride(0)),
            _ptr(out),
            _i64(out.stride(0)),
            _ptr(inv_norm),
            _ptr(radial),
            _ptr(scale),
            _i64(x.shape[0]),
            p.D,
        ),
        what,
    )


def _backward(lib, p, lse, row_weight, need_temp_grad: bool, chunk_rows: int, chunk_cols: int):
    M, N, D, dtype = p.M, p.N, p.D, p.query.dtype
    lse32, weight = lse.to(torch.float32).contiguous(), row_weight.to(torch.float32).contiguous()
    if dtype == torch.float16:
        scale = fp16_scratch_scale(weight.abs().amax(), p.inv_q, p.inv_k, p.inv_temp)
    else:
        scale = torch.ones(1)
    sums = torch.zeros(2 * M + N)  # row_sum (M), row_temp (M), col_sum (N)
    R = min(max(chunk_rows, 1), max(M, 1))
    C = chunk_cols if 0 < chunk_cols < N else max(N, 1)
    assert C >= N or C % 64 == 0, chunk_cols
    row_chunks, col_chunks = R < M, C < N
    scratch = torch.full((R, C), float("nan"), dtype=dtype)
    d_query = torch.full((M, D), float("nan"), dtype=dtype)
    d_key = torch.full((N, D), float("nan"), dtype=dtype)
    key_acc = torch.zeros(N, D) if row_chunks else None
    if M == 0:
        d_key.zero_()
    for r0 in range(0, M, R):
        n = min(R, M - r0)
        q_rows = p.query[r0 : r0 + n]
        query_acc = torch.zeros(n, D) if col_chunks else None
        for c0 in range(0, max(N, 1), C):  # once when N = 0: the rows' finish
            w = min(C, N - c0)
            h = scratch[:n, :w]
            _check(
                lib.emu_grad_tile(
                    ctypes.c_void_p(p.args),
                    _i64(r0),
                    _i64(r0 + n),
                    _i64(c0),
                    _i64(c0 + w),
                    _ptr(lse32),
                    _ptr(weight),
                    _ptr(scale),
                    _ptr(h),
                    _i64(h.stride(0)),
                    _ptr(sums),
                    _ptr(sums[M:]) if need_temp_grad else _ptr(None),
                    _ptr(sums[2 * M :]),
                ),
                "grad_tile_kernel",
            )
            k_cols = p.key[c0 : c0 + w]
            prod = torch.mm(h, k_cols)
            if query_acc is not None:
                query_acc.add_(prod)
            key_prod = torch.mm(h.t(), q_rows)
            if key_acc is not None:
                key_acc[c0 : c0 + w].add_(key_prod)
            elif w > 0:
                cols = sums[2 * M + c0 :]
                _finish(lib, p, False, key_prod, k_cols, d_key[c0 : c0 + w], p.inv_k[c0:], cols, scale, "finish (key)")
        q_total = query_acc if query_acc is not None else prod
        rows = d_query[r0 : r0 + n]
        _finish(lib, p, col_chunks, q_total, q_rows, rows, p.inv_q[r0:], sums[r0:], scale, "finish_kernel (query)")
    if key_acc is not None:
        _finish(lib, p, True, key_acc, p.key, d_key, p.inv_k, sums[2 * M :], scale, "finish_kernel (key)")
    if p.scale_q is not None:  # unscale_grads
        d_query.mul_(p.scale_q.to(dtype)[:, None])
        d_key.mul_(p.scale_k.to(dtype)[:, None])
    d_inv_temp = sums[M : 2 * M].double().sum() if need_temp_grad else torch.zeros((), dtype=torch.float64)
    return d_query, d_key, d_inv_temp
