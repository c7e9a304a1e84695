"""bf16 inputs on the cpu backend's 16-bit GEMMs (csrc/cpu/gemm16.h: bf16 products, fp32 sums
and output; the keys packed once per call, the gradient tile rounded to bf16) and on the fp32
path it replaces (keys upcast a chunk at a time; MMLOSS_CPU_GEMM16=0, and every CPU without
the bf16 microkernel), fp16 on the fp32 path: loss and gradients against float64 for every
feature at awkward sizes (odd d, N and strip rows: the pair layouts' zero padding), in strips
spanning every column (fused, 3 GEMMs) and in column tiles (two passes)."""

from __future__ import annotations

import pytest
import torch

import mmloss
import mmloss.cpu
from mmloss.backends import compiled_extension, unavailable_reason
from tests.cases import FEATURES, assert_matches_reference, make_case

pytestmark = pytest.mark.skipif(
    unavailable_reason("cpu", torch.device("cpu")) is not None, reason="needs the compiled CPU backend"
)
_C = compiled_extension()
GEMM16 = _C is not None and _C.cpu_gemm16() == "brgemm-bf16"
SIZES = ((1, 1, 1), (37, 41, 19), (64, 130, 20))  # (M, N, d); symmetric cases take N = M


def _use(monkeypatch, path: str, tiles: bool) -> None:
    if path == "gemm16" and not GEMM16:
        pytest.skip("this CPU has no bf16 microkernel (bf16 takes the fp32 path)")
    monkeypatch.setenv("MMLOSS_CPU_GEMM16", "1" if path == "gemm16" else "0")
    if tiles:  # strips of 3 rows, column tiles of 5 (4 on the 16-bit path: even widths)
        monkeypatch.setenv("MMLOSS_CPU_SCRATCH_MB", "0")
        monkeypatch.setattr(mmloss.cpu, "MIN_STRIP_ROWS", 3)
        monkeypatch.setattr(mmloss.cpu, "MIN_TILE_COLS", 5)


@pytest.mark.parametrize("tiles", [False, True], ids=["full_width", "column_tiles"])
@pytest.mark.parametrize("dtype,path", [(torch.bfloat16, "gemm16"), (torch.bfloat16, "fp32"), (torch.float16, "fp32")])
@pytest.mark.parametrize("features", sorted(FEATURES))
def test_16bit_inputs_match_float64(features, dtype, path, tiles, monkeypatch):
    _use(monkeypatch, path, tiles)
    for M, N, d in SIZES:
        case = make_case(M, N, d, features, seed=M + N + d)
        assert_matches_reference(case, "cpu", dtype, learn_temperature=True)


def test_the_extension_names_the_path_bf16_takes(monkeypatch):
    assert _C.cpu_gemm16() in ("brgemm-bf16", "fp32")
    monkeypatch.setenv("MMLOSS_CPU_GEMM16", "0")
    assert _C.cpu_gemm16() == "fp32"


@pytest.mark.parametrize("tiles", [False, True], ids=["full_width", "column_tiles"])
def test_bf16_logits_are_fp32_accumulated_products(tiles, monkeypatch):
    """lse and the positive logits of bf16 inputs (d = 768, τ = 0.05) against the float64 op on
    the same rounded inputs: fp32 sums (relative error ~1e-6), not bf16-rounded products
    (~4e-3 of a logit of 20)."""
    _use(monkeypatch, "gemm16", tiles)
    g = torch.Generator().manual_seed(5)
    M, N, d = 45, 301, 768
    k = torch.randn(N, d, generator=g, dtype=torch.float64)
    q = (k[:M] + torch.randn(M, d, generator=g, dtype=torch.float64)).bfloat16()
    k = k.bfloat16()
    kwargs = {"temperature": 0.05, "backend": "cpu", "reduction": "none"}
    got = mmloss.contrastive_loss(q, k, **kwargs).double()
    want = mmloss.contrastive_loss(q.double(), k.double(), **kwargs)
    assert float(((got - want).abs() / want.abs()).max()) < 2e-5


def test_bf16_nan_in_gives_nan_out(monkeypatch):
    _use(monkeypatch, "gemm16", tiles=False)
    case = make_case(9, 12, 10, "plain", seed=2)
    q, k = case.query.bfloat16().requires_grad_(True), case.key.clone()
    k[3, 4] = float("nan")
    k = k.bfloat16().requires_grad_(True)
    loss = mmloss.contrastive_loss(q, k, backend="cpu", reduction="none")
    loss.sum().backward()
    assert torch.isnan(loss).all() and torch.isnan(q.grad).all()


@pytest.mark.parametrize("switch", [None, "0"])
def test_bf16_on_fp32_gemms_is_never_silent(switch, monkeypatch):
    """A CPU whose bf16 microkernel fails the probe runs bf16 on fp32 GEMMs with a warning;
    MMLOSS_CPU_GEMM16=0 asks for that path, so it runs without one."""
    import types
    import warnings

    import mmloss.backends
    from mmloss.problem import LossProblem

    failed_probe = types.SimpleNamespace(cpu_gemm16=lambda: "fp32")
    monkeypatch.setattr(mmloss.backends, "compiled_extension", lambda: failed_probe)
    if switch is None:
        monkeypatch.delenv("MMLOSS_CPU_GEMM16", raising=False)
    else:
        monkeypatch.setenv("MMLOSS_CPU_GEMM16", switch)
    mmloss.cpu._warn_if_bf16_on_fp32_gemms.cache_clear()
    q = torch.randn(3, 4, dtype=torch.bfloat16)
    problem = LossProblem(positives=torch.arange(3), valid_rows=torch.ones(3, dtype=torch.bool))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mmloss.cpu.check(q, problem)
    mmloss.cpu._warn_if_bf16_on_fp32_gemms.cache_clear()
    messages = [str(w.message) for w in caught if "bf16 inputs run on fp32 GEMMs" in str(w.message)]
    assert len(messages) == (0 if switch == "0" else 1), messages
