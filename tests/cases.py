"""Random inputs for every feature of docs/contract.md §1, shared by the backend test suites.

`make_case` builds fresh random query/key and feature arguments; `loss_and_grads` runs one
backend and returns the loss with the gradients of query, key and a learnable temperature;
`assert_matches_reference` compares a backend with the float64 reference.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import mmloss
from mmloss.checks import build_problem
from mmloss.problem import LossProblem
from mmloss.reference import contrastive_loss_reference

# Feature sets a suite runs; "all" switches on everything that combines with positives.
FEATURES = {
    "plain": {},
    "margin": {"margin": 0.15},
    "adaptive_margin": {"margin": 0.3, "adaptive": True},
    "filter": {"filter": True},
    "filter_normalize": {"filter": True, "filter_normalize": True},
    "groups": {"groups": True},
    "ignore": {"ignore": True},
    "positives": {"shuffle_positives": True},
    "symmetric": {"symmetric": True},
    "symmetric_all": {"symmetric": True, "margin": 0.2, "adaptive": True, "filter": True, "groups": True},
    "all": {"margin": 0.2, "adaptive": True, "filter": True, "groups": True, "ignore": True, "shuffle_positives": True},
    # docs/contract.md §3 (a backend that rejects one by name, UnsupportedFeature, is skipped:
    # tests/conftest.py).
    "hardness": {"hardness": "all"},
    "hardness_others": {"hardness": "others", "shuffle_positives": True, "groups": True},
    "hardness_own": {"hardness": "own", "margin": 0.2, "filter": True, "ignore": True},
    "multi_positive": {"multi_positive": True, "groups": True, "ignore": True},
    "multi_positive_all": {
        "multi_positive": True,
        "groups": True,
        "margin": 0.2,
        "adaptive": True,
        "filter": True,
        "hardness": "others",
        "shuffle_positives": True,
    },
    "row_threshold": {"filter": True, "row_threshold": True, "groups": True, "margin": 0.15},
    "row_threshold_normalize": {"filter": True, "filter_normalize": True, "row_threshold": True, "ignore": True},
}


SEED_OFFSET_ENV = "MMLOSS_TEST_SEED_OFFSET"


def shifted_seed(seed: int) -> int:
    """`seed` plus the integer in MMLOSS_TEST_SEED_OFFSET (0 when unset; read at each call, so
    spawned workers see it too): every seeded test draws other inputs under another offset,
    for sweeps over fresh seeds (tests/README.md)."""
    value = os.environ.get(SEED_OFFSET_ENV, "0")
    try:
        return seed + int(value)
    except ValueError:
        raise ValueError(f"{SEED_OFFSET_ENV} must be an integer, got {value!r}") from None


@dataclasses.dataclass
class Case:
    query: torch.Tensor
    key: torch.Tensor
    temperature: object
    kwargs: Dict[str, object]

    def inputs(self, dtype: torch.dtype, learn_temperature: bool = False, rounded_to: Optional[torch.dtype] = None):
        """Leaf copies in `dtype` (first rounded to `rounded_to`) that require grad, and the
        temperature to pass."""
        q = self.query.detach().to(rounded_to or dtype).to(dtype).requires_grad_(True)
        k = self.key.detach().to(rounded_to or dtype).to(dtype).requires_grad_(True)
        t = self.temperature
        if learn_temperature:
            t = torch.tensor(
                float(t),
                dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                device=q.device,
                requires_grad=True,
            )
        return q, k, t


def make_case(
    M: int, N: int, d: int, features: str, *, seed: int, device="cpu", teacher_width: int = 5, duplicates: bool = False
) -> Case:
    """Fresh random inputs (float64) for the named feature set. `duplicates` makes some
    columns near-copies of their rows' positives (c -> 1)."""
    spec = FEATURES[features]
    g = torch.Generator().manual_seed(shifted_seed(seed))
    symmetric = spec.get("symmetric", False)
    if symmetric or not spec.get("shuffle_positives"):
        N = max(N, M) if not symmetric else M
    q = torch.randn(M, d, generator=g, dtype=torch.float64)
    k = torch.randn(N, d, generator=g, dtype=torch.float64)
    # Correlate each row with its positive so that losses are not all near log N.
    positives: Optional[torch.Tensor] = None
    if spec.get("shuffle_positives"):
        positives = torch.randint(0, N, (M,), generator=g)
    pos_cols = positives if positives is not None else torch.arange(M)
    q = q + 1.5 * k[pos_cols]
    if duplicates:
        k[pos_cols] = q + 1e-7 * torch.randn(M, d, generator=g, dtype=torch.float64)
    kwargs: Dict[str, object] = {"margin": spec.get("margin", 0.0), "symmetric": symmetric}
    if spec.get("ignore"):
        positives = pos_cols.clone()
        ignored = torch.rand(M, generator=g) < 0.3
        ignored[0] = False  # at least one row counts (all-ignored is its own test)
        positives[ignored] = mmloss.IGNORE_INDEX
    if positives is not None:
        kwargs["positives"] = positives.to(device)
    if spec.get("adaptive"):
        tq = torch.randn(M, teacher_width, generator=g, dtype=torch.float64)
        kwargs["margin_teacher"] = (
            tq.to(device),
            (torch.randn(N, teacher_width, generator=g, dtype=torch.float64)).to(device),
        )
    if spec.get("filter"):
        fq = torch.randn(M, teacher_width + 2, generator=g, dtype=torch.float64)
        fk = torch.randn(N, teacher_width + 2, generator=g, dtype=torch.float64)
        normalize = spec.get("filter_normalize", False)
        scores = F.normalize(fq, dim=-1) @ F.normalize(fk, dim=-1).T if normalize else fq @ fk.T
        threshold = off_the_scores(scores, 0.5 if normalize else 1.5)
        if spec.get("row_threshold"):
            quantiles = 0.4 + 0.5 * torch.rand(M, generator=g)
            threshold = torch.tensor([row_threshold(scores[i], float(quantiles[i])) for i in range(M)]).to(device)
        kwargs.update(
            filter_teacher=(fq.to(device), fk.to(device)), filter_normalize=normalize, filter_threshold=threshold
        )
    if spec.get("groups"):
        kwargs["key_groups"] = torch.randint(0, max(1, N // 3), (N,), generator=g).to(device)
    if spec.get("multi_positive"):
        kwargs["multi_positive"] = True
    if spec.get("hardness"):
        kwargs.update(hardness_strength=3.0, hardness_negatives=spec["hardness"])
        if spec["hardness"] != "all":
            owners = torch.randint(0, 3, (M,), generator=g), torch.randint(-1, 3, (N,), generator=g)
            kwargs["hardness_owners"] = tuple(o.to(device) for o in owners)
    # fp32-representable, so that every run (fp64 oracle included) sees the same τ.
    temperature = float((0.05 + 0.2 * torch.rand((), generator=g)).float())
    return Case(q.to(device), k.to(device), temperature, kwargs)


PLAIN_CALL = dict(
    positives=None,
    margin=0.0,
    margin_teacher=None,
    filter_teacher=None,
    filter_threshold=None,
    filter_normalize=False,
    key_groups=None,
    symmetric=False,
    reduction="mean",
)
"""The public call's defaults of the arguments `checks.build_problem` requires."""


def problem_of(query: torch.Tensor, key: torch.Tensor, *, temperature, backend: str, **kwargs) -> LossProblem:
    """`checks.build_problem` of a call with `kwargs` (e.g. a case's), the public call's defaults
    for the rest: the problem a backend's ops get (pass detached tensors: the ops have no autograd)."""
    return build_problem(query, key, temperature=temperature, backend=backend, **{**PLAIN_CALL, **kwargs})


def off_the_scores(scores: torch.Tensor, threshold: float) -> float:
    """`threshold`, unless a teacher score lies within 1e-4 (relative) of it: then the midpoint
    of the nearest wide gap between scores (see threshold_between)."""
    near = (scores.detach().double() - threshold).abs() <= 1e-4 * max(1.0, abs(threshold))
    if not bool(near.any()):
        return threshold
    values = torch.unique(scores.detach().flatten().double())
    return threshold_between(scores, float(torch.searchsorted(values, threshold)) / max(1, len(values) - 1))


def row_threshold(row_scores: torch.Tensor, quantile: float) -> float:
    """One row's filter threshold: `threshold_between` its scores, or above its only score."""
    if torch.unique(row_scores).numel() < 2:
        return float(row_scores.max()) + 0.5
    return threshold_between(row_scores, quantile)


def threshold_between(scores: torch.Tensor, quantile: float = 0.5) -> float:
    """A filter threshold near `quantile` of `scores` that lies midway between two adjacent
    scores, at least 1e-4 (relative) from each: a score on the decision edge would be kept or
    dropped depending on the GEMM's rounding, which differs between CPUs (docs/contract.md: such a score
    may be decided either way)."""
    values = torch.unique(scores.detach().flatten().double())  # sorted
    gaps = values[1:] - values[:-1]
    wide = gaps > 1e-4 * values[:-1].abs().clamp(min=1.0)
    if not bool(wide.any()):
        raise ValueError("no two teacher scores are far enough apart for a threshold between them")
    target = quantile * (len(values) - 1)
    candidates = torch.nonzero(wide).flatten()
    i = int(candidates[(candidates.double() - target).abs().argmin()])
    return float((values[i] + values[i + 1]) / 2)


def loss_and_grads(
    case: Case,
    backend: str,
    dtype: torch.dtype,
    reduction: str = "mean",
    learn_temperature: bool = False,
    teacher_dtype: Optional[torch.dtype] = None,
    rounded_to: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Loss (as float64) and grads of query, key (and temperature) for a fixed upstream grad.
    `rounded_to` rounds the inputs to that dtype first (the oracle of a low-precision run)."""
    q, k, t = case.inputs(dtype, learn_temperature, rounded_to)
    kwargs = dict(case.kwargs)
    for name in ("margin_teacher", "filter_teacher"):
        if name in kwargs:
            # 16-bit runs keep fp32 teachers, so that a threshold decision cannot flip by rounding.
            default = dtype if dtype in (torch.float32, torch.float64) else torch.float32
            kwargs[name] = tuple(x.to(teacher_dtype or default) for x in kwargs[name])
    if backend == "oracle":
        loss = contrastive_loss_reference(q, k, temperature=t, reduction=reduction, **kwargs)
    else:
        loss = mmloss.contrastive_loss(q, k, temperature=t, reduction=reduction, backend=backend, **kwargs)
        assert mmloss.last_backend() == backend
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    inputs = (q, k, t) if learn_temperature else (q, k)
    grads = torch.autograd.grad((loss * upstream).sum(), inputs)
    return loss.detach().double(), tuple(g.double() for g in grads)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference; NaN where one side is NaN and the other is not."""
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max())


def temperature_terms(case: Case, reduction: str) -> float:
    """A bound on the magnitude of the terms that dL/dτ sums under `loss_and_grads`' upstream
    gradient: each row adds u_i·(Σ_j P_ij f_ij − f_i,pos)/τ², at most 2·|u_i|/τ² (|f| ≤ 1)."""
    rows = case.query.shape[0]
    weights = {"mean": 0.5, "sum": 0.5 * rows}.get(reduction, float(torch.linspace(0.5, 1.5, rows).sum()))
    return 2.0 * weights / float(case.temperature) ** 2


def assert_matches_reference(
    case: Case,
    backend: str,
    dtype: torch.dtype,
    reduction: str = "mean",
    learn_temperature: bool = False,
    atol: float = 1e-9,
    rtol: float = 1e-7,
    ulps: float = 0.5,
) -> None:
    """`backend` in `dtype` against the reference in float64. For low-precision dtypes the bar
    is docs/contract.md §1's, as flash-attention's: against the float64 reference on the same (rounded)
    inputs, at most 2x (+1e-6) the error of the reference backend run in `dtype`, plus `ulps`
    units in the last place of each result's dtype at its magnitude (0.5: the rounding of the
    exact result itself; kernels that keep fp32 logits need a few in fp32, where the bar is a
    toss-up between two few-ulp errors)."""
    exact_loss, exact_grads = loss_and_grads(
        case, "oracle", torch.float64, reduction, learn_temperature, rounded_to=dtype
    )
    loss, grads = loss_and_grads(case, backend, dtype, reduction, learn_temperature)
    if dtype == torch.float64:
        torch.testing.assert_close(loss, exact_loss, atol=atol, rtol=rtol)
        for got, want in zip(grads, exact_grads):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        return
    ref_loss, ref_grads = loss_and_grads(case, "oracle", dtype, reduction, learn_temperature)
    pairs = [(loss, ref_loss, exact_loss)] + list(zip(grads, ref_grads, exact_grads))
    out_dtypes = (torch.float32, dtype, dtype, torch.float32)  # loss, d_query, d_key, d_temperature
    for name, (got, ref, want), out_dtype in zip(("loss", "d_query", "d_key", "d_temperature"), pairs, out_dtypes):
        # Rounding the exact result to its own dtype (half an ulp) is an error no backend avoids;
        # dL/dτ is a sum whose terms cancel, so its rounding is that of the terms' magnitude.
        scale = float(want.abs().max())
        if name == "d_temperature":
            scale = max(scale, temperature_terms(case, reduction))
        rounding = ulps * torch.finfo(out_dtype).eps * scale
        # The loss (reduction "sum") and dL/dτ sum many terms and grow with them: their 1e-6
        # slack is relative.
        slack = 1e-6 * max(1.0, scale) if name in ("loss", "d_temperature") else 1e-6
        bar = 2 * max_error(ref, want) + slack + rounding
        err = max_error(got, want)
        assert err <= bar, f"{name}: {backend} {dtype} error {err:.3g} > bar {bar:.3g}"


def assert_kernel_matches_reference(
    case: Case, dtype: torch.dtype, reduction: str = "mean", learn_temperature: bool = True, *, backend: str
) -> None:
    """`assert_matches_reference` for the GPU kernel backends (Triton, CUDA), whose fp32
    logits put both sides a few ulps from float64 in fp32: 8 ulps there, 0.5 otherwise."""
    ulps = 8 if dtype == torch.float32 else 0.5
    assert_matches_reference(case, backend, dtype, reduction, learn_temperature, ulps=ulps)


def scaled_rows(M: int, N: int, d: int, seed: int, row_scale, key_scale):
    """float64 query (M, d) and key (N, d), each row correlated with its positive, the rows
    multiplied by the given per-row scales (cycled): inputs whose norms overflow or underflow."""
    g = torch.Generator().manual_seed(shifted_seed(seed))
    q = torch.randn(M, d, generator=g, dtype=torch.float64)
    k = torch.randn(N, d, generator=g, dtype=torch.float64)
    q = q + 1.5 * k[:M]
    rs = torch.tensor(row_scale, dtype=torch.float64).repeat(M)[:M, None]
    ks = torch.tensor(key_scale, dtype=torch.float64).repeat(N)[:N, None]
    return q * rs, k * ks


def unit_scaled(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient rows times their input's norm: O(1) whatever the row's scale (d(x/|x|) ~ 1/|x|)."""
    return grad.double() * x.double().norm(dim=1, keepdim=True)


def nearly_solved_multi_positive(partner: bool, seed: int = 45):
    """(q (5, 32), k (70, 32), keyword arguments) in float64 of rows whose multi-positive loss is
    nearly 0 (one near-duplicate positive per group: the lse and the positive logit agree to 6-9
    digits) or, with `partner`, log 2 + tiny (a second near-duplicate positive in the group)."""
    g = torch.Generator().manual_seed(shifted_seed(seed))
    q = torch.randn(5, 32, generator=g, dtype=torch.float64)
    k = torch.randn(70, 32, generator=g, dtype=torch.float64)
    k[:5] = q + 1e-4 * torch.randn(5, 32, generator=g, dtype=torch.float64)
    k[5:] = -k[5:].abs() * q[0].sign()  # far from every row
    groups = torch.arange(70)
    if partner:
        k[5:10] = q + 1e-4 * torch.randn(5, 32, generator=g, dtype=torch.float64)
        groups[5:10] = torch.arange(5)
    return q, k, dict(temperature=0.05, key_groups=groups, multi_positive=True, reduction="none")
