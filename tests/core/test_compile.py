"""torch.compile(fullgraph=True) of training steps that call `contrastive_loss` (every feature,
every reduction, fixed and learnable temperature) and each method loss, on the CPU backend:
no graph break (fullgraph raises on one) and the loss and every gradient match eager. The
kernels are torch.library ops with fake implementations; the checks that read tensor values
become in-graph assertions while compiling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmloss
from mmloss.backends import unavailable_reason
from tests.cases import FEATURES, make_case, shifted_seed

pytestmark = pytest.mark.skipif(
    unavailable_reason("cpu", torch.device("cpu")) is not None, reason="needs the compiled CPU backend"
)

D_IN = 7  # width of the encoder inputs


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test traces its own graphs (no recompile limit carried over)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Encoders(nn.Module):
    """Two linear encoders and a learnable temperature: a training step's parameters."""

    def __init__(self, d: int, learn_temperature: bool, seed: int):
        super().__init__()
        torch.manual_seed(shifted_seed(seed))
        self.query = nn.Linear(D_IN, d, dtype=torch.float64)
        self.key = nn.Linear(D_IN, d, dtype=torch.float64)
        self.temperature = nn.Parameter(torch.tensor(0.07, dtype=torch.float64)) if learn_temperature else 0.07


def step_grads(step, model: nn.Module, *inputs):
    """Loss of `step(model, *inputs)` (reduced to a scalar with fixed weights) and the
    gradients of the parameters it uses."""
    loss = step(model, *inputs)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad((loss * weights).sum(), list(model.parameters()), allow_unused=True)
    return loss.detach(), [g for g in grads if g is not None]


def assert_compiled_matches_eager(step, model, *inputs, backend="aot_eager"):
    eager_loss, eager_grads = step_grads(step, model, *inputs)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss, grads = step_grads(compiled, model, *inputs)
    assert len(grads) == len(eager_grads) > 0
    torch.testing.assert_close(loss, eager_loss, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert mmloss.last_backend() == "cpu"


def _core_step(kwargs, reduction):
    def step(model, x_query, x_key):
        return mmloss.contrastive_loss(
            model.query(x_query),
            model.key(x_key),
            temperature=model.temperature,
            reduction=reduction,
            backend="cpu",
            **kwargs,
        )

    return step


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("features", sorted(FEATURES))
def test_contrastive_loss_every_feature(features, reduction):
    i = sorted(FEATURES).index(features)
    case = make_case(9, 11, 6, features, seed=i)
    M, N = case.query.shape[0], case.key.shape[0]
    g = torch.Generator().manual_seed(shifted_seed(100 + i))
    x_query = torch.randn(M, D_IN, generator=g, dtype=torch.float64)
    x_key = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    model = Encoders(6, learn_temperature=i % 2 == 0, seed=i)
    assert_compiled_matches_eager(_core_step(case.kwargs, reduction), model, x_query, x_key)


@pytest.mark.parametrize("features", ["all", "symmetric_all"])
def test_inductor_float32(features):
    """The default backend (inductor) in float32, a learnable temperature."""
    case = make_case(12, 10, 5, features, seed=3)
    kwargs = {
        name: tuple(x.float() for x in value) if isinstance(value, tuple) else value
        for name, value in case.kwargs.items()
    }
    model = Encoders(5, learn_temperature=True, seed=4).float()
    x = torch.randn(12, D_IN), torch.randn(case.key.shape[0], D_IN)
    eager_loss, eager_grads = step_grads(_core_step(kwargs, "mean"), model, *x)
    loss, grads = step_grads(torch.compile(_core_step(kwargs, "mean"), fullgraph=True), model, *x)
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_value_checks_are_assertions_in_the_graph():
    """positives out of range and a non-positive temperature: ValueError eagerly; the same rule
    as a RuntimeError from the compiled graph, which has no graph break for the check."""
    q, k = torch.randn(4, 3), torch.randn(5, 3)

    def loss(q, k, positives, temperature):
        return mmloss.contrastive_loss(q, k, positives=positives, temperature=temperature, backend="cpu")

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    good, bad = torch.tensor([0, 1, 2, -100]), torch.tensor([0, 1, 7, 2])
    tau, negative = torch.tensor(0.1), torch.tensor(-0.1)
    torch.testing.assert_close(compiled(q, k, good, tau), loss(q, k, good, tau))
    with pytest.raises(ValueError, match=r"positives must be column indices in \[0, 5\)"):
        loss(q, k, bad, tau)
    with pytest.raises(RuntimeError, match=r"positives must be column indices in \[0, 5\)"):
        compiled(q, k, bad, tau)
    with pytest.raises(RuntimeError, match="temperature must be finite and > 0"):
        compiled(q, k, good, negative)


def test_batch_sizes_that_change_between_steps():
    """A loop whose batches change size (a short last batch): dynamo recompiles with dynamic
    shapes, still without a graph break."""

    def step(q, k, t, positives, key_groups):
        return mmloss.contrastive_loss(
            q, k, temperature=t, positives=positives, key_groups=key_groups, margin=0.1, backend="cpu"
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(shifted_seed(5))
    for M, N in [(8, 10), (6, 9), (5, 7)]:
        q, k = torch.randn(M, 4, generator=g, requires_grad=True), torch.randn(N, 4, generator=g, requires_grad=True)
        t = torch.tensor(0.1, requires_grad=True)
        args = (q, k, t, torch.randint(0, N, (M,), generator=g), torch.randint(0, 3, (N,), generator=g))
        got, want = compiled(*args), step(*args)
        torch.testing.assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got, (q, k, t)), torch.autograd.grad(want, (q, k, t))):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("symmetric", [False, True])
