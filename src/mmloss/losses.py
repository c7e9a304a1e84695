"""SimCSE, MCSE, MCSEO and KDMCSE as nn.Modules over embeddings (docs/contract.md §4).

The modules take the embeddings and features a training step has already computed (pooled
views, grounded heads, projected image features, teacher features), not the encoders, and
every term is one call of `mmloss.contrastive_loss`. Each returns a `LossOutput`: the total
to backpropagate and its named terms before weighting (for logging).

A term whose batch has no valid row (every row ignored, e.g. MCSEO's object-phrase term on a
batch of captions without phrases, on every rank) is skipped: no kernel runs, its part is
exactly 0 with no gradient, and `parts["skipped_terms"]` counts the skipped terms of the call.
The modules check their own arguments (shapes, widths, index ranges) and name them in errors.

Defaults are those of the official training scripts: τ = τ' = 0.05, λ = 0.01, margin
m = 0.15 rad (KDMCSE). Row i of every query is paired with row/column i of its targets.

Common options of every module:
    temperature: τ of the text-text term: a float, or a one-element tensor (an nn.Parameter is
        learnt, as CLIP's scale, and registered on the module; give it shape (1,) under
        DeepSpeed, which cannot broadcast 0-dim parameters). The other τ's alike.
    backend: the `contrastive_loss` backend ("auto", "reference", "cpu", "triton", "cuda").
    global_negatives, process_group: None, or "gather" / "ring" with a torch.distributed group
        (default the world): the keys of every rank join each row's negatives, with the
        index and gradient conventions of `mmloss.distributed`. Every rank must then make the
        same calls (text-only and image-caption batches on the same steps), and group ids
        (`image_ids`, `object_groups`) must be global ids (compared as labels across ranks).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from mmloss.checks import Temperature, _capturing, _check_index_tensor, _value_check, check_embeddings
from mmloss.constants import IGNORE_INDEX
from mmloss.contrastive import contrastive_loss


@dataclasses.dataclass
class LossOutput:
    """`total`: the scalar to backpropagate; `parts`: each term before its weight (for logging),
    and "skipped_terms" (the number of terms skipped for want of a valid row) when there were any."""

    total: torch.Tensor
    parts: Dict[str, torch.Tensor]


def _all_or_none(names: str, *tensors) -> bool:
    """True when all of `tensors` are given, False when none is; a ValueError otherwise."""
    given = [t is not None for t in tensors]
    if any(given) and not all(given):
        raise ValueError(f"{names} must be given together (image-caption batch) or all be None (text-only batch)")
    return all(given)


def _check_rows(name: str, x: torch.Tensor, rows: int, rows_of: str) -> None:
    if x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows (one per row of {rows_of}), got shape {tuple(x.shape)}")


def _check_pair(names, first: torch.Tensor, second: torch.Tensor, rows: int, rows_of: str) -> None:
    """Two 2-D float matrices of one dtype, device and width, each with `rows` rows."""
    check_embeddings(first, second, names)
    for name, x in zip(names, (first, second)):
        _check_rows(name, x, rows, rows_of)


def _check_targets(name: str, index, length: int, n: int, device: torch.device) -> None:
    """`index` (length,) int: positions in [0, n) or IGNORE_INDEX."""
    index = _check_index_tensor(name, index, length, device)
    bad = ((index < 0) & (index != IGNORE_INDEX)) | (index >= n)
    if _value_check(~bad.any(), device, lambda: f"{name} must hold indices in [0, {n}) or {IGNORE_INDEX}"):
        raise ValueError(
            f"{name} must hold indices in [0, {n}) or {IGNORE_INDEX} (ignored); "
            f"got {int(index[bad][0])} at position {int(bad.nonzero()[0])}"
        )


def _loss_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype `contrastive_loss` returns for inputs of x's dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(x, name: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, d), got shape {tuple(x.shape)}")
    return x.shape[0]


def _two_views(n: int, device: torch.device) -> torch.Tensor:
    """Positives of the 2n rows [view 1; view 2] against n targets: row i and row n+i -> i."""
    return torch.arange(n, device=device).repeat(2)


class _ContrastiveMethod(nn.Module):
    """Holds the options every method passes to `contrastive_loss`."""

    def __init__(self, temperature: Temperature, backend: str, global_negatives: Optional[str], process_group):
        super().__init__()
        self.temperature = temperature
        self.backend = backend
        self.global_negatives = global_negatives
        self.process_group = process_group

    def _core(self, query: torch.Tensor, key: torch.Tensor, **kwargs) -> torch.Tensor:
        temperature = kwargs.setdefault("temperature", self.temperature)
        if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
            kwargs["temperature"] = temperature.reshape(())
        return contrastive_loss(
            query,
            key,
            backend=self.backend,
            global_negatives=self.global_negatives,
            process_group=self.process_group,
            **kwargs,
        )

    def _no_valid_row(self, positives: torch.Tensor) -> bool:
        """True when no row of `positives` is valid, on any rank with global negatives (then
        every rank skips the term together, as the ranks must make the same calls). False while
        a CUDA graph is captured or torch.compile traces (no host read): the term's kernel call
        then gives 0 with zero gradients, the same value."""
        if _capturing(positives.device) or torch.compiler.is_compiling():
            return False
        valid = (positives != IGNORE_INDEX).sum()
        if self.global_negatives is not None:
            dist.all_reduce(valid, group=self.process_group)
        return not bool(valid)


class SimCSELoss(_ContrastiveMethod):
    """Unsupervised SimCSE (Gao, Yao & Chen, EMNLP 2021, arXiv:2104.08821).

    forward(z1 (N, d), z2 (N, d)): the two dropout views of N sentences after the MLP pooler.
    L_S = InfoNCE of z1 (rows) against z2 (columns), diagonal positives, cosine / τ
    (τ = 0.05, run_unsup_example.sh). Returns LossOutput(total=L_S, parts={"simcse": L_S}).
    """

    def __init__(
        self,
        temperature: Temperature = 0.05,
        *,
        backend: str = "auto",
        global_negatives: Optional[str] = None,
        process_group=None,
    ):
        super().__init__(temperature, backend, global_negatives, process_group)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> LossOutput:
        _check_pair(("z1", "z2"), z1, z2, _rows(z1, "z1"), "z1")
        loss = self._core(z1, z2)
        return LossOutput(loss, {"simcse": loss})


class MCSELoss(_ContrastiveMethod):
    """MCSE: multimodal contrastive sentence embeddings (Zhang et al., NAACL 2022,
    arXiv:2204.10931, github.com/uds-lsv/MCSE).

    forward(z1, z2, s1=None, s2=None, m=None, image_ids=None)
        z1, z2 (N, d): the two dropout views after the MLP pooler (the SimCSE term).
        s1, s2 (N, g): grounded text heads l2n(tanh(W_g h_cls)) of the two views (g = 256).
        m (N, g): image heads l2n(tanh(W_v v)) of the N paired images (2048-d ResNet-50).
        image_ids (N,) int, optional: when given, other copies of the same image in the batch
            are not negatives (the official code leaves them as negatives: None).
    L_MML = ½[InfoNCE(s1 -> m) + InfoNCE(s2 -> m)] at τ' (one call: 2N rows against N
    images); L = L_S + λ·L_MML on image-caption batches, L = L_S on text-only batches
    (s1 = s2 = m = None). Defaults τ = τ' = 0.05, λ = 0.01 (the official scripts).
    Returns LossOutput(total, parts={"simcse", "mml" (image-caption batches only)}).
    """

    def __init__(
        self,
        temperature: Temperature = 0.05,
        vl_temperature: Temperature = 0.05,
        vl_weight: float = 0.01,
        *,
        backend: str = "auto",
        global_negatives: Optional[str] = None,
        process_group=None,
    ):
        super().__init__(temperature, backend, global_negatives, process_group)
        self.vl_temperature = vl_temperature
        self.vl_weight = vl_weight

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        s1: Optional[torch.Tensor] = None,
        s2: Optional[torch.Tensor] = None,
        m: Optional[torch.Tensor] = None,
        image_ids: Optional[torch.Tensor] = None,
    ) -> LossOutput:
        n = _rows(z1, "z1")
        _check_pair(("z1", "z2"), z1, z2, n, "z1")
        image_batch = _all_or_none("s1, s2 and m", s1, s2, m)
        if image_batch:
            _check_pair(("s1", "s2"), s1, s2, n, "z1")
            _check_pair(("s1", "m"), s1, m, n, "z1")
            if image_ids is not None:
                _check_index_tensor("image_ids", image_ids, n, m.device)
        simcse = self._core(z1, z2)
        if not image_batch:
            return LossOutput(simcse, {"simcse": simcse})
        mml = self._core(
            torch.cat([s1, s2]),
            m,
            temperature=self.vl_temperature,
            positives=_two_views(m.shape[0], m.device),
            key_groups=image_ids,
        )
        return LossOutput(simcse + self.vl_weight * mml, {"simcse": simcse, "mml": mml})


class MCSEOLoss(MCSELoss):
    """MCSEO: MCSE plus object-phrase alignment (arXiv:2508.00332).

    forward(z1, z2, s1=None, s2=None, m=None, image_ids=None, phrases=None, objects=None,
            phrase_object=None, object_groups=None)
        z1, z2, s1, s2, m, image_ids: as MCSELoss.
        phrases (P, g): grounded heads of every phrase of the batch's captions, flat (ragged:
            no padding rows).
        objects (O, g): vision heads of every detected object region of the batch's images, flat.
        phrase_object (P,) int: the index in `objects` of each phrase's matched object, -100
            for a phrase without one (ignored).
        object_groups (O,) int, optional: region id per object; objects of the matched
            object's region (other than itself) are not negatives.
    L_OP = InfoNCE(phrases -> all objects of the batch) at τ_op; L = L_S + λ1·L_MML + λ2·L_OP.
    The paper's λ2, τ and detector are not public: defaults λ1 = λ2 = 0.01, τ = τ' = τ_op = 0.05.
    Returns LossOutput(total, parts={"simcse", "mml", "object_phrase"} as present).
    """

    def __init__(
        self,
        temperature: Temperature = 0.05,
        vl_temperature: Temperature = 0.05,
        vl_weight: float = 0.01,
        op_temperature: Temperature = 0.05,
        op_weight: float = 0.01,
        *,
        backend: str = "auto",
        global_negatives: Optional[str] = None,
        process_group=None,
    ):
        super().__init__(
            temperature,
            vl_temperature,
            vl_weight,
            backend=backend,
            global_negatives=global_negatives,
            process_group=process_group,
        )
        self.op_temperature = op_temperature
        self.op_weight = op_weight

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        s1: Optional[torch.Tensor] = None,
        s2: Optional[torch.Tensor] = None,
        m: Optional[torch.Tensor] = None,
        image_ids: Optional[torch.Tensor] = None,
        phrases: Optional[torch.Tensor] = None,
        objects: Optional[torch.Tensor] = None,
        phrase_object: Optional[torch.Tensor] = None,
        object_groups: Optional[torch.Tensor] = None,
    ) -> LossOutput:
        object_batch = _all_or_none("phrases, objects and phrase_object", phrases, objects, phrase_object)
        if object_batch:
            check_embeddings(phrases, objects, ("phrases", "objects"))
            n_objects = objects.shape[0]
            _check_targets("phrase_object", phrase_object, phrases.shape[0], n_objects, phrases.device)
            if object_groups is not None:
                _check_index_tensor("object_groups", object_groups, n_objects, objects.device)
        out = super().forward(z1, z2, s1, s2, m, image_ids)
        if not object_batch:
            return out
        if self._no_valid_row(phrase_object):
            op = torch.zeros((), dtype=_loss_dtype(phrases), device=phrases.device)
            parts = dict(out.parts, object_phrase=op, skipped_terms=torch.ones((), device=phrases.device))
            return LossOutput(out.total, parts)
        op = self._core(
            phrases, objects, temperature=self.op_temperature, positives=phrase_object, key_groups=object_groups
        )
        return LossOutput(out.total + self.op_weight * op, dict(out.parts, object_phrase=op))


class KDMCSELoss(_ContrastiveMethod):
    """KDMCSE: knowledge distillation multimodal sentence embeddings with adaptive angular
    margin contrastive learning (Nguyen et al., NAACL 2024, arXiv:2403.17486,
    github.com/duyngtr16061999/KDMCSE).

    forward(z1, z2, p1=None, p2=None, v=None, t=None, image_features=None,
            text_features=None, image_ids=None)
        z1, z2 (N, d): the two dropout views after the MLP pooler.
        p1, p2 (N, g): grounded text heads of the two views.
        v (N, g), t (N, g): projected teacher targets l2n(tanh(W_v I)), l2n(tanh(W_t T)).
        image_features I (N, dt), text_features T (N, dt): the frozen teacher's (CLIP
            ViT-L/14, 768-d, unnormalised) image and caption features; no gradient.
        image_ids (N,) int, optional: other captions/copies of the same image are not
            negatives in either target (None = the official code: they are).
    intra L_S = InfoNCE(z1 -> z2) with the fixed angular margin m on negatives;
    inter (AdapACSE) = ½Σ_k InfoNCE(p_k -> v; m' = m(1 - cos(I_i, I_j)), filter <T_i, I_j> > thr)
                     + ½Σ_k InfoNCE(p_k -> t; m' = m(1 - cos(T_i, T_j)), filter <I_i, T_j> > thr)
    (each a single call of 2N rows), L = L_S + λ·inter; text-only batches give L_S.
    margin is the intra margin (the scripts' margin1), inter_margin the inter one (margin2;
    None: the same as margin). Defaults (official scripts): τ = τ' = 0.05, m1 = m2 = 0.15 rad,
    λ = 0.01, filter off.
    filter_threshold: None (off, as the released scripts) or an explicit threshold on the raw
        dot product of the teacher features (its scale is that of their norms, for CLIP
        ViT-L/14 far above 1: look at the distribution of T @ I.T on your data), or on their
        cosine in [-1, 1] with filter_normalize=True.
    Returns LossOutput(total, parts={"intra", "inter_image", "inter_text" (image batches)}).
    """

    def __init__(
        self,
        temperature: Temperature = 0.05,
        vl_temperature: Temperature = 0.05,
        margin: float = 0.15,
        vl_weight: float = 0.01,
        filter_threshold: Optional[float] = None,
        filter_normalize: bool = False,
        *,
        inter_margin: Optional[float] = None,
        backend: str = "auto",
        global_negatives: Optional[str] = None,
        process_group=None,
    ):
        super().__init__(temperature, backend, global_negatives, process_group)
        self.vl_temperature = vl_temperature
        self.margin = margin
        self.inter_margin = margin if inter_margin is None else inter_margin
        self.vl_weight = vl_weight
        self.filter_threshold = filter_threshold
        self.filter_normalize = filter_normalize

    def _inter(
        self,
        rows: torch.Tensor,
        target: torch.Tensor,
        teacher_rows: torch.Tensor,
        teacher_target: torch.Tensor,
        filter_rows: torch.Tensor,
        image_ids,
    ) -> torch.Tensor:
        """One target set: 2N grounded rows against N targets, adaptive margin and filter."""
        two = lambda x: torch.cat([x, x])  # noqa: E731  (teacher rows of both views)
        filtering = self.filter_threshold is not None
        return self._core(
            rows,
            target,
            temperature=self.vl_temperature,
            positives=_two_views(target.shape[0], target.device),
            margin=self.inter_margin,
            margin_teacher=(two(teacher_rows), teacher_target),
            filter_teacher=(two(filter_rows), teacher_target) if filtering else None,
            filter_threshold=self.filter_threshold,
            filter_normalize=self.filter_normalize,
            key_groups=image_ids,
        )

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        p1: Optional[torch.Tensor] = None,
        p2: Optional[torch.Tensor] = None,
        v: Optional[torch.Tensor] = None,
        t: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        text_features: Optional[torch.Tensor] = None,
        image_ids: Optional[torch.Tensor] = None,
    ) -> LossOutput:
        n = _rows(z1, "z1")
        _check_pair(("z1", "z2"), z1, z2, n, "z1")
        image_batch = _all_or_none(
            "p1, p2, v, t, image_features and text_features", p1, p2, v, t, image_features, text_features
        )
        if image_batch:
            _check_pair(("p1", "p2"), p1, p2, n, "z1")
            _check_pair(("p1", "v"), p1, v, n, "z1")
            _check_pair(("p1", "t"), p1, t, n, "z1")
            for name, x in (("image_features", image_features), ("text_features", text_features)):
                _rows(x, name)
                _check_rows(name, x, n, "z1")
            if image_ids is not None:
                _check_index_tensor("image_ids", image_ids, n, v.device)
        intra = self._core(z1, z2, margin=self.margin)
        if not image_batch:
            return LossOutput(intra, {"intra": intra})
        rows = torch.cat([p1, p2])
        image, text = image_features, text_features
        inter_image = self._inter(rows, v, image, image, text, image_ids)
        inter_text = self._inter(rows, t, text, text, image, image_ids)
        total = intra + self.vl_weight * (inter_image + inter_text)
        return LossOutput(total, {"intra": intra, "inter_image": inter_image, "inter_text": inter_text})
