"""mmloss's GISTEmbedLoss and CachedGISTEmbedLoss against the installed sentence-transformers 6.2
classes: on the same embeddings (the forward through patched embed columns, the cached loss
stage directly), loss and every embedding gradient at 1e-10 relative in float64 and within 2×
the peer's own float32 error, for every margin strategy and contrast flag, with and without a
hard negative; end to end on tiny BERTs (guide re-tokenised or not, the weights' gradients);
configuration, citation and errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer import losses as st

import mmloss
from mmloss.integrations import sentence_transformers as ml
from tests.integrations.support import assert_matches_peer, embeddings_as_features, tiny_sentence_transformer

MARGINS = [("absolute", 0.0), ("absolute", 0.05), ("relative", 0.1)]
FLAGS = list(itertools.product((True, False), (True, False)))  # (contrast_anchors, contrast_positives)
SIZES = [(7, 10, 6), (1, 3, 4), (33, 17, 5)]  # (B, d, guide width)
GAP = 1e-5  # no guide score within this of its row's threshold: float32 decides every filter alike


def gist_inputs(batch: int, width: int, guide_width: int, columns: int, seed: int, margin_strategy: str, margin: float):
    """float32-representable float64 columns and guide columns: positives and negatives near the
    anchors, the guide a noisy copy of the model, rows 0 and 1 near duplicates (an in-batch false
    negative for the filter). Redrawn until no guide score lies within GAP of its threshold."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(100):
        anchors = torch.randn(batch, width, generator=g)
        if batch > 1:
            anchors[1] = anchors[0] + 0.1 * torch.randn(width, generator=g)
        cols = [anchors] + [anchors + 0.8 * torch.randn(batch, width, generator=g) for _ in range(columns - 1)]
        mix = torch.randn(width, guide_width, generator=g) / width**0.5
        guide = [c @ mix + 0.3 * torch.randn(batch, guide_width, generator=g) for c in cols]
        if min_gap(guide, margin_strategy, margin) > GAP:
            return [c.double() for c in cols], [c.double() for c in guide]
    raise AssertionError("no input without a near-tie")


def guide_scores(guide, margin_strategy: str, margin: float):
    """Every guide cosine of the loss (ap, aa, pp, an blocks) and the rows' thresholds (float64)."""
    a, p, *n = [F.normalize(x.double(), dim=-1) for x in guide]
    g_pos = (a * p).sum(-1, keepdim=True)
    threshold = g_pos - margin if margin_strategy == "absolute" else g_pos - g_pos.abs() * margin
    return torch.cat([a @ p.T, a @ a.T, p @ p.T] + [a @ x.T for x in n], 1), threshold


def min_gap(guide, margin_strategy, margin) -> float:
    scores, threshold = guide_scores(guide, margin_strategy, margin)
    batch = scores.shape[0]
    scores[torch.arange(batch), torch.arange(batch)] = float("inf")  # the positive: never dropped
    return float((scores - threshold).abs().min())


def dropped(guide, margin_strategy, margin) -> int:
    """How many non-positive guide scores exceed their row's threshold."""
    scores, threshold = guide_scores(guide, margin_strategy, margin)
    batch = scores.shape[0]
    scores[torch.arange(batch), torch.arange(batch)] = -float("inf")
    return int((scores > threshold).sum())


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """A tiny BERT model and a second copy of it as the guide (distinct objects, same tokenizer)."""
    directory = tmp_path_factory.mktemp("tiny_bert")
    model, guide = tiny_sentence_transformer(directory), tiny_sentence_transformer(directory)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.eval(), guide.eval()
    return model, guide


def _options(margin_strategy, margin, flags):
    return dict(margin_strategy=margin_strategy, margin=margin, contrast_anchors=flags[0], contrast_positives=flags[1])


@pytest.mark.parametrize("negatives", [0, 1])
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("margin_strategy,margin", MARGINS)
def test_gist_forward_matches_peer(two_models, margin_strategy, margin, flags, negatives):
    model, guide = two_models
    classes = {"peer": st.GISTEmbedLoss, "mmloss": ml.GISTEmbedLoss}
    drops = 0
    for seed, (batch, width, guide_width) in enumerate(SIZES):
        base, guide_base = gist_inputs(batch, width, guide_width, 2 + negatives, seed, margin_strategy, margin)
        drops += dropped(guide_base, margin_strategy, margin)

        def run(impl, dtype):
            loss_fn = classes[impl](model, guide, temperature=0.05, **_options(margin_strategy, margin, flags))
            embeddings = [x.to(dtype).requires_grad_() for x in base]
            features = [{"model": x, "guide": gx.to(dtype)} for x, gx in zip(embeddings, guide_base)]
            with embeddings_as_features(model, guide):
                loss = loss_fn(features, None)
            return [loss.detach(), *torch.autograd.grad(loss, embeddings)]

        assert_matches_peer(run, ["loss"] + [f"d_column{i}" for i in range(len(base))])
        assert mmloss.last_backend() != "reference"
    assert drops > 0  # the guide's filter acted in these inputs


