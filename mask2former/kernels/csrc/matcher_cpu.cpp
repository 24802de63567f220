// The Hungarian matcher's mask costs on the CPU: the sums over the sampled points of one image,
// for Q predicted masks against T target masks, without forming the [Q, P] point values.
//
// Plain C++17 with no PyTorch headers, built with the other kernels of this folder
// (mask2former/kernels/loader.py) and called through ctypes by matcher.py, which checks
// every shape, dtype and layout before a call. All arrays are float32, contiguous, row-major:
//
//   pred    [Q, H, W]  mask logits of the Q predictions (the kernel works on a channels-last
//                      copy, [H, W, C] with C = Q rounded up to a multiple of 16)
//   pixels  [P, 2]     sampling pixel (x, y) of each point; pixel centres are at integers
//   weights [P]        point weights w, or null (all 1)
//   tw      [T, P]     target values at the points times w
//   tww     [T, P]     target values at the points times w^2 (the same array without weights)
//
// With x the bilinearly sampled logit (zeros outside the map, as grid_sample with
// align_corners false) and s = sigmoid(x), the outputs are
//
//   softplus_sum [Q]     sum_p w softplus(x)
//   sigmoid_sum  [Q]     sum_p w s
//   x_t          [Q, T]  sum_p x tw
//   s_t          [Q, T]  sum_p s tww
//
// from which matcher.py forms the sigmoid cross-entropy and dice costs. softplus and sigmoid
// share one exponential, e^-|x|, evaluated a vector of channels at a time with a polynomial
// (relative error about 1e-7, as the float32 library functions): 16 lanes on x86-64-v4, 8
// elsewhere (the lanes compute the same values either way).
//
// Threads (OpenMP): the points are cut into blocks of a fixed size, each block's sums are kept
// apart and added in block order, so the results do not depend on the number of threads.

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_common.h"

