"""Forward + backward time and peak memory of mmloss (Triton, and the CUDA C++ backend when
compiled in) against eager PyTorch (fp32, bf16), torch.compile of eager, Inf-CL (if
importable) and the bf16 3-GEMM floor, all in one run, with the static model's prediction
beside each Triton row.

    python bench/gpu_bench.py --out DIR [--budget-s 420] [--sizes ...] [--d 256 768]
    python bench/gpu_bench.py --dry-run --out DIR      # CPU smoke test (Triton interpreter)

Writes DIR/bench.csv, DIR/bench.png (if matplotlib is installed), DIR/summary.txt and
DIR/auto_table.json (where cuda beat triton, for mmloss/auto_table.json: `--cuda-tests` says
whether this run's CUDA suite passed; without "passed" the table lists no cuda range), and
prints the table. Timing: CUDA events, median of the timed steps after a warm-up step (which
also autotunes); memory: peak allocated during one step minus what was allocated before.
Measurements stop when the time budget is spent (the rest is marked "skipped: budget").
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
FEATURE_SETS = ("plain", "margin", "adaptive+filter", "groups", "symmetric")
SIZES = [64, 256, 1024, 4096, 16384, 32768, 65536, 131072, 262144, 1048576]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for bench.csv, bench.png, summary.txt")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop measuring after this many seconds")
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="N (= M) values")
    ap.add_argument("--d", type=int, nargs="+", default=[256, 768])
    ap.add_argument("--teacher-width", type=int, default=256, help="dt of the adaptive-margin and filter teachers")
    ap.add_argument("--features-max-n", type=int, default=65536, help="feature variants only up to this N")
    ap.add_argument("--eager-max-n", type=int, default=65536, help="dense baselines only up to this N")
    ap.add_argument("--compile-sizes", type=int, nargs="*", default=[1024, 16384],
                    help="N values for torch.compile of eager (each compiles once, ~30 s)")
    ap.add_argument("--compile-d", type=int, default=768, help="the d of the torch.compile rows")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per measurement (fewer when slow)")
    ap.add_argument("--cuda-tests", default="not run", help="outcome of this run's CUDA suite (gpu.sh: passed/failed)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes: checks the harness")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.sizes, args.d, args.teacher_width, args.reps = [64, 130], [64], 16, 2
        args.compile_sizes = []
    return args


class Harness:
    """Runs one step function, times it and reads its peak memory, within a budget."""

    def __init__(self, device, budget_s: float, reps: int):
        import torch
        self.torch, self.device = torch, device
        self.deadline = time.monotonic() + budget_s
        self.reps = reps

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def measure(self, step: Callable[[], None]) -> Dict[str, float]:
        """ms (median) and peak MiB of step(); raises on OOM or other errors."""
        torch = self.torch
        self._sync()
        t0 = time.monotonic()
        step()  # warm-up: compiles, autotunes
        self._sync()
        first = time.monotonic() - t0
        reps = max(1, min(self.reps, int(max(self.left(), 0) / max(first, 1e-3) / 4)))
        times = []
        for _ in range(reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                step()
                times.append(1e3 * (time.perf_counter() - t))
        peak = float("nan")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return {"ms": statistics.median(times), "peak_mib": peak}


def make_inputs(torch, n: int, d: int, dtype, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    k = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    return q, k


def mmloss_step(torch, mmloss, q, k, features: str, dt: int, backend: str = "triton"):
    """fwd+bwd of contrastive_loss(backend=backend) with one feature set."""
    n, dev = q.shape[0], q.device
    g = torch.Generator(device="cpu").manual_seed(1)
    kw: Dict[str, object] = {}
    if features == "margin":
        kw["margin"] = 0.15
    elif features == "adaptive+filter":
        teach = lambda: torch.randn(n, dt, generator=g).to(device=dev, dtype=q.dtype)  # noqa: E731
        kw.update(margin=0.15, margin_teacher=(teach(), teach()), filter_teacher=(teach(), teach()),
                  filter_threshold=3.0 * math.sqrt(dt))
    elif features == "groups":
        kw["key_groups"] = torch.arange(n, device=dev) // 5
    elif features == "symmetric":
        kw["symmetric"] = True

    def step():
        q.grad = k.grad = None
        mmloss.contrastive_loss(q, k, temperature=0.05, backend=backend, **kw).backward()
    return step


def eager_loss(torch, q, k):
    """Plain one-direction InfoNCE, dense (the baseline users write)."""
    F = torch.nn.functional
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T / 0.05
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def grad_step(loss_fn, q, k):
    def step():
        q.grad = k.grad = None
        loss_fn(q, k).backward()
    return step


def floor_step(torch, q, k):
    """The 3 bf16 GEMMs of N×N×d (S = QKᵀ, dQ = S K, dK = Sᵀ Q) in ≤ 1 GiB row chunks."""
    n = q.shape[0]
    rows = max(1, min(n, (1 << 30) // (2 * n)))
    qd, kd = q.detach(), k.detach()
    dk = torch.zeros_like(kd)

    def step():
        for r0 in range(0, n, rows):
            s = qd[r0:r0 + rows] @ kd.T
            s @ kd
            dk.addmm_(s.T, qd[r0:r0 + rows])
    return step


def infcl_step(torch, q, k):
    """Inf-CL 1.x (fp32 inputs as in PERF.md); needs a process group (world size 1)."""
    import torch.distributed as dist
    from inf_cl import cal_inf_loss
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
    F = torch.nn.functional
    return grad_step(lambda a, b: cal_inf_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1), scale=1 / 0.05), q, k)


def static_prediction(n: int, d: int, features: str, dt: int) -> float:
    sys.path.insert(0, HERE)
    import static_model
    feats = "adaptive+filter" if features == "adaptive+filter" else ("margin" if features == "margin" else "plain")
    row = static_model.rows([n], [d], 2, dt if features == "adaptive+filter" else 0, feats,
                            int(os.environ.get("MMLOSS_TRITON_SCRATCH_MB", "1024")) << 20,
                            symmetric=features == "symmetric")[0]
    return row["total_ms"]


def cuda_available(args) -> bool:
    """Whether mmloss._C has CUDA kernels here (never in a dry run)."""
    if args.dry_run:
        return False
    import torch
    from mmloss.backends import unavailable_reason
    return unavailable_reason("cuda", torch.device("cuda")) is None


def plan(args) -> List[Dict[str, object]]:
    """Every (method, features, dtype, N, d) to measure, cheapest first."""
    items = []
    methods = ["mmloss_triton"] + (["mmloss_cuda"] if cuda_available(args) else [])
    for n in sorted(args.sizes):
        for d in args.d:
            items.append(dict(method="floor", features="plain", dtype="bf16", N=n, d=d))
            for feat in FEATURE_SETS:
                if feat == "plain" or n <= args.features_max_n:
                    items += [dict(method=m, features=feat, dtype="bf16", N=n, d=d) for m in methods]
            if n <= args.eager_max_n:
                items += [dict(method="eager", features="plain", dtype=t, N=n, d=d) for t in ("fp32", "bf16")]
                items.append(dict(method="infcl", features="plain", dtype="fp32", N=n, d=d))
            if n in args.compile_sizes and d == args.compile_d:
                items.append(dict(method="compiled", features="plain", dtype="bf16", N=n, d=d))
    return items


def run_item(item, args, harness, torch, mmloss, device, failed: Dict[str, str]):
    """Measure one item; returns the CSV row. `failed` maps method/dtype/d to why the
    larger sizes of that series are skipped (items come in increasing N)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[item["dtype"]]
    if args.dry_run:
        dtype = torch.float32 if not item["method"].startswith("mmloss_") else torch.bfloat16
    row = dict(item, ms=float("nan"), peak_mib=float("nan"), model_ms=float("nan"), status="ok")
    key = f'{item["method"]}/{item["dtype"]}/{item["d"]}'
    if harness.left() <= 0:
        row["status"] = "skipped: budget"
        return row
    if key in failed:
        row["status"] = failed[key]
        return row
    q, k = make_inputs(torch, item["N"], item["d"], dtype, device)
    try:
        if item["method"] == "mmloss_triton":
            step = mmloss_step(torch, mmloss, q, k, item["features"], args.teacher_width)
            row["model_ms"] = static_prediction(item["N"], item["d"], item["features"], args.teacher_width)
        elif item["method"] == "mmloss_cuda":
            step = mmloss_step(torch, mmloss, q, k, item["features"], args.teacher_width, backend="cuda")
        elif item["method"] == "eager":
            step = grad_step(lambda a, b: eager_loss(torch, a, b), q, k)
        elif item["method"] == "compiled":
            step = grad_step(torch.compile(lambda a, b: eager_loss(torch, a, b)), q, k)
        elif item["method"] == "infcl":
            step = infcl_step(torch, q, k)
        else:
            step = floor_step(torch, q, k)
        row.update(harness.measure(step))
    except ImportError as exc:
        row["status"] = f"unavailable: {exc}"
        failed[key] = row["status"]
    except Exception as exc:  # noqa: BLE001 - one failed series must not end the run
        row["status"] = "OOM" if "out of memory" in str(exc).lower() else f"error: {str(exc)[:80]}"
        failed[key] = f'skipped: {row["status"].split(":")[0]} at N={item["N"]}'
    finally:
        del q, k
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def summary(rows: List[Dict[str, object]]) -> str:
    """The short table (plain, bf16 mmloss vs baselines) and the target ratios."""
    def ms(method, n, d, features="plain", dtype=None):
        for r in rows:
            if (r["method"], r["N"], r["d"], r["features"]) == (method, n, d, features) and \
                    (dtype is None or r["dtype"] == dtype) and r["status"] == "ok":
                return r["ms"]
        return float("nan")
    lines = [f"{'N':>8} {'d':>4} {'mmloss':>9} {'cuda':>9} {'model':>9} {'floor':>9} {'x floor':>7} {'eager32':>9} "
             f"{'eager16':>9} {'compiled':>9} {'Inf-CL':>9} {'margin x':>8} {'ada+flt x':>9} {'groups x':>8} {'sym x':>6}"]
    for n, d in sorted({(r["N"], r["d"]) for r in rows}):
        t = ms("mmloss_triton", n, d)
        model = next((r["model_ms"] for r in rows if r["method"] == "mmloss_triton" and r["N"] == n
                      and r["d"] == d and r["features"] == "plain"), float("nan"))
        fl = ms("floor", n, d)
        lines.append(
            f"{n:>8} {d:>4} {t:>9.3f} {ms('mmloss_cuda', n, d):>9.3f} {model:>9.3f} {fl:>9.3f} {t / fl:>7.2f} {ms('eager', n, d, dtype='fp32'):>9.3f} "
            f"{ms('eager', n, d, dtype='bf16'):>9.3f} {ms('compiled', n, d):>9.3f} {ms('infcl', n, d):>9.3f} "
            f"{ms('mmloss_triton', n, d, 'margin') / t:>8.2f} {ms('mmloss_triton', n, d, 'adaptive+filter') / t:>9.2f} "
            f"{ms('mmloss_triton', n, d, 'groups') / t:>8.2f} {ms('mmloss_triton', n, d, 'symmetric') / t:>6.2f}")
    lines.append("times in ms (fwd+bwd); mmloss = triton, cuda = the CUDA C++ backend; 'x floor' = triton / "
                 "3-GEMM floor; feature columns = triton variant / plain (sym: both directions, one pass)")
    return "\n".join(lines)


