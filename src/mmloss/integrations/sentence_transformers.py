"""sentence-transformers 6.x ranking losses computed by mmloss's fused kernels.

Swap the import and keep the rest of the script (docs/integrations.md):

    from mmloss.integrations.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model)        # was sentence_transformers.losses....

Each drop-in subclasses the sentence-transformers class of the same name, so the constructor
(arguments, defaults, checks), `get_config_dict`, `citation` and `temperature` are that
class's (and `forward`, but GISTEmbedLoss's); the loss itself comes from mmloss's fused
kernels, which never build the B × B·(1+n) score matrix (O(B·d) memory). The value and the
embedding gradients equal the sentence-transformers class's (tests/integrations/).

Supported: the (anchor, positive, negative_1…n) columns, `scale`, cosine similarity (the
default `cos_sim`), `gather_across_devices` (mmloss's global negatives), every `directions`
subset with both `partition_mode`s, `hardness_mode` with any `hardness_strength` (mmloss's
hardness penalty, docs/contract.md §3); another `similarity_fct` raises ValueError.
GISTEmbedLoss and CachedGISTEmbedLoss (the guide's row-relative false-negative filter) and two
losses that no library has, AngularMarginMNRL (KDMCSE's angular margin, fixed or adaptive from a
teacher) and TeacherFilteredMNRL (a teacher's false-negative filter), are below.

How the directions map onto the op. query_to_doc alone is one `mmloss.contrastive_loss` call
(the queries against the concatenated documents, the penalty of `hardness_mode` there); several
directions are one `mmloss.joint_contrastive_loss` call with a `KeyBlock` per direction:
query_to_doc (the positives and the penalty), query_to_query (q_i itself excluded),
doc_to_query, doc_to_doc (d_i's own documents excluded); "joint" shares one softmax per row,
"per_direction" averages the blocks' log-sum-exps (`partition="per_block"`). Pairs with
per_direction and no penalty are one symmetric call. GIST's ap, aa, pp and an blocks are the
same call, each with the guide's filter at the rows' thresholds.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

try:
    import sentence_transformers
    from sentence_transformers.base.losses.merged_forward import embed_columns
    from sentence_transformers.sentence_transformer import losses as _st_losses
    from sentence_transformers.util import batch_to_device, cos_sim
    from sentence_transformers.util.misc import similarity_fct_name
    from sentence_transformers.util.similarity import SimilarityFunction
except ImportError as exc:  # pragma: no cover - exercised only where sentence-transformers is absent
    raise ImportError(
        "mmloss.integrations.sentence_transformers needs sentence-transformers 6.x "
        "(pip install 'sentence-transformers>=6,<7'); the core mmloss package does not"
    ) from exc

import mmloss

if not sentence_transformers.__version__.startswith("6."):  # pragma: no cover
    raise ImportError(
        f"mmloss.integrations.sentence_transformers supports sentence-transformers 6.x, "
        f"found {sentence_transformers.__version__}"
    )

__all__ = [
    "AngularMarginMNRL",
    "CachedGISTEmbedLoss",
    "CachedMultipleNegativesRankingLoss",
    "GISTEmbedLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "TeacherFilteredMNRL",
    "gist_loss",
    "ranking_loss",
]

QUERY_TO_DOC, QUERY_TO_QUERY, DOC_TO_QUERY, DOC_TO_DOC = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
_BLOCK_ORDER = (QUERY_TO_DOC, QUERY_TO_QUERY, DOC_TO_QUERY, DOC_TO_DOC)
_HARDNESS_SCOPE = {"in_batch_negatives": "others", "hard_negatives": "own", "all_negatives": "all"}
"""sentence-transformers' hardness_mode -> mmloss's hardness_negatives (docs/contract.md §3)."""


def _check_cosine(similarity_fct: Callable) -> None:
    """ValueError unless `similarity_fct` is `cos_sim` (directly or as `model.similarity` of a
    cosine model): the op computes cosines only."""
    resolved = similarity_fct
    owner = getattr(similarity_fct, "__self__", None)
    if getattr(similarity_fct, "__name__", None) == "similarity" and getattr(owner, "similarity_fn_name", None):
        resolved = SimilarityFunction.to_similarity_fn(owner.similarity_fn_name)
    if resolved is not cos_sim:
        raise ValueError(
            f"similarity_fct={similarity_fct_name(similarity_fct)} is not supported: mmloss's losses compute "
            "cosine similarity only (similarity_fct=sentence_transformers.util.cos_sim, the default)"
        )


def _check_supported(loss) -> None:
    """The options of `loss` that the op computes exactly; clear errors for the others."""
    _check_cosine(loss.similarity_fct)


def _global(gather_across_devices: bool) -> bool:
    """Whether this call runs across ranks (as sentence-transformers: gathering without an
    initialised process group is the local loss)."""
    return bool(gather_across_devices) and dist.is_available() and dist.is_initialized()


def _row_losses(rows: Tensor, keys: Tensor, temperature: float, across_ranks: bool, **kwargs) -> Tensor:
    """(B,) mmloss's loss of each of this rank's rows; across ranks every rank's keys are
    negatives and the key gradients reach their owners, as sentence-transformers'
    all_gather_with_grad does."""
    if across_ranks:
        kwargs["global_negatives"] = "gather"
    return mmloss.contrastive_loss(rows, keys, temperature=temperature, reduction="none", **kwargs)


def _loss(rows: Tensor, keys: Tensor, temperature: float, across_ranks: bool, **kwargs) -> Tensor:
    """Mean over this rank's rows of mmloss's row losses (across ranks: this rank's mean, not
    the global one, as sentence-transformers)."""
    if not across_ranks:
        return mmloss.contrastive_loss(rows, keys, temperature=temperature, **kwargs)
    return _row_losses(rows, keys, temperature, across_ranks, **kwargs).mean()


def _row_ids(batch: int, across_ranks: bool, device: torch.device) -> Tensor:
    """(B,) ids of this rank's rows, unique across ranks (owner and exclude ids)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if across_ranks else (0, 1)
    return rank + world * torch.arange(batch, device=device)


