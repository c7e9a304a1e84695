"""Triton kernels of the fused contrastive loss (docs/contract.md §1). Host code lives in `ops.py`.

Shapes: query (M, d) rows, key (N, d) columns, teachers (M, dt)/(N, dt). Every tile is
BLOCK_M x BLOCK_N; the feature dimension is streamed in BLOCK_D chunks, so any d works.
Row offsets are computed in int64 (M x d and the R x N scratch may pass 2^31 elements).

* `inv_norm_kernel`  the prologue: a_i = 1/max(||q_i||, eps), b_j = 1/max(||k_j||, eps) in
                     fp32, one launch for both (no normalised copies of the inputs). The
                     squares are summed in fp64, so every kernel that computes a norm gets
                     the same fp32 bits: the backward's logits reproduce the forward's and
                     exp(logit - lse) sums to 1 to the last bits.
* `forward_kernel`   one program per row block and column split streams its column tiles
                     (splits fill the GPU when rows are few; `combine_kernel` merges
                     their partial lse): per tile one
                     tl.dot (fp32 accumulation) scaled by a_i b_j (`cosine_tile`: fp32 rows
                     scaled by powers of two, exact for any norm), the teacher tiles, the
                     masks, the margin and an online log-sum-exp; writes lse (M,) fp64,
                     relative to the positive's logit, and pos_logit (M,). SYMMETRIC also
                     merges each column's (max, sum) by compare-and-swap in the same pass
                     (`column_lse_kernel` turns them into the column lse). FUSED_NORMS
                     computes the norms itself (small batches: one launch).
* `grad_tile_kernel` one program per tile of a row chunk: recomputes the logits exactly as
                     the forward does and writes
                     H_ij = a_i b_j G_ij / g (G = dLoss/dc) into a scratch for two cuBLAS
                     GEMMs, plus the row/column sums of G*c (normalisation Jacobian) and
                     the 1/tau gradient, by atomics (FUSED: per-tile partials, no atomics).
* `finish_kernel`    out = g * X - [norm > eps] (a r) (a x) (the Jacobian's radial term).
* `grad_gemm_kernel` small batches: dQ = H K and dK = H^T Q with the radial term, in one
                     launch after the FUSED tile kernel (the backward is two launches).

UPCAST (interpreter mode only): the interpreter's bf16 tl.dot is wrong, so the dot
operands are converted to fp32 first. Products of 16-bit numbers are exact in fp32, so this
equals the GPU's fp32-accumulated 16-bit MMA up to summation order.
"""

import triton
import triton.language as tl

NORM_CHUNK = tl.constexpr(16)  # d-chunk of the in-kernel norms (fp64 tiles take many registers)


