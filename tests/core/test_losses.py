"""Each method module against a dense re-implementation of its official code's formula.

The official formulas are written out here independently of mmloss: cosine similarity
matrices divided by τ into F.cross_entropy (SimCSE, MCSE), and KDMCSE's ArcSimilarity through
acos: θ = acos(clamp(c)), negatives with θ > m get θ - (1 - S)·m, cos again, / τ. Inputs are
random float64; forward and gradients are compared, for text-only and image-caption batches,
with several captions of one image in a batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmloss.backends import unavailable_reason
from mmloss.losses import KDMCSELoss, LossOutput, MCSELoss, MCSEOLoss, SimCSELoss
from tests.cases import shifted_seed, threshold_between

# CPU tensors here: the Triton interpreter has its own suites (tests/test_triton_*.py).
BACKENDS = [b for b in ("reference", "cpu") if unavailable_reason(b, torch.device("cpu")) is None]
N, D, G, DT = 6, 10, 8, 12
IMAGE_OF_CAPTION = torch.tensor([0, 0, 1, 2, 2, 2])  # duplicates: captions 0-1 and 3-5 share an image


def cosine_matrix(x, y):
    """The official Similarity: nn.CosineSimilarity(dim=-1)(x.unsqueeze(1), y.unsqueeze(0))."""
    return F.cosine_similarity(x[:, None, :], y[None, :, :], dim=-1)


def infonce(logits, mask=None):
    """F.cross_entropy with diagonal labels; `mask` (N, N) True removes a non-diagonal column."""
    if mask is not None:
        logits = logits.masked_fill(mask & ~torch.eye(*logits.shape, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, torch.arange(logits.shape[0]))


def arc_similarity(x, y, temperature, margin, teacher_sim=None):
    """KDMCSE's ArcSimilarity (calculate_arccos1 without, calculate_arccos2 with teacher_sim)."""
    theta = torch.acos(torch.clamp(cosine_matrix(x, y), -1.0, 1.0))
    one_hot = torch.eye(*theta.shape, dtype=theta.dtype)
    selected = torch.where(theta > margin, torch.ones_like(one_hot), one_hot) * (1 - one_hot)
    shift = margin if teacher_sim is None else (1 - teacher_sim) * margin
    return torch.cos(torch.where(selected.bool(), theta - shift, theta)) / temperature


def same_image(ids):
    return None if ids is None else ids[:, None] == ids[None, :]


def batch(seed: int):
    """Random float64 inputs: views, grounded heads, image heads (one per caption, duplicated
    for captions of one image), teacher features."""
    g = torch.Generator().manual_seed(shifted_seed(seed))
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    z2 = rand(N, D)
    images, image_features = rand(3, G)[IMAGE_OF_CAPTION], rand(3, DT)[IMAGE_OF_CAPTION]
    text_features = image_features + 0.8 * rand(N, DT)
    x = {
        "z1": z2 + 0.8 * rand(N, D),
        "z2": z2,
        "s1": images + rand(N, G),
        "s2": images + rand(N, G),
        "m": images,
        "t": rand(N, G) + images,
    }
    return {k: v.requires_grad_(True) for k, v in x.items()}, image_features, text_features


