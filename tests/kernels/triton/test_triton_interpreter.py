"""The Triton backend on the CPU, in the Triton interpreter, against the float64 reference.

Triton decides when it is imported whether kernels are interpreted, so TRITON_INTERPRET=1
must be set before anything imports triton. This module sets it when it is the first to
import triton on a machine without CUDA (e.g. `pytest tests/test_triton_interpreter.py`),
or finds it set for the whole run; otherwise (another module imported triton first) it
skips, and tests/test_triton_interpreter_subprocess.py runs it in a process of its own.

The interpreter's bf16 tl.dot is wrong, so in interpreter mode the kernels upcast dot
operands to fp32 (exact for 16-bit products; see mmloss/triton/kernels.py): bf16 runs test
that path, not the MMA.
"""

import dataclasses
import functools
import importlib.util
import math
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules or torch.cuda.is_available():
        pytest.skip(
            "triton was imported without TRITON_INTERPRET=1 (or CUDA is here): "
            "test_triton_interpreter_subprocess.py runs this file in its own process",
            allow_module_level=True,
        )
    os.environ["TRITON_INTERPRET"] = "1"

import mmloss  # noqa: E402
import mmloss.triton as tk  # noqa: E402
from mmloss.checks import build_problem  # noqa: E402
from mmloss.kernel_common import scratch_bytes  # noqa: E402
from mmloss.reference import contrastive_loss_reference  # noqa: E402
from tests.cases import (  # noqa: E402
    FEATURES,
    assert_kernel_matches_reference,
    loss_and_grads,
    make_case,
    nearly_solved_multi_positive,
    problem_of,
    scaled_rows,
    unit_scaled,
)

BACKEND = "triton"
# log(0) = -inf for a row with no allowed column in a tile is intended; numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


@pytest.fixture(params=["small", "chunked"])
def path(request, monkeypatch):
    """Both designs: the small-batch path (fused norms, one forward and two backward launches)
    and the chunked one (prologue, column-split forward + combine, scratch + GEMMs), which
    these sizes reach with SMALL_MAX = 0; 16-column splits give them several (some empty)."""
    if request.param == "chunked":
        monkeypatch.setattr(tk.ops, "SMALL_MAX", 0)
        monkeypatch.setattr(tk.ops, "MIN_SPLIT_COLUMNS", 16)
    return request.param


assert_close_to_oracle = functools.partial(assert_kernel_matches_reference, backend=BACKEND)


@pytest.mark.parametrize("features", sorted(FEATURES))
def test_every_feature_fp32(features, path):
    assert_close_to_oracle(make_case(7, 65, 100, features, seed=1), torch.float32)


@pytest.mark.parametrize("features", sorted(FEATURES))
def test_every_feature_fp32_three_by_three_tiles(features):
    """130 x 130 (or 130 x 150): three row and column tiles, a 2-column last tile, d = 100."""
    assert_close_to_oracle(make_case(130, 150, 100, features, seed=13), torch.float32)


@pytest.mark.parametrize("features", sorted(FEATURES))
def test_every_feature_fp16(features, path):
    assert_close_to_oracle(make_case(65, 70, 64, features, seed=2), torch.float16)


@pytest.mark.parametrize("features", ["plain", "margin", "all", "symmetric_all"])
def test_bf16_upcast_path(features, path):
    assert_close_to_oracle(make_case(30, 65, 100, features, seed=3), torch.bfloat16)


EDGES = (1, 7, 65, 130)
WIDTHS = (3, 64, 100)


@pytest.mark.parametrize("M", EDGES)
@pytest.mark.parametrize("N", EDGES)
def test_tile_edges(M, N):
    """Every M, N in {1, 7, 65, 130} (one 64-tile, a partial one, 2 and 3 tiles; M > N too,
    with explicit positives), d cycling through {3, 64, 100}."""
    d = WIDTHS[(EDGES.index(M) + EDGES.index(N)) % 3]
    assert_close_to_oracle(make_case(M, N, d, "positives", seed=M * 1000 + N), torch.float32)


