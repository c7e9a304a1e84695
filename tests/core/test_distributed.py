"""Global negatives on CPU with gloo: 2 and 3 processes equal one process on the whole batch.

One spawn per world size runs every case (feature set × mode × backend) and writes each
rank's largest error to a file; the parametrised tests below read them. Local batch sizes
differ between ranks. Convention checked (mmloss.distributed): the loss value on every rank is
the single-process loss; the embedding gradients are W × the single-process ones and the
temperature gradients average over ranks to the single-process one (reduction "none":
unscaled, summed over ranks).
"""

from __future__ import annotations

import datetime
import socket
import time
import traceback
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmloss
import mmloss.losses
from mmloss.backends import unavailable_reason
from tests.cases import off_the_scores, row_threshold, shifted_seed, threshold_between

# CPU tensors here: the Triton interpreter has its own suites (tests/test_triton_*.py).
BACKENDS = [b for b in ("reference", "cpu") if unavailable_reason(b, torch.device("cpu")) is None]
MODES = ("gather", "ring")
# Local (rows, keys) per rank; symmetric cases use rows for both.
LAYOUTS = {2: ((3, 5), (4, 6)), 3: ((2, 4, 3), (3, 4, 5))}
CASES = {
    "plain": {"fixed_temperature": True},
    "margin": {"margin": 0.15},
    "adaptive_margin": {"margin": 0.3, "adaptive": True},
    "filter": {"filter": True},
    "groups": {"groups": True},
    "all_ignore": {"margin": 0.2, "adaptive": True, "filter": True, "groups": True, "ignore": True},
    "symmetric": {"symmetric": True, "margin": 0.2, "adaptive": True, "filter": True, "groups": True},
    "sum": {"reduction": "sum", "margin": 0.1, "groups": True},
    "none": {"reduction": "none", "filter": True, "groups": True},
    "float32": {"dtype": torch.float32, "margin": 0.2, "adaptive": True, "groups": True},
    # docs/contract.md §3 (a backend that rejects one by name is skipped)
    "hardness": {"hardness": "others", "margin": 0.1, "ignore": True},
    "hardness_own": {"hardness": "own", "groups": True},
    "multi_positive": {"multi_positive": True, "groups": True, "ignore": True, "margin": 0.1},
    "row_threshold": {"filter": True, "row_threshold": True, "groups": True},
}
METHODS = ("kdmcse", "mcseo")
# Relative to magnitudes above 1. In float32 the temperature gradient, a cancelling sum
# scaled by 1/τ², differs by ~2e-5 between one process and a ring (other summation order).
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offsets(sizes) -> List[int]:
    return [sum(sizes[:r]) for r in range(len(sizes) + 1)]


