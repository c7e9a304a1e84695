"""The trainer's settings: nested dataclasses read from YAML, with `section.key=value` overrides.

Every key is checked at start-up: an unknown key, a value of the wrong type, a value outside
a key's choices or a number outside its range (declared once, in the field's metadata; every
float must also be finite) raises `ConfigError` naming the key and listing the valid ones.
The YAML files in train/configs/ carry each method's official hyperparameters (docs/contract.md §4–5);
docs/training.md describes every key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

METHODS = ("simcse", "mcse", "mcseo", "kdmcse")


class ConfigError(ValueError):
    """A bad configuration file or override (unknown key, wrong type, bad value)."""


def _choices(*values: str) -> Dict[str, Any]:
    return {"choices": values}


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: low <= value (low < value when `open_low`), and
    value < high when `high` is given."""

    low: float
    open_low: bool = False
    high: Optional[float] = None

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return above and (self.high is None or value < self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g})"


def _range(low: float, open_low: bool = False, high: Optional[float] = None, default: Any = None) -> Any:
    """A dataclass field with `default` whose value must lie in Range(low, open_low, high)."""
    return dataclasses.field(default=default, metadata={"range": Range(low, open_low, high)})


def _positive(default: float) -> Any:
    return _range(0, True, default=default)


def _at_least(low: int, default: int) -> Any:
    return _range(low, default=default)


@dataclasses.dataclass
class ModelConfig:
    """The encoder and the heads (docs/contract.md §4)."""

    name_or_path: str = "bert-base-uncased"  # transformers hub name or local directory
    max_length: int = _at_least(1, 32)  # training tokens per sentence (official scripts: 32)
    eval_max_length: int = _at_least(1, 128)  # tokens per sentence when encoding for evaluation
    grounding_dim: int = _at_least(1, 256)  # width g of the grounded text and vision heads
    phrase_encoding: str = dataclasses.field(default="span", metadata=_choices("span", "text"))
    # the sentence state h and what evaluation takes (SimCSE's options plus mean); the MLP pooler
    # is always trained on h: cls (CLS state through the MLP, in evaluation too), cls_before_pooler
    # (CLS state; the MLP in training only: unsup SimCSE, MCSE, KDMCSE), mean (masked mean of the
    # token states; the MLP in training only)
    pooling: str = dataclasses.field(default="cls_before_pooler", metadata=_choices("cls", "cls_before_pooler", "mean"))


@dataclasses.dataclass
class DataConfig:
    """Where the training data lives (formats: docs/training.md)."""

    text: Optional[str] = None  # text corpus, one sentence a line
    pairs: Optional[str] = None  # image-caption directory (captions.jsonl, images.*, ...)
    text_limit: int = _at_least(0, 0)  # use only the first N sentences of the corpus (0: all)


@dataclasses.dataclass
class LossConfig:
    """The method loss's settings (mmloss.losses); defaults are the official scripts'."""

    temperature: float = _positive(0.05)
    vl_temperature: float = _positive(0.05)
    vl_weight: float = _at_least(0, 0.01)  # λ (MCSE, MCSEO's λ1, KDMCSE)
    op_temperature: float = _positive(0.05)  # MCSEO object-phrase τ
    op_weight: float = _at_least(0, 0.01)  # MCSEO λ2
    margin: float = _range(0, high=math.pi / 2, default=0.15)  # KDMCSE intra margin m1 (text-text), radians
    inter_margin: float = _range(
        0, high=math.pi / 2, default=0.15
    )  # KDMCSE inter margin m2 (text-image, text-caption), radians
    filter_threshold: Optional[float] = None  # KDMCSE teacher filter (None: off, as released)
    filter_normalize: bool = False  # the filter on the cosine instead of the raw dot product
    group_same_image: bool = False  # other captions of a row's image are not negatives
    global_negatives: str = dataclasses.field(default="auto", metadata=_choices("auto", "none", "gather", "ring"))
    backend: str = dataclasses.field(default="auto", metadata=_choices("auto", "reference", "cpu", "triton", "cuda"))


