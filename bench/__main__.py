"""`python -m bench`: the CPU table, mmloss's compiled backend against eager PyTorch, the
3-GEMM floor and cut-cross-entropy.

Forward+backward of one-direction InfoNCE (diagonal positives, τ = 0.05), fp32 and bf16
inputs, each measurement in a fresh process (bench/harness.py): median time (and, in
brackets, the process's CPU time over all threads, which other jobs on a shared machine
disturb less), extra memory
beyond the inputs (gradients included) and beyond inputs and gradients ("scratch"), and (up
to N = 4,096) the loss's relative error against float64. Columns: the 3-GEMM floor (three
GEMMs of N × N × d in the input dtype, measured in the same run: no exact method does less),
eager (dense logits, fp32 cross-entropy), mmloss cpu, cut-cross-entropy's torch_compile path
(it materialises the logits). The dense methods are skipped where their N × N matrices would
not fit in this machine's memory. Writes CSV, Markdown and a PNG plot to --out.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
from pathlib import Path

import torch

import mmloss
from bench.harness import PROVIDERS, measure

MIB = 2**20
DENSE = ("floor", "eager", "cce")
LABELS = {"floor": "3-GEMM floor", "eager": "eager", "mmloss-cpu": "mmloss cpu", "cce": "cut-cross-entropy"}


def dense_fits(n: int) -> bool:
    """The dense methods hold about three N × N fp32 matrices at their peak."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return 3 * n * n * 4 < 0.8 * available


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, mmloss {mmloss.__version__}, "
        f"Python {platform.python_version()}, {datetime.date.today().isoformat()}"
    )


def run(sizes, dims, dtypes, repeats: int, out: Path) -> list:
    rows = []
    for dtype in dtypes:
        for d in dims:
            for n in sizes:
                row = {"N": n, "d": d, "dtype": dtype}
                for provider in PROVIDERS:
                    if provider in DENSE and not dense_fits(n):
                        row[provider] = {"error": f"needs ~{3 * n * n * 4 / 2**30:.0f} GiB"}
                        continue
                    row[provider] = measure(provider, n, d, dtype, repeats=repeats if n <= 16384 else 1)
                    print(f"N={n:>6} d={d:>3} {dtype} {provider:<11} {format_result(row[provider])}", flush=True)
                rows.append(row)
    write_outputs(rows, out)
    return rows


def format_result(r: dict) -> str:
    if "error" in r:
        return f"not run ({r['error']})"
    err = r.get("loss_error", float("nan"))
    return (
        f"{r['seconds']:.3f} s (CPU {r['cpu_seconds']:.3f} s), {r['extra_bytes'] / MIB:.1f} MiB extra, "
        f"{r['scratch_bytes'] / MIB:.1f} MiB scratch" + (f", loss error {err:.2g}" if math.isfinite(err) else "")
    )


def _seconds(r: dict) -> float:
    return float("nan") if "error" in r else r["seconds"]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if math.isfinite(a) and math.isfinite(b) and b > 0 else "—"


