"""Every bad input fails before any kernel runs, with an error that names the argument."""

import math

import pytest
import torch

import mmloss
from mmloss.kernel_common import triton_interpreted


def _inputs(M=4, N=5, d=3, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.randn(M, d, dtype=dtype), torch.randn(N, d, dtype=dtype)


q, k = _inputs()
t4 = torch.randn(4, 2)
t5 = torch.randn(5, 2)

BAD = [
    # (kwargs overriding query/key or adding options, error type, text the message must contain)
    (dict(query=q[0]), ValueError, "query must be 2-D"),
    (dict(key=k[None]), ValueError, "key must be 2-D"),
    (dict(query=[[1.0]]), TypeError, "query must be a torch.Tensor"),
    (dict(query=q.to(torch.int32)), TypeError, "query dtype"),
    (dict(key=k.double()), TypeError, "key dtype"),
    (dict(key=torch.randn(5, 4)), ValueError, "key width"),
    (dict(query=torch.randn(0, 3)), ValueError, "query is empty"),
    (dict(key=torch.randn(0, 3)), ValueError, "key is empty"),
    (dict(query=torch.randn(4, 0), key=torch.randn(5, 0)), ValueError, "query is empty"),
    (dict(query=torch.randn(6, 3)), ValueError, "positives=None"),
    (dict(positives=torch.tensor([0, 1, 2, 3.0])), TypeError, "positives must have dtype"),
    (dict(positives=torch.tensor([0, 1, 2])), ValueError, "positives must have shape"),
    (dict(positives=torch.tensor([0, 1, 2, 5])), ValueError, "positives must be column indices"),
    (dict(positives=torch.tensor([0, 1, 2, -1])), ValueError, "positives must be column indices"),
    (dict(positives=[0, 1, 2, 3]), TypeError, "positives must be an integer torch.Tensor"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=-0.1), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=math.inf), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=math.nan), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=5e-324), ValueError, "with a finite 1/temperature"),
    (dict(temperature=torch.tensor(math.inf)), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=torch.tensor(0.0)), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=torch.tensor([0.05])), ValueError, "temperature must be a float or a 0-dim"),
    (dict(temperature=torch.tensor(-1.0)), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=torch.tensor(1)), TypeError, "temperature tensor must be floating"),
    (dict(temperature="0.05"), TypeError, "temperature must be a float"),
    (dict(margin=-0.1), ValueError, "margin must be in [0, pi/2)"),
    (dict(margin=math.pi / 2), ValueError, "margin must be in [0, pi/2)"),
    (dict(margin=float("nan")), ValueError, "margin must be in [0, pi/2)"),
    (dict(margin=None), TypeError, "margin must be a float"),
    (dict(margin_teacher=t4), TypeError, "margin_teacher must be a pair"),
    (dict(margin_teacher=(t4, torch.randn(4, 2))), ValueError, "margin_teacher[1] must have shape (5, dt)"),
    (
        dict(margin_teacher=(t4, torch.randn(5, 3))),
        ValueError,
        "margin_teacher: the two teacher tensors have different widths",
    ),
    (
        dict(margin_teacher=(t4, t5.double())),
        TypeError,
        "margin_teacher: the two teacher tensors have different dtypes",
    ),
    (dict(margin_teacher=(t4.long(), t5.long())), TypeError, "margin_teacher[0] dtype"),
    (dict(filter_teacher=(t4, t5)), ValueError, "filter_threshold is required"),
    (dict(filter_threshold=0.5), ValueError, "filter_threshold was given without filter_teacher"),
    (dict(filter_teacher=(t4, t5), filter_threshold="high"), TypeError, "filter_threshold must be a float"),
    (dict(filter_teacher=(t4, t5), filter_threshold=float("nan")), ValueError, "filter_threshold must not be NaN"),
    (
        dict(filter_teacher=(t4, t5), filter_threshold=0.5, filter_normalize=1),
        TypeError,
        "filter_normalize must be a bool",
    ),
    (dict(filter_teacher=(t4[:, :1], t5)), ValueError, "filter_teacher: the two teacher tensors have different widths"),
    (dict(key_groups=torch.zeros(4, dtype=torch.long)), ValueError, "key_groups must have shape (5,)"),
    (dict(key_groups=torch.zeros(5)), TypeError, "key_groups must have dtype"),
    (dict(key=k.to("meta")), ValueError, "key is on meta but query is on cpu"),
    (dict(positives=torch.arange(4, device="meta")), ValueError, "positives is on meta"),
    (dict(temperature=torch.tensor(0.1, device="meta")), ValueError, "temperature is on meta"),
    (dict(margin_teacher=(t4, t5.to("meta"))), ValueError, "margin_teacher[1] is on meta"),
    (dict(key_groups=torch.zeros(5, dtype=torch.long, device="meta")), ValueError, "key_groups is on meta"),
    (dict(symmetric=True), ValueError, "symmetric=True needs as many keys as queries"),
    (
        dict(key=torch.randn(4, 3), symmetric=True, positives=torch.arange(4)),
        ValueError,
        "positives must be None when symmetric",
    ),
    (dict(symmetric="yes"), TypeError, "symmetric must be a bool"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(filter_teacher=(t4, t5), filter_threshold=torch.zeros(5)), ValueError, "filter_threshold tensor must have"),
    (
        dict(filter_teacher=(t4, t5), filter_threshold=torch.zeros(4, dtype=torch.long)),
        TypeError,
        "filter_threshold tensor",
    ),
    (
        dict(filter_teacher=(t4, t5), filter_threshold=torch.zeros(4, device="meta")),
        ValueError,
        "filter_threshold is on meta",
    ),
    (dict(multi_positive=True), ValueError, "multi_positive=True needs key_groups"),
    (dict(multi_positive=1, key_groups=torch.arange(5)), TypeError, "multi_positive must be a bool"),
    (dict(hardness_strength=-1.0), ValueError, "hardness_strength must be finite and >= 0"),
    (dict(hardness_strength=math.inf), ValueError, "hardness_strength must be finite and >= 0"),
    (dict(hardness_strength="5"), TypeError, "hardness_strength must be a float"),
    (dict(hardness_strength=5.0, hardness_negatives="in_batch"), ValueError, "hardness_negatives must be one of"),
    (
        dict(hardness_strength=5.0, hardness_negatives="own"),
        ValueError,
        "hardness_negatives='own' needs hardness_owners",
    ),
    (
        dict(hardness_strength=5.0, hardness_owners=(torch.arange(4), torch.arange(5))),
        ValueError,
        "hardness_owners is only used with",
    ),
    (
        dict(hardness_strength=5.0, hardness_negatives="others", hardness_owners=(torch.arange(4), torch.arange(4))),
        ValueError,
        "hardness_owners[1] must have shape (5,)",
    ),
    (
        dict(hardness_strength=5.0, hardness_negatives="others", hardness_owners=torch.arange(4)),
        TypeError,
        "hardness_owners must be a pair",
    ),
    (
        dict(key=torch.randn(4, 3), symmetric=True, hardness_strength=1.0),
        ValueError,
        "symmetric=True does not take hardness_strength",
    ),
    (
        dict(key=torch.randn(4, 3), symmetric=True, multi_positive=True, key_groups=torch.arange(4)),
        ValueError,
        "symmetric=True does not take multi_positive",
    ),
    (
        dict(key=torch.randn(4, 3), symmetric=True, filter_teacher=(t4, t4), filter_threshold=torch.zeros(4)),
        ValueError,
        "symmetric=True does not take a per-row filter_threshold",
    ),
    (dict(backend="fast"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("overrides,error,text", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_names_the_argument(overrides, error, text):
    args = dict(query=q, key=k, backend="reference")
    args.update(overrides)
    query, key = args.pop("query"), args.pop("key")
    with pytest.raises(error) as info:
        mmloss.contrastive_loss(query, key, **args)
    assert text in str(info.value)


def test_checks_run_before_any_kernel(monkeypatch):
    def explode(*args, **kwargs):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr("mmloss.cpu.forward", explode)
    monkeypatch.setattr("mmloss.cpu.forward_with_grad", explode)
    with pytest.raises(ValueError, match="positives"):
        mmloss.contrastive_loss(q, k, positives=torch.tensor([9, 0, 0, 0]), backend="cpu")


def test_named_backend_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="backend 'triton' runs on CUDA tensors"):
        if triton_interpreted():
            pytest.skip("TRITON_INTERPRET=1 lets triton run on CPU tensors")
        mmloss.contrastive_loss(q, k, backend="triton")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        mmloss.contrastive_loss(q, k, backend="cuda")


def test_auto_says_which_backend_ran():
    mmloss.contrastive_loss(q, k, backend="auto")
    assert mmloss.last_backend() == "cpu"
    mmloss.contrastive_loss(q, k, backend="reference")
    assert mmloss.last_backend() == "reference"


def test_all_rows_ignored():
    positives = torch.full((4,), mmloss.IGNORE_INDEX)
    for backend in ("reference", "cpu"):
        assert mmloss.contrastive_loss(q, k, positives=positives, backend=backend) == 0  # a mean over no rows
        assert mmloss.contrastive_loss(q, k, positives=positives, reduction="sum", backend=backend) == 0
        rows = mmloss.contrastive_loss(q, k, positives=positives, reduction="none", backend=backend)
        assert rows.shape == (4,) and (rows == 0).all()


def test_nan_tensor_temperature_gives_nan_out():
    """A tensor τ is checked at run time: NaN (a learnt τ gone bad) gives NaN out, not an error."""
    for backend in ("reference", "cpu"):
        assert torch.isnan(mmloss.contrastive_loss(q, k, temperature=torch.tensor(math.nan), backend=backend))


def test_output_dtypes():
    for dtype, want in (
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ):
        query, key = _inputs(dtype=dtype)
        assert mmloss.contrastive_loss(query, key, backend="cpu").dtype == want
