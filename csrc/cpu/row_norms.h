// Row norms that cannot overflow, for the CPU kernels (see row_norms.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace mmloss {

// How the kernels see the rows of x (rows, d): `scale` is the power of two 2^-e (rows,) float64
// that brings a row of norm above 2^40 into [1, 2) and 1 for every other row (undefined when no
// row needs it): scaled rows keep their cosines exactly, and raw products of two rows stay within
// fp32's range in a GEMM. `inv` = 1 / max(‖x_i‖ · scale_i, ε) (rows,) in the compute dtype.
struct RowScaling {
  at::Tensor inv;
  at::Tensor scale;
};

// Norms without overflow for x of any floating dtype: sums of squares in float64 (every
// fp32/16-bit row fits), float64 rows beyond that range first divided by their largest |x_ij|.
// Non-finite entries give NaN or inf norms, as the plain norm. `type`: the compute dtype.
RowScaling row_scaling(const at::Tensor& x, at::ScalarType type);

// x (rows, d) with its rows multiplied by s.scale in `type` (exact: powers of two), or x itself
// when no row is scaled.
at::Tensor scaled_rows(const at::Tensor& x, const RowScaling& s, at::ScalarType type);

}  // namespace mmloss
