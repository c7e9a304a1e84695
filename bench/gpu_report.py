"""The GPU run's report: reads what bench/gpu_bench.py wrote under OUT (ceilings.json,
correctness.csv, stage1.csv, stage2.csv; whichever exist) and writes OUT/RESULTS_GPU.md (to
commit as bench/RESULTS_GPU.md), OUT/auto_table.json (to commit as src/mmloss/auto_table.json
after reading the run) and OUT/bench.png, then prints the summary tables.

    python -m bench.gpu_report --out DIR [--teacher-width 256]

Tables: the plain loss at every measured (N, d) with the static model's prediction beside
each value; its ratios to the 3-GEMM floor and to each anchor; peak memory; each feature's
cost against docs/performance.md's targets; small batches with and without CUDA graphs; N = 1,048,576;
correctness counts and the anchors' errors against float64.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import static_model  # noqa: E402

PLAIN = [
    ("mmloss_triton", "bf16", "triton"),
    ("mmloss_cuda", "bf16", "cuda"),
    ("floor", "bf16", "floor"),
    ("cce", "bf16", "CCE"),
    ("cce_exact", "bf16", "CCE exact"),
    ("eager", "bf16", "eager16"),
    ("eager", "fp32", "eager32"),
    ("compiled", "bf16", "compiled"),
    ("infcl", "fp32", "Inf-CL32"),
]
FEATURE_TARGETS = {
    "margin": "<= 1.10",
    "adaptive": "<= 1.10 (1 + dt/d)",
    "filter": "<= 1.10 (1 + dt/d)",
    "groups": "<= 1.05",
    "symmetric": "none (two passes: 2)",
}


def _num(x: str) -> object:
    try:
        return int(x)
    except ValueError:
        try:
            return float(x)
        except ValueError:
            return x


def read_csv(path: str) -> List[Dict[str, object]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def load(out: str) -> Dict[str, object]:
    info = {}
    if os.path.exists(os.path.join(out, "ceilings.json")):
        with open(os.path.join(out, "ceilings.json")) as f:
            info = json.load(f)
    rows = read_csv(os.path.join(out, "stage1.csv")) + read_csv(os.path.join(out, "stage2.csv"))
    checks: Dict[tuple, Dict[str, object]] = {}  # stage 2 reruns what stage 1 skipped: the last row counts
    for row in read_csv(os.path.join(out, "correctness.csv")):
        checks[tuple(row[k] for k in ("kind", "backend", "path", "features", "dtype", "M", "N", "d"))] = row
    return {"info": info, "checks": list(checks.values()), "rows": rows}


def fmt(x: Optional[float]) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "—"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


class Rows:
    """Lookup of measured rows (status ok) by method, dtype, N, d, features, graph."""

    def __init__(self, rows: List[Dict[str, object]]):
        self.rows = rows
        self.ok = {
            (r["method"], r["dtype"], r["N"], r["d"], r["features"], r["graph"]): r for r in rows if r["status"] == "ok"
        }

    def get(self, method, dtype, n, d, features="plain", graph="no") -> Optional[Dict[str, object]]:
        return self.ok.get((method, dtype, n, d, features, graph))

    def ms(self, *key, **kw) -> float:
        r = self.get(*key, **kw)
        return r["ms"] if r else float("nan")

    def model(self, *key, **kw) -> float:
        """The model's prediction of a row, measured or not (it is in every row)."""
        method, dtype, n, d = key
        features, graph = kw.get("features", "plain"), kw.get("graph", "no")
        for r in self.rows:
            if (r["method"], r["dtype"], r["N"], r["d"], r["features"], r["graph"]) == (
                method,
                dtype,
                n,
                d,
                features,
                graph,
            ):
                return r["model_ms"]
        return float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def _table(head: List[str], body: List[List[str]], width: int = 11) -> str:
    lines = [" ".join(f"{h:>{width}}" for h in head)]
    lines += [" ".join(f"{c:>{width}}" for c in row) for row in body]
    return "\n".join(lines)


