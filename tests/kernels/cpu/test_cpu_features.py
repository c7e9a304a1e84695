"""The cpu backend's hardness penalty and several positives per row (docs/contract.md §3)
against the float64 reference through the public call: every combination with the §1 features
(margin, adaptive margin, filter, per-row thresholds, groups, ignored rows), in one pass (strips
spanning every column, the fused forward+gradient) and in column tiles (two passes), fp64, fp32
and bf16; and the ops' own checks of the new fields."""

from __future__ import annotations

import math

import pytest
import torch

import mmloss
from mmloss.backends import unavailable_reason
from mmloss.kernel_common import inv_temp_tensor
from mmloss.reference import contrastive_loss_reference
from tests.cases import (
    FEATURES,
    assert_matches_reference,
    make_case,
    nearly_solved_multi_positive,
    problem_of,
)

pytestmark = pytest.mark.skipif(
    unavailable_reason("cpu", torch.device("cpu")) is not None, reason="needs the compiled CPU backend"
)

BASES = {
    "plain": {},
    "margin": {"margin": 0.2},
    "adaptive": {"margin": 0.2, "adaptive": True},
    "filter": {"filter": True},
    "row_threshold": {"filter": True, "row_threshold": True},
    "groups": {"groups": True},
    "ignore": {"ignore": True, "shuffle_positives": True},
    "all": {"margin": 0.2, "adaptive": True, "filter": True, "groups": True, "ignore": True, "shuffle_positives": True},
}
NEW = {
    "hardness_all": {"hardness": "all"},
    "hardness_others": {"hardness": "others"},
    "hardness_own": {"hardness": "own"},
    "multi_positive": {"multi_positive": True, "groups": True},
    "multi_positive_hardness": {"multi_positive": True, "groups": True, "hardness": "others"},
}


@pytest.fixture(params=["one_pass", "column_tiles"])
def tiling(request, monkeypatch):
    """one_pass: the default budget (strips span every column); column_tiles: strips of 3 rows
    in tiles of 5 columns (a row's positives and its group spread over several tiles)."""
    if request.param == "column_tiles":
        monkeypatch.setenv("MMLOSS_CPU_SCRATCH_MB", "0")
        monkeypatch.setattr("mmloss.cpu.MIN_STRIP_ROWS", 3)
        monkeypatch.setattr("mmloss.cpu.MIN_TILE_COLS", 5)
    return request.param


def _case(monkeypatch, base: str, new: str, M: int, N: int, d: int, seed: int):
    """A fresh case of the feature set BASES[base] ∪ NEW[new] (registered in FEATURES for this test only)."""
    name = f"{base}+{new}"
    monkeypatch.setitem(FEATURES, name, {**BASES[base], **NEW[new]})
    return make_case(M, N, d, name, seed=seed)


@pytest.mark.parametrize("reduction", ["mean", "none"])  # forward_with_grad / forward + backward
@pytest.mark.parametrize("new", list(NEW))
@pytest.mark.parametrize("base", list(BASES))
def test_float64_every_combination(monkeypatch, tiling, base, new, reduction):
    case = _case(monkeypatch, base, new, 13, 29, 7, seed=len(base) * 31 + len(new))
    assert_matches_reference(case, "cpu", torch.float64, reduction=reduction, learn_temperature=True)


@pytest.mark.parametrize("M,N,d", [(1, 1, 1), (1, 6, 3), (2, 1, 4), (37, 41, 5), (11, 64, 769)])
@pytest.mark.parametrize("new", list(NEW))
def test_float64_awkward_sizes(monkeypatch, tiling, new, M, N, d):
    case = _case(monkeypatch, "all", new, M, N, d, seed=M * 100 + N + d)
    assert_matches_reference(case, "cpu", torch.float64, learn_temperature=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("new", list(NEW))
def test_low_precision_meets_error_bar(monkeypatch, tiling, dtype, new):
    case = _case(monkeypatch, "all", new, 61, 71, 48, seed=23)
    assert_matches_reference(case, "cpu", dtype, learn_temperature=True)


@pytest.mark.parametrize("partner", [False, True])
def test_several_positives_nearly_solved_rows_keep_their_accuracy(tiling, partner):
    """fp32, τ = 0.05: rows whose only positive is a near-duplicate (loss 1e-7 ... 1e-4, lse and
    the positive logit agreeing to 6-9 digits) keep their relative accuracy in reduction="none"
    (lse and Σ positive_weights·logit in float64); with a second near-duplicate positive in the
    group (partner) the loss is log 2 + tiny and the error is the logits' own fp32 rounding."""
    q, k, kw = nearly_solved_multi_positive(partner)
    want = contrastive_loss_reference(q, k, **kw)
    assert float(want.max()) < (math.log(2) + 1e-3 if partner else 1e-4) and float(want.min()) > 0
    got = mmloss.contrastive_loss(q.float(), k.float(), backend="cpu", **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-5 if partner else 1e-3, atol=0)


def _lead(**changes):
    """(query, key, inv_temp, the problem's fields) of a small multi-positive case with the
    hardness penalty on the others' columns, with `changes` made to the LossProblem."""
    import dataclasses

    case = make_case(5, 5, 4, "multi_positive_all", seed=2)
    q, k, _ = case.inputs(torch.float64)
    problem = problem_of(q.detach(), k.detach(), temperature=0.1, backend="cpu", **case.kwargs)
    problem = dataclasses.replace(problem, **changes)
    return (q.detach(), k.detach(), inv_temp_tensor(10.0, q.device), *problem.kernel_args())


def test_symmetric_ops_reject_the_new_features():
    lead = _lead()
    with pytest.raises(RuntimeError, match="symmetric ops do not take the hardness penalty or several positives"):
        torch.ops.mmloss.contrastive_forward_symmetric(*lead, 4, 5)
    lse = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="symmetric ops do not take"):
        torch.ops.mmloss.contrastive_backward_symmetric(*lead, lse, lse, lse + 1, lse + 1, True, 4, 5)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(hardness_strength=-1.0), "hardness_strength must be finite and >= 0"),
        (dict(hardness_strength=float("nan")), "hardness_strength must be finite and >= 0"),
        (dict(hardness_scope=3), "hardness_scope must be 0"),
        (dict(row_owners=None), "hardness_scope 1 needs row_owners"),
        (dict(key_owners=torch.zeros(5, dtype=torch.int32)), "needs row_owners .M,. and key_owners .N,., int64"),
        (dict(key_owners=torch.zeros(4, dtype=torch.long)), "key_owners must have 1 dimension"),
        (dict(positive_weights=torch.ones(5)), "positive_weights must be float64"),
        (dict(positive_weights=torch.ones(4, dtype=torch.float64)), "positive_weights must have 1 dimension"),
        (dict(key_groups=None, row_groups=None), "comes with row_groups and key_groups"),
    ],
)
def test_ops_check_the_new_fields(changes, message):
    lead = _lead(**changes)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.mmloss.contrastive_forward(*lead, 4, 5)
