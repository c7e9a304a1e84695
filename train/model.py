"""The trained model: a transformers encoder, SimCSE's MLP pooler, the grounding heads, the loss.

SPEC §2. h = the encoder's CLS state (hidden width H). Each sentence is encoded twice in one
forward (2N rows; dropout makes the two views differ).
- SimCSE pooler: z = tanh(W h) (H -> H), training only: evaluation takes h (unsup SimCSE's
  "cls_before_pooler"), so the encoder alone is the sentence encoder.
- grounded text head (MCSE, MCSEO, KDMCSE): s = l2n(tanh(W_g h)) (H -> g), before the pooler.
- vision head (MCSE, MCSEO): m = l2n(tanh(W_v x)) on image features, and on region features
  for MCSEO objects (one head: regions and images have the same width).
- KDMCSE target heads: v = l2n(tanh(W_v I)), t = l2n(tanh(W_t T)) on the teacher features.
- MCSEO phrases: the mean of the caption's token states over the phrase's characters (view 1)
  or the phrase encoded as its own text (model.phrase_encoding), then the grounded head.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

import mmloss
from train.config import Config


def _head(n_in: int, n_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.Tanh())


def _l2n(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


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
    return mmloss.KDMCSELoss(c.temperature, c.vl_temperature, c.margin, c.vl_weight, c.filter_threshold,
                             c.filter_normalize, **common)


class SentenceModel(nn.Module):
    """Encoder + heads + loss. forward(batch) -> (total loss, {part: value}).

    image_dim: width of image (and region) features; teacher_dim: width of the teacher's
    features (KDMCSE). Both None for SimCSE.
    """

    def __init__(self, config: Config, image_dim: Optional[int] = None, teacher_dim: Optional[int] = None,
                 global_negatives: Optional[str] = None):
        super().__init__()
        self.method = config.method
        self.encoder = AutoModel.from_pretrained(config.model.name_or_path, add_pooling_layer=False)
        width, g = self.encoder.config.hidden_size, config.model.grounding_dim
        self.mlp = _head(width, width)
        if self.method != "simcse":
            self.ground = _head(width, g)
        if self.method in ("mcse", "mcseo"):
            self.vision = _head(image_dim, g)
        if self.method == "kdmcse":
            self.teacher_image = _head(teacher_dim, g)
            self.teacher_text = _head(teacher_dim, g)
        self.loss = build_loss(config, global_negatives)

    def _cls(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(CLS states (n, H), all token states (n, L, H))."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden[:, 0], hidden

    def _dtype(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.mlp[0].weight.dtype)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """batch: input_ids, attention_mask (N, L); an image-caption batch adds image_features
        (N, d) and as the method needs image_ids (N,), teacher_image / teacher_text (N, dt),
        objects (O, d), object_groups (O,), phrase_object (P,), phrase_rows (P,) and either
        phrase_weights (P, L) or phrase_input_ids / phrase_attention_mask (P, Lp)."""
        n = batch["input_ids"].shape[0]
        cls, hidden = self._cls(batch["input_ids"].repeat(2, 1), batch["attention_mask"].repeat(2, 1))
        z = self.mlp(cls)
        z1, z2 = z[:n], z[n:]
        if "image_features" not in batch:
            out = self.loss(z1, z2)
            return out.total, out.parts
        s = _l2n(self.ground(cls))
        s1, s2 = s[:n], s[n:]
        image_ids = batch.get("image_ids")
        if self.method == "kdmcse":
            teacher_image, teacher_text = batch["teacher_image"], batch["teacher_text"]
            v = _l2n(self.teacher_image(self._dtype(teacher_image)))
            t = _l2n(self.teacher_text(self._dtype(teacher_text)))
            out = self.loss(z1, z2, s1, s2, v, t, teacher_image, teacher_text, image_ids=image_ids)
            return out.total, out.parts
        m = _l2n(self.vision(self._dtype(batch["image_features"])))
        if self.method == "mcse":
            out = self.loss(z1, z2, s1, s2, m, image_ids=image_ids)
            return out.total, out.parts
        if "phrase_weights" in batch:  # span pooling over the first view's token states
            weights = self._dtype(batch["phrase_weights"])
            pooled = torch.einsum("pl,plh->ph", weights, hidden[:n][batch["phrase_rows"]])
        else:
            pooled, _ = self._cls(batch["phrase_input_ids"], batch["phrase_attention_mask"])
        phrases = _l2n(self.ground(pooled))
        objects = _l2n(self.vision(self._dtype(batch["objects"])))
        out = self.loss(z1, z2, s1, s2, m, image_ids=image_ids, phrases=phrases, objects=objects,
                        phrase_object=batch["phrase_object"], object_groups=batch["object_groups"])
        return out.total, out.parts
