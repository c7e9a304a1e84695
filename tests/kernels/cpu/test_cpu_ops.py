"""The CPU backend's torch.library ops: `torch.library.opcheck` (schema, fake implementation,
AOT dispatch) for each of the five, the problem's field order against the registered
schemas, and the fixed results' consistency with one another."""

from __future__ import annotations

import pytest
import torch

from mmloss import library
from mmloss.backends import unavailable_reason
from mmloss.kernel_common import inv_temp_tensor
from mmloss.problem import KERNEL_FIELDS
from tests.cases import make_case, problem_of

pytestmark = pytest.mark.skipif(
    unavailable_reason("cpu", torch.device("cpu")) is not None, reason="needs the compiled CPU backend"
)
LEADING = ("query", "key", "inv_temp")


def _problem_call(features: str, dtype=torch.float64, seed: int = 4, M: int = 9, N: int = 11):
    """(query, key, inv_temp, problem) of a fresh case, detached (the ops have no autograd:
    mmloss.autograd's Functions differentiate them)."""
    case = make_case(M, N, 6, features, seed=seed)
    q, k, _ = case.inputs(dtype)
    q, k = q.detach(), k.detach()
    problem = problem_of(q, k, temperature=case.temperature, backend="cpu", **case.kwargs)
    return q, k, inv_temp_tensor(1.0 / case.temperature, q.device), problem


def _calls(features: str, dtype=torch.float64):
    """{op name: its argument tuple} for every op on one case (lse from the forward ops), in
    strips of 4 rows and column tiles of 5."""
    q, k, t, problem = _problem_call(features, dtype)
    lead = (q, k, t, *problem.kernel_args())
    weight = problem.valid_rows.double() * torch.linspace(0.5, 1.5, q.shape[0], dtype=torch.float64)
    lse, _ = torch.ops.mmloss.contrastive_forward(*lead, 4, 5)
    calls = {
        "contrastive_forward": (*lead, 4, 5),
        "contrastive_forward_with_grad": (*lead, weight, 4, 5),
        "contrastive_backward": (*lead, lse, weight, True, 4, 5),
    }
    if problem.positives.shape[0] == k.shape[0]:  # symmetric cases: M == N, diagonal positives
        lse, lse_col, _ = torch.ops.mmloss.contrastive_forward_symmetric(*lead, 4, 5)
        calls["contrastive_forward_symmetric"] = (*lead, 4, 5)
        calls["contrastive_backward_symmetric"] = (*lead, lse, lse_col, weight, weight.flip(0), True, 4, 5)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("features", ["plain", "all", "symmetric_all", "multi_positive_all"])
def test_opcheck(features, dtype):
    calls = _calls(features, dtype)
    for name, args in calls.items():
        torch.library.opcheck(getattr(torch.ops.mmloss, name).default, args)
    assert len(calls) == (5 if features == "symmetric_all" else 3)


def test_every_op_takes_the_problem_fields_in_their_python_order():
    """The schema fragment generated from csrc/include/mmloss/problem.h against
    mmloss.problem.KERNEL_FIELDS, and the LossProblem fields they name."""
    from mmloss.problem import LossProblem

    names = {f.name for f in LossProblem.__dataclass_fields__.values()}
    assert set(KERNEL_FIELDS) <= names
    for op in library.OPS:
        schema = getattr(torch.ops.mmloss, op).default._schema
        arguments = [a.name for a in schema.arguments]
        assert tuple(arguments[:3]) == LEADING, op
        assert tuple(arguments[3 : 3 + len(KERNEL_FIELDS)]) == KERNEL_FIELDS, op
        assert tuple(arguments[-2:]) == ("chunk_rows", "chunk_cols"), op


@pytest.mark.parametrize("cols", [0, 4], ids=["all_columns", "column_tiles"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_results_agree_between_ops(dtype, cols):
    """forward_with_grad = forward + backward with the rows' weights; the symmetric forward's
    lse = forward's, and its column lse = the transposed problem's forward; the symmetric
    backward with zero column weights = the one-direction backward."""
    q, k, t, problem = _problem_call("symmetric_all", dtype, seed=11, M=13, N=13)
    lead = (q, k, t, *problem.kernel_args())
    weight = problem.valid_rows.to(torch.float64 if dtype == torch.float64 else torch.float32)
    lse, pos = torch.ops.mmloss.contrastive_forward(*lead, 5, cols)
    fused = torch.ops.mmloss.contrastive_forward_with_grad(*lead, weight, 5, cols)
    grads = torch.ops.mmloss.contrastive_backward(*lead, lse, weight, True, 5, cols)
    for got, want in zip(fused, (lse, pos, *grads)):
        torch.testing.assert_close(got, want)
    lse_s, lse_col, pos_s = torch.ops.mmloss.contrastive_forward_symmetric(*lead, 5, cols)
    col_lse, _ = torch.ops.mmloss.contrastive_forward(k, q, t, *problem.transposed().kernel_args(), 5, cols)
    torch.testing.assert_close(lse_s, lse)
    torch.testing.assert_close(pos_s, pos)
    torch.testing.assert_close(lse_col, col_lse)
    sym = torch.ops.mmloss.contrastive_backward_symmetric(
        *lead, lse, lse_col, weight, torch.zeros_like(weight), True, 5, cols
    )
    for got, want in zip(sym, grads):
        torch.testing.assert_close(got, want)
    _, _, no_temp = torch.ops.mmloss.contrastive_backward(*lead, lse, weight, False, 5, cols)
    assert float(no_temp) == 0.0 and float(grads[2]) != 0.0


def test_fakes_give_dtypes_and_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, t, problem = _problem_call("plain", torch.float32, M=5, N=8)
    lead = (q, k, t, *problem.kernel_args())
    with FakeTensorMode(allow_non_fake_inputs=True):
        lse, pos = torch.ops.mmloss.contrastive_forward(*lead, 0, 0)
        dq, dk, dt = torch.ops.mmloss.contrastive_backward(*lead, lse, lse.float(), False, 0, 0)
    assert lse.shape == pos.shape == (5,) and lse.dtype == torch.float64  # the CPU keeps lse in double
    assert dq.shape == q.shape and dk.shape == k.shape and dq.dtype == torch.float32 and dt.dtype == torch.float64
    assert dt.dim() == 0


def test_ops_reject_inputs_of_the_wrong_length():
    """The ops are public: a per-row or per-column input of the wrong length is an error naming
    it, never a read past its end."""
    q, k, t, problem = _problem_call("all", M=9, N=11)
    lead = (q, k, t, *problem.kernel_args())
    lse, _ = torch.ops.mmloss.contrastive_forward(*lead, 4, 0)
    weight = problem.valid_rows.double()
    with pytest.raises(RuntimeError, match="row_weight must have 1 dimension"):
        torch.ops.mmloss.contrastive_backward(*lead, lse, weight[:-1], True, 4, 0)
    with pytest.raises(RuntimeError, match="lse must have 1 dimension"):
        torch.ops.mmloss.contrastive_backward(*lead, lse[:3], weight, True, 4, 0)
    import dataclasses

    short = dataclasses.replace(problem, key_groups=problem.key_groups[:-1])
    with pytest.raises(RuntimeError, match="key_groups must have"):
        torch.ops.mmloss.contrastive_forward(q, k, t, *short.kernel_args(), 4, 0)
    unpaired = dataclasses.replace(problem, filter_key=None)
    with pytest.raises(RuntimeError, match="filter_query .* come together"):
        torch.ops.mmloss.contrastive_forward(q, k, t, *unpaired.kernel_args(), 4, 0)