namespace {

constexpr int64_t kChannelAlign = 16;  // C: Q rounded up to this (whole vectors of any width)
constexpr int64_t kBlock = 512;        // points per block of sums
constexpr int kStep = 4;               // points in flight at a time

// The vector helpers (ALWAYS_INLINE, kernel_common.h) are compiled into each per-target copy of
// their caller. They work on K vectors at a time, step by step, so that K independent chains are
// in flight.

// log(1 + e) for 0 <= e <= 1, as 2 atanh(u) with u = e / (2 + e) <= 1/3 (no rounding of 1 + e,
// so small e keep their relative precision): the odd series up to u^15 (error below 2e-9).
template <typename V, int K>
ALWAYS_INLINE void log1p_unit(const V (&e)[K], V (&out)[K]) {
  V u[K], z[K], p[K];
  for (int k = 0; k < K; ++k) {
    u[k] = e[k] / (e[k] + 2.0f);
    z[k] = u[k] * u[k];
    p[k] = z[k] * (1.0f / 15) + 1.0f / 13;
  }
  for (int k = 0; k < K; ++k) p[k] = p[k] * z[k] + 1.0f / 11;
  for (int k = 0; k < K; ++k) p[k] = p[k] * z[k] + 1.0f / 9;
  for (int k = 0; k < K; ++k) p[k] = p[k] * z[k] + 1.0f / 7;
  for (int k = 0; k < K; ++k) p[k] = p[k] * z[k] + 1.0f / 5;
  for (int k = 0; k < K; ++k) p[k] = p[k] * z[k] + 1.0f / 3;
  for (int k = 0; k < K; ++k) out[k] = 2.0f * u[k] * (p[k] * z[k] + 1.0f);
}

struct Problem {
  const float* pred;
  int64_t H, W, C, Q;
  const float* pixels;
  const float* weights;
  int64_t P;
  const float* tw;
  const float* tww;
  int64_t T;
};

// dst[0:lanes] += value (dst need not be aligned)
template <typename V>
ALWAYS_INLINE void add_to(float* dst, const V& value) {
  V x;
  std::memcpy(&x, dst, sizeof(x));
  x += value;
  std::memcpy(dst, &x, sizeof(x));
}

template <int W>
struct FloatVector {
  typedef float V __attribute__((vector_size(W)));
};

// The sums of the points [begin, end): 2 + 2T rows of C values (the padding channels past Q
// are not read back): softplus, sigmoid, then x_t and s_t of each target. W: vector bytes.
template <int W>
ALWAYS_INLINE void block_sums(const Problem& p, int64_t begin, int64_t end, float* sums) {
  typedef typename FloatVector<W>::V V;
  constexpr int kLanes = W / sizeof(float);
  const int64_t C = p.C, T = p.T, n = (end - begin + kStep - 1) / kStep * kStep;
  // per point of the block (padded to whole steps with points of weight 0): the four corners
  // as offsets into pred with their bilinear weights (a corner outside the map reads pixel 0
  // with weight 0), the point weight and the target values
  std::vector<int64_t> at(4 * n, 0);
  std::vector<float> bilinear(4 * n, 0.0f), w(n, 0.0f), tw(T * n, 0.0f), tww(T * n, 0.0f);
  for (int64_t i = 0; i < end - begin; ++i) {
    const int64_t point = begin + i;
    Corners<float> corners;
    const bool any = corners.set(p.pixels[2 * point], p.pixels[2 * point + 1], p.H, p.W);
    for (int c = 0; c < 4; ++c) {
      const bool inside = any && corners.inside[c];
      at[4 * i + c] = inside ? corners.position[c] * C : 0;
      bilinear[4 * i + c] = inside ? corners.bilinear[c] : 0.0f;
    }
    w[i] = p.weights ? p.weights[point] : 1.0f;
    for (int64_t t = 0; t < T; ++t) {
      tw[t * n + i] = p.tw[t * p.P + point];
      tww[t * n + i] = p.tww[t * p.P + point];
    }
  }
  float* __restrict x_t = sums + 2 * C;
  float* __restrict s_t = sums + (2 + T) * C;
  std::fill(sums, sums + (2 + 2 * T) * C, 0.0f);
  for (int64_t q = 0; q < C; q += kLanes) {  // a vector of channels at a time, over all points
    const float* pred = p.pred + q;
    V softplus_sum = {}, sigmoid_sum = {};
    for (int64_t i = 0; i < n; i += kStep) {
      V x[kStep], minus_abs[kStep], e[kStep], log1p_e[kStep];
      for (int k = 0; k < kStep; ++k) {
        x[k] = V{};
        for (int c = 0; c < 4; ++c) {
          V corner;
          std::memcpy(&corner, pred + at[4 * (i + k) + c], sizeof(corner));
          x[k] += bilinear[4 * (i + k) + c] * corner;
        }
        minus_abs[k] = x[k] < 0.0f ? x[k] : -x[k];
      }
      exp_nonpositive(minus_abs, e);  // e^-|x|
      log1p_unit(e, log1p_e);
      for (int k = 0; k < kStep; ++k) {
        const V inverse = 1.0f / (1.0f + e[k]);
        const V sigmoid = x[k] >= 0.0f ? inverse : e[k] * inverse;
        const V softplus = (x[k] > 0.0f ? x[k] : V{}) + log1p_e[k];
        softplus_sum += w[i + k] * softplus;
        sigmoid_sum += w[i + k] * sigmoid;
        for (int64_t t = 0; t < T; ++t) {
          add_to(x_t + t * C + q, tw[t * n + i + k] * x[k]);
          add_to(s_t + t * C + q, tww[t * n + i + k] * sigmoid);
        }
      }
    }
    std::memcpy(sums + q, &softplus_sum, sizeof(V));
    std::memcpy(sums + C + q, &sigmoid_sum, sizeof(V));
  }
}

typedef void (*BlockSums)(const Problem&, int64_t, int64_t, float*);
#if KERNEL_TARGETS
TARGET_V4 void block_sums_v4(const Problem& p, int64_t begin, int64_t end, float* sums) {
  block_sums<64>(p, begin, end, sums);
}
TARGET_V3 void block_sums_v3(const Problem& p, int64_t begin, int64_t end, float* sums) {
  block_sums<32>(p, begin, end, sums);
}
#endif
void block_sums_base(const Problem& p, int64_t begin, int64_t end, float* sums) {
  block_sums<32>(p, begin, end, sums);
}

BlockSums block_sums_for_this_cpu() {
#if KERNEL_TARGETS
  const int level = isa_level();
  if (level == 4) return block_sums_v4;
  if (level == 3) return block_sums_v3;
#endif
  return block_sums_base;
}

// pred [Q, H * W] -> [H * W, C], channels last with zeros past Q, in tiles of 16 pixels
void to_channels_last(const float* pred, int64_t HW, int64_t Q, int64_t C, float* out,
                      int threads) {
  constexpr int64_t kTile = 16;
  parallel_for((HW + kTile - 1) / kTile, threads, [&](int64_t first, int64_t last) {
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t begin = tile * kTile, end = std::min(HW, begin + kTile);
      for (int64_t q = 0; q < Q; ++q) {
        for (int64_t i = begin; i < end; ++i) out[i * C + q] = pred[q * HW + i];
      }
      for (int64_t i = begin; i < end; ++i) std::fill(out + i * C + Q, out + (i + 1) * C, 0.0f);
    }
  });
}

void point_sums(const Problem& p, float* softplus_sum, float* sigmoid_sum, float* x_t, float* s_t,
                int threads) {
  const int64_t size = (2 + 2 * p.T) * p.C, blocks = (p.P + kBlock - 1) / kBlock;
  std::vector<float> sums(blocks * size);
  static const BlockSums block = block_sums_for_this_cpu();
  parallel_for(blocks, threads, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      block(p, b * kBlock, std::min(p.P, (b + 1) * kBlock), sums.data() + b * size);
    }
  });
  std::vector<float> total(size, 0.0f);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t i = 0; i < size; ++i) total[i] += sums[b * size + i];
  }
  for (int64_t q = 0; q < p.Q; ++q) {
    softplus_sum[q] = total[q];
    sigmoid_sum[q] = total[p.C + q];
    for (int64_t t = 0; t < p.T; ++t) {
      x_t[q * p.T + t] = total[(2 + t) * p.C + q];
      s_t[q * p.T + t] = total[(2 + p.T + t) * p.C + q];
    }
  }
}

}  // namespace

extern "C" void matcher_point_sums_f32(const float* pred, int64_t H, int64_t W, int64_t Q,
                                       const float* pixels, const float* weights, int64_t P,
                                       const float* tw, const float* tww, int64_t T,
                                       float* softplus_sum, float* sigmoid_sum, float* x_t,
                                       float* s_t, int threads) {
  const int64_t C = (Q + kChannelAlign - 1) / kChannelAlign * kChannelAlign;
  std::vector<float> channels_last(H * W * C);
  to_channels_last(pred, H * W, Q, C, channels_last.data(), threads);
  point_sums(Problem{channels_last.data(), H, W, C, Q, pixels, weights, P, tw, tww, T},
             softplus_sum, sigmoid_sum, x_t, s_t, threads);
}
