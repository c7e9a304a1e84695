"""`python -m bench.similarity_bench`: mmloss.topk_similarity / mmloss.similarity against dense torch on the CPU.

topk: "torch" = F.normalize, the dense (M, N) matrix by one mm, torch.topk; "mmloss" =
topk_similarity (column tiles, per-row heaps: no M × N matrix). similarity: F.normalize + mm
against mmloss.similarity. Each measurement runs in a fresh process: median wall time of
--repeats calls after one warm-up, and peak extra resident memory (growth of VmHWM over the
resident size once inputs exist). Prints a Markdown table; --csv also writes one.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import mmloss
from bench.harness import reset_peak, status_bytes

MIB = 2**20


def _run(op: str, provider: str, q: torch.Tensor, k: torch.Tensor, k_top: int):
    if op == "topk" and provider == "torch":
        return torch.topk(F.normalize(q, dim=1) @ F.normalize(k, dim=1).T, k_top, dim=1)
    if op == "topk":
        return mmloss.topk_similarity(q, k, k_top)
    if provider == "torch":
        return F.normalize(q, dim=1) @ F.normalize(k, dim=1).T
    return mmloss.similarity(q, k)


def measure_one(op: str, provider: str, M: int, N: int, d: int, k_top: int, repeats: int) -> dict:
    """One measurement in this process: {"ms": median, "extra_mib": peak growth}."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(M, d, generator=g), torch.randn(N, d, generator=g)
    _run(op, provider, q[:8], k[:64], min(k_top, 64))
    base = reset_peak()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = _run(op, provider, q, k, k_top)
        times.append(time.perf_counter() - start)
        del out
    return {"ms": 1e3 * statistics.median(times[1:]), "extra_mib": (status_bytes("VmHWM") - base) / MIB}


def measure(op: str, provider: str, M: int, N: int, d: int, k_top: int, repeats: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.similarity_bench",
        "--one",
        op,
        provider,
        str(M),
        str(N),
        str(d),
        str(k_top),
        str(repeats),
    ]
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--m", type=int, default=1024, help="query rows")
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536, 131072], help="candidate rows")
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k-top", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    if args.one:
        op, provider, *sizes = args.one
        print(json.dumps(measure_one(op, provider, *map(int, sizes))))
        return
    rows = []
    for op in ("topk", "similarity"):
        for n in args.n if op == "topk" else args.n[:1]:
            cells = {p: measure(op, p, args.m, n, args.d, args.k_top, args.repeats) for p in ("torch", "mmloss")}
            rows.append(
                {
                    "op": op,
                    "M": args.m,
                    "N": n,
                    "d": args.d,
                    "k_top": args.k_top if op == "topk" else "",
                    **{f"{p}_{key}": round(v, 1) for p, c in cells.items() for key, v in c.items()},
                }
            )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32\n")
    print("| op | M | N | d | k | torch ms | mmloss ms | torch extra MiB | mmloss extra MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['op']} | {r['M']} | {r['N']} | {r['d']} | {r['k_top']} | {r['torch_ms']} | {r['mmloss_ms']} "
            f"| {r['torch_extra_mib']} | {r['mmloss_extra_mib']} |"
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
