"""Sentence encoders the evaluation calls: `encode(sentences: list[str]) -> Tensor (n, d)`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

import torch

POOLINGS = ("cls", "mean")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, d) token states and (B, T) mask -> (B, d): the [CLS] state or the masked mean."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class TransformersEncoder:
    """A transformers encoder as a callable: list of n sentences -> (n, hidden) float32 CPU tensor.

    `model` is a model directory (loaded with AutoModel/AutoTokenizer, offline-capable) or a
    loaded `PreTrainedModel`, then `tokenizer` is required. `pooling` is "cls" (the last layer's
    [CLS] state, before any pooler: SimCSE's evaluation) or "mean" (masked mean of the last
    layer: sentence-transformers models such as all-MiniLM-L6-v2). Sentences are encoded in
    batches of `batch_size`, sorted by length (less padding), truncated at `max_length`
    tokens (at most the model's max_position_embeddings); the model runs in eval mode under no_grad on
    `device` and then gets its previous mode back (a model in training keeps its dropout). `head`:
    an optional module applied to the pooled states (SimCSE's MLP pooler with its "cls" pooling);
    its output width is the embedding's.
    """

    def __init__(
        self,
        model: Union[str, Path, torch.nn.Module],
        tokenizer=None,
        *,
        pooling: str = "cls",
        batch_size: int = 128,
        max_length: int = 256,
        device: Union[str, torch.device, None] = None,
        head: Optional[torch.nn.Module] = None,
    ):
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if isinstance(model, (str, Path)):
            path = Path(model)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"model: {path / 'config.json'} not found (expected a transformers model directory)"
                )
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(path))
            model = AutoModel.from_pretrained(str(path))
        elif tokenizer is None:
            raise ValueError("tokenizer is required when model is a loaded model")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.head = head
        self.batch_size = batch_size
        self.max_length = min(max_length, getattr(model.config, "max_position_embeddings", max_length))

    @torch.no_grad()
    def __call__(self, sentences: List[str]) -> torch.Tensor:
        if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
            raise TypeError("sentences must be a list of str")
        width = self.model.config.hidden_size if self.head is None else self.head[0].out_features
        out = torch.empty(len(sentences), width, dtype=torch.float32)
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [sentences[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                states = self.model(**batch).last_hidden_state
                pooled = pool(states, batch["attention_mask"], self.pooling)
                out[idx] = (pooled if self.head is None else self.head(pooled)).float().cpu()
        finally:
            self.model.train(was_training)
        return out
