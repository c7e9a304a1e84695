"""AngularMarginMNRL and TeacherFilteredMNRL (no peer class exists) against a float64 dense
formula written from their definitions (acos, not the kernels' closed form): loss and every
embedding gradient at 1e-10 relative in float64, and in float32 within 2× the dense formula's
own float32 error; the forward with a teacher on tiny BERTs; configuration, citation, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmloss
from mmloss.integrations import sentence_transformers as ml
from tests.integrations.support import assert_matches_peer, tiny_sentence_transformer

SIZES = [(7, 10, 6), (1, 3, 4), (33, 17, 5)]  # (B, d, teacher width)


def dense_loss(
    embeddings, scale, margin=0.0, margin_teacher=None, filter_teacher=None, threshold=None, cosine=True, offset=0
):
    """The loss as a B × B·(1+n) matrix: the anchors' cosines c with every document, a negative
    with c < cos m scores cos(acos c − m'), m' = m or m·(1 − cos(t_i, t_j)); a negative whose
    teacher score (cosine, or raw dot product) exceeds `threshold` is dropped; cross entropy
    with the positive at column offset + i."""
    q, docs = embeddings[0], torch.cat(embeddings[1:])
    batch = q.shape[0]
    c = F.normalize(q, dim=-1) @ F.normalize(docs, dim=-1).T
    is_pos = torch.zeros_like(c, dtype=torch.bool)
    is_pos[torch.arange(batch), offset + torch.arange(batch)] = True
    logits = c
    if margin > 0:
        m = torch.full_like(c, margin)
        if margin_teacher is not None:
            tq, tk = margin_teacher[0], torch.cat(margin_teacher[1:])
            m = margin * (1 - F.normalize(tq, dim=-1) @ F.normalize(tk, dim=-1).T)
        far = ~is_pos & (c < math.cos(margin))
        logits = torch.where(far, torch.cos(torch.acos(c.clamp(max=math.cos(margin))) - m), c)
    logits = logits * scale
    if filter_teacher is not None:
        tq, tk = filter_teacher[0], torch.cat(filter_teacher[1:])
        s = F.normalize(tq, dim=-1) @ F.normalize(tk, dim=-1).T if cosine else tq @ tk.T
        logits = logits.masked_fill((s > threshold) & ~is_pos, -math.inf)
    return F.cross_entropy(logits, offset + torch.arange(batch))


def _inputs(batch, width, teacher_width, columns, seed):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(batch, width, generator=g)
    cols = [anchors] + [anchors + torch.randn(batch, width, generator=g) for _ in range(columns - 1)]
    mix = torch.randn(width, teacher_width, generator=g) / width**0.5
    teacher = [c @ mix + 0.5 * torch.randn(batch, teacher_width, generator=g) for c in cols]
    return [c.double() for c in cols], [t.double() for t in teacher]


def _compare(make_loss, dense, base, teacher):
    def run(impl, dtype):
        embeddings = [x.to(dtype).requires_grad_() for x in base]
        t = None if teacher is None else [x.to(dtype) for x in teacher]
        if impl == "peer":
            loss = dense(embeddings, t)
        else:
            loss = make_loss().compute_loss_from_embeddings(embeddings, None, t)
        return [loss.detach(), *torch.autograd.grad(loss, embeddings)]

    assert_matches_peer(run, ["loss"] + [f"d_column{i}" for i in range(len(base))])
    assert mmloss.last_backend() != "reference"


@pytest.mark.parametrize("negatives", [0, 1, 3])
@pytest.mark.parametrize("adaptive", [False, True])
def test_angular_margin_matches_dense(negatives, adaptive):
    for seed, (batch, width, teacher_width) in enumerate(SIZES):
        base, teacher = _inputs(batch, width, teacher_width, 2 + negatives, seed)
        if not adaptive:
            teacher = None
        loss = ml.AngularMarginMNRL(None, scale=17.0, margin=0.3, teacher=object() if adaptive else None)

        def dense(e, t):
            return dense_loss(e, 17.0, margin=0.3, margin_teacher=t)

        _compare(lambda: loss, dense, base, teacher)


def test_angular_margin_zero_is_mnrl():
    from sentence_transformers.sentence_transformer import losses as st

    base, _ = _inputs(9, 8, 4, 3, 4)
    got = ml.AngularMarginMNRL(None, margin=0.0).compute_loss_from_embeddings(base, None)
    want = st.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(base, None)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("negatives", [0, 1, 3])
@pytest.mark.parametrize("cosine", [True, False])
def test_teacher_filter_matches_dense(negatives, cosine):
    drops = 0
    for seed, (batch, width, teacher_width) in enumerate(SIZES):
        base, teacher = _inputs(batch, width, teacher_width, 2 + negatives, seed + 10)
        threshold = 0.35 if cosine else 1.5
        tq, tk = F.normalize(teacher[0], dim=-1), F.normalize(torch.cat(teacher[1:]), dim=-1)
        s = tq @ tk.T if cosine else teacher[0] @ torch.cat(teacher[1:]).T
        off = ~torch.eye(batch, s.shape[1], dtype=torch.bool)
        assert float((s - threshold).abs().min()) > 1e-5  # no near-tie: float32 decides alike
        drops += int(((s > threshold) & off).sum())
        loss = ml.TeacherFilteredMNRL(None, object(), threshold, scale=13.0, filter_normalize=cosine)

        def dense(e, t):
            return dense_loss(e, 13.0, filter_teacher=t, threshold=threshold, cosine=cosine)

        _compare(lambda: loss, dense, base, teacher)
    assert drops > 0


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_bert")
    model, teacher = tiny_sentence_transformer(directory), tiny_sentence_transformer(directory)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.eval(), teacher.eval()
    return model, teacher


SENTENCES = [f"sentence number {i} about {w}" for i, w in enumerate(["cats", "dogs", "a red car", "the sea", "rain"])]


@pytest.mark.parametrize("name", ["AngularMarginMNRL", "TeacherFilteredMNRL"])
def test_forward_embeds_with_the_teacher(two_models, name):
    """forward = compute_loss_from_embeddings on the model's and (no grad) the teacher's
    embeddings of the columns; the teacher's weights get no gradient."""
    model, teacher = two_models
    loss_fn = (
        ml.AngularMarginMNRL(model, margin=0.2, teacher=teacher)
        if name == "AngularMarginMNRL"
        else ml.TeacherFilteredMNRL(model, teacher, threshold=0.9)
    )
    columns = [SENTENCES, [s + " indeed" for s in SENTENCES]]
    features = [model.preprocess(column) for column in columns]
    loss = loss_fn(features, None)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        embeddings = [model.encode(c, convert_to_tensor=True) for c in columns]
        teacher_embeddings = [teacher.encode(c, convert_to_tensor=True) for c in columns]
        want = loss_fn.compute_loss_from_embeddings(embeddings, None, teacher_embeddings)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)


