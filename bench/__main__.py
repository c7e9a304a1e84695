"""`python -m bench`: the CPU table, mmloss's compiled backend against eager PyTorch.

Forward+backward of one-direction InfoNCE (diagonal positives, τ = 0.05, fp32), each
measurement in a fresh process (bench/harness.py): median time, and extra memory beyond the
inputs (gradients included) and beyond inputs and gradients ("scratch"). Eager is skipped
where its N × N matrices would not fit in this machine's memory. Writes CSV, Markdown and a
PNG plot to --out.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
from pathlib import Path

import torch

import mmloss
from bench.harness import measure

MIB = 2**20


def eager_fits(n: int) -> bool:
    """Eager holds about three N × N fp32 matrices at its peak (logits, softmax, grad)."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return 3 * n * n * 4 < 0.8 * available


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, mmloss {mmloss.__version__}, "
            f"Python {platform.python_version()}, {datetime.date.today().isoformat()}")


def run(sizes, dims, repeats: int, out: Path) -> list:
    rows = []
    for d in dims:
        for n in sizes:
            row = {"N": n, "d": d}
            for provider in ("eager", "mmloss-cpu"):
                if provider == "eager" and not eager_fits(n):
                    row[provider] = {"error": f"needs ~{3 * n * n * 4 / 2**30:.0f} GiB"}
                    continue
                row[provider] = measure(provider, n, d, "fp32", repeats=repeats if n <= 16384 else 1)
                print(f"N={n:>6} d={d:>3} {provider:<11} {format_result(row[provider])}", flush=True)
            rows.append(row)
    write_outputs(rows, out)
    return rows


def format_result(r: dict) -> str:
    if "error" in r:
        return f"not run ({r['error']})"
    return f"{r['seconds']:.3f} s, {r['extra_bytes'] / MIB:.1f} MiB extra, {r['scratch_bytes'] / MIB:.1f} MiB scratch"


def markdown(rows: list) -> str:
    lines = [
        "| N | d | eager time | eager extra / scratch | mmloss cpu time | mmloss extra / scratch | time ratio | scratch ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        e, m = row["eager"], row["mmloss-cpu"]
        cells = [f"{row['N']:,}", str(row["d"])]
        for r in (e, m):
            if "error" in r:
                cells += [f"not run: {r['error']}", "—"]
            else:
                cells += [f"{r['seconds']:.3f} s",
                          f"{r['extra_bytes'] / MIB:.1f} / {r['scratch_bytes'] / MIB:.1f} MiB"]
        if "error" in e or "error" in m:
            cells += ["—", "—"]
        else:
            cells += [f"{m['seconds'] / e['seconds']:.2f}×",
                      f"{m['scratch_bytes'] / max(e['scratch_bytes'], 1):.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list) -> str:
    """PERF.md §5's CPU targets, checked against the measured rows."""
    lines = ["Targets (PERF.md §5):"]
    at = {(r["N"], r["d"]): r for r in rows}
    row = at.get((4096, 768))
    if row and "error" not in row["eager"] and "error" not in row["mmloss-cpu"]:
        e, m = row["eager"], row["mmloss-cpu"]
        ratio, share = m["seconds"] / e["seconds"], m["scratch_bytes"] / max(e["scratch_bytes"], 1)
        lines.append(f"- N = 4,096, d = 768: time {ratio:.2f}× eager (target ≤ 1.3×: "
                     f"{'met' if ratio <= 1.3 else 'missed'}); scratch beyond inputs and gradients "
                     f"{share:.1%} of eager's (target ≤ 5 %: {'met' if share <= 0.05 else 'missed'})")
    row = at.get((65536, 256))
    if row:
        m = row["mmloss-cpu"]
        done = "error" not in m
        lines.append(f"- N = 65,536, d = 256: mmloss cpu {'completes in ' + format_result(m) if done else 'failed: ' + m['error']}"
                     f"; eager: {row['eager'].get('error', 'ran')} (target: completes where eager needs > 24 GiB: "
                     f"{'met' if done and 'error' in row['eager'] else 'not shown'})")
    return "\n".join(lines)


def write_outputs(rows: list, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cpu.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["N", "d", "provider", "seconds", "extra_bytes", "scratch_bytes", "error"])
        for row in rows:
            for provider in ("eager", "mmloss-cpu"):
                r = row[provider]
                writer.writerow([row["N"], row["d"], provider, r.get("seconds"), r.get("extra_bytes"),
                                 r.get("scratch_bytes"), r.get("error", "")])
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
    for d in sorted({r["d"] for r in rows}):
        for provider, style in (("eager", "--"), ("mmloss-cpu", "-")):
            pts = [(r["N"], r[provider]) for r in rows if r["d"] == d and "error" not in r[provider]]
            if not pts:
                continue
            ns = [n for n, _ in pts]
            axes[0].plot(ns, [r["seconds"] for _, r in pts], style, marker="o", label=f"{provider} d={d}")
            axes[1].plot(ns, [r["extra_bytes"] / MIB for _, r in pts], style, marker="o", label=f"{provider} d={d}")
    for ax, label in zip(axes, ("forward+backward (s)", "extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (= M)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("InfoNCE fwd+bwd on the CPU, fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 768])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per point (1 above N = 16384)")
    parser.add_argument("--quick", action="store_true", help="N in {1024, 4096} only")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    sizes = [n for n in args.sizes if n <= 4096] if args.quick else args.sizes
    print(machine())
    rows = run(sizes, args.dims, args.repeats, args.out)
    print()
    print(markdown(rows))
    print()
    print(targets(rows))
    print(f"\nwritten: {args.out}/cpu.csv, cpu.md, cpu.png")


if __name__ == "__main__":
    main()