def _global_batch(spec: Dict, rows: Tuple[int, ...], keys: Tuple[int, ...], seed: int):
    """The whole batch (float64) as one process sees it: query, key, global positives (or
    None for symmetric), kwargs; every row's positive lies in its own rank's keys."""
    g = torch.Generator().manual_seed(shifted_seed(seed))
    if spec.get("symmetric"):
        keys = rows
    row_off, key_off = _offsets(rows), _offsets(keys)
    M, N, d = row_off[-1], key_off[-1], 6
    key = torch.randn(N, d, generator=g, dtype=torch.float64)
    positives = None
    pos = torch.arange(M)
    if not spec.get("symmetric"):
        pos = torch.cat([key_off[r] + torch.randint(0, keys[r], (rows[r],), generator=g) for r in range(len(rows))])
        positives = pos.clone()
    query = torch.randn(M, d, generator=g, dtype=torch.float64) + 1.5 * key[pos]
    if spec.get("ignore"):
        positives[torch.rand(M, generator=g) < 0.3] = mmloss.IGNORE_INDEX
        positives[0] = pos[0]
    kwargs = {
        "margin": spec.get("margin", 0.0),
        "symmetric": spec.get("symmetric", False),
        "reduction": spec.get("reduction", "mean"),
    }
    if spec.get("adaptive"):
        kwargs["margin_teacher"] = (
            torch.randn(M, 5, generator=g, dtype=torch.float64),
            torch.randn(N, 5, generator=g, dtype=torch.float64),
        )
    if spec.get("filter"):
        fq, fk = (
            torch.randn(M, 7, generator=g, dtype=torch.float64),
            torch.randn(N, 7, generator=g, dtype=torch.float64),
        )
        threshold = off_the_scores(fq @ fk.T, 1.5)
        if spec.get("row_threshold"):
            threshold = torch.tensor([row_threshold(row, 0.5) for row in fq @ fk.T], dtype=torch.float64)
        kwargs.update(filter_teacher=(fq, fk), filter_threshold=threshold)
    if spec.get("groups"):
        kwargs["key_groups"] = torch.randint(0, 4, (N,), generator=g)  # labels shared across ranks
    if spec.get("multi_positive"):
        kwargs["multi_positive"] = True
    if spec.get("hardness"):
        owners = torch.randint(0, 3, (M,), generator=g), torch.randint(-1, 3, (N,), generator=g)  # global ids
        kwargs.update(hardness_strength=4.0, hardness_negatives=spec["hardness"], hardness_owners=owners)
    return query, key, positives, kwargs, keys


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference, relative to the largest magnitude when that is above 1."""
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def _loss_and_grads(query, key, temperature, kwargs, upstream, **options):
    q = query.clone().requires_grad_(True)
    k = key.clone().requires_grad_(True)
    t = temperature if isinstance(temperature, float) else temperature.clone().requires_grad_(True)
    loss = mmloss.contrastive_loss(q, k, temperature=t, **kwargs, **options)
    inputs = (q, k) if isinstance(t, float) else (q, k, t)
    grads = torch.autograd.grad((loss * upstream).sum(), inputs)
    return loss.detach(), grads


def _run_case(rank: int, world: int, name: str, backend: str, mode: str, seed: int, group=None) -> float:
    """Largest error of this rank's loss and gradients against the single-process run;
    `rank` and `world` are those within `group` (default: the world)."""
    spec = CASES[name]
    rows, keys = LAYOUTS[world]
    query, key, positives, kwargs, keys = _global_batch(spec, rows, keys, seed)
    dtype = spec.get("dtype", torch.float64)
    query, key = query.to(dtype), key.to(dtype)
    temperature = 0.07 if spec.get("fixed_temperature") else torch.tensor(0.07, dtype=dtype)
    none = kwargs["reduction"] == "none"
    upstream = torch.linspace(0.5, 1.5, query.shape[0], dtype=dtype) if none else torch.tensor(1.0, dtype=dtype)
    whole = dict(kwargs, positives=positives)
    single_loss, single_grads = _loss_and_grads(query, key, temperature, whole, upstream, backend=backend)

    row_off, key_off = _offsets(rows), _offsets(keys)
    rs, ks = slice(row_off[rank], row_off[rank + 1]), slice(key_off[rank], key_off[rank + 1])
    local = dict(kwargs)
    if positives is not None:
        p = positives[rs]
        local["positives"] = torch.where(p >= 0, p - key_off[rank], p)
    for pair in ("margin_teacher", "filter_teacher", "hardness_owners"):
        if pair in kwargs:
            local[pair] = (kwargs[pair][0][rs], kwargs[pair][1][ks])
    if isinstance(kwargs.get("filter_threshold"), torch.Tensor):
        local["filter_threshold"] = kwargs["filter_threshold"][rs]
    if "key_groups" in kwargs:
        local["key_groups"] = kwargs["key_groups"][ks]
    loss, grads = _loss_and_grads(
        query[rs],
        key[ks],
        temperature,
        local,
        upstream[rs] if none else upstream,
        backend=backend,
        global_negatives=mode,
        process_group=group,
    )
    scale = 1.0 if none else float(world)
    pairs = [
        (loss, single_loss[rs] if none else single_loss),
        (grads[0] / scale, single_grads[0][rs]),
        (grads[1] / scale, single_grads[1][ks]),
    ]
    if len(grads) == 3:
        d_temp = grads[2].clone()
        dist.all_reduce(d_temp, group=group)
        pairs.append((d_temp / scale, single_grads[2]))
    return max(_error(got, want) for got, want in pairs)


JOINT_CASES = {
    "mnrl_joint": {"blocks": "mnrl", "directions": 4, "partition": "joint", "reduction": "mean"},
    "mnrl_hardness": {"blocks": "mnrl", "directions": 4, "partition": "joint", "hardness": "own", "reduction": "none"},
    "mnrl_per_block": {
        "blocks": "mnrl",
        "directions": 2,
        "partition": "per_block",
        "ignore": True,
        "reduction": "none",
    },
    "gist": {"blocks": "gist", "partition": "joint", "reduction": "none"},
}


def _joint_data(world: int, seed: int):
    """Per-rank float64 tensors of a joint case: queries/anchors q, positive documents d0,
    negatives d1, and guide features gq, g0, g1 (each a list over ranks)."""
    g = torch.Generator().manual_seed(shifted_seed(seed))
    rows = LAYOUTS[world][0]
    data = {name: [torch.randn(n, 5, generator=g, dtype=torch.float64) for n in rows] for name in ("d0", "d1")}
    data["q"] = [d + torch.randn(d.shape, generator=g, dtype=torch.float64) for d in data["d0"]]
    for guide, base in (("gq", "q"), ("g0", "d0"), ("g1", "d1")):
        data[guide] = [
            x[:, :4] + 0.5 * torch.randn(x.shape[0], 4, generator=g, dtype=torch.float64) for x in data[base]
        ]
    return data


def _joint_blocks(spec, data, r: int, key_ranks: List[int], distributed: bool):
    """Rank r's KeyBlocks with the columns of `key_ranks` (all ranks in one process, [r] with
    global negatives), and block 0's positives in those columns."""
    from mmloss import KeyBlock

    sizes = [x.shape[0] for x in data["q"]]
    gid = [torch.arange(sum(sizes[:s]), sum(sizes[: s + 1])) for s in range(len(sizes))]
    cat = lambda name, ranks: torch.cat([data[name][s] for s in ranks])  # noqa: E731
    q, d0 = data["q"][r], data["d0"][r]
    if spec["blocks"] == "gist":
        g_pos = torch.nn.functional.cosine_similarity(data["gq"][r], data["g0"][r], dim=-1)
        guided = dict(filter_threshold=g_pos - 0.05, filter_normalize=True)
        blocks = [
            KeyBlock(q, cat("d0", key_ranks), filter_teacher=(data["gq"][r], cat("g0", key_ranks)), **guided),
            KeyBlock(q, q, filter_teacher=(data["gq"][r], data["gq"][r]), local_keys=distributed, **guided),
            KeyBlock(d0, cat("d0", key_ranks), filter_teacher=(data["g0"][r], cat("g0", key_ranks)), **guided),
            KeyBlock(q, cat("d1", key_ranks), filter_teacher=(data["gq"][r], cat("g1", key_ranks)), **guided),
        ]
        offset = sum(sizes[s] for s in key_ranks if s < r)
        return blocks, offset + torch.arange(sizes[r])
    docs = lambda ranks: torch.cat([torch.cat([data["d0"][s], data["d1"][s]]) for s in ranks])  # noqa: E731
    doc_owners = lambda ranks: torch.cat([gid[s].repeat(2) for s in ranks])  # noqa: E731
    penalty = {}
    if spec.get("hardness"):
        penalty = dict(hardness_strength=5.0, hardness_negatives=spec["hardness"])
        penalty["hardness_owners"] = (gid[r], doc_owners(key_ranks))
    blocks = [KeyBlock(q, docs(key_ranks), **penalty)]
    if spec["directions"] == 4:
        blocks.append(KeyBlock(q, cat("q", key_ranks), exclude=(gid[r], torch.cat([gid[s] for s in key_ranks]))))
    blocks.append(KeyBlock(d0, cat("q", key_ranks)))
    if spec["directions"] == 4:
        blocks.append(KeyBlock(d0, docs(key_ranks), exclude=(gid[r], doc_owners(key_ranks))))
    offset = sum(2 * sizes[s] for s in key_ranks if s < r)
    positives = offset + torch.arange(sizes[r])
    if spec.get("ignore") and r == len(sizes) - 1:
        positives[0] = mmloss.IGNORE_INDEX
    return blocks, positives


