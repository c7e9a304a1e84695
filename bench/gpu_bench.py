"""The GPU benchmark, in two stages that each write their results under --out as they go
(a run cut short still returns numbers), and each keep to a deadline: an item that would
not fit in the time left is skipped and its row says so.

    python -m bench.gpu_bench --stage 1 --out DIR [--deadline EPOCH_S | --budget-s 240]
    python -m bench.gpu_bench --stage 2 --out DIR [...]
    python -m bench.gpu_bench --stage 1 --dry-run --out DIR    # CPU, Triton interpreter, tiny sizes

Stage 1: the ceilings (bf16 GEMM rate on random data, device copy bandwidth) ->
ceilings.json; correctness of every GPU backend against float64 and the anchors' errors
(bench/gpu_check.py, in parallel worker processes that also warm the compile caches) ->
correctness.csv; fwd+bwd time and peak memory at N = 8,192, 32,768, 65,536, d = 768 bf16 of
mmloss Triton and CUDA, the 3-GEMM floor, cut-cross-entropy (with its default gradient
filtering and without), eager bf16, torch.compile and Inf-CL (fp32, as in docs/performance.md) ->
stage1.csv. Inputs: keys standard normal, queries = keys + noise (bench/gpu_steps.py).
Stage 2: what stage 1 had no time for; each feature's overhead at N = 65,536 (d = 768, 256);
small batches N = 64 ... 4,096 with and without CUDA graphs; N = 1,048,576 at d = 256; the
grid d = 256 and 768, N = 8,192 ... 262,144 (mmloss Triton and CUDA, floor,
cut-cross-entropy; dense baselines to 65,536, Inf-CL to 131,072); last, the drop-in losses
against sentence-transformers' and OpenCLIP's classes at B = 4,096 and 16,384, d = 768 fp32
(bench/integrations_bench.py's rows; "unavailable" where a peer package is not installed)
-> stage2.csv.
bench/gpu_report.py turns the CSVs into RESULTS_GPU.md, auto_table.json and
bench.png. Timing: CUDA events around one or more steps after a warm-up step (which compiles
and autotunes), median of up to --reps samples; a step of a second or more is timed once by
the host clock. Memory: peak allocated during one step beyond what was allocated before it
(the inputs; the returned gradients are counted). model_ms = bench/static_model.py's
prediction for the row (NaN where nothing is modelled).
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
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository: bench.*, tests.cases

from bench import gpu_check, static_model  # noqa: E402
from bench.gpu_steps import DTYPES, INTEGRATION_METHODS, build_step  # noqa: E402

FIELDS = [
    "stage",
    "section",
    "method",
    "features",
    "dtype",
    "N",
    "d",
    "graph",
    "ms",
    "peak_mib",
    "model_ms",
    "status",
    "timing",
    "seconds",
]
STAGE1_SIZES = [8192, 32768, 65536]
STAGE1_METHODS = [
    ("mmloss_triton", "bf16"),
    ("floor", "bf16"),
    ("mmloss_cuda", "bf16"),
    ("cce", "bf16"),
    ("cce_exact", "bf16"),
    ("eager", "bf16"),
    ("compiled", "bf16"),
    ("infcl", "fp32"),
]
GRID_SIZES = [8192, 16384, 32768, 65536, 131072, 262144]
SMALL_SIZES = [64, 256, 1024, 4096]
INTEGRATION_SIZES = [4096, 16384]
FEATURE_SETS = ["margin", "adaptive", "filter", "groups", "symmetric"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", type=int, choices=(1, 2), required=True)
    ap.add_argument("--out", required=True, help="directory of the CSVs and JSON")
    ap.add_argument("--deadline", type=float, help="epoch seconds by which the stage must end")
    ap.add_argument("--budget-s", type=float, default=240.0, help="without --deadline: seconds from now")
    ap.add_argument("--teacher-width", type=int, default=256, help="dt of the adaptive-margin and filter teachers")
    ap.add_argument("--reps", type=int, default=5, help="timed samples per measurement at most")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="processes of the checks")
    ap.add_argument(
        "--timing-reserve-s", type=float, default=75.0, help="stage 1: seconds kept for the timings when the checks end"
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes: checks the harness")
    args = ap.parse_args(argv)
    if args.deadline is None:
        args.deadline = time.time() + args.budget_s
    return args


class Sizes:
    """The sizes of each section; tiny in a dry run."""

    def __init__(self, dry_run: bool):
        if dry_run:
            self.stage1, self.stage1_d = [64, 130], 64
            self.grid, self.grid_d, self.dense_max, self.infcl_max = [130], [32, 64], 130, 130
            self.features_n, self.features_d = 130, [64]
            self.small, self.small_d = [64], 64
            self.scale = (300, 32)
            self.integrations, self.integrations_d = [64], 32
        else:
            self.stage1, self.stage1_d = STAGE1_SIZES, 768
            self.grid, self.grid_d, self.dense_max, self.infcl_max = GRID_SIZES, [256, 768], 65536, 131072
            self.features_n, self.features_d = 65536, [768, 256]
            self.small, self.small_d = SMALL_SIZES, 768
            self.scale = (1048576, 256)
            self.integrations, self.integrations_d = INTEGRATION_SIZES, 768


def item(
    stage: int, section: str, method: str, dtype: str, n: int, d: int, features: str = "plain", graph: bool = False
) -> Dict[str, object]:
    return dict(
        stage=stage,
        section=section,
        method=method,
        features=features,
        dtype=dtype,
        N=n,
        d=d,
        graph="yes" if graph else "no",
    )


def stage1_items(sz: Sizes) -> List[Dict[str, object]]:
    return [item(1, "anchors", m, t, n, sz.stage1_d) for n in sz.stage1 for m, t in STAGE1_METHODS]


def stage2_items(sz: Sizes) -> List[Dict[str, object]]:
    """In order of priority: features, small batches, N = 1,048,576, the grid (without what
    stage 1 measured), then Inf-CL beyond the dense sizes."""
    items = []
    for d in sz.features_d:
        for m in ("mmloss_triton", "mmloss_cuda"):
            items += [item(2, "features", m, "bf16", sz.features_n, d, f) for f in FEATURE_SETS]
    for n in sz.small:
        for m in ("mmloss_triton", "mmloss_cuda", "eager", "compiled"):
            items.append(item(2, "small", m, "bf16", n, sz.small_d))
        for m in ("mmloss_triton", "mmloss_cuda", "eager"):
            items.append(item(2, "small", m, "bf16", n, sz.small_d, graph=True))
    n, d = sz.scale
    items += [item(2, "scale", m, "bf16", n, d) for m in ("mmloss_triton", "floor", "mmloss_cuda")]
    tail = []
    for d in sz.grid_d:
        for n in sz.grid:
            if d == sz.stage1_d and n in sz.stage1:
                continue
            methods = [
                ("mmloss_triton", "bf16"),
                ("floor", "bf16"),
                ("mmloss_cuda", "bf16"),
                ("cce", "bf16"),
                ("cce_exact", "bf16"),
            ]
            if n <= sz.dense_max:
                methods += [("eager", "bf16"), ("eager", "fp32"), ("compiled", "bf16"), ("infcl", "fp32")]
            elif n <= sz.infcl_max:
                tail.append(item(2, "grid", "infcl", "fp32", n, d))
            items += [item(2, "grid", m, t, n, d) for m, t in methods]
    return items + tail + integration_items(sz)


def integration_items(sz: Sizes) -> List[Dict[str, object]]:
    """The drop-in losses against their peers (bench/integrations_bench.py's rows, fp32 as on
    the CPU), last: the peers' dense B × B matrices (GIST's B × B × d) may not fit (OOM rows)."""
    from bench import integrations_bench

    return [
        item(2, "integrations", method, "fp32", n, sz.integrations_d, case)
        for n in sz.integrations
        for case in integrations_bench.CASES
        for method in INTEGRATION_METHODS
    ]


def warm_variants(stage: int, dry_run: bool) -> List[tuple]:
    """(method, features, dtype, n, d) whose compiled kernels the stage's timings use: the
    chunked path at N = 4,096 (as the large sizes: the same specialisations), the small path
    at 256, the compiled and cut-cross-entropy graphs (dynamic shapes), Inf-CL. A dry run
    warms one of each kind at a tiny size (the interpreter compiles nothing)."""
    n, d = (64, 32) if dry_run else (4096, 768)
    if stage == 1:
        return [
            ("mmloss_triton", "plain", "bf16", n, d),
            ("compiled", "plain", "bf16", n, d),
            ("cce", "plain", "bf16", n, d),
            ("cce_exact", "plain", "bf16", n, d),
            ("infcl", "plain", "fp32", n, d),
        ]
    if dry_run:
        return [("mmloss_triton", "margin", "bf16", n, d)]
    return [("mmloss_triton", f, "bf16", n, 256) for f in FEATURE_SETS] + [
        ("mmloss_triton", "plain", "bf16", 256, 768),
        ("compiled", "plain", "bf16", 256, 768),
    ]


def cuda_reason(torch, dry_run: bool):
    """None when mmloss._C has CUDA kernels for this device, else why not."""
    if dry_run:
        return "dry run (CPU)"
    from mmloss.backends import unavailable_reason

    return unavailable_reason("cuda", torch.device("cuda"))


class Clock:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()


def measure(
    torch, step, device, clock: Clock, max_reps: int, sample_s: float = 0.02, budget_s: float = 2.0
) -> Dict[str, object]:
    """ms and peak MiB of step.run() (see the module docstring); raises on OOM and errors."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step.run()  # warm-up: compiles, autotunes
    sync()
    step.clear()
    sync()
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step.run()
    sync()
    probe = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    if not cuda or probe >= 1.0 or max_reps <= 1:
        return {"ms": 1e3 * probe, "peak_mib": peak, "timing": "host clock, 1 step"}
    inner = min(100, max(1, math.ceil(sample_s / max(probe, 1e-6))))
    reps = max(1, min(max_reps, int(min(budget_s, max(clock.left(), 0) / 2) / (probe * inner))))
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            step.run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return {"ms": statistics.median(times), "peak_mib": peak, "timing": f"events, median of {reps} x {inner} steps"}


