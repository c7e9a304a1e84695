"""Triton kernels of the fused contrastive loss (SPEC §1). Host code lives in `ops.py`.

Shapes: query (M, d) rows, key (N, d) columns, teachers (M, dt)/(N, dt). Every tile is
BLOCK_M x BLOCK_N; the feature dimension is streamed in BLOCK_D chunks, so any d works.
Row offsets are computed in int64 (M x d and the R x N scratch may pass 2^31 elements).

* `inv_norm_kernel`  the prologue: a_i = 1/max(||q_i||, eps), b_j = 1/max(||k_j||, eps) in
                     fp32, one launch for both (no normalised copies of the inputs).
                     Forward and backward use these same numbers, so the backward's logits
                     reproduce the forward's and exp(logit - lse) sums to 1 to the last bits.
* `forward_kernel`   one program per row block streams all column tiles: per tile one
                     tl.dot (fp32 accumulation) scaled by a_i b_j, the teacher tiles, the
                     masks, the margin and an online log-sum-exp; writes lse (M,) and
                     pos_logit (M,).
* `grad_tile_kernel` one program per tile of a row chunk: recomputes the logits exactly as
                     the forward does and writes
                     H_ij = a_i b_j G_ij / g (G = dLoss/dc) into a scratch for two cuBLAS
                     GEMMs, plus the row/column sums of G*c (normalisation Jacobian) and
                     the 1/tau gradient, by atomics.
* `finish_kernel`    out = g * X - [norm > eps] a^2 r * x (the Jacobian's radial term).

UPCAST (interpreter mode only): the interpreter's bf16 tl.dot is wrong, so the dot
operands are converted to fp32 first. Products of 16-bit numbers are exact in fp32, so this
equals the GPU's fp32-accumulated 16-bit MMA up to summation order.
"""

import triton
import triton.language as tl


