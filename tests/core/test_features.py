"""docs/contract.md §3 in the reference backend and the block contract (mmloss.blockwise),
against sentence-transformers' own classes and direct formulas written here."""

import math

import pytest
import torch
import torch.nn.functional as F

import mmloss
from mmloss import blockwise
from mmloss.autograd import ContrastiveRows, inverse_temperature
from mmloss.reference import contrastive_loss_reference as reference
from tests.cases import problem_of, shifted_seed


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(shifted_seed(seed))
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


@pytest.mark.parametrize(
    "mode,negatives", [("in_batch_negatives", "others"), ("hard_negatives", "own"), ("all_negatives", "all")]
)
@pytest.mark.parametrize("n_negatives", [0, 2])
def test_hardness_equals_sentence_transformers(mode, negatives, n_negatives):
    """MNRL's hardness_mode: the owner of every document column is its query's index."""
    st = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    B, d = 6, 9
    q, *docs = _leaves((B, d), *[(B, d)] * (1 + n_negatives), seed=n_negatives)
    loss = st.MultipleNegativesRankingLoss(None, scale=20.0, hardness_mode=mode, hardness_strength=5.0)
    want = loss.compute_loss_from_embeddings([q] + docs, None)
    want_grads = torch.autograd.grad(want, [q] + docs)
    keys = torch.cat(docs)
    owners = None if negatives == "all" else (torch.arange(B), torch.arange(B).repeat(1 + n_negatives))
    got = mmloss.contrastive_loss(
        q,
        keys,
        temperature=0.05,
        hardness_strength=5.0,
        hardness_negatives=negatives,
        hardness_owners=owners,
        backend="reference",
    )
    got_q, got_k = torch.autograd.grad(got, [q, keys])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_q, want_grads[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_k, torch.cat(want_grads[1:]), rtol=1e-12, atol=1e-12)


def test_hardness_gradient_flows_through_the_scale_term_only():
    """logit = c/τ + α·sg(c): ∂loss/∂c_ij = (P_ij - [j = pos])/τ with P from the penalised
    logits, and d/dτ sees c only."""
    q, k = _leaves((4, 5), (7, 5), seed=1)
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    got = reference(q, k, positives=torch.tensor([0, 3, 6, 2]), temperature=tau, hardness_strength=3.0)
    grads = torch.autograd.grad(got, [q, k, tau])
    c = _unit(q) @ _unit(k).T
    penalty = 3.0 * c.detach()
    penalty[torch.arange(4), torch.tensor([0, 3, 6, 2])] = 0.0
    want = F.cross_entropy(c / tau + penalty, torch.tensor([0, 3, 6, 2]))
    for g, w in zip(grads, torch.autograd.grad(want, [q, k, tau])):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def _multi_positive_loss(q, k, positives, groups, tau, removed=None):
    """-(1/|P_i|) Σ_{p∈P_i} log softmax_i(p), row by row (supervised contrastive L_out)."""
    logits = _unit(q) @ _unit(k).T / tau
    losses = []
    for i in range(q.shape[0]):
        if positives[i] < 0:
            continue
        members = groups == groups[positives[i]]
        keep = torch.ones_like(members) if removed is None else ~removed[i] | members
        log_p = logits[i] - torch.logsumexp(logits[i][keep], 0)
        losses.append(-log_p[members].mean())
    return torch.stack(losses).mean()


