"""Host side of the Triton backend: argument packing, launches, the backward's GEMMs.

Backward design (see docs/triton.md): per chunk of R rows x C columns, `grad_tile_kernel`
recomputes the logits tile by tile and writes H = a_i b_j G_ij / g into an R x C scratch
(input dtype; fp32 for fp32 inputs, whose rows' powers of two are kept out of H), then two
cuBLAS GEMMs give dQ_R (+)= H K_C and dK_C += H^T Q_R, and `finish_kernel` adds the
normalisation Jacobian's radial term from the row/column sums of G*c that the tile kernel
accumulated. For fp16, g = max|w| max(a) max(b) / tau (kernel_common.fp16_scratch_scale)
bounds |H| by |f'|; bf16 and fp32 use g = 1. R x C keeps the scratch within
kernel_common.scratch_bytes("triton") (MMLOSS_TRITON_SCRATCH_MB) for every M and N.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import struct
from typing import Dict, Optional, Tuple

import torch
import triton

from mmloss.constants import MARGIN_SIN_EPS, NORM_EPS
from mmloss.kernel_common import fp16_scratch_scale, rows_within, scratch_bytes, triton_interpreted
from mmloss.problem import HARDNESS_ALL, HARDNESS_OTHERS, HARDNESS_OWN, KERNEL_FIELDS, LossProblem
from mmloss.triton import configs, kernels

# Batches with M and N up to this take the small-batch path (`small_batch`).
SMALL_MAX = 2048
# Columns per split of the chunked forward at least (`forward_splits`).
MIN_SPLIT_COLUMNS = 256
INTERPRETER_SMS = 2
# The packed (max, sum) = (-inf, 0) of a column no row has reached (kernels._pack).
EMPTY_COLUMN = struct.unpack("<q", struct.pack("<ff", 0.0, float("-inf")))[0]  # low word: sum


class Fields(collections.namedtuple("Fields", KERNEL_FIELDS)):
    """The `LossProblem` fields the kernels read (problem.KERNEL_FIELDS, in that order), as the
    custom ops pass them one by one (valid_rows is the caller's business)."""

    __slots__ = ()
    cos_threshold = LossProblem.cos_threshold  # the problem's own definition of cos m


def fields(problem: LossProblem) -> Fields:
    return Fields(*problem.kernel_args())


def _precision(dtype: torch.dtype) -> str:
    """fp32 operands use exact fp32 products ("ieee"): tf32 misses the contract's error bar."""
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


KERNELS = {
    "forward": kernels.forward_kernel,
    "grad_tile": kernels.grad_tile_kernel,
    "grad_gemm": kernels.grad_gemm_kernel,
}
_TUNE_KEY = [
    "M_BUCKET",
    "N_BUCKET",
    "D_BUCKET",
    "HAS_MARGIN",
    "ADAPTIVE",
    "HAS_FILTER",
    "HAS_GROUPS",
    "HARDNESS",
    "BY_OWNER",
    "MULTI_POS",
    "SYMMETRIC",
]
TUNE_KEY = {"forward": _TUNE_KEY, "grad_tile": _TUNE_KEY + ["NEED_TEMP"]}


def call_class(query: torch.Tensor, problem, symmetric: bool = False) -> str:
    """Which config class (configs.py) a call uses: by embedding and teacher dtypes, features
    and direction count (the hardness penalty or several positives on top of a margin or a
    teacher: the "x" variant of the class)."""
    if query.dtype == torch.float32:
        return "fp32"
    extra = "x" if problem.hardness_strength > 0.0 or problem.positive_weights is not None else ""
    teachers = (problem.margin_query if problem.margin > 0 else None, problem.filter_query)
    if any(t is not None and t.dtype in (torch.float32, torch.float64) for t in teachers):
        return "teacher32" + extra
    if symmetric:
        return "sym16"
    return "feat16" + extra if problem.margin > 0 or problem.filter_query is not None else "plain16"


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, cls: str, capability: int, autotune: bool):
    """The autotuned kernel of `kind` for a call class and arch (tuned once per key);
    with autotune=False the class's first (default) config only."""
    reset = {"grad_tile": ["row_sum_ptr", "col_sum_ptr", "temp_grad_ptr"], "forward": ["col_acc_ptr"]}[kind]
    candidates = configs.configs(kind, cls, capability)
    return triton.autotune(configs=candidates if autotune else candidates[:1], key=TUNE_KEY[kind], reset_to_zero=reset)(
        KERNELS[kind]
    )


