"""The trainer trains as the official code trains (issue 15): fp32 weights under bf16 autocast,
transformers 4.x's AdamW, the heads' initialisation, KDMCSE's two margins, the start-up notes
when the world size changes the experiment, pooling choices, the seeds report and the verdict
on the starting model's own score."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("deepspeed")

import mmloss  # noqa: E402
from tests.train.support import small_settings, tiny_bert, tiny_senteval  # noqa: E402
from train.config import ConfigError, build_config, parse_override  # noqa: E402
from train.demo_data import write_demo_data  # noqa: E402
from train.optim import AdamWHF  # noqa: E402
from train.presets import CONFIGS  # noqa: E402
from train.report import seeds_table, write_seeds_report  # noqa: E402
from train.trainer import experiment_notes, training_verdict  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("papers")
    tiny_bert(root / "bert")
    write_demo_data(root / "data", images=24)
    return root


def _config(tiny, out, method="mcse", **train):
    settings = small_settings(out, tiny / "bert", tiny / "data", **train)
    settings["deepspeed"] = {"zero_stage": 0}
    return build_config(CONFIGS / f"{method}.yaml", base=settings)


def test_bf16_autocast_step_keeps_fp32_weights(tiny, tmp_path):
    """precision bf16: the encoder runs in bf16, the loss gets fp32 inputs, every weight, the
    optimizer state and the saved models stay fp32, and the step moved the weights."""
    from safetensors.torch import load_file

    from train.trainer import Trainer

    config = _config(tiny, tmp_path / "run", max_steps=2)
    config.deepspeed.precision = "bf16"
    trainer = Trainer(config)
    model = trainer.engine.module
    seen = {"hidden": set(), "loss": set()}
    linears = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)] + [model.mlp[0]]
    for linear in linears:
        linear.register_forward_hook(lambda m, i, o: seen["hidden"].add(o.dtype))
    model.loss.register_forward_pre_hook(
        lambda m, args, kwargs: seen["loss"].update(
            a.dtype for a in list(args) + list(kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()
        ),
        with_kwargs=True,
    )
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.run()
    assert seen["hidden"] == {torch.bfloat16} and seen["loss"] == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(
        t.dtype == torch.float32
        for s in trainer.engine.optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.is_floating_point()
    )
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    saved = tmp_path / "run" / "last"
    assert {t.dtype for t in load_file(str(saved / "encoder" / "model.safetensors")).values()} == {torch.float32}
    assert {t.dtype for t in load_file(str(saved / "heads.safetensors")).values()} == {torch.float32}


def test_pooler_bert_init_heads_torch_default(tiny):
    """The MLP pooler as BERT's modules (normal(0, 0.02), zero bias); the grounding and vision
    heads keep PyTorch's Linear init (uniform(±1/sqrt(fan_in)), as the official MCSE module)."""
    from train.model import SentenceModel

    torch.manual_seed(0)
    model = SentenceModel(_config(tiny, tiny / "unused"), image_dim=256)
    w = model.mlp[0].weight
    assert torch.count_nonzero(model.mlp[0].bias) == 0 and abs(w.mean()) < 2e-3 and abs(w.std() - 0.02) < 2e-3
    bound = 1 / math.sqrt(32)
    g = model.ground[0].weight
    assert g.abs().max() <= bound and g.std() > 0.5 * bound / math.sqrt(3)  # uniform(±b): std b/sqrt(3)
    assert torch.count_nonzero(model.ground[0].bias) > 0 and torch.count_nonzero(model.vision[0].bias) > 0
    assert model.vision[0].weight.abs().max() <= 1 / math.sqrt(256)


def _adam_reference(p0, grads, lr, betas, eps, wd):
    """transformers 4.8's AdamW step by step in float64."""
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        g = g.double()
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t) * m / (v.sqrt() + eps)
        p = p - lr * wd * p
    return p