def test_multi_positive_equals_the_mean_over_the_group():
    q, k = _leaves((6, 4), (11, 4), seed=2)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5])
    positives = torch.tensor([0, 2, -100, 6, 8, 10])
    got = reference(q, k, positives=positives, key_groups=groups, multi_positive=True, temperature=0.2)
    want = _multi_positive_loss(q, k, positives, groups, 0.2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, [q, k]), torch.autograd.grad(want, [q, k])):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_multi_positive_filter_and_margin_never_touch_positives():
    """A filter that would drop every column and a margin change the negatives only."""
    q, k = _leaves((5, 3), (8, 3), seed=3)
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    positives = torch.tensor([1, 2, 5, 6, 7])
    fq, fk = torch.randn(5, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    scores = fq @ fk.T
    got = reference(
        q,
        k,
        positives=positives,
        key_groups=groups,
        multi_positive=True,
        filter_teacher=(fq, fk),
        filter_threshold=0.1,
        temperature=0.2,
    )
    want = _multi_positive_loss(q, k, positives, groups, 0.2, removed=scores > 0.1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # One column per group: the plain loss.
    single = torch.arange(8)
    torch.testing.assert_close(
        reference(q, k, positives=positives, key_groups=single, multi_positive=True, margin=0.2),
        reference(q, k, positives=positives, margin=0.2),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("normalize", [False, True])
def test_row_thresholds_drop_negatives_above_each_row_s_threshold(normalize):
    q, k = _leaves((5, 4), (9, 4), seed=4)
    fq, fk = torch.randn(5, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    scores = (_unit(fq) @ _unit(fk).T) if normalize else fq @ fk.T
    threshold = scores.median(dim=1).values + 1e-3  # half of each row's columns go
    positives = torch.tensor([0, 8, 2, 5, 4])
    got = reference(
        q,
        k,
        positives=positives,
        filter_teacher=(fq, fk),
        filter_threshold=threshold,
        filter_normalize=normalize,
        reduction="none",
    )
    logits = (_unit(q) @ _unit(k).T / 0.05).masked_fill(scores > threshold[:, None], -math.inf)
    logits[torch.arange(5), positives] = (_unit(q) @ _unit(k).T / 0.05)[torch.arange(5), positives]
    torch.testing.assert_close(got, F.cross_entropy(logits, positives, reduction="none"), rtol=1e-12, atol=1e-12)
    # A scalar threshold and the same value per row agree.
    flat = dict(positives=positives, filter_teacher=(fq, fk), filter_normalize=normalize)
    torch.testing.assert_close(
        reference(q, k, filter_threshold=0.3, **flat), reference(q, k, filter_threshold=torch.full((5,), 0.3), **flat)
    )


def test_gist_relative_threshold_equals_sentence_transformers_mask():
    """GISTEmbedLoss's ap block: t_i = g_ii - |g_ii|·m (relative); the guide's cosine."""
    anchor, positive = _leaves((6, 5), (6, 5), seed=5)
    ga, gp = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    guided = F.cosine_similarity(ga[:, None], gp[None, :], dim=-1)
    g_pos = guided.diagonal()
    threshold = g_pos - g_pos.abs() * 0.1
    sim = F.cosine_similarity(anchor[:, None], positive[None, :], dim=-1)
    mask = (guided > threshold[:, None]) & ~torch.eye(6, dtype=torch.bool)
    want = F.cross_entropy(sim.masked_fill(mask, -math.inf) / 0.01, torch.arange(6))
    got = mmloss.contrastive_loss(
        anchor,
        positive,
        temperature=0.01,
        filter_teacher=(ga, gp),
        filter_threshold=threshold,
        filter_normalize=True,
        backend="reference",
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_nan_row_threshold_gives_a_nan_row():
    q, k = _leaves((3, 4), (3, 4), seed=6)
    fq, fk = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    threshold = torch.tensor([0.5, math.nan, 0.5])
    kwargs = dict(filter_teacher=(fq, fk), filter_threshold=threshold, reduction="none")
    rows = reference(q, k, **kwargs)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
    rows = _block_rows(q, k, 20.0, **kwargs)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
    if mmloss.backends.unavailable_reason("cpu", q.device) is None:  # the lifted form in a kernel
        rows = mmloss.contrastive_loss(q, k, backend="cpu", **kwargs)
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def _block_rows(q, k, inv_temp, **kwargs):
    """Row losses through the kernel block contract of the reference backend (mmloss.blockwise:
    the path of global negatives), on the problem the public checks build."""
    temperature = 1.0 / inv_temp if not torch.is_tensor(inv_temp) else 1.0
    problem = problem_of(q, k, temperature=temperature, **{"reduction": "none", "backend": "reference", **kwargs})
    return ContrastiveRows.apply(q, k, inv_temp, problem, blockwise)


FEATURE_CALLS = {
    "hardness_all": dict(hardness_strength=4.0),
    "hardness_others": dict(hardness_strength=2.0, hardness_negatives="others", owners=True),
    "hardness_own": dict(hardness_strength=6.0, hardness_negatives="own", owners=True, margin=0.2),
    "multi_positive": dict(multi_positive=True, groups=True, ignore=True, margin=0.15),
    "multi_positive_filter": dict(multi_positive=True, groups=True, filter=True, hardness_strength=1.5),
    "row_threshold": dict(filter=True, row_threshold=True, groups=True),
    "row_threshold_normalized": dict(filter=True, row_threshold=True, filter_normalize=True),
}


def feature_kwargs(spec, M, N, g):
    """The public arguments of one FEATURE_CALLS entry on fresh random teachers and labels."""
    public = ("hardness_strength", "hardness_negatives", "multi_positive", "margin")
    kwargs = {name: spec[name] for name in public if name in spec}
    positives = torch.randint(0, N, (M,), generator=g)
    if spec.get("ignore"):
        positives[1::3] = mmloss.IGNORE_INDEX
    kwargs["positives"] = positives
    if spec.get("owners"):
        kwargs["hardness_owners"] = (torch.randint(0, 3, (M,), generator=g), torch.randint(-1, 3, (N,), generator=g))
    if spec.get("groups"):
        kwargs["key_groups"] = torch.randint(0, max(1, N // 3), (N,), generator=g)
    if spec.get("filter"):
        fq, fk = (
            torch.randn(M, 3, generator=g, dtype=torch.float64),
            torch.randn(N, 3, generator=g, dtype=torch.float64),
        )
        kwargs.update(filter_teacher=(fq, fk), filter_normalize=spec.get("filter_normalize", False))
        kwargs["filter_threshold"] = 0.2 + 0.5 * torch.rand(M, generator=g, dtype=torch.float64)
        if not spec.get("row_threshold"):
            kwargs["filter_threshold"] = 0.4
    return kwargs


@pytest.mark.parametrize("features", list(FEATURE_CALLS))
@pytest.mark.parametrize("M,N,d", [(1, 1, 2), (7, 11, 5), (13, 5, 3)])
def test_block_contract_equals_reference(features, M, N, d):
    """mmloss.blockwise (forward lse and weighted positives, backward with the given lse) gives
    the dense reference's row losses and gradients: the contract every kernel backend serves."""
    g = torch.Generator().manual_seed(shifted_seed(M * 100 + N + d))
    kwargs = feature_kwargs(FEATURE_CALLS[features], M, N, g)
    q = torch.randn(M, d, generator=g, dtype=torch.float64)
    k = torch.randn(N, d, generator=g, dtype=torch.float64)
    q = (q + 1.2 * k[kwargs["positives"].clamp(min=0)]).requires_grad_()
    k.requires_grad_()
    tau = torch.tensor(0.15, dtype=torch.float64, requires_grad=True)
    want = reference(q, k, temperature=tau, reduction="none", **kwargs)
    got = _block_rows(q, k, inverse_temperature(tau), **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.linspace(0.5, 1.5, M, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad((got * upstream).sum(), [q, k, tau]),
        torch.autograd.grad((want * upstream).sum(), [q, k, tau]),
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