def plain_tables(rs: Rows) -> str:
    sizes = sorted(
        {
            (r["N"], r["d"])
            for r in rs.rows
            if r["features"] == "plain" and r["graph"] == "no" and r["section"] in ("anchors", "grid", "scale")
        },
        key=lambda x: (x[1], x[0]),
    )
    times, ratios, memory = [], [], []
    for n, d in sizes:
        cells = [f"{n:,}", str(d)]
        for method, dtype, _ in PLAIN:
            ms, model = rs.ms(method, dtype, n, d), rs.model(method, dtype, n, d)
            cells.append(fmt(ms) + (f" ({fmt(model)})" if math.isfinite(model) else ""))
        times.append(cells)
        tri, cuda, floor = (rs.ms(m, "bf16", n, d) for m in ("mmloss_triton", "mmloss_cuda", "floor"))
        r = _ratio(tri, floor)
        target = "" if n < 32768 or not math.isfinite(r) else (" ok" if r <= 2 else " MISS")
        ratios.append(
            [f"{n:,}", str(d), fmt(_ratio(tri, floor)) + target, fmt(_ratio(cuda, floor)), fmt(_ratio(cuda, tri))]
            + [fmt(_ratio(rs.ms(m, t, n, d), tri)) for m, t, _ in PLAIN[3:]]
        )
        grads = 2 * n * d * 2 / 2**20
        mem = [rs.get(m, t, n, d) for m, t, _ in PLAIN if m != "floor"]
        memory.append([f"{n:,}", str(d), fmt(2 * grads)] + [fmt(r["peak_mib"]) if r else "—" for r in mem])
    width = 16
    out = [
        "Plain loss, fwd+bwd ms measured (static model), bf16 unless named 32:",
        _table(["N", "d"] + [label for _, _, label in PLAIN], times, width),
        "",
        "Ratios (plain): mmloss / floor (docs/performance.md target <= 2 at N >= 32,768), cuda / triton, "
        "each anchor / mmloss triton (> 1: mmloss faster):",
        _table(
            ["N", "d", "triton/floor", "cuda/floor", "cuda/triton"] + [f"{lab}/tri" for _, _, lab in PLAIN[3:]],
            ratios,
            13,
        ),
        "",
        "Peak memory beyond the inputs, MiB (gradients included; docs/performance.md target for mmloss: <= 2 x the "
        "gradients + O(N)):",
        _table(["N", "d", "2 x grads"] + [lab for m, _, lab in PLAIN if m != "floor"], memory),
    ]
    return "\n".join(out)


def feature_table(rs: Rows, dt: int) -> str:
    keys = sorted(
        {(r["N"], r["d"], r["method"]) for r in rs.rows if r["section"] == "features"}, key=lambda x: (-x[1], x[2])
    )
    body, verdicts = [], []
    for n, d, method in keys:
        plain, plain_model = rs.ms(method, "bf16", n, d), rs.model(method, "bf16", n, d)
        cells = [f"{n:,}", str(d), method.replace("mmloss_", ""), fmt(plain)]
        for f in FEATURE_TARGETS:
            ratio = _ratio(rs.ms(method, "bf16", n, d, features=f), plain)
            model = _ratio(rs.model(method, "bf16", n, d, features=f), plain_model)
            cells.append(f"{fmt(ratio)} [{fmt(model)}]")
            bound = {
                "margin": 1.10,
                "adaptive": 1.10 * (1 + dt / d),
                "filter": 1.10 * (1 + dt / d),
                "groups": 1.05,
            }.get(f)
            if bound and math.isfinite(ratio):
                verdicts.append(
                    f"{method.replace('mmloss_', '')} d={d} {f} {ratio:.2f} vs {bound:.2f}: "
                    f"{'met' if ratio <= bound else 'MISSED'}"
                )
        body.append(cells)
    head = ["N", "d", "backend", "plain ms"] + list(FEATURE_TARGETS)
    return "\n".join(
        [
            f"Features: time / plain, measured [static model]; teachers bf16, width {dt}. Targets: "
            + "; ".join(f"{k} {v}" for k, v in FEATURE_TARGETS.items()),
            _table(head, body, 12),
        ]
        + (["Targets: " + "; ".join(verdicts)] if verdicts else [])
    )