@pytest.mark.parametrize("eps, wd", [(1e-6, 0.0), (1e-8, 0.0), (1e-6, 0.01)])
def test_adamw_hf_is_transformers_adamw(eps, wd):
    torch.manual_seed(0)
    p0 = torch.randn(37, 5)
    grads = [1e-5 * torch.randn(37, 5) for _ in range(4)]  # small gradients: where eps's placement shows
    param = torch.nn.Parameter(p0.clone())
    opt = AdamWHF([param], lr=1e-3, betas=(0.9, 0.999), eps=eps, weight_decay=wd)
    theirs = torch.nn.Parameter(p0.clone())
    torch_opt = torch.optim.AdamW([theirs], lr=1e-3, betas=(0.9, 0.999), eps=eps, weight_decay=wd)
    for g in grads:
        param.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(
        param.detach().double(), _adam_reference(p0, grads, 1e-3, (0.9, 0.999), eps, wd), rtol=0, atol=1e-6
    )
    if eps == 1e-6 and wd == 0:  # torch's AdamW puts eps after the bias correction: a different step
        assert (param - theirs).abs().max() > 1e-5


def test_adamw_hf_equals_torch_adamw_without_eps():
    torch.manual_seed(1)
    a, b = torch.nn.Parameter(torch.randn(11)), None
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = AdamWHF([a], lr=1e-2, eps=0.0), torch.optim.AdamW([b], lr=1e-2, eps=0.0, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn(11)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_trainer_builds_adamw_hf_with_the_configured_eps(tiny):
    from train.model import SentenceModel
    from train.trainer import build_optimizer

    config = _config(tiny, tiny / "unused")
    opt = build_optimizer(config, SentenceModel(config, image_dim=256), torch.device("cpu"))
    assert isinstance(opt, AdamWHF) and {g["eps"] for g in opt.param_groups} == {1e-6}


def test_kdmcse_margins_apart():
    torch.manual_seed(0)
    n, d, g, dt = 6, 16, 8, 12
    z1, z2 = torch.randn(n, d), torch.randn(n, d)
    p1, p2, v, t = (torch.nn.functional.normalize(torch.randn(n, g), dim=-1) for _ in range(4))
    image, text = torch.randn(n, dt), torch.randn(n, dt)
    args = (z1, z2, p1, p2, v, t, image, text)
    both = mmloss.KDMCSELoss(margin=0.1, inter_margin=0.4, backend="reference")(*args).parts
    intra_only = mmloss.KDMCSELoss(margin=0.1, backend="reference")(*args).parts
    inter_only = mmloss.KDMCSELoss(margin=0.4, backend="reference")(*args).parts
    torch.testing.assert_close(both["intra"], intra_only["intra"])
    for part in ("inter_image", "inter_text"):
        torch.testing.assert_close(both[part], inter_only[part])
        assert not torch.allclose(both[part], intra_only[part])
    config = build_config(CONFIGS / "kdmcse.yaml", [parse_override("loss.inter_margin=0.3")])
    from train.model import build_loss

    loss = build_loss(config, None)
    assert loss.margin == 0.15 and loss.inter_margin == 0.3


def test_experiment_notes_when_the_world_size_changes_the_experiment():
    config = build_config(CONFIGS / "kdmcse.yaml")
    assert experiment_notes(config, 1, None) == []
    notes = experiment_notes(config, 8, None)  # 8 × 64 = 512 per step, each softmax over its own 64
    assert len(notes) == 2 and "global batch 512" in notes[0] and "0.125× the optimizer steps per epoch" in notes[0]
    assert "train.batch_size=8" in notes[1] and "loss.global_negatives=gather" in notes[1]
    config.train.batch_size = 8
    assert experiment_notes(config, 8, "gather") == []  # the same experiment on 8 ranks
    notes = experiment_notes(config, 8, None)
    assert len(notes) == 2 and "each softmax sees 8 keys" in notes[0]
    config.train.global_batch = 0
    assert experiment_notes(config, 8, None) == []


def test_pooling_choices(tiny):
    from train.encoders import TransformersEncoder
    from train.model import SentenceModel

    config = _config(tiny, tiny / "unused", method="simcse")
    with pytest.raises(ConfigError, match="model.pooling must be one of cls, cls_before_pooler, mean"):
        build_config(CONFIGS / "simcse.yaml", [parse_override("model.pooling=avg")])
    ids = torch.tensor([[2, 7, 9, 3, 0], [2, 5, 3, 0, 0]])
    mask = (ids > 0).long()
    models = {}
    for pooling in ("cls", "cls_before_pooler", "mean"):
        config.model.pooling = pooling
        model = models[pooling] = SentenceModel(config).eval()
        h, hidden = model._encode(ids, mask)
        want = hidden[:, 0] if pooling != "mean" else (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(h, want)
    loss, _ = models["mean"]({"input_ids": ids, "attention_mask": mask})  # the MLP on the mean in training
    loss.backward()
    assert models["mean"].mlp[0].weight.grad is not None
    encoder = TransformersEncoder(
        models["cls"].encoder, _tokenizer(tiny), pooling="cls", head=models["cls"].mlp, device="cpu"
    )
    assert encoder(["a b c"]).shape == (1, 32)


def _tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny / "bert")


def test_seeds_table_mean_and_std(tmp_path):
    results = {
        0: {"STS12": 70.0, "STSBenchmark": 80.0, "avg": 75.0},
        1: {"STS12": 72.0, "STSBenchmark": 81.0, "avg": 76.5},
        2: {"STS12": 74.0, "STSBenchmark": 79.0, "avg": 76.5},
    }
    table = seeds_table(results)
    assert "| 1 | 72.00 | 81.00 | 76.50 |" in table
    assert table.splitlines()[-1] == "| mean ± std | 72.00 ± 2.00 | 80.00 ± 1.00 | 76.00 ± 0.87 |"
    write_seeds_report(tmp_path, results)
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["mean"]["STS12"] == 72.0 and summary["std"]["STSBenchmark"] == 1.0
    assert "mean ± std" in (tmp_path / "seeds.md").read_text()


def test_seeds_runs_each_seed_and_reports(tiny, tmp_path):
    from train.__main__ import parse_seeds, run_seeds

    assert parse_seeds("0,1,2,3,4") == [0, 1, 2, 3, 4]
    for bad in ("0,a", "1,1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    sts = tiny_senteval(tmp_path / "senteval")
    config = _config(
        tiny,
        tmp_path / "seeds",
        method="simcse",
        max_steps=2,
        eval_after=True,
        sts_dir=str(sts),
        sts_tasks="STSBenchmark,SICKRelatedness",
    )
    report = run_seeds(config, [0, 1])
    summary = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    runs = {s: json.loads((tmp_path / "seeds" / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)}
    assert summary["runs"] == {str(s): runs[s]["results"]["after"] for s in (0, 1)}
    assert runs[0]["results"]["after"] != runs[1]["results"]["after"]  # two seeds, two runs
    assert "| mean ± std |" in report.read_text()


def test_training_verdict_says_plainly_when_training_did_not_help():
    own, before = {"avg": 78.87}, {"avg": 73.69}
    worse = training_verdict({"own": own, "before": before, "after": {"avg": 75.94}}, "mean")
    assert worse.startswith("Training did not improve on the starting model's own score (mean pooling)")
    assert "78.87 -> 75.94 (-2.93)" in worse
    better = training_verdict({"own": own, "before": own, "after": {"avg": 79.0}}, "mean")
    assert better.startswith("Training improved") and "(+0.13)" in better
    assert training_verdict({"before": before, "after": {"avg": 74.0}}, None).startswith("Training improved")
    assert training_verdict({"before": before}, None) is None
