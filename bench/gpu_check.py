"""Correctness of the GPU backends against float64, and compile-cache warm-up, in parallel
worker processes (compiling Triton variants is CPU-bound: one worker per core).

Jobs (dicts) of three kinds, run by `run_pool` with a deadline; each result is a row of
OUT/correctness.csv, written as it arrives:
* check:  one backend (triton: small and chunked path; cuda: one scratch chunk and 64 x 64
          chunks) × feature set (tests/cases.py's FEATURES) × dtype at sizes that cross tile
          edges, against the float64 reference by tests/cases.py's bar (docs/contract.md §1), one
          config per Triton variant (MMLOSS_TRITON_AUTOTUNE=0). status ok / FAIL / error, or
          "skipped: unsupported feature" where the backend rejects a docs/contract.md §3
          feature by name (mmloss.problem.UnsupportedFeature).
* anchor: the loss and gradient error of mmloss and each anchor (eager bf16, cut-cross-
          entropy, Inf-CL) against float64 eager on the same rounded inputs.
* warm:   one autotuned step of a benchmarked variant at a small size, so that the
          benchmark's own warm-up finds its kernels compiled (Triton's and Inductor's caches
          are on disk and shared between processes).
A job that starts after the deadline is reported "skipped: stage time".
"""

from __future__ import annotations

import contextlib
import csv
import multiprocessing
import os
import time
from typing import Dict, Iterable, List

FIELDS = ["kind", "backend", "path", "features", "dtype", "M", "N", "d", "status", "detail", "seconds"]
PATHS = {"triton": ("small", "chunked"), "cuda": ("one_chunk", "chunked")}
CHECK_DTYPES = ("bf16", "fp16", "fp32")
# (M, N, d): rows and columns cross the 64- and 128-wide tiles, d is no multiple of 64.
CHECK_SHAPE = (300, 520, 200)
ODD_SHAPES = [(1, 1, 3), (7, 129, 100), (129, 1000, 768)]
DRY_SHAPE = (70, 130, 40)


def check_jobs(backends: Iterable[str], dry_run: bool) -> List[Dict[str, object]]:
    """Every feature × dtype × path of each backend at CHECK_SHAPE, bf16 first and the
    backends interleaved (a run cut short has some of each), then the heaviest feature set at
    ODD_SHAPES. Dry run: every feature in bf16 on the first path and plain fp32/fp16 on the
    second, at DRY_SHAPE (the interpreter is slow)."""
    from tests.cases import FEATURES

    backends = list(backends)
    jobs = []
    if dry_run:
        for backend in backends:
            jobs += [
                dict(backend=backend, path=PATHS[backend][0], features=f, dtype="bf16", shape=DRY_SHAPE)
                for f in sorted(FEATURES)
            ]
            jobs += [
                dict(backend=backend, path=PATHS[backend][1], features="plain", dtype=t, shape=DRY_SHAPE)
                for t in ("fp32", "fp16")
            ]
        return [dict(job, kind="check") for job in jobs]
    for dtype in CHECK_DTYPES:
        for i in (0, 1):
            for backend in backends:
                jobs += [
                    dict(backend=backend, path=PATHS[backend][i], features=f, dtype=dtype, shape=CHECK_SHAPE)
                    for f in sorted(FEATURES)
                ]
    jobs += [
        dict(backend=backend, path=path, features="all", dtype=dtype, shape=shape)
        for shape in ODD_SHAPES
        for dtype in CHECK_DTYPES
        for backend in backends
        for path in PATHS[backend]
    ]
    return [dict(job, kind="check") for job in jobs]


def anchor_jobs(methods: Iterable[str], dry_run: bool) -> List[Dict[str, object]]:
    """Loss and gradient errors at N = 2,048, d = 256 (docs/performance.md's Inf-CL figure), each method
    in its benchmarked dtype; cut-cross-entropy also at N = 16,384, where its gradient
    filter meets a flatter softmax."""
    sizes = [(130, 32)] if dry_run else [(2048, 256), (16384, 256)]
    dtypes = {"infcl": "fp32"}
    return [
        dict(kind="anchor", backend=m, path="", features="plain", dtype=dtypes.get(m, "bf16"), shape=(n, n, d))
        for i, (n, d) in enumerate(sizes)
        for m in methods
        if i == 0 or m.startswith("cce")
    ]


def warm_jobs(variants: Iterable[tuple]) -> List[Dict[str, object]]:
    """(method, features, dtype, n, d) -> warm jobs."""
    return [dict(kind="warm", backend=m, path="", features=f, dtype=t, shape=(n, n, d)) for m, f, t, n, d in variants]


@contextlib.contextmanager
def _path(backend: str, path: str):
    """The chunked designs at small sizes: Triton's SMALL_MAX = 0, CUDA's scratch budget 0
    (64 x 64 chunks: MMLOSS_CUDA_SCRATCH_MB=0), as the GPU test suites set them."""
    if path != "chunked":
        yield
        return
    if backend == "triton":
        import mmloss.triton.ops as ops

        old, ops.SMALL_MAX = ops.SMALL_MAX, 0
        try:
            yield
        finally:
            ops.SMALL_MAX = old
    else:
        old = os.environ.get("MMLOSS_CUDA_SCRATCH_MB")
        os.environ["MMLOSS_CUDA_SCRATCH_MB"] = "0"
        try:
            yield
        finally:
            if old is None:
                del os.environ["MMLOSS_CUDA_SCRATCH_MB"]
            else:
                os.environ["MMLOSS_CUDA_SCRATCH_MB"] = old