def auto_table(rows: List[Dict[str, object]], head: Dict[str, str], cuda_tests: str) -> Dict[str, object]:
    """The table `backend="auto"` reads (mmloss/auto_table.json): N ranges, per dtype, where the
    CUDA backend beat Triton (plain loss) at every measured d, up to the largest N measured
    (no extrapolation). Empty unless this run's CUDA suite passed."""
    def plain(method, n, d, dtype):
        return next((r["ms"] for r in rows if (r["method"], r["N"], r["d"], r["features"], r["dtype"])
                     == (method, n, d, "plain", dtype) and r["status"] == "ok"), None)
    faster = []
    if cuda_tests == "passed":
        for dtype in sorted({r["dtype"] for r in rows if r["method"] == "mmloss_cuda"}):
            sizes = sorted({r["N"] for r in rows if r["method"] == "mmloss_cuda" and r["dtype"] == dtype})
            widths = sorted({r["d"] for r in rows if r["method"] == "mmloss_cuda" and r["dtype"] == dtype})
            low = 1
            for n in sizes:
                pairs = [(plain("mmloss_cuda", n, d, dtype), plain("mmloss_triton", n, d, dtype)) for d in widths]
                wins = all(c is not None and t is not None and c < t for c, t in pairs)
                if wins and faster and faster[-1]["dtype"] == dtype and faster[-1]["max_n"] == low - 1:
                    faster[-1]["max_n"] = n
                elif wins:
                    faster.append({"dtype": dtype, "min_n": low, "max_n": n})
                low = n + 1
    return {"about": "written by bench/gpu_bench.py; commit as mmloss/auto_table.json after reading the run",
            "gpu_run": dict(head, cuda_tests=cuda_tests), "cuda_faster": faster}


