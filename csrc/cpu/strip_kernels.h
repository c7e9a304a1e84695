// The CPU kernels' hot loops (element math, exp, the row loops of a tile), compiled once per
// instruction set (strip_kernels.cpp) and chosen once at run time (isa.cpp). Plain data only:
// the ATen side (contrastive_cpu.cpp) fills StripArgs and calls through StripKernels.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace mmloss {

// One tile of a strip: rows × cols of the key block from column col0.
template <typename T>
struct StripArgs {
  const T* sim;               // (rows, cols) raw dot products <q_i, k_j> of the tile
  const T* teacher;           // (rows, cols) margin-teacher cosines, or null
  const T* filter;            // (rows, cols) filter scores, or null
  const T* inv_norm_q;        // (rows,)
  const T* inv_norm_k;        // (cols,) of the tile's columns
  const int64_t* positives;   // (rows,) column of the positive in the block (else outside [0, N))
  const int64_t* row_groups;  // (rows,) or null
  const int64_t* key_groups;  // (cols,) of the tile's columns, or null
  const int64_t* row_owners;  // (rows,) owner ids of the hardness scope, or null (no scope)
  const int64_t* key_owners;  // (cols,) of the tile's columns, or null
  // (rows,) 1/|P_i| when every column of the row's group is a positive (row_groups and
  // key_groups given; the group mask then removes nothing), or null (the one positive).
  const double* positive_weights;
  int64_t rows, cols, col0;
  double inv_temp, margin;
  double cos_threshold;             // cos m: negatives with c < cos m are transformed
  double fixed_cos_m, fixed_sin_m;  // cos m', sin m' of the fixed margin (m' = m)
  double threshold;                 // the filter drops scores above it
  double hardness;                  // α of the hardness penalty logit += α·c (0 = off)
  int64_t hardness_scope;           // its negatives: 0 all, 1 other rows', 2 own (owners given)
  bool has_margin;
};

// The symmetric backward's column direction for the tile's columns (both null otherwise): it
// adds v_j (Q_ij - δ_ij), Q_ij = exp(logit_ij - col_lse_j), to dL/dlogit_ij.
struct ColumnTerms {
  const double* col_lse;     // (cols,)
  const double* col_weight;  // (cols,)
};

template <typename T>
struct TileKernels {
  // The forward of one tile for its rows: merges the tile into their running log-sum-exp
  // (row_max, row_sum) and sets their positive logits when the positive is in the tile (adds
  // the tile's Σ_{j∈P_i} positive_weights_i·logit_ij with several positives);
  // symmetric (col_max, col_sum of threads × cols given): each thread's column accumulators of
  // the tile, reset first. With `weight` (only when the tile spans every column): also the
  // gradient tile H of Σ_i weight_i loss_i into h; returns its dL/d(1/τ).
  double (*forward)(const StripArgs<T>& a, double* row_max, double* row_sum, double* pos_logit,
                    const double* weight, T* h, double* col_max, double* col_sum, int threads);
  // The gradient tile H (rows, cols) of Σ_i weight_i loss_i given the rows' final lse (plus
  // the column direction when `col` has it); returns its dL/d(1/τ).
  double (*backward)(const StripArgs<T>& a, const double* lse, const double* weight, T* h, ColumnTerms col,
                     int threads);
  // In place, row-wise: acc_i = inv_i · dL/dx̂_i (a GEMM result) becomes dL/dx_i for
  // x̂ = x / max(‖x‖, ε). x and acc contiguous (rows, d).
  void (*normalize_backward)(const T* x, const T* inv, T* acc, int64_t rows, int64_t d, int threads);
};

struct StripKernels {
  const char* isa;  // "baseline", "avx2", "avx512" (x86-64), "generic" (other CPUs), "native"
  TileKernels<float> f32;
  TileKernels<double> f64;
  // Merges the threads' column accumulators of a tile (threads × cols) into the running ones
  // of those columns, max and sum (cols,).
  void (*merge_columns)(const double* col_max, const double* col_sum, int threads, int64_t cols, double* max,
                        double* sum);
};

// The variant that runs here, chosen once (isa.cpp): MMLOSS_CPU_ISA names one (an error if it
// was not compiled or this CPU lacks it), else the widest this CPU supports.
const StripKernels& strip_kernels();

// The compiled variants, widest first, with whether this CPU can run each.
std::vector<std::pair<std::string, bool>> cpu_isas();

}  // namespace mmloss
