"""Host side of the Triton backend: argument packing, launches, the backward's GEMMs.

Backward design (see docs/triton.md): per row chunk of R rows, `grad_tile_kernel`
recomputes the logits tile by tile and writes H = a_i b_j G_ij / g into an R x N scratch
(input dtype; fp32 for fp32 inputs), then two cuBLAS GEMMs give dQ_R = H K and
dK += H^T Q_R, and `finish_kernel` adds the normalisation Jacobian's radial term from the
row/column sums of G*c that the tile kernel accumulated. For fp16, g = max|w| max(a) max(b)
/ tau bounds |H| by |f'|; bf16 and fp32 use g = 1. R keeps the scratch within
`scratch_bytes()`.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from typing import Dict, Optional, Tuple

import torch
import triton

from mmloss.constants import MARGIN_SIN_EPS, NORM_EPS
from mmloss.problem import LossProblem
from mmloss.triton import configs, kernels

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_SCRATCH_BYTES = 1 << 30
# Batches with M and N up to this take the small-batch path (`small_batch`).
SMALL_MAX = 2048
# Columns per split of the chunked forward at least (`forward_splits`).
MIN_SPLIT_COLUMNS = 256
INTERPRETER_SMS = 2


def scratch_bytes() -> int:
    """Budget of the backward's R x N scratch (env MMLOSS_TRITON_SCRATCH_MB, default 1 GiB)."""
    mb = os.environ.get("MMLOSS_TRITON_SCRATCH_MB")
    return int(mb) << 20 if mb else DEFAULT_SCRATCH_BYTES


def _precision(dtype: torch.dtype) -> str:
    """fp32 operands use exact fp32 products ("ieee"): tf32 misses SPEC's error bar."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _teacher(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Teacher rows as a kernel operand: fp64 (a CPU-style input) becomes fp32, unit stride."""
    if x is None:
        return None
    if x.dtype == torch.float64:
        x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _capability(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


KERNELS = {"forward": kernels.forward_kernel, "grad_tile": kernels.grad_tile_kernel,
           "grad_gemm": kernels.grad_gemm_kernel}
_TUNE_KEY = ["M_BUCKET", "N_BUCKET", "D_BUCKET", "HAS_MARGIN", "ADAPTIVE", "HAS_FILTER", "HAS_GROUPS",
             "SYMMETRIC"]
TUNE_KEY = {"forward": _TUNE_KEY, "grad_tile": _TUNE_KEY + ["NEED_TEMP"]}


def call_class(query: torch.Tensor, problem: LossProblem, symmetric: bool = False) -> str:
    """Which config class (configs.py) a call uses: by embedding and teacher dtypes, features
    and direction count."""
    if query.dtype == torch.float32:
        return "fp32"
    teachers = (problem.margin_query if problem.margin > 0 else None, problem.filter_query)
    if any(t is not None and t.dtype in (torch.float32, torch.float64) for t in teachers):
        return "teacher32"
    if symmetric:
        return "sym16"
    return "feat16" if problem.margin > 0 or problem.filter_query is not None else "plain16"


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, cls: str, capability: int, autotune: bool):
    """The autotuned kernel of `kind` for a call class and arch (tuned once per key);
    with autotune=False the class's first (default) config only."""
    reset = {"grad_tile": ["row_sum_ptr", "col_sum_ptr", "temp_grad_ptr"], "forward": ["col_acc_ptr"]}[kind]
    candidates = configs.configs(kind, cls, capability)
    return triton.autotune(configs=candidates if autotune else candidates[:1], key=TUNE_KEY[kind],
                           reset_to_zero=reset)(KERNELS[kind])


def _launch(kind: str, cls: str, device: torch.device, grid_fn, args: tuple, flags: Dict[str, object]) -> None:
    """Interpreter: the raw kernel with the fixed small config. GPU: the autotuned one."""
    if configs.interpreted():
        meta = configs.interpreter_meta()
        KERNELS[kind][grid_fn(meta)](*args, **flags, **meta)
    else:
        autotune = os.environ.get("MMLOSS_TRITON_AUTOTUNE", "1") != "0"
        _tuned(kind, cls, _capability(device), autotune)[grid_fn](*args, **flags)