def _launch(kind: str, cls: str, device: torch.device, grid_fn, kwargs: Dict[str, object]) -> None:
    """Interpreter: the raw kernel with the fixed small config. GPU: the autotuned one. By keyword."""
    if triton_interpreted():
        meta = configs.interpreter_meta()
        KERNELS[kind][grid_fn(meta)](**kwargs, **meta)
    else:
        autotune = os.environ.get("MMLOSS_TRITON_AUTOTUNE", "1") != "0"
        _tuned(kind, cls, _capability(device), autotune)[grid_fn](**kwargs)


def _small_meta(kind: str, cls: str, device: torch.device) -> Dict[str, object]:
    """Launch settings of the small-batch path: its fixed config (the interpreter's on CPU)."""
    if triton_interpreted():
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


def _temperature_args(
    inv_temp: Optional[torch.Tensor], inv_temp_value: float, device: torch.device
) -> Dict[str, object]:
    """The kernels' 1/tau arguments: a tensor stays on the device (no host sync,
    graph-capturable), a float is passed by value (no fill launch)."""
    if inv_temp is not None:
        # fp32, not kernel_common.inv_temp_tensor's fp64: an fp64 load in grad_tile_kernel
        # spills (sm_90, feat16, tests/kernels/triton/test_triton_compile.py).
        ptr = inv_temp.detach().to(device=device, dtype=torch.float32).reshape(1)
        return dict(inv_temp_ptr=ptr, inv_temp_value=0.0, TEMP_PTR=True)
    as_fp32 = struct.unpack("f", struct.pack("f", float(inv_temp_value)))[0]  # what the kernel sees
    return dict(inv_temp_ptr=_one(device), inv_temp_value=as_fp32, TEMP_PTR=False)


def check_features(f: Fields, symmetric: bool) -> None:
    """ValueError (naming the field) for a hardness penalty or several positives the kernels
    cannot serve: the symmetric one pass takes neither (the public call runs the two
    directions then), several positives need the groups, a scope its owners."""
    multi = f.positive_weights is not None
    hardness = f.hardness_strength > 0.0
    if symmetric and (multi or hardness):
        what = "positive_weights (several positives per row)" if multi else "hardness_strength > 0"
        raise ValueError(f"the symmetric one-pass kernels do not take {what}; run the two directions separately")
    if multi and (f.key_groups is None or f.row_groups is None):
        raise ValueError("positive_weights (several positives per row) needs key_groups and row_groups")
    if hardness:
        if f.hardness_scope not in (HARDNESS_ALL, HARDNESS_OTHERS, HARDNESS_OWN):
            raise ValueError(f"hardness_scope must be 0 (all), 1 (others) or 2 (own); got {f.hardness_scope}")
        if f.hardness_scope != HARDNESS_ALL and (f.row_owners is None or f.key_owners is None):
            raise ValueError("hardness_scope 1 or 2 needs row_owners and key_owners")


def _feature_args(query: torch.Tensor, f: Fields) -> Dict[str, object]:
    """The group, teacher, filter, margin, hardness and multi-positive arguments and
    constexpr flags shared by the loss kernels, by parameter name. Several positives per row
    (MULTI_POS) read the groups for the positive mask; the group mask (HAS_GROUPS) is then
    off, as it removes nothing."""
    dummy = query
    tq, tk = _teacher(f.margin_query), _teacher(f.margin_key)
    fq, fk = _teacher(f.filter_query), _teacher(f.filter_key)
    has_margin = f.margin > 0.0
    adaptive = has_margin and tq is not None
    has_filter = fq is not None
    multi = f.positive_weights is not None
    has_groups = f.key_groups is not None and not multi
    reads_groups = has_groups or multi
    hardness = f.hardness_strength > 0.0
    by_owner = hardness and f.hardness_scope != HARDNESS_ALL
    return dict(
        rg_ptr=f.row_groups if reads_groups else dummy,
        kg_ptr=f.key_groups if reads_groups else dummy,
        ro_ptr=f.row_owners if by_owner else dummy,
        ko_ptr=f.key_owners if by_owner else dummy,
        pw_ptr=f.positive_weights if multi else dummy,
        hardness=float(f.hardness_strength),
        own_scope=int(by_owner and f.hardness_scope == HARDNESS_OWN),
        tq_ptr=tq if adaptive else dummy,
        tk_ptr=tk if adaptive else dummy,
        stride_tq=tq.stride(0) if adaptive else 0,
        stride_tk=tk.stride(0) if adaptive else 0,
        DT=tq.shape[1] if adaptive else 1,
        fq_ptr=fq if has_filter else dummy,
        fk_ptr=fk if has_filter else dummy,
        stride_fq=fq.stride(0) if has_filter else 0,
        stride_fk=fk.stride(0) if has_filter else 0,
        DF=fq.shape[1] if has_filter else 1,
        threshold=float(f.filter_threshold),
        # cos_threshold: cos m, above which f = c; cos_m, sin_m: the fixed margin's.
        margin=float(f.margin),
        cos_threshold=f.cos_threshold,
        cos_m=math.cos(f.margin),
        sin_m=math.sin(f.margin),
        HAS_MARGIN=has_margin,
        ADAPTIVE=adaptive,
        HAS_FILTER=has_filter,
        HAS_GROUPS=has_groups,
        HARDNESS=hardness,
        BY_OWNER=by_owner,
        MULTI_POS=multi,
        PRECISION=_precision(query.dtype),
        T_PRECISION=_precision(tq.dtype) if adaptive else "ieee",
        F_PRECISION=_precision(fq.dtype) if has_filter else "ieee",
        UPCAST=triton_interpreted(),
        SIN_EPS=MARGIN_SIN_EPS,
        SCALED=query.dtype == torch.float32,
    )