def markdown(rows: list) -> str:
    lines = [
        "| N | d | dtype | 3-GEMM floor | eager | mmloss cpu | cut-cross-entropy | mmloss / floor | mmloss / eager "
        "| cce / mmloss | scratch MiB: eager / mmloss / cce | loss error: eager / mmloss / cce |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [f"{row['N']:,}", str(row["d"]), row["dtype"]]
        for p in PROVIDERS:
            r = row[p]
            cells.append(f"not run: {r['error']}" if "error" in r else f"{r['seconds']:.3f} s ({r['cpu_seconds']:.3f})")
        floor, eager, mm, cce = (_seconds(row[p]) for p in PROVIDERS)
        cells += [_ratio(mm, floor), _ratio(mm, eager), _ratio(cce, mm)]
        cells.append(
            " / ".join(
                "—" if "error" in row[p] else f"{row[p]['scratch_bytes'] / MIB:.1f}"
                for p in ("eager", "mmloss-cpu", "cce")
            )
        )
        cells.append(
            " / ".join(
                f"{row[p].get('loss_error', float('nan')):.1e}"
                if math.isfinite(row[p].get("loss_error", float("nan")))
                else "—"
                for p in ("eager", "mmloss-cpu", "cce")
            )
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list) -> str:
    """docs/performance.md's CPU targets (fp32 and bf16), checked against the rows."""
    lines = ["Targets (docs/performance.md, CPU):"]
    at = {(r["N"], r["d"], r["dtype"]): r for r in rows}
    row = at.get((4096, 768, "fp32"))
    if row and "error" not in row["eager"] and "error" not in row["mmloss-cpu"]:
        e, m = row["eager"], row["mmloss-cpu"]
        ratio, share = m["seconds"] / e["seconds"], m["scratch_bytes"] / max(e["scratch_bytes"], 1)
        lines.append(
            f"- fp32, N = 4,096, d = 768: time {ratio:.2f}× eager (CPU time "
            f"{m['cpu_seconds'] / e['cpu_seconds']:.2f}×; target ≤ 1.3×: "
            f"{'met' if ratio <= 1.3 else 'missed'}); scratch beyond inputs and gradients "
            f"{share:.1%} of eager's (target ≤ 5 %: {'met' if share <= 0.05 else 'missed'})"
        )
    bf16, fp32 = at.get((4096, 768, "bf16")), at.get((4096, 768, "fp32"))
    if bf16 and "error" not in bf16["mmloss-cpu"] and "error" not in bf16["eager"]:
        m, e = bf16["mmloss-cpu"]["seconds"], bf16["eager"]["seconds"]
        cpu = bf16["mmloss-cpu"]["cpu_seconds"] / bf16["eager"]["cpu_seconds"]
        line = (
            f"- bf16, N = 4,096, d = 768: {m / e:.2f}× eager bf16 (CPU time {cpu:.2f}×; target ≤ 0.9×: "
            f"{'met' if m / e <= 0.9 else 'missed'})"
        )
        if fp32 and "error" not in fp32["mmloss-cpu"]:
            own = m / fp32["mmloss-cpu"]["seconds"]
            line += f"; {own:.2f}× mmloss fp32 (target ≤ 0.6×: {'met' if own <= 0.6 else 'missed'})"
        if "error" not in bf16["floor"]:
            line += f"; {m / bf16['floor']['seconds']:.2f}× the bf16 3-GEMM floor (target ≈ 1.15×)"
        lines.append(line)
    row = at.get((65536, 256, "fp32"))
    if row:
        m = row["mmloss-cpu"]
        done = "error" not in m
        outcome = "completes in " + format_result(m) if done else "failed: " + m["error"]
        lines.append(
            f"- N = 65,536, d = 256: mmloss cpu {outcome}"
            f"; eager: {row['eager'].get('error', 'ran')} (target: completes where eager needs > 24 GiB: "
            f"{'met' if done and 'error' in row['eager'] else 'not shown'})"
        )
    return "\n".join(lines)


def write_outputs(rows: list, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cpu.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "N",
                "d",
                "dtype",
                "provider",
                "seconds",
                "cpu_seconds",
                "extra_bytes",
                "scratch_bytes",
                "loss_error",
                "error",
            ]
        )
        for row in rows:
            for provider in PROVIDERS:
                r = row[provider]
                writer.writerow(
                    [
                        row["N"],
                        row["d"],
                        row["dtype"],
                        provider,
                        r.get("seconds"),
                        r.get("cpu_seconds"),
                        r.get("extra_bytes"),
                        r.get("scratch_bytes"),
                        r.get("loss_error"),
                        r.get("error", ""),
                    ]
                )
    (out / "cpu.md").write_text(f"{machine()}\n\n{markdown(rows)}\n\n{targets(rows)}\n")
    plot(rows, out / "cpu.png")


def plot(rows: list, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"floor": ":", "eager": "--", "mmloss-cpu": "-", "cce": "-."}
    for dtype in sorted({r["dtype"] for r in rows}):
        for d in sorted({r["d"] for r in rows}):
            for provider, style in styles.items():
                pts = [
                    (r["N"], r[provider])
                    for r in rows
                    if r["d"] == d and r["dtype"] == dtype and "error" not in r[provider]
                ]
                if not pts:
                    continue
                ns = [n for n, _ in pts]
                label = f"{LABELS[provider]} {dtype} d={d}"
                axes[0].plot(ns, [r["seconds"] for _, r in pts], style, marker="o", label=label)
                if provider != "floor":
                    axes[1].plot(ns, [r["extra_bytes"] / MIB for _, r in pts], style, marker="o", label=label)
    for ax, label in zip(axes, ("forward+backward (s)", "extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (= M)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle("InfoNCE fwd+bwd on the CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 768])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per point (1 above N = 16384)")
    parser.add_argument("--quick", action="store_true", help="N in {1024, 4096} only")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    sizes = [n for n in args.sizes if n <= 4096] if args.quick else args.sizes
    print(machine())
    rows = run(sizes, args.dims, args.dtypes, args.repeats, args.out)
    print()
    print(markdown(rows))
    print()
    print(targets(rows))
    print(f"\nwritten: {args.out}/cpu.csv, cpu.md, cpu.png")


if __name__ == "__main__":
    main()