def _small_meta(kind: str, cls: str, device: torch.device) -> Dict[str, object]:
    """Launch settings of the small-batch path: its fixed config (the interpreter's on CPU)."""
    if configs.interpreted():
        meta = configs.interpreter_meta()
        if kind == "grad_gemm":
            return {"BLOCK_M": meta["BLOCK_M"], "BLOCK_D": meta["BLOCK_D"], "BLOCK_K": meta["BLOCK_N"]}
        return meta
    cfg = configs.small_config(kind, cls, _capability(device))
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def small_batch(M: int, N: int) -> bool:
    """Whether a call takes the small-batch path: one forward launch, two backward launches,
    an fp32 M x N scratch (at most 16 MiB)."""
    return max(M, N) <= SMALL_MAX


def _temperature_args(inv_temp, device: torch.device) -> Tuple[torch.Tensor, float, Dict[str, bool]]:
    """(pointer, value, flag) of 1/tau: a tensor stays on the device (no host sync,
    graph-capturable), a float is passed by value (no fill launch)."""
    if isinstance(inv_temp, torch.Tensor):
        return inv_temp.detach().to(device=device, dtype=torch.float32).reshape(1), 0.0, {"TEMP_PTR": True}
    as_fp32 = struct.unpack("f", struct.pack("f", float(inv_temp)))[0]  # what the kernel sees
    return _one(device), as_fp32, {"TEMP_PTR": False}


def _feature_args(query: torch.Tensor, problem: LossProblem) -> Tuple[tuple, Dict[str, object]]:
    """(group, teacher, filter and margin arguments, constexpr flags) shared by the kernels."""
    dummy = query
    tq, tk = _teacher(problem.margin_query), _teacher(problem.margin_key)
    fq, fk = _teacher(problem.filter_query), _teacher(problem.filter_key)
    has_margin = problem.margin > 0.0
    adaptive = has_margin and tq is not None
    has_filter = fq is not None
    has_groups = problem.key_groups is not None
    m_eff = problem.margin
    args = (
        problem.row_groups if has_groups else dummy, problem.key_groups if has_groups else dummy,
        tq if adaptive else dummy, tk if adaptive else dummy,
        tq.stride(0) if adaptive else 0, tk.stride(0) if adaptive else 0, tq.shape[1] if adaptive else 1,
        fq if has_filter else dummy, fk if has_filter else dummy,
        fq.stride(0) if has_filter else 0, fk.stride(0) if has_filter else 0, fq.shape[1] if has_filter else 1,
        float(problem.filter_threshold),
        float(problem.margin), float(problem.cos_margin), math.cos(m_eff), math.sin(m_eff),
    )
    flags = dict(
        HAS_MARGIN=has_margin, ADAPTIVE=adaptive, HAS_FILTER=has_filter, HAS_GROUPS=has_groups,
        PRECISION=_precision(query.dtype),
        T_PRECISION=_precision(tq.dtype) if adaptive else "ieee",
        F_PRECISION=_precision(fq.dtype) if has_filter else "ieee",
        UPCAST=configs.interpreted(), SIN_EPS=MARGIN_SIN_EPS,
    )
    return args, flags


