"""The integrations on 2 and 3 gloo ranks against their peers on the same local inputs.

ClipLoss, for every (local_loss, gather_with_grad): every rank's loss and the gradients of its
features and of logit_scale equal OpenCLIP's ClipLoss on that rank (float64, 1e-10), and so do
the weight gradients of two DDP-wrapped towers after DDP's averaging. sentence-transformers'
MultipleNegativesRankingLoss with gather_across_devices: every rank's loss and embedding
gradients equal the peer's, with each hardness_mode too (reference backend). GISTEmbedLoss with
gather_across_devices for every contrast flag, with and without a hard negative. One spawn per
world size runs every case and writes each rank's largest relative error (or its traceback) to
a file.
"""

from __future__ import annotations

import datetime
import itertools
import socket
import traceback
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLDS = (2, 3)
CLIP_CASES = list(itertools.product((False, True), (False, True)))  # (local_loss, gather_with_grad)
ST_CASES = {
    "query_to_doc": (("query_to_doc",), "joint"),
    "all_joint": (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint"),
    "symmetric": (("query_to_doc", "doc_to_query"), "per_direction"),
}
HARDNESS_CASES = list(
    itertools.product(
        ("query_to_doc", "all_joint", "symmetric"), ("in_batch_negatives", "hard_negatives", "all_negatives")
    )
)
GIST_CASES = list(
    itertools.product((True, False), (True, False), (0, 1))
)  # contrast_anchors, contrast_positives, negatives
MARGIN_CASES = ("angular_fixed", "angular_teacher", "teacher_filtered")
LOCAL, WIDTH, TOL = 4, 6, 1e-10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relative(got: List[torch.Tensor], want: List[torch.Tensor]) -> float:
    return max(float((g - w).abs().max()) / max(float(w.abs().max()), 1e-3) for g, w in zip(got, want))


def _local_slice(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[rank * LOCAL : (rank + 1) * LOCAL].clone()


def _clip_features(world: int, rank: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(world * LOCAL, WIDTH, generator=g, dtype=torch.float64)
    text = F.normalize(image + torch.randn(world * LOCAL, WIDTH, generator=g, dtype=torch.float64), dim=1)
    return _local_slice(F.normalize(image, dim=1), rank), _local_slice(text, rank)


def _clip_case(world: int, rank: int, local_loss: bool, gather_with_grad: bool, seed: int) -> float:
    from mmloss.integrations.open_clip import ClipLoss
    from tests.integrations.support import open_clip_loss

    image, text = _clip_features(world, rank, seed)
    kwargs = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
    results = []
    for cls in (open_clip_loss().ClipLoss, ClipLoss):
        i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
        s = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
        loss = cls(**kwargs)(i, t, s)
        results.append([loss.detach(), *torch.autograd.grad(loss, (i, t, s))])
    return _relative(results[1], results[0])


class _Towers(torch.nn.Module):
    """Two linear towers and a learnable log scale, as a CLIP model's parts the loss touches."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(5, WIDTH, dtype=torch.float64)
        self.text = torch.nn.Linear(3, WIDTH, dtype=torch.float64)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x_image, x_text):
        return (F.normalize(self.image(x_image), dim=1), F.normalize(self.text(x_text), dim=1), self.logit_scale.exp())


def _clip_ddp_case(world: int, rank: int, local_loss: bool, gather_with_grad: bool, seed: int) -> float:
    from torch.nn.parallel import DistributedDataParallel

    from mmloss.integrations.open_clip import ClipLoss
    from tests.integrations.support import open_clip_loss

    g = torch.Generator().manual_seed(seed)
    x_image = _local_slice(torch.randn(world * LOCAL, 5, generator=g, dtype=torch.float64), rank)
    x_text = _local_slice(torch.randn(world * LOCAL, 3, generator=g, dtype=torch.float64), rank)
    kwargs = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
    grads = []
    for cls in (open_clip_loss().ClipLoss, ClipLoss):
        model = DistributedDataParallel(_Towers())
        loss = cls(**kwargs)(*model(x_image, x_text))
        loss.backward()  # DDP averages the weight gradients over the ranks here
        grads.append([p.grad.clone() for p in model.parameters()])
    return _relative(grads[1], grads[0])


def _st_case(world: int, rank: int, name: str, seed: int, hardness_mode=None) -> float:
    """MNRL with gather_across_devices; with a hardness_mode (strength 5), on the reference
    backend (the kernel backends do not all compute the penalty yet)."""
    from sentence_transformers.sentence_transformer import losses as st

    from mmloss.integrations import sentence_transformers as ml

    directions, partition_mode = ST_CASES[name]
    hardness = dict(hardness_mode=hardness_mode, hardness_strength=5.0 if hardness_mode else 0.0)
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(world * LOCAL, WIDTH, generator=g, dtype=torch.float64)
    columns = [anchors] + [
        anchors + torch.randn(world * LOCAL, WIDTH, generator=g, dtype=torch.float64) for _ in range(2)
    ]
    local = [_local_slice(c, rank) for c in columns]
    results = []
    for cls in (st.MultipleNegativesRankingLoss, ml.MultipleNegativesRankingLoss):
        embeddings = [c.clone().requires_grad_() for c in local]
        loss_fn = cls(
            None,
            scale=9.0,
            gather_across_devices=True,
            directions=directions,
            partition_mode=partition_mode,
            **hardness,
        )
        if hardness_mode and cls is ml.MultipleNegativesRankingLoss:
            loss_fn.backend = "reference"
        loss = loss_fn.compute_loss_from_embeddings(embeddings, None)
        results.append([loss.detach(), *torch.autograd.grad(loss, embeddings)])
    return _relative(results[1], results[0])


def _gist_case(
    world: int, rank: int, models, contrast_anchors: bool, contrast_positives: bool, negatives: int, seed: int
) -> float:
    """GISTEmbedLoss with gather_across_devices: positives and negatives of every rank are
    columns, the anchors of this rank only. Every rank's first anchor is a near duplicate of
    rank 0's: a false negative across ranks for the guide's filter."""
    from sentence_transformers.sentence_transformer import losses as st

    from mmloss.integrations import sentence_transformers as ml
    from tests.integrations.support import embeddings_as_features

    model, guide = models
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(world * LOCAL, WIDTH, generator=g, dtype=torch.float64)
    anchors[LOCAL::LOCAL] = anchors[0] + 0.1 * torch.randn(world - 1, WIDTH, generator=g, dtype=torch.float64)
    columns = [anchors] + [
        anchors + 0.8 * torch.randn(world * LOCAL, WIDTH, generator=g, dtype=torch.float64)
        for _ in range(1 + negatives)
    ]
    guide_columns = [c[:, :4] + 0.3 * torch.randn(world * LOCAL, 4, generator=g, dtype=torch.float64) for c in columns]
    local, guide_local = [_local_slice(c, rank) for c in columns], [_local_slice(c, rank) for c in guide_columns]
    kwargs = dict(
        temperature=0.05,
        margin_strategy="relative" if negatives else "absolute",
        margin=0.05,
        contrast_anchors=contrast_anchors,
        contrast_positives=contrast_positives,
        gather_across_devices=True,
    )
    results = []
    for cls in (st.GISTEmbedLoss, ml.GISTEmbedLoss):
        embeddings = [c.clone().requires_grad_() for c in local]
        features = [{"model": x, "guide": gx} for x, gx in zip(embeddings, guide_local)]
        with embeddings_as_features(model, guide):
            loss = cls(model, guide, **kwargs)(features, None)
        results.append([loss.detach(), *torch.autograd.grad(loss, embeddings)])
    return _relative(results[1], results[0])


def _margin_case(world: int, rank: int, name: str, seed: int) -> float:
    """AngularMarginMNRL / TeacherFilteredMNRL with gather_across_devices against the float64
    dense formula of tests/integrations/test_margin_losses.py on the global batch: this rank's
    loss is its rows' mean against every rank's documents; its gradients are those of the sum
    of every rank's loss (the gathered columns carry gradient to their owners)."""
    from mmloss.integrations import sentence_transformers as ml
    from tests.integrations.test_margin_losses import dense_loss

    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(world * LOCAL, WIDTH, generator=g, dtype=torch.float64)
    columns = [anchors] + [
        anchors + torch.randn(world * LOCAL, WIDTH, generator=g, dtype=torch.float64) for _ in range(2)
    ]
    teacher = [c[:, :4] + 0.5 * torch.randn(world * LOCAL, 4, generator=g, dtype=torch.float64) for c in columns]
    if name == "teacher_filtered":
        loss_fn = ml.TeacherFilteredMNRL(None, object(), 0.3, scale=9.0, gather_across_devices=True)
        options = dict(filter_teacher=teacher, threshold=0.3)
    else:
        adaptive = name == "angular_teacher"
        loss_fn = ml.AngularMarginMNRL(
            None, scale=9.0, margin=0.3, teacher=object() if adaptive else None, gather_across_devices=True
        )
        options = dict(margin=0.3, margin_teacher=teacher if adaptive else None)
    local = [_local_slice(c, rank).requires_grad_() for c in columns]
    local_teacher = [_local_slice(t, rank) for t in teacher] if name != "angular_fixed" else None
    loss = loss_fn.compute_loss_from_embeddings(local, None, local_teacher)
    got = [loss.detach(), *torch.autograd.grad(loss, local)]
    exact = [c.clone().requires_grad_() for c in columns]
    per_rank = []
    for s in range(world):
        rows = slice(s * LOCAL, (s + 1) * LOCAL)
        opts = dict(options)
        for key in ("margin_teacher", "filter_teacher"):
            if opts.get(key) is not None:
                opts[key] = [opts[key][0][rows]] + opts[key][1:]
        per_rank.append(dense_loss([exact[0][rows]] + exact[1:], 9.0, offset=s * LOCAL, **opts))
    grads = torch.autograd.grad(sum(per_rank), exact)
    want = [per_rank[rank].detach()] + [_local_slice(gr, rank) for gr in grads]
    return _relative(got, want)


def _worker(rank: int, world: int, port: int, out: str, model_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    cases = [(("clip",) + c, _clip_case, c) for c in CLIP_CASES]
    cases += [(("clip_ddp",) + c, _clip_ddp_case, c) for c in CLIP_CASES]
    cases += [(("st", name), _st_case, (name,)) for name in ST_CASES]
    cases += [(("st", name, mode), _st_case, (name, mode)) for name, mode in HARDNESS_CASES]
    cases += [(("margin", name), _margin_case, (name,)) for name in MARGIN_CASES]
    from tests.integrations.support import tiny_sentence_transformer

    models = (tiny_sentence_transformer(Path(model_dir)), tiny_sentence_transformer(Path(model_dir)))
    cases += [(("gist",) + c, lambda w, r, *a: _gist_case(w, r, models, *a), c) for c in GIST_CASES]
    for seed, (key, run, args) in enumerate(cases):
        try:
            if key[0] == "st" and len(key) == 3:  # the hardness cases: seed last, mode by keyword
                results[key] = run(world, rank, args[0], seed, hardness_mode=args[1])
                continue
            results[key] = run(world, rank, *args, seed)
        except Exception:  # recorded for the test that asks; the other ranks time out
            results[key] = traceback.format_exc()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()  # no rank tears gloo down while a peer still has a collective in flight
    dist.destroy_process_group()


_RESULTS: Dict[int, List[Dict]] = {}


def _results(world: int, tmp_path_factory) -> List[Dict]:
    """Every rank's results of the one spawn for `world` processes (run on first use)."""
    if world not in _RESULTS:
        from tests.train.support import tiny_bert

        out = tmp_path_factory.mktemp(f"integrations_world{world}")
        model_dir = tiny_bert(tmp_path_factory.mktemp("tiny_bert"))  # the GIST cases' model and guide
        mp.spawn(_worker, args=(world, _free_port(), str(out), str(model_dir)), nprocs=world)
        _RESULTS[world] = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    return _RESULTS[world]


def _check(world: int, key, tmp_path_factory) -> None:
    for rank, results in enumerate(_results(world, tmp_path_factory)):
        error = results[key]
        assert not isinstance(error, str), f"rank {rank} raised:\n{error}"
        assert error <= TOL, f"rank {rank}: relative error {error:.3g}"


@pytest.mark.parametrize("local_loss,gather_with_grad", CLIP_CASES)
@pytest.mark.parametrize("world", WORLDS)
def test_clip_loss_equals_open_clip_on_every_rank(world, local_loss, gather_with_grad, tmp_path_factory):
    _check(world, ("clip", local_loss, gather_with_grad), tmp_path_factory)


@pytest.mark.parametrize("local_loss,gather_with_grad", CLIP_CASES)
@pytest.mark.parametrize("world", WORLDS)
def test_clip_loss_ddp_gradients_equal_open_clip(world, local_loss, gather_with_grad, tmp_path_factory):
    _check(world, ("clip_ddp", local_loss, gather_with_grad), tmp_path_factory)


@pytest.mark.parametrize("name", list(ST_CASES))
@pytest.mark.parametrize("world", WORLDS)
def test_ranking_loss_gather_equals_sentence_transformers(world, name, tmp_path_factory):
    _check(world, ("st", name), tmp_path_factory)


@pytest.mark.parametrize("name,mode", HARDNESS_CASES)
@pytest.mark.parametrize("world", WORLDS)
def test_hardness_gather_equals_sentence_transformers(world, name, mode, tmp_path_factory):
    _check(world, ("st", name, mode), tmp_path_factory)


@pytest.mark.parametrize("contrast_anchors,contrast_positives,negatives", GIST_CASES)
@pytest.mark.parametrize("world", WORLDS)
def test_gist_gather_equals_sentence_transformers(
    world, contrast_anchors, contrast_positives, negatives, tmp_path_factory
):
    _check(world, ("gist", contrast_anchors, contrast_positives, negatives), tmp_path_factory)


@pytest.mark.parametrize("name", MARGIN_CASES)
@pytest.mark.parametrize("world", WORLDS)
def test_margin_losses_gather_equal_the_dense_formula(world, name, tmp_path_factory):
    _check(world, ("margin", name), tmp_path_factory)