@triton.jit
def _dot_tile(x_ptr, y_ptr, stride_x, stride_y, rows, cols, M, N, D,
              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of x[rows] @ y[cols]^T, streaming D in BLOCK_D chunks."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    y_cols = y_ptr + cols.to(tl.int64)[None, :] * stride_y
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs < D
        x = tl.load(x_rows + offs[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(y_cols + offs[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _cos_sin(x):
    """(cos x, sin x) for x in [0, pi) by Taylor series around pi/2 (|y| <= pi/2, error
    < 1e-9): no libdevice call, whose slow argument-reduction path costs stack space."""
    y = x - 1.5707963267948966
    y2 = y * y
    s = y2 * (1.0 / 6227020800.0) - 1.0 / 39916800.0
    s = s * y2 + 1.0 / 362880.0
    s = s * y2 - 1.0 / 5040.0
    s = s * y2 + 1.0 / 120.0
    s = s * y2 - 1.0 / 6.0
    sin_y = y + y * y2 * s
    c = y2 * (-1.0 / 20922789888000.0) + 1.0 / 87178291200.0
    c = c * y2 - 1.0 / 479001600.0
    c = c * y2 + 1.0 / 3628800.0
    c = c * y2 - 1.0 / 40320.0
    c = c * y2 + 1.0 / 720.0
    c = c * y2 - 1.0 / 24.0
    c = c * y2 + 0.5
    cos_y = 1.0 - y2 * c
    return -sin_y, cos_y


@triton.jit
def _logits(c, rows, cols, M, N, pos, inv_temp,
            rg_ptr, kg_ptr,
            tq_ptr, tk_ptr, stride_tq, stride_tk, DT,
            fq_ptr, fk_ptr, stride_fq, stride_fk, DF, threshold,
            margin, cos_margin, cos_m, sin_m,
            HAS_MARGIN: tl.constexpr, ADAPTIVE: tl.constexpr, HAS_FILTER: tl.constexpr,
            HAS_GROUPS: tl.constexpr, T_PRECISION: tl.constexpr, F_PRECISION: tl.constexpr,
            BLOCK_T: tl.constexpr, UPCAST: tl.constexpr, SIN_EPS: tl.constexpr):
    """From cosines c (BLOCK_M, BLOCK_N): logits (-inf where not allowed, NaN where the
    filter score is NaN), f, f' = df/dc, and the positive mask (SPEC §1)."""
    row_ok = rows < M
    col_ok = cols < N
    is_pos = (cols[None, :] == pos[:, None]) & col_ok[None, :]
    f = c
    fprime = tl.full(c.shape, 1.0, tl.float32)
    if HAS_MARGIN:
        if ADAPTIVE:
            t = _dot_tile(tq_ptr, tk_ptr, stride_tq, stride_tk, rows, cols, M, N, DT,
                          BLOCK_T, T_PRECISION, UPCAST)
            cm, sm = _cos_sin(margin * (1.0 - t))
        else:
            cm = cos_m
            sm = sin_m
        sin_theta = tl.sqrt(tl.maximum(1.0 - c * c, SIN_EPS))
        moved = (c < cos_margin) & (~is_pos)
        f = tl.where(moved, c * cm + sin_theta * sm, c)
        fprime = tl.where(moved, cm - c * sm / sin_theta, fprime)
    allowed = row_ok[:, None] & col_ok[None, :]
    if HAS_GROUPS:
        rg = tl.load(rg_ptr + rows, mask=row_ok, other=-1)
        kg = tl.load(kg_ptr + cols, mask=col_ok, other=-2)
        allowed = allowed & ~((rg[:, None] == kg[None, :]) & (~is_pos))
    logit = f * inv_temp
    if HAS_FILTER:
        s = _dot_tile(fq_ptr, fk_ptr, stride_fq, stride_fk, rows, cols, M, N, DF,
                      BLOCK_T, F_PRECISION, UPCAST)
        allowed = allowed & ~((s > threshold) & (~is_pos))
        logit = tl.where(allowed, logit, float("-inf"))
        logit = tl.where((s != s) & row_ok[:, None] & col_ok[None, :], float("nan"), logit)
    else:
        logit = tl.where(allowed, logit, float("-inf"))
    return logit, f, fprime, allowed, is_pos


@triton.jit
def _inv_norms(x_ptr, out_ptr, stride_x, rows, M, D, BLOCK_D: tl.constexpr, EPS: tl.constexpr):
    sq = tl.zeros((rows.shape[0],), dtype=tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_rows + offs[None, :],
                    mask=(rows < M)[:, None] & (offs < D)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows, 1.0 / tl.maximum(tl.sqrt(sq), EPS), mask=rows < M)


@triton.jit
def inv_norm_kernel(x_ptr, y_ptr, a_ptr, b_ptr, M, N, D, stride_x, stride_y,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EPS: tl.constexpr):
    """a_i = 1 / max(||x_i||, EPS) for M rows of x and b_j likewise for N rows of y (fp32),
    in one launch: the first cdiv(M, BLOCK_M) programs take x, the rest y."""
    pid = tl.program_id(0)
    x_blocks = tl.cdiv(M, BLOCK_M)
    if pid < x_blocks:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        _inv_norms(x_ptr, a_ptr, stride_x, rows, M, D, BLOCK_D, EPS)
    else:
        rows = (pid - x_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        _inv_norms(y_ptr, b_ptr, stride_y, rows, N, D, BLOCK_D, EPS)


@triton.jit
def forward_kernel(q_ptr, k_ptr, stride_q, stride_k, M, N, D, a_ptr, b_ptr,
                   pos_ptr, inv_temp_ptr, lse_ptr, pos_logit_ptr,
                   rg_ptr, kg_ptr,
                   tq_ptr, tk_ptr, stride_tq, stride_tk, DT,
                   fq_ptr, fk_ptr, stride_fq, stride_fk, DF, threshold,
                   margin, cos_margin, cos_m, sin_m,
                   M_BUCKET, N_BUCKET, D_BUCKET,
                   HAS_MARGIN: tl.constexpr, ADAPTIVE: tl.constexpr, HAS_FILTER: tl.constexpr,
                   HAS_GROUPS: tl.constexpr, PRECISION: tl.constexpr,
                   T_PRECISION: tl.constexpr, F_PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr, SIN_EPS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """lse_i over this key block's allowed columns and the positive's logit (0 if absent).
    M_BUCKET/N_BUCKET/D_BUCKET only key the autotuner."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    inv_temp = tl.load(inv_temp_ptr)
    a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        b = tl.load(b_ptr + cols, mask=cols < N, other=0.0)
        c = _dot_tile(q_ptr, k_ptr, stride_q, stride_k, rows, cols, M, N, D,
                      BLOCK_D, PRECISION, UPCAST) * a[:, None] * b[None, :]
        logit, f, fprime, allowed, is_pos = _logits(
            c, rows, cols, M, N, pos, inv_temp, rg_ptr, kg_ptr,
            tq_ptr, tk_ptr, stride_tq, stride_tk, DT, fq_ptr, fk_ptr, stride_fq, stride_fk, DF,
            threshold, margin, cos_margin, cos_m, sin_m, HAS_MARGIN, ADAPTIVE, HAS_FILTER,
            HAS_GROUPS, T_PRECISION, F_PRECISION, BLOCK_T, UPCAST, SIN_EPS)
        # A NaN logit (NaN filter score or input) reaches run_sum through exp: lse is NaN.
        new_max = tl.maximum(run_max, tl.max(logit, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(logit - shift[:, None]), axis=1)
        run_max = new_max
        pos_logit += tl.sum(tl.where(is_pos, logit, 0.0), axis=1)
    shift = tl.where(run_max == float("-inf"), 0.0, run_max)
    lse = shift + tl.log(run_sum)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(pos_logit_ptr + rows, pos_logit, mask=row_ok)


@triton.jit
def _grouped(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Tile (row, column) of a 1-D program id, row-fastest within bands of GROUP_M row tiles."""
    per_band = GROUP_M * tiles_n
    first_m = (pid // per_band) * GROUP_M
    band_m = tl.minimum(tiles_m - first_m, GROUP_M)
    in_band = pid % per_band
    return first_m + in_band % band_m, in_band // band_m


@triton.jit
def grad_tile_kernel(q_ptr, k_ptr, stride_q, stride_k, M, N, D, row0, a_ptr, b_ptr,
                     pos_ptr, inv_temp_ptr, lse_ptr, w_ptr, scale_ptr,
                     h_ptr, stride_h, row_sum_ptr, col_sum_ptr, temp_grad_ptr,
                     rg_ptr, kg_ptr,
                     tq_ptr, tk_ptr, stride_tq, stride_tk, DT,
                     fq_ptr, fk_ptr, stride_fq, stride_fk, DF, threshold,
                     margin, cos_margin, cos_m, sin_m,
                     M_BUCKET, N_BUCKET, D_BUCKET,
                     HAS_MARGIN: tl.constexpr, ADAPTIVE: tl.constexpr, HAS_FILTER: tl.constexpr,
                     HAS_GROUPS: tl.constexpr, NEED_TEMP: tl.constexpr, PRECISION: tl.constexpr,
                     T_PRECISION: tl.constexpr, F_PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr, SIN_EPS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_T: tl.constexpr, GROUP_M: tl.constexpr):
    """One tile of rows [row0, M) x columns: G_ij = w_i (P_ij - delta_ij) f'_ij / tau with
    P = exp(logit - lse_i); stores H = a_i b_j G / scale at h[i - row0, j]; adds
    sum_j G c to row_sum[i], sum_i G c to col_sum[j], sum w (P - delta) f to temp_grad.
    1-D grid over tiles, GROUP_M row tiles at a time (the CTAs in flight share K tiles in L2)."""
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M - row0, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = row0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    inv_temp = tl.load(inv_temp_ptr)
    a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
    c = _dot_tile(q_ptr, k_ptr, stride_q, stride_k, rows, cols, M, N, D,
                  BLOCK_D, PRECISION, UPCAST) * a[:, None] * b[None, :]
    logit, f, fprime, allowed, is_pos = _logits(
        c, rows, cols, M, N, pos, inv_temp, rg_ptr, kg_ptr,
        tq_ptr, tk_ptr, stride_tq, stride_tk, DT, fq_ptr, fk_ptr, stride_fq, stride_fk, DF,
        threshold, margin, cos_margin, cos_m, sin_m, HAS_MARGIN, ADAPTIVE, HAS_FILTER,
        HAS_GROUPS, T_PRECISION, F_PRECISION, BLOCK_T, UPCAST, SIN_EPS)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
    prob = tl.where(allowed | (logit != logit), tl.exp(logit - lse[:, None]), 0.0)
    d_logit = w[:, None] * (prob - is_pos.to(tl.float32))
    g = d_logit * fprime * inv_temp
    inv_scale = 1.0 / tl.load(scale_ptr)
    h = g * (a * inv_scale)[:, None] * b[None, :]
    h_rows = (rows - row0).to(tl.int64)
    tl.store(h_ptr + h_rows[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    gc = g * c
    tl.atomic_add(row_sum_ptr + rows, tl.sum(gc, axis=1), mask=row_ok)
    tl.atomic_add(col_sum_ptr + cols, tl.sum(gc, axis=0), mask=col_ok)
    if NEED_TEMP:
        tl.atomic_add(temp_grad_ptr, tl.sum(tl.sum(d_logit * f, axis=1), axis=0))


@triton.jit
def finish_kernel(prod_ptr, x_ptr, out_ptr, inv_norm_ptr, row_sum_ptr, scale_ptr, M, D,
                  stride_prod, stride_x, stride_out,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EPS: tl.constexpr):
    """out_i = scale * prod_i - [||x_i|| > EPS] a_i^2 r_i x_i: the gradient through
    x / max(||x||, EPS), given prod = (H @ other) and r_i = sum_j G_ij c_ij."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    mask = row_ok[:, None] & (offs < D)[None, :]
    a = tl.load(inv_norm_ptr + rows, mask=row_ok, other=0.0)
    r = tl.load(row_sum_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.where(a < 1.0 / EPS, a * a * r, 0.0)
    r64 = rows.to(tl.int64)[:, None]
    prod = tl.load(prod_ptr + r64 * stride_prod + offs[None, :], mask=mask, other=0.0)
    x = tl.load(x_ptr + r64 * stride_x + offs[None, :], mask=mask, other=0.0)
    out = tl.load(scale_ptr) * prod.to(tl.float32) - coef[:, None] * x.to(tl.float32)
    tl.store(out_ptr + r64 * stride_out + offs[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