@dataclasses.dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (linear decay after an optional warm-up)."""

    # adamw: torch's; adamw_hf: transformers 4.x's AdamW (eps added to the uncorrected sqrt(v)),
    # which the official SimCSE, MCSE and KDMCSE scripts use; lamb: GPU only
    name: str = dataclasses.field(default="adamw", metadata=_choices("adamw", "adamw_hf", "lamb"))
    lr: float = _positive(3e-5)
    weight_decay: float = _at_least(0, 0.0)  # HF Trainer's default, which the official scripts use
    beta1: float = _range(0, high=1, default=0.9)
    beta2: float = _range(0, high=1, default=0.999)
    eps: float = _positive(1e-8)
    warmup_steps: int = _at_least(0, 0)
    schedule: str = dataclasses.field(default="linear", metadata=_choices("linear", "constant"))


@dataclasses.dataclass
class TrainConfig:
    """The loop: batch, length, evaluation, checkpoints."""

    batch_size: int = _at_least(1, 64)  # sentences (captions) per process per micro-step
    epochs: int = _at_least(1, 3)
    max_steps: int = _at_least(0, 0)  # optimizer steps; 0: epochs decide
    seed: int = _at_least(0, 42)
    output_dir: str = "runs/default"
    eval_steps: int = _at_least(0, 125)  # STS-B dev every N optimizer steps, keeping the best model (0: never)
    save_steps: int = _at_least(0, 125)  # resumable checkpoint every N optimizer steps (0: only at the end)
    keep_checkpoints: int = _at_least(0, 2)  # resumable checkpoints kept on disk
    log_steps: int = _at_least(1, 10)
    resume: bool = True  # continue from output_dir's latest checkpoint when there is one
    sts_dir: Optional[str] = None  # SentEval data; None: MMLOSS_DATA, else the bundled copy (train.datasets)
    eval_before: bool = False  # all STS sets before training
    eval_after: bool = True  # all STS sets after training (the best model)
    eval_cpu_bf16: bool = False  # encode for evaluation under bf16 autocast on the CPU (faster, ±0.x points)
    sts_tasks: str = "all"  # "all" or comma-separated train.sts task names, e.g. "STSBenchmark,SICKRelatedness"
    threads: int = _at_least(0, 0)  # torch CPU threads per process (0: torch's default)
    skip_nonfinite: bool = False  # skip (and count) a step whose loss or gradient is not finite, instead of stopping
    global_batch: int = _at_least(
        0, 0
    )  # the experiment's global batch (the paper's): start-up notes if a run differs (0: unstated)


@dataclasses.dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine's settings (ZeRO 0/1/2 only: evaluation reads whole parameters)."""

    zero_stage: int = dataclasses.field(default=0, metadata={"choices": (0, 1, 2)})
    gradient_accumulation_steps: int = _at_least(1, 1)  # does not enlarge the negative pool (docs/training.md)
    gradient_clipping: float = _at_least(0, 1.0)  # max gradient norm (HF Trainer's 1.0); 0 turns clipping off
    # fp32 weights and optimizer always; bf16: the forward under bf16 autocast (the loss in fp32);
    # auto: bf16 autocast on a GPU with bf16, fp32 elsewhere
    precision: str = dataclasses.field(default="auto", metadata=_choices("auto", "fp32", "bf16"))


@dataclasses.dataclass
class Config:
    """The whole run."""

    method: str = dataclasses.field(default="simcse", metadata=_choices(*METHODS))
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)


def valid_keys(cls=Config, prefix: str = "") -> List[str]:
    """Every settable dotted key of `cls`, e.g. ["method", "model.name_or_path", ...]."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += valid_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _check_value(key: str, value: Any, hint, f: dataclasses.Field, where: str) -> Any:
    """`value` converted to the field's type, or a ConfigError."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None and optional:
        return None
    if base is float and isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (
        isinstance(value, bool)
        if base is bool
        else isinstance(value, int) and not isinstance(value, bool)
        if base is int
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if base is float
        else isinstance(value, str)
    )
    if not ok:
        article = "an optional" if optional else "an" if base.__name__[0] in "aeiou" else "a"
        raise ConfigError(f"{where}: {key} must be {article} {base.__name__}, got {value!r}")
    value = float(value) if base is float else value
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    _check_range(key, value, f, where)
    return value


def _check_range(key: str, value: Any, f: dataclasses.Field, where: str) -> None:
    """A float must be finite; a number must lie in the field's declared Range."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {key} must be a finite number, got {value}")
    valid = f.metadata.get("range")
    if valid is not None and value is not None and value not in valid:
        raise ConfigError(f"{where}: {key} must be {valid}, got {value}")


def _check_ranges(obj, prefix: str = "") -> None:
    """Every numeric field of dataclass `obj` (recursively) against its range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{prefix}{f.name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_range(prefix + f.name, value, f, "config")


def _apply(obj, values: Dict[str, Any], where: str, prefix: str = "") -> None:
    """Set the fields of dataclass `obj` from the nested mapping `values`, checking each key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the file'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = prefix + str(name)
        if name not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid_keys())}")
        if dataclasses.is_dataclass(hints[name]):
            _apply(getattr(obj, name), value, where, key + ".")
        else:
            setattr(obj, name, _check_value(key, value, hints[name], fields[name], where))


def _nested(key: str, value: Any) -> Dict[str, Any]:
    """ "a.b=1" -> {"a": {"b": 1}}."""
    out: Dict[str, Any] = {}
    node = out
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return out


def parse_override(text: str) -> Dict[str, Any]:
    """ "optim.lr=1e-4" -> {"optim": {"lr": 1e-4}}; the value is read as YAML (1e-4, true, null)."""
    if "=" not in text:
        raise ConfigError(f"--override {text!r}: expected key=value, e.g. train.batch_size=32")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return _nested(key.strip(), value)


def build_config(
    path: Optional[Path] = None, overrides: Iterable[Dict[str, Any]] = (), base: Optional[Dict[str, Any]] = None
) -> Config:
    """A checked Config: defaults <- YAML file `path` <- `base` mapping <- each override mapping."""
    config = Config()
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the configuration: {e}") from None
        _apply(config, values, str(path))
    if base is not None:
        _apply(config, base, "preset")
    for override in overrides:
        _apply(config, override, "--override")
    validate(config)
    return config


def validate(config: Config) -> None:
    """Every numeric key's range, and checks across keys (what each method needs)."""
    _check_ranges(config)
    if config.train.sts_tasks != "all":
        from train.sts import ALL_TASKS

        unknown = set(config.train.sts_tasks.split(",")) - set(ALL_TASKS)
        if unknown:
            raise ConfigError(
                f'train.sts_tasks: unknown {", ".join(sorted(unknown))}; choose "all" or from {", ".join(ALL_TASKS)}'
            )
    if config.method == "simcse" and not config.data.text:
        raise ConfigError("method simcse needs data.text (a text corpus)")
    if config.method != "simcse" and not config.data.pairs:
        raise ConfigError(f"method {config.method} needs data.pairs (an image-caption directory)")


def to_dict(config: Config) -> Dict[str, Any]:
    """The config as a nested plain dict (for YAML dumps and checkpoints)."""
    return dataclasses.asdict(config)