def test_config_and_citation(two_models):
    model, teacher = two_models
    loss = ml.AngularMarginMNRL(model, scale=30.0, margin=0.1, teacher=teacher)
    assert loss.get_config_dict() == {"scale": 30.0, "margin": 0.1, "teacher": teacher, "gather_across_devices": False}
    loss = ml.TeacherFilteredMNRL(model, teacher, 0.8)
    assert loss.get_config_dict() == {
        "teacher": teacher,
        "threshold": 0.8,
        "scale": 20.0,
        "filter_normalize": True,
        "gather_across_devices": False,
    }
    assert "KDMCSE" in loss.citation and "2024" in loss.citation and loss.model is model


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="margin must be in"):
        ml.AngularMarginMNRL(None, margin=2.0)
    with pytest.raises(ValueError, match="scale"):
        ml.AngularMarginMNRL(None, scale=0.0)
    with pytest.raises(ValueError, match="needs a teacher"):
        ml.TeacherFilteredMNRL(None, None, 0.5)
    with pytest.raises(ValueError, match="threshold"):
        ml.TeacherFilteredMNRL(None, object(), float("nan"))
    x = [torch.randn(3, 4), torch.randn(3, 4)]
    with pytest.raises(ValueError, match="teacher_embeddings must be given"):
        ml.TeacherFilteredMNRL(None, object(), 0.5).compute_loss_from_embeddings(x, None)
    with pytest.raises(ValueError, match="teacher_embeddings must be given"):
        ml.AngularMarginMNRL(None).compute_loss_from_embeddings(x, None, x)
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        ml.AngularMarginMNRL(None).compute_loss_from_embeddings(x[:1], None)
