// Swin's (shifted-)window multi-head self-attention on the CPU: forward and backward kernels.
//
// Plain C++17 with no PyTorch headers, built with the other kernels of this folder
// (mask2former/kernels/loader.py) and called through ctypes by
// backbone/window_attention_cpu.py, which checks every shape, dtype and layout before a call.
//
// The kernels read the tokens in map order and find the tokens of each window through an index,
// so the padding, the cyclic shift and the window partition (and their inverses) are never
// materialised. All arrays are contiguous, row-major:
//
//   qkv    [B, L, 3, H, D]   q, k, v of the L = h * w tokens of each image: the qkv projection
//                            of the normalised map (float, double, or bfloat16 in the forward)
//   pad    [3, H, D]         q, k, v of a padding token (the projection of zeros: its bias)
//   index  [nW * N] int64    the token in each window slot (windows row-major, tokens row-major
//                            inside a window): in [0, L), or L for padding
//   bias   [H, N, N]         relative position bias of every (query, key) pair of a window
//   mask   [nW, N, N]        additive shift mask of each window, or null
//   out    [B, L, H, D]      the attention output of every token (in qkv's type)
//   probs  [B, nW, H, N, N]  the softmax, kept by the forward for the backward (or null)
//
// Per image, window and head, with q scaled by `scale` first (as the official code does):
// P = softmax(q k^T + bias + mask) over the window's keys and out = P v; padding slots take part
// as keys and values, their outputs are dropped. The backward gives the gradients of qkv, of pad
// (the sum over all padding slots) and of bias (the sum over images and windows).
//
// Each (window, head) works in small buffers that stay in cache: its rows of q, k, v gathered
// (k transposed), the N x N scores, and five small matrix products written as register tiles of
// vectors (64-byte vectors on x86-64-v4, 32 on x86-64-v3, 16 otherwise, chosen once at load).
// Accumulation is in the input type (float or double; float for bfloat16 inputs, whose other
// arrays are float and whose output is rounded to the nearest bfloat16). Denormals are flushed to zero
// (FlushDenormals): the shift mask's -100 makes weights of about e^-100 that would otherwise
// be denormal floats, each product with one taking a slow path.
//
// Threads (OpenMP): the forward splits the (image, window, head) triples; the backward splits
// (image, head, group of kWindowGroup windows), keeps each group's bias and pad gradients apart
// and adds them in a fixed order afterwards, so the results do not depend on the number of
// threads. Every token lies in exactly one window slot, so no two threads write the same output.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernel_common.h"

namespace {

// Windows per backward task (fixed: the order of the gradient sums depends on it).
constexpr int64_t kWindowGroup = 8;

// bfloat16 as stored: the upper half of a float's bits.
struct BFloat16 {
  uint16_t bits;
};

ALWAYS_INLINE float to_compute(BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T>
ALWAYS_INLINE T to_compute(T x) {
  return x;
}

// The nearest bfloat16 (ties to even), as PyTorch rounds; NaN stays NaN.
ALWAYS_INLINE void store_value(float x, BFloat16* out) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    out->bits = 0x7fc0;
    return;
  }
  out->bits = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
template <typename T>
ALWAYS_INLINE void store_value(T x, T* out) {
  *out = x;
}

// The problem; S is the type qkv and out are stored in (T, or BFloat16 with T float).
template <typename T, typename S = T>
struct Attention {
  const S* qkv;
  const T* pad;
  const int64_t* index;
  const T* bias;
  const T* mask;
  int64_t B, L, nW, N, H, D;
  T scale;
};

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Vector types of W bytes of T, and the register tile of the matrix products (rows x 2 vectors)
// that fits the register file of the instruction set that has such vectors.
template <typename T, int W>
struct Vectors {
  typedef T V __attribute__((vector_size(W)));
  static constexpr int kLanes = W / sizeof(T);
  static constexpr int kTileRows = W >= 64 ? 8 : (W >= 32 ? 6 : 4);