def series(it) -> tuple:
    return it["method"], it["features"], it["dtype"], it["d"], it["graph"]


def model_ms(it, dt: int) -> float:
    e = 4 if it["dtype"] == "fp32" else 2
    return static_model.predict(
        it["method"], it["features"], it["N"], it["d"], dt if it["features"] in ("adaptive", "filter") else 0, e
    )


def needed_s(it, history: Dict[tuple, tuple], model: float) -> float:
    """Seconds an item should take: setup (compiles for a new series) + 3 steps + the
    timed samples (≤ 2 s), each step guessed from the series' last N (∝ N²) or the model."""
    if series(it) in history:
        n0, ms0 = history[series(it)]
        step_s = ms0 * max(1.0, (it["N"] / n0) ** 2) / 1e3
    else:
        guess = (
            model
            if math.isfinite(model)
            else static_model.floor_ms(it["N"], it["d"]) * (30 if it["method"] == "infcl" else 5)
        )
        step_s = 1.5 * guess / 1e3
    return (5.0 if series(it) not in history else 1.0) + 3 * step_s + min(2.0, step_s * 5)


def run_item(
    it, args, clock: Clock, torch, mmloss, device, history, failed: Dict[tuple, str], cuda_why
) -> Dict[str, object]:
    """Measures one item; its CSV row."""
    row = dict(
        it,
        ms=float("nan"),
        peak_mib=float("nan"),
        model_ms=model_ms(it, args.teacher_width),
        status="ok",
        timing="",
        seconds=0.0,
    )
    key = series(it)
    if it["method"] == "mmloss_cuda" and cuda_why is not None:
        row["status"] = f"unavailable: {cuda_why}"[:120]
        return row
    if it["graph"] == "yes" and device.type != "cuda":
        row["status"] = "unavailable: CUDA graphs need a GPU"
        return row
    if key in failed:
        row["status"] = failed[key]
        return row
    need = needed_s(it, history, row["model_ms"])
    if need > clock.left():
        row["status"] = f"skipped: needs ~{need:.0f} s, {max(clock.left(), 0):.0f} s left in the stage"
        return row
    start = time.time()
    dtype = getattr(torch, DTYPES[it["dtype"]])
    try:
        step = build_step(
            torch,
            mmloss,
            it["method"],
            it["features"],
            dtype,
            it["N"],
            it["d"],
            device,
            args.teacher_width,
            graph=it["graph"] == "yes",
        )
        row.update(measure(torch, step, device, clock, 1 if args.dry_run else args.reps))
        if it["graph"] == "yes":
            row["peak_mib"] = float("nan")  # a replay allocates nothing: the graph's pool holds it
        history[key] = (it["N"], row["ms"])
    except ImportError as exc:
        row["status"] = f"unavailable: {exc}"[:120]
        failed[key] = row["status"]
    except Exception as exc:  # noqa: BLE001 - one failed series must not end the run
        oom = "out of memory" in str(exc).lower()
        first = str(exc).splitlines()[0] if str(exc) else ""
        row["status"] = "OOM" if oom else f"error: {type(exc).__name__}: {first}"[:160]
        failed[key] = f"skipped: {'OOM' if oom else 'error'} at N={it['N']}"
    finally:
        step = None
        if device.type == "cuda":
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except RuntimeError:  # a lost context: the caller stops the stage
                pass
    row["seconds"] = round(time.time() - start, 2)
    return row


