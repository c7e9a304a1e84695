"""Static cost model of the Triton backend on an H200: FLOPs and bytes per kernel, and the
time they imply with the rates measured on that GPU (bf16 GEMM on random data, device copy)
as ceilings. No GPU needed; the GPU benchmark prints it beside each measured row.

    python bench/static_model.py [--d 256 768] [--teacher-width 0] [--dtype-bytes 2] [--symmetric]
                                 [--features plain] [--csv out.csv]

Per step (forward + backward, M = N rows and columns, bf16 inputs):
  prologue   inverse norms of Q and K                      bytes (M+N)d·e
  forward    S tiles: 2MNd MMA flops (+2MN·dt per teacher) bytes Q + K once per wave of CTAs;
             (row blocks x column splits) programs, enough for two per SM (+1 combine launch)
  grad_tile  recomputes S, writes H (M×N, e bytes)         same flops, + MN·e bytes written
  gemm_dq    dQ = H K   (cuBLAS)                           2MNd, reads H
  gemm_dk    dK = Hᵀ Q  (cuBLAS)                           2MNd, reads H
  finish     radial Jacobian term                          (M+N)d·(2e+e) bytes
  dk_accum   only when H is split into row chunks (R = budget / (N e) rows): per chunk the
             partial dK (N×d, e bytes) is written, read and added to an fp32 accumulator
Small batches (M, N <= SMALL_MAX = 2048) take the small path instead (the Triton backend
only; the CUDA backend has none and is modelled as chunked at every N): the forward computes
the norms itself (one launch; fp64 sums: each row block re-reads K), grad_tile computes its
tile's norms and writes H in fp32 with per-tile partial sums, grad_gemm forms dQ and dK
with the radial term (two backward launches, no prologue, no fills, no cuBLAS).
--symmetric: both directions in one pass: a second exp per element in the forward (column
sums) and in grad_tile (the column softmax), nothing else.
Each kernel's time = max(MMA time, HBM time) + epilogue time (the exp/ALU work on CUDA cores
is not overlapped with the MMAs in these kernels: a conservative assumption), plus one
launch latency per kernel. "floor" = 3 GEMMs of 2MNd at the MMA ceiling (docs/performance.md's floor).

Anchors (`predict`): eager = a roofline of the dense loss (3 GEMMs at the MMA ceiling, or on
CUDA cores for fp32, plus EAGER_PASSES reads or writes of each N × N element at the copy
rate); cut-cross-entropy = 4 GEMMs at the MMA ceiling (forward, recompute, dE, dC; its
gradient filtering may skip part of the last three). Both are lower bounds, not models of
those kernels. torch.compile and Inf-CL are not modelled.
"""

from __future__ import annotations

import argparse
import csv
import math
from typing import Dict, List

# Ceilings of an H200 (the H100's SMs and clocks, HBM3e). MMA and HBM are rates measured on
# such a machine (8192^3 bf16 GEMM on random data: 769-798 TFLOP/s; device-to-device copy,
# bytes read + written: 4.3 TB/s); the others are datasheet rates.
MMA_PEAK = 790e12  # bf16/fp16 dense tensor-core FLOP/s (measured)
HBM = 4.3e12  # bytes/s (measured copy)
ALU = 33.5e12  # fp32 instructions/s (67 TFLOP/s counting an FMA as 2)
SFU = 3.9e12  # exp (MUFU.EX2) per second: 16/clk/SM x 132 SMs x 1.83 GHz
FP64 = 16.7e12  # fp64 FMAs (or conversions) per second (33.5 TFLOP/s)
LAUNCH = 4e-6  # seconds per kernel launch (host + device)
SMS = 132
BLOCK_M = 128  # rows per CTA of the forward (plain16 sm_90 default)
# fp32 ops per element of the epilogue (estimates from the kernels' element math)
EPILOGUE_OPS = {"plain": 12, "groups": 14, "filter": 20, "margin": 26, "adaptive": 52, "adaptive+filter": 60}
EAGER_PASSES = 13  # reads + writes of each N x N element by the dense eager loss (fwd + bwd)
SIZES = [64, 256, 1024, 4096, 16384, 65536, 262144, 1048576]
SMALL_MAX = 2048  # mmloss.triton.ops.SMALL_MAX
SMALL_BLOCK = 64  # the small path's tile (configs.small_config)


