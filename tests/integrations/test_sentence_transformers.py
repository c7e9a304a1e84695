"""mmloss.integrations.sentence_transformers against the installed sentence-transformers 6.2
classes on the same embeddings: loss and every gradient (float64 1e-10, float32 within 2× the
peer's own error), for every directions/partition_mode set, with and without hard negatives;
the cached loss through its GradCache stages on a tiny model; configuration and errors."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from sentence_transformers.sentence_transformer import losses as st
from sentence_transformers.util import cos_sim, dot_score

import mmloss
from mmloss.integrations import sentence_transformers as ml
from mmloss.problem import UnsupportedFeature
from tests.integrations.support import assert_matches_peer, tiny_sentence_transformer
from tests.repo import REPO

ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
COMBOS = [
    (("query_to_doc",), "joint"),
    (("query_to_doc",), "per_direction"),
    (("query_to_doc", "doc_to_query"), "joint"),
    (("query_to_doc", "doc_to_query"), "per_direction"),
    (("query_to_doc", "query_to_query"), "joint"),
    (("query_to_doc", "doc_to_doc"), "joint"),
    (("doc_to_doc", "query_to_doc", "doc_to_query"), "joint"),
    (ALL, "joint"),
]


def _embeddings(batch: int, columns: int, width: int, seed: int):
    """float32-representable float64 columns: anchors, then positives and hard negatives
    about as near them (a loss far from 0: no cancellation in 1 - p decides the comparison)."""
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(batch, width, generator=g)
    cols = [anchors] + [anchors + torch.randn(batch, width, generator=g) for _ in range(columns - 1)]
    return [c.double() for c in cols]


def _compare(make_loss, base, names=None):
    def run(impl, dtype):
        embeddings = [x.to(dtype).requires_grad_() for x in base]
        loss = make_loss(impl).compute_loss_from_embeddings(embeddings, None)
        return [loss.detach(), *torch.autograd.grad(loss, embeddings)]

    assert_matches_peer(run, names or ["loss"] + [f"d_column{i}" for i in range(len(base))])


@pytest.mark.parametrize("negatives", [0, 1, 3])
@pytest.mark.parametrize("directions,partition_mode", COMBOS)
def test_ranking_loss_matches_peer(directions, partition_mode, negatives):
    classes = {"peer": st.MultipleNegativesRankingLoss, "mmloss": ml.MultipleNegativesRankingLoss}
    for seed, (batch, width) in enumerate([(7, 10), (1, 3), (33, 17)]):
        base = _embeddings(batch, 2 + negatives, width, seed)
        _compare(
            lambda impl: classes[impl](None, scale=13.0, directions=directions, partition_mode=partition_mode), base
        )
    assert mmloss.last_backend() != "reference"


def test_default_scale_and_backend():
    base = _embeddings(12, 3, 8, 5)
    classes = {"peer": st.MultipleNegativesRankingLoss, "mmloss": ml.MultipleNegativesRankingLoss}
    _compare(lambda impl: classes[impl](None), base)


@pytest.mark.parametrize("negatives", [0, 1])
def test_symmetric_ranking_loss_matches_peer(negatives):
    base = _embeddings(9, 2 + negatives, 6, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        classes = {"peer": st.MultipleNegativesSymmetricRankingLoss, "mmloss": ml.MultipleNegativesSymmetricRankingLoss}
        _compare(lambda impl: classes[impl](None, scale=17.0), base)


def test_symmetric_is_deprecated_as_the_peer():
    with pytest.warns(DeprecationWarning, match="per_direction"):
        ml.MultipleNegativesSymmetricRankingLoss(None)


def test_gather_without_process_group_is_the_local_loss():
    base = _embeddings(6, 3, 5, 3)
    classes = {"peer": st.MultipleNegativesRankingLoss, "mmloss": ml.MultipleNegativesRankingLoss}
    _compare(lambda impl: classes[impl](None, gather_across_devices=True, directions=ALL), base)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model = tiny_sentence_transformer(tmp_path_factory.mktemp("tiny_bert"))
    model.eval()  # no dropout: both classes' embeddings are then the same function of the weights
    return model


SENTENCES = [
    f"sentence number {i} about {w}"
    for i, w in enumerate(["cats", "dogs", "a red car", "the sea", "rain", "music", "old books"])
]


@pytest.mark.parametrize("directions,partition_mode", [(("query_to_doc",), "joint"), (ALL, "joint")])
def test_cached_loss_matches_peer(tiny_model, directions, partition_mode):
    """GradCache end to end on a tiny BERT (7 rows in mini-batches of 3, one negative column):
    the loss and the gradient of every weight."""
    columns = [SENTENCES, [s + " indeed" for s in SENTENCES], SENTENCES[3:] + SENTENCES[:3]]

    def run(impl, dtype):
        model = tiny_model.to(dtype)
        model.zero_grad(set_to_none=True)
        cls = st.CachedMultipleNegativesRankingLoss if impl == "peer" else ml.CachedMultipleNegativesRankingLoss
        loss_fn = cls(model, scale=11.0, mini_batch_size=3, directions=directions, partition_mode=partition_mode)
        features = [model.preprocess(column) for column in columns]
        loss = loss_fn(features, None)
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
        return [loss.detach()] + grads

    names = ["loss"] + [name for name, p in tiny_model.named_parameters() if p.requires_grad]
    try:
        assert_matches_peer(run, names[: len(run("peer", torch.float64))])
    finally:
        tiny_model.to(torch.float32)


def test_cached_in_eval_without_grad(tiny_model):
    columns = [SENTENCES, [s + " indeed" for s in SENTENCES]]
    features = [tiny_model.preprocess(column) for column in columns]
    with torch.no_grad():
        want = st.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=2)(features, None)
        got = ml.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=2)(features, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_config_and_citation_are_the_peers(tiny_model):
    kwargs = dict(scale=30.0, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    pairs = [
        (ml.MultipleNegativesRankingLoss(None, **kwargs), st.MultipleNegativesRankingLoss(None, **kwargs)),
        (ml.MultipleNegativesRankingLoss(None, directions=ALL), st.MultipleNegativesRankingLoss(None, directions=ALL)),
        (
            ml.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=4, **kwargs),
            st.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=4, **kwargs),
        ),
    ]
    for ours, theirs in pairs:
        assert ours.get_config_dict() == theirs.get_config_dict()
        assert ours.citation == theirs.citation
        assert ours.temperature == theirs.temperature
        assert ours.model is theirs.model
        assert isinstance(ours, type(theirs))
    cached = ml.CachedMultipleNegativesRankingLoss(tiny_model)
    assert isinstance(cached.loss, ml.MultipleNegativesRankingLoss) and cached.loss.model is tiny_model


def test_other_similarity_is_refused_by_name():
    with pytest.raises(ValueError, match="similarity_fct=dot_score"):
        ml.MultipleNegativesRankingLoss(None, similarity_fct=dot_score)
    loss = ml.MultipleNegativesRankingLoss(None, similarity_fct=cos_sim)
    loss.similarity_fct = dot_score  # changed after construction: refused before any kernel runs
    with pytest.raises(ValueError, match="similarity_fct=dot_score"):
        loss.compute_loss_from_embeddings([torch.randn(3, 4), torch.randn(3, 4)], None)


def test_model_similarity_of_a_cosine_model_is_accepted(tiny_model):
    assert tiny_model.similarity_fn_name in (None, "cosine")
    tiny_model.similarity_fn_name = "cosine"
    ml.MultipleNegativesRankingLoss(tiny_model, similarity_fct=tiny_model.similarity)
    tiny_model.similarity_fn_name = "dot"
    with pytest.raises(ValueError, match="similarity_fct=dot_score"):
        ml.MultipleNegativesRankingLoss(tiny_model, similarity_fct=tiny_model.similarity)
    tiny_model.similarity_fn_name = "cosine"


HARDNESS_MODES = ["in_batch_negatives", "hard_negatives", "all_negatives"]


def _computes_hardness(backend: str) -> bool:
    """Whether `backend` ("auto": the default's choice here) computes the hardness penalty."""
    x = torch.randn(2, 3)
    try:
        mmloss.contrastive_loss(x, x, backend=backend, hardness_strength=1.0)
    except UnsupportedFeature:
        return False
    return True


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("mode", HARDNESS_MODES)
@pytest.mark.parametrize("negatives", [0, 1, 3])
@pytest.mark.parametrize("directions,partition_mode", COMBOS)
def test_hardness_matches_peer(directions, partition_mode, negatives, mode, backend):
    """hardness_mode with hardness_strength > 0 (the penalty on the query_to_doc block): on the
    reference backend, and on the default one once its kernels compute the penalty (until then
    skipped, except where the mode penalises nothing: hard_negatives without hard negatives)."""
    penalised = not (mode == "hard_negatives" and negatives == 0)
    if backend == "auto" and penalised and not _computes_hardness("auto"):
        pytest.skip("the default backend does not compute the hardness penalty yet (docs/contract.md §3)")
    classes = {"peer": st.MultipleNegativesRankingLoss, "mmloss": ml.MultipleNegativesRankingLoss}

    def make(impl):
        loss = classes[impl](
            None,
            scale=13.0,
            directions=directions,
            partition_mode=partition_mode,
            hardness_mode=mode,
            hardness_strength=5.0,
        )
        if impl == "mmloss":
            loss.backend = backend
        return loss

    for seed, (batch, width) in enumerate([(7, 10), (1, 3), (33, 17)]):
        _compare(make, _embeddings(batch, 2 + negatives, width, seed))
    assert (mmloss.last_backend() == "reference") == (backend == "reference")


def test_hardness_changes_the_loss():
    """The penalty is not a no-op in these inputs (the comparison above could not miss it)."""
    base = _embeddings(7, 3, 10, 0)
    plain = st.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(base, None)
    for mode in HARDNESS_MODES:
        loss = st.MultipleNegativesRankingLoss(None, hardness_mode=mode, hardness_strength=5.0)
        assert abs(float(loss.compute_loss_from_embeddings(base, None) - plain)) > 1e-3


@pytest.mark.parametrize("mode", HARDNESS_MODES)
def test_hardness_strength_zero_is_the_plain_loss(mode):
    base = _embeddings(5, 3, 4, 2)
    classes = {"peer": st.MultipleNegativesRankingLoss, "mmloss": ml.MultipleNegativesRankingLoss}
    _compare(lambda impl: classes[impl](None, hardness_mode=mode, hardness_strength=0.0), base)
    assert mmloss.last_backend() != "reference"


def test_cached_hardness_matches_peer(tiny_model):
    """CachedMultipleNegativesRankingLoss with the penalty, end to end (reference backend)."""
    columns = [SENTENCES, [s + " indeed" for s in SENTENCES], SENTENCES[3:] + SENTENCES[:3]]
    kwargs = dict(scale=11.0, mini_batch_size=3, hardness_mode="all_negatives", hardness_strength=4.0)

    def run(impl, dtype):
        model = tiny_model.to(dtype)
        model.zero_grad(set_to_none=True)
        if impl == "peer":
            loss_fn = st.CachedMultipleNegativesRankingLoss(model, **kwargs)
        else:
            loss_fn = ml.CachedMultipleNegativesRankingLoss(model, **kwargs)
            loss_fn.loss.backend = "reference"
        loss = loss_fn([model.preprocess(column) for column in columns], None)
        loss.backward()
        return [loss.detach()] + [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]

    names = ["loss"] + [name for name, p in tiny_model.named_parameters() if p.requires_grad]
    try:
        assert_matches_peer(run, names[: len(run("peer", torch.float64))])
    finally:
        tiny_model.to(torch.float32)


def test_peer_argument_checks_are_kept():
    with pytest.raises(ValueError, match="per_direction"):
        ml.MultipleNegativesRankingLoss(None, directions=ALL, partition_mode="per_direction")
    with pytest.raises(ValueError, match="query_to_doc"):
        ml.MultipleNegativesRankingLoss(None, directions=("doc_to_query",))
    with pytest.raises(ValueError, match="Scale"):
        ml.MultipleNegativesRankingLoss(None, scale=0.0)
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        ml.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings([torch.randn(3, 4)], None)


def test_nan_in_gives_nan_out():
    embeddings = [torch.randn(4, 3, dtype=torch.float64) for _ in range(2)]
    embeddings[1][2, 0] = float("nan")
    assert torch.isnan(ml.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(embeddings, None))


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_core_package_does_not_import_integrations():
    proc = _run_python(
        "import sys, mmloss; mmloss.contrastive_loss; "
        "print(sorted(m for m in sys.modules if m.startswith('mmloss.integrations') "
        "or m.split('.')[0] in ('sentence_transformers', 'open_clip')))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_clear_import_error_without_sentence_transformers():
    proc = _run_python(
        "import sys; sys.modules['sentence_transformers'] = None\nimport mmloss.integrations.sentence_transformers"
    )
    assert proc.returncode != 0
    assert "ImportError: mmloss.integrations.sentence_transformers needs sentence-transformers 6.x" in proc.stderr