  static ALWAYS_INLINE void load(const T* p, V& x) { std::memcpy(&x, p, sizeof(V)); }
  static ALWAYS_INLINE void store(T* p, const V& x) { std::memcpy(p, &x, sizeof(V)); }
};

// C[m, :NV vectors] (=, or += with ACC) sum_k A[m * am + k * ak] B[k * ldb + :] for RM rows: the
// products' register tile (A read as broadcast scalars, so A may be read transposed).
template <typename T, int W, int RM, int VN, bool ACC>
ALWAYS_INLINE void product_tile(int64_t K, const T* A, int64_t am, int64_t ak, const T* B,
                                int64_t ldb, T* C, int64_t ldc) {
  typedef Vectors<T, W> Vec;
  typename Vec::V acc[RM][VN];
  for (int r = 0; r < RM; ++r) {
    for (int v = 0; v < VN; ++v) {
      acc[r][v] = typename Vec::V{};
      if (ACC) Vec::load(C + r * ldc + v * Vec::kLanes, acc[r][v]);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    typename Vec::V b[VN];
    for (int v = 0; v < VN; ++v) Vec::load(B + k * ldb + v * Vec::kLanes, b[v]);
    for (int r = 0; r < RM; ++r) {
      const T a = A[r * am + k * ak];
      for (int v = 0; v < VN; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < RM; ++r) {
    for (int v = 0; v < VN; ++v) Vec::store(C + r * ldc + v * Vec::kLanes, acc[r][v]);
  }
}

template <typename T, int W, int VN, bool ACC>
ALWAYS_INLINE void product_rows(int64_t M, int64_t K, const T* A, int64_t am, int64_t ak,
                                const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int RM = Vectors<T, W>::kTileRows;
  int64_t m = 0;
  for (; m + RM <= M; m += RM) {
    product_tile<T, W, RM, VN, ACC>(K, A + m * am, am, ak, B, ldb, C + m * ldc, ldc);
  }
  for (; m < M; ++m) product_tile<T, W, 1, VN, ACC>(K, A + m * am, am, ak, B, ldb, C + m * ldc, ldc);
}

// C [M, NV vectors] (=, or += with ACC) A [M, K] B [K, NV vectors], A's element (m, k) at
// A[m * am + k * ak]; B and C row-major with leading dimensions ldb, ldc.
template <typename T, int W, bool ACC = false>
ALWAYS_INLINE void product(int64_t M, int64_t NV, int64_t K, const T* A, int64_t am, int64_t ak,
                           const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int kLanes = Vectors<T, W>::kLanes;
  int64_t v = 0;
  for (; v + 2 <= NV; v += 2) {
    product_rows<T, W, 2, ACC>(M, K, A, am, ak, B + v * kLanes, ldb, C + v * kLanes, ldc);
  }
  if (v < NV) product_rows<T, W, 1, ACC>(M, K, A, am, ak, B + v * kLanes, ldb, C + v * kLanes, ldc);
}

// One row of scores (n valid of np, np whole vectors) into its softmax, zeros past n.
template <typename T, int W>
ALWAYS_INLINE void softmax_row(T* row, int64_t n, int64_t np) {
  typedef Vectors<T, W> Vec;
  typedef typename Vec::V V;
  constexpr int kLanes = Vec::kLanes;
  for (int64_t j = n; j < np; ++j) row[j] = -std::numeric_limits<T>::infinity();
  V top, x;
  Vec::load(row, top);
  for (int64_t j = kLanes; j < np; j += kLanes) {
    Vec::load(row + j, x);
    top = x > top ? x : top;
  }
  T m = top[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, static_cast<T>(top[i]));
  V total = {};
  for (int64_t j = 0; j < np; j += kLanes) {
    V e[1];
    if constexpr (std::is_same_v<T, float>) {
      V shifted[1];
      Vec::load(row + j, shifted[0]);
      shifted[0] -= m;
      exp_nonpositive(shifted, e);
    } else {
      for (int i = 0; i < kLanes; ++i) e[0][i] = std::exp(row[j + i] - m);
    }
    if (j + kLanes > n) {  // the last vector: no weight past n
      for (int i = 0; i < kLanes; ++i) {
        if (j + i >= n) e[0][i] = 0;
      }
    }
    total += e[0];
    Vec::store(row + j, e[0]);
  }
  T sum = 0;
  for (int i = 0; i < kLanes; ++i) sum += total[i];
  const V divisor = V{} + sum;
  for (int64_t j = 0; j < np; j += kLanes) {
    Vec::load(row + j, x);
    Vec::store(row + j, x / divisor);
  }
}

// The q, k or v row (part 0, 1, 2) of window slot `slot` of image b, head h, times `factor`,
// into dst[d * stride] (in the compute type).
template <typename T, typename S>
ALWAYS_INLINE void read_row(const Attention<T, S>& a, int64_t b, int64_t slot, int part, int64_t h,
                            T factor, T* dst, int64_t stride) {
  const int64_t token = a.index[slot];
  if (token >= a.L) {
    const T* src = a.pad + (part * a.H + h) * a.D;
    for (int64_t d = 0; d < a.D; ++d) dst[d * stride] = src[d] * factor;
  } else {
    const S* src = a.qkv + (((b * a.L + token) * 3 + part) * a.H + h) * a.D;
    for (int64_t d = 0; d < a.D; ++d) dst[d * stride] = to_compute(src[d]) * factor;
  }
}

template <typename T, typename S, int W>
ALWAYS_INLINE void forward_range(const Attention<T, S>& a, S* out, T* probs, int64_t begin,
                                 int64_t end) {
  constexpr int kLanes = Vectors<T, W>::kLanes;
  const int64_t N = a.N, D = a.D, H = a.H, np = round_up(N, kLanes), dp = round_up(D, kLanes);
  std::vector<T> q(N * dp, T(0)), kt(D * np, T(0)), v(N * dp, T(0)), s(N * np), o(N * dp);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t h = task % H, w = (task / H) % a.nW, b = task / (H * a.nW);
    const int64_t first = w * N;
    for (int64_t i = 0; i < N; ++i) {
      read_row(a, b, first + i, 0, h, a.scale, q.data() + i * dp, 1);
      read_row(a, b, first + i, 1, h, T(1), kt.data() + i, np);
      read_row(a, b, first + i, 2, h, T(1), v.data() + i * dp, 1);
    }
    product<T, W>(N, np / kLanes, D, q.data(), dp, 1, kt.data(), np, s.data(), np);
    const T* bias = a.bias + h * N * N;
    const T* mask = a.mask ? a.mask + w * N * N : nullptr;
    for (int64_t i = 0; i < N; ++i) {
      T* row = s.data() + i * np;
      for (int64_t j = 0; j < N; ++j) row[j] += bias[i * N + j];
      if (mask) {
        for (int64_t j = 0; j < N; ++j) row[j] += mask[i * N + j];
      }
      softmax_row<T, W>(row, N, np);
      if (probs) std::memcpy(probs + (task * N + i) * N, row, N * sizeof(T));
    }
    product<T, W>(N, dp / kLanes, N, s.data(), np, 1, v.data(), dp, o.data(), dp);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t token = a.index[first + i];
      if (token < a.L) {
        S* row = out + ((b * a.L + token) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) store_value(o[i * dp + d], row + d);
      }
    }
  }
}

// Backward task (b, h, group of windows): gradients of qkv written in place; this group's bias
// gradient [N, N] and pad gradient [3, D] of head h into `partial`.
template <typename T, int W>
ALWAYS_INLINE void backward_range(const Attention<T>& a, const T* grad_out, const T* probs,
                                  T* grad_qkv, T* partials, int64_t begin, int64_t end) {
  typedef Vectors<T, W> Vec;
  typedef typename Vec::V V;
  constexpr int kLanes = Vec::kLanes;
  const int64_t N = a.N, D = a.D, H = a.H, np = round_up(N, kLanes), dp = round_up(D, kLanes);
  const int64_t groups = (a.nW + kWindowGroup - 1) / kWindowGroup;
  std::vector<T> q(N * dp, T(0)), k(N * dp, T(0)), vt(D * np, T(0)), go(N * dp, T(0));
  std::vector<T> p(N * np, T(0)), ds(N * np), dq(N * dp), dk(N * dp), dv(N * dp);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t g = task % groups, h = (task / groups) % H, b = task / (groups * H);
    T* bias_grad = partials + task * (N * N + 3 * D);
    T* pad_grad = bias_grad + N * N;
    std::fill(bias_grad, bias_grad + N * N + 3 * D, T(0));
    for (int64_t w = g * kWindowGroup; w < std::min(a.nW, (g + 1) * kWindowGroup); ++w) {
      const int64_t first = w * N;
      for (int64_t i = 0; i < N; ++i) {
        const int64_t token = a.index[first + i];
        read_row(a, b, first + i, 0, h, a.scale, q.data() + i * dp, 1);
        read_row(a, b, first + i, 1, h, T(1), k.data() + i * dp, 1);
        read_row(a, b, first + i, 2, h, T(1), vt.data() + i, np);
        if (token < a.L) {
          std::memcpy(go.data() + i * dp, grad_out + ((b * a.L + token) * H + h) * D,
                      D * sizeof(T));
        } else {  // a padding query: its output is dropped
          std::fill(go.data() + i * dp, go.data() + i * dp + D, T(0));
        }
        std::memcpy(p.data() + i * np, probs + (((b * a.nW + w) * H + h) * N + i) * N,
                    N * sizeof(T));
      }
      // dP = dO v^T, into ds; then dS = P * (dP - sum_j P dP) per row
      product<T, W>(N, np / kLanes, D, go.data(), dp, 1, vt.data(), np, ds.data(), np);
      for (int64_t i = 0; i < N; ++i) {
        T* dsr = ds.data() + i * np;
        const T* pr = p.data() + i * np;
        V total = {}, pv, gv;
        for (int64_t j = 0; j < np; j += kLanes) {
          Vec::load(pr + j, pv);
          Vec::load(dsr + j, gv);
          total += pv * gv;
        }
        T dot = 0;
        for (int l = 0; l < kLanes; ++l) dot += total[l];
        for (int64_t j = 0; j < np; j += kLanes) {
          Vec::load(pr + j, pv);
          Vec::load(dsr + j, gv);
          Vec::store(dsr + j, pv * (gv - dot));
        }
        T* br = bias_grad + i * N;
        for (int64_t j = 0; j < N; ++j) br[j] += dsr[j];
      }
      // dV = P^T dO, dq = scale dS k, dk = dS^T (scale q)
      product<T, W>(N, dp / kLanes, N, p.data(), 1, np, go.data(), dp, dv.data(), dp);
      product<T, W>(N, dp / kLanes, N, ds.data(), np, 1, k.data(), dp, dq.data(), dp);
      product<T, W>(N, dp / kLanes, N, ds.data(), 1, np, q.data(), dp, dk.data(), dp);
      for (int64_t i = 0; i < N; ++i) {
        const int64_t token = a.index[first + i];
        T* dqr = dq.data() + i * dp;
        for (int64_t d = 0; d < D; ++d) dqr[d] *= a.scale;
        const T* rows[3] = {dqr, dk.data() + i * dp, dv.data() + i * dp};
        for (int part = 0; part < 3; ++part) {
          if (token < a.L) {
            std::memcpy(grad_qkv + (((b * a.L + token) * 3 + part) * H + h) * D, rows[part],
                        D * sizeof(T));
          } else {
            for (int64_t d = 0; d < D; ++d) pad_grad[part * D + d] += rows[part][d];
          }
        }
      }
    }
  }
}

// One entry per instruction-set level: the ranges above compiled for it.
#define WINDOW_ATTENTION_TARGET(NAME, TARGET, W)                                               \
  template <typename T, typename S>                                                            \
  TARGET void forward_##NAME(const Attention<T, S>& a, S* out, T* probs, int64_t begin,       \
                             int64_t end) {                                                    \
    FlushDenormals flush;                                                                      \
    forward_range<T, S, W>(a, out, probs, begin, end);                                         \
  }                                                                                            \
  template <typename T>                                                                        \
  TARGET void backward_##NAME(const Attention<T>& a, const T* grad_out, const T* probs,       \
                              T* grad_qkv, T* partials, int64_t begin, int64_t end) {          \
    FlushDenormals flush;                                                                      \
    backward_range<T, W>(a, grad_out, probs, grad_qkv, partials, begin, end);                  \
  }