def _run_joint(rank: int, world: int, name: str, backend: str, mode: str, seed: int) -> float:
    """Largest error of rank `rank`'s joint_contrastive_loss rows (or mean) and gradients with
    global negatives against one process computing every rank's rows against all columns."""
    spec = JOINT_CASES[name]
    raw = _joint_data(world, seed)
    reduction, ranks = spec["reduction"], list(range(world))
    options = dict(temperature=None, partition=spec["partition"], backend=backend)

    def leaves(which):
        return {k: [x.clone().requires_grad_(s in which) for s, x in enumerate(v)] for k, v in raw.items()}

    learnt = ("q", "d0", "d1")
    data, tau = leaves(ranks), torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    single = []
    for r in ranks:
        blocks, positives = _joint_blocks(spec, data, r, ranks, False)
        single.append(
            mmloss.joint_contrastive_loss(
                blocks, positives=positives, **dict(options, temperature=tau), reduction="none"
            )
        )
    upstream = [torch.linspace(0.5, 1.5, x.shape[0], dtype=torch.float64) for x in single]
    valid = sum(int((_joint_blocks(spec, data, r, ranks, False)[1] >= 0).sum()) for r in ranks)
    if reduction == "none":
        total = sum((u * x).sum() for u, x in zip(upstream, single))
    else:
        total = sum(x.sum() for x in single) / valid
    wanted = [data[k][rank] for k in learnt]
    single_grads = torch.autograd.grad(total, wanted + [tau])

    mine, my_tau = leaves([rank]), torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    blocks, positives = _joint_blocks(spec, mine, rank, [rank], True)
    loss = mmloss.joint_contrastive_loss(
        blocks, positives=positives, **dict(options, temperature=my_tau), reduction=reduction, global_negatives=mode
    )
    scale = 1.0 if reduction == "none" else float(world)
    objective = (upstream[rank] * loss).sum() if reduction == "none" else loss
    grads = list(torch.autograd.grad(objective, [mine[k][rank] for k in learnt] + [my_tau]))
    dist.all_reduce(grads[-1])
    want_value = single[rank].detach() if reduction == "none" else total.detach()
    pairs = [(loss.detach(), want_value)] + [(got / scale, want) for got, want in zip(grads, single_grads)]
    return max(_error(got, want) for got, want in pairs)