def _hardness(mode: Optional[str], strength: float, ids: Tensor, n_docs: int) -> dict:
    """contrastive_loss / KeyBlock arguments of sentence-transformers' hardness penalty on the
    queries against cat(docs) (the query_to_doc block); {} when it penalises nothing. A
    document column's owner is its query."""
    if mode is None or strength == 0.0 or (mode == "hard_negatives" and n_docs == 1):
        return {}
    scope = _HARDNESS_SCOPE[mode]
    kwargs = dict(hardness_strength=float(strength), hardness_negatives=scope)
    if scope != "all":
        kwargs["hardness_owners"] = (ids, ids.repeat(n_docs))
    return kwargs


def _joint_rows(blocks: list, temperature: float, partition: str, across_ranks: bool, backend: str) -> Tensor:
    """(B,) row losses of `mmloss.joint_contrastive_loss` (every rank's keys with gather)."""
    return mmloss.joint_contrastive_loss(
        blocks,
        temperature=temperature,
        partition=partition,
        reduction="none",
        backend=backend,
        global_negatives="gather" if across_ranks else None,
    )


def ranking_loss(
    queries: Tensor,
    docs: Sequence[Tensor],
    *,
    scale: float = 20.0,
    directions: Sequence[str] = (QUERY_TO_DOC,),
    partition_mode: str = "joint",
    gather_across_devices: bool = False,
    hardness_mode: Optional[str] = None,
    hardness_strength: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss (cosine) by mmloss.

    queries (B, d): anchors; docs: [positives (B, d), negatives_1 (B, d), ...]; scale = 1/τ;
    directions, partition_mode, hardness_mode and hardness_strength as sentence-transformers
    (the caller checks them); backend as `mmloss.contrastive_loss`. Returns the mean over this
    rank's anchors (fp32; fp64 for fp64 inputs).
    """
    docs = list(docs)
    across_ranks = _global(gather_across_devices)
    ids = _row_ids(queries.shape[0], across_ranks, queries.device)
    penalty = _hardness(hardness_mode, hardness_strength, ids, len(docs))
    docs_all = torch.cat(docs)
    if set(directions) == {QUERY_TO_DOC}:
        return _loss(queries, docs_all, 1.0 / scale, across_ranks, backend=backend, **penalty)
    if partition_mode == "per_direction" and len(docs) == 1 and not penalty:
        return _loss(queries, docs[0], 1.0 / scale, across_ranks, symmetric=True, backend=backend)
    blocks = {
        QUERY_TO_DOC: lambda: mmloss.KeyBlock(queries, docs_all, **penalty),
        QUERY_TO_QUERY: lambda: mmloss.KeyBlock(queries, queries, exclude=(ids, ids)),
        DOC_TO_QUERY: lambda: mmloss.KeyBlock(docs[0], queries),
        DOC_TO_DOC: lambda: mmloss.KeyBlock(docs[0], docs_all, exclude=(ids, ids.repeat(len(docs)))),
    }
    chosen = [blocks[name]() for name in _BLOCK_ORDER if name in directions]
    partition = "joint" if partition_mode == "joint" else "per_block"
    return _joint_rows(chosen, 1.0 / scale, partition, across_ranks, backend).mean()


class _RankingByMmloss:
    """`compute_loss_from_embeddings` by `ranking_loss`, for the subclasses below. `backend`
    (an mmloss extra, "auto" by default) picks mmloss's backend."""

    backend = "auto"

    def compute_loss_from_embeddings(self, embeddings: List[Tensor], labels: Optional[Tensor]) -> Tensor:
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        _check_supported(self)
        return ranking_loss(
            embeddings[0],
            embeddings[1:],
            scale=self.scale,
            directions=self.directions,
            partition_mode=self.partition_mode,
            gather_across_devices=self.gather_across_devices,
            hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength,
            backend=self.backend,
        )


class MultipleNegativesRankingLoss(_RankingByMmloss, _st_losses.MultipleNegativesRankingLoss):
    """sentence-transformers' MultipleNegativesRankingLoss (same arguments and defaults), computed
    by mmloss. Inputs: (anchor, positive[, negative_1, ..., negative_n]) columns, no labels."""

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: Sequence[str] = (QUERY_TO_DOC,),
        partition_mode: str = "joint",
        hardness_mode: Optional[str] = None,
        hardness_strength: float = 0.0,
    ) -> None:
        super().__init__(
            model,
            scale=scale,
            similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices,
            directions=directions,
            partition_mode=partition_mode,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
        )
        _check_supported(self)


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """sentence-transformers' (deprecated) MultipleNegativesSymmetricRankingLoss, computed by
    mmloss: MultipleNegativesRankingLoss with directions=("query_to_doc", "doc_to_query") and
    partition_mode="per_direction" (a negative column, if any, joins the query_to_doc softmax)."""

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
    ) -> None:
        warnings.warn(
            "MultipleNegativesSymmetricRankingLoss is deprecated (as in sentence-transformers): use "
            "MultipleNegativesRankingLoss with directions=('query_to_doc', 'doc_to_query') and "
            "partition_mode='per_direction'",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(
            model,
            scale=scale,
            similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices,
            directions=(QUERY_TO_DOC, DOC_TO_QUERY),
            partition_mode="per_direction",
        )


class CachedMultipleNegativesRankingLoss(_st_losses.CachedMultipleNegativesRankingLoss):
    """sentence-transformers' CachedMultipleNegativesRankingLoss (GradCache; same arguments and
    defaults), whose loss stage is one mmloss call.

    (1) every column is embedded without grad in mini-batches of `mini_batch_size` (or
    `mini_batch_num_tokens`); (2) mmloss gives the loss and its embedding gradients in one call
    over the whole batch, with O(B·d) memory (sentence-transformers chunks the score matrix
    instead); (3) each mini-batch is embedded again with grad, replaying its RNG state, and
    back-propagates its cached gradients. Steps (1) and (3) are sentence-transformers' own.
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: Optional[int] = None,
        gather_across_devices: bool = False,
        directions: Sequence[str] = (QUERY_TO_DOC,),
        partition_mode: str = "joint",
        show_progress_bar: bool = False,
        hardness_mode: Optional[str] = None,
        hardness_strength: float = 0.0,
    ) -> None:
        super().__init__(
            model,
            scale=scale,
            similarity_fct=similarity_fct,
            mini_batch_size=mini_batch_size,
            mini_batch_num_tokens=mini_batch_num_tokens,
            gather_across_devices=gather_across_devices,
            directions=directions,
            partition_mode=partition_mode,
            show_progress_bar=show_progress_bar,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
        )
        # The wrapped loss holds the hyperparameters (sentence-transformers delegates to it).
        self.loss = MultipleNegativesRankingLoss(
            model,
            scale=scale,
            similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices,
            directions=directions,
            partition_mode=partition_mode,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
        )

    def calculate_loss(
        self, reps: List[List[Tensor]], labels: Optional[Tensor] = None, *, with_backward: bool = False
    ) -> Tensor:
        """The loss over the whole batch from the per-mini-batch embeddings `reps` (one list per
        column); with `with_backward`, back-propagates it into the embeddings and returns it detached."""
        loss = self.loss.compute_loss_from_embeddings([torch.cat(column) for column in reps], labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss


def gist_loss(
    embeddings: Sequence[Tensor],
    guide_embeddings: Sequence[Tensor],
    *,
    temperature: float = 0.01,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    gather_across_devices: bool = False,
    backend: str = "auto",
) -> Tensor:
    """sentence-transformers' GISTEmbedLoss on embeddings, by one `mmloss.joint_contrastive_loss` call.

    embeddings: [anchors (B, d), positives (B, d)[, negatives (B, d)]]; guide_embeddings: the
    guide's of the same columns (B, dg), no gradient. One softmax per row over the blocks
    anchor–positive, anchor–anchor (contrast_anchors), positive–positive (contrast_positives:
    the row vector is the positive) and anchor–negative, at temperature τ; in each, column j is
    dropped when the guide's cosine g_ij > t_i, t_i = g_i,pos − margin ("absolute") or
    g_i,pos − |g_i,pos|·margin ("relative") with g_i,pos the row's anchor–positive guide
    cosine; the positive is never dropped. With gather_across_devices, positives and negatives
    of every rank are columns, the anchors of this rank only (as sentence-transformers). Returns
    the mean over this rank's anchors.
    """
    embeddings, guide_embeddings = list(embeddings), list(guide_embeddings)
    if len(embeddings) not in (2, 3) or len(guide_embeddings) != len(embeddings):
        raise ValueError(
            f"Expected 2 or 3 embeddings and as many guide embeddings, got {len(embeddings)} and "
            f"{len(guide_embeddings)}"
        )
    if margin_strategy not in ("absolute", "relative"):
        raise ValueError("margin_strategy must be 'absolute' or 'relative'.")
    across_ranks = _global(gather_across_devices)
    a, p, *n = embeddings
    ga, gp, *gn = [x.detach() for x in guide_embeddings]
    g_pos = (F.normalize(ga, p=2, dim=-1) * F.normalize(gp, p=2, dim=-1)).sum(dim=-1)
    threshold = g_pos - margin if margin_strategy == "absolute" else g_pos - g_pos.abs() * margin

    def block(rows, keys, guide_rows, guide_keys, local_keys=False):
        return mmloss.KeyBlock(
            rows,
            keys,
            filter_teacher=(guide_rows, guide_keys),
            filter_threshold=threshold,
            filter_normalize=True,
            local_keys=local_keys and across_ranks,
        )

    blocks = [block(a, p, ga, gp)]
    if contrast_anchors:  # this rank's anchors only, as sentence-transformers
        blocks.append(block(a, a, ga, ga, local_keys=True))
    if contrast_positives:
        blocks.append(block(p, p, gp, gp))
    blocks += [block(a, x, ga, gx) for x, gx in zip(n, gn)]
    return _joint_rows(blocks, temperature, "joint", across_ranks, backend).mean()


def _must_retokenize(model, guide) -> bool:
    """sentence-transformers' test: the guide needs its own tokenization."""
    return model.tokenizer.get_vocab() != guide.tokenizer.get_vocab() or guide.max_seq_length < model.max_seq_length


def _guide_embeddings(guide, sentence_features: List[dict], must_retokenize: bool, tokenizer) -> List[Tensor]:
    """The guide's embeddings of the columns, without grad (GISTEmbedLoss.forward's steps: the
    model's token ids decoded and tokenised again when the tokenizers differ, else the given
    features, which the caller copied before the model wrote into them)."""
    with torch.no_grad():
        if not must_retokenize:
            return embed_columns(guide, sentence_features)
        guide_features = []
        for features in sentence_features:
            input_ids = features["input_ids"]
            if "cu_seq_lens_q" in features:
                flat, bounds = input_ids[0].tolist(), features["cu_seq_lens_q"].tolist()
                input_ids = [flat[start:end] for start, end in zip(bounds[:-1], bounds[1:])]
            decoded = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
            guide_features.append(batch_to_device(guide.preprocess(decoded), guide.device))
        return embed_columns(guide, guide_features)


class _GistByMmloss:
    """The GIST options of the subclasses below, as `gist_loss` arguments."""

    backend = "auto"

    def _gist(self, embeddings: List[Tensor], guide_embeddings: List[Tensor]) -> Tensor:
        return gist_loss(
            embeddings,
            guide_embeddings,
            temperature=self.temperature,
            margin_strategy=self.margin_strategy,
            margin=self.margin,
            contrast_anchors=self.contrast_anchors,
            contrast_positives=self.contrast_positives,
            gather_across_devices=self.gather_across_devices,
            backend=self.backend,
        )


class GISTEmbedLoss(_GistByMmloss, _st_losses.GISTEmbedLoss):
    """sentence-transformers' GISTEmbedLoss (same arguments and defaults), computed by mmloss:
    the guide's false-negative filter is applied tile by tile, no B × B matrix (the peer's
    nn.CosineSimilarity builds B × B × d tensors). Inputs: (anchor, positive[, negative])."""

    def forward(self, sentence_features: Iterable[dict], labels: Optional[Tensor]) -> Tensor:
        sentence_features = list(sentence_features)
        guide_features = [dict(features) for features in sentence_features]  # before the model fills them
        embeddings = embed_columns(self.model, sentence_features)
        guide_embeddings = _guide_embeddings(
            self.guide,
            sentence_features if self.must_retokenize else guide_features,
            self.must_retokenize,
            getattr(self, "tokenizer", None),
        )
        return self.compute_loss_from_embeddings(embeddings, guide_embeddings)

    def compute_loss_from_embeddings(self, embeddings: List[Tensor], guide_embeddings: List[Tensor]) -> Tensor:
        """The loss from the model's embeddings of each column and the guide's (an mmloss extra:
        the peer has no such method)."""
        return self._gist(embeddings, guide_embeddings)


class CachedGISTEmbedLoss(_GistByMmloss, _st_losses.CachedGISTEmbedLoss):
    """sentence-transformers' CachedGISTEmbedLoss (GradCache; same arguments and defaults),
    whose loss stage is one mmloss call: (1) model and guide embeddings without grad in
    mini-batches, (2) `gist_loss` and its embedding gradients over the whole batch in O(B·d)
    memory, (3) the mini-batched re-embedding with grad (sentence-transformers' steps 1 and 3).
    `citation` is GISTEmbedLoss's (the peer class has none)."""

    @property
    def citation(self) -> str:
        return _st_losses.GISTEmbedLoss.citation.fget(self)

    def calculate_loss(
        self, reps: List[List[Tensor]], reps_guided: List[List[Tensor]], *, with_backward: bool = False
    ) -> Tensor:
        """The loss over the whole batch from the per-mini-batch embeddings (one list per
        column) and the guide's; with `with_backward`, back-propagates into `reps` and returns
        the loss detached."""
        if len(reps) != len(reps_guided):
            raise ValueError("reps and reps_guided must have the same length")
        loss = self._gist([torch.cat(r) for r in reps], [torch.cat(r) for r in reps_guided])
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss


_KDMCSE_CITATION = """
@inproceedings{nguyen2024kdmcse,
    title={{KDMCSE}: Knowledge Distillation Multimodal Sentence Embeddings with Adaptive Angular margin
        Contrastive Learning},
    author={Nguyen, Cong-Duy and Nguyen, Thong and Wu, Xiaobao and Luu, Anh Tuan},
    booktitle={Proceedings of the 2024 Conference of the North American Chapter of the Association for
        Computational Linguistics (NAACL)},
    year={2024}
}
"""


class _TeacherRanking(torch.nn.Module):
    """MNRL (query_to_doc, cosine, `scale` = 1/τ, (anchor, positive, negative_1…n) columns) with
    an optional frozen teacher SentenceTransformer embedding the same columns without grad
    (re-tokenised when its tokenizer differs, as GISTEmbedLoss's guide). Subclasses say what
    `_options((teacher anchors, teacher documents) or None)` adds to the mmloss call."""

    backend = "auto"

    def __init__(self, model, scale: float, teacher, gather_across_devices: bool) -> None:
        super().__init__()
        if not scale > 0.0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.model, self.scale, self.teacher = model, float(scale), teacher
        self.gather_across_devices = gather_across_devices
        self.must_retokenize = False
        if teacher is not None and hasattr(model, "tokenizer") and hasattr(teacher, "tokenizer"):
            self.must_retokenize = _must_retokenize(model, teacher)
            self.tokenizer = model.tokenizer

    def forward(self, sentence_features: Iterable[dict], labels: Optional[Tensor]) -> Tensor:
        sentence_features = list(sentence_features)
        teacher_features = [dict(features) for features in sentence_features]
        embeddings = embed_columns(self.model, sentence_features)
        teacher_embeddings = None
        if self.teacher is not None:
            teacher_embeddings = _guide_embeddings(
                self.teacher,
                sentence_features if self.must_retokenize else teacher_features,
                self.must_retokenize,
                getattr(self, "tokenizer", None),
            )
        return self.compute_loss_from_embeddings(embeddings, labels, teacher_embeddings)

    def compute_loss_from_embeddings(
        self, embeddings: List[Tensor], labels: Optional[Tensor], teacher_embeddings: Optional[List[Tensor]] = None
    ) -> Tensor:
        """embeddings: [anchors (B, d), positives (B, d), negatives_1 (B, d), ...];
        teacher_embeddings: the teacher's of the same columns (B, dt), needed with a teacher."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        if (teacher_embeddings is None) != (self.teacher is None):
            raise ValueError(
                "teacher_embeddings must be given exactly when the loss has a teacher "
                f"(teacher={'set' if self.teacher is not None else None}, "
                f"teacher_embeddings={'given' if teacher_embeddings is not None else None})"
            )
        teacher = None
        if teacher_embeddings is not None:
            if len(teacher_embeddings) != len(embeddings):
                raise ValueError(f"Expected {len(embeddings)} teacher embeddings, got {len(teacher_embeddings)}")
            detached = [x.detach() for x in teacher_embeddings]
            teacher = (detached[0], torch.cat(detached[1:]))
        return _loss(
            embeddings[0],
            torch.cat(embeddings[1:]),
            1.0 / self.scale,
            _global(self.gather_across_devices),
            backend=self.backend,
            **self._options(teacher),
        )

    @property
    def citation(self) -> str:
        return _KDMCSE_CITATION


class AngularMarginMNRL(_TeacherRanking):
    """MultipleNegativesRankingLoss with KDMCSE's angular margin on the negatives (in no other
    library), computed by mmloss without a B × B matrix.

    A negative at angle θ > m from its anchor scores scale·cos(θ − m') instead of scale·cos θ
    (it looks nearer, so it is pushed harder); the positive and near-duplicates (θ <= m) are
    untouched. m' = `margin` (radians, in [0, π/2)), or, with a `teacher` (a frozen
    SentenceTransformer), the adaptive m'_ij = margin·(1 − cos(t_i, t_j)) of the teacher's
    embeddings of anchor i and document j (KDMCSE, NAACL 2024): negatives the teacher finds
    similar get a smaller margin. margin = 0 is MultipleNegativesRankingLoss.

    Inputs: (anchor, positive[, negative_1, ..., negative_n]) columns, no labels.
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        margin: float = 0.15,
        teacher=None,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__(model, scale, teacher, gather_across_devices)
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"margin must be in [0, pi/2) radians, got {margin}")
        self.margin = float(margin)

    def _options(self, teacher: Optional[Tuple[Tensor, Tensor]]) -> dict:
        return dict(margin=self.margin, margin_teacher=teacher)

    def get_config_dict(self) -> dict:
        return {
            "scale": self.scale,
            "margin": self.margin,
            "teacher": self.teacher,
            "gather_across_devices": self.gather_across_devices,
        }


