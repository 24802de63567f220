// Multi-scale deformable attention on the CPU: forward and backward kernels.
//
// Plain C++17 with no PyTorch headers, so that it compiles in about a second; it is built on
// first use (mask2former/kernels/loader.py) and called through ctypes by
// pixel_decoder/deformable_attention_cpu.py, which also checks every shape, dtype and layout
// before a call. All arrays are contiguous, row-major:
//
//   value   [N, S, M, D]        the flattened maps of all levels, M heads of D channels
//   shapes  [L, 2] int64        (H, W) of each level
//   starts  [L] int64           first position of each level in S
//   ref     [N, Lq, L, 2]       reference pixel (x, y) of each query on each level, or null (0)
//   offset  [N, Lq, M, L, P, 2] sampling pixel (x, y) relative to ref; pixel centres are at
//                               integers, so (x, y) = (0, 0) is the centre of the top-left pixel
//   logits  [N, Lq, M, L * P]   forward: attention logits (softmax over the L * P points of a
//                               query and head) or, with softmax = 0, the attention weights;
//                               backward: the attention weights (the forward's `weights`)
//   out     [N, Lq, M, D]
//   weights [N, Lq, M, L * P]   the forward's softmax of the logits, for the backward (optional)
//
// Sampling is bilinear with zeros outside the map (grid_sample's padding_mode "zeros" with
// align_corners false, on pixel coordinates). Accumulation is in the input type (float or double).
// The backward gives the gradients of value, offset (= of the sampling pixel) and logits (through
// the softmax when softmax = 1, else of the weights).
//
// Threads (OpenMP): the forward splits the (image, query) rows, the backward the (image, head)
// pairs; in the backward each pair owns its slice of the value gradient, so no two threads write
// the same element, and the results do not depend on the number of threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernel_common.h"

namespace {

// Largest L * P the kernels accept (the caller checks it).
constexpr int64_t kMaxPoints = 1024;

template <typename T>
struct Problem {
  const T* value;
  const int64_t* shapes;
  const int64_t* starts;
  const T* ref;
  const T* offset;
  const T* logits;
  int64_t N, S, M, D, Lq, L, P;
  bool softmax;
};

// Attention weights of one (query, head): a softmax of its K logits, or the logits themselves.
template <typename T>
void attention_weights(const T* logits, int64_t K, bool softmax, T* weights) {
  if (!softmax) {
    std::copy(logits, logits + K, weights);
    return;
  }
  T top = logits[0];
  for (int64_t k = 1; k < K; ++k) top = std::max(top, logits[k]);
  T total = 0;
  for (int64_t k = 0; k < K; ++k) total += weights[k] = std::exp(logits[k] - top);
  for (int64_t k = 0; k < K; ++k) weights[k] /= total;
}

// A row of DC values (DC known at compile time and a multiple of the vector width) in 32-byte
// vectors that stay in registers (one AVX register or two SSE registers each). An array indexed
// in a loop is kept in memory instead: summing into one, every product waits for the previous
// store.
template <typename T, int DC>
struct RegisterRow {
  typedef T Vec __attribute__((vector_size(32)));
  static constexpr int kLanes = 32 / sizeof(T), kVecs = DC / kLanes;
  static_assert(kVecs * kLanes == DC, "DC must fill whole vectors");
  Vec part[kVecs];

  // vector i of v (through memcpy: v need not be aligned)
  static void get(const T* v, int i, Vec& x) { std::memcpy(&x, v + i * kLanes, sizeof(Vec)); }
  void clear() {
    for (int i = 0; i < kVecs; ++i) part[i] = Vec{};
  }
  void load(const T* v) { std::memcpy(part, v, sizeof(part)); }
  void store(T* out) const { std::memcpy(out, part, sizeof(part)); }
  // this += w * v
  void add(T w, const T* __restrict v) {
    for (int i = 0; i < kVecs; ++i) {
      Vec x;
      get(v, i, x);
      part[i] += w * x;
    }
  }
  // dst += w * this
  void add_to(T w, T* __restrict dst) const {
    for (int i = 0; i < kVecs; ++i) {
      Vec x;
      get(dst, i, x);
      x += w * part[i];
      std::memcpy(dst + i * kLanes, &x, sizeof(Vec));
    }
  }
  // this . v: the vectors' products summed into one vector, then its lanes in order
  T dot(const T* __restrict v) const {
    Vec total = {};
    for (int i = 0; i < kVecs; ++i) {
      Vec x;
      get(v, i, x);
      total += part[i] * x;
    }
    T sum = 0;
    for (int j = 0; j < kLanes; ++j) sum += total[j];
    return sum;
  }
};

// The forward's sum for any D, kept in the output row.
template <typename T>
struct OutputRowSum {
  T* __restrict row;
  int64_t D;