@pytest.mark.parametrize(
    "M,N,d,features",
    [
        (1, 130, 64, "margin"),
        (7, 7, 3, "groups"),
        (65, 130, 3, "filter"),
        (130, 130, 64, "all"),
        (130, 130, 100, "adaptive_margin"),
        (65, 65, 100, "symmetric"),
        (130, 7, 100, "all"),
    ],
)
def test_tile_edges_with_features(M, N, d, features, path):
    assert_close_to_oracle(make_case(M, N, d, features, seed=M + N + d), torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("learn", [False, True])
def test_reductions_and_temperature(reduction, learn, path):
    case = make_case(33, 65, 64, "all", seed=4)
    assert_close_to_oracle(case, torch.float32, reduction, learn)


def test_near_duplicates_with_margin(path):
    """c -> 1 for some negatives: the margin's f' = cos m - c sin m / sqrt(max(1-c², eps))."""
    assert_close_to_oracle(make_case(20, 65, 64, "all", seed=5, duplicates=True), torch.float32)


def test_row_chunks_of_the_backward(monkeypatch):
    """A tiny scratch budget forces 128-row chunks and fp32 accumulation of d_key; bands of
    2 row tiles exercise the grouped tile order (a short last band included)."""
    monkeypatch.setenv("MMLOSS_TRITON_SCRATCH_MB", "0")
    monkeypatch.setattr(tk.configs, "GROUP_M", 2)
    monkeypatch.setattr(tk.ops, "SMALL_MAX", 0)
    assert tk.ops.chunk_shape(330, 65, 4) == (128, 65)
    assert_close_to_oracle(make_case(330, 65, 64, "positives", seed=6), torch.float32)


@pytest.mark.parametrize("features", ["positives", "symmetric_all"])
def test_row_and_column_chunks_of_the_backward(features, monkeypatch):
    """Beyond 128 rows' worth of columns the scratch is tiled in columns too: 300 rows x 300
    columns in 128 x 128 chunks (3 x 3, short last ones), dQ accumulated over column chunks."""
    monkeypatch.setenv("MMLOSS_TRITON_SCRATCH_MB", "0")
    monkeypatch.setattr(tk.ops, "SMALL_MAX", 0)
    assert tk.ops.chunk_shape(300, 300, 4) == (128, 128)
    assert_close_to_oracle(make_case(300, 300, 20, features, seed=16), torch.float32)


@pytest.mark.parametrize(
    "M,N,e",
    [
        (300, 2_000_000, 4),
        (256, 30_000_000, 2),
        (1, 10**9, 4),
        (10**6, 10**6, 2),
        (64, 64, 4),
        (5000, 100, 2),
        (100, 2_500_000, 4),
    ],
)
def test_backward_scratch_is_bounded_for_every_shape(M, N, e, monkeypatch):
    """The R x C scratch stays within the budget (1 GiB) for every M and N, small M with huge
    N included; whole rows while min(M, 128) of them fit (100 rows of 2.5M columns do, not
    128: once C came out wider than N there)."""
    monkeypatch.delenv("MMLOSS_TRITON_SCRATCH_MB", raising=False)
    budget = scratch_bytes("triton")
    R, C = tk.ops.chunk_shape(M, N, e)
    assert R * C * e <= budget
    assert 1 <= R <= M and 1 <= C <= N
    assert (C == N) == (min(M, 128) * N * e <= budget or N <= 128)


def _problem(case, q, k):
    kw = dict(case.kwargs)
    return build_problem(
        q,
        k,
        positives=kw.get("positives"),
        temperature=case.temperature,
        margin=kw["margin"],
        margin_teacher=kw.get("margin_teacher"),
        filter_teacher=kw.get("filter_teacher"),
        filter_threshold=kw.get("filter_threshold"),
        filter_normalize=kw.get("filter_normalize", False),
        key_groups=kw.get("key_groups"),
        symmetric=False,
        reduction="mean",
        backend=BACKEND,
        hardness_strength=kw.get("hardness_strength", 0.0),
        hardness_negatives=kw.get("hardness_negatives", "all"),
        hardness_owners=kw.get("hardness_owners"),
        multi_positive=kw.get("multi_positive", False),
    )


def _block(problem, lo, hi):
    """The problem restricted to key columns [lo, hi) (positives elsewhere fall outside)."""

    def cols(x):
        return None if x is None else x[lo:hi]

    return dataclasses.replace(
        problem,
        positives=problem.positives - lo,
        margin_key=cols(problem.margin_key),
        filter_key=cols(problem.filter_key),
        key_groups=cols(problem.key_groups),
        key_owners=cols(problem.key_owners),
    )


def test_key_blocks_combine_by_logsumexp(path):
    """Two key blocks: logsumexp of the block lse's and the sum of the positive logits equal
    the whole; backward with the global lse gives the whole's gradients block by block."""
    case = make_case(40, 100, 64, "all", seed=7)
    q, k = case.query.float(), case.key.float()
    kw = dict(case.kwargs)
    kw["margin_teacher"] = tuple(x.float() for x in kw["margin_teacher"])
    kw["filter_teacher"] = tuple(x.float() for x in kw["filter_teacher"])
    case = type(case)(q, k, case.temperature, kw)
    whole = _problem(case, q, k)
    inv_t = 1.0 / case.temperature
    lse, pos = tk.forward(q, k, inv_t, whole)
    split = 70
    parts = [(_block(whole, 0, split), k[:split]), (_block(whole, split, 100), k[split:])]
    outs = [tk.forward(q, kb, inv_t, p) for p, kb in parts]
    torch.testing.assert_close(torch.logsumexp(torch.stack([o[0] for o in outs]), 0), lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(outs[0][1] + outs[1][1], pos, rtol=1e-6, atol=1e-5)
    weight = torch.where(whole.valid_rows, torch.linspace(0.5, 1.5, 40), torch.zeros(40))
    dq, dk, dt = tk.backward(q, k, inv_t, whole, lse, weight, True)
    grads = [tk.backward(q, kb, inv_t, p, lse, weight, True) for p, kb in parts]
    torch.testing.assert_close(grads[0][0] + grads[1][0], dq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([grads[0][1], grads[1][1]]), dk, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][2] + grads[1][2], dt, rtol=1e-5, atol=1e-5)


def test_nan_filter_score_gives_nan_loss():
    case = make_case(7, 65, 16, "filter", seed=8)
    fq, fk = case.kwargs["filter_teacher"]
    fk = fk.clone()
    fk[3, 0] = float("nan")
    case.kwargs["filter_teacher"] = (fq, fk)
    loss = mmloss.contrastive_loss(
        case.query.float(),
        case.key.float(),
        temperature=case.temperature,
        reduction="none",
        backend=BACKEND,
        **case.kwargs,
    )
    assert torch.isnan(loss).all()


def test_teacher_dtype_may_differ_from_query():
    case = make_case(7, 65, 64, "all", seed=9)
    got, _ = loss_and_grads(case, BACKEND, torch.float32, teacher_dtype=torch.float16)
    want, _ = loss_and_grads(case, "oracle", torch.float32, teacher_dtype=torch.float16)
    assert math.isclose(float(got), float(want), rel_tol=1e-5)


def test_check_rejects_float64():
    case = make_case(3, 5, 4, "plain", seed=10)
    with pytest.raises(TypeError, match="query"):
        mmloss.contrastive_loss(case.query, case.key, backend=BACKEND)
    assert mmloss.contrastive_loss(case.query.float(), case.key.float(), backend=BACKEND).dtype == torch.float32


@pytest.mark.parametrize("scale", [1e-2, 1e2])
def test_fp16_embedding_scales(scale, path):
    """Raw embeddings far from unit norm: the scratch scale keeps fp16 H in range."""
    case = make_case(40, 70, 64, "all", seed=11)
    case = type(case)(case.query * scale, case.key * scale, case.temperature, case.kwargs)
    assert_close_to_oracle(case, torch.float16)


def test_zero_rows_follow_normalize_semantics(path):
    """A zero query row and a zero key column: x / max(||x||, eps), gradient U / eps."""
    case = make_case(20, 40, 32, "positives", seed=12)
    q, k = case.query.clone(), case.key.clone()
    q[3] = 0.0
    k[7] = 0.0
    assert_close_to_oracle(type(case)(q, k, case.temperature, case.kwargs), torch.float32)


class _LaunchLog(TorchDispatchMode):
    """Records the Triton kernels launched and the aten ops run between launches (the host
    code's own device work; the interpreter's copies inside a launch are not counted)."""

    def __init__(self):
        super().__init__()
        self.launches, self.host_ops, self.inside = [], [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.host_ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def wrap(self, name, kernel):
        log = self

        class Counted:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    log.launches.append(name)
                    log.inside = True
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        log.inside = False

                return launch

        return Counted()


@pytest.fixture
def launch_log(monkeypatch):
    log = _LaunchLog()
    for name in (
        "inv_norm_kernel",
        "forward_kernel",
        "combine_kernel",
        "column_lse_kernel",
        "grad_tile_kernel",
        "grad_gemm_kernel",
        "finish_kernel",
    ):
        counted = log.wrap(name, getattr(tk.kernels, name))
        monkeypatch.setattr(tk.kernels, name, counted)
        if name.replace("_kernel", "") in tk.ops.KERNELS:
            monkeypatch.setitem(tk.ops.KERNELS, name.replace("_kernel", ""), counted)
    return log


# Host-side aten ops that allocate or view without touching device memory (no launch).
NO_LAUNCH = {"empty", "empty_like", "slice", "view", "detach", "alias"}


def test_small_batch_forward_is_one_launch_and_backward_two(launch_log):
    """A small batch (float tau): the forward launches one kernel, the backward two, and the
    host code does no other device work (no fill, no GEMM, no copy)."""
    case = make_case(70, 70, 37, "all", seed=20)
    q, k = case.query.float(), case.key.float()
    kw = {n: (tuple(x.float() for x in v) if n.endswith("teacher") else v) for n, v in case.kwargs.items()}
    problem = _problem(type(case)(q, k, case.temperature, kw), q, k)  # fp32 teachers: no copies
    weight = torch.where(problem.valid_rows, torch.ones(70), torch.zeros(70))
    fields = tk.ops.fields(problem)
    # The ops' bodies (the custom ops themselves add no device work, only dispatch).
    tk.ops.run_forward(q, k, None, 20.0, fields, False)  # warm the cached device constants
    launch_log.launches.clear()
    with launch_log:
        lse, _, _ = tk.ops.run_forward(q, k, None, 20.0, fields, False)
        forward_launches = list(launch_log.launches)
        tk.ops.run_backward(q, k, None, 20.0, fields, lse, weight, True, None, None)
    assert forward_launches == ["forward_kernel"]
    assert launch_log.launches[1:] == ["grad_tile_kernel", "grad_gemm_kernel"]
    assert set(launch_log.host_ops) <= NO_LAUNCH, launch_log.host_ops


def test_symmetric_is_one_pass(launch_log):
    """A symmetric loss runs the forward kernel once (both directions' lse) and the tile
    kernel once, in both paths, and matches the reference."""
    case = make_case(65, 65, 40, "symmetric_all", seed=21)
    for small_max in (tk.ops.SMALL_MAX, 0):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tk.ops, "SMALL_MAX", small_max)
            launch_log.launches.clear()
            loss_and_grads(case, BACKEND, torch.float32, learn_temperature=True)
            assert launch_log.launches.count("forward_kernel") == 1, launch_log.launches
            assert launch_log.launches.count("grad_tile_kernel") == 1, launch_log.launches


def test_column_splits_combine(launch_log, monkeypatch):
    """The chunked forward over 4 column splits (the last one empty) and the combine kernel
    give the unsplit forward's lse and positive logits."""
    monkeypatch.setattr(tk.ops, "SMALL_MAX", 0)
    case = make_case(40, 150, 32, "all", seed=23)
    q, k = case.query.float(), case.key.float()
    problem = _problem(case, q, k)
    monkeypatch.setattr(tk.ops, "MIN_SPLIT_COLUMNS", 1 << 20)
    whole_lse, whole_pos = tk.forward(q, k, 20.0, problem)
    monkeypatch.setattr(tk.ops, "MIN_SPLIT_COLUMNS", 16)
    assert tk.ops.forward_splits(40, 150, q.device) == 4
    launch_log.launches.clear()
    lse, pos = tk.forward(q, k, 20.0, problem)
    assert launch_log.launches == ["inv_norm_kernel", "forward_kernel", "combine_kernel"]
    torch.testing.assert_close(lse, whole_lse, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(pos, whole_pos, rtol=0, atol=0)


def _op_args(features, M=7, N=20, d=16, seed=30, tensor_temp=True):
    """(query, key, inv_temp tensor or None, inv_temp value, fields..., problem) of a case
    (a FEATURES or an EXTRA_FEATURES set)."""
    case = (
        _extra_case(M, N, d, features, seed=seed)
        if features in EXTRA_FEATURES
        else make_case(M, N, d, features, seed=seed)
    )
    q, k = case.query.float(), case.key.float()
    kw = {n: (tuple(x.float() for x in v) if n.endswith("teacher") else v) for n, v in case.kwargs.items()}
    case = type(case)(q, k, case.temperature, kw)
    problem = _problem(case, q, k)
    inv_t = (
        (torch.tensor(1.0 / case.temperature, dtype=torch.float64), 0.0)
        if tensor_temp
        else (None, 1.0 / case.temperature)
    )
    return (q, k, *inv_t, *tk.ops.fields(problem)), problem


def test_every_op_takes_the_problem_fields_in_their_python_order():
    """The four ops' schemas: (query, key, inv_temp, inv_temp_value), then KERNEL_FIELDS in
    order with LossProblem's types, then the op's own inputs."""
    from mmloss.problem import KERNEL_FIELDS

    types = {
        "positives": "Tensor",
        "margin": "float",
        "filter_threshold": "float",
        "hardness_strength": "float",
        "hardness_scope": "int",
    }
    tails = {
        "triton_forward": [],
        "triton_forward_symmetric": [],
        "triton_backward": ["lse", "row_weight", "need_temp_grad"],
        "triton_backward_symmetric": ["lse", "row_weight", "need_temp_grad", "lse_col", "col_weight"],
    }
    for op, tail in tails.items():
        arguments = getattr(torch.ops.mmloss, op).default._schema.arguments
        names = [a.name for a in arguments]
        assert names == ["query", "key", "inv_temp", "inv_temp_value", *KERNEL_FIELDS, *tail], op
        fields = arguments[4 : 4 + len(KERNEL_FIELDS)]
        assert [str(a.type) for a in fields] == [types.get(a.name, "Optional[Tensor]") for a in fields], op


@pytest.mark.parametrize("features,tensor_temp", [("plain", False), ("all", True)])
def test_opcheck_forward_and_backward(features, tensor_temp, path):
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) of
    the one-direction ops."""
    args, problem = _op_args(features, tensor_temp=tensor_temp)
    torch.library.opcheck(torch.ops.mmloss.triton_forward.default, args)
    lse, _ = torch.ops.mmloss.triton_forward(*args)
    weight = torch.where(problem.valid_rows, torch.linspace(0.5, 1.5, 7), torch.zeros(7))
    torch.library.opcheck(torch.ops.mmloss.triton_backward.default, (*args, lse, weight, True))


def test_opcheck_symmetric(path):
    args, _ = _op_args("symmetric_all", M=20, tensor_temp=True)
    torch.library.opcheck(torch.ops.mmloss.triton_forward_symmetric.default, args)
    lse, lse_col, _ = torch.ops.mmloss.triton_forward_symmetric(*args)
    w = torch.linspace(0.5, 1.5, 20)
    torch.library.opcheck(torch.ops.mmloss.triton_backward_symmetric.default, (*args, lse, w, True, lse_col, w.flip(0)))


def test_ops_compile_with_fullgraph():
    """A step on the ops (forward, the loss, backward) compiles without a graph break and
    gives eager's numbers."""
    args, problem = _op_args("all", tensor_temp=True)
    weight = problem.valid_rows.float()

    def step(*a):
        lse, pos = torch.ops.mmloss.triton_forward(*a)
        dq, dk, dt = torch.ops.mmloss.triton_backward(*a, lse, weight, True)
        return (lse - pos).sum(), dq, dk, dt

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), step(*args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("learn", [False, True])
@pytest.mark.parametrize("features", sorted(FEATURES))
def test_contrastive_loss_compiles_as_shipped(features, learn):
    """torch.compile(fullgraph=True) of a training step calling contrastive_loss(backend=
    "triton") as shipped, nothing patched: every feature set (explicit and ignored positives
    included), a float and a learnable tau. No graph break (fullgraph raises on one: the
    backend's choice is a constant of the graph, the value checks are in-graph assertions),
    eager's loss and gradients, and the Triton backend recorded."""
    torch._dynamo.reset()  # each case traces its own graph (no recompile limit carried over)
    case = make_case(20, 20, 16, features, seed=31)

    def step(q, k, t):
        return mmloss.contrastive_loss(q, k, temperature=t, backend=BACKEND, **case.kwargs)

    results = []
    for run in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        q, k, t = case.inputs(torch.float32, learn)
        loss = run(q, k, t)
        loss.backward()
        assert mmloss.last_backend() == BACKEND
        results.append((loss.detach(), q.grad, k.grad) + ((t.grad,) if learn else ()))
    compiled, eager = results
    assert len(compiled) == len(eager) == 3 + learn
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_symmetric_tiny_learnable_temperature_is_exact(path):
    """tau = 1e-3 as a learnable tensor, 16 x 256: the one-pass column sums (running max
    per column, merged by compare-and-swap) give the float64 reference's loss (119.4) and
    gradients; the kernel module's symmetric pair is called directly (no gate in between)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, 256, generator=g), torch.randn(16, 256, generator=g)
    t = torch.tensor(1e-3, dtype=torch.float64, requires_grad=True)
    want = contrastive_loss_reference(
        q.double().requires_grad_(), k.double().requires_grad_(), temperature=t, symmetric=True, reduction="none"
    )
    want_grads = torch.autograd.grad(want.mean(), [t])
    problem = problem_of(q, k, temperature=t, symmetric=True, reduction="none", backend=BACKEND)
    inv_t = 1.0 / t.detach()
    lse, lse_col, pos = tk.forward_symmetric(q, k, inv_t, problem)
    rows = 0.5 * ((lse - pos) + (lse_col - pos))
    assert torch.isfinite(rows).all()
    torch.testing.assert_close(rows.mean(), want.detach().mean(), rtol=1e-6, atol=0)
    assert abs(float(rows.mean()) - 119.4) < 0.05
    w = torch.full((16,), 0.5 / 16)
    dq, dk, d_inv_t = tk.backward_symmetric(q, k, inv_t, problem, lse, lse_col, w, w, True)
    d_t = -d_inv_t / t.detach() ** 2  # d/dtau of 1/tau
    torch.testing.assert_close(d_t, want_grads[0], rtol=1e-4, atol=0)
    ref_q = q.double().requires_grad_()
    ref_k = k.double().requires_grad_()
    ref = contrastive_loss_reference(ref_q, ref_k, temperature=1e-3, symmetric=True)
    gq, gk = torch.autograd.grad(ref, [ref_q, ref_k])
    for got, want in ((dq, gq), (dk, gk)):  # fp32 logits of size 1/tau = 1000: ~1e-4 relative
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


@pytest.mark.parametrize("symmetric", [False, True])
def test_symmetric_tiny_temperature_through_contrastive_loss(symmetric, path):
    """The public call with tau = 1e-3 (float, and learnable below): finite and the reference's."""
    case = make_case(16, 16, 64, "symmetric" if symmetric else "plain", seed=32)
    case = type(case)(case.query, case.key, 1e-3, case.kwargs)
    assert_close_to_oracle(case, torch.float32, learn_temperature=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_rows_ignored_gives_zero_gradients(dtype, path):
    """A term whose rows are all ignored: zero gradients (no 0/0 anywhere, the fp16 scratch
    scale of zero weights included); the "sum" loss is 0, "mean" is 0/0 (NaN, as
    F.cross_entropy) and still back-propagates zeros."""
    g = torch.Generator().manual_seed(33)
    for reduction in ("sum", "mean", "none"):
        q = torch.randn(9, 16, generator=g).to(dtype).requires_grad_()
        k = torch.randn(70, 16, generator=g).to(dtype).requires_grad_()
        t = torch.tensor(0.05, requires_grad=True)
        loss = mmloss.contrastive_loss(
            q, k, positives=torch.full((9,), mmloss.IGNORE_INDEX), temperature=t, reduction=reduction, backend=BACKEND
        )
        if reduction != "mean":
            assert torch.equal(loss, torch.zeros_like(loss))
        loss.sum().backward()
        for grad in (q.grad, k.grad, t.grad):
            assert torch.equal(grad, torch.zeros_like(grad)), (reduction, grad)


def test_nearly_solved_row_keeps_its_relative_accuracy(path):
    """fp32, tau = 0.05, a positive that is a near-duplicate of its row: the true loss is
    1e-7 ... 1e-4 (lse and the positive's logit, ~20, agree to 6-9 digits), and reduction="none" gives it
    with a small relative error, not 0 (lse - pos would cancel in fp32)."""
    g = torch.Generator().manual_seed(34)
    q = torch.randn(5, 32, generator=g, dtype=torch.float64)
    k = torch.randn(70, 32, generator=g, dtype=torch.float64)
    k[:5] = q + 1e-4 * torch.randn(5, 32, generator=g, dtype=torch.float64)
    k[5:] = -k[5:].abs() * q[0].sign()  # far from every row
    want = contrastive_loss_reference(q, k, temperature=0.05, reduction="none")
    assert float(want.max()) < 1e-4 and float(want.min()) > 0
    got = mmloss.contrastive_loss(q.float(), k.float(), temperature=0.05, reduction="none", backend=BACKEND)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)


@pytest.mark.parametrize("learn", [False, True])
def test_fp32_rows_of_huge_and_tiny_norms(learn, path):
    """fp32 rows of 1e30 and 1e-30 (and ordinary ones) among queries and keys: the loss and
    the gradients are the float64 reference's (fp32 squares of 1e30 overflow, products of
    1e30 rows overflow and the backward's a_i b_j underflow unless scaled)."""
    q, k = scaled_rows(9, 70, 16, 40, [1e30, 1e-30, 1.0], [1e30, 1.0, 1e-25, 1.0])
    ref_inputs = (q.clone().requires_grad_(), k.clone().requires_grad_())
    t64 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    want = contrastive_loss_reference(*ref_inputs, temperature=t64 if learn else 0.05, reduction="none")
    want_grads = torch.autograd.grad(want.sum(), list(ref_inputs) + ([t64] if learn else []))
    qf, kf = q.float().requires_grad_(), k.float().requires_grad_()
    t32 = torch.tensor(0.05, requires_grad=True)
    got = mmloss.contrastive_loss(qf, kf, temperature=t32 if learn else 0.05, reduction="none", backend=BACKEND)
    grads = torch.autograd.grad(got.sum(), [qf, kf] + ([t32] if learn else []))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for g, w, x in zip(grads[:2], want_grads[:2], (q, k)):
        g, w = unit_scaled(g, x), unit_scaled(w, x)
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * float(w.abs().max()))
    if learn:
        torch.testing.assert_close(grads[2].double(), want_grads[2], rtol=1e-5, atol=0)