@pytest.mark.parametrize("negatives", [0, 1])
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("margin_strategy,margin", MARGINS)
def test_cached_gist_loss_stage_matches_peer(two_models, margin_strategy, margin, flags, negatives):
    """CachedGISTEmbedLoss.calculate_loss on per-mini-batch embeddings (mini-batches of 4: the
    peer chunks its rows, mmloss takes the whole batch)."""
    model, guide = two_models
    classes = {"peer": st.CachedGISTEmbedLoss, "mmloss": ml.CachedGISTEmbedLoss}
    batch, width, guide_width = SIZES[2]
    base, guide_base = gist_inputs(batch, width, guide_width, 2 + negatives, 3, margin_strategy, margin)

    def run(impl, dtype):
        loss_fn = classes[impl](
            model, guide, temperature=0.03, mini_batch_size=4, **_options(margin_strategy, margin, flags)
        )
        reps = [list(torch.split(x.to(dtype), 4)) for x in base]
        reps = [[r.detach().requires_grad_() for r in column] for column in reps]
        guided = [list(torch.split(x.to(dtype), 4)) for x in guide_base]
        loss = loss_fn.calculate_loss(reps, guided, with_backward=True)
        grads = [torch.cat([r.grad for r in column]) for column in reps]
        return [loss.detach(), *grads]

    assert_matches_peer(run, ["loss"] + [f"d_column{i}" for i in range(len(base))])


SENTENCES = [
    f"sentence number {i} about {w}"
    for i, w in enumerate(["cats", "dogs", "a red car", "the sea", "rain", "music", "old books"])
]


@pytest.mark.parametrize("retokenize", [False, True])
@pytest.mark.parametrize("cached", [False, True])
def test_gist_end_to_end_matches_peer(two_models, cached, retokenize):
    """Both classes' forward (and GradCache's three stages) on tiny BERTs: the loss and the
    gradient of every weight; with `retokenize`, the guide's shorter max_seq_length makes both
    decode and tokenise again for the guide."""
    model, guide = two_models
    columns = [SENTENCES, [s + " indeed" for s in SENTENCES], SENTENCES[3:] + SENTENCES[:3]]
    kwargs = dict(temperature=0.05, margin=0.02)
    if cached:
        kwargs["mini_batch_size"] = 3
    classes = (
        {"peer": st.CachedGISTEmbedLoss, "mmloss": ml.CachedGISTEmbedLoss}
        if cached
        else {"peer": st.GISTEmbedLoss, "mmloss": ml.GISTEmbedLoss}
    )
    saved_length = guide.max_seq_length
    if retokenize:
        guide.max_seq_length = model.max_seq_length - 1

    def run(impl, dtype):
        model.to(dtype), guide.to(dtype)
        model.zero_grad(set_to_none=True)
        loss_fn = classes[impl](model, guide, **kwargs)
        assert loss_fn.must_retokenize == retokenize
        loss = loss_fn([model.preprocess(column) for column in columns], None)
        loss.backward()
        return [loss.detach()] + [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]

    names = ["loss"] + [name for name, p in model.named_parameters() if p.requires_grad]
    try:
        assert_matches_peer(run, names[: len(run("peer", torch.float64))])
        assert all(p.grad is None for p in guide.parameters())
    finally:
        model.to(torch.float32), guide.to(torch.float32)
        guide.max_seq_length = saved_length


def test_gist_never_builds_the_peers_tensors(two_models):
    """B = 512, d = 64: the peer's nn.CosineSimilarity makes B × B × d tensors (64 MiB each in
    float32); every tensor mmloss's loss saves for its backward is smaller than one B × B
    float64 matrix (2 MiB)."""
    model, guide = two_models
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(512, 64, generator=g).requires_grad_() for _ in range(3)]
    guide_base = [torch.randn(512, 16, generator=g) for _ in range(3)]
    loss_fn = ml.GISTEmbedLoss(model, guide)
    peak = []

    def pack(*tensors):  # a tensor saved for backward
        peak.append(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))
        return tensors

    with torch.autograd.graph.saved_tensors_hooks(lambda t: (pack(t), t)[1], lambda t: t):
        loss = loss_fn.compute_loss_from_embeddings(base, guide_base)
    loss.backward()
    assert max(peak) < 512 * 512 * 8


def test_config_and_citation_are_the_peers(two_models):
    model, guide = two_models
    kwargs = dict(temperature=0.02, margin_strategy="relative", margin=0.1, contrast_positives=False)
    pairs = [
        (ml.GISTEmbedLoss(model, guide, **kwargs), st.GISTEmbedLoss(model, guide, **kwargs)),
        (
            ml.CachedGISTEmbedLoss(model, guide, mini_batch_size=8, **kwargs),
            st.CachedGISTEmbedLoss(model, guide, mini_batch_size=8, **kwargs),
        ),
    ]
    for ours, theirs in pairs:
        assert ours.get_config_dict() == theirs.get_config_dict()
        assert ours.citation == st.GISTEmbedLoss.citation.fget(theirs)  # the cached peer has none
        assert ours.model is theirs.model and ours.guide is guide
        assert isinstance(ours, type(theirs))


def test_errors_name_the_argument(two_models):
    model, guide = two_models
    with pytest.raises(ValueError, match="margin_strategy"):
        ml.GISTEmbedLoss(model, guide, margin_strategy="cosine")
    loss = ml.GISTEmbedLoss(model, guide)
    with pytest.raises(ValueError, match="Expected 2 or 3 embeddings"):
        loss.compute_loss_from_embeddings([torch.randn(3, 4)], [torch.randn(3, 4)])
    with pytest.raises(ValueError, match="reps and reps_guided"):
        ml.CachedGISTEmbedLoss(model, guide).calculate_loss([[torch.randn(3, 4)]] * 2, [[torch.randn(3, 4)]])


def test_nan_in_gives_nan_out(two_models):
    model, guide = two_models
    base = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    guide_base = [torch.randn(5, 3, dtype=torch.float64) for _ in range(2)]
    base[1][3, 0] = float("nan")
    assert torch.isnan(ml.GISTEmbedLoss(model, guide).compute_loss_from_embeddings(base, guide_base))
