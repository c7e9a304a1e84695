// Row norms that cannot overflow (row_norms.h). A norm in the input's precision overflows for
// fp16 rows of norm above 65,504 and fp32 rows near 1e19; the kernels' contract is the exact
// cosine of any finite rows.
#include "row_norms.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "mmloss/tile_math.h"

namespace mmloss {
namespace {

constexpr double kScaleAbove = 1099511627776.0;  // 2^40

// ‖x_i‖ (rows,) float64 of a block of rows.
at::Tensor norms_of(const at::Tensor& block) {
  const at::Tensor wide = block.to(at::kDouble);
  at::Tensor norms = at::linalg_vector_norm(wide, 2, {1});
  if (block.scalar_type() != at::kDouble) return norms;
  const at::Tensor over = at::nonzero(at::isinf(norms)).squeeze(1);  // float64 rows beyond 1e154
  if (over.numel() == 0) return norms;
  const at::Tensor big = wide.index_select(0, over);
  const at::Tensor largest = big.abs().amax({1}, /*keepdim=*/true);
  norms.index_copy_(0, over, at::linalg_vector_norm(big / largest, 2, {1}) * largest.squeeze(1));
  return norms;
}

}  // namespace

RowScaling row_scaling(const at::Tensor& x, at::ScalarType type) {
  const int64_t rows = x.size(0), chunk = 4096;
  RowScaling out;
  out.inv = at::empty({rows}, x.options().dtype(type));
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    at::Tensor norms = norms_of(x.narrow(0, r0, n));
    const at::Tensor big = (norms > kScaleAbove) & at::isfinite(norms);
    if (big.any().item<bool>()) {
      if (!out.scale.defined()) out.scale = at::ones({rows}, x.options().dtype(at::kDouble));
      const at::Tensor scale = at::where(big, at::exp2(at::floor(at::log2(norms)).neg_()), 1.0);
      out.scale.narrow(0, r0, n).copy_(scale);
      norms = norms * scale;
    }
    out.inv.narrow(0, r0, n).copy_(norms.clamp_min(kNormEps).reciprocal());
  }
  return out;
}

at::Tensor scaled_rows(const at::Tensor& x, const RowScaling& s, at::ScalarType type) {
  return s.scale.defined() ? x.to(type) * s.scale.to(type).unsqueeze(1) : x;
}

}  // namespace mmloss
