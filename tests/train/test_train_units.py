"""Fast checks of the trainer's parts: configuration errors, data formats and their errors,
the batch schedule and its sharding, span pooling weights, the demo data's determinism."""

from __future__ import annotations

import json

import pytest
import torch

from train.config import ConfigError, build_config, parse_override, valid_keys
from train.data import Batches, Collator, DataError, load_pairs, load_text, mixed_step, read_text
from train.demo_data import FEATURE_DIM, TEACHER_DIM, write_demo_data
from train.presets import CONFIGS, minilm_dir


def test_every_config_loads_with_official_settings():
    configs = sorted(CONFIGS.glob("*.yaml"))
    assert {c.stem for c in configs} >= {
        "simcse",
        "mcse",
        "mcse-roberta",
        "mcse-coco",
        "mcse-flickr-only",
        "kdmcse",
        "mcseo",
    }
    for path in configs:
        c = build_config(path)
        assert c.optim.lr == 3e-5 and c.train.batch_size == 64 and c.train.global_batch == 64, path
        assert c.model.max_length == 32 and c.train.eval_steps == 125 and c.loss.temperature == 0.05, path
        assert c.loss.global_negatives == "none" and c.model.pooling == "cls_before_pooler", path
        assert c.optim.name == "adamw_hf" and c.optim.eps == (1e-8 if c.method == "simcse" else 1e-6), path
        assert c.deepspeed.precision == ("auto" if c.method == "simcse" else "fp32"), path
    kd = build_config(CONFIGS / "kdmcse.yaml")
    assert kd.loss.margin == kd.loss.inter_margin == 0.15 and kd.loss.vl_weight == 0.01 and kd.train.epochs == 3
    assert kd.loss.filter_threshold is None and kd.train.seed == 1234
    flickr = build_config(CONFIGS / "mcse-flickr-only.yaml")
    assert flickr.loss.vl_weight == 0.05 and flickr.train.epochs == 6 and flickr.data.text is None
    assert build_config(CONFIGS / "simcse.yaml").train.epochs == 1
    assert build_config(CONFIGS / "mcse.yaml").data.pairs != kd.data.pairs  # one caption per image vs all


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'.*optim.lr") as e:
        build_config(CONFIGS / "simcse.yaml", [parse_override("train.lrr=1")])
    assert all(k in str(e.value) for k in valid_keys())


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=abc", "train.batch_size must be an int"),
        ("train.batch_size=1.5", "train.batch_size must be an int"),
        ("optim.lr=fast", "optim.lr must be a float"),
        ("deepspeed.zero_stage=3", "zero_stage must be one of 0, 1, 2"),
        ("method=clip", "method must be one of"),
        ("train.resume=maybe", "train.resume must be a bool"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("train.log_steps=0", "train.log_steps must be >= 1"),
        ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
        ("optim.lr=.inf", "optim.lr must be a finite number"),
        ("optim.lr=0", "optim.lr must be > 0, got 0"),
        ("loss.vl_temperature=0", "loss.vl_temperature must be > 0"),
        ("loss.op_temperature=-1", "loss.op_temperature must be > 0"),
        ("loss.vl_weight=-0.1", "loss.vl_weight must be >= 0"),
        ("loss.margin=2", r"loss.margin must be in \[0, 1.5708\)"),
        ("loss.filter_threshold=.nan", "loss.filter_threshold must be a finite number"),
        ("optim.beta2=1", r"optim.beta2 must be in \[0, 1\)"),
        ("optim.eps=0", "optim.eps must be > 0"),
        ("train.seed=-1", "train.seed must be >= 0"),
        ("deepspeed.gradient_clipping=-1", "deepspeed.gradient_clipping must be >= 0"),
        ("train.save_steps=-1", "train.save_steps must be >= 0"),
        ("model=3", "model must be a mapping"),
        ("train.sts_tasks=STS12,STS99", "unknown STS99"),
        ("noequals", "expected key=value"),
    ],
)
def test_bad_values_fail_at_start(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(CONFIGS / "simcse.yaml", [parse_override(override)])


def test_every_numeric_key_declares_its_range():
    """A numeric key without a declared range would pass any value (e.g. optim.lr=nan before)."""
    import dataclasses
    import typing

    from train.config import Config, Range

    def fields(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from fields(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield prefix + f.name, hints[f.name], f

    numeric = [(k, f) for k, hint, f in fields(Config) if hint in (int, float)]
    assert len(numeric) > 20
    missing = [k for k, f in numeric if not isinstance(f.metadata.get("range"), Range) and "choices" not in f.metadata]
    assert not missing, f"declare a range (train.config._range) for {missing}"
    build_config(CONFIGS / "simcse.yaml")  # the defaults are in range


def test_overrides_and_yaml_floats():
    overrides = [parse_override("optim.lr=1e-4"), parse_override("loss.filter_threshold=0.8")]
    c = build_config(CONFIGS / "kdmcse.yaml", overrides)
    assert c.optim.lr == 1e-4 and c.loss.filter_threshold == 0.8
    with pytest.raises(ConfigError, match="needs data.pairs"):
        build_config(CONFIGS / "mcse.yaml", [parse_override("data.pairs=null")])


def test_schedule_mixes_as_the_official_loop():
    # 10 text and 3 caption batches: k = 10 // 3 = 3, an epoch of 13 steps, captions at 0, 3, 6, 9, 12
    steps = [mixed_step(s, 10, 3) for s in range(26)]
    assert [k for k, _ in steps[:13]] == ["pairs" if i % 3 == 0 else "text" for i in range(13)]
    assert [k for k, _ in steps[13:]] == [k for k, _ in steps[:13]]  # the step counter restarts each epoch
    assert [c for k, c in steps if k == "pairs"] == list(range(10))  # the caption loader cycles on
    assert [c for k, c in steps if k == "text"] == list(range(16))
    assert mixed_step(5, 0, 2) == ("pairs", 5) and mixed_step(5, 3, 0) == ("text", 5)
    assert [k for k, _ in (mixed_step(s, 2, 5) for s in range(7))] == ["pairs"] * 7  # k = max(1, 2 // 5)


def _caption_share(n_text: int, n_pairs: int, batch: int = 64) -> float:
    text, pairs = n_text // batch, n_pairs // batch
    return sum(mixed_step(s, text, pairs)[0] == "pairs" for s in range(text + pairs)) / (text + pairs)


def test_caption_share_of_the_official_settings():
    assert round(100 * _caption_share(1_000_000, 148_915), 1) == 16.7  # KDMCSE: Wiki1M + every Flickr30k caption
    assert round(100 * _caption_share(1_000_000, 29_783), 1) == 3.0  # MCSE: one caption per image


def test_caption_batches_cycle_through_permutations():
    b = Batches(40, 20, local_batch=4, rank=0, world=1, seed=3)  # 10 text, 5 caption batches, 8 caption steps an epoch
    captions = [b.indices(s)[1] for s in range(len(b)) if b.indices(s)[0] == "pairs"]
    assert len(b) == 15 and len(captions) == 8
    assert sorted(torch.cat(captions[:5]).tolist()) == list(range(20))  # one pass: every caption once
    assert not torch.equal(torch.cat(captions[5:]), torch.cat(captions[:3]))  # the next pass: a new order


def test_batches_shard_a_global_batch_and_are_pure():
    ranks = [Batches(40, 20, local_batch=4, rank=r, world=2, seed=3) for r in range(2)]
    for step in range(2 * len(ranks[0])):
        (k0, i0), (k1, i1) = ranks[0].indices(step), ranks[1].indices(step)
        assert k0 == k1 and len(i0) == len(i1) == 4 and not set(i0.tolist()) & set(i1.tolist())
    assert torch.equal(ranks[0].indices(7)[1], Batches(40, 20, 4, 0, 2, 3).indices(7)[1])
    assert not torch.equal(ranks[0].indices(0)[1], ranks[0].indices(len(ranks[0]))[1])  # a new order each epoch


def test_text_errors_name_file_and_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"one sentence\n\ntwo\n\xff\xfe bad\n")
    with pytest.raises(DataError, match=r"corpus.txt:4: not UTF-8"):
        load_text(path)
    assert load_text(path, limit=2) == ["one sentence", "two"]
    assert read_text(path, limit=2) == (["one sentence", "two"], [1, 3])  # each sentence's line


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo") / "data", images=12)


def test_demo_data_is_deterministic_and_loads(demo, tmp_path):
    again = write_demo_data(tmp_path / "again", images=12)
    for name in ("captions.jsonl", "images.safetensors", "regions.safetensors", "teacher.safetensors"):
        assert (demo / name).read_bytes() == (again / name).read_bytes(), name
    data = load_pairs(demo, regions=True, teacher=True)
    assert len(data.captions) == 36 and data.teacher_text.shape == (36, TEACHER_DIM)
    assert data.image_features.shape == (12, FEATURE_DIM) and data.region_features.shape[1] == FEATURE_DIM
    for caption, phrases, image in zip(data.captions, data.phrases, data.image_of.tolist()):
        assert phrases and all(int(data.region_image[r]) == image for _, _, r in phrases)
        assert all(caption[s:e].split()[-1] in ("circle", "square", "triangle") for s, e, _ in phrases)


def _corrupt(demo, tmp_path, line_no: int, record) -> str:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in demo.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    lines = (bad / "captions.jsonl").read_text().splitlines()
    lines[line_no - 1] = record if isinstance(record, str) else json.dumps(record)
    (bad / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return bad


@pytest.mark.parametrize(
    "record, message",
    [
        ("{not json", r"captions.jsonl:5: not a JSON object"),
        ({"image": 99, "caption": "x"}, r"captions.jsonl:5: image 99 out of range"),
        (
            {"image": 1, "caption": "a red circle", "phrases": [{"start": 2, "end": 40, "region": 0}]},
            r":5: phrase span",
        ),
        (
            {"image": 1, "caption": "a red circle", "phrases": [{"start": 0, "end": 5, "region": 0}]},
            r":5: phrase region 0 belongs to image 0",
        ),
        ({"image": 1, "caption": "a red circle", "phrases": 5}, r'captions.jsonl:5: "phrases" must be a list'),
        ({"image": 1, "caption": "a red circle", "phrases": None}, r'captions.jsonl:5: "phrases" must be a list'),
        (
            {"image": 1, "caption": "a red circle", "phrases": [{"start": True, "end": 5, "region": 3}]},
            r":5: a phrase must be",
        ),
    ],
)
def test_pair_errors_name_file_and_line(demo, tmp_path, record, message):
    with pytest.raises(DataError, match=message):
        load_pairs(_corrupt(demo, tmp_path, 5, record), regions=True)


def test_caption_not_utf8_names_file_and_line(demo, tmp_path):
    bad = _corrupt(demo, tmp_path, 5, "{}")
    lines = (bad / "captions.jsonl").read_bytes().split(b"\n")
    lines[4] = b'{"image": 1, "caption": "a \xff circle"}'
    (bad / "captions.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"captions.jsonl:5: not UTF-8"):
        load_pairs(bad, regions=True)


@pytest.mark.parametrize(
    "name, key, row",
    [("images", "features", 3), ("regions", "features", 7), ("teacher", "text", 11), ("teacher", "image", 0)],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_features_name_file_and_row(demo, tmp_path, name, key, row, value):
    from safetensors.torch import load_file, save_file

    bad = _corrupt(demo, tmp_path, 1, (demo / "captions.jsonl").read_text().splitlines()[0])
    arrays = load_file(str(bad / f"{name}.safetensors"))
    arrays[key][row, -1] = value
    save_file(arrays, str(bad / f"{name}.safetensors"))
    with pytest.raises(DataError, match=rf"{name}.safetensors: '{key}' row {row} holds a non-finite value"):
        load_pairs(bad, regions=True, teacher=True)


def test_captions_keep_their_source_lines(demo):
    data = load_pairs(demo)
    assert data.where[0].endswith("captions.jsonl:1") and data.where[35].endswith("captions.jsonl:36")


def test_missing_teacher_is_named(demo, tmp_path):
    bad = _corrupt(demo, tmp_path, 1, (demo / "captions.jsonl").read_text().splitlines()[0])
    (bad / "teacher.safetensors").unlink()
    with pytest.raises(DataError, match="no teacher.safetensors, teacher.npz or teacher.npy"):
        load_pairs(bad, teacher=True)


def test_span_weights_pool_the_phrase_tokens(demo):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    data = load_pairs(demo, regions=True)
    batch = Collator(tokenizer, 32, "mcseo", "span", True).pairs(data, torch.arange(3))
    p = 0
    for row in range(3):
        for start, end, region in data.phrases[row]:
            tokens = batch["input_ids"][row][batch["phrase_weights"][p] > 0]
            assert tokenizer.decode(tokens) == data.captions[row][start:end]
            assert batch["object_groups"][batch["phrase_object"][p]] == region
            p += 1
    assert p == len(batch["phrase_object"]) == len(batch["phrase_rows"])