def small_table(rs: Rows) -> str:
    keys = sorted({(r["N"], r["d"]) for r in rs.rows if r["section"] == "small"})
    body = []
    for n, d in keys:
        t, tg = rs.ms("mmloss_triton", "bf16", n, d), rs.ms("mmloss_triton", "bf16", n, d, graph="yes")
        c, cg = rs.ms("mmloss_cuda", "bf16", n, d), rs.ms("mmloss_cuda", "bf16", n, d, graph="yes")
        e, eg = rs.ms("eager", "bf16", n, d), rs.ms("eager", "bf16", n, d, graph="yes")
        comp = rs.ms("compiled", "bf16", n, d)
        model = rs.model("mmloss_triton", "bf16", n, d)
        body.append(
            [
                f"{n:,}",
                str(d),
                f"{fmt(t)} ({fmt(model)})",
                fmt(tg),
                fmt(c),
                fmt(cg),
                fmt(e),
                fmt(eg),
                fmt(comp),
                fmt(_ratio(e, t)),
                fmt(_ratio(eg, tg)),
            ]
        )
    head = [
        "N",
        "d",
        "triton",
        "tri graph",
        "cuda",
        "cuda graph",
        "eager",
        "eager graph",
        "compiled",
        "eager/tri",
        "graphs e/t",
    ]
    return "\n".join(
        [
            "Small batches, bf16 fwd+bwd ms (triton: static model); docs/performance.md target: eager / mmloss >= 3:",
            _table(head, body, 12),
        ]
    )


def scale_table(rs: Rows) -> str:
    lines = ["Scale:"]
    for r in rs.rows:
        if r["section"] == "scale":
            peak = r["peak_mib"] / 1024 if isinstance(r["peak_mib"], float) and math.isfinite(r["peak_mib"]) else None
            lines.append(
                f"  {r['method']} N={r['N']:,} d={r['d']}: {fmt(r['ms'])} ms (model {fmt(r['model_ms'])}), "
                f"peak {fmt(peak)} GiB beyond the inputs: {r['status']}"
            )
    return "\n".join(lines)


def integrations_table(rs: Rows) -> str:
    """The drop-in losses against their peers (stage 2's last rows): fp32 fwd+bwd ms, peak MiB."""
    keys = sorted({(r["features"], r["N"], r["d"]) for r in rs.rows if r["section"] == "integrations"})
    body = []
    for case, n, d in keys:
        rows = [rs.get(m, "fp32", n, d, features=case) for m in ("integration_peer", "integration_mmloss")]
        ms = [r["ms"] if r else float("nan") for r in rows]
        mib = [r["peak_mib"] if r else float("nan") for r in rows]
        body.append([case, f"{n:,}", fmt(ms[0]), fmt(ms[1]), fmt(_ratio(ms[1], ms[0])), fmt(mib[0]), fmt(mib[1])])
    head = ["loss", "B", "peer ms", "mmloss ms", "mmloss/peer", "peer MiB", "mmloss MiB"]
    title = "Drop-in losses against sentence-transformers' and OpenCLIP's classes, fp32 fwd+bwd (target <= 0.7):"
    return "\n".join([title, _table(head, body, 12)]) if body else title + " not measured"


def cuda_tests(checks: List[Dict[str, object]]) -> str:
    """ "passed" when the CUDA backend's correctness grid ran whole and every case passed."""
    cuda = [c for c in checks if c["kind"] == "check" and c["backend"] == "cuda"]
    if not cuda:
        return "not run"
    bad = [c for c in cuda if c["status"] != "ok"]
    return "passed" if not bad else f"not passed ({len(bad)} of {len(cuda)} cases not ok)"


