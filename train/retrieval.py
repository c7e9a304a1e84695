"""Image–text retrieval: Recall@K in both directions from embeddings, via mmloss.topk_similarity.

An image may have several captions. Image→text: a query image scores a hit at K when any of
its captions is among the K most similar captions. Text→image: a caption hits when its image
is among the K most similar images. Recall is the percentage of queries with a hit; "rsum" is
the sum of all recalls (the usual summary). Similarity is the cosine; ties go to the lower
row index (topk_similarity's rule), so results are deterministic.

Pairs file (what the trainer writes; docs/evaluation.md): `torch.save` of a dict with
  "image"    (P, d) float: the image embedding of each pair (equal rows for one image),
  "text"     (P, d) float: the caption embedding of each pair,
  "image_id" (P,)   int:   which image each pair shows; pairs sharing an id are one image's captions.
Both sides must live in one joint space (same d).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

import torch

import mmloss

DEFAULT_KS = (1, 5, 10)


def group_pairs(
    image: torch.Tensor, text: torch.Tensor, image_id: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair rows -> (images (I, d): the first row of each id in id order, text (P, d),
    text_image (P,): each caption's row in images)."""
    for name, x in (("image", image), ("text", text)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (pairs, d), got {getattr(x, 'shape', type(x).__name__)}")
    if (
        not isinstance(image_id, torch.Tensor)
        or image_id.dtype.is_floating_point
        or image_id.shape != (image.shape[0],)
    ):
        raise ValueError(
            f"image_id must be an integer tensor of shape ({image.shape[0]},), "
            f"got {getattr(image_id, 'dtype', type(image_id).__name__)} {tuple(getattr(image_id, 'shape', ()))}"
        )
    if text.shape[0] != image.shape[0]:
        raise ValueError(f"text has {text.shape[0]} rows but image has {image.shape[0]} (one row per pair)")
    _, text_image = torch.unique(image_id, return_inverse=True)
    pairs = torch.arange(image.shape[0], device=image.device)
    first = torch.full((int(text_image.max()) + 1,), image.shape[0], dtype=torch.long, device=image.device)
    first.scatter_reduce_(0, text_image, pairs, reduce="amin")
    return image[first], text, text_image


def retrieval_recall(
    image: torch.Tensor, text: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int] = DEFAULT_KS, block: int = 4096
) -> Dict[str, float]:
    """Recall@K (%) for image (I, d), text (T, d) and text_image (T,): the image row of each caption.

    Returns {"i2t_R@K": ..., "t2i_R@K": ..., "rsum": ...}. K larger than the candidate set
    counts every candidate.
    """
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    n_img, n_txt = image.shape[0], text.shape[0]
    if not isinstance(text_image, torch.Tensor) or text_image.shape != (n_txt,) or text_image.dtype.is_floating_point:
        raise ValueError(f"text_image must be an integer tensor of shape ({n_txt},)")
    text_image = text_image.to(image.device, torch.long)
    if n_txt and (int(text_image.min()) < 0 or int(text_image.max()) >= n_img):
        raise ValueError(f"text_image must index rows of image, [0, {n_img})")
    captions = torch.bincount(text_image, minlength=n_img)
    if bool((captions == 0).any()):
        raise ValueError(f"image rows without a caption: {torch.nonzero(captions == 0).flatten()[:10].tolist()}")
    results: Dict[str, float] = {}
    _, i2t = mmloss.topk_similarity(image, text, min(max(ks), n_txt), block=block)
    i2t_hits = text_image[i2t] == torch.arange(n_img, device=image.device)[:, None]
    _, t2i = mmloss.topk_similarity(text, image, min(max(ks), n_img), block=block)
    t2i_hits = t2i == text_image[:, None]
    for direction, hits in (("i2t", i2t_hits), ("t2i", t2i_hits)):
        for k in ks:
            results[f"{direction}_R@{k}"] = 100.0 * float(hits[:, :k].any(dim=1).double().mean())
    results["rsum"] = sum(results.values())
    return results


def load_pairs(path: Union[str, Path]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read a pairs file (format above) -> (image, text, image_id) per-pair tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in ("image", "text", "image_id") if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"{path}: the pairs file must hold a dict with keys image, text, image_id; missing {missing}")
    return data["image"], data["text"], data["image_id"]


def evaluate_pairs_file(path: Union[str, Path], ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
    """Recall@K of a pairs file: `retrieval_recall(*group_pairs(*load_pairs(path)), ks)`."""
    return retrieval_recall(*group_pairs(*load_pairs(path)), ks=ks)
