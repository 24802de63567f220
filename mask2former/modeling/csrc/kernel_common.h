// Shared by the CPU kernels of this folder: per-ISA clones, OpenMP ranges and the corners of
// bilinear sampling.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One copy of each kernel per instruction-set level, chosen when the library is loaded.
#define KERNEL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KERNEL_CLONES
#endif

namespace {

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

}  // namespace