def forward(query: torch.Tensor, key: torch.Tensor, inv_temp, problem: LossProblem
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """lse (M,) fp32 over this key block's allowed columns and the positive's logit (M,)
    fp32 (0 when the positive is not in this block). One launch for small batches (norms
    fused), else two (norms, loss)."""
    lse, pos_logit, _ = _forward(query, key, inv_temp, problem, symmetric=False)
    return lse, pos_logit


def forward_symmetric(query: torch.Tensor, key: torch.Tensor, inv_temp, problem: LossProblem
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both directions of a symmetric loss (M == N, diagonal positives) in one pass over the
    tiles: row lse (M,), column lse (N,) and the diagonal logit (M,), fp32. The column sums
    are shifted by 1/tau (constants.SYMMETRIC_MAX_INV_TEMP bounds it)."""
    lse, pos_logit, lse_col = _forward(query, key, inv_temp, problem, symmetric=True)
    return lse, lse_col, pos_logit


def _forward(query: torch.Tensor, key: torch.Tensor, inv_temp, problem: LossProblem, symmetric: bool):
    """(lse, pos_logit, column lse or None). Small batches: the forward kernel alone. Else the
    norm prologue, the forward kernel over (row blocks, column splits) and, with more than one
    split, `combine_kernel`. Symmetric adds a zero-fill and the column lse's log."""
    query, key = _rows(query), _rows(key)
    (M, D), N = query.shape, key.shape[0]
    dev = query.device
    small = small_batch(M, N)
    splits = 1 if small else forward_splits(M, N, dev)
    lse = torch.empty(M, dtype=torch.float32, device=dev)
    pos_logit = torch.empty_like(lse)
    part_lse, part_pos = (lse, pos_logit) if splits == 1 else torch.empty(2, splits, M, dtype=torch.float32,
                                                                          device=dev).unbind(0)
    col_acc = torch.zeros(N, dtype=torch.float64, device=dev) if symmetric else lse
    feat, flags = _feature_args(query, problem)
    temp_ptr, temp_value, temp_flag = _temperature_args(inv_temp, dev)
    a, b = (lse, lse) if small else _inv_norms(query, key)
    flags = dict(flags, **temp_flag, FUSED_NORMS=small, SYMMETRIC=symmetric, EPS=NORM_EPS)
    args = (query, key, query.stride(0), key.stride(0), M, N, D, a, b,
            problem.positives, temp_ptr, temp_value, part_lse, part_pos, col_acc, splits,
            *feat, configs.bucket(M), configs.bucket(N), configs.bucket(D))
    cls = call_class(query, problem, symmetric)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits)  # noqa: E731
    if small:
        meta = _small_meta("forward", cls, dev)
        kernels.forward_kernel[grid(meta)](*args, **flags, **meta)
    else:
        _launch("forward", cls, dev, grid, args, flags)
    if splits > 1:
        block = configs.ELEMENTWISE["BLOCK_M"] * 8
        kernels.combine_kernel[(triton.cdiv(M, block),)](part_lse, part_pos, lse, pos_logit, M, splits, BLOCK=block)
    lse_col = None
    if symmetric:  # the kernel shifted every column by its fp32 1/tau
        shift = temp_ptr.double() if temp_flag["TEMP_PTR"] else temp_value
        lse_col = (torch.log(col_acc) + shift).float()
    return lse, pos_logit, lse_col


def forward_splits(M: int, N: int, device: torch.device) -> int:
    """Column splits of the chunked forward: enough (row block, split) programs for two per
    SM at 128-row blocks, each split at least MIN_SPLIT_COLUMNS wide."""
    row_blocks = triton.cdiv(M, 128)
    wanted = triton.cdiv(2 * _multiprocessors(device), row_blocks)
    return max(1, min(wanted, N // MIN_SPLIT_COLUMNS))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device; in the interpreter a pretend 2, so that tests reach the splits."""
    if configs.interpreted():
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _inv_norms(query: torch.Tensor, key: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """1 / max(||x_i||, eps) per row of query (M,) and key (N,), fp32, one launch."""
    (M, D), N = query.shape, key.shape[0]
    a = torch.empty(M, dtype=torch.float32, device=query.device)
    b = torch.empty(N, dtype=torch.float32, device=query.device)
    bm, bd = configs.ELEMENTWISE["BLOCK_M"], configs.ELEMENTWISE["BLOCK_D"]
    grid = (triton.cdiv(M, bm) + triton.cdiv(N, bm),)
    kernels.inv_norm_kernel[grid](query, key, a, b, M, N, D, query.stride(0), key.stride(0),
                                  BLOCK_M=bm, BLOCK_D=bd, EPS=NORM_EPS)
    return a, b


def _finish(prod: torch.Tensor, x: torch.Tensor, out: torch.Tensor, inv_norm: torch.Tensor,
            row_sum: torch.Tensor, scale: torch.Tensor) -> None:
    """out = scale * prod - [||x|| > eps] inv_norm^2 row_sum x (rows of equal count)."""
    M, D = x.shape
    bm, bd = configs.ELEMENTWISE["BLOCK_M"], configs.ELEMENTWISE["BLOCK_D"]
    kernels.finish_kernel[(triton.cdiv(M, bm), triton.cdiv(D, bd))](
        prod, x, out, inv_norm, row_sum, scale, M, D, prod.stride(0), x.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_D=bd, EPS=NORM_EPS)


@functools.lru_cache(maxsize=None)
def _one(device: torch.device) -> torch.Tensor:
    """A cached 1-element fp32 one per device: the scratch scale of bf16/fp32 (their range
    holds H = G a b as is), without a launch per call."""
    return torch.ones(1, dtype=torch.float32, device=device)


def _scratch_scale(weight_max: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inv_temp) -> torch.Tensor:
    """fp16 only: g = max|w| max(a) max(b) / tau (1-element device tensor), so that
    |H| = |G| a b / g <= |f'| fits fp16 whatever the weights, tau and norms. Rows of norm <= eps (a = 1/eps)
    are left out of the maxima: in fp16 their own H entries overflow (as the reference's
    fp16 gradient of such rows does), but they do not flush everyone else's to zero."""
    def regular_max(inv_norm):
        return torch.where(inv_norm < 1.0 / NORM_EPS, inv_norm, torch.zeros_like(inv_norm)).amax()
    inv_t = inv_temp.abs() if isinstance(inv_temp, torch.Tensor) else abs(inv_temp)
    return (weight_max * regular_max(a) * regular_max(b) * inv_t).clamp_min(1e-30).reshape(1)


def row_chunk(M: int, N: int, element_size: int) -> int:
    """Rows per backward chunk: the R x N scratch within the budget, a multiple of 128."""
    fit = scratch_bytes() // max(1, N * element_size)
    return max(128, min(M, fit) // 128 * 128) if fit < M else M


def backward(query: torch.Tensor, key: torch.Tensor, inv_temp, problem: LossProblem,
             lse: torch.Tensor, row_weight: torch.Tensor, need_temp_grad: bool
             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of sum_i w_i loss_i over this block's columns, with P from the given lse:
    d_query (M, d), d_key (N, d) in the inputs' dtype, d_inv_temp 0-dim (or None)."""
    return _backward(query, key, inv_temp, problem, lse, row_weight, need_temp_grad, None, None)


def backward_symmetric(query: torch.Tensor, key: torch.Tensor, inv_temp, problem: LossProblem,
                       lse: torch.Tensor, lse_col: torch.Tensor, row_weight: torch.Tensor,
                       col_weight: torch.Tensor, need_temp_grad: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of sum_i w_i row_loss_i + sum_j v_j col_loss_j in one pass over the tiles:
    each tile's G carries both directions' softmax terms."""
    return _backward(query, key, inv_temp, problem, lse, row_weight, need_temp_grad, lse_col, col_weight)


def _backward(query, key, inv_temp, problem: LossProblem, lse, row_weight, need_temp_grad: bool,
              lse_col: Optional[torch.Tensor], col_weight: Optional[torch.Tensor]):
    """Both backward entry points: the small-batch or the chunked path, one direction or
    (with lse_col and col_weight) both."""
    query, key = _rows(query), _rows(key)
    symmetric = lse_col is not None
    dev = query.device
    weight = row_weight.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    if symmetric:
        lse_col = lse_col.to(torch.float32).contiguous()
        col_weight = col_weight.to(torch.float32).contiguous()
    feat, flags = _feature_args(query, problem)
    temp_ptr, temp_value, temp_flag = _temperature_args(inv_temp, dev)
    flags = dict(flags, **temp_flag, NEED_TEMP=bool(need_temp_grad), SYMMETRIC=symmetric, EPS=NORM_EPS)
    temp = (temp_ptr, temp_value)
    cols = (lse_col, col_weight) if symmetric else (lse, weight)  # dummies unless symmetric
    run = _backward_small if small_batch(query.shape[0], key.shape[0]) else _backward_chunked
    d_query, d_key, temp_grad = run(query, key, problem, temp, lse, weight, cols, feat, flags)
    d_inv_temp = None
    if need_temp_grad:
        t_dtype = inv_temp.dtype if isinstance(inv_temp, torch.Tensor) else torch.float32
        d_inv_temp = temp_grad.reshape(()).to(t_dtype)
    return d_query, d_key, d_inv_temp


def _backward_small(query, key, problem: LossProblem, temp, lse, weight, cols, feat, flags):
    """Two launches: `grad_tile_kernel` (FUSED: norms in the kernel, H in an fp32 M x N
    scratch, per-tile partial sums, no atomics, no fills), then `grad_gemm_kernel`."""
    (M, D), N = query.shape, key.shape[0]
    dev = query.device
    cls = call_class(query, problem, flags["SYMMETRIC"])
    tile = _small_meta("grad_tile", cls, dev)
    tiles_m, tiles_n = triton.cdiv(M, tile["BLOCK_M"]), triton.cdiv(N, tile["BLOCK_N"])
    a = torch.empty(M, dtype=torch.float32, device=dev)
    b = torch.empty(N, dtype=torch.float32, device=dev)
    parts = torch.empty(tiles_n * M + tiles_m * N + tiles_m * tiles_n + 1, dtype=torch.float32, device=dev)
    row_part, col_part = parts[: tiles_n * M], parts[tiles_n * M: tiles_n * M + tiles_m * N]
    temp_part, temp_grad = parts[tiles_n * M + tiles_m * N: -1], parts[-1:]
    h = torch.empty(M, N, dtype=torch.float32, device=dev)
    kernels.grad_tile_kernel[(tiles_m * tiles_n,)](
        query, key, query.stride(0), key.stride(0), M, N, query.shape[1], 0, a, b,
        problem.positives, *temp, lse, weight, *cols, _one(dev), h, h.stride(0),
        row_part, col_part, temp_part, *feat, configs.bucket(M), configs.bucket(N), configs.bucket(D),
        **flags, FUSED=True, GROUP_M=configs.GROUP_M, **tile)
    d_query, d_key = torch.empty_like(query), torch.empty_like(key)
    gemm = _small_meta("grad_gemm", cls, dev)
    d_tiles = triton.cdiv(D, gemm["BLOCK_D"])
    grid = ((triton.cdiv(M, gemm["BLOCK_M"]) + triton.cdiv(N, gemm["BLOCK_M"])) * d_tiles,)
    kernels.grad_gemm_kernel[grid](
        query, key, query.stride(0), key.stride(0), M, N, D, a, b, weight, cols[1], *temp, h, h.stride(0),
        row_part, col_part, temp_part, temp_grad, tiles_n, tiles_m, tiles_m * tiles_n,
        d_query, d_key, d_query.stride(0), d_key.stride(0),
        NEED_TEMP=flags["NEED_TEMP"], PRECISION=flags["PRECISION"], UPCAST=flags["UPCAST"],
        TEMP_PTR=flags["TEMP_PTR"], SYMMETRIC=flags["SYMMETRIC"], SCALE16=query.dtype == torch.float16,
        EPS=NORM_EPS, **gemm)
    return d_query, d_key, temp_grad


def _backward_chunked(query, key, problem: LossProblem, temp, lse, weight, cols, feat, flags):
    """Per row chunk of R rows: the tile kernel fills an R x N scratch H, two cuBLAS GEMMs,
    the finish kernels (the module docstring)."""
    (M, D), N = query.shape, key.shape[0]
    dev = query.device
    h_dtype = query.dtype
    a, b = _inv_norms(query, key)
    scale = _one(dev)
    if query.dtype == torch.float16:
        weight_max = weight.abs().amax() + (cols[1].abs().amax() if flags["SYMMETRIC"] else 0.0)
        scale = _scratch_scale(weight_max, a, b, temp[0] if flags["TEMP_PTR"] else temp[1])
    sums = torch.zeros(M + N + 1, dtype=torch.float32, device=dev)  # one launch for all three
    row_sum, col_sum, temp_grad = sums[:M], sums[M:M + N], sums[M + N:]

    R = row_chunk(M, N, torch.finfo(h_dtype).bits // 8)
    # The autotune key uses R, the same for every chunk: tuning (whose reset_to_zero clears
    # col_sum and temp_grad) can then only happen on the first chunk, before they hold sums.
    scratch = torch.empty(R, N, dtype=h_dtype, device=dev)
    d_query = torch.empty_like(query)
    key_acc = None if R >= M else torch.zeros(N, D, dtype=torch.float32, device=dev)
    key_prod = None
    for r0 in range(0, M, R):
        r1 = min(M, r0 + R)
        h = scratch[: r1 - r0]
        args = (query, key, query.stride(0), key.stride(0), r1, N, D, r0, a, b,
                problem.positives, *temp, lse, weight, *cols, scale,
                h, h.stride(0), row_sum, col_sum, temp_grad, *feat,
                configs.bucket(R), configs.bucket(N), configs.bucket(D))
        _launch("grad_tile", call_class(query, problem, flags["SYMMETRIC"]), dev,
                lambda meta: (triton.cdiv(r1 - r0, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
                args, dict(flags, FUSED=False, GROUP_M=configs.GROUP_M))
        q_rows = query[r0:r1]
        prod = torch.mm(h, key)
        _finish(prod, q_rows, d_query[r0:r1], a[r0:r1], row_sum[r0:r1], scale)
        key_prod = torch.mm(h.t(), q_rows)
        if key_acc is not None:
            key_acc.add_(key_prod)
    d_key = torch.empty_like(key)
    _finish(key_prod if key_acc is None else key_acc, key, d_key, b, col_sum, scale)
    return d_query, d_key, temp_grad
