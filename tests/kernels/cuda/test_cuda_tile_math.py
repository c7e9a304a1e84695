"""The shared per-element and per-row math (csrc/include/mmloss/tile_math.h) on the host: the
CPU backend's suites exercise it through the kernels; this checks the functions the CUDA
kernels use beyond the CPU's path (online log-sum-exp update and merge, float instances)
directly against float64 Python, compiled with the host C++ compiler (no GPU, no torch)."""

import math
import shutil
import subprocess

import pytest

from tests.repo import REPO

ROOT = REPO
CXX = shutil.which("g++") or shutil.which("c++")

PROGRAM = r"""
#include <cstdio>
#include <cmath>
#include "mmloss/tile_math.h"
using namespace mmloss;
template <typename T> T ex(T x) { return std::exp(x); }
template <typename T> void lse_case(const char* name, const T* logits, int n, int chunk) {
  // The CUDA forward's way: per chunk, rescale to the new max and add the chunk's terms;
  // then merge two halves computed separately (threads / warps / splits).
  LseAcc<T> halves[2] = {{T(-INFINITY), T(0)}, {T(-INFINITY), T(0)}};
  for (int j0 = 0; j0 < n; j0 += chunk) {
    LseAcc<T>& acc = halves[(j0 / chunk) % 2];
    T m = T(-INFINITY);
    for (int j = j0; j < j0 + chunk && j < n; ++j) m = logits[j] > m ? logits[j] : m;
    acc = lse_rescale(acc, acc.max > m ? acc.max : m, ex<T>);
    for (int j = j0; j < j0 + chunk && j < n; ++j) acc.sum += std::exp(logits[j] - lse_shift(acc.max));
  }
  std::printf("%s %.17g\n", name, double(lse_value(lse_combine(halves[0], halves[1], ex<T>))));
}
int main() {
  for (int i = 0; i <= 40; ++i) {
    double x = M_PI * i / 40, s, c;
    margin_sincos(x, s, c);
    float sf, cf;
    margin_sincos(float(x), sf, cf);
    std::printf("sincos %.17g %.17g %.17g %.17g %.17g\n", x, s, c, double(sf), double(cf));
  }
  for (int i = 0; i <= 20; ++i) {
    double c = -1.0 + 0.1 * i, f, df;
    arc_margin(c, std::cos(0.3), std::sin(0.3), f, df);
    std::printf("arc %.17g %.17g %.17g\n", c, f, df);
  }
  const double logits[7] = {1.5, -2.0, 30.0, -INFINITY, 29.5, 0.25, -7.0};
  lse_case<double>("lse_double", logits, 7, 2);
  const float logits_f[7] = {1.5f, -2.0f, 30.0f, -INFINITY, 29.5f, 0.25f, -7.0f};
  lse_case<float>("lse_float", logits_f, 7, 3);
  const double empty[3] = {-INFINITY, -INFINITY, -INFINITY};
  lse_case<double>("lse_empty", empty, 3, 1);
  const double poisoned[3] = {1.0, NAN, 2.0};
  lse_case<double>("lse_nan", poisoned, 3, 1);
  std::printf("logit_grad %.17g %.17g\n", logit_grad(0.25, 1.0, 2.0, false), logit_grad(0.25, 1.0, 2.0, true));
  std::printf("cosine_grad %.17g\n", cosine_grad(-1.5, 0.5, 20.0));
  std::printf("inv_temp_grad %.17g %.17g\n", inv_temp_grad(0.5, 0.75, true),
              inv_temp_grad(0.5, double(-INFINITY), false));
  std::printf("coef %.17g %.17g\n", double(normalize_grad_coef(2.0f, 3.0f)),
              double(normalize_grad_coef(float(1.0 / kNormEps), 3.0f)));
  const MarginPair<double> mp{std::cos(0.3), std::cos(0.3), std::sin(0.3)};
  const Element<double> pos = evaluate(0.1, true, true, false, true, mp, 10.0);
  const Element<double> removed = evaluate(0.1, false, true, false, true, mp, 10.0);
  const Element<double> poison = evaluate(0.1, false, false, true, true, mp, 10.0);
  const Element<double> near = evaluate(0.99, false, false, false, true, mp, 10.0);
  std::printf("masked %.17g %.17g %.17g %.17g\n", masked_logit(pos), masked_logit(removed), masked_logit(poison),
              masked_logit(near));
  std::printf("predicates %d %d %d %d\n", int(group_removes(3, 3)), int(group_removes(3, 4)),
              int(filter_removes(0.9f, 0.8f)), int(filter_poisons(float(NAN))));
  return 0;
}
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler")
    tmp = tmp_path_factory.mktemp("tile_math")
    (tmp / "t.cpp").write_text(PROGRAM)
    subprocess.run(
        [CXX, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{ROOT / 'csrc' / 'include'}", "t.cpp", "-o", "t"],
        cwd=tmp,
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(tmp / "t")], check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        name, *values = line.split()
        rows.setdefault(name, []).append([float(v) for v in values])
    return rows


def _lse(xs):
    finite = [x for x in xs if x != -math.inf]
    if not finite:
        return -math.inf
    m = max(finite)
    return m + math.log(sum(math.exp(x - m) for x in finite))


def test_margin_sincos_double_and_float(results):
    for x, s, c, sf, cf in results["sincos"]:
        assert abs(s - math.sin(x)) < 1e-15 and abs(c - math.cos(x)) < 1e-15
        assert abs(sf - math.sin(x)) < 4e-7 and abs(cf - math.cos(x)) < 4e-7


def test_arc_margin_is_cos_of_shifted_angle(results):
    for c, f, df in results["arc"]:
        if abs(c) < 1:
            theta = math.acos(c)
            assert f == pytest.approx(math.cos(theta - 0.3), abs=1e-12)
            assert df == pytest.approx(math.sin(theta - 0.3) / math.sin(theta), abs=1e-9)


def test_online_lse_update_and_merge(results):
    logits = [1.5, -2.0, 30.0, -math.inf, 29.5, 0.25, -7.0]
    assert results["lse_double"][0][0] == pytest.approx(_lse(logits), rel=1e-15)
    assert results["lse_float"][0][0] == pytest.approx(_lse(logits), rel=1e-6)
    assert results["lse_empty"][0][0] == -math.inf
    assert math.isnan(results["lse_nan"][0][0])


def test_gradient_formula(results):
    assert results["logit_grad"][0] == [0.5, -1.5]  # w (P - [pos]) with P = 0.25, w = 2
    assert results["cosine_grad"][0] == [-15.0]  # dlogit f' / tau
    assert results["inv_temp_grad"][0] == [0.375, 0.0]  # removed columns carry no f
    assert results["coef"][0] == [12.0, 0.0]  # a^2 r; 0 at the eps clamp


def test_masks_and_margin_of_one_element(results):
    pos, removed, poison, near = results["masked"][0]
    assert pos == pytest.approx(1.0)  # the positive: never removed, f = c
    assert removed == -math.inf
    assert math.isnan(poison)
    assert near == pytest.approx(9.9)  # c >= cos m: untouched
    assert results["predicates"][0] == [1, 0, 1, 1]