#if KERNEL_TARGETS
WINDOW_ATTENTION_TARGET(v4, TARGET_V4, 64)
WINDOW_ATTENTION_TARGET(v3, TARGET_V3, 32)
#endif
WINDOW_ATTENTION_TARGET(base, , 16)

template <typename T, typename S>
void forward(const Attention<T, S>& a, S* out, T* probs, int threads) {
  static const int level = isa_level();
  auto range = forward_base<T, S>;
#if KERNEL_TARGETS
  if (level == 4) range = forward_v4<T, S>;
  if (level == 3) range = forward_v3<T, S>;
#endif
  parallel_for(a.B * a.nW * a.H, threads,
               [&](int64_t begin, int64_t end) { range(a, out, probs, begin, end); });
}

template <typename T>
void backward(const Attention<T>& a, const T* grad_out, const T* probs, T* grad_qkv,
              T* grad_pad, T* grad_bias, int threads) {
  static const int level = isa_level();
  auto range = backward_base<T>;
#if KERNEL_TARGETS
  if (level == 4) range = backward_v4<T>;
  if (level == 3) range = backward_v3<T>;
#endif
  const int64_t N = a.N, D = a.D, H = a.H;
  const int64_t groups = (a.nW + kWindowGroup - 1) / kWindowGroup, tasks = a.B * H * groups;
  const int64_t size = N * N + 3 * D;
  std::vector<T> partials(tasks * size);
  parallel_for(tasks, threads, [&](int64_t begin, int64_t end) {
    range(a, grad_out, probs, grad_qkv, partials.data(), begin, end);
  });
  // the tasks' sums in (image, group) order for each head
  std::fill(grad_bias, grad_bias + H * N * N, T(0));
  std::fill(grad_pad, grad_pad + 3 * H * D, T(0));
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* part = partials.data() + ((b * H + h) * groups + g) * size;
        for (int64_t i = 0; i < N * N; ++i) grad_bias[h * N * N + i] += part[i];
        for (int64_t p = 0; p < 3; ++p) {
          for (int64_t d = 0; d < D; ++d) grad_pad[(p * H + h) * D + d] += part[N * N + p * D + d];
        }
      }
    }
  }
}

}  // namespace

