// The problem of one key block (mmloss.problem.LossProblem) as it crosses the Python/C++
// boundary: one field list, from which the C++ struct, the torch.library schema fragment of
// every mmloss:: op and the ops' parameter lists are generated. The order is that of
// mmloss.problem.KERNEL_FIELDS (tests/kernels/cpu/test_cpu_ops.py checks it against the
// registered schemas). A new field is one line here and one in mmloss/problem.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

// X(kind, name): kind is Tensor, OptTensor (None = feature off), Float or Int.
#define MMLOSS_PROBLEM_FIELDS(X)                                                                         \
  X(Tensor, positives)         /* (M,) int64 column of the positive in this block (else outside [0, N)) */ \
  X(Float, margin)             /* angular margin m in radians, 0 = plain InfoNCE */                        \
  X(OptTensor, margin_query)   /* (M, dt) unit-norm margin teacher rows, or None (fixed margin) */         \
  X(OptTensor, margin_key)     /* (N, dt) */                                                              \
  X(OptTensor, filter_query)   /* (M, df) filter teacher rows, or None (no filter) */                     \
  X(OptTensor, filter_key)     /* (N, df) */                                                              \
  X(Float, filter_threshold)   /* the filter drops negatives with score > threshold */                    \
  X(OptTensor, row_groups)     /* (M,) int64 group of each row's positive, or None (no group mask) */     \
  X(OptTensor, key_groups)     /* (N,) int64 group of each column */                                     \
  X(Float, hardness_strength)  /* alpha >= 0: logit += alpha * c (no gradient through it) on penalised negatives */ \
  X(Int, hardness_scope)       /* penalised negatives: 0 all, 1 other rows' (key_owners != row_owners), 2 own */ \
  X(OptTensor, row_owners)     /* (M,) int64 owner id of each row, or None (hardness_scope 0) */          \
  X(OptTensor, key_owners)     /* (N,) int64 owner id of each column (-1: no row's) */                    \
  X(OptTensor, positive_weights) /* (M,) float64 1/|P_i|: every column of the positive's group is a positive */

#define MMLOSS_PROBLEM_STORE_Tensor at::Tensor
#define MMLOSS_PROBLEM_STORE_OptTensor c10::optional<at::Tensor>
#define MMLOSS_PROBLEM_STORE_Float double
#define MMLOSS_PROBLEM_STORE_Int int64_t
#define MMLOSS_PROBLEM_PARAM_Tensor const at::Tensor&
#define MMLOSS_PROBLEM_PARAM_OptTensor const c10::optional<at::Tensor>&
#define MMLOSS_PROBLEM_PARAM_Float double
#define MMLOSS_PROBLEM_PARAM_Int int64_t
#define MMLOSS_PROBLEM_SCHEMA_Tensor "Tensor"
#define MMLOSS_PROBLEM_SCHEMA_OptTensor "Tensor?"
#define MMLOSS_PROBLEM_SCHEMA_Float "float"
#define MMLOSS_PROBLEM_SCHEMA_Int "int"

#define MMLOSS_PROBLEM_MEMBER_(kind, name) MMLOSS_PROBLEM_STORE_##kind name;
#define MMLOSS_PROBLEM_SCHEMA_ARG_(kind, name) ", " MMLOSS_PROBLEM_SCHEMA_##kind " " #name
#define MMLOSS_PROBLEM_PARAM_(kind, name) , MMLOSS_PROBLEM_PARAM_##kind name
#define MMLOSS_PROBLEM_NAME_(kind, name) name,

// The schema fragment ", Tensor positives, float margin, ..." (after the ops' leading arguments).
#define MMLOSS_PROBLEM_SCHEMA MMLOSS_PROBLEM_FIELDS(MMLOSS_PROBLEM_SCHEMA_ARG_)
// The matching C++ parameters ", const at::Tensor& positives, double margin, ...".
#define MMLOSS_PROBLEM_PARAMS MMLOSS_PROBLEM_FIELDS(MMLOSS_PROBLEM_PARAM_)
// Inside a function taking MMLOSS_PROBLEM_PARAMS: the mmloss::Problem of those parameters.
#define MMLOSS_PROBLEM_FROM_PARAMS (::mmloss::Problem{MMLOSS_PROBLEM_FIELDS(MMLOSS_PROBLEM_NAME_)})

namespace mmloss {

// One direction of one key block: rows query (M, d) against columns key (N, d), as
// mmloss.problem.LossProblem documents the fields.
struct Problem {
  MMLOSS_PROBLEM_FIELDS(MMLOSS_PROBLEM_MEMBER_)
};

}  // namespace mmloss