@triton.jit
def dot_tile(
    x_ptr,
    y_ptr,
    stride_x,
    stride_y,
    rows,
    cols,
    M,
    N,
    D,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) fp32 tile of x[rows] @ y[cols]^T, streaming D in BLOCK_D chunks."""
    return _scaled_dot_tile(
        x_ptr, y_ptr, stride_x, stride_y, rows, cols, M, N, D, 1.0, 1.0, BLOCK_D, PRECISION, UPCAST, False
    )


@triton.jit
def _scaled_dot_tile(
    x_ptr,
    y_ptr,
    stride_x,
    stride_y,
    rows,
    cols,
    M,
    N,
    D,
    sx,
    sy,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALED: tl.constexpr,
):
    """`dot_tile` of (sx_i x_i) . (sy_j y_j) when SCALED (fp32 operands; sx, sy powers of
    two, so the products are exact and the tile is the unscaled one times sx_i sy_j, but
    neither overflows nor underflows for rows of any norm)."""
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
        if SCALED:
            x = x * sx[:, None]
            y = y * sy[None, :]
        acc = dot_acc(x, y, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _pow2_split(inv_norm):
    """(s, inv_norm / s) with s the power of two of inv_norm (clamped to fp32's normal
    range): x * s has norm in (0.5, 1], and inv_norm / s is in [1, 2) (for inv_norm >= 2^-126)."""
    e = tl.maximum((inv_norm.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1)
    s = (e << 23).to(tl.float32, bitcast=True)
    inv_s = ((254 - e) << 23).to(tl.float32, bitcast=True)
    return s, inv_norm * inv_s


@triton.jit
def cosine_tile(
    q_ptr,
    k_ptr,
    stride_q,
    stride_k,
    rows,
    cols,
    M,
    N,
    D,
    a,
    b,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALED: tl.constexpr,
):
    """(c, row factor, column factor): the cosine tile c = <q_i, k_j> a_i b_j and the factors
    that multiply G in H. SCALED (fp32 inputs): rows are brought to unit scale by powers of
    two first, so c is exact for any norm (rows of 1e30 or 1e-30) and the factors are the
    mantissas a/s, b/t (H = G (a/s) (b/t) stays in range; the GEMMs put s and t back).
    Otherwise (16-bit inputs, whose products cannot leave fp32's range for fp16) a and b."""
    if SCALED:
        sa, fa = _pow2_split(a)
        sb, fb = _pow2_split(b)
        c = (
            _scaled_dot_tile(
                q_ptr, k_ptr, stride_q, stride_k, rows, cols, M, N, D, sa, sb, BLOCK_D, PRECISION, UPCAST, True
            )
            * fa[:, None]
            * fb[None, :]
        )
    else:
        fa = a
        fb = b
        c = (
            dot_tile(q_ptr, k_ptr, stride_q, stride_k, rows, cols, M, N, D, BLOCK_D, PRECISION, UPCAST)
            * a[:, None]
            * b[None, :]
        )
    return c, fa, fb


@triton.jit
def dot_acc(x, y, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x @ y with fp32 accumulation; UPCAST (the interpreter) converts the operands to
    fp32 first (see the module docstring)."""
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision=PRECISION)


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
def _logits(
    c,
    rows,
    cols,
    M,
    N,
    pos,
    inv_temp,
    rg_ptr,
    kg_ptr,
    tq_ptr,
    tk_ptr,
    stride_tq,
    stride_tk,
    DT,
    fq_ptr,
    fk_ptr,
    stride_fq,
    stride_fk,
    DF,
    threshold,
    margin,
    cos_threshold,
    cos_m,
    sin_m,
    ro_ptr,
    ko_ptr,
    hardness,
    own_scope,
    HAS_MARGIN: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    HAS_FILTER: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    HARDNESS: tl.constexpr,
    BY_OWNER: tl.constexpr,
    MULTI_POS: tl.constexpr,
    T_PRECISION: tl.constexpr,
    F_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    UPCAST: tl.constexpr,
    SIN_EPS: tl.constexpr,
):
    """From cosines c (BLOCK_M, BLOCK_N): logits (-inf where not allowed, NaN where the
    filter score is NaN), f, f' = df/dc, and the positive mask (docs/contract.md §1).
    MULTI_POS: every column of the row's group is a positive (HAS_GROUPS is then off: the
    group mask removes nothing). HARDNESS: the negatives in scope (all, or with BY_OWNER
    those whose key owner equals the row's owner when own_scope, else differs) get
    + hardness * c on their logit; f and f' (the gradient's factors) do not see it."""
    row_ok = rows < M
    col_ok = cols < N
    if MULTI_POS:
        rg = tl.load(rg_ptr + rows, mask=row_ok, other=-1)
        kg = tl.load(kg_ptr + cols, mask=col_ok, other=-2)
        is_pos = (rg[:, None] == kg[None, :]) & row_ok[:, None] & col_ok[None, :]
    else:
        is_pos = (cols[None, :] == pos[:, None]) & col_ok[None, :]
    f = c
    fprime = tl.full(c.shape, 1.0, tl.float32)
    if HAS_MARGIN:
        if ADAPTIVE:
            t = dot_tile(tq_ptr, tk_ptr, stride_tq, stride_tk, rows, cols, M, N, DT, BLOCK_T, T_PRECISION, UPCAST)
            cm, sm = _cos_sin(margin * (1.0 - t))
        else:
            cm = cos_m
            sm = sin_m
        sin_theta = tl.sqrt(tl.maximum(1.0 - c * c, SIN_EPS))
        moved = (c < cos_threshold) & (~is_pos)
        f = tl.where(moved, c * cm + sin_theta * sm, c)
        fprime = tl.where(moved, cm - c * sm / sin_theta, fprime)
    allowed = row_ok[:, None] & col_ok[None, :]
    if HAS_GROUPS:
        rg = tl.load(rg_ptr + rows, mask=row_ok, other=-1)
        kg = tl.load(kg_ptr + cols, mask=col_ok, other=-2)
        allowed = allowed & ~((rg[:, None] == kg[None, :]) & (~is_pos))
    logit = f * inv_temp
    if HARDNESS:
        penalised = ~is_pos
        if BY_OWNER:
            ro = tl.load(ro_ptr + rows, mask=row_ok, other=-1)
            ko = tl.load(ko_ptr + cols, mask=col_ok, other=-1)
            penalised = penalised & ((ro[:, None] == ko[None, :]) == (own_scope != 0))
        logit = tl.where(penalised, logit + hardness * c, logit)
    if HAS_FILTER:
        s = dot_tile(fq_ptr, fk_ptr, stride_fq, stride_fk, rows, cols, M, N, DF, BLOCK_T, F_PRECISION, UPCAST)
        allowed = allowed & ~((s > threshold) & (~is_pos))
        logit = tl.where(allowed, logit, float("-inf"))
        logit = tl.where((s != s) & row_ok[:, None] & col_ok[None, :], float("nan"), logit)
    else:
        logit = tl.where(allowed, logit, float("-inf"))
    return logit, f, fprime, allowed, is_pos


@triton.jit
def row_inv_norms(x_ptr, stride_x, rows, M, D, BLOCK_D: tl.constexpr, EPS: tl.constexpr):
    """1 / max(||x_i||, EPS) (fp32) of rows `rows` of x. The squares are summed in fp64, so the
    fp32 sum (and all after it) does not depend on the chunking or reduction order: the
    prologue, the fused forward and the fused backward get the same bits (docs/triton.md)."""
    sq = tl.zeros((rows.shape[0],), dtype=tl.float64)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_rows + offs[None, :], mask=(rows < M)[:, None] & (offs < D)[None, :], other=0.0).to(tl.float64)
        sq += tl.sum(x * x, axis=1)
    # sqrt in fp64, then fp32: the squares of fp32 rows of 1e30 overflow fp32, not fp64.
    return _reciprocal(tl.maximum(tl.sqrt(sq).to(tl.float32), EPS))


@triton.jit
def _reciprocal(x):
    """1/x in fp32 without a call: `/` (div.rn.f32) branches to a slow-path subroutine, and
    the values live across that call go to the stack. div.full.f32 (<= 2 ulp for normal x)
    and one Newton step r += r (1 - x r) instead."""
    r = tl.fdiv(1.0, x, ieee_rounding=False)
    return r + r * (1.0 - x * r)


@triton.jit
def inv_norm_kernel(
    x_ptr,
    y_ptr,
    a_ptr,
    b_ptr,
    M,
    N,
    D,
    stride_x,
    stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EPS: tl.constexpr,
):
    """a_i = 1 / max(||x_i||, EPS) for M rows of x and b_j likewise for N rows of y (fp32),
    in one launch: the first cdiv(M, BLOCK_M) programs take x, the rest y."""
    pid = tl.program_id(0)
    x_blocks = tl.cdiv(M, BLOCK_M)
    if pid < x_blocks:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(a_ptr + rows, row_inv_norms(x_ptr, stride_x, rows, M, D, BLOCK_D, EPS), mask=rows < M)
    else:
        rows = (pid - x_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(b_ptr + rows, row_inv_norms(y_ptr, stride_y, rows, N, D, BLOCK_D, EPS), mask=rows < N)


@triton.jit
def _temperature(inv_temp_ptr, inv_temp_value, TEMP_PTR: tl.constexpr):
    """1/tau: read from the device (a learnable tau, no host sync) or passed by value."""
    if TEMP_PTR:
        return tl.load(inv_temp_ptr)
    else:
        return inv_temp_value


@triton.jit
def forward_kernel(
    q_ptr,
    k_ptr,
    stride_q,
    stride_k,
    M,
    N,
    D,
    a_ptr,
    b_ptr,
    pos_ptr,
    inv_temp_ptr,
    inv_temp_value,
    lse_ptr,
    pos_logit_ptr,
    col_acc_ptr,
    SPLITS,
    rg_ptr,
    kg_ptr,
    tq_ptr,
    tk_ptr,
    stride_tq,
    stride_tk,
    DT,
    fq_ptr,
    fk_ptr,
    stride_fq,
    stride_fk,
    DF,
    threshold,
    margin,
    cos_threshold,
    cos_m,
    sin_m,
    ro_ptr,
    ko_ptr,
    pw_ptr,
    hardness,
    own_scope,
    M_BUCKET,
    N_BUCKET,
    D_BUCKET,
    HAS_MARGIN: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    HAS_FILTER: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    HARDNESS: tl.constexpr,
    BY_OWNER: tl.constexpr,
    MULTI_POS: tl.constexpr,
    PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr,
    F_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SIN_EPS: tl.constexpr,
    TEMP_PTR: tl.constexpr,
    FUSED_NORMS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    SCALED: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """lse_i over this key block's allowed columns and the positive's logit (0 if absent).
    Grid (row blocks, SPLITS): program (r, s) covers the s-th of SPLITS equal spans of
    columns (whole tiles) and writes its partial lse and positive logit at [s, i] of
    (SPLITS, M) arrays (`combine_kernel` merges them; with SPLITS = 1 they are the result).
    FUSED_NORMS: a and b are computed here (one launch in all) instead of read from the
    prologue's a_ptr/b_ptr. lse (fp64) is carried relative to the positive's logit
    (`_lse_from_parts`). SYMMETRIC: also merges this row block's (max, off-diagonal sum) of
    each column j into col_acc[j] (packed int64, compare-and-swap), from which
    `column_lse_kernel` takes the column lse. MULTI_POS (several positives per row: the
    columns of the row's group): pos_logit is sum_{j in P_i} pw_i logit_ij over the span
    (pw = positive_weights) and lse is carried relative to it. HARDNESS: see `_logits`.
    M_BUCKET/N_BUCKET/D_BUCKET only key the autotuner."""
    split = tl.program_id(1)
    span = tl.cdiv(tl.cdiv(N, SPLITS), BLOCK_N) * BLOCK_N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    inv_temp = _temperature(inv_temp_ptr, inv_temp_value, TEMP_PTR)
    if FUSED_NORMS:
        a = row_inv_norms(q_ptr, stride_q, rows, M, D, NORM_CHUNK, EPS)
    else:
        a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_off = tl.zeros((BLOCK_M,), dtype=tl.float32)
    run_pos = tl.zeros((BLOCK_M,), dtype=tl.float32)  # MULTI_POS: the positives' sum of exp(logit - max)
    pos_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first = split * span
    last = tl.minimum(N, (split + 1) * span)
    for n0 in range(first, last, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        if FUSED_NORMS:
            b = row_inv_norms(k_ptr, stride_k, cols, N, D, NORM_CHUNK, EPS)
        else:
            b = tl.load(b_ptr + cols, mask=cols < N, other=0.0)
        c, _, _ = cosine_tile(
            q_ptr, k_ptr, stride_q, stride_k, rows, cols, M, N, D, a, b, BLOCK_D, PRECISION, UPCAST, SCALED
        )
        logit, f, fprime, allowed, is_pos = _logits(
            c,
            rows,
            cols,
            M,
            N,
            pos,
            inv_temp,
            rg_ptr,
            kg_ptr,
            tq_ptr,
            tk_ptr,
            stride_tq,
            stride_tk,
            DT,
            fq_ptr,
            fk_ptr,
            stride_fq,
            stride_fk,
            DF,
            threshold,
            margin,
            cos_threshold,
            cos_m,
            sin_m,
            ro_ptr,
            ko_ptr,
            hardness,
            own_scope,
            HAS_MARGIN,
            ADAPTIVE,
            HAS_FILTER,
            HAS_GROUPS,
            HARDNESS,
            BY_OWNER,
            MULTI_POS,
            T_PRECISION,
            F_PRECISION,
            BLOCK_T,
            UPCAST,
            SIN_EPS,
        )
        # A NaN logit (NaN filter score or input) reaches run_off or pos_logit: lse is NaN.
        new_max = tl.maximum(run_max, tl.max(logit, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - shift)
        e = tl.exp(logit - shift[:, None])
        run_off = run_off * rescale + tl.sum(tl.where(is_pos, 0.0, e), axis=1)
        if MULTI_POS:
            run_pos = run_pos * rescale + tl.sum(tl.where(is_pos, e, 0.0), axis=1)
        run_max = new_max
        pos_logit += tl.sum(tl.where(is_pos, logit, 0.0), axis=1)
        if SYMMETRIC:
            # The same (max, off-positive sum) per column of this tile, merged into the
            # column's running pair by compare-and-swap: exact for every tau.
            col_max = tl.max(logit, axis=0)
            col_shift = tl.where(col_max == float("-inf"), 0.0, col_max)
            col_off = tl.sum(tl.where(is_pos, 0.0, tl.exp(logit - col_shift[None, :])), axis=0)
            _merge_columns(col_acc_ptr, cols, N, col_max, col_off)
    if MULTI_POS:
        # pos_logit: sum over this span's positives of positive_weights_i * logit_ij. A span
        # without positives (or whose positives underflow against the max) takes the
        # formula without a positive, which is as accurate there.
        pos_logit = pos_logit * tl.load(pw_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        has_pos = run_pos > 0.0
    else:
        has_pos = (pos >= first) & (pos < last)
    lse = _lse_from_parts(run_max, run_off, pos_logit, has_pos, run_pos, MULTI_POS)
    tl.store(lse_ptr + split * M + rows, lse, mask=row_ok)
    tl.store(pos_logit_ptr + split * M + rows, pos_logit, mask=row_ok)


@triton.jit
def _log1p(x):
    """log(1 + x) for x >= 0 in fp32 with relative accuracy (Goldberg: the rounding of 1 + x
    cancels in log(u) x / (u - 1)); no libdevice call."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _lse_from_parts(top, off, pos_logit, has_pos, pos_sum, MULTI_POS: tl.constexpr):
    """fp64 log-sum-exp of a row (or column) from its max `top`, the sum `off` of exp(logit -
    top) over the entries other than the positive, and the positive's logit (when has_pos).
    With the positive it is pos_logit + loss, loss = delta + log1p(exp(-delta) - 1 + off)
    with delta = top - pos_logit >= 0, so that lse - pos_logit keeps the loss's relative
    accuracy when the row is nearly solved (loss << 1; delta = 0 there). Without it (the
    positive is in another block or the row is ignored): top + log(off).
    MULTI_POS: pos_logit is the weighted sum of the positives' logits and pos_sum their sum
    of exp(logit - top); loss = delta + log1p(pos_sum - 1 + off), exact in real arithmetic
    for any weights. With one positive pos_sum = exp(-delta) (the form above); with
    several (weights 1/|P|) the loss is >= log |P| (Jensen), so nothing cancels."""
    shift = tl.where(top == float("-inf"), 0.0, top)
    delta = tl.where(has_pos, shift - pos_logit, 0.0)
    if MULTI_POS:
        loss = delta + _log1p(pos_sum - 1.0 + off)
    else:
        loss = delta + _log1p(tl.exp(-delta) - 1.0 + off)
    with_pos = pos_logit.to(tl.float64) + loss.to(tl.float64)
    without = shift.to(tl.float64) + tl.log(off).to(tl.float64)
    return tl.where(has_pos, with_pos, without)


@triton.jit
def _pack(m, s):
    """(fp32 max, fp32 sum) in one int64: max in the high word, sum in the low word."""
    hi = m.to(tl.int32, bitcast=True).to(tl.int64)
    lo = s.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return (hi << 32) | lo


@triton.jit
def _unpack(p):
    m = (p >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    s = (p & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    return m, s


@triton.jit
def _merge(m1, s1, m2, s2):
    """The online log-sum-exp merge of (max, sum of exp(x - max)) pairs."""
    m = tl.maximum(m1, m2)
    shift = tl.where(m == float("-inf"), 0.0, m)
    return m, s1 * tl.exp(m1 - shift) + s2 * tl.exp(m2 - shift)


@triton.jit
def _merge_columns(acc_ptr, cols, N, m, s):
    """acc[j] = merge(acc[j], (m_j, s_j)) for the columns j < N, acc holding packed pairs:
    a compare-and-swap loop (a lane retries until its swap saw the value it merged with;
    lanes without a change swap a value with itself, which writes nothing)."""
    live = (cols < N) & ((m > float("-inf")) | (s != s))
    ptr = acc_ptr + tl.minimum(cols, N - 1)
    seen = tl.load(ptr)
    while tl.max(live.to(tl.int32), axis=0) > 0:
        m_old, s_old = _unpack(seen)
        m_new, s_new = _merge(m_old, s_old, m, s)
        want = tl.where(live, _pack(m_new, s_new), seen)
        prev = tl.atomic_cas(ptr, seen, want)
        live = live & (prev != seen)
        seen = prev


@triton.jit
def column_lse_kernel(col_acc_ptr, pos_logit_ptr, lse_col_ptr, N, BLOCK: tl.constexpr):
    """lse_col (N,) fp64 of a symmetric loss from the packed column pairs and the diagonal
    logits (the columns' positives), as `_lse_from_parts`."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    m, s = _unpack(tl.load(col_acc_ptr + cols, mask=ok, other=0))
    pos = tl.load(pos_logit_ptr + cols, mask=ok, other=0.0)
    tl.store(lse_col_ptr + cols, _lse_from_parts(m, s, pos, ok, s, False), mask=ok)


@triton.jit
def combine_kernel(part_lse_ptr, part_pos_ptr, lse_ptr, pos_logit_ptr, M, SPLITS, BLOCK: tl.constexpr):
    """lse_i = log sum_s exp(part_lse[s, i]) in fp64 (so the split holding the positive
    keeps its accuracy relative to the positive's logit) and pos_logit_i = sum_s
    part_pos[s, i] over the forward's column splits (-inf when no split has an allowed
    column; NaN stays NaN)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < M
    top = tl.full((BLOCK,), float("-inf"), tl.float64)
    for s in range(0, SPLITS):
        top = tl.maximum(top, tl.load(part_lse_ptr + s * M + rows, mask=ok, other=float("-inf")))
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    pos = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        total += tl.exp(tl.load(part_lse_ptr + s * M + rows, mask=ok, other=float("-inf")) - shift)
        pos += tl.load(part_pos_ptr + s * M + rows, mask=ok, other=0.0)
    tl.store(lse_ptr + rows, shift + tl.log(total), mask=ok)
    tl.store(pos_logit_ptr + rows, pos, mask=ok)


@triton.jit
def _grouped(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Tile (row, column) of a 1-D program id, row-fastest within bands of GROUP_M row tiles."""
    per_band = GROUP_M * tiles_n
    first_m = (pid // per_band) * GROUP_M
    band_m = tl.minimum(tiles_m - first_m, GROUP_M)
    in_band = pid % per_band
    return first_m + in_band % band_m, in_band // band_m


@triton.jit
def grad_tile_kernel(
    q_ptr,
    k_ptr,
    stride_q,
    stride_k,
    M,
    N,
    D,
    row0,
    col0,
    a_ptr,
    b_ptr,
    pos_ptr,
    inv_temp_ptr,
    inv_temp_value,
    lse_ptr,
    w_ptr,
    lse_col_ptr,
    v_ptr,
    scale_ptr,
    h_ptr,
    stride_h,
    row_sum_ptr,
    col_sum_ptr,
    temp_grad_ptr,
    rg_ptr,
    kg_ptr,
    tq_ptr,
    tk_ptr,
    stride_tq,
    stride_tk,
    DT,
    fq_ptr,
    fk_ptr,
    stride_fq,
    stride_fk,
    DF,
    threshold,
    margin,
    cos_threshold,
    cos_m,
    sin_m,
    ro_ptr,
    ko_ptr,
    pw_ptr,
    hardness,
    own_scope,
    M_BUCKET,
    N_BUCKET,
    D_BUCKET,
    HAS_MARGIN: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    HAS_FILTER: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    HARDNESS: tl.constexpr,
    BY_OWNER: tl.constexpr,
    MULTI_POS: tl.constexpr,
    NEED_TEMP: tl.constexpr,
    PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr,
    F_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SIN_EPS: tl.constexpr,
    TEMP_PTR: tl.constexpr,
    FUSED: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    SCALED: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One tile of rows [row0, M) x columns [col0, N): G_ij = d_ij f'_ij / tau with
    d_ij = w_i (P_ij - delta_ij) [+ v_j (Q_ij - delta_ij) if SYMMETRIC], P = exp(logit - lse_i),
    Q = exp(logit - lse_col_j); MULTI_POS: delta_ij = pw_i [j in P_i]. The hardness term of
    the logit changes P only (it carries no gradient: f' and f are the unpenalised ones).
    Stores H = a_i b_j G / scale at h[i - row0, j - col0] and adds sum_j G c to row_sum[i],
    sum_i G c to col_sum[j], sum d f to temp_grad (atomics).
    FUSED (the small-batch path, row0 = col0 = 0): a, b computed here (tiles of the first column /
    row store them), H unscaled in fp32, and the three sums written per tile without atomics
    into row_sum[pid_n, i], col_sum[pid_m, j], temp_grad[tile] for `grad_gemm_kernel`.
    1-D grid over tiles, GROUP_M row tiles at a time (the CTAs in flight share K tiles in L2)."""
    tile = tl.program_id(0)
    pid_m, pid_n = _grouped(tile, tl.cdiv(M - row0, BLOCK_M), tl.cdiv(N - col0, BLOCK_N), GROUP_M)
    rows = row0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    inv_temp = _temperature(inv_temp_ptr, inv_temp_value, TEMP_PTR)
    if FUSED:
        a = row_inv_norms(q_ptr, stride_q, rows, M, D, NORM_CHUNK, EPS)
        b = row_inv_norms(k_ptr, stride_k, cols, N, D, NORM_CHUNK, EPS)
    else:
        a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
    c, fa, fb = cosine_tile(
        q_ptr, k_ptr, stride_q, stride_k, rows, cols, M, N, D, a, b, BLOCK_D, PRECISION, UPCAST, SCALED
    )
    logit, f, fprime, allowed, is_pos = _logits(
        c,
        rows,
        cols,
        M,
        N,
        pos,
        inv_temp,
        rg_ptr,
        kg_ptr,
        tq_ptr,
        tk_ptr,
        stride_tq,
        stride_tk,
        DT,
        fq_ptr,
        fk_ptr,
        stride_fq,
        stride_fk,
        DF,
        threshold,
        margin,
        cos_threshold,
        cos_m,
        sin_m,
        ro_ptr,
        ko_ptr,
        hardness,
        own_scope,
        HAS_MARGIN,
        ADAPTIVE,
        HAS_FILTER,
        HAS_GROUPS,
        HARDNESS,
        BY_OWNER,
        MULTI_POS,
        T_PRECISION,
        F_PRECISION,
        BLOCK_T,
        UPCAST,
        SIN_EPS,
    )
    kept = allowed | (logit != logit)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
    if MULTI_POS:
        pw = tl.load(pw_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        positive = tl.where(is_pos, pw[:, None], 0.0)
    else:
        positive = is_pos.to(tl.float32)
    d_logit = w[:, None] * (tl.where(kept, tl.exp(logit - lse[:, None]), 0.0) - positive)
    if SYMMETRIC:
        lse_col = tl.load(lse_col_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + cols, mask=col_ok, other=0.0)
        d_logit += v[None, :] * (tl.where(kept, tl.exp(logit - lse_col[None, :]), 0.0) - positive)
    g = d_logit * fprime * inv_temp
    gc = g * c
    h_rows = (rows - row0).to(tl.int64)
    h_at = h_ptr + h_rows[:, None] * stride_h + (cols - col0)[None, :]
    if FUSED:
        tl.store(h_at, g * fa[:, None] * fb[None, :], mask=row_ok[:, None] & col_ok[None, :])
        tl.store(row_sum_ptr + pid_n * M + rows, tl.sum(gc, axis=1), mask=row_ok)
        tl.store(col_sum_ptr + pid_m * N + cols, tl.sum(gc, axis=0), mask=col_ok)
        if NEED_TEMP:
            tl.store(temp_grad_ptr + tile, tl.sum(tl.sum(d_logit * f, axis=1), axis=0))
        if pid_n == 0:
            tl.store(a_ptr + rows, a, mask=row_ok)
        if pid_m == 0:
            tl.store(b_ptr + cols, b, mask=col_ok)
    else:
        h = g * (fa / tl.load(scale_ptr))[:, None] * b[None, :]
        tl.store(h_at, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        tl.atomic_add(row_sum_ptr + rows, tl.sum(gc, axis=1), mask=row_ok)
        tl.atomic_add(col_sum_ptr + cols, tl.sum(gc, axis=0), mask=col_ok)
        if NEED_TEMP:
            tl.atomic_add(temp_grad_ptr, tl.sum(tl.sum(d_logit * f, axis=1), axis=0))


@triton.jit
def _regular_max(x_ptr, n, BLOCK: tl.constexpr, EPS: tl.constexpr):
    """max of the inverse norms x[:n] below 1/EPS (rows of norm <= EPS left out), >= 0."""
    best = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        best = tl.maximum(best, tl.where(x < 1.0 / EPS, x, 0.0))
    return tl.max(best, axis=0)


@triton.jit
def _abs_max(x_ptr, n, BLOCK: tl.constexpr):
    best = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        best = tl.maximum(best, tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0)))
    return tl.max(best, axis=0)


@triton.jit
def _fp16_scale(
    w_ptr, v_ptr, a_ptr, b_ptr, M, N, inv_temp, SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr, EPS: tl.constexpr
):
    """g = (max|w| [+ max|v|]) max(a) max(b) / tau, in-kernel for the small-batch path: the
    chunked path's host forms the same g with kernel_common.fp16_scratch_scale. |H / g| <= |f'|."""
    weight = _abs_max(w_ptr, M, BLOCK)
    if SYMMETRIC:
        weight += _abs_max(v_ptr, N, BLOCK)
    g = weight * _regular_max(a_ptr, M, BLOCK, EPS) * _regular_max(b_ptr, N, BLOCK, EPS)
    return tl.maximum(g * tl.abs(inv_temp), 1e-30)


@triton.jit
def _sum_parts(part_ptr, idx, n, parts):
    """sum over p < parts of part[p, idx] (rows of length n)."""
    total = tl.zeros(idx.shape, dtype=tl.float32)
    for p in range(0, parts):
        total += tl.load(part_ptr + p * n + idx, mask=idx < n, other=0.0)
    return total


@triton.jit
def _finish_tile(out_ptr, stride_out, x_ptr, stride_x, idx, offs, n, D, acc, scale, inv_norm, r, EPS: tl.constexpr):
    """out = scale * acc - [||x|| > EPS] (inv_norm r) (inv_norm x) on rows idx, columns offs
    of d (inv_norm x is the unit row: no inv_norm^2, which underflows for rows of 1e30)."""
    mask = (idx < n)[:, None] & (offs < D)[None, :]
    r64 = idx.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * stride_x + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    coef = tl.where(inv_norm < 1.0 / EPS, inv_norm * r, 0.0)
    out = scale * acc - coef[:, None] * (inv_norm[:, None] * x)
    tl.store(out_ptr + r64 * stride_out + offs[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grad_gemm_kernel(
    q_ptr,
    k_ptr,
    stride_q,
    stride_k,
    M,
    N,
    D,
    a_ptr,
    b_ptr,
    w_ptr,
    v_ptr,
    inv_temp_ptr,
    inv_temp_value,
    h_ptr,
    stride_h,
    row_part_ptr,
    col_part_ptr,
    temp_part_ptr,
    temp_grad_ptr,
    row_parts,
    col_parts,
    temp_parts,
    dq_ptr,
    dk_ptr,
    stride_dq,
    stride_dk,
    NEED_TEMP: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    TEMP_PTR: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    SCALE16: tl.constexpr,
    SCALED: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The small-batch backward's second and last launch, after `grad_tile_kernel` (FUSED):
    the first cdiv(M, BLOCK_M) * cdiv(D, BLOCK_D) programs form dQ tiles = H K, the others dK
    tiles = H^T Q, each with the normalisation Jacobian's radial term from the summed
    partials; program 0 also sums the 1/tau gradient. H (M, N) is fp32; it enters the MMA in
    the inputs' dtype (divided by g for fp16, as in the chunked path). SCALED (fp32): H holds
    G (a/s)(b/t) (`cosine_tile`), so y's rows enter the MMA times their power of two and the
    result is multiplied by the output rows' one."""
    pid = tl.program_id(0)
    d_tiles = tl.cdiv(D, BLOCK_D)
    q_tiles = tl.cdiv(M, BLOCK_M) * d_tiles
    g = 1.0
    if SCALE16:
        g = _fp16_scale(
            w_ptr, v_ptr, a_ptr, b_ptr, M, N, _temperature(inv_temp_ptr, inv_temp_value, TEMP_PTR), SYMMETRIC, 1024, EPS
        )
    inv_g = _reciprocal(g)
    if pid < q_tiles:
        _gradient_tile(
            pid,
            d_tiles,
            h_ptr,
            stride_h,
            k_ptr,
            stride_k,
            q_ptr,
            stride_q,
            dq_ptr,
            stride_dq,
            row_part_ptr,
            row_parts,
            a_ptr,
            b_ptr,
            M,
            N,
            D,
            g,
            inv_g,
            False,
            PRECISION,
            UPCAST,
            SCALED,
            EPS,
            BLOCK_M,
            BLOCK_D,
            BLOCK_K,
        )
        if NEED_TEMP:
            if pid == 0:
                total = tl.zeros((1024,), dtype=tl.float32)
                for t0 in range(0, temp_parts, 1024):
                    t = t0 + tl.arange(0, 1024)
                    total += tl.load(temp_part_ptr + t, mask=t < temp_parts, other=0.0)
                tl.store(temp_grad_ptr, tl.sum(total, axis=0))
    else:
        _gradient_tile(
            pid - q_tiles,
            d_tiles,
            h_ptr,
            stride_h,
            q_ptr,
            stride_q,
            k_ptr,
            stride_k,
            dk_ptr,
            stride_dk,
            col_part_ptr,
            col_parts,
            b_ptr,
            a_ptr,
            N,
            M,
            D,
            g,
            inv_g,
            True,
            PRECISION,
            UPCAST,
            SCALED,
            EPS,
            BLOCK_M,
            BLOCK_D,
            BLOCK_K,
        )


@triton.jit
def _gradient_tile(
    tile,
    d_tiles,
    h_ptr,
    stride_h,
    y_ptr,
    stride_y,
    x_ptr,
    stride_x,
    out_ptr,
    stride_out,
    part_ptr,
    parts,
    inv_norm_ptr,
    y_inv_norm_ptr,
    n_idx,
    n_inner,
    D,
    g,
    inv_g,
    TRANSPOSED: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALED: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile `tile` of out = g (H y) (TRANSPOSED: g (H^T y)) minus the radial term of x, whose
    rows idx have the inverse norms inv_norm and radial sums spread over `parts` partials
    (y's rows have y_inv_norm: SCALED uses their powers of two, see grad_gemm_kernel)."""
    idx = (tile // d_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = (tile % d_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = _h_product(
        h_ptr,
        stride_h,
        y_ptr,
        stride_y,
        y_inv_norm_ptr,
        idx,
        offs,
        n_idx,
        n_inner,
        D,
        inv_g,
        TRANSPOSED,
        PRECISION,
        UPCAST,
        SCALED,
        BLOCK_M,
        BLOCK_D,
        BLOCK_K,
    )
    r = _sum_parts(part_ptr, idx, n_idx, parts)
    inv_norm = tl.load(inv_norm_ptr + idx, mask=idx < n_idx, other=0.0)
    if SCALED:
        s, _ = _pow2_split(inv_norm)
        acc = acc * s[:, None]
    _finish_tile(out_ptr, stride_out, x_ptr, stride_x, idx, offs, n_idx, D, acc, g, inv_norm, r, EPS)


@triton.jit
def _h_product(
    h_ptr,
    stride_h,
    y_ptr,
    stride_y,
    y_inv_norm_ptr,
    idx,
    offs,
    n_idx,
    n_inner,
    D,
    inv_g,
    TRANSPOSED: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BLOCK_M, BLOCK_D) fp32 tile of H y (rows idx of H (n_idx, n_inner)) or, TRANSPOSED, of
    H^T y (columns idx of H (n_inner, n_idx)), over y's d-chunk offs. H (fp32) is scaled by
    inv_g and rounded to y's dtype for the MMA."""
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    idx_ok = idx < n_idx
    for k0 in range(0, n_inner, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ks_ok = ks < n_inner
        if TRANSPOSED:
            h = tl.load(
                h_ptr + ks.to(tl.int64)[:, None] * stride_h + idx[None, :],
                mask=ks_ok[:, None] & idx_ok[None, :],
                other=0.0,
            )
            h = tl.trans((h * inv_g).to(y_ptr.dtype.element_ty))
        else:
            h = tl.load(
                h_ptr + idx.to(tl.int64)[:, None] * stride_h + ks[None, :],
                mask=idx_ok[:, None] & ks_ok[None, :],
                other=0.0,
            )
            h = (h * inv_g).to(y_ptr.dtype.element_ty)
        y = tl.load(
            y_ptr + ks.to(tl.int64)[:, None] * stride_y + offs[None, :],
            mask=ks_ok[:, None] & (offs < D)[None, :],
            other=0.0,
        )
        if SCALED:
            sy, _ = _pow2_split(tl.load(y_inv_norm_ptr + ks, mask=ks_ok, other=0.0))
            y = y * sy[:, None]
        acc = dot_acc(h, y, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def finish_kernel(
    prod_ptr,
    x_ptr,
    out_ptr,
    inv_norm_ptr,
    row_sum_ptr,
    scale_ptr,
    M,
    D,
    stride_prod,
    stride_x,
    stride_out,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SCALED: tl.constexpr,
    EPS: tl.constexpr,
):
    """out_i = scale * prod_i - [||x_i|| > EPS] a_i^2 r_i x_i: the gradient through
    x / max(||x||, EPS), given prod = (H @ other) and r_i = sum_j G_ij c_ij. SCALED: H's rows
    held a_i / s_i (fp32, `cosine_tile`), so prod_i is multiplied by s_i first."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    a = tl.load(inv_norm_ptr + rows, mask=row_ok, other=0.0)
    r = tl.load(row_sum_ptr + rows, mask=row_ok, other=0.0)
    prod = tl.load(
        prod_ptr + rows.to(tl.int64)[:, None] * stride_prod + offs[None, :],
        mask=row_ok[:, None] & (offs < D)[None, :],
        other=0.0,
    ).to(tl.float32)
    if SCALED:
        s, _ = _pow2_split(a)
        prod = prod * s[:, None]
    _finish_tile(out_ptr, stride_out, x_ptr, stride_x, rows, offs, M, D, prod, tl.load(scale_ptr), a, r, EPS)