#define WINDOW_ATTENTION_ENTRIES(T, SUFFIX)                                                     \
  extern "C" void window_attention_forward_##SUFFIX(                                            \
      const T* qkv, const T* pad, const int64_t* index, const T* bias, const T* mask, T* out,   \
      T* probs, int64_t B, int64_t L, int64_t nW, int64_t N, int64_t H, int64_t D, double scale, \
      int threads) {                                                                            \
    forward(Attention<T>{qkv, pad, index, bias, mask, B, L, nW, N, H, D, T(scale)}, out, probs, \
            threads);                                                                           \
  }                                                                                             \
  extern "C" void window_attention_backward_##SUFFIX(                                           \
      const T* grad_out, const T* qkv, const T* pad, const int64_t* index, const T* probs,      \
      T* grad_qkv, T* grad_pad, T* grad_bias, int64_t B, int64_t L, int64_t nW, int64_t N,      \
      int64_t H, int64_t D, double scale, int threads) {                                        \
    backward(Attention<T>{qkv, pad, index, nullptr, nullptr, B, L, nW, N, H, D, T(scale)},     \
             grad_out, probs, grad_qkv, grad_pad, grad_bias, threads);                          \
  }

WINDOW_ATTENTION_ENTRIES(float, f32)
WINDOW_ATTENTION_ENTRIES(double, f64)

// bfloat16 q, k, v and output (inference: no backward); pad, bias and mask in float.
extern "C" void window_attention_forward_bf16(const uint16_t* qkv, const float* pad,
                                              const int64_t* index, const float* bias,
                                              const float* mask, uint16_t* out, int64_t B,
                                              int64_t L, int64_t nW, int64_t N, int64_t H,
                                              int64_t D, double scale, int threads) {
  forward(Attention<float, BFloat16>{reinterpret_cast<const BFloat16*>(qkv), pad, index, bias,
                                     mask, B, L, nW, N, H, D, float(scale)},
          reinterpret_cast<BFloat16*>(out), static_cast<float*>(nullptr), threads);
}

// The instruction-set copy the kernels of this library run (isa_level, kernel_common.h).
extern "C" int cpu_kernels_isa_level() { return isa_level(); }