def plot(rows, path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    widths = sorted({r["d"] for r in rows})
    fig, axes = plt.subplots(1, len(widths), figsize=(6 * len(widths), 4.5), squeeze=False)
    for ax, d in zip(axes[0], widths):
        for label in sorted({(r["method"], r["dtype"]) for r in rows}):
            pts = sorted((r["N"], r["ms"]) for r in rows if (r["method"], r["dtype"]) == label and r["d"] == d
                         and r["features"] == "plain" and r["status"] == "ok")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=" ".join(label))
        ax.set(xscale="log", yscale="log", xlabel="N (= M)", ylabel="fwd+bwd ms", title=f"d = {d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import mmloss
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --dry-run to check the harness on CPU)")
    os.makedirs(args.out, exist_ok=True)
    harness = Harness(device, args.budget_s, args.reps)
    failed: Dict[str, str] = {}
    rows = []
    for item in plan(args):
        row = run_item(item, args, harness, torch, mmloss, device, failed)
        rows.append(row)
        print(f'{row["method"]:>14} {row["features"]:>15} {row["dtype"]:>4} N={row["N"]:>8} d={row["d"]:>4} '
              f'{row["ms"]:>10.3f} ms {row["peak_mib"]:>10.1f} MiB  model {row["model_ms"]:>9.3f} ms  {row["status"]}',
              flush=True)
    with open(os.path.join(args.out, "bench.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    note = plot(rows, os.path.join(args.out, "bench.png"))
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run)"
    import triton
    date = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    head = f"{device_name}, torch {torch.__version__}, triton {triton.__version__}, {date}"
    run = {"device": device_name, "date": date, "torch": torch.__version__, "triton": triton.__version__}
    with open(os.path.join(args.out, "auto_table.json"), "w") as f:
        json.dump(auto_table(rows, run, args.cuda_tests), f, indent=2)
    text = head + "\n" + summary(rows) + ("\n" + note if note else "")
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