def measure_ceilings(torch, device, dry_run: bool) -> Dict[str, object]:
    """bf16 GEMM TFLOP/s (n³, random data) and device-copy TB/s (bytes read + written),
    each the median of 10 after 3 warm-ups; in a dry run fp32 on the CPU, tiny."""
    n = 256 if dry_run else 8192
    dtype = torch.float32 if dry_run else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=torch.float32).to(dtype) for _ in range(2))
    x = torch.randn((1 << 22) if dry_run else (1 << 29), device=device)  # 2 GiB of fp32 on the GPU
    y = torch.empty_like(x)

    def timed(fn):
        for _ in range(3):
            fn()
        out = []
        for _ in range(10):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return statistics.median(out)

    gemm = 2.0 * n**3 / timed(lambda: a @ b) / 1e12
    copy = 2.0 * x.numel() * x.element_size() / timed(lambda: y.copy_(x)) / 1e12
    return {
        "gemm_tflops": float(f"{gemm:.4g}"),
        "gemm": f"{n}^3 {str(dtype).replace('torch.', '')}",
        "copy_tbps": float(f"{copy:.4g}"),
        "copy_bytes": 2 * x.numel() * x.element_size(),
        "model_gemm_tflops": static_model.MMA_PEAK / 1e12,
        "model_copy_tbps": static_model.HBM / 1e12,
    }


