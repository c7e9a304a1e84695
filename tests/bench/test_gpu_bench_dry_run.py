"""The GPU benchmark's harness on the CPU (`bench/gpu_bench.py --dry-run`: Triton interpreter,
N = 64 and 130): a GPU session is rare, so its script must not fail on a harness bug."""

from tests.repo import REPO
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = REPO
pytest.importorskip("triton")


def test_gpu_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], check=True)


def test_dry_run_writes_every_output(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--dry-run", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("bench.csv", "bench.png", "summary.txt", "auto_table.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = (tmp_path / "summary.txt").read_text()
    assert "sym x" in summary and "\n      64   64" in summary and "\n     130   64" in summary
    rows = (tmp_path / "bench.csv").read_text().splitlines()
    measured = {tuple(r.split(",")[:2]) for r in rows[1:] if r.endswith(",ok")}
    for features in ("plain", "margin", "adaptive+filter", "groups", "symmetric"):
        assert ("mmloss_triton", features) in measured, features
    table = json.loads((tmp_path / "auto_table.json").read_text())
    assert table["cuda_faster"] == []  # no CUDA suite ran: auto must not pick cuda from this run
