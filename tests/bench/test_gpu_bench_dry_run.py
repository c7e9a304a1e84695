"""The GPU run's script on the CPU (`bash bench/gpu.sh --dry-run`: both stages, Triton
interpreter, tiny sizes): a GPU session is rare and short, so its script must not fail on a
harness bug, and every output of both stages must come out."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import types

import pytest

from tests.repo import REPO

pytest.importorskip("triton")

from bench import gpu_bench, gpu_check, gpu_report  # noqa: E402

OUTPUTS = (
    "run.log",
    "ceilings.json",
    "correctness.csv",
    "stage1.csv",
    "stage2.csv",
    "RESULTS_GPU.md",
    "auto_table.json",
    "bench.png",
)


def test_gpu_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu.sh")], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(REPO / "bench" / "gpu.sh")], check=True)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("cut_cross_entropy")  # requirements-dev.txt: its rows must be measured
    out = tmp_path_factory.mktemp("gpu_out")
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run.stdout


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_output_and_the_summary_last(dry_run):
    out, stdout = dry_run
    assert sorted(os.listdir(out)) == sorted(OUTPUTS)  # the device tool returns at most 8 files
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    tail = stdout.rstrip().splitlines()[-1]
    assert tail.startswith("Rows not measured"), tail
    results = (out / "RESULTS_GPU.md").read_text()
    for heading in (
        "Correctness against float64",
        "Plain loss",
        "Ratios",
        "Peak memory",
        "Features",
        "Small batches",
        "Scale",
        "Drop-in losses",
        "Static model",
    ):
        assert heading in results, heading
    assert "stage 1 ended" not in stdout and "stage 2 ended" not in stdout  # both stages exited 0


def test_stage1_rows(dry_run):
    out, _ = dry_run
    rows = _rows(out / "stage1.csv")
    sizes = {int(r["N"]) for r in rows}
    assert sizes == {64, 130}
    measured = {(r["method"], int(r["N"])) for r in rows if r["status"] == "ok"}
    for method in ("mmloss_triton", "floor", "cce", "eager", "compiled"):
        assert {(method, 64), (method, 130)} <= measured, method
    status = {r["method"]: r["status"] for r in rows}
    assert status["mmloss_cuda"].startswith("unavailable") and status["infcl"].startswith("unavailable")
    assert all(float(r["model_ms"]) > 0 for r in rows if r["method"] in ("mmloss_triton", "floor", "cce"))
    info = json.loads((out / "ceilings.json").read_text())
    assert info["gemm_tflops"] > 0 and info["copy_tbps"] > 0


def test_stage2_rows(dry_run):
    out, _ = dry_run
    rows = _rows(out / "stage2.csv")
    ok = {(r["section"], r["method"], r["features"], r["graph"]) for r in rows if r["status"] == "ok"}
    for features in gpu_bench.FEATURE_SETS:
        assert ("features", "mmloss_triton", features, "no") in ok, features
    assert {("small", m, "plain", "no") for m in ("mmloss_triton", "eager", "compiled")} <= ok
    graphs = {r["method"]: r["status"] for r in rows if r["graph"] == "yes"}
    assert graphs["mmloss_triton"] == graphs["eager"] == "unavailable: CUDA graphs need a GPU"
    assert graphs["mmloss_cuda"].startswith("unavailable")
    assert {("grid", m, "plain", "no") for m in ("mmloss_triton", "floor", "cce", "eager", "compiled")} <= ok
    assert ("scale", "mmloss_triton", "plain", "no") in ok
    from bench import integrations_bench

    for case in integrations_bench.CASES:
        for method in ("integration_peer", "integration_mmloss"):
            assert ("integrations", method, case, "no") in ok, (method, case)


def test_correctness_rows(dry_run):
    out, _ = dry_run
    from tests.cases import FEATURES

    rows = _rows(out / "correctness.csv")
    checks = {(r["features"], r["dtype"]): r["status"] for r in rows if r["kind"] == "check"}
    # A feature the backend rejects by name (docs/contract.md §3, not yet computed) is skipped.
    assert all(checks.get((f, "bf16")) in ("ok", "skipped: unsupported feature") for f in FEATURES), checks
    assert checks[("row_threshold", "bf16")] == "ok"
    assert checks[("plain", "fp32")] == "ok" and checks[("plain", "fp16")] == "ok"
    anchors = {r["backend"]: r for r in rows if r["kind"] == "anchor"}
    for method in ("mmloss_triton", "eager", "cce"):
        assert anchors[method]["status"] == "measured" and "loss rel err" in anchors[method]["detail"]
    assert {r["backend"] for r in rows if r["kind"] == "warm" and r["status"] == "ok"} >= {"mmloss_triton", "cce"}
    table = json.loads((out / "auto_table.json").read_text())
    assert table["gpu_run"]["cuda_tests"] == "not run" and table["cuda_faster"] == []


def _args(**kw):
    return types.SimpleNamespace(teacher_width=256, dry_run=False, reps=5, **kw)


def test_an_item_that_does_not_fit_is_skipped_and_says_so():
    it = gpu_bench.item(2, "grid", "mmloss_triton", "bf16", 262144, 768)
    row = gpu_bench.run_item(
        it, _args(), gpu_bench.Clock(time.time() + 5), None, None, types.SimpleNamespace(type="cuda"), {}, {}, None
    )
    assert row["status"].startswith("skipped: needs ~") and "left in the stage" in row["status"]


def test_a_job_after_the_deadline_is_skipped():
    job = dict(
        kind="check",
        backend="triton",
        path="small",
        features="plain",
        dtype="bf16",
        shape=(3, 4, 5),
        deadline=time.time() - 1,
    )
    assert gpu_check.run_job(job)["status"] == "skipped: stage time"


def _row(method, n, d, ms):
    return dict(
        method=method,
        dtype="bf16",
        N=n,
        d=d,
        features="plain",
        graph="no",
        status="ok",
        ms=ms,
        model_ms=float("nan"),
        section="grid",
        peak_mib=1.0,
    )


def test_auto_table_lists_where_cuda_won_at_every_d():
    rows = [_row("mmloss_triton", n, d, 10.0) for n in (1024, 4096, 16384) for d in (256, 768)]
    rows += [
        _row("mmloss_cuda", 1024, 256, 9.0),
        _row("mmloss_cuda", 1024, 768, 9.0),
        _row("mmloss_cuda", 4096, 256, 9.0),
        _row("mmloss_cuda", 4096, 768, 11.0),
        _row("mmloss_cuda", 16384, 256, 9.0),
        _row("mmloss_cuda", 16384, 768, 9.0),
    ]
    table = gpu_report.auto_table(rows, {"device": "x"}, "passed")
    assert table["cuda_faster"] == [
        {"dtype": "bf16", "min_n": 1, "max_n": 1024},
        {"dtype": "bf16", "min_n": 4097, "max_n": 16384},
    ]
    assert gpu_report.auto_table(rows, {"device": "x"}, "not passed (1 of 2 cases not ok)")["cuda_faster"] == []


def test_a_worker_stops_after_its_cuda_context_is_lost(monkeypatch):
    def crash(job):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "_check", crash)
    monkeypatch.setattr(gpu_check, "_lost", [])
    job = dict(
        kind="check",
        backend="cuda",
        path="chunked",
        features="all",
        dtype="fp16",
        shape=(7, 129, 100),
        deadline=time.time() + 60,
    )
    first, second = gpu_check.run_job(job), gpu_check.run_job(dict(job, dtype="bf16"))
    assert first["status"] == "error" and "illegal memory access" in first["detail"]
    assert second["detail"] == "not run: CUDA context lost after check cuda chunked all fp16 7x129x100"
    assert gpu_check.context_lost("error: RuntimeError: CUDA error: an illegal memory access was encountered")


def test_stage2_reruns_what_stage1_skipped_for_time(tmp_path):
    statuses = [
        "ok",
        "skipped: needs ~9 s, 3 s left in the stage",
        "skipped: OOM at N=131072",
        "skipped: CUDA context lost (mmloss_cuda plain N=8192 d=768)",
        "skipped: stage time",
        "FAIL",
    ]
    path = tmp_path / "stage1.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "status"])
        writer.writeheader()
        writer.writerows({"method": str(i), "status": s} for i, s in enumerate(statuses))
    assert [r["method"] for r in gpu_bench.skipped_rows(str(path))] == ["1", "3", "4"]