def run_info(torch) -> Dict[str, str]:
    import triton

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


class CsvLog:
    """Rows appended to a CSV and flushed one by one."""

    def __init__(self, path: str):
        new = not os.path.exists(path)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=FIELDS)
        if new:
            self.writer.writeheader()

    def write(self, row) -> None:
        self.writer.writerow(row)
        self.file.flush()


def print_row(row) -> None:
    print(
        f"{row['method']:>14} {row['features']:>9} {row['dtype']:>4} N={row['N']:>8} d={row['d']:>4} "
        f"graph={row['graph']:>3} {row['ms']:>10.3f} ms {row['peak_mib']:>10.1f} MiB  "
        f"model {row['model_ms']:>9.3f} ms  {row['status']}",
        flush=True,
    )


def skipped_rows(path: str) -> List[Dict[str, str]]:
    """Rows of an earlier stage's CSV that were skipped for want of time (or of a CUDA context)."""

    def for_time(status: str) -> bool:
        return status.startswith(("skipped: needs", "skipped: CUDA context lost")) or status in (
            "skipped: stage time",
            "skipped: killed at the stage's deadline",
        )

    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if for_time(r["status"])]


def run_checks(args, torch, sz: Sizes, cuda_why) -> None:
    """The parallel jobs of the stage: warm-ups first, then (stage 1) the correctness grid
    and the anchors' errors, until the stage's deadline less the timings' reserve; stage 2
    runs the checks that stage 1 had no time for (their rows follow the skipped ones)."""
    jobs = gpu_check.warm_jobs(warm_variants(args.stage, args.dry_run))
    if args.stage == 1:
        backends = ["triton"] + ([] if cuda_why else ["cuda"])
        jobs += gpu_check.check_jobs(backends, args.dry_run)
        jobs += gpu_check.anchor_jobs(
            ["mmloss_triton"] + ([] if cuda_why else ["mmloss_cuda"]) + ["eager", "cce", "cce_exact", "infcl"],
            args.dry_run,
        )
        deadline = args.deadline - (0 if args.dry_run else args.timing_reserve_s)
    else:
        left = [
            dict(
                kind=r["kind"],
                backend=r["backend"],
                path=r["path"],
                features=r["features"],
                dtype=r["dtype"],
                shape=(int(r["M"]), int(r["N"]), int(r["d"])),
            )
            for r in skipped_rows(os.path.join(args.out, "correctness.csv"))
            if r["kind"] != "warm"
        ]
        jobs += left
        deadline = min(args.deadline - 60, time.time() + (90 if left else 45))
    t0 = time.time()
    rows = gpu_check.run_pool(jobs, os.path.join(args.out, "correctness.csv"), args.workers, deadline)
    counts: Dict[str, int] = {}
    for r in rows:
        name = f"{r['kind']} {r['status'].split(':')[0]}"
        counts[name] = counts.get(name, 0) + 1
    print(
        f"== stage {args.stage} parallel jobs in {time.time() - t0:.0f} s: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
        flush=True,
    )
    for r in rows:
        if r["status"] not in ("ok", "measured") and not r["status"].startswith("skipped"):
            print(
                f"   {r['kind']} {r['backend']} {r['path']} {r['features']} {r['dtype']} "
                f"{r['M']}x{r['N']}x{r['d']}: {r['status']} {r['detail']}",
                flush=True,
            )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        args.workers = min(args.workers, 2)
    import torch

    import mmloss

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --dry-run to check the harness on the CPU)")
    os.makedirs(args.out, exist_ok=True)
    sz = Sizes(args.dry_run)
    cuda_why = cuda_reason(torch, args.dry_run)
    clock = Clock(args.deadline)
    print(f"== stage {args.stage}: {clock.left():.0f} s left; CUDA backend: {cuda_why or 'available'}", flush=True)
    if args.stage == 1:
        info = dict(run_info(torch), **measure_ceilings(torch, device, args.dry_run))
        with open(os.path.join(args.out, "ceilings.json"), "w") as f:
            json.dump(info, f, indent=2)
        print(f"== ceilings: GEMM {info['gemm_tflops']} TFLOP/s, copy {info['copy_tbps']} TB/s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    run_checks(args, torch, sz, cuda_why)
    items = stage1_items(sz)
    if args.stage == 2:  # first what stage 1 had no time for
        items = [
            dict(
                item(2, r["section"], r["method"], r["dtype"], int(r["N"]), int(r["d"]), r["features"]),
                graph=r["graph"],
            )
            for r in skipped_rows(os.path.join(args.out, "stage1.csv"))
        ]
        items += stage2_items(sz)
    log = CsvLog(os.path.join(args.out, f"stage{args.stage}.csv"))
    history: Dict[tuple, tuple] = {}
    failed: Dict[tuple, str] = {}
    print(f"== stage {args.stage} timings: {len(items)} items, {clock.left():.0f} s left", flush=True)
    lost = None
    for it in items:
        if lost:
            row = dict(
                it,
                ms=float("nan"),
                peak_mib=float("nan"),
                model_ms=model_ms(it, args.teacher_width),
                status=f"skipped: CUDA context lost ({lost})",
                timing="",
                seconds=0.0,
            )
        else:
            row = run_item(it, args, clock, torch, mmloss, device, history, failed, cuda_why)
            if gpu_check.context_lost(row["status"]):
                lost = f"{row['method']} {row['features']} N={row['N']} d={row['d']}"
        log.write(row)
        print_row(row)
    print(f"== stage {args.stage} done, {clock.left():.0f} s left", flush=True)


if __name__ == "__main__":
    main()