def _method_inputs(method: str, world: int, seed: int):
    """The whole batch of a method module and each rank's share of it: (module kwargs, input
    dict, {input name: per-rank slices}, {index input: (what it indexes)})."""
    g = torch.Generator().manual_seed(shifted_seed(seed))
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    rows = LAYOUTS[world][0]
    n = sum(rows)
    captions = [slice(a, b) for a, b in zip(_offsets(rows), _offsets(rows)[1:])]
    image = torch.randint(0, 4, (n,), generator=g)  # global image ids, shared across ranks
    base, features = rand(4, 8)[image], rand(4, 12)[image]
    x = {"z1": rand(n, 6), "z2": rand(n, 6), "s1": base + rand(n, 8), "s2": base + rand(n, 8), "m": base}
    shares = {name: captions for name in x}
    if method == "kdmcse":
        text = features + 0.8 * rand(n, 12)
        x = {"z1": x["z1"], "z2": x["z2"], "p1": x["s1"], "p2": x["s2"], "v": x["m"]}
        shares = {name: captions for name in x}
        x.update(t=base + rand(n, 8), image_features=features, text_features=text, image_ids=image)
        shares.update(t=captions, image_features=captions, text_features=captions, image_ids=captions)
        threshold = threshold_between(text @ features.T)
        return {"filter_threshold": threshold}, x, shares, {}
    objects = (3, 5) if world == 2 else (2, 4, 3)
    phrases = tuple(k + 1 for k in objects)
    o_off, p_off = _offsets(objects), _offsets(phrases)
    local_match = [torch.randint(0, k, (p,), generator=g) for k, p in zip(objects, phrases)]
    match = torch.cat([o_off[r] + local_match[r] for r in range(world)])
    x.update(objects=rand(o_off[-1], 8), object_groups=torch.randint(0, 3, (o_off[-1],), generator=g))
    x.update(phrases=x["objects"][match] + rand(p_off[-1], 8), phrase_object=match, image_ids=image)
    object_slices = [slice(a, b) for a, b in zip(o_off, o_off[1:])]
    phrase_slices = [slice(a, b) for a, b in zip(p_off, p_off[1:])]
    shares.update(
        objects=object_slices,
        object_groups=object_slices,
        phrases=phrase_slices,
        phrase_object=phrase_slices,
        image_ids=captions,
    )
    return {"op_weight": 0.5}, x, shares, {"phrase_object": o_off}


