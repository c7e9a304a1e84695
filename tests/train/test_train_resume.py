"""A run SIGKILLed while writing a checkpoint resumes from the previous one and ends with the
same weights, best-model choice and scores as a run never interrupted (ZeRO-2, one process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from tests.repo import REPO  # noqa: E402
from tests.train.support import small_settings, tiny_bert, tiny_senteval  # noqa: E402
from train.demo_data import write_demo_data  # noqa: E402

# Runs the CLI with checkpoint publication patched to SIGKILL the process just before the
# checkpoint of step 4 is renamed into place (its files are written, `latest` still says 2).
KILL_AT_STEP_4 = """
import os, signal, sys
import train.checkpoint as c
publish = c._publish
def killing(tmp, final):
    if tmp.name == c.TMP_PREFIX + c.step_name(4):
        os.kill(os.getpid(), signal.SIGKILL)
    publish(tmp, final)
c._publish = killing
from train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _run(args, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _weights(run):
    model = run / "last"
    return {**load_file(str(model / "encoder" / "model.safetensors")), **load_file(str(model / "heads.safetensors"))}


def test_sigkill_and_resume_matches_uninterrupted(tmp_path):
    tiny_bert(tmp_path / "bert")
    write_demo_data(tmp_path / "data", images=40)
    sts = tiny_senteval(tmp_path / "senteval")
    configs = {}
    for name in ("straight", "killed"):
        settings = small_settings(
            tmp_path / name,
            tmp_path / "bert",
            tmp_path / "data",
            max_steps=6,
            save_steps=2,
            eval_steps=2,
            eval_after=True,
            sts_dir=str(sts),
        )
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({"method": "mcseo", **settings}))
    _run(["-m", "train", "--config", str(configs["straight"])])

    killed = _run(["-c", KILL_AT_STEP_4, "--config", str(configs["killed"])], check=False)
    assert killed.returncode == -9, killed.stderr[-4000:]
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert os.readlink(checkpoints / "latest") == "step-000002"
    assert (checkpoints / ".tmp-step-000004").is_dir()  # the interrupted write, never published
    assert not (tmp_path / "killed" / "last").exists()

    _run(["-m", "train", "--config", str(configs["killed"])])
    assert not (checkpoints / ".tmp-step-000004").exists()
    assert os.readlink(checkpoints / "latest") == "step-000006"
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        assert value.equal(resumed[name]), name
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("straight", "killed")]
    assert summaries[0]["best"] == summaries[1]["best"] and summaries[0]["results"] == summaries[1]["results"]
    assert summaries[0]["results"]["after"]["avg"] == summaries[0]["results"]["after"]["avg"]  # not NaN
