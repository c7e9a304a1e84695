"""The CPU kernels' instruction-set variants (csrc/cpu/strip_kernels.cpp compiled once per
ISA, chosen at run time): the extension names the one that runs, each compiled variant this
CPU supports matches the float64 reference (forced with MMLOSS_CPU_ISA in a fresh process,
since the choice is made once per process), and a variant it cannot run is a clear error."""

import os
import subprocess
import sys

import pytest

from mmloss.backends import compiled_extension

_C = compiled_extension()
if _C is None:
    pytest.skip("mmloss._C is not built", allow_module_level=True)

VARIANTS = dict(_C.cpu_isas())

_CHECK_AGAINST_REFERENCE = """
import os
import torch
import mmloss.cpu
from mmloss import _C
from tests.cases import assert_matches_reference, make_case
for tiles in (False, True):
    if tiles:  # strips of 3 rows, tiles of 5 columns
        os.environ["MMLOSS_CPU_SCRATCH_MB"] = "0"
        mmloss.cpu.MIN_STRIP_ROWS, mmloss.cpu.MIN_TILE_COLS = 3, 5
    for features, (M, N) in (("all", (37, 41)), ("symmetric_all", (23, 23)), ("margin", (9, 130))):
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            case = make_case(M, N, 19, features, seed=M + N)
            assert_matches_reference(case, "cpu", dtype, learn_temperature=True)
print(_C.cpu_isa())
"""


def _run(isa: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MMLOSS_CPU_ISA": isa}
    return subprocess.run(
        [sys.executable, "-c", _CHECK_AGAINST_REFERENCE], capture_output=True, text=True, timeout=600, env=env
    )


def test_the_extension_reports_the_widest_variant_this_cpu_runs():
    assert VARIANTS, "no CPU kernel variant compiled"
    if os.environ.get("MMLOSS_CPU_ISA"):
        pytest.skip("MMLOSS_CPU_ISA forces a variant")
    widest = next(name for name, runs in _C.cpu_isas() if runs)
    assert _C.cpu_isa() == widest


@pytest.mark.parametrize("isa", sorted(VARIANTS))
def test_each_compiled_variant_matches_the_float64_reference(isa):
    out = _run(isa)
    if not VARIANTS[isa]:
        assert out.returncode != 0 and f"MMLOSS_CPU_ISA={isa}: this CPU lacks" in out.stderr, out.stderr[-2000:]
        pytest.skip(f"this CPU cannot run {isa} (and says so)")
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1] == isa


def test_a_variant_that_is_not_compiled_is_a_clear_error():
    out = _run("sse9")
    assert out.returncode != 0
    assert "MMLOSS_CPU_ISA=sse9 is not a CPU kernel variant of this build (compiled: " in out.stderr, out.stderr[-2000:]
