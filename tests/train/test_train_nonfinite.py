"""No NaN model: a term without valid rows is skipped, a non-finite loss or gradient stops the run
(naming the step, the part and the batch's lines) or, with train.skip_nonfinite, skips the step;
nothing is saved from a non-finite state; a checkpoint of another ZeRO stage is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.repo import REPO  # noqa: E402
from tests.train.support import small_settings, tiny_bert  # noqa: E402
from train.config import ConfigError, build_config  # noqa: E402
from train.demo_data import write_demo_data  # noqa: E402
from train.guard import NonFiniteError, describe_sources  # noqa: E402
from train.presets import CONFIGS  # noqa: E402


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The tiny BERT and the shapes data (the launcher variables the in-process trainers set are
    restored by tests/train/conftest.py)."""
    root = tmp_path_factory.mktemp("nonfinite")
    tiny_bert(root / "bert")
    write_demo_data(root / "data", images=40)  # 120 captions
    return root


def _trainer(shared, out: Path, method: str = "mcse", data: Path = None, zero: int = 0, **train):
    from train.trainer import Trainer

    settings = small_settings(out, shared / "bert", data or shared / "data", **train)
    settings["deepspeed"]["zero_stage"] = zero
    settings["loss"]["backend"] = "cpu"
    return Trainer(build_config(CONFIGS / f"{method}.yaml", base=settings))


def _finite(trainer) -> bool:
    return all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())


def _nan_gradient_at(trainer, call: int) -> None:
    """The gradient of mlp.0.weight becomes NaN on backward number `call` (from 1)."""
    calls = []

    def hook(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == call else grad

    trainer.engine.module.mlp[0].weight.register_hook(hook)


def test_phrase_sparse_mcseo_ends_finite(shared, tmp_path):
    """1 caption of 120 has phrases: most caption batches have no valid object-phrase row
    (before: every weight NaN from step 2 on the cpu backend, exit 0)."""
    data = tmp_path / "sparse"
    data.mkdir()
    for f in (shared / "data").iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    records = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]
    for r in records[1:]:
        r["phrases"] = []
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    trainer = _trainer(shared, tmp_path / "run", "mcseo", data, max_steps=6)
    summary = trainer.run()
    assert _finite(trainer)
    assert summary["skipped_terms"] >= 1 and summary["nonfinite_steps"] == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_terms", 0) for r in log) == summary["skipped_terms"]
    assert all(r["loss"] == r["loss"] for r in log if "loss" in r)


@pytest.mark.parametrize("zero", [0, 2])
def test_nan_features_stop_before_any_checkpoint(shared, tmp_path, zero):
    trainer = _trainer(shared, tmp_path / "run", zero=zero, max_steps=4, save_steps=1)
    trainer.pairs.image_features[:] = float("nan")  # past the loader's check
    with pytest.raises(NonFiniteError) as info:
        trainer.run()
    message = str(info.value)
    first = _caption_steps(trainer, 4)[0]
    assert f"step {first}: loss part 'mml' is not finite" in message, message  # the first caption batch
    assert "captions.jsonl lines " in message and "skip_nonfinite" in message, message
    assert _finite(trainer)
    saved = [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")]
    assert saved == [f"step-{step:06d}" for step in range(1, first)]
    assert not (tmp_path / "run" / "last").exists()


def _caption_steps(trainer, steps: int) -> list:
    """The 1-based steps of the first `steps` that take a caption batch (the official mixing)."""
    return [s + 1 for s in range(steps) if trainer.batches.indices(s)[0] == "pairs"]


@pytest.mark.parametrize("zero", [0, 2])
def test_nan_gradient_stops(shared, tmp_path, zero):
    trainer = _trainer(shared, tmp_path / "run", zero=zero, max_steps=4)
    _nan_gradient_at(trainer, 3)
    with pytest.raises(NonFiniteError, match="step 3: .*gradient") as info:
        trainer.run()
    if zero == 0:
        assert "the gradient of mlp.0.weight is not finite" in str(info.value)
    assert _finite(trainer) and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("zero", [0, 2])
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_skip_nonfinite_skips_and_counts(shared, tmp_path, zero, where):
    trainer = _trainer(shared, tmp_path / "run", zero=zero, max_steps=4, skip_nonfinite=True)
    if where == "loss":
        trainer.pairs.image_features[:] = float("nan")  # every caption batch
    else:
        _nan_gradient_at(trainer, 3)
    summary = trainer.run()
    skipped = len(_caption_steps(trainer, 4)) if where == "loss" else 1
    assert summary["nonfinite_steps"] == skipped and _finite(trainer)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("nonfinite_steps", 0) for r in log) == skipped
    if zero == 0:  # torch's AdamW: no update of the skipped steps
        state = trainer.engine.optimizer.state[trainer.engine.module.mlp[0].weight]
        assert int(state.get("step", 0)) == 4 - skipped  # no state at all when every step was skipped
    else:
        assert trainer.engine.skipped_steps == skipped
    assert (tmp_path / "run" / "last" / "heads.safetensors").exists()


def test_nan_weights_are_never_saved(shared, tmp_path):
    """An update that makes a weight NaN from finite gradients (here: injected after the
    optimizer's second step) stops the run before that step's checkpoint."""
    trainer = _trainer(shared, tmp_path / "run", max_steps=4, save_steps=1)
    weight = trainer.engine.module.mlp[0].weight
    steps = []

    def poison(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 2:
            weight.data[0, 0] = float("nan")

    trainer.engine.optimizer.register_step_post_hook(poison)
    with pytest.raises(NonFiniteError, match="step 2: weight mlp.0.weight is not finite"):
        trainer.run()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == ["step-000001"]


def test_resume_with_another_zero_stage_says_what_differs(shared, tmp_path):
    _trainer(shared, tmp_path / "run", zero=2, max_steps=2).run()
    with pytest.raises(
        ConfigError,
        match=r"saved with ZeRO stage 2 on 1 rank\(s\), but this run has "
        r"deepspeed.zero_stage=0 on 1 rank\(s\)",
    ):
        _trainer(shared, tmp_path / "run", zero=0, max_steps=4).run()


def test_describe_sources():
    assert describe_sources(["a.jsonl:3", "a.jsonl:9", "b.txt:2"]) == "a.jsonl lines 3, 9; b.txt line 2"


NAN_FEATURES = """
import sys
import train.data as d
load = d.load_pairs
def nan_pairs(*args, **kwargs):
    data = load(*args, **kwargs)
    data.image_features[5] = float("nan")
    return data
d.load_pairs = nan_pairs
import train.trainer as t
t.load_pairs = nan_pairs
from train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_exits_non_zero_on_nan(shared, tmp_path):
    import yaml

    settings = small_settings(tmp_path / "run", shared / "bert", shared / "data", max_steps=40, save_steps=1)
    settings["data"].pop("text")
    config = tmp_path / "mcse.yaml"
    config.write_text(yaml.safe_dump({"method": "mcse", **settings}))
    env = dict(os.environ)  # the launcher variables are restored by conftest.py
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", NAN_FEATURES, "--config", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "error: step " in proc.stderr and "loss part 'mml' is not finite" in proc.stderr, proc.stderr[-4000:]
    assert not (tmp_path / "run" / "last").exists()
