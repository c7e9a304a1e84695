"""Static cost model of the Triton backend on an H100: FLOPs and bytes per kernel, and the
time they imply at peak rates. No GPU needed; the GPU benchmark prints it beside measurements.

    python bench/static_model.py [--d 256 768] [--teacher-width 0] [--dtype-bytes 2] [--csv out.csv]

Per step (forward + backward, M = N rows and columns, bf16 inputs):
  prologue   inverse norms of Q and K                      bytes (M+N)d·e
  forward    S tiles: 2MNd MMA flops (+2MN·dt per teacher) bytes Q + K once per wave of CTAs
  grad_tile  recomputes S, writes H (M×N, e bytes)         same flops, + MN·e bytes written
  gemm_dq    dQ = H K   (cuBLAS)                           2MNd, reads H
  gemm_dk    dK = Hᵀ Q  (cuBLAS)                           2MNd, reads H
  finish     radial Jacobian term                          (M+N)d·(2e+e) bytes
  dk_accum   only when H is split into row chunks (R = budget / (N e) rows): per chunk the
             partial dK (N×d, e bytes) is written, read and added to an fp32 accumulator
Each kernel's time = max(MMA time, HBM time) + epilogue time (the exp/ALU work on CUDA cores
is not overlapped with the MMAs in these kernels: a conservative assumption), plus one
launch latency per kernel. "floor" = 3 GEMMs of 2MNd at the MMA peak (PERF.md's floor).
"""

from __future__ import annotations

import argparse
import csv
import math
from typing import Dict, List

MMA_PEAK = 989e12          # bf16 dense tensor-core FLOP/s, H100 SXM
HBM = 3.35e12              # bytes/s
ALU = 33.5e12              # fp32 instructions/s (67 TFLOP/s counting an FMA as 2)
SFU = 3.9e12               # exp (MUFU.EX2) per second: 16/clk/SM x 132 SMs x 1.83 GHz
LAUNCH = 4e-6              # seconds per kernel launch (host + device)
SMS = 132
BLOCK_M = 128              # rows per CTA of the forward (plain16 sm_90 default)
EPILOGUE_OPS = {"plain": 12, "margin": 26, "adaptive+filter": 60}   # fp32 ops per element
SIZES = [64, 256, 1024, 4096, 16384, 65536, 262144, 1048576]


def chunks(n: int, e: int, budget: int) -> int:
    """Row chunks of the backward (mmloss.triton.ops.row_chunk) for M = N = n."""
    fit = budget // (n * e)
    return 1 if fit >= n else math.ceil(n / max(128, fit // 128 * 128))


def kernels(n: int, d: int, e: int, dt: int, budget: int) -> Dict[str, Dict[str, float]]:
    """FLOPs (MMA), bytes (HBM) and epilogue elements of each kernel for M = N = n."""
    m = n
    c = chunks(n, e, budget)
    mn = float(m) * n
    teacher = 2 * mn * dt * (2 if dt else 0)          # margin teacher + filter teacher
    waves = math.ceil(math.ceil(m / BLOCK_M) / SMS)   # CTAs of one wave share K through L2
    fwd_bytes = m * d * e + waves * n * d * e + 8 * m
    return {
        "prologue": {"flops": 0.0, "bytes": (m + n) * d * e + 4.0 * (m + n), "elems": 0.0},
        "forward": {"flops": 2 * mn * d + teacher, "bytes": fwd_bytes, "elems": mn},
        "grad_tile": {"flops": 2 * mn * d + teacher, "bytes": fwd_bytes + mn * e, "elems": mn},
        "gemm_dq": {"flops": 2 * mn * d, "bytes": mn * e + (n + m) * d * e, "elems": 0.0},
        "gemm_dk": {"flops": 2 * mn * d, "bytes": mn * e + (n + m) * d * e, "elems": 0.0},
        "finish": {"flops": 0.0, "bytes": 3.0 * (m + n) * d * e + 8.0 * (m + n), "elems": 0.0},
        "dk_accum": {"flops": 0.0, "bytes": (c > 1) * c * n * d * (2.0 * e + 8), "elems": 0.0},
    }


def kernel_time(k: Dict[str, float], features: str, launches: int) -> float:
    """Seconds: max(MMA, HBM) + epilogue (ALU and one exp per element) + launches."""
    epi = k["elems"] * (EPILOGUE_OPS[features] / ALU + 1.0 / SFU)
    return max(k["flops"] / MMA_PEAK, k["bytes"] / HBM) + epi + launches * LAUNCH


def rows(sizes: List[int], widths: List[int], e: int, dt: int, features: str,
         budget: int) -> List[Dict[str, object]]:
    out = []
    for d in widths:
        for n in sizes:
            ks = kernels(n, d, e, dt, budget)
            c = chunks(n, e, budget)
            launches = {"prologue": 2, "forward": 1, "finish": 2, "dk_accum": c if c > 1 else 0}
            times = {name: kernel_time(k, features, launches.get(name, c)) for name, k in ks.items()}
            total = sum(times.values())
            floor = 3 * 2.0 * n * n * d / MMA_PEAK
            out.append({
                "N": n, "d": d, "features": features,
                "GFLOP": sum(k["flops"] for k in ks.values()) / 1e9,
                "GB": sum(k["bytes"] for k in ks.values()) / 1e9,
                **{f"{name}_ms": t * 1e3 for name, t in times.items()},
                "total_ms": total * 1e3, "floor_ms": floor * 1e3, "ratio": total / floor,
                "chunks": c,
            })
    return out


def print_table(table: List[Dict[str, object]]) -> None:
    cols = ["N", "d", "GFLOP", "GB", "forward_ms", "grad_tile_ms", "gemm_dq_ms", "gemm_dk_ms",
            "dk_accum_ms", "chunks", "total_ms", "floor_ms", "ratio"]
    print(" ".join(f"{c:>12}" for c in cols))
    for r in table:
        print(" ".join(f"{r[c]:>12.4g}" if isinstance(r[c], float) else f"{r[c]:>12}" for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, nargs="+", default=[256, 768])
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    ap.add_argument("--dtype-bytes", type=int, default=2, help="2 for bf16/fp16 inputs")
    ap.add_argument("--teacher-width", type=int, default=0, help="dt of margin and filter teachers (0: none)")
    ap.add_argument("--features", choices=sorted(EPILOGUE_OPS), default="plain")
    ap.add_argument("--scratch-mb", type=int, default=1024, help="backward scratch budget (MiB)")
    ap.add_argument("--csv", help="also write the table here")
    args = ap.parse_args()
    table = rows(args.sizes, args.d, args.dtype_bytes, args.teacher_width, args.features,
                 args.scratch_mb << 20)
    print(f"H100 static model: MMA {MMA_PEAK / 1e12:.0f} TFLOP/s, HBM {HBM / 1e12:.2f} TB/s, "
          f"features={args.features}, teacher width {args.teacher_width}, {args.dtype_bytes}-byte inputs")
    print_table(table)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)


if __name__ == "__main__":
    main()