def test_fp32_power_of_two_scaling_changes_nothing(path):
    """Rows scaled by powers of two (2^100 ... 2^-30: norms above eps) give the unscaled rows'
    loss to the last bit and their gradients times the inverse scales (the kernels' own
    scaling is by powers of two, so it changes no rounding)."""
    q, k = scaled_rows(9, 70, 16, 41, [1.0], [1.0])
    s_q = torch.tensor([2.0**100, 2.0**-30, 1.0]).repeat(3)[:, None]
    s_k = torch.tensor([2.0**-30, 1.0, 2.0**100, 2.0**60]).repeat(18)[:70, None]
    runs = []
    for a, b in ((q.float(), k.float()), (q.float() * s_q, k.float() * s_k)):
        a, b = a.requires_grad_(), b.requires_grad_()
        loss = mmloss.contrastive_loss(a, b, temperature=0.05, reduction="none", backend=BACKEND)
        runs.append((loss,) + torch.autograd.grad(loss.sum(), [a, b]))
    (l0, dq0, dk0), (l1, dq1, dk1) = runs
    assert torch.equal(l0, l1)
    torch.testing.assert_close(dq1 * s_q, dq0, rtol=1e-6, atol=0)
    torch.testing.assert_close(dk1 * s_k, dk0, rtol=1e-6, atol=0)


