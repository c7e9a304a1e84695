"""Shared pieces of the trainer tests (no tests here): a tiny random BERT, a tiny SentEval tree,
the demo data, and a small configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from train.datasets import corpus_file, senteval_dir

SENTEVAL = senteval_dir()
CORPUS = corpus_file()


def tiny_bert(directory: Path) -> Path:
    """A randomly initialised 2-layer, 32-wide BERT with all-MiniLM-L6-v2's tokenizer, saved to `directory`."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from train.presets import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_senteval(directory: Path, lines: int = 12) -> Path:
    """The real SentEval tree cut to its first `lines` lines per file (fast STS evaluation)."""
    for source in SENTEVAL.rglob("*"):
        if source.is_file() and source.suffix in (".txt", ".csv"):
            target = directory / source.relative_to(SENTEVAL)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(source, encoding="utf-8") as f:
                target.write_text("".join(line for _, line in zip(range(lines), f)), encoding="utf-8")
    return directory


def small_settings(root: Path, model: Path, pairs: Path, **train: Any) -> Dict[str, Any]:
    """Overrides of a method's YAML for a few steps of a tiny run under `root`."""
    return {
        "model": {"name_or_path": str(model), "max_length": 16, "eval_max_length": 16, "grounding_dim": 8},
        "data": {"text": str(CORPUS), "pairs": str(pairs), "text_limit": 200},
        "loss": {"group_same_image": True, "global_negatives": "auto"},
        "optim": {"lr": 1e-3},
        "train": {
            "batch_size": 4,
            "max_steps": 3,
            "eval_steps": 0,
            "save_steps": 0,
            "eval_before": False,
            "eval_after": False,
            "output_dir": str(root),
            "threads": 1,
            "log_steps": 1,
            **train,
        },
        "deepspeed": {"zero_stage": 2},
    }