  void clear() { std::fill(row, row + D, T(0)); }
  void add(T w, const T* __restrict v) {
    for (int64_t d = 0; d < D; ++d) row[d] += w * v[d];
  }
  void store(T*) const {}
};

// The backward's gradient row for any D, read where it is.
template <typename T>
struct GradientRow {
  const T* __restrict row;
  int64_t D;

  void add_to(T w, T* __restrict dst) const {
    for (int64_t d = 0; d < D; ++d) dst[d] += w * row[d];
  }
  // this . v in 32-byte vectors (a plain running sum would add one element at a time), then
  // the lanes in order, then the last D % lanes values
  T dot(const T* __restrict v) const {
    typedef T Vec __attribute__((vector_size(32)));
    constexpr int kLanes = 32 / sizeof(T);
    const int64_t full = D / kLanes * kLanes;
    Vec part = {};
    for (int64_t d = 0; d < full; d += kLanes) {
      Vec x, y;
      std::memcpy(&x, row + d, sizeof(Vec));
      std::memcpy(&y, v + d, sizeof(Vec));
      part += x * y;
    }
    T total = 0;
    for (int j = 0; j < kLanes; ++j) total += part[j];
    for (int64_t d = full; d < D; ++d) total += row[d] * v[d];
    return total;
  }
};

// The kernels' row of D values: RegisterRow when D is known at compile time (DC > 0), else
// MemoryRow (OutputRowSum or GradientRow).
template <typename T, int DC, typename MemoryRow>
using RowFor =
    typename std::conditional<(DC > 0), RegisterRow<T, (DC > 0 ? DC : 32)>, MemoryRow>::type;

// out[row, m] for the rows [begin, end) of N * Lq; DC is D when known at compile time, else 0.
template <typename T, int DC>
KERNEL_CLONES void forward_rows(const Problem<T>& p, T* out, T* weights_out, int64_t begin,
                                int64_t end) {
  const int64_t D = DC > 0 ? DC : p.D, K = p.L * p.P, stride = p.M * D;  // stride: one pixel
  T weights[kMaxPoints];
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / p.Lq;
    for (int64_t m = 0; m < p.M; ++m) {
      const int64_t bag = row * p.M + m;
      attention_weights(p.logits + bag * K, K, p.softmax, weights);
      if (weights_out) std::copy(weights, weights + K, weights_out + bag * K);
      const T* offset = p.offset + bag * K * 2;
      RowFor<T, DC, OutputRowSum<T>> acc;
      if constexpr (DC == 0) acc = {out + bag * D, D};
      acc.clear();
      for (int64_t l = 0; l < p.L; ++l) {
        const int64_t H = p.shapes[2 * l], W = p.shapes[2 * l + 1];
        const T* level = p.value + ((n * p.S + p.starts[l]) * p.M + m) * D;
        const T ref_x = p.ref ? p.ref[(row * p.L + l) * 2] : T(0);
        const T ref_y = p.ref ? p.ref[(row * p.L + l) * 2 + 1] : T(0);
        for (int64_t k = l * p.P; k < (l + 1) * p.P; ++k) {
          Corners<T> corners;
          if (!corners.set(ref_x + offset[2 * k], ref_y + offset[2 * k + 1], H, W)) continue;
          for (int c = 0; c < 4; ++c) {
            if (!corners.inside[c]) continue;
            acc.add(weights[k] * corners.bilinear[c], level + corners.position[c] * stride);
          }
        }
      }
      acc.store(out + bag * D);
    }
  }
}

