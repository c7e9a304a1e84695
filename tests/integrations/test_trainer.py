"""A few steps of SentenceTransformerTrainer with each mmloss loss on a tiny random BERT (a
frozen copy of it as the guide or teacher where the loss takes one): the weights move, the
logged loss is finite, and the saved model card names the loss."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mmloss.integrations import sentence_transformers as ml
from tests.integrations.support import tiny_sentence_transformer

LOSSES = {
    "MultipleNegativesRankingLoss": lambda model, guide: ml.MultipleNegativesRankingLoss(model),
    "MultipleNegativesSymmetricRankingLoss": lambda model, guide: ml.MultipleNegativesSymmetricRankingLoss(model),
    "CachedMultipleNegativesRankingLoss": lambda model, guide: ml.CachedMultipleNegativesRankingLoss(
        model, mini_batch_size=2
    ),
    "GISTEmbedLoss": lambda model, guide: ml.GISTEmbedLoss(model, guide, margin=0.05),
    "CachedGISTEmbedLoss": lambda model, guide: ml.CachedGISTEmbedLoss(model, guide, mini_batch_size=2),
    "AngularMarginMNRL": lambda model, guide: ml.AngularMarginMNRL(model, margin=0.2, teacher=guide),
    "TeacherFilteredMNRL": lambda model, guide: ml.TeacherFilteredMNRL(model, guide, threshold=0.95),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_trainer_steps_and_model_card(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = tiny_sentence_transformer(tmp_path / "tiny_bert")
    guide = tiny_sentence_transformer(tmp_path / "tiny_bert")  # a frozen copy: the guide or teacher
    words = ["cats", "dogs", "a red car", "the sea", "rain", "music", "old books", "a train"]
    columns = {"anchor": [f"a sentence about {w}" for w in words], "positive": [f"something on {w}" for w in words]}
    if name != "MultipleNegativesSymmetricRankingLoss":
        columns["negative"] = [f"nothing on {w}" for w in words[1:] + words[:1]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loss = LOSSES[name](model, guide)
    before = [p.detach().clone() for p in model.parameters()]
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(columns), loss=loss)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses), losses
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    model.save(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text(encoding="utf-8")
    assert f"mmloss.integrations.sentence_transformers.{name}" in card
    assert f"loss:{name}" in card