def test_fp16_rows_of_norm_above_65504(path):
    """fp16 rows whose norm exceeds fp16's range (entries ~1e4, d = 64): loss and gradients
    are the float64 reference's on the same inputs (the fp16 reference itself overflows)."""
    q, k = scaled_rows(20, 70, 64, 42, [1e4, 1.0], [1e4])
    q, k = q.clamp(-6e4, 6e4).half(), k.clamp(-6e4, 6e4).half()
    assert float(q.double().norm(dim=1).max()) > 65504
    ref_inputs = (q.double().requires_grad_(), k.double().requires_grad_())
    want = contrastive_loss_reference(*ref_inputs, temperature=0.05, reduction="none")
    want_grads = torch.autograd.grad(want.sum(), ref_inputs)
    qh, kh = q.clone().requires_grad_(), k.clone().requires_grad_()
    got = mmloss.contrastive_loss(qh, kh, temperature=0.05, reduction="none", backend=BACKEND)
    grads = torch.autograd.grad(got.sum(), [qh, kh])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # Such rows' gradients (~1e-5) are fp16 subnormals, spaced 2^-24, and H enters the MMA in
    # fp16 (as for every fp16 input): a few units of that spacing.
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=2e-3, atol=4 * 2.0**-24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_similarity_and_topk_of_huge_rows(dtype):
    """similarity / topk_similarity (backend triton) of fp32 rows of 1e30 and 1e-30, and of
    fp16 rows of norm > 65504: the float64 cosines, and the float64 top-k columns."""
    from mmloss import similarity, topk_similarity

    if dtype == torch.float32:
        a, b = scaled_rows(9, 70, 16, 43, [1e30, 1e-30, 1.0], [1e30, 1.0, 1e-30])
    else:
        a, b = scaled_rows(9, 70, 64, 43, [1e4, 1.0], [1e4])
        a, b = a.clamp(-6e4, 6e4), b.clamp(-6e4, 6e4)
    a, b = a.to(dtype), b.to(dtype)
    want = torch.nn.functional.normalize(a.double(), dim=1) @ torch.nn.functional.normalize(b.double(), dim=1).T
    got = similarity(a, b, out_dtype=torch.float32, backend=BACKEND)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-3)
    scores, idx = topk_similarity(a, b, 5, block=32, backend=BACKEND)
    want_scores, want_idx = want.topk(5, dim=1)
    torch.testing.assert_close(scores.double(), want_scores, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-3)
    if dtype == torch.float32:
        assert torch.equal(idx, want_idx)


