// Similarity and streaming top-k on the CPU. Inputs are converted once to the compute dtype
// (float32, or float64 for float64 inputs) and scaled to unit rows (1 / max(‖x‖, ε), the
// normalisation of F.normalize), O((M + N) d); every product then comes from a BLAS GEMM.
// Top-k keeps a heap of k_top (key, index) entries per row across column tiles. The key is
// the score's bit pattern made monotone (IEEE totalOrder with -0 taken as +0), so the order
// is total and the same as the Triton path's: higher score first, then lower index.
#include "similarity_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "mmloss/tile_math.h"
#include "row_norms.h"

namespace mmloss {
namespace {

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// x (rows, d) in the compute dtype, rows scaled to unit norm when `normalize` (norms that
// cannot overflow: row_norms.h): a new tensor.
at::Tensor prepared(const at::Tensor& x, at::ScalarType type, bool normalize) {
  if (!normalize) return x.to(type).contiguous();
  const RowScaling rows = row_scaling(x, type);
  return (scaled_rows(x, rows, type) * rows.inv.unsqueeze(1)).contiguous();
}

// Monotone integer image of a float: a < b (as numbers) => key(a) < key(b); -0 and +0 map alike.
template <typename T>
auto order_key(T value) {
  using Bits = std::conditional_t<std::is_same<T, double>::value, int64_t, int32_t>;
  constexpr Bits kLow = std::numeric_limits<Bits>::max();
  if (value == T(0)) return Bits(0);
  Bits bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits < 0 ? Bits(bits ^ kLow) : bits;
}

template <typename T>
struct Entry {
  decltype(order_key(T(0))) key;
  int64_t index;
  T value;
};

// Ranking: higher key first, then lower index. std heaps ordered by it keep the worst entry in front.
template <typename T>
bool better(const Entry<T>& a, const Entry<T>& b) {
  return a.key > b.key || (a.key == b.key && a.index < b.index);
}

template <typename T>
void topk_rows(const at::Tensor& Q, const at::Tensor& K, int64_t k_top, int64_t strip_rows, int64_t block_cols,
               at::Tensor& scores, at::Tensor& indices) {
  const int64_t M = Q.size(0), N = K.size(0);
  T* out_scores = scores.data_ptr<T>();
  int64_t* out_indices = indices.data_ptr<int64_t>();
  const auto cmp = [](const Entry<T>& a, const Entry<T>& b) { return better(a, b); };
  std::vector<Entry<T>> heaps;
  for (int64_t r0 = 0; r0 < M; r0 += strip_rows) {
    const int64_t R = std::min(strip_rows, M - r0);
    heaps.assign(R * k_top, Entry<T>{});
    std::vector<int64_t> sizes(R, 0);
    const at::Tensor q_strip = Q.narrow(0, r0, R);
    for (int64_t c0 = 0; c0 < N; c0 += block_cols) {
      const int64_t C = std::min(block_cols, N - c0);
      const at::Tensor tile = at::mm(q_strip, K.narrow(0, c0, C).t()).contiguous();
      const T* tp = tile.data_ptr<T>();
      at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          Entry<T>* heap = heaps.data() + i * k_top;
          int64_t& size = sizes[i];
          const T* row = tp + i * C;
          for (int64_t j = 0; j < C; ++j) {
            if (size == k_top && row[j] < heap[0].value) continue;  // below the k-th best: most columns
            const Entry<T> e{order_key(row[j]), c0 + j, row[j]};
            if (size < k_top) {
              heap[size++] = e;
              std::push_heap(heap, heap + size, cmp);
            } else if (better(e, heap[0])) {
              std::pop_heap(heap, heap + size, cmp);
              heap[size - 1] = e;
              std::push_heap(heap, heap + size, cmp);
            }
          }
        }
      });
    }
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        Entry<T>* heap = heaps.data() + i * k_top;
        std::sort(heap, heap + k_top, cmp);
        for (int64_t t = 0; t < k_top; ++t) {
          out_scores[(r0 + i) * k_top + t] = heap[t].value;
          out_indices[(r0 + i) * k_top + t] = heap[t].index;
        }
      }
    });
  }
}

}  // namespace

void similarity_cpu(const at::Tensor& a, const at::Tensor& b, bool normalize, const at::Tensor& out,
                    int64_t strip_rows) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "similarity_cpu: a (M, d), b (N, d)");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == a.size(0) && out.size(1) == b.size(0) && out.is_contiguous(),
              "similarity_cpu: out must be contiguous (M, N)");
  TORCH_CHECK(strip_rows > 0, "similarity_cpu: strip_rows must be positive");
  const at::ScalarType type = compute_type(a);
  const at::Tensor A = prepared(a, type, normalize), Bt = prepared(b, type, normalize).t();
  if (out.scalar_type() == type) {
    at::Tensor dst = out;
    at::mm_out(dst, A, Bt);
    return;
  }
  for (int64_t r0 = 0; r0 < A.size(0); r0 += strip_rows) {
    const int64_t n = std::min(strip_rows, A.size(0) - r0);
    out.narrow(0, r0, n).copy_(at::mm(A.narrow(0, r0, n), Bt));
  }
}

std::vector<at::Tensor> topk_similarity_cpu(const at::Tensor& q, const at::Tensor& k, int64_t k_top,
                                            bool normalize, int64_t strip_rows, int64_t block_cols) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1), "topk_similarity_cpu: q (M, d), k (N, d)");
  TORCH_CHECK(k_top > 0 && k_top <= k.size(0), "topk_similarity_cpu: k_top must be in [1, N]");
  TORCH_CHECK(strip_rows > 0 && block_cols > 0, "topk_similarity_cpu: strip_rows and block_cols must be positive");
  const at::ScalarType type = compute_type(q);
  const at::Tensor Q = prepared(q, type, normalize), K = prepared(k, type, normalize);
  at::Tensor scores = at::empty({q.size(0), k_top}, Q.options());
  at::Tensor indices = at::empty({q.size(0), k_top}, Q.options().dtype(at::kLong));
  if (type == at::kDouble) {
    topk_rows<double>(Q, K, k_top, strip_rows, block_cols, scores, indices);
  } else {
    topk_rows<float>(Q, K, k_top, strip_rows, block_cols, scores, indices);
  }
  return {scores, indices};
}

}  // namespace mmloss