def _run_method(rank: int, world: int, method: str, backend: str, mode: str, seed: int) -> float:
    """Largest error of a method module's total and gradients on this rank against one process."""
    module_kwargs, x, shares, index_offsets = _method_inputs(method, world, seed)
    cls = mmloss.losses.KDMCSELoss if method == "kdmcse" else mmloss.losses.MCSEOLoss
    learnt = [k for k in ("z1", "z2", "s1", "s2", "m", "p1", "p2", "v", "t", "phrases", "objects") if k in x]

    def total_and_grads(inputs, **options):
        inputs = {k: v.clone().requires_grad_(k in learnt) for k, v in inputs.items()}
        total = cls(**module_kwargs, backend=backend, **options)(**inputs).total
        return total.detach(), torch.autograd.grad(total, [inputs[k] for k in learnt])

    single_total, single_grads = total_and_grads(x)
    local = {k: v[shares[k][rank]] for k, v in x.items()}
    for k, offsets in index_offsets.items():
        local[k] = local[k] - offsets[rank]
    total, grads = total_and_grads(local, global_negatives=mode)
    errors = [_error(got / world, want[shares[k][rank]]) for k, got, want in zip(learnt, grads, single_grads)]
    return max([_error(total, single_total)] + errors)


def _worker(rank: int, world: int, port: int, out: str, backends: List[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    for seed, name in enumerate(CASES):
        for backend in backends:
            for mode in MODES:
                try:
                    results[name, backend, mode] = _run_case(rank, world, name, backend, mode, seed)
                except Exception:  # recorded for the test that asks; the other ranks time out
                    results[name, backend, mode] = traceback.format_exc()
    for seed, name in enumerate(JOINT_CASES):
        for backend in backends:
            for mode in MODES:
                try:
                    results[name, backend, mode] = _run_joint(rank, world, name, backend, mode, seed)
                except Exception:
                    results[name, backend, mode] = traceback.format_exc()
    for seed, method in enumerate(METHODS):
        for mode in MODES:
            try:
                results[method, "auto", mode] = _run_method(rank, world, method, "auto", mode, seed)
            except Exception:
                results[method, "auto", mode] = traceback.format_exc()
    if world == 3:  # ranks 0 and 2 as a process group of their own: ring neighbours are global ranks 0, 2
        subgroup = dist.new_group([0, 2])
        for mode in MODES:
            if rank != 1:
                try:
                    results["subgroup", "reference", mode] = _run_case(
                        rank // 2, 2, "all_ignore", "reference", mode, 0, group=subgroup
                    )
                except Exception:
                    results["subgroup", "reference", mode] = traceback.format_exc()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()  # no rank tears gloo down while a peer still has a collective in flight
    dist.destroy_process_group()


_RESULTS: Dict[int, List[Dict]] = {}


def _results(world: int, tmp_path_factory) -> List[Dict]:
    """Every rank's results of the one spawn for `world` processes (run on first use)."""
    if world not in _RESULTS:
        out = tmp_path_factory.mktemp(f"world{world}")
        mp.spawn(_worker, args=(world, _free_port(), str(out), BACKENDS), nprocs=world)
        _RESULTS[world] = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    return _RESULTS[world]


def _skip_if_rejected(error, backend: str) -> None:
    """Skip a (backend, feature) pair the backend rejects by name (mmloss.problem.UnsupportedFeature)."""
    if isinstance(error, str) and "UnsupportedFeature" in error and f"backend '{backend}'" in error:
        pytest.skip(error.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_equals_single_process(world, name, mode, backend, tmp_path_factory):
    for rank, results in enumerate(_results(world, tmp_path_factory)):
        error = results[name, backend, mode]
        _skip_if_rejected(error, backend)
        assert not isinstance(error, str), f"rank {rank} raised:\n{error}"
        tol = TOL[CASES[name].get("dtype", torch.float64)]
        assert error <= tol, f"rank {rank}: largest error {error:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(JOINT_CASES))
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_joint_blocks_equal_single_process(world, name, mode, backend, tmp_path_factory):
    """joint_contrastive_loss with global negatives (GIST's local anchor-anchor block too)."""
    for rank, results in enumerate(_results(world, tmp_path_factory)):
        error = results[name, backend, mode]
        _skip_if_rejected(error, backend)
        assert not isinstance(error, str), f"rank {rank} raised:\n{error}"
        assert error <= TOL[torch.float64], f"rank {rank}: largest error {error:.3g}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_method_modules_equal_single_process(world, method, mode, tmp_path_factory):
    for rank, results in enumerate(_results(world, tmp_path_factory)):
        error = results[method, "auto", mode]
        assert not isinstance(error, str), f"rank {rank} raised:\n{error}"
        assert error <= TOL[torch.float64], f"rank {rank}: largest error {error:.3g}"


@pytest.mark.parametrize("mode", MODES)
def test_process_group_of_some_ranks(mode, tmp_path_factory):
    for rank, results in enumerate(_results(3, tmp_path_factory)):
        if rank != 1:
            error = results["subgroup", "reference", mode]
            assert not isinstance(error, str), f"rank {rank} raised:\n{error}"
            assert error <= TOL[torch.float64], f"rank {rank}: largest error {error:.3g}"


def _error_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=5)
    )
    outcomes = {}

    def attempt(name, query, key, mode="gather", **kwargs):
        try:
            mmloss.contrastive_loss(query, key, backend="reference", global_negatives=mode, **kwargs)
            outcomes[name] = None
        except Exception as exc:
            outcomes[name] = (type(exc).__name__, str(exc))

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    attempt("width", x[:, : 6 - rank], x[:, : 6 - rank])
    attempt("dtype", x.to(torch.float32) if rank else x, x.to(torch.float32) if rank else x, mode="ring")
    attempt("margin", x, x, margin=0.1 * rank)
    attempt("bad_argument", x, x, positives=torch.tensor([0, 1, 2, 9 if rank else 3]))
    if rank == 0:  # rank 1 never calls: rank 0 must raise once the group's timeout expires
        start = datetime.datetime.now()
        attempt("missing_rank", x, x, mode="ring")
        outcomes["missing_rank_seconds"] = (datetime.datetime.now() - start).total_seconds()
    torch.save(outcomes, Path(out) / f"rank{rank}.pt")
    while rank == 1 and not (Path(out) / "rank0.pt").exists():  # stay in the group meanwhile
        time.sleep(0.1)
    dist.destroy_process_group()


def test_mismatch_and_failing_rank_raise(tmp_path):
    mp.spawn(_error_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for outcomes in (r0, r1):
        assert outcomes["width"][0] == "ValueError" and "width differs across ranks" in outcomes["width"][1]
        assert outcomes["dtype"][0] == "ValueError" and "torch.float32" in outcomes["dtype"][1]
        assert outcomes["margin"][0] == "ValueError" and "margin differs" in outcomes["margin"][1]
    assert r1["bad_argument"][0] == "ValueError" and r1["bad_argument"][1].startswith("positives")
    assert r0["bad_argument"][0] == "RuntimeError" and "rank(s) [1] failed" in r0["bad_argument"][1]
    assert r0["missing_rank"][0] == "RuntimeError" and "did not call the loss" in r0["missing_rank"][1]
    assert r0["missing_rank_seconds"] < 30


def test_argument_errors_without_process_group():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="global_negatives must be None or one of"):
        mmloss.contrastive_loss(x, x, global_negatives="all")
    with pytest.raises(ValueError, match="initialised torch.distributed"):
        mmloss.contrastive_loss(x, x, global_negatives="ring")
    with pytest.raises(ValueError, match="process_group was given without"):
        mmloss.contrastive_loss(x, x, process_group=object())


def _skip_worker(rank: int, port: int, out: str) -> None:
    """MCSEO with global negatives where rank 0's phrases are all ignored: the term runs (rank 1
    has valid rows) and equals the single-process value; with no valid row on any rank every
    rank skips it together (no rank left waiting in a collective)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20)
    )
    g = torch.Generator().manual_seed(shifted_seed(0))
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    views = rand(5, 2, 4, 3)  # z1, z2, s1, s2, m of each rank
    phrases, objects = rand(2, 3, 3), rand(2, 5, 3)
    targets = torch.tensor([[-100, -100, -100], [0, 4, -100]])
    module = mmloss.losses.MCSEOLoss(backend="reference", global_negatives="gather")
    args = tuple(x[rank] for x in views)
    mixed = module(*args, phrases=phrases[rank], objects=objects[rank], phrase_object=targets[rank])
    none = module(*args, phrases=phrases[rank], objects=objects[rank], phrase_object=targets[0])
    single = mmloss.contrastive_loss(
        phrases.reshape(6, 3),
        objects.reshape(10, 3),
        backend="reference",
        positives=torch.tensor([-100, -100, -100, 5, 9, -100]),
    )
    torch.save({"mixed": mixed.parts, "none": none.parts, "single": single}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_method_term_without_valid_rows_on_some_or_all_ranks(tmp_path):
    mp.spawn(_skip_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert "skipped_terms" not in r["mixed"]
        torch.testing.assert_close(r["mixed"]["object_phrase"], r["single"])
        assert r["none"]["skipped_terms"] == 1 and r["none"]["object_phrase"] == 0