def check_summary(checks: List[Dict[str, object]]) -> str:
    lines = ["Correctness against float64 (tests/cases.py's bar, docs/contract.md §1), one config per Triton variant:"]
    for backend in sorted({c["backend"] for c in checks if c["kind"] == "check"}):
        rows = [c for c in checks if c["kind"] == "check" and c["backend"] == backend]
        counts: Dict[str, int] = {}
        for c in rows:
            counts[c["status"]] = counts.get(c["status"], 0) + 1
        lines.append(
            f"  {backend}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" of {len(rows)} cases"
        )
        for c in rows:
            if c["status"] not in ("ok",) and not str(c["status"]).startswith("skipped"):
                lines.append(
                    f"    {c['path']} {c['features']} {c['dtype']} {c['M']}x{c['N']}x{c['d']}: "
                    f"{c['status']} {c['detail']}"
                )
    anchors = [c for c in checks if c["kind"] == "anchor"]
    if anchors:
        lines.append("Errors against float64 eager on the same rounded inputs:")
        lines += [f"  {c['backend']} {c['dtype']} N={c['N']} d={c['d']}: {c['status']} {c['detail']}" for c in anchors]
    warm = [c for c in checks if c["kind"] == "warm" and c["status"] != "ok"]
    lines += [f"  warm-up {c['backend']} {c['features']}: {c['status']} {c['detail']}" for c in warm]
    return "\n".join(lines)


def not_measured(rs: Rows) -> str:
    counts: Dict[str, int] = {}
    for r in rs.rows:
        if r["status"] != "ok" and rs.get(r["method"], r["dtype"], r["N"], r["d"], r["features"], r["graph"]) is None:
            reason = str(r["status"]).split(",")[0].split(" at N=")[0][:60]
            counts[reason] = counts.get(reason, 0) + 1
    return "Rows not measured: " + ("; ".join(f"{v} x {k}" for k, v in sorted(counts.items())) or "none")


def summary(data: Dict[str, object], dt: int) -> str:
    info = data["info"]
    rs = Rows(data["rows"])
    head = (
        f"{info.get('device', '?')}, torch {info.get('torch', '?')}, triton {info.get('triton', '?')}, "
        f"{info.get('date', '?')}. Ceilings measured: bf16 GEMM {fmt(info.get('gemm_tflops'))} TFLOP/s "
        f"(model {fmt(static_model.MMA_PEAK / 1e12)}), copy {fmt(info.get('copy_tbps'))} TB/s "
        f"(model {fmt(static_model.HBM / 1e12)})"
    )
    parts = [
        head,
        check_summary(data["checks"]),
        plain_tables(rs),
        feature_table(rs, dt),
        small_table(rs),
        scale_table(rs),
        integrations_table(rs),
        not_measured(rs),
    ]
    return "\n\n".join(parts)


def auto_table(rows: List[Dict[str, object]], run: Dict[str, object], tests: str) -> Dict[str, object]:
    """The table `backend="auto"` reads (src/mmloss/auto_table.json): N ranges, per dtype, where the
    CUDA backend beat Triton (plain loss, no graphs) at every measured d, up to the largest N
    measured (no extrapolation). Empty unless this run's CUDA correctness grid passed."""
    rs = Rows(rows)
    faster: List[Dict[str, object]] = []
    if tests == "passed":
        cuda_rows = [
            r
            for r in rows
            if r["method"] == "mmloss_cuda" and r["features"] == "plain" and r["graph"] == "no" and r["status"] == "ok"
        ]
        for dtype in sorted({r["dtype"] for r in cuda_rows}):
            sizes = sorted({r["N"] for r in cuda_rows if r["dtype"] == dtype})
            low = 1
            for n in sizes:
                widths = sorted({r["d"] for r in cuda_rows if r["dtype"] == dtype and r["N"] == n})
                wins = all(rs.ms("mmloss_cuda", dtype, n, d) < rs.ms("mmloss_triton", dtype, n, d) for d in widths)
                if wins and faster and faster[-1]["dtype"] == dtype and faster[-1]["max_n"] == low - 1:
                    faster[-1]["max_n"] = n
                elif wins:
                    faster.append({"dtype": dtype, "min_n": low, "max_n": n})
                low = n + 1
    return {
        "about": "backend='auto' on CUDA: where the CUDA C++ backend beat Triton (fwd+bwd, plain loss) in a GPU "
        "run that also passed the CUDA correctness grid. Written by bench/gpu.sh as OUT/auto_table.json; "
        "commit it as src/mmloss/auto_table.json after reading the run.",
        "gpu_run": dict(run, cuda_tests=tests),
        "cuda_faster": faster,
    }