def run_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    inv_temp: Optional[torch.Tensor],
    inv_temp_value: float,
    f: Fields,
    symmetric: bool,
):
    """(lse, pos_logit, column lse or None): the body of the forward custom ops (library.py).
    lse and lse_col are fp64 (carried relative to the positive's logit), pos_logit fp32.
    Small batches: the forward kernel alone. Else the norm prologue, the forward kernel over
    (row blocks, column splits) and, with more than one split, `combine_kernel`. Symmetric
    adds a fill of the packed column pairs and `column_lse_kernel`."""
    check_features(f, symmetric)
    query, key = _rows(query), _rows(key)
    (M, D), N = query.shape, key.shape[0]
    dev = query.device
    small = small_batch(M, N)
    splits = 1 if small else forward_splits(M, N, dev)
    lse = torch.empty(M, dtype=torch.float64, device=dev)
    pos_logit = torch.empty(M, dtype=torch.float32, device=dev)
    part_lse, part_pos = lse, pos_logit
    if splits > 1:
        part_lse = torch.empty(splits, M, dtype=torch.float64, device=dev)
        part_pos = torch.empty(splits, M, dtype=torch.float32, device=dev)
    col_acc = torch.full((N,), EMPTY_COLUMN, dtype=torch.int64, device=dev) if symmetric else lse
    temp = _temperature_args(inv_temp, inv_temp_value, dev)
    a, b = (pos_logit, pos_logit) if small else _inv_norms(query, key)
    kwargs = dict(
        q_ptr=query,
        k_ptr=key,
        stride_q=query.stride(0),
        stride_k=key.stride(0),
        M=M,
        N=N,
        D=D,
        a_ptr=a,
        b_ptr=b,
        pos_ptr=f.positives,
        **temp,
        lse_ptr=part_lse,
        pos_logit_ptr=part_pos,
        col_acc_ptr=col_acc,
        SPLITS=splits,
        **_feature_args(query, f),
        M_BUCKET=configs.bucket(M),
        N_BUCKET=configs.bucket(N),
        D_BUCKET=configs.bucket(D),
        FUSED_NORMS=small,
        SYMMETRIC=symmetric,
        EPS=NORM_EPS,
    )
    cls = call_class(query, f, symmetric)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits)  # noqa: E731
    if small:
        meta = _small_meta("forward", cls, dev)
        kernels.forward_kernel[grid(meta)](**kwargs, **meta)
    else:
        _launch("forward", cls, dev, grid, kwargs)
    if splits > 1:
        block = configs.ELEMENTWISE["BLOCK_M"] * 8
        kernels.combine_kernel[(triton.cdiv(M, block),)](
            part_lse_ptr=part_lse,
            part_pos_ptr=part_pos,
            lse_ptr=lse,
            pos_logit_ptr=pos_logit,
            M=M,
            SPLITS=splits,
            BLOCK=block,
        )
    lse_col = None
    if symmetric:
        lse_col = torch.empty(N, dtype=torch.float64, device=dev)
        block = configs.ELEMENTWISE["BLOCK_M"] * 8
        kernels.column_lse_kernel[(triton.cdiv(N, block),)](
            col_acc_ptr=col_acc, pos_logit_ptr=pos_logit, lse_col_ptr=lse_col, N=N, BLOCK=block
        )
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
    if triton_interpreted():
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _inv_norms(query: torch.Tensor, key: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """1 / max(||x_i||, eps) per row of query (M,) and key (N,), fp32, one launch."""
    (M, D), N = query.shape, key.shape[0]
    a = torch.empty(M, dtype=torch.float32, device=query.device)
    b = torch.empty(N, dtype=torch.float32, device=query.device)
    bm, bd = configs.ELEMENTWISE["BLOCK_M"], configs.ELEMENTWISE["BLOCK_D"]
    grid = (triton.cdiv(M, bm) + triton.cdiv(N, bm),)
    kernels.inv_norm_kernel[grid](
        x_ptr=query,
        y_ptr=key,
        a_ptr=a,
        b_ptr=b,
        M=M,
        N=N,
        D=D,
        stride_x=query.stride(0),
        stride_y=key.stride(0),
        BLOCK_M=bm,
        BLOCK_D=bd,
        EPS=NORM_EPS,
    )
    return a, b


def _finish(
    prod: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    inv_norm: torch.Tensor,
    row_sum: torch.Tensor,
    scale: torch.Tensor,
    scaled: bool,
) -> None:
    """out = scale * prod - [||x|| > eps] inv_norm^2 row_sum x (rows of equal count); scaled:
    prod's rows are first multiplied by the powers of two of inv_norm (kernels.cosine_tile)."""
    M, D = x.shape
    bm, bd = configs.ELEMENTWISE["BLOCK_M"], configs.ELEMENTWISE["BLOCK_D"]
    kernels.finish_kernel[(triton.cdiv(M, bm), triton.cdiv(D, bd))](
        prod_ptr=prod,
        x_ptr=x,
        out_ptr=out,
        inv_norm_ptr=inv_norm,
        row_sum_ptr=row_sum,
        scale_ptr=scale,
        M=M,
        D=D,
        stride_prod=prod.stride(0),
        stride_x=x.stride(0),
        stride_out=out.stride(0),
        BLOCK_M=bm,
        BLOCK_D=bd,
        SCALED=scaled,
        EPS=NORM_EPS,
    )


@functools.lru_cache(maxsize=None)
def _one(device: torch.device) -> torch.Tensor:
    """A cached 1-element fp32 one per device: the scratch scale of bf16/fp32 (their range
    holds H = G a b as is), without a launch per call."""
    return torch.ones(1, dtype=torch.float32, device=device)


def _pow2(inv_norm: torch.Tensor) -> torch.Tensor:
    """The powers of two of fp32 inverse norms, as kernels._pow2_split (clamped to normal)."""
    bits = (inv_norm.view(torch.int32) >> 23 & 0xFF).clamp_min(1) << 23
    return bits.view(torch.float32)


def chunk_shape(M: int, N: int, element_size: int) -> Tuple[int, int]:
    """(rows R, columns C) of the chunked backward's R x C scratch: within the budget
    (scratch_bytes("triton")) for every M and N. Whole rows (C = N) while min(M, 128) of
    them fit, R = M or a multiple of 128; beyond that R = min(M, 128) and C the largest
    multiple of 128 that fits (at least 128: the scratch never exceeds max(budget, 128 x 128
    elements))."""
    budget = scratch_bytes("triton")
    rows = rows_within(budget, N * element_size, minimum=128, multiple=128, total=M)
    if rows * N * element_size <= budget or N <= 128:
        return rows, N
    return rows, rows_within(budget, rows * element_size, minimum=128, multiple=128, total=N)


def run_backward(
    query,
    key,
    inv_temp: Optional[torch.Tensor],
    inv_temp_value: float,
    f: Fields,
    lse,
    row_weight,
    need_temp_grad: bool,
    lse_col: Optional[torch.Tensor],
    col_weight: Optional[torch.Tensor],
):
    """(d_query, d_key, d_inv_temp fp32 0-dim): the body of the backward custom ops. The
    small-batch or the chunked path, one direction or (with lse_col and col_weight) both;
    d_inv_temp holds a value only when need_temp_grad."""
    symmetric = lse_col is not None
    check_features(f, symmetric)
    query, key = _rows(query), _rows(key)
    dev = query.device
    weight = row_weight.to(torch.float32).contiguous()
    lse = lse.contiguous()  # fp32 or fp64: the kernels read either and round to fp32
    if symmetric:
        lse_col = lse_col.contiguous()
        col_weight = col_weight.to(torch.float32).contiguous()
    common = dict(
        pos_ptr=f.positives,
        **_temperature_args(inv_temp, inv_temp_value, dev),
        lse_ptr=lse,
        w_ptr=weight,
        lse_col_ptr=lse_col if symmetric else lse,
        v_ptr=col_weight if symmetric else weight,  # dummies
        **_feature_args(query, f),
        NEED_TEMP=bool(need_temp_grad),
        SYMMETRIC=symmetric,
        EPS=NORM_EPS,
    )
    run = _backward_small if small_batch(query.shape[0], key.shape[0]) else _backward_chunked
    d_query, d_key, temp_grad = run(query, key, f, common)
    return d_query, d_key, temp_grad.reshape(())


def _backward_small(query, key, f: Fields, common: Dict[str, object]):
    """Two launches: `grad_tile_kernel` (FUSED: norms in the kernel, H in an fp32 M x N
    scratch, per-tile partial sums, no atomics, no fills), then `grad_gemm_kernel`."""
    (M, D), N = query.shape, key.shape[0]
    dev = query.device
    cls = call_class(query, f, common["SYMMETRIC"])
    tile = _small_meta("grad_tile", cls, dev)
    tiles_m, tiles_n = triton.cdiv(M, tile["BLOCK_M"]), triton.cdiv(N, tile["BLOCK_N"])
    a = torch.empty(M, dtype=torch.float32, device=dev)
    b = torch.empty(N, dtype=torch.float32, device=dev)
    # One allocation; temp_grad first (the op returns it: a view at storage offset 0).
    parts = torch.empty(1 + tiles_n * M + tiles_m * N + tiles_m * tiles_n, dtype=torch.float32, device=dev)
    temp_grad, row_part = parts[:1], parts[1 : 1 + tiles_n * M]
    col_part, temp_part = parts[1 + tiles_n * M : 1 + tiles_n * M + tiles_m * N], parts[1 + tiles_n * M + tiles_m * N :]
    h = torch.empty(M, N, dtype=torch.float32, device=dev)
    kernels.grad_tile_kernel[(tiles_m * tiles_n,)](
        q_ptr=query,
        k_ptr=key,
        stride_q=query.stride(0),
        stride_k=key.stride(0),
        M=M,
        N=N,
        D=D,
        row0=0,
        col0=0,
        a_ptr=a,
        b_ptr=b,
        **common,
        scale_ptr=_one(dev),
        h_ptr=h,
        stride_h=h.stride(0),
        row_sum_ptr=row_part,
        col_sum_ptr=col_part,
        temp_grad_ptr=temp_part,
        M_BUCKET=configs.bucket(M),
        N_BUCKET=configs.bucket(N),
        D_BUCKET=configs.bucket(D),
        FUSED=True,
        GROUP_M=configs.GROUP_M,
        **tile,
    )
    d_query = torch.empty(query.shape, dtype=query.dtype, device=dev)
    d_key = torch.empty(key.shape, dtype=key.dtype, device=dev)
    gemm = _small_meta("grad_gemm", cls, dev)
    d_tiles = triton.cdiv(D, gemm["BLOCK_D"])
    grid = ((triton.cdiv(M, gemm["BLOCK_M"]) + triton.cdiv(N, gemm["BLOCK_M"])) * d_tiles,)
    kernels.grad_gemm_kernel[grid](
        q_ptr=query,
        k_ptr=key,
        stride_q=query.stride(0),
        stride_k=key.stride(0),
        M=M,
        N=N,
        D=D,
        a_ptr=a,
        b_ptr=b,
        w_ptr=common["w_ptr"],
        v_ptr=common["v_ptr"],
        inv_temp_ptr=common["inv_temp_ptr"],
        inv_temp_value=common["inv_temp_value"],
        h_ptr=h,
        stride_h=h.stride(0),
        row_part_ptr=row_part,
        col_part_ptr=col_part,
        temp_part_ptr=temp_part,
        temp_grad_ptr=temp_grad,
        row_parts=tiles_n,
        col_parts=tiles_m,
        temp_parts=tiles_m * tiles_n,
        dq_ptr=d_query,
        dk_ptr=d_key,
        stride_dq=d_query.stride(0),
        stride_dk=d_key.stride(0),
        NEED_TEMP=common["NEED_TEMP"],
        PRECISION=common["PRECISION"],
        UPCAST=common["UPCAST"],
        TEMP_PTR=common["TEMP_PTR"],
        SYMMETRIC=common["SYMMETRIC"],
        SCALE16=query.dtype == torch.float16,
        SCALED=common["SCALED"],
        EPS=NORM_EPS,
        **gemm,
    )
    return d_query, d_key, temp_grad


def _backward_chunked(query, key, f: Fields, common: Dict[str, object]):
    """Per chunk of R rows x C columns (`chunk_shape`): the tile kernel fills an R x C scratch
    H, two cuBLAS GEMMs, the finish kernels (the module docstring). With several column
    chunks dQ_R accumulates in fp32 over them; with several row chunks dK does."""
    (M, D), N = query.shape, key.shape[0]
    dev = query.device
    h_dtype = query.dtype
    a, b = _inv_norms(query, key)
    scale = _one(dev)
    if query.dtype == torch.float16:
        weight_max = common["w_ptr"].abs().amax() + (common["v_ptr"].abs().amax() if common["SYMMETRIC"] else 0.0)
        # 1/tau as the kernels see it (fp32), so that g is fp32 as the in-kernel one (kernels._fp16_scale)
        inv_t = common["inv_temp_ptr"] if common["TEMP_PTR"] else common["inv_temp_value"]
        scale = fp16_scratch_scale(weight_max, a, b, inv_t)
    sums = torch.zeros(1 + M + N, dtype=torch.float32, device=dev)  # one launch for all three
    temp_grad, row_sum, col_sum = sums[:1], sums[1 : 1 + M], sums[1 + M :]

    R, C = chunk_shape(M, N, torch.finfo(h_dtype).bits // 8)
    # The autotune key uses R, the same for every chunk: tuning (whose reset_to_zero clears
    # col_sum and temp_grad) can then only happen on the first chunk, before they hold sums.
    scratch = torch.empty(R, C, dtype=h_dtype, device=dev)
    d_query = torch.empty(query.shape, dtype=query.dtype, device=dev)
    key_acc = None if R >= M and C >= N else torch.zeros(N, D, dtype=torch.float32, device=dev)
    query_acc = None if C >= N else torch.empty(R, D, dtype=torch.float32, device=dev)
    key_prod = None
    cls = call_class(query, f, common["SYMMETRIC"])
    for r0 in range(0, M, R):
        r1 = min(M, r0 + R)
        q_rows = query[r0:r1]
        q_scaled = q_rows * _pow2(a[r0:r1])[:, None] if common["SCALED"] else q_rows
        for c0 in range(0, N, C):
            c1 = min(N, c0 + C)
            h = scratch[: r1 - r0, : c1 - c0]
            kwargs = dict(
                q_ptr=query,
                k_ptr=key,
                stride_q=query.stride(0),
                stride_k=key.stride(0),
                M=r1,
                N=c1,
                D=D,
                row0=r0,
                col0=c0,
                a_ptr=a,
                b_ptr=b,
                **common,
                scale_ptr=scale,
                h_ptr=h,
                stride_h=h.stride(0),
                row_sum_ptr=row_sum,
                col_sum_ptr=col_sum,
                temp_grad_ptr=temp_grad,
                M_BUCKET=configs.bucket(R),
                N_BUCKET=configs.bucket(C),
                D_BUCKET=configs.bucket(D),
                FUSED=False,
                GROUP_M=configs.GROUP_M,
            )
            _launch(
                "grad_tile",
                cls,
                dev,
                lambda meta: (triton.cdiv(r1 - r0, meta["BLOCK_M"]) * triton.cdiv(c1 - c0, meta["BLOCK_N"]),),
                kwargs,
            )
            if query_acc is None:
                prod = torch.mm(h, key)
            else:
                prod = query_acc[: r1 - r0]
                if c0 == 0:
                    torch.mm(h, key[c0:c1], out=prod)
                else:
                    prod.addmm_(h, key[c0:c1])
            # SCALED: H's rows hold a_i / s_i, so dK takes the rows s_i q_i (a copy of R rows).
            key_prod = torch.mm(h.t(), q_scaled)
            if key_acc is not None:
                key_acc[c0:c1].add_(key_prod)
        _finish(prod, q_rows, d_query[r0:r1], a[r0:r1], row_sum[r0:r1], scale, common["SCALED"])
    d_key = torch.empty(key.shape, dtype=key.dtype, device=dev)
    _finish(key_prod if key_acc is None else key_acc, key, d_key, b, col_sum, scale, False)
    return d_query, d_key, temp_grad
