"""`mmloss.joint_contrastive_loss` against sentence-transformers' MultipleNegativesRankingLoss
(every direction, both partitions, hardness) and a dense float64 formula of GISTEmbedLoss's
four blocks, on the reference and the cpu backend."""

import math

import pytest
import torch
import torch.nn.functional as F

import mmloss
from mmloss import KeyBlock, joint_contrastive_loss
from mmloss.backends import unavailable_reason
from tests.cases import shifted_seed

BACKENDS = [b for b in ("reference", "cpu") if unavailable_reason(b, torch.device("cpu")) is None]
DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
TOL = dict(rtol=1e-11, atol=1e-12)


def _leaves(*shapes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(shifted_seed(seed))
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def mnrl_blocks(q, docs, directions, hardness=None):
    """sentence-transformers' directions as KeyBlocks: rows q (query-side) or the positive
    documents d (document-side); the row's own query / documents excluded as its -inf entries."""
    B, n = q.shape[0], len(docs)
    docs_all = torch.cat(docs)
    rows = torch.arange(B)
    penalty = {}
    if hardness is not None:
        mode, alpha = hardness
        negatives = {"in_batch_negatives": "others", "hard_negatives": "own", "all_negatives": "all"}[mode]
        owners = None if negatives == "all" else (rows, rows.repeat(n))
        penalty = dict(hardness_strength=alpha, hardness_negatives=negatives, hardness_owners=owners)
    make = {
        "query_to_doc": lambda: KeyBlock(q, docs_all, **penalty),
        "query_to_query": lambda: KeyBlock(q, q, exclude=(rows, rows)),
        "doc_to_query": lambda: KeyBlock(docs[0], q),
        "doc_to_doc": lambda: KeyBlock(docs[0], docs_all, exclude=(rows, rows.repeat(n))),
    }
    return [make[name]() for name in DIRECTIONS if name in directions]


def _st_mnrl(**kwargs):
    st = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    return st.MultipleNegativesRankingLoss(None, **kwargs)


CONFIGS = [
    (DIRECTIONS, "joint", 0, None),
    (DIRECTIONS, "joint", 2, None),
    (DIRECTIONS, "joint", 1, ("hard_negatives", 5.0)),
    (("query_to_doc", "query_to_query"), "joint", 1, ("in_batch_negatives", 9.0)),
    (("query_to_doc", "doc_to_doc"), "joint", 2, ("all_negatives", 2.0)),
    (("query_to_doc", "doc_to_query"), "per_direction", 0, None),
    (("query_to_doc", "doc_to_query"), "per_direction", 2, ("in_batch_negatives", 3.0)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("directions,partition,n_negatives,hardness", CONFIGS)
def test_equals_sentence_transformers_mnrl(backend, directions, partition, n_negatives, hardness):
    B, d = 7, 11
    q, *docs = _leaves((B, d), *[(B, d)] * (1 + n_negatives), seed=n_negatives + len(directions))
    st_kwargs = dict(scale=20.0, directions=directions, partition_mode=partition)
    if hardness is not None:
        st_kwargs.update(hardness_mode=hardness[0], hardness_strength=hardness[1])
    want = _st_mnrl(**st_kwargs).compute_loss_from_embeddings([q] + docs, None)
    want_grads = torch.autograd.grad(want, [q] + docs)
    got = joint_contrastive_loss(
        mnrl_blocks(q, docs, directions, hardness),
        temperature=0.05,
        partition="joint" if partition == "joint" else "per_block",
        backend=backend,
    )
    assert mmloss.last_backend() == backend
    got_grads = torch.autograd.grad(got, [q] + docs)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOL)


def _dense_blocks(blocks, positives, tau, partition):
    """Row losses (M,) from the dense cosines of each block, written out here."""
    lses, pos = [], None
    for b, block in enumerate(blocks):
        logits = F.normalize(block.rows, dim=-1) @ F.normalize(block.keys, dim=-1).T / tau
        if block.exclude is not None:
            logits = logits.masked_fill(block.exclude[0][:, None] == block.exclude[1][None, :], -math.inf)
        if block.filter_teacher is not None:
            fq, fk = block.filter_teacher
            scores = F.normalize(fq, dim=-1) @ F.normalize(fk, dim=-1).T
            drop = scores > block.filter_threshold[:, None]
            if b == 0:
                drop[torch.arange(len(positives)), positives] = False
            logits = logits.masked_fill(drop, -math.inf)
        lses.append(torch.logsumexp(logits, dim=1))
        if b == 0:
            pos = logits.gather(1, positives[:, None].clamp(min=0))[:, 0]
    stacked = torch.stack(lses)
    lse = torch.logsumexp(stacked, 0) if partition == "joint" else stacked.mean(0)
    return torch.where(positives >= 0, lse - pos, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("partition", ["joint", "per_block"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows_learnable_temperature_and_reductions(backend, partition, reduction):
    M, d = 9, 6
    rows_a, keys_a, rows_b, keys_b, keys_c = _leaves((M, d), (13, d), (M, d), (5, d), (M, d), seed=3)
    positives = torch.tensor([0, 12, -100, 4, 4, 7, -100, 1, 2])
    ids = torch.arange(M)
    blocks = [KeyBlock(rows_a, keys_a), KeyBlock(rows_b, keys_b), KeyBlock(rows_a, keys_c, exclude=(ids, ids))]
    leaves = [rows_a, keys_a, rows_b, keys_b, keys_c]
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    got = joint_contrastive_loss(
        blocks, positives=positives, temperature=tau, partition=partition, reduction=reduction, backend=backend
    )
    rows = _dense_blocks(blocks, positives, tau, partition)
    want = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / (positives >= 0).sum()}[reduction]
    torch.testing.assert_close(got, want, **TOL)
    upstream = torch.linspace(0.5, 1.5, got.numel(), dtype=torch.float64).reshape(got.shape)
    for a, b in zip(
        torch.autograd.grad((got * upstream).sum(), leaves + [tau]),
        torch.autograd.grad((want * upstream).sum(), leaves + [tau]),
    ):
        torch.testing.assert_close(a, b, **TOL)


def _gist_dense(anchor, positive, negative, ga, gp, gn, tau, margin, strategy):
    """GISTEmbedLoss's forward (sentence-transformers 6.x) in one process, its mask function
    copied: every block's columns above the row's guided anchor-positive score leave."""
    sim = lambda a, b: F.cosine_similarity(a[:, None], b[None, :], dim=-1)  # noqa: E731
    guided_ap = sim(ga, gp)
    g_pos = guided_ap.diagonal().view(-1, 1)

    def mask(guided, scores, positive_mask=None):
        threshold = g_pos - margin if strategy == "absolute" else g_pos - g_pos.abs() * margin
        drop = guided > threshold
        if positive_mask is not None:
            drop = drop & ~positive_mask
        return scores.masked_fill(drop, -math.inf)

    eye = torch.eye(anchor.shape[0], dtype=torch.bool)
    scores = [
        mask(guided_ap, sim(anchor, positive), eye),
        mask(sim(ga, ga), sim(anchor, anchor)),
        mask(sim(gp, gp), sim(positive, positive)),
        mask(sim(ga, gn), sim(anchor, negative)),
    ]
    return F.cross_entropy(torch.cat(scores, 1) / tau, torch.arange(anchor.shape[0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy,margin", [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.05)])
def test_gist_four_blocks_equal_the_dense_formula(backend, strategy, margin):
    B, d, dg = 8, 7, 5
    anchor, positive, negative = _leaves((B, d), (B, d), (B, d), seed=4)
    ga, gp, gn = (x.detach() for x in _leaves((B, dg), (B, dg), (B, dg), seed=5))
    g_pos = F.cosine_similarity(ga, gp, dim=-1)
    threshold = g_pos - margin if strategy == "absolute" else g_pos - g_pos.abs() * margin
    guided = dict(filter_threshold=threshold, filter_normalize=True)
    blocks = [
        KeyBlock(anchor, positive, filter_teacher=(ga, gp), **guided),
        KeyBlock(anchor, anchor, filter_teacher=(ga, ga), **guided),
        KeyBlock(positive, positive, filter_teacher=(gp, gp), **guided),
        KeyBlock(anchor, negative, filter_teacher=(ga, gn), **guided),
    ]
    got = joint_contrastive_loss(blocks, temperature=0.01, backend=backend)
    want = _gist_dense(anchor, positive, negative, ga, gp, gn, 0.01, margin, strategy)
    torch.testing.assert_close(got, want, **TOL)
    leaves = [anchor, positive, negative]
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(a, b, **TOL)


def test_one_block_is_contrastive_loss():
    q, k = _leaves((6, 4), (9, 4), seed=6)
    positives = torch.tensor([0, 8, 3, -100, 2, 2])
    for partition in ("joint", "per_block"):
        torch.testing.assert_close(
            joint_contrastive_loss([KeyBlock(q, k, margin=0.2)], positives=positives, partition=partition),
            mmloss.contrastive_loss(q, k, positives=positives, margin=0.2, backend="reference"),
            **TOL,
        )


def test_fp32_per_block_meets_the_float64_answer():
    """fp32 on the cpu backend (the host-side positive term included) within fp32 rounding."""
    if "cpu" not in BACKENDS:
        pytest.skip("needs the compiled cpu backend")
    q, d0, d1 = _leaves((33, 24), (33, 24), (33, 24), seed=7)
    results = []
    for dtype, backend in ((torch.float64, "reference"), (torch.float32, "cpu")):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, d0, d1)]
        blocks = [KeyBlock(leaves[0], torch.cat(leaves[1:])), KeyBlock(leaves[1], leaves[0])]
        loss = joint_contrastive_loss(blocks, partition="per_block", backend=backend)
        results.append([loss, *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*results):
        torch.testing.assert_close(b.double(), a, rtol=1e-5, atol=1e-6)


q4, k5 = torch.randn(4, 3), torch.randn(5, 3)
BAD = [
    (dict(blocks=[]), TypeError, "blocks must be a non-empty sequence"),
    (dict(blocks=KeyBlock(q4, k5)), TypeError, "blocks must be a non-empty sequence"),
    (dict(blocks=[(q4, k5)]), TypeError, "blocks[0]: must be a mmloss.KeyBlock"),
    (dict(partition="per_direction"), ValueError, "partition must be one of"),
    (dict(blocks=[KeyBlock(q4, k5, exclude=(torch.arange(4), torch.arange(5)))]), ValueError, "blocks[0]: exclude"),
    (
        dict(blocks=[KeyBlock(q4, k5), KeyBlock(q4, k5, key_groups=torch.arange(5))]),
        ValueError,
        "blocks[1]: key_groups",
    ),
    (dict(blocks=[KeyBlock(q4, k5), KeyBlock(q4[:3], k5)]), ValueError, "blocks[1].rows has 3 rows"),
    (dict(blocks=[KeyBlock(q4, k5), KeyBlock(q4.double(), k5.double())]), TypeError, "blocks[1].rows dtype"),
    (dict(blocks=[KeyBlock(q4, k5), KeyBlock(q4, k5[:, :2])]), ValueError, "blocks[1]: keys width"),
    (
        dict(blocks=[KeyBlock(q4, k5), KeyBlock(q4, k5, exclude=(torch.arange(4), torch.arange(4)))]),
        ValueError,
        "blocks[1]: exclude[1] must have shape (5,)",
    ),
    (dict(blocks=[KeyBlock(q4, k5, filter_threshold=0.3)]), ValueError, "blocks[0]: filter_threshold was given"),
    (dict(blocks=[KeyBlock(q4, k5, local_keys=True)]), ValueError, "local_keys is only used with global_negatives"),
    (dict(positives=torch.tensor([0, 1, 2, 9])), ValueError, "blocks[0]: positives must be column indices"),
]


@pytest.mark.parametrize("overrides,error,text", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_names_the_argument(overrides, error, text):
    args = dict(blocks=[KeyBlock(q4, k5), KeyBlock(q4, q4)], backend="reference")
    args.update(overrides)
    with pytest.raises(error) as info:
        joint_contrastive_loss(args.pop("blocks"), **args)
    assert text in str(info.value)