def plot(rows: List[Dict[str, object]], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    plain = [r for r in rows if r["features"] == "plain" and r["graph"] == "no" and r["status"] == "ok"]
    widths = sorted({r["d"] for r in plain}) or [0]
    fig, axes = plt.subplots(1, len(widths), figsize=(6 * len(widths), 4.5), squeeze=False)
    for ax, d in zip(axes[0], widths):
        for method, dtype, label in PLAIN:
            pts = sorted((r["N"], r["ms"]) for r in plain if (r["method"], r["dtype"], r["d"]) == (method, dtype, d))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="N (= M)", ylabel="fwd+bwd ms", title=f"d = {d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def build_info() -> str:
    """`python -m mmloss.info` and the GPU's name, driver and clocks (nvidia-smi), as text."""
    lines = []
    try:
        from mmloss.backends import build_info as info

        lines += [f"{k}: {v}" for k, v in info().items()]
    except Exception as exc:  # noqa: BLE001 - the report must come out whatever failed
        lines.append(f"mmloss.info failed: {exc}")
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        lines.append("nvidia-smi: " + smi.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        lines.append("nvidia-smi: not found")
    return "\n".join(lines)


def results_md(text: str, tests: str) -> str:
    static = []
    for d in (256, 768):
        table = static_model.rows(static_model.SIZES, [d], 2, 0, "plain", 1 << 30)
        static.append(static_model.table_text(table))
    return "\n".join(
        [
            "# mmloss on the GPU: bench/gpu.sh results",
            "",
            "Written by `bash bench/gpu.sh` (bench/gpu_report.py); one run, times are fwd+bwd of one-direction InfoNCE "
            "(τ = 0.05, diagonal positives) unless named, median of CUDA-event samples after a warm-up step. "
            "Full rows: stage1.csv, stage2.csv and correctness.csv of the run's output folder.",
            "",
            f"CUDA backend correctness grid: {tests}.",
            "",
            "```",
            build_info(),
            "```",
            "",
            "## Summary",
            "",
            "```",
            text,
            "```",
            "",
            "## Static model (plain, bf16; bench/static_model.py)",
            "",
            "```",
            static_model.header("plain", 0, 2),
            *static,
            "```",
            "",
        ]
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--teacher-width", type=int, default=256)
    args = ap.parse_args(argv)
    data = load(args.out)
    text = summary(data, args.teacher_width)
    tests = cuda_tests(data["checks"])
    info = data["info"]
    run = {k: info.get(k) for k in ("device", "date", "torch", "triton")}
    with open(os.path.join(args.out, "auto_table.json"), "w") as f:
        json.dump(auto_table(data["rows"], run, tests), f, indent=2)
        f.write("\n")
    note = plot(data["rows"], os.path.join(args.out, "bench.png"))
    with open(os.path.join(args.out, "RESULTS_GPU.md"), "w") as f:
        f.write(results_md(text, tests))
    print(text + ("\n" + note if note else ""))


if __name__ == "__main__":
    main()