def _device(torch):
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check(job) -> Dict[str, str]:
    import torch

    from mmloss.problem import UnsupportedFeature
    from tests.cases import assert_kernel_matches_reference, make_case

    M, N, d = job["shape"]
    case = make_case(M, N, d, job["features"], seed=M + N + d, device=_device(torch))
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[job["dtype"]])
    os.environ["MMLOSS_TRITON_AUTOTUNE"] = "0"
    try:
        with _path(job["backend"], job["path"]):
            assert_kernel_matches_reference(case, dtype, backend=job["backend"])
    except AssertionError as exc:
        return {"status": "FAIL", "detail": str(exc).splitlines()[0][:200]}
    except UnsupportedFeature as exc:
        return {"status": "skipped: unsupported feature", "detail": str(exc)[:200]}
    return {"status": "ok", "detail": ""}


def _relative(got, want) -> float:
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-300))


def _anchor(job) -> Dict[str, str]:
    """Relative errors of loss and gradients against float64 eager on the rounded inputs."""
    import torch

    import mmloss
    from bench import anchors
    from bench.gpu_steps import DTYPES, TEMPERATURE, loss_fn, make_inputs

    n, _, d = job["shape"]
    device = _device(torch)
    q, k = make_inputs(torch, n, d, getattr(torch, DTYPES[job["dtype"]]), device, seed=3)
    fn = loss_fn(torch, mmloss, job["backend"], "plain", n, 0, q.dtype, device)
    loss = fn(q, k)
    dq, dk = torch.autograd.grad(loss, (q, k))
    loss = loss.detach()
    q64, k64 = (x.detach().double().requires_grad_(True) for x in (q, k))
    ref = anchors.eager_loss(q64, k64, TEMPERATURE)
    rq, rk = torch.autograd.grad(ref, (q64, k64))
    ref = ref.detach()
    grad_err = max(_relative(dq, rq), _relative(dk, rk))
    return {
        "status": "measured",
        "detail": f"loss rel err {abs(float(loss) - float(ref)) / abs(float(ref)):.3g}, grad rel err {grad_err:.3g}",
    }


def _warm(job) -> Dict[str, str]:
    import torch

    import mmloss
    from bench.gpu_steps import DTYPES, build_step

    n, _, d = job["shape"]
    os.environ["MMLOSS_TRITON_AUTOTUNE"] = "1"
    step = build_step(
        torch, mmloss, job["backend"], job["features"], getattr(torch, DTYPES[job["dtype"]]), n, d, _device(torch)
    )
    step.run()
    step.run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"status": "ok", "detail": ""}


STICKY = (
    "illegal memory access",
    "unspecified launch failure",
    "device-side assert",
    "misaligned address",
    "illegal instruction",
    "CUDA error: an illegal",
)
_lost: List[str] = []  # in a worker: the job after which its CUDA context is unusable


def context_lost(text: str) -> bool:
    """Whether an error leaves the process's CUDA context unusable (every later call fails)."""
    return any(s in text for s in STICKY)


def run_job(job) -> Dict[str, object]:
    """In a worker: one job, its CSV row (never raises). After an error that leaves the CUDA
    context unusable, the worker's later jobs are not run and say after which job."""
    M, N, d = job["shape"]
    row = {k: job.get(k, "") for k in ("kind", "backend", "path", "features", "dtype")}
    row.update(M=M, N=N, d=d)
    if time.time() > job["deadline"]:
        return dict(row, status="skipped: stage time", detail="", seconds=0.0)
    if _lost:
        return dict(row, status="error", detail=f"not run: CUDA context lost after {_lost[0]}", seconds=0.0)
    start = time.time()
    try:
        row.update({"check": _check, "anchor": _anchor, "warm": _warm}[job["kind"]](job))
    except ImportError as exc:
        row.update(status="unavailable", detail=str(exc)[:200])
    except Exception as exc:  # noqa: BLE001 - one broken case must not end the grid
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        row.update(status="error", detail=f"{type(exc).__name__}: {text}")
        if context_lost(str(exc)):
            _lost.append(
                f"{job['kind']} {job['backend']} {job.get('path', '')} {job['features']} {job['dtype']} {M}x{N}x{d}"
            )
    return dict(row, seconds=round(time.time() - start, 2))


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_pool(
    jobs: List[Dict[str, object]], out_csv: str, workers: int, deadline: float, grace_s: float = 20.0
) -> List[Dict[str, object]]:
    """Runs the jobs on `workers` spawned processes in order; rows are appended to out_csv as
    they arrive. Jobs not started by `deadline` (epoch seconds) are skipped; workers still busy
    `grace_s` after it are terminated and their jobs reported as killed."""
    jobs = [dict(job, deadline=deadline) for job in jobs]
    rows: List[Dict[str, object]] = []
    new = not os.path.exists(out_csv)
    with open(out_csv, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        pool = multiprocessing.get_context("spawn").Pool(max(1, workers), initializer=_init_worker)
        try:
            results = pool.imap_unordered(run_job, jobs)
            for _ in jobs:
                try:
                    row = results.next(timeout=max(1.0, deadline + grace_s - time.time()))
                except multiprocessing.TimeoutError:
                    break
                rows.append(row)
                writer.writerow(row)
                f.flush()
        finally:
            if len(rows) == len(jobs):
                pool.close()
            else:
                pool.terminate()
            pool.join()
        done = {(r["kind"], r["backend"], r["path"], r["features"], r["dtype"], r["M"], r["N"], r["d"]) for r in rows}
        for job in jobs:
            key = (job["kind"], job["backend"], job.get("path", ""), job["features"], job["dtype"], *job["shape"])
            if key not in done:
                row = dict(zip(FIELDS, (*key, "skipped: killed at the stage's deadline", "", 0.0)))
                rows.append(row)
                writer.writerow(row)
    return rows