def test_float_temperature_that_changes_between_steps(symmetric):
    """A float tau passed to the compiled step and changed between steps (a schedule): dynamo
    recompiles it as a symbolic float, which the temperature check takes without a graph
    break (math.isfinite could not); the loss and gradients stay eager's."""

    def step(q, k, t):
        return mmloss.contrastive_loss(q, k, temperature=t, symmetric=symmetric, backend="cpu")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(shifted_seed(6))
    q = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for t in (0.05, 0.07, 0.1):
        got, want = compiled(q, k, t), step(q, k, t)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(got, (q, k)), torch.autograd.grad(want, (q, k))):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_auto_is_chosen_and_recorded_when_the_graph_is_traced():
    from mmloss import backends

    q, k = torch.randn(6, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    backends.record("reference")
    compiled = torch.compile(
        lambda q, k: mmloss.contrastive_loss(q, k, margin=0.1), fullgraph=True, backend="aot_eager"
    )
    loss = compiled(q, k)
    assert mmloss.last_backend() == "cpu"
    torch.testing.assert_close(loss, mmloss.contrastive_loss(q, k, margin=0.1, backend="cpu"), rtol=0, atol=0)


def _method_inputs(seed: int):
    """Raw inputs of every method's arguments (encoded by linear maps in the step)."""
    g = torch.Generator().manual_seed(shifted_seed(seed))
    raw = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "z1": raw(6, D_IN),
        "z2": raw(6, D_IN),
        "s1": raw(6, D_IN),
        "s2": raw(6, D_IN),
        "m": raw(6, D_IN),
        "phrases": raw(9, D_IN),
        "objects": raw(5, D_IN),
        "image_features": raw(6, 4),
        "text_features": raw(6, 4),
    }


class MethodModel(nn.Module):
    """One linear head per embedding argument of the method losses."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(shifted_seed(seed))
        self.text = nn.Linear(D_IN, 8, dtype=torch.float64)
        self.ground = nn.Linear(D_IN, 5, dtype=torch.float64)
        self.vision = nn.Linear(D_IN, 5, dtype=torch.float64)


def _method_steps():
    image_ids = torch.tensor([0, 0, 1, 2, 2, 3])
    phrase_object = torch.tensor([0, 1, -100, 2, 4, 4, 3, -100, 0])
    object_groups = torch.tensor([0, 0, 1, 1, 2])

    def simcse(model, x):
        return mmloss.SimCSELoss(backend="cpu")(model.text(x["z1"]), model.text(x["z2"])).total

    def mcse(model, x):
        loss = mmloss.MCSELoss(vl_weight=0.5, backend="cpu")
        return loss(
            model.text(x["z1"]),
            model.text(x["z2"]),
            model.ground(x["s1"]),
            model.ground(x["s2"]),
            model.vision(x["m"]),
            image_ids=image_ids,
        ).total

    def mcseo(model, x):
        loss = mmloss.MCSEOLoss(vl_weight=0.5, op_weight=0.5, backend="cpu")
        return loss(
            model.text(x["z1"]),
            model.text(x["z2"]),
            model.ground(x["s1"]),
            model.ground(x["s2"]),
            model.vision(x["m"]),
            image_ids=image_ids,
            phrases=model.ground(x["phrases"]),
            objects=model.vision(x["objects"]),
            phrase_object=phrase_object,
            object_groups=object_groups,
        ).total

    def kdmcse(model, x):
        loss = mmloss.KDMCSELoss(vl_weight=0.5, filter_threshold=0.6, filter_normalize=True, backend="cpu")
        return loss(
            model.text(x["z1"]),
            model.text(x["z2"]),
            model.ground(x["s1"]),
            model.ground(x["s2"]),
            model.vision(x["m"]),
            model.vision(x["s1"]),
            x["image_features"],
            x["text_features"],
            image_ids=image_ids,
        ).total

    return {"simcse": simcse, "mcse": mcse, "mcseo": mcseo, "kdmcse": kdmcse}


@pytest.mark.parametrize("method", ["simcse", "mcse", "mcseo", "kdmcse"])
def test_method_losses(method):
    seed = ["simcse", "mcse", "mcseo", "kdmcse"].index(method)
    assert_compiled_matches_eager(_method_steps()[method], MethodModel(seed), _method_inputs(seed))