def splits(m: int, n: int) -> int:
    """Column splits of the chunked forward (mmloss.triton.ops.forward_splits with 132 SMs: H100, H200)."""
    return max(1, min(math.ceil(2 * SMS / math.ceil(m / 128)), n // 256))


def chunks(n: int, e: int, budget: int) -> int:
    """Row chunks of the backward (mmloss.triton.ops.row_chunk) for M = N = n."""
    fit = budget // (n * e)
    return 1 if fit >= n else math.ceil(n / max(128, fit // 128 * 128))


def teachers(features: str) -> int:
    """Teacher GEMMs per tile of a feature set: the adaptive margin's and the filter's."""
    return ("adaptive" in features) + ("filter" in features)


def kernels(
    n: int, d: int, e: int, dt: int, budget: int, n_teachers: int = 2, small_max: int = SMALL_MAX
) -> Dict[str, Dict[str, float]]:
    """FLOPs (MMA), bytes (HBM), epilogue elements and fp64 operations of each kernel for
    M = N = n, with `n_teachers` teacher GEMMs of width dt per tile."""
    m = n
    mn = float(m) * n
    teacher = 2 * mn * dt * n_teachers
    if n <= small_max:  # the inputs and H stay in L2 (60 MB): HBM sees each byte once
        blocks = math.ceil(m / SMALL_BLOCK)
        inputs = (m + n) * d * e
        return {
            "forward": {
                "flops": 2 * mn * d + teacher,
                "bytes": inputs + 8 * m,
                "elems": mn,
                "fp64": 2.0 * (m + blocks * n) * d,
                "ctas": blocks,
            },
            "grad_tile": {
                "flops": 2 * mn * d + teacher,
                "bytes": inputs + 4 * mn,
                "elems": mn,
                "fp64": 2.0 * blocks * (m + n) * d,
                "ctas": blocks * blocks,
            },
            "grad_gemm": {
                "flops": 4 * mn * d,
                "bytes": 4 * mn + 2 * inputs,
                "elems": 0.0,
                "fp64": 0.0,
                "ctas": 2 * blocks * math.ceil(d / SMALL_BLOCK),
            },
        }
    c = chunks(n, e, budget)
    waves = math.ceil(math.ceil(m / BLOCK_M) / SMS)  # CTAs of one wave share K through L2
    fwd_bytes = m * d * e * splits(m, n) + waves * n * d * e + 8 * m  # each split re-reads its rows
    none = {"elems": 0.0, "fp64": 0.0, "ctas": SMS}
    return {
        "prologue": {
            "flops": 0.0,
            "bytes": (m + n) * d * e + 4.0 * (m + n),
            "elems": 0.0,
            "fp64": 2.0 * (m + n) * d,
            "ctas": SMS,
        },
        "forward": {
            "flops": 2 * mn * d + teacher,
            "bytes": fwd_bytes,
            "elems": mn,
            "fp64": 0.0,
            "ctas": math.ceil(m / BLOCK_M) * splits(m, n),
        },
        "grad_tile": {
            "flops": 2 * mn * d + teacher,
            "bytes": fwd_bytes + mn * e,
            "elems": mn,
            "fp64": 0.0,
            "ctas": SMS,
        },
        "gemm_dq": {"flops": 2 * mn * d, "bytes": mn * e + (n + m) * d * e, **none},
        "gemm_dk": {"flops": 2 * mn * d, "bytes": mn * e + (n + m) * d * e, **none},
        "finish": {"flops": 0.0, "bytes": 3.0 * (m + n) * d * e + 8.0 * (m + n), **none},
        "dk_accum": {"flops": 0.0, "bytes": (c > 1) * c * n * d * (2.0 * e + 8), **none},
    }


def kernel_time(k: Dict[str, float], features: str, launches: int, exps: int = 1) -> float:
    """Seconds: max(MMA, HBM) + epilogue (ALU and `exps` exps per element) + fp64 norm
    work, the SM-bound parts slowed by the share of SMs the kernel's CTAs occupy, + launches."""
    busy = min(1.0, k["ctas"] / SMS)
    epi = k["elems"] * (EPILOGUE_OPS[features] / ALU + exps / SFU) + k["fp64"] / FP64
    return max(k["flops"] / (MMA_PEAK * busy), k["bytes"] / HBM) + epi / busy + launches * LAUNCH


def rows(
    sizes: List[int],
    widths: List[int],
    e: int,
    dt: int,
    features: str,
    budget: int,
    symmetric: bool = False,
    small_max: int = SMALL_MAX,
) -> List[Dict[str, object]]:
    """One row per (d, N): each kernel's ms, the total and the floor. `features` is a key of
    EPILOGUE_OPS; small_max=0 models every N on the chunked path."""
    out = []
    for d in widths:
        for n in sizes:
            ks = kernels(n, d, e, dt, budget, teachers(features), small_max)
            c = chunks(n, e, budget) if n > small_max else 1
            launches = {
                "prologue": 2,
                "forward": 1 + 2 * symmetric + (n > small_max and splits(n, n) > 1),
                "finish": 2,
                "dk_accum": c if c > 1 else 0,
                "grad_gemm": 1,
            }
            exps = {"forward": 1 + symmetric, "grad_tile": 1 + symmetric}
            times = {name: kernel_time(k, features, launches.get(name, c), exps.get(name, 1)) for name, k in ks.items()}
            total = sum(times.values())
            floor = 3 * 2.0 * n * n * d / MMA_PEAK
            out.append(
                {
                    "N": n,
                    "d": d,
                    "features": features + ("+symmetric" if symmetric else ""),
                    "path": "small" if n <= small_max else "chunked",
                    "GFLOP": sum(k["flops"] for k in ks.values()) / 1e9,
                    "GB": sum(k["bytes"] for k in ks.values()) / 1e9,
                    **{f"{name}_ms": times.get(name, 0.0) * 1e3 for name in KERNEL_NAMES},
                    "launches": sum(launches.get(name, c) for name in ks),
                    "total_ms": total * 1e3,
                    "floor_ms": floor * 1e3,
                    "ratio": total / floor,
                    "chunks": c,
                }
            )
    return out


KERNEL_NAMES = ("prologue", "forward", "grad_tile", "gemm_dq", "gemm_dk", "grad_gemm", "finish", "dk_accum")


def floor_ms(n: int, d: int) -> float:
    """3 GEMMs of 2 N² d at the MMA ceiling, ms."""
    return 3 * 2.0 * n * n * d / MMA_PEAK * 1e3


def eager_ms(n: int, d: int, e: int) -> float:
    """Roofline of the dense eager loss with e-byte inputs and logits, ms: 3 GEMMs (tensor
    cores for 16-bit, CUDA-core fp32 otherwise) + EAGER_PASSES passes over the N × N matrix."""
    gemm = 3 * 2.0 * n * n * d / (MMA_PEAK if e == 2 else 2 * ALU)
    return (gemm + EAGER_PASSES * e * float(n) * n / HBM) * 1e3


def predict(method: str, features: str, n: int, d: int, dt: int, e: int = 2, budget: int = 1 << 30) -> float:
    """Predicted fwd+bwd ms of one measured GPU row, NaN where nothing is modelled.
    method: mmloss_triton, mmloss_cuda, floor, eager, cce, cce_exact; features: a key of EPILOGUE_OPS
    or "symmetric" (plain, both directions in one pass)."""
    if method in ("mmloss_triton", "mmloss_cuda"):
        symmetric = features == "symmetric"
        row = rows(
            [n],
            [d],
            e,
            dt,
            "plain" if symmetric else features,
            budget,
            symmetric,
            small_max=SMALL_MAX if method == "mmloss_triton" else 0,
        )[0]
        return row["total_ms"]
    if method == "floor":
        return floor_ms(n, d)
    if method == "eager" and features == "plain":
        return eager_ms(n, d, e)
    if method in ("cce", "cce_exact") and features == "plain":
        return 4 / 3 * floor_ms(n, d)
    return float("nan")


def header(features: str, dt: int, e: int) -> str:
    return (
        f"H200 static model: MMA {MMA_PEAK / 1e12:.0f} TFLOP/s, HBM {HBM / 1e12:.2f} TB/s (measured ceilings), "
        f"features={features}, teacher width {dt}, {e}-byte inputs"
    )


def table_text(table: List[Dict[str, object]]) -> str:
    cols = [
        "N",
        "d",
        "path",
        "launches",
        "GFLOP",
        "forward_ms",
        "grad_tile_ms",
        "gemm_dq_ms",
        "gemm_dk_ms",
        "grad_gemm_ms",
        "chunks",
        "total_ms",
        "floor_ms",
        "ratio",
    ]
    lines = [" ".join(f"{c:>12}" for c in cols)]
    for r in table:
        lines.append(" ".join(f"{r[c]:>12.4g}" if isinstance(r[c], float) else f"{r[c]:>12}" for c in cols))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, nargs="+", default=[256, 768])
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    ap.add_argument("--dtype-bytes", type=int, default=2, help="2 for bf16/fp16 inputs")
    ap.add_argument("--teacher-width", type=int, default=0, help="dt of margin and filter teachers (0: none)")
    ap.add_argument("--features", choices=sorted(EPILOGUE_OPS), default="plain")
    ap.add_argument("--symmetric", action="store_true", help="both directions in one pass")
    ap.add_argument("--scratch-mb", type=int, default=1024, help="backward scratch budget (MiB)")
    ap.add_argument("--csv", help="also write the table here")
    args = ap.parse_args()
    table = rows(
        args.sizes, args.d, args.dtype_bytes, args.teacher_width, args.features, args.scratch_mb << 20, args.symmetric
    )
    print(header(args.features, args.teacher_width, args.dtype_bytes))
    print(table_text(table))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)


if __name__ == "__main__":
    main()
