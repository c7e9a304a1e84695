"""The trained model: a transformers encoder, SimCSE's MLP pooler, the grounding heads, the loss.

docs/contract.md §4. h = the sentence state of the encoder (hidden width H) by model.pooling: the CLS
state (cls, cls_before_pooler) or the masked mean of the token states (mean). Each sentence is
encoded twice in one forward (2N rows; dropout makes the two views differ).
- SimCSE pooler: z = tanh(W h) (H -> H), the training loss's sentence embedding. Evaluation
  takes h with "cls_before_pooler" (unsup SimCSE's MLP in training only, as MCSE and KDMCSE)
  and "mean", z with "cls" (SimCSE's MLP in both).
- grounded text head (MCSE, MCSEO, KDMCSE): s = l2n(tanh(W_g h)) (H -> g), before the pooler.
- vision head (MCSE, MCSEO): m = l2n(tanh(W_v x)) on image features, and on region features
  for MCSEO objects (one head: regions and images have the same width).
- KDMCSE target heads: v = l2n(tanh(W_v I)), t = l2n(tanh(W_t T)) on the teacher features.
- MCSEO phrases: the mean of the caption's token states over the phrase's characters (view 1)
  or the phrase encoded as its own text (model.phrase_encoding), then the grounded head.

Initialisation as the official code: the MLP pooler as BERT's modules (normal(0,
initializer_range), zero bias: it lives inside their BertForCL, which init_weights reaches);
the grounding, vision and teacher heads with PyTorch's default Linear init (their MLPLayers
live in the plain nn.Module MCSE, outside init_weights). Weights are fp32; with `autocast`
(a dtype) the encoder and heads run under torch.autocast and the loss takes their outputs in
fp32.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

import mmloss
from train.config import Config
from train.encoders import pool


def _head(n_in: int, n_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.Tanh())


def _bert_init(head: nn.Module, std: float) -> nn.Module:
    """BERT's Linear init (transformers' _init_weights): weight ~ normal(0, std), bias 0."""
    nn.init.normal_(head[0].weight, mean=0.0, std=std)
    nn.init.zeros_(head[0].bias)
    return head


def _l2n(x: torch.Tensor) -> torch.Tensor:
    """Unit rows in fp32 (a head's bf16 output under autocast is normalised in fp32)."""
    return F.normalize(x.float(), dim=-1)


def build_loss(config: Config, global_negatives: Optional[str]) -> nn.Module:
    """The method's mmloss module from the loss section."""
    c = config.loss
    common = {"backend": c.backend, "global_negatives": global_negatives}
    if config.method == "simcse":
        return mmloss.SimCSELoss(c.temperature, **common)
    if config.method == "mcse":
        return mmloss.MCSELoss(c.temperature, c.vl_temperature, c.vl_weight, **common)
    if config.method == "mcseo":
        return mmloss.MCSEOLoss(c.temperature, c.vl_temperature, c.vl_weight, c.op_temperature, c.op_weight, **common)
    return mmloss.KDMCSELoss(
        c.temperature,
        c.vl_temperature,
        c.margin,
        c.vl_weight,
        c.filter_threshold,
        c.filter_normalize,
        inter_margin=c.inter_margin,
        **common,
    )


class SentenceModel(nn.Module):
    """Encoder + heads + loss. forward(batch) -> (total loss, {part: value}).

    image_dim: width of image (and region) features; teacher_dim: width of the teacher's
    features (KDMCSE). Both None for SimCSE. autocast: None (fp32) or the dtype of the forward's
    autocast (torch.bfloat16).
    """

    def __init__(
        self,
        config: Config,
        image_dim: Optional[int] = None,
        teacher_dim: Optional[int] = None,
        global_negatives: Optional[str] = None,
        autocast: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.method, self.pooling, self.autocast = config.method, config.model.pooling, autocast
        self.encoder = AutoModel.from_pretrained(
            config.model.name_or_path, add_pooling_layer=False, dtype=torch.float32
        )
        width, g = self.encoder.config.hidden_size, config.model.grounding_dim
        self.mlp = _bert_init(_head(width, width), getattr(self.encoder.config, "initializer_range", 0.02))
        if self.method != "simcse":
            self.ground = _head(width, g)
        if self.method in ("mcse", "mcseo"):
            self.vision = _head(image_dim, g)
        if self.method == "kdmcse":
            self.teacher_image = _head(teacher_dim, g)
            self.teacher_text = _head(teacher_dim, g)
        self.loss = build_loss(config, global_negatives)

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sentence states h (n, H) by model.pooling, all token states (n, L, H))."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, "mean" if self.pooling == "mean" else "cls"), hidden

    def forward(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """batch: input_ids, attention_mask (N, L); an image-caption batch adds image_features
        (N, d) and as the method needs image_ids (N,), teacher_image / teacher_text (N, dt),
        objects (O, d), object_groups (O,), phrase_object (P,), phrase_rows (P,) and either
        phrase_weights (P, L) or phrase_input_ids / phrase_attention_mask (P, Lp)."""
        device = batch["input_ids"].device.type
        with torch.autocast(device, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            args, kwargs = self._embed(batch)
        with torch.autocast(device, enabled=False):
            fp32 = lambda x: x.float() if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
            out = self.loss(*map(fp32, args), **{k: fp32(v) for k, v in kwargs.items()})
        return out.total, out.parts

    def _embed(self, batch: Dict[str, torch.Tensor]) -> Tuple[tuple, Dict[str, torch.Tensor]]:
        """The method loss's arguments (positional, keyword) for `batch` (see forward)."""
        n = batch["input_ids"].shape[0]
        h, hidden = self._encode(batch["input_ids"].repeat(2, 1), batch["attention_mask"].repeat(2, 1))
        z = self.mlp(h)
        z1, z2 = z[:n], z[n:]
        if "image_features" not in batch:
            return (z1, z2), {}
        s = _l2n(self.ground(h))
        s1, s2 = s[:n], s[n:]
        image_ids = batch.get("image_ids")
        if self.method == "kdmcse":
            teacher_image, teacher_text = batch["teacher_image"], batch["teacher_text"]
            v = _l2n(self.teacher_image(teacher_image))
            t = _l2n(self.teacher_text(teacher_text))
            return (z1, z2, s1, s2, v, t, teacher_image, teacher_text), {"image_ids": image_ids}
        m = _l2n(self.vision(batch["image_features"]))
        if self.method == "mcse":
            return (z1, z2, s1, s2, m), {"image_ids": image_ids}
        if "phrase_weights" in batch:  # span pooling over the first view's token states
            weights = batch["phrase_weights"].to(hidden.dtype)
            pooled = torch.einsum("pl,plh->ph", weights, hidden[:n][batch["phrase_rows"]])
        else:
            pooled, _ = self._encode(batch["phrase_input_ids"], batch["phrase_attention_mask"])
        phrases = _l2n(self.ground(pooled))
        objects = _l2n(self.vision(batch["objects"]))
        return (z1, z2, s1, s2, m), {
            "image_ids": image_ids,
            "phrases": phrases,
            "objects": objects,
            "phrase_object": batch["phrase_object"],
            "object_groups": batch["object_groups"],
        }
