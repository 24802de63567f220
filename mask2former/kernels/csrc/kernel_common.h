// Shared by the CPU kernels of this folder: per-ISA clones, OpenMP ranges, the corners of
// bilinear sampling and a vectorised exponential.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) || defined(__SSE__)
#include <xmmintrin.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One copy of each kernel per instruction-set level, chosen when the library is loaded.
#define KERNEL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KERNEL_CLONES
#endif

// Helpers compiled into their caller (and so into each per-ISA clone or target of the caller).
#define ALWAYS_INLINE __attribute__((always_inline)) inline

// Per-target copies of a kernel with its own vector width: the copy for x86-64-v4 (AVX-512,
// 64-byte vectors), for x86-64-v3 (AVX2 + FMA, 32-byte vectors) and a baseline, chosen once by
// isa_level().
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KERNEL_TARGETS 1
#define TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define KERNEL_TARGETS 0
#endif

namespace {

// While alive, the thread's floating-point unit flushes denormal (subnormal) results to zero
// and reads denormal inputs as zero, as torch.set_flush_denormal(True) does: arithmetic on
// denormals takes a slow microcode path (a 2000 x 2000 float32 product of denormals runs ~200x
// slower), and what it changes lies below 1.2e-38 (float) / 2.2e-308 (double). The previous mode
// is restored on destruction. No-op off x86.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// 4 on x86-64-v4 (AVX-512), 3 on x86-64-v3 (AVX2 + FMA), else 0. The environment variable
// MASK2FORMER_KERNEL_ISA ("v3" or "base") caps it, so that the tests run every copy on one CPU.
inline int isa_level() {
  int level = 0;
#if KERNEL_TARGETS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) {
    level = 4;
  } else if (__builtin_cpu_supports("x86-64-v3")) {
    level = 3;
  }
#endif
  const char* cap = std::getenv("MASK2FORMER_KERNEL_ISA");
  if (cap && std::strcmp(cap, "v3") == 0) level = std::min(level, 3);
  if (cap && std::strcmp(cap, "base") == 0) level = 0;
  return level;
}

// Runs fn(begin, end) over [0, n) split into one contiguous range per thread, on OpenMP's
// thread pool. Built with -fopenmp, the library links libgomp.so.1; in a process where PyTorch
// has loaded its own libgomp.so.1 the loader resolves to that one, so these are PyTorch's own
// worker threads (threads of a second pool would compete with PyTorch's, which keep spinning
// for a while after each of its parallel regions).
template <typename F>
void parallel_for(int64_t n, int threads, const F& fn) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  if (threads == 1) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) {
    const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin < end) fn(begin, end);
  }
}

// The four bilinear corners of a sampling pixel: which of them lie inside the H x W map, their
// positions (y * W + x) and their bilinear weights, in the order (x0, y0), (x0 + 1, y0),
// (x0, y0 + 1), (x0 + 1, y0 + 1). Returns false when no corner can lie inside (then nothing is
// sampled and nothing gets a gradient; NaN pixels land here too).
template <typename T>
struct Corners {
  T fx, fy;
  bool inside[4];
  int64_t position[4];
  T bilinear[4];

  bool set(T x, T y, int64_t H, int64_t W) {
    if (!(x >= T(-1) && x <= T(W) && y >= T(-1) && y <= T(H))) return false;
    const T xf = std::floor(x), yf = std::floor(y);
    const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
    fx = x - xf;
    fy = y - yf;
    bilinear[0] = (1 - fx) * (1 - fy);
    bilinear[1] = fx * (1 - fy);
    bilinear[2] = (1 - fx) * fy;
    bilinear[3] = fx * fy;
    // 0 <= i < size as one unsigned comparison
    const bool x0_in = static_cast<uint64_t>(x0) < static_cast<uint64_t>(W);
    const bool x1_in = static_cast<uint64_t>(x0 + 1) < static_cast<uint64_t>(W);
    const bool y0_in = static_cast<uint64_t>(y0) < static_cast<uint64_t>(H);
    const bool y1_in = static_cast<uint64_t>(y0 + 1) < static_cast<uint64_t>(H);
    inside[0] = x0_in && y0_in;
    inside[1] = x1_in && y0_in;
    inside[2] = x0_in && y1_in;
    inside[3] = x1_in && y1_in;
    position[0] = y0 * W + x0;
    position[1] = position[0] + 1;
    position[2] = position[0] + W;
    position[3] = position[2] + 1;
    return true;
  }
};


// e^x for float vectors V (any width) with x <= 0, K vectors at a time so that K independent
// chains are in flight. Below -87 it returns e^-87 (about 1.6e-38, nothing next to the 1 it is
// added to or divided by). With a = max(x, -87): a = n ln2 + r with |r| <= ln2 / 2 (ln2 in two
// parts, so that n ln2 is exact), then a degree-6 polynomial of e^r, times 2^n built in the
// exponent bits (relative error about 1e-7, as the float32 library function).
template <typename V, int K>
ALWAYS_INLINE void exp_nonpositive(const V (&x)[K], V (&out)[K]) {
  typedef int32_t I __attribute__((vector_size(sizeof(V))));
  const V shifter = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  V n[K], r[K], p[K];
  for (int k = 0; k < K; ++k) {
    const V a = x[k] < -87.0f ? V{} - 87.0f : x[k];
    n[k] = (a * 1.44269504088896341f + shifter) - shifter;
    r[k] = (a - n[k] * 0.693359375f) + n[k] * 2.12194440e-4f;
    p[k] = 1.9875691500e-4f * r[k] + 1.3981999507e-3f;
  }
  for (int k = 0; k < K; ++k) p[k] = p[k] * r[k] + 8.3334519073e-3f;
  for (int k = 0; k < K; ++k) p[k] = p[k] * r[k] + 4.1665795894e-2f;
  for (int k = 0; k < K; ++k) p[k] = p[k] * r[k] + 1.6666665459e-1f;
  for (int k = 0; k < K; ++k) p[k] = p[k] * r[k] + 5.0000001201e-1f;
  for (int k = 0; k < K; ++k) {
    p[k] = p[k] * r[k] * r[k] + r[k] + 1.0f;
    const I bits = (__builtin_convertvector(n[k], I) + 127) << 23;
    V scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    out[k] = p[k] * scale;
  }
}

}  // namespace