// Gradients for the (image, head) pairs [begin, end) of N * M. grad_value must be zeroed.
template <typename T, int DC>
KERNEL_CLONES void backward_pairs(const Problem<T>& p, const T* grad_out, T* grad_value,
                                  T* grad_offset, T* grad_logits, int64_t begin, int64_t end) {
  const int64_t D = DC > 0 ? DC : p.D, K = p.L * p.P, stride = p.M * D;  // stride: one pixel
  T grad_weights[kMaxPoints];
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t n = pair / p.M, m = pair % p.M;
    for (int64_t q = 0; q < p.Lq; ++q) {
      const int64_t row = n * p.Lq + q, bag = row * p.M + m;
      const T* weights = p.logits + bag * K;
      const T* offset = p.offset + bag * K * 2;
      T* g_offset = grad_offset + bag * K * 2;
      RowFor<T, DC, GradientRow<T>> g_out;
      if constexpr (DC > 0) {
        g_out.load(grad_out + bag * D);
      } else {
        g_out = {grad_out + bag * D, D};
      }
      for (int64_t l = 0; l < p.L; ++l) {
        const int64_t H = p.shapes[2 * l], W = p.shapes[2 * l + 1];
        const int64_t level = ((n * p.S + p.starts[l]) * p.M + m) * D;
        const T ref_x = p.ref ? p.ref[(row * p.L + l) * 2] : T(0);
        const T ref_y = p.ref ? p.ref[(row * p.L + l) * 2 + 1] : T(0);
        for (int64_t k = l * p.P; k < (l + 1) * p.P; ++k) {
          Corners<T> corners;
          grad_weights[k] = 0;
          g_offset[2 * k] = g_offset[2 * k + 1] = 0;
          if (!corners.set(ref_x + offset[2 * k], ref_y + offset[2 * k + 1], H, W)) continue;
          // g[c]: grad_out . value at corner c (0 outside the map)
          T g[4] = {0, 0, 0, 0};
          for (int c = 0; c < 4; ++c) {
            if (!corners.inside[c]) continue;
            const int64_t at = level + corners.position[c] * stride;
            g[c] = g_out.dot(p.value + at);
            g_out.add_to(weights[k] * corners.bilinear[c], grad_value + at);
          }
          const T fx = corners.fx, fy = corners.fy;
          grad_weights[k] =
              (g[0] * (1 - fx) + g[1] * fx) * (1 - fy) + (g[2] * (1 - fx) + g[3] * fx) * fy;
          g_offset[2 * k] = ((g[1] - g[0]) * (1 - fy) + (g[3] - g[2]) * fy) * weights[k];
          g_offset[2 * k + 1] = ((g[2] - g[0]) * (1 - fx) + (g[3] - g[1]) * fx) * weights[k];
        }
      }
      T* g_logits = grad_logits + bag * K;
      if (p.softmax) {
        T inner = 0;
        for (int64_t k = 0; k < K; ++k) inner += weights[k] * grad_weights[k];
        for (int64_t k = 0; k < K; ++k) g_logits[k] = weights[k] * (grad_weights[k] - inner);
      } else {
        std::copy(grad_weights, grad_weights + K, g_logits);
      }
    }
  }
}

template <typename T>
Problem<T> problem(const T* value, const int64_t* shapes, const int64_t* starts, const T* ref,
                   const T* offset, const T* logits, int64_t N, int64_t S, int64_t M, int64_t D,
                   int64_t Lq, int64_t L, int64_t P, int softmax) {
  return Problem<T>{value, shapes, starts, ref, offset, logits, N, S, M, D, Lq, L, P, softmax != 0};
}

template <typename T>
void forward(const Problem<T>& p, T* out, T* weights, int threads) {
  parallel_for(p.N * p.Lq, threads, [&](int64_t begin, int64_t end) {
    if (p.D == 32) {
      forward_rows<T, 32>(p, out, weights, begin, end);
    } else {
      forward_rows<T, 0>(p, out, weights, begin, end);
    }
  });
}

template <typename T>
void backward(const Problem<T>& p, const T* grad_out, T* grad_value, T* grad_offset,
              T* grad_logits, int threads) {
  parallel_for(p.N * p.M, threads, [&](int64_t begin, int64_t end) {
    if (p.D == 32) {
      backward_pairs<T, 32>(p, grad_out, grad_value, grad_offset, grad_logits, begin, end);
    } else {
      backward_pairs<T, 0>(p, grad_out, grad_value, grad_offset, grad_logits, begin, end);
    }
  });
}

}  // namespace

#define MSDA_DEFINE(SUFFIX, T)                                                                   \
  extern "C" void msda_forward_##SUFFIX(const T* value, const int64_t* shapes,                  \
                                        const int64_t* starts, const T* ref, const T* offset,     \
                                        const T* logits, T* out, T* weights, int64_t N,           \
                                        int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L,   \
                                        int64_t P, int softmax, int threads) {                    \
    forward(problem(value, shapes, starts, ref, offset, logits, N, S, M, D, Lq, L, P, softmax),  \
            out, weights, threads);                                                               \
  }                                                                                               \
  extern "C" void msda_backward_##SUFFIX(                                                        \
      const T* value, const int64_t* shapes, const int64_t* starts, const T* ref,                \
      const T* offset, const T* weights, const T* grad_out, T* grad_value, T* grad_offset,        \
      T* grad_logits, int64_t N, int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L,         \
      int64_t P, int softmax, int threads) {                                                     \
    backward(problem(value, shapes, starts, ref, offset, weights, N, S, M, D, Lq, L, P, softmax), \
             grad_out, grad_value, grad_offset, grad_logits, threads);                           \
  }

MSDA_DEFINE(f32, float)
MSDA_DEFINE(f64, double)

extern "C" int64_t msda_max_points() { return kMaxPoints; }