# The hardness penalty and several positives per row (docs/contract.md §3): a FEATURES set
# with these on top, (base, several positives, alpha, hardness_negatives).
EXTRA_FEATURES = {
    "hardness": ("positives", False, 0.8, "all"),
    "hardness_others_all": ("all", False, 1.5, "others"),
    "hardness_own_margin": ("margin", False, 2.0, "own"),
    "multi_positive": ("groups", True, 0.0, "all"),
    "multi_positive_hardness_all": ("all", True, 0.5, "own"),
    "multi_positive_filter": ("filter_normalize", True, 1.0, "others"),
}


def _extra_case(M, N, d, name, *, seed, **make):
    """make_case of the base set, with several positives per row (the case's key groups, or
    groups of ~3 columns) and/or the hardness penalty (owners: 4 row owners, key owners among
    them or -1)."""
    base, multi, alpha, negatives = EXTRA_FEATURES[name]
    case = make_case(M, N, d, base, seed=seed, **make)
    g = torch.Generator().manual_seed(seed + 1)
    M, N = case.query.shape[0], case.key.shape[0]
    kw = dict(case.kwargs)
    if multi:
        kw.setdefault("key_groups", torch.randint(0, max(1, N // 3), (N,), generator=g))
        kw["multi_positive"] = True
    if alpha:
        kw.update(hardness_strength=alpha, hardness_negatives=negatives)
        if negatives != "all":
            kw["hardness_owners"] = (torch.randint(0, 4, (M,), generator=g), torch.randint(-1, 4, (N,), generator=g))
    return dataclasses.replace(case, kwargs=kw)


@pytest.mark.parametrize("features", sorted(EXTRA_FEATURES))
def test_hardness_and_several_positives_fp32(features, path):
    """Through contrastive_loss against the float64 reference, learnable tau, both paths."""
    assert_close_to_oracle(_extra_case(7, 65, 100, features, seed=40), torch.float32)


@pytest.mark.parametrize("features", sorted(EXTRA_FEATURES))
def test_hardness_and_several_positives_three_by_three_tiles(features):
    """130 x 150, d = 37: three row and column tiles, short last ones; a float tau."""
    assert_close_to_oracle(_extra_case(130, 150, 37, features, seed=41), torch.float32, learn_temperature=False)


@pytest.mark.parametrize("features", sorted(EXTRA_FEATURES))
def test_hardness_and_several_positives_fp16(features, path):
    assert_close_to_oracle(_extra_case(65, 70, 64, features, seed=42), torch.float16)


@pytest.mark.parametrize(
    "M,N,d,features",
    [
        (1, 1, 3, "multi_positive"),
        (1, 131, 5, "hardness_own_margin"),
        (7, 7, 3, "multi_positive"),
        (67, 7, 37, "multi_positive_hardness_all"),
        (131, 67, 64, "hardness_others_all"),
        (65, 131, 100, "multi_positive_filter"),
    ],
)
def test_hardness_and_several_positives_at_tile_edges(M, N, d, features, path):
    assert_close_to_oracle(_extra_case(M, N, d, features, seed=M + N + d), torch.float32)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_hardness_and_several_positives_reductions(reduction, path):
    assert_close_to_oracle(_extra_case(33, 65, 64, "multi_positive_hardness_all", seed=43), torch.float32, reduction)


def test_several_positives_key_blocks_combine_by_logsumexp(path):
    """Two key blocks that split the rows' positive groups, with the hardness penalty by
    owner: logsumexp of the block lse's and the sum of the blocks' weighted positive logits
    equal the whole; backward with the global lse gives the whole's gradients block by block."""
    case = _extra_case(40, 100, 64, "multi_positive_hardness_all", seed=44)
    q, k = case.query.float(), case.key.float()
    kw = {n: (tuple(x.float() for x in v) if n.endswith("teacher") else v) for n, v in case.kwargs.items()}
    whole = _problem(type(case)(q, k, case.temperature, kw), q, k)
    inv_t = 1.0 / case.temperature
    lse, pos = tk.forward(q, k, inv_t, whole)
    split = 70
    parts = [(_block(whole, 0, split), k[:split]), (_block(whole, split, 100), k[split:])]
    in_both = ((whole.row_groups[:, None] == whole.key_groups[None, :split]).any(1)) & (
        (whole.row_groups[:, None] == whole.key_groups[None, split:]).any(1)
    )
    assert int(in_both.sum()) >= 5  # rows whose positives are in both blocks
    outs = [tk.forward(q, kb, inv_t, p) for p, kb in parts]
    torch.testing.assert_close(torch.logsumexp(torch.stack([o[0] for o in outs]), 0), lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(outs[0][1] + outs[1][1], pos, rtol=1e-6, atol=1e-5)
    weight = torch.where(whole.valid_rows, torch.linspace(0.5, 1.5, 40), torch.zeros(40))
    dq, dk, dt = tk.backward(q, k, inv_t, whole, lse, weight, True)
    grads = [tk.backward(q, kb, inv_t, p, lse, weight, True) for p, kb in parts]
    torch.testing.assert_close(grads[0][0] + grads[1][0], dq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([grads[0][1], grads[1][1]]), dk, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][2] + grads[1][2], dt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("partner", [False, True])
def test_several_positives_nearly_solved_rows_keep_their_accuracy(partner, path):
    """fp32, tau = 0.05, several positives per row: rows whose only positive is a
    near-duplicate (loss 1e-7 ... 1e-4, where lse and the positive logit agree to 6-9 digits)
    keep their relative accuracy in reduction="none" (the lse is carried relative to the
    weighted positive logit); with a second near-duplicate positive in the group (partner)
    the loss is log 2 + tiny, nothing cancels, and the error is the logits' own fp32 rounding
    (ulp(1/tau) ~ 2e-6 absolute)."""
    q, k, kw = nearly_solved_multi_positive(partner)
    want = contrastive_loss_reference(q, k, **kw)
    assert float(want.max()) < (math.log(2) + 1e-3 if partner else 1e-4) and float(want.min()) > 0
    got = mmloss.contrastive_loss(q.float(), k.float(), backend=BACKEND, **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-5 if partner else 1e-3, atol=0)


def test_symmetric_one_pass_rejects_hardness_and_several_positives():
    """The symmetric kernels take neither feature (the public call rejects them before): the
    op bodies raise a ValueError naming the field before any launch, as does an op call with
    several positives but no groups."""
    case = make_case(20, 20, 16, "groups", seed=46)
    q, k = case.query.float(), case.key.float()
    problem = _problem(case, q, k)
    hard = dataclasses.replace(problem, hardness_strength=1.0)
    multi = dataclasses.replace(problem, positive_weights=torch.ones(20, dtype=torch.float64))
    for bad, name in ((hard, "hardness_strength"), (multi, "positive_weights")):
        with pytest.raises(ValueError, match=name):
            tk.forward_symmetric(q, k, 20.0, bad)
        with pytest.raises(ValueError, match=name):
            tk.backward_symmetric(
                q, k, 20.0, bad, *([torch.zeros(20, dtype=torch.float64)] * 2), *([torch.ones(20)] * 2), True
            )
    with pytest.raises(ValueError, match="key_groups"):
        tk.forward(q, k, 20.0, dataclasses.replace(multi, key_groups=None, row_groups=None))
    with pytest.raises(ValueError, match="row_owners"):
        tk.forward(q, k, 20.0, dataclasses.replace(hard, hardness_scope=1))


@pytest.mark.parametrize("features", ["multi_positive_hardness_all", "hardness_others_all"])
def test_opcheck_with_hardness_and_several_positives(features, path):
    args, problem = _op_args(features, M=9, N=20, tensor_temp=features.startswith("multi"))
    torch.library.opcheck(torch.ops.mmloss.triton_forward.default, args)
    lse, _ = torch.ops.mmloss.triton_forward(*args)
    weight = torch.where(problem.valid_rows, torch.linspace(0.5, 1.5, 9), torch.zeros(9))
    torch.library.opcheck(torch.ops.mmloss.triton_backward.default, (*args, lse, weight, True))


def test_small_batch_launches_with_hardness_and_several_positives(launch_log):
    """The small path keeps one forward and two backward launches, and no host device work,
    with both features on (positive_weights and the owners are read as they are)."""
    case = _extra_case(70, 70, 37, "multi_positive_hardness_all", seed=47)
    q, k = case.query.float(), case.key.float()
    kw = {n: (tuple(x.float() for x in v) if n.endswith("teacher") else v) for n, v in case.kwargs.items()}
    problem = _problem(type(case)(q, k, case.temperature, kw), q, k)
    weight = torch.where(problem.valid_rows, torch.ones(70), torch.zeros(70))
    fields = tk.ops.fields(problem)
    tk.ops.run_forward(q, k, None, 20.0, fields, False)
    launch_log.launches.clear()
    with launch_log:
        lse, _, _ = tk.ops.run_forward(q, k, None, 20.0, fields, False)
        tk.ops.run_backward(q, k, None, 20.0, fields, lse, weight, True, None, None)
    assert launch_log.launches[1:] == ["grad_tile_kernel", "grad_gemm_kernel"]
    assert launch_log.launches[0] == "forward_kernel"
    assert set(launch_log.host_ops) <= NO_LAUNCH, launch_log.host_ops


@pytest.mark.parametrize("learn", [False, True])
def test_contrastive_loss_with_both_features_compiles_as_shipped(learn):
    """fullgraph torch.compile of a step with several positives and the hardness penalty."""
    torch._dynamo.reset()
    case = _extra_case(20, 20, 16, "multi_positive_hardness_all", seed=48)

    def step(q, k, t):
        return mmloss.contrastive_loss(q, k, temperature=t, backend=BACKEND, **case.kwargs)

    results = []
    for run in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        q, k, t = case.inputs(torch.float32, learn)
        loss = run(q, k, t)
        loss.backward()
        assert mmloss.last_backend() == BACKEND
        results.append((loss.detach(), q.grad, k.grad) + ((t.grad,) if learn else ()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