def assert_same(out: LossOutput, expected: torch.Tensor, inputs: dict):
    """Loss and every input gradient equal the official formula's (float64)."""
    torch.testing.assert_close(out.total, expected, atol=1e-12, rtol=1e-10)
    names = list(inputs)
    got = torch.autograd.grad(out.total, [inputs[k] for k in names], allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(expected, [inputs[k] for k in names], allow_unused=True, retain_graph=True)
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_simcse(backend):
    x, _, _ = batch(0)
    temperature = torch.nn.Parameter(torch.tensor(0.05, dtype=torch.float64))
    module = SimCSELoss(temperature, backend=backend)
    assert list(module.parameters()) == [temperature]
    out = module(x["z1"], x["z2"])
    expected = infonce(cosine_matrix(x["z1"], x["z2"]) / temperature)
    assert_same(out, expected, {"z1": x["z1"], "z2": x["z2"], "temperature": temperature})
    assert set(out.parts) == {"simcse"}
    assert SimCSELoss().temperature == 0.05
    one_element = torch.nn.Parameter(torch.tensor([0.05], dtype=torch.float64))  # as DeepSpeed needs
    torch.testing.assert_close(SimCSELoss(one_element, backend=backend)(x["z1"], x["z2"]).total, out.total)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("image_ids", [None, IMAGE_OF_CAPTION], ids=["official", "image_ids"])
def test_mcse(backend, image_ids):
    x, _, _ = batch(1)
    module = MCSELoss(backend=backend)
    assert (module.temperature, module.vl_temperature, module.vl_weight) == (0.05, 0.05, 0.01)
    simcse = infonce(cosine_matrix(x["z1"], x["z2"]) / 0.05)
    text_only = module(x["z1"], x["z2"])
    assert_same(text_only, simcse, {k: x[k] for k in ("z1", "z2")})
    out = module(x["z1"], x["z2"], x["s1"], x["s2"], x["m"], image_ids=image_ids)
    mask = same_image(image_ids)
    mml = 0.5 * (
        infonce(cosine_matrix(x["s1"], x["m"]) / 0.05, mask) + infonce(cosine_matrix(x["s2"], x["m"]) / 0.05, mask)
    )
    assert_same(out, simcse + 0.01 * mml, {k: x[k] for k in ("z1", "z2", "s1", "s2", "m")})
    torch.testing.assert_close(out.parts["mml"], mml)
    with pytest.raises(ValueError, match="s1, s2 and m must be given together"):
        module(x["z1"], x["z2"], x["s1"], None, x["m"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mcseo(backend):
    x, _, _ = batch(2)
    g = torch.Generator().manual_seed(shifted_seed(3))
    objects = torch.randn(5, G, generator=g, dtype=torch.float64, requires_grad=True)
    phrase_object = torch.tensor([0, 2, 2, 4, -100, 1, 3])  # ragged: 7 phrases, 5 objects; one unmatched
    object_groups = torch.tensor([10, 10, 11, 12, 12])  # region ids: objects 0-1 and 3-4 share a region
    phrases = (
        objects[phrase_object.clamp(min=0)].detach() + torch.randn(7, G, generator=g, dtype=torch.float64)
    ).requires_grad_(True)
    module = MCSEOLoss(op_temperature=0.07, op_weight=0.5, backend=backend)
    out = module(
        x["z1"],
        x["z2"],
        x["s1"],
        x["s2"],
        x["m"],
        phrases=phrases,
        objects=objects,
        phrase_object=phrase_object,
        object_groups=object_groups,
    )
    simcse = infonce(cosine_matrix(x["z1"], x["z2"]) / 0.05)
    mml = 0.5 * (infonce(cosine_matrix(x["s1"], x["m"]) / 0.05) + infonce(cosine_matrix(x["s2"], x["m"]) / 0.05))
    logits = cosine_matrix(phrases, objects) / 0.07
    keep = phrase_object >= 0
    target = phrase_object[keep]
    region = object_groups[None, :] == object_groups[target][:, None]
    region[torch.arange(len(target)), target] = False
    op = F.cross_entropy(logits[keep].masked_fill(region, float("-inf")), target)
    inputs = {k: x[k] for k in ("z1", "z2", "s1", "s2", "m")}
    assert_same(out, simcse + 0.01 * mml + 0.5 * op, dict(inputs, phrases=phrases, objects=objects))
    assert set(out.parts) == {"simcse", "mml", "object_phrase"}
    assert_same(module(x["z1"], x["z2"]), simcse, {"z1": x["z1"], "z2": x["z2"]})


def kdmcse_official(x, image_features, text_features, threshold=None, normalize=False, image_ids=None):
    """The official KDMCSE loss: intra ArcSimilarity (fixed margin), inter AdapACSE towards the
    image targets v (teacher S = cos(I, I), filter on T·I) and text targets t (S = cos(T, T),
    filter on I·T), averaged over the two views, λ = 0.01."""
    margin, tau = 0.15, 0.05
    intra = infonce(arc_similarity(x["z1"], x["z2"], tau, margin))
    inter = 0.0
    for target, teacher, other in ((x["m"], image_features, text_features), (x["t"], text_features, image_features)):
        mask = same_image(image_ids)
        if threshold is not None:
            fq, fk = (F.normalize(other, dim=-1), F.normalize(teacher, dim=-1)) if normalize else (other, teacher)
            drop = fq @ fk.T > threshold
            mask = drop if mask is None else mask | drop
        similarity = cosine_matrix(teacher, teacher)
        inter = inter + 0.5 * sum(
            infonce(arc_similarity(p, target, tau, margin, similarity), mask) for p in (x["s1"], x["s2"])
        )
    return intra, intra + 0.01 * inter


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["official", "filter", "filter_normalize", "image_ids"])
def test_kdmcse(backend, variant):
    x, image_features, text_features = batch(4)
    scores = text_features @ image_features.T
    settings = {
        "official": {},
        "filter": {"threshold": threshold_between(scores)},
        "filter_normalize": {"threshold": 0.3, "normalize": True},
        "image_ids": {"image_ids": IMAGE_OF_CAPTION},
    }[variant]
    module = KDMCSELoss(
        filter_threshold=settings.get("threshold"), filter_normalize=settings.get("normalize", False), backend=backend
    )
    assert (module.margin, module.vl_weight, module.temperature) == (0.15, 0.01, 0.05)
    intra, expected = kdmcse_official(x, image_features, text_features, **settings)
    # away from the acos edges, where the official gradient is infinite
    assert float(cosine_matrix(x["z1"], x["z2"]).detach().abs().max()) < 0.99
    text_only = module(x["z1"], x["z2"])
    assert_same(text_only, intra, {"z1": x["z1"], "z2": x["z2"]})
    out = module(
        x["z1"],
        x["z2"],
        x["s1"],
        x["s2"],
        x["m"],
        x["t"],
        image_features,
        text_features,
        image_ids=settings.get("image_ids"),
    )
    assert_same(out, expected, {k: x[k] for k in ("z1", "z2", "s1", "s2", "m", "t")})
    assert set(out.parts) == {"intra", "inter_image", "inter_text"}


def test_kdmcse_rejects_partial_image_batch():
    x, image_features, _ = batch(5)
    with pytest.raises(ValueError, match="must be given together"):
        KDMCSELoss(backend="reference")(x["z1"], x["z2"], x["s1"], x["s2"], x["m"], x["t"], image_features)


def test_global_negatives_need_a_process_group():
    x, _, _ = batch(7)
    with pytest.raises(ValueError, match="initialised torch.distributed"):
        SimCSELoss(global_negatives="ring", backend="reference")(x["z1"], x["z2"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mcseo_skips_a_term_without_valid_rows(backend, monkeypatch):
    """A batch whose phrases are all ignored: the object-phrase term is skipped (no kernel call,
    part exactly 0, no gradient to phrases or objects) and counted; the rest is untouched."""
    import mmloss.losses

    x, _, _ = batch(8)
    calls = []
    real = mmloss.losses.contrastive_loss
    monkeypatch.setattr(mmloss.losses, "contrastive_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    phrases = torch.randn(3, G, dtype=torch.float64, requires_grad=True)
    objects = torch.randn(4, G, dtype=torch.float64, requires_grad=True)
    module = MCSEOLoss(backend=backend)
    out = module(
        x["z1"],
        x["z2"],
        x["s1"],
        x["s2"],
        x["m"],
        phrases=phrases,
        objects=objects,
        phrase_object=torch.full((3,), -100),
    )
    assert len(calls) == 2  # simcse and mml only
    assert out.parts["object_phrase"] == 0 and out.parts["object_phrase"].dtype == torch.float64
    assert out.parts["skipped_terms"] == 1
    mcse = MCSELoss(backend=backend)(x["z1"], x["z2"], x["s1"], x["s2"], x["m"])
    torch.testing.assert_close(out.total, mcse.total, rtol=0, atol=0)
    out.total.backward()
    assert phrases.grad is None and objects.grad is None
    assert all(torch.isfinite(x[k].grad).all() for k in ("z1", "z2", "s1", "s2", "m"))
    valid = module(
        x["z1"],
        x["z2"],
        x["s1"],
        x["s2"],
        x["m"],
        phrases=phrases,
        objects=objects,
        phrase_object=torch.tensor([-100, 2, -100]),
    )
    assert "skipped_terms" not in valid.parts and valid.parts["object_phrase"] > 0


def _method_inputs():
    x, image_features, text_features = batch(9)
    return {k: v.detach() for k, v in x.items()}, image_features, text_features


def _bad_calls():
    """(description, call, error type, text the message must contain) of method losses."""
    x, fi, ft = _method_inputs()
    z1, z2, s1, s2, m, t = (x[k] for k in ("z1", "z2", "s1", "s2", "m", "t"))
    objects, phrases = torch.randn(5, G, dtype=torch.float64), torch.randn(7, G, dtype=torch.float64)
    ok = torch.tensor([0, 1, 2, 3, 4, -100, 0])
    mcseo = lambda **kw: MCSEOLoss(backend="reference")(  # noqa: E731
        z1, z2, s1, s2, m, **{"phrases": phrases, "objects": objects, "phrase_object": ok, **kw}
    )
    kd = KDMCSELoss(backend="reference")
    return [
        (
            "simcse z2 rows",
            lambda: SimCSELoss(backend="reference")(torch.cat([z1, z1]), z2),
            ValueError,
            "z2 must have 12 rows",
        ),
        ("simcse z1 1-D", lambda: SimCSELoss(backend="reference")(z1[0], z2), ValueError, "z1 must be 2-D"),
        ("simcse z2 width", lambda: SimCSELoss(backend="reference")(z1, z2[:, :3]), ValueError, "z2 width 3"),
        (
            "mcse s2 width",
            lambda: MCSELoss(backend="reference")(z1, z2, s1, s2[:, :3], m),
            ValueError,
            "s2 width 3 differs from s1 width",
        ),
        ("mcse m rows", lambda: MCSELoss(backend="reference")(z1, z2, s1, s2, m[:4]), ValueError, "m must have 6 rows"),
        (
            "mcse s1 rows",
            lambda: MCSELoss(backend="reference")(z1, z2, s1[:5], s2[:5], m[:5]),
            ValueError,
            "s1 must have 6 rows",
        ),
        (
            "mcse image_ids",
            lambda: MCSELoss(backend="reference")(z1, z2, s1, s2, m, image_ids=torch.zeros(4).long()),
            ValueError,
            "image_ids must have shape (6,)",
        ),
        (
            "mcseo phrase_object range",
            lambda: mcseo(phrase_object=torch.tensor([0, 1, 2, 3, 5, -100, 0])),
            ValueError,
            "phrase_object must hold indices in [0, 5) or -100 (ignored); got 5 at position 4",
        ),
        (
            "mcseo phrase_object shape",
            lambda: mcseo(phrase_object=ok[:6]),
            ValueError,
            "phrase_object must have shape (7,)",
        ),
        ("mcseo object width", lambda: mcseo(objects=objects[:, :3]), ValueError, "objects width 3"),
        (
            "mcseo object_groups",
            lambda: mcseo(object_groups=torch.zeros(4).long()),
            ValueError,
            "object_groups must have shape (5,)",
        ),
        (
            "kdmcse image_features rows",
            lambda: kd(z1, z2, s1, s2, m, t, fi[:5], ft),
            ValueError,
            "image_features must have 6 rows",
        ),
        (
            "kdmcse text_features rows",
            lambda: kd(z1, z2, s1, s2, m, t, fi, ft[:5]),
            ValueError,
            "text_features must have 6 rows",
        ),
        ("kdmcse v rows", lambda: kd(z1, z2, s1, s2, m[:5], t, fi, ft), ValueError, "v must have 6 rows"),
        ("kdmcse p2 width", lambda: kd(z1, z2, s1, s2[:, :3], m, t, fi, ft), ValueError, "p2 width 3"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_method_losses_name_their_arguments(index):
    _, call, error, text = _bad_calls()[index]
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value)
