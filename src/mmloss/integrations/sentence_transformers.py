"""sentence-transformers 6.x ranking losses computed by `mmloss.contrastive_loss`.

Swap the import and keep the rest of the script (docs/integrations.md):

    from mmloss.integrations.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model)        # was sentence_transformers.losses....

Each class subclasses the sentence-transformers class of the same name, so the constructor
(arguments, defaults, checks), `forward`, `get_config_dict`, `citation` and `temperature` are
that class's; the loss itself comes from mmloss's fused kernels, which never build the
B × B·(1+n) score matrix (O(B·d) memory). The value and the embedding gradients equal the
sentence-transformers class's (tests/integrations/).

Supported: the (anchor, positive, negative_1…n) columns, `scale`, cosine similarity (the
default `cos_sim`), `gather_across_devices` (mmloss's global negatives), every `directions`
subset with both `partition_mode`s. Planned: `hardness_mode` with `hardness_strength` > 0 (it
needs the hardness-penalty kernel feature, docs/contract.md §3) raises NotImplementedError;
another `similarity_fct` raises ValueError.

How the directions map onto the op. Rows are the queries q_i; the keys are the blocks of the
chosen directions side by side, with `key_groups` removing each row's own query (query_to_query)
and own documents (doc_to_doc), as sentence-transformers' -inf entries do. When a block's row
vector is the document d_i (doc_to_query, doc_to_doc), the rows are [q̂_i, d̂_i] and the keys
[k̂, 0] (query-side blocks) or [0, k̂] (document-side blocks): every logit is then the cosine
of the right pair, times √2 (the rows' norm), which the temperature takes back. This costs a
doubled width (2d); a zero embedding (norm 0 instead of 1) would break the √2 and is not
supported there. `per_direction` (query_to_doc and doc_to_query only, as in
sentence-transformers) is the mean of two calls, or one symmetric call without hard negatives.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

try:
    import sentence_transformers
    from sentence_transformers.sentence_transformer import losses as _st_losses
    from sentence_transformers.util import cos_sim
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
    "CachedMultipleNegativesRankingLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "ranking_loss",
]

QUERY_TO_DOC, QUERY_TO_QUERY, DOC_TO_QUERY, DOC_TO_DOC = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
_BLOCK_ORDER = (QUERY_TO_DOC, QUERY_TO_QUERY, DOC_TO_QUERY, DOC_TO_DOC)


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
    if loss.hardness_mode is not None and loss.hardness_strength > 0.0:
        raise NotImplementedError(
            f"hardness_mode={loss.hardness_mode!r} with hardness_strength={loss.hardness_strength} is planned but "
            "not supported yet: it needs mmloss's hardness-penalty kernel feature (docs/contract.md §3). Use "
            "hardness_strength=0.0, or sentence-transformers' own class meanwhile"
        )


def _global(gather_across_devices: bool) -> bool:
    """Whether this call runs across ranks (as sentence-transformers: gathering without an
    initialised process group is the local loss)."""
    return bool(gather_across_devices) and dist.is_available() and dist.is_initialized()


def _loss(rows: Tensor, keys: Tensor, temperature: float, across_ranks: bool, **kwargs) -> Tensor:
    """Mean over this rank's rows of mmloss's row losses; across ranks every rank's keys are
    negatives and the key gradients reach their owners, as sentence-transformers'
    all_gather_with_grad does (the value is this rank's mean, not the global one)."""
    if not across_ranks:
        return mmloss.contrastive_loss(rows, keys, temperature=temperature, **kwargs)
    return mmloss.contrastive_loss(
        rows, keys, temperature=temperature, reduction="none", global_negatives="gather", **kwargs
    ).mean()


class _GroupIds:
    """Column labels for `key_groups`, unique across ranks: own(B) labels row i's own columns
    (even numbers), fresh(n) labels columns that belong to no row (odd numbers)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device, self.used = rank, world, device, 0

    def own(self, count: int) -> Tensor:
        return 2 * (self.rank + self.world * torch.arange(count, device=self.device))

    def fresh(self, count: int) -> Tensor:
        ids = 2 * (self.rank + self.world * (self.used + torch.arange(count, device=self.device))) + 1
        self.used += count
        return ids


def _joint(queries: Tensor, docs: List[Tensor], scale: float, directions: Sequence[str], across_ranks: bool) -> Tensor:
    """One softmax per row over the union of the chosen directions' columns (see the module doc)."""
    batch, n_docs = queries.shape[0], len(docs)
    docs_all = torch.cat(docs)
    doc_rows = DOC_TO_QUERY in directions or DOC_TO_DOC in directions
    if doc_rows:
        q, d = F.normalize(queries, p=2, dim=-1), F.normalize(docs_all, p=2, dim=-1)
        zq, zd = torch.zeros_like(q), torch.zeros_like(d)
        rows = torch.cat([q, d[:batch]], dim=1)
        blocks = {
            QUERY_TO_DOC: lambda: torch.cat([d, zd], 1),
            QUERY_TO_QUERY: lambda: torch.cat([q, zq], 1),
            DOC_TO_QUERY: lambda: torch.cat([zq, q], 1),
            DOC_TO_DOC: lambda: torch.cat([zd, d], 1),
        }
        temperature = 1.0 / (scale * math.sqrt(2.0))
    else:
        rows, temperature = queries, 1.0 / scale
        blocks = {QUERY_TO_DOC: lambda: docs_all, QUERY_TO_QUERY: lambda: queries}
    chosen = [name for name in _BLOCK_ORDER if name in directions]
    keys = torch.cat([blocks[name]() for name in chosen])
    key_groups = None
    if QUERY_TO_QUERY in directions or DOC_TO_DOC in directions:
        rank, world = (dist.get_rank(), dist.get_world_size()) if across_ranks else (0, 1)
        ids = _GroupIds(rank, world, queries.device)
        groups = {
            QUERY_TO_DOC: lambda: torch.cat([ids.own(batch), ids.fresh(batch * (n_docs - 1))]),
            QUERY_TO_QUERY: lambda: ids.own(batch),  # q_i itself leaves row i
            DOC_TO_QUERY: lambda: ids.fresh(batch),
            DOC_TO_DOC: lambda: ids.own(batch).repeat(n_docs),
        }  # row i's own documents leave it
        key_groups = torch.cat([groups[name]() for name in chosen])
    return _loss(rows, keys, temperature, across_ranks, key_groups=key_groups)


def ranking_loss(
    queries: Tensor,
    docs: Sequence[Tensor],
    *,
    scale: float = 20.0,
    directions: Sequence[str] = (QUERY_TO_DOC,),
    partition_mode: str = "joint",
    gather_across_devices: bool = False,
) -> Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss (cosine, no hardness penalty) by mmloss.

    queries (B, d): anchors; docs: [positives (B, d), negatives_1 (B, d), ...]; scale = 1/τ;
    directions and partition_mode as sentence-transformers (the caller checks them). Returns
    the mean over this rank's anchors (fp32; fp64 for fp64 inputs).
    """
    docs = list(docs)
    across_ranks = _global(gather_across_devices)
    if partition_mode == "per_direction" and DOC_TO_QUERY in directions:
        if len(docs) == 1:
            return _loss(queries, docs[0], 1.0 / scale, across_ranks, symmetric=True)
        return 0.5 * (
            _loss(queries, torch.cat(docs), 1.0 / scale, across_ranks)
            + _loss(docs[0], queries, 1.0 / scale, across_ranks)
        )
    if set(directions) == {QUERY_TO_DOC}:
        return _loss(queries, torch.cat(docs), 1.0 / scale, across_ranks)
    return _joint(queries, docs, scale, directions, across_ranks)


class _RankingByMmloss:
    """`compute_loss_from_embeddings` by `ranking_loss`, for the subclasses below."""

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