class TeacherFilteredMNRL(_TeacherRanking):
    """MultipleNegativesRankingLoss whose negatives a frozen teacher filters (KDMCSE's
    false-negative filter; in no other library), computed by mmloss without a B × B matrix.

    Column j leaves anchor i's softmax when the teacher's score s_ij > `threshold`: the cosine of
    the teacher's embeddings of anchor i and document j (`filter_normalize=True`, the default),
    or their raw dot product (False, as KDMCSE's code on unnormalised CLIP features). The
    positive is never dropped. A fixed threshold for every row; GISTEmbedLoss has the
    row-relative one.

    Inputs: (anchor, positive[, negative_1, ..., negative_n]) columns, no labels.
    """

    def __init__(
        self,
        model,
        teacher,
        threshold: float,
        scale: float = 20.0,
        filter_normalize: bool = True,
        gather_across_devices: bool = False,
    ) -> None:
        if teacher is None:
            raise ValueError("TeacherFilteredMNRL needs a teacher model")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number, got {threshold!r}")
        super().__init__(model, scale, teacher, gather_across_devices)
        self.threshold, self.filter_normalize = float(threshold), bool(filter_normalize)

    def _options(self, teacher: Tuple[Tensor, Tensor]) -> dict:
        return dict(
            filter_teacher=teacher,
            filter_threshold=self.threshold,
            filter_normalize=self.filter_normalize,
        )

    def get_config_dict(self) -> dict:
        return {
            "teacher": self.teacher,
            "threshold": self.threshold,
            "scale": self.scale,
            "filter_normalize": self.filter_normalize,
            "gather_across_devices": self.gather_across_devices,
        }
