#include "basis_cpu.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(_WIN32)
#include <malloc.h>  // _aligned_malloc: MSVC's C library has no std::aligned_alloc
#endif

#include "pycurv/rng.hpp"

namespace pycurv {
namespace {

// Rows per deterministic partial sum. Fixed, so the summation order (and hence
// every bit of the result) does not depend on the number of threads.
constexpr int64_t kChunk = 8192;

// Row block whose nv basis vectors fill about 1 MiB (a core's L2): pass 2 then
// reads each block of V from memory once and from cache the second time.
// (Measured on the 2-core machines: shorter blocks cut the runs the hardware
// prefetchers follow, longer ones spill the second read out of L2.)
inline int64_t sub_block(int nv) {
  int64_t b = 131072 / std::max(nv, 1);
  b = std::max<int64_t>(64, std::min<int64_t>(kChunk, b));
  return b & ~int64_t(7);
}

// The hot kernels are compiled twice on x86-64 with GCC/Clang: for AVX2+FMA
// (x86-64-v3) and for the baseline; the loader picks one for the machine
// (function multiversioning), so a wheel built anywhere runs everywhere.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && defined(__linux__) && \
    !defined(PYCURV_NO_MULTIVERSION)
#define PYCURV_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PYCURV_CLONES
#endif
#if defined(_MSC_VER)
#define PYCURV_NOINLINE __declspec(noinline)
#else
#define PYCURV_NOINLINE __attribute__((noinline))
#endif

PYCURV_CLONES PYCURV_NOINLINE double dot(const double* __restrict a, const double* __restrict b,
                                         int64_t m) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < m; ++i) s += a[i] * b[i];
  return s;
}

// out[i] += <V_i, w> over m rows, V_i = base + i * ld; eight (then four) vectors share each load of w.
PYCURV_CLONES PYCURV_NOINLINE void block_dots(const double* base, int64_t ld, int nv,
                                              const double* __restrict w, int64_t m, double* out) {
  int i = 0;
  for (; i + 8 <= nv; i += 8) {
    const double* __restrict v0 = base + static_cast<int64_t>(i) * ld;
    const double* __restrict v1 = v0 + ld;
    const double* __restrict v2 = v1 + ld;
    const double* __restrict v3 = v2 + ld;
    const double* __restrict v4 = v3 + ld;
    const double* __restrict v5 = v4 + ld;
    const double* __restrict v6 = v5 + ld;
    const double* __restrict v7 = v6 + ld;
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, s4 = 0.0, s5 = 0.0, s6 = 0.0, s7 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t r = 0; r < m; ++r) {
      const double x = w[r];
      s0 += v0[r] * x;
      s1 += v1[r] * x;
      s2 += v2[r] * x;
      s3 += v3[r] * x;
      s4 += v4[r] * x;
      s5 += v5[r] * x;
      s6 += v6[r] * x;
      s7 += v7[r] * x;
    }
    out[i] += s0;
    out[i + 1] += s1;
    out[i + 2] += s2;
    out[i + 3] += s3;
    out[i + 4] += s4;
    out[i + 5] += s5;
    out[i + 6] += s6;
    out[i + 7] += s7;
  }
  for (; i + 4 <= nv; i += 4) {
    const double* __restrict v0 = base + static_cast<int64_t>(i) * ld;
    const double* __restrict v1 = v0 + ld;
    const double* __restrict v2 = v1 + ld;
    const double* __restrict v3 = v2 + ld;
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t r = 0; r < m; ++r) {
      const double x = w[r];
      s0 += v0[r] * x;
      s1 += v1[r] * x;
      s2 += v2[r] * x;
      s3 += v3[r] * x;
    }
    out[i] += s0;
    out[i + 1] += s1;
    out[i + 2] += s2;
    out[i + 3] += s3;
  }
  for (; i < nv; ++i) {
    const double* __restrict v = base + static_cast<int64_t>(i) * ld;
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t r = 0; r < m; ++r) s += v[r] * w[r];
    out[i] += s;
  }
}

// w -= sum_i h_i V_i over m rows; w is loaded and stored once per eight (then four) vectors.
PYCURV_CLONES PYCURV_NOINLINE void block_update(const double* base, int64_t ld, int nv, const double* h,
                                                double* __restrict w, int64_t m) {
  int i = 0;
  for (; i + 8 <= nv; i += 8) {
    const double* __restrict v0 = base + static_cast<int64_t>(i) * ld;
    const double* __restrict v1 = v0 + ld;
    const double* __restrict v2 = v1 + ld;
    const double* __restrict v3 = v2 + ld;
    const double* __restrict v4 = v3 + ld;
    const double* __restrict v5 = v4 + ld;
    const double* __restrict v6 = v5 + ld;
    const double* __restrict v7 = v6 + ld;
    const double h0 = h[i], h1 = h[i + 1], h2 = h[i + 2], h3 = h[i + 3];
    const double h4 = h[i + 4], h5 = h[i + 5], h6 = h[i + 6], h7 = h[i + 7];
#pragma omp simd
    for (int64_t r = 0; r < m; ++r)
      w[r] -= ((h0 * v0[r] + h1 * v1[r]) + (h2 * v2[r] + h3 * v3[r])) +
              ((h4 * v4[r] + h5 * v5[r]) + (h6 * v6[r] + h7 * v7[r]));
  }
  for (; i + 4 <= nv; i += 4) {
    const double* __restrict v0 = base + static_cast<int64_t>(i) * ld;
    const double* __restrict v1 = v0 + ld;
    const double* __restrict v2 = v1 + ld;
    const double* __restrict v3 = v2 + ld;
    const double h0 = h[i], h1 = h[i + 1], h2 = h[i + 2], h3 = h[i + 3];
#pragma omp simd
    for (int64_t r = 0; r < m; ++r) w[r] -= (h0 * v0[r] + h1 * v1[r]) + (h2 * v2[r] + h3 * v3[r]);
  }
  for (; i < nv; ++i) {
    const double* __restrict v = base + static_cast<int64_t>(i) * ld;
    const double hi = h[i];
#pragma omp simd
    for (int64_t r = 0; r < m; ++r) w[r] -= hi * v[r];
  }
}

// out_j = sum_i C[j * nold + i] V_i over m rows, for j < nnew (out_j = out + j * ldo).
// A small GEMM with the basis block in cache: 8 rows x 4 outputs of accumulators
// stay in registers while the nold basis vectors stream past.
PYCURV_CLONES PYCURV_NOINLINE void block_combine(const double* base, int64_t ld, int nold,
                                                 const double* C, int nnew, int64_t m,
                                                 double* __restrict out, int64_t ldo) {
  constexpr int R = 8;
  int j = 0;
  for (; j + 4 <= nnew; j += 4) {
    const double* c0 = C + static_cast<int64_t>(j) * nold;
    const double* c1 = c0 + nold;
    const double* c2 = c1 + nold;
    const double* c3 = c2 + nold;
    double* __restrict o0 = out + static_cast<int64_t>(j) * ldo;
    double* __restrict o1 = o0 + ldo;
    double* __restrict o2 = o1 + ldo;
    double* __restrict o3 = o2 + ldo;
    int64_t r0 = 0;
    for (; r0 + R <= m; r0 += R) {
      double a0[R] = {0}, a1[R] = {0}, a2[R] = {0}, a3[R] = {0};
      for (int i = 0; i < nold; ++i) {
        const double* __restrict v = base + static_cast<int64_t>(i) * ld + r0;
        const double x0 = c0[i], x1 = c1[i], x2 = c2[i], x3 = c3[i];
#pragma omp simd
        for (int t = 0; t < R; ++t) {
          a0[t] += x0 * v[t];
          a1[t] += x1 * v[t];
          a2[t] += x2 * v[t];
          a3[t] += x3 * v[t];
        }
      }
      for (int t = 0; t < R; ++t) {
        o0[r0 + t] = a0[t];
        o1[r0 + t] = a1[t];
        o2[r0 + t] = a2[t];
        o3[r0 + t] = a3[t];
      }
    }
    for (; r0 < m; ++r0) {
      double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
      for (int i = 0; i < nold; ++i) {
        const double v = base[static_cast<int64_t>(i) * ld + r0];
        a0 += c0[i] * v;
        a1 += c1[i] * v;
        a2 += c2[i] * v;
        a3 += c3[i] * v;
      }
      o0[r0] = a0;
      o1[r0] = a1;
      o2[r0] = a2;
      o3[r0] = a3;
    }
  }
  for (; j < nnew; ++j) {
    const double* cj = C + static_cast<int64_t>(j) * nold;
    double* __restrict o = out + static_cast<int64_t>(j) * ldo;
    for (int64_t r = 0; r < m; ++r) o[r] = 0.0;
    for (int i = 0; i < nold; ++i) {
      const double* __restrict v = base + static_cast<int64_t>(i) * ld;
      const double x = cj[i];
      if (x == 0.0) continue;
#pragma omp simd
      for (int64_t r = 0; r < m; ++r) o[r] += x * v[r];
    }
  }
}

// dst = a * src over m rows (a plain copy when a = 1).
PYCURV_CLONES __attribute__((noinline)) void scaled_copy(double* __restrict dst, const double* __restrict src,
                                                         double a, int64_t m) {
  if (a == 1.0) {
    std::memcpy(dst, src, sizeof(double) * m);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) dst[i] = a * src[i];
}

}  // namespace

namespace {
// Large buffers are 2 MiB aligned and, on Linux, offered to transparent huge
// pages: a step streams through up to ncv vectors at once, and with 4 KiB pages
// the TLB misses would cost more than the arithmetic.
double* alloc_doubles(size_t count) {
  if (count == 0) count = 1;
  const size_t bytes = count * sizeof(double);
  constexpr size_t kAlign = size_t(1) << 21;
#if defined(_WIN32)
  // Freed with _aligned_free (CpuBasis::Free), so every buffer comes from here.
  void* w = _aligned_malloc(bytes, bytes >= kAlign ? kAlign : 64);
  if (!w) throw std::bad_alloc();
  return static_cast<double*>(w);
#else
  if (bytes >= kAlign) {
    const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, rounded);
    if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);
#endif
    return static_cast<double*>(p);
  }
  void* p = std::malloc(bytes);
  if (!p) throw std::bad_alloc();
  return static_cast<double*>(p);
#endif
}
}  // namespace

CpuBasis::CpuBasis(int64_t n, int nslots, int nritz)
    : n_(n), nslots_(nslots), nritz_(nritz),
      // Uninitialised on purpose: pages are touched by the kernels that first write them.
      data_(alloc_doubles(static_cast<size_t>(n) * nslots)),
      ritz_(nritz > 0 ? alloc_doubles(static_cast<size_t>(n) * nritz) : nullptr) {}

int64_t CpuBasis::chunks() const { return std::max<int64_t>(1, (n_ + kChunk - 1) / kChunk); }

constexpr double kThreadedMin = 4.0 * 1024 * 1024;  // doubles streamed (32 MiB)

bool CpuBasis::threaded(double vectors) const {
  return chunks() > 1 && vectors * static_cast<double>(n_) >= kThreadedMin;
}

void CpuBasis::sum_chunks(int width, double* out) const {
  const int64_t nc = chunks();
  for (int i = 0; i < width; ++i) out[i] = 0.0;
  for (int64_t c = 0; c < nc; ++c) {
    const double* p = partial_.data() + c * width;
    for (int i = 0; i < width; ++i) out[i] += p[i];
  }
}

void CpuBasis::dots(const double* src, int w, int nv, double* out) {
  count(nv + 1 + (src ? 2 : 0));  // V and w read; src read and w written when loading
  const int64_t nc = chunks();
  const int width = nv + 1;
  partial_.assign(static_cast<size_t>(nc) * width, 0.0);
  double* wv = slot(w);
  // No reuse of V here: whole chunks, so each vector is read in long runs.
  const int64_t sub = kChunk;
#pragma omp parallel for schedule(static) if (threaded(nv + 1 + (src ? 2 : 0)))
  for (int64_t c = 0; c < nc; ++c) {
    double* p = partial_.data() + c * width;
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
    for (int64_t r0 = c * kChunk; r0 < r1; r0 += sub) {
      const int64_t m = std::min(sub, r1 - r0);
      double* wb = wv + r0;
      if (src) scaled_copy(wb, src + r0, src_scale_, m);
      block_dots(slot(0) + r0, n_, nv, wb, m, p);
      p[nv] += dot(wb, wb, m);
    }
  }
  sum_chunks(width, out);
}

void CpuBasis::magnitude(const double* src, int w, double* out) {
  count(1);
  const double* x = src ? src : slot(w);
  const int64_t nc = chunks();
  partial_.assign(static_cast<size_t>(nc) * 2, 0.0);
  constexpr double kDown = 0x1p-64, kUp = 0x1p64;
#pragma omp parallel for schedule(static) if (threaded(1))
  for (int64_t c = 0; c < nc; ++c) {
    double big = 0.0, small = 0.0;
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
#pragma omp simd reduction(+ : big, small)
    for (int64_t i = c * kChunk; i < r1; ++i) {
      const double a = std::fabs(x[i]);
      const bool large = a >= 1.0;  // NaN goes to small: both sums must stay finite for a finite x
      big += large ? a * kDown : 0.0;
      small += large ? 0.0 : a * kUp;
    }
    partial_[2 * c] = big;
    partial_[2 * c + 1] = small;
  }
  sum_chunks(2, out);
}

void CpuBasis::update_dots(int w, int nv, const double* h, double* out) {
  count(nv + 2);  // V read once (the second read hits cache), w read and written
  const int64_t nc = chunks();
  const int width = nv + 1;
  partial_.assign(static_cast<size_t>(nc) * width, 0.0);
  double* wv = slot(w);
  const int64_t sub = sub_block(nv);
#pragma omp parallel for schedule(static) if (threaded(nv + 2))
  for (int64_t c = 0; c < nc; ++c) {
    double* p = partial_.data() + c * width;
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
    for (int64_t r0 = c * kChunk; r0 < r1; r0 += sub) {
      const int64_t m = std::min(sub, r1 - r0);
      double* wb = wv + r0;
      block_update(slot(0) + r0, n_, nv, h, wb, m);
      block_dots(slot(0) + r0, n_, nv, wb, m, p);
      p[nv] += dot(wb, wb, m);
    }
  }
  sum_chunks(width, out);
}

void CpuBasis::update_norm(int w, int nv, const double* h, double* out) {
  count(nv + 2);
  const int64_t nc = chunks();
  partial_.assign(static_cast<size_t>(nc), 0.0);
  double* wv = slot(w);
  const int64_t sub = sub_block(nv);
#pragma omp parallel for schedule(static) if (threaded(nv + 2))
  for (int64_t c = 0; c < nc; ++c) {
    double s = 0.0;
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
    for (int64_t r0 = c * kChunk; r0 < r1; r0 += sub) {
      const int64_t m = std::min(sub, r1 - r0);
      double* wb = wv + r0;
      block_update(slot(0) + r0, n_, nv, h, wb, m);
      s += dot(wb, wb, m);
    }
    partial_[c] = s;
  }
  sum_chunks(1, out);
}

void CpuBasis::scale(int w, double a) {
  count(2);
  double* wv = slot(w);
  const int64_t nc = chunks();
#pragma omp parallel for schedule(static) if (threaded(2))
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
#pragma omp simd
    for (int64_t r = c * kChunk; r < r1; ++r) wv[r] *= a;
  }
}

void CpuBasis::random_normal(int w, uint64_t key, int64_t offset) {
  count(1);
  double* wv = slot(w);
  const int64_t nc = chunks();
#pragma omp parallel for schedule(static) if (threaded(1))
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
    for (int64_t r = c * kChunk; r < r1; ++r) wv[r] = normal_at(key, static_cast<uint64_t>(offset + r));
  }
}

void CpuBasis::combine(int nold, const double* C, int nnew) {
  count(nold + nnew);
  const int64_t nc = chunks();
  const int64_t sub = sub_block(std::max(nold, nnew));
#pragma omp parallel if (threaded(nold + nnew))
  {
    std::vector<double> buf(static_cast<size_t>(nnew) * sub);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t r1 = std::min(n_, (c + 1) * kChunk);
      for (int64_t r0 = c * kChunk; r0 < r1; r0 += sub) {
        const int64_t m = std::min(sub, r1 - r0);
        block_combine(slot(0) + r0, n_, nold, C, nnew, m, buf.data(), sub);
        for (int j = 0; j < nnew; ++j)
          std::memcpy(slot(j) + r0, buf.data() + static_cast<int64_t>(j) * sub, sizeof(double) * m);
      }
    }
  }
}

void CpuBasis::ritz_vector(int nold, const double* s, int r) {
  count(nold + 1);
  double* y = ritz(r);
  const int64_t nc = chunks();
  const int64_t sub = sub_block(nold);
#pragma omp parallel for schedule(static) if (threaded(nold + 1))
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
    for (int64_t r0 = c * kChunk; r0 < r1; r0 += sub) {
      const int64_t m = std::min(sub, r1 - r0);
      block_combine(slot(0) + r0, n_, nold, s, 1, m, y + r0, sub);
    }
  }
}

void CpuBasis::residual(const double* w, int r, double theta, double* out) {
  count(2);
  const double* y = ritz(r);
  const int64_t nc = chunks();
  partial_.assign(static_cast<size_t>(nc), 0.0);
#pragma omp parallel for schedule(static) if (threaded(2))
  for (int64_t c = 0; c < nc; ++c) {
    double s = 0.0;
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
#pragma omp simd reduction(+ : s)
    for (int64_t i = c * kChunk; i < r1; ++i) {
      const double d = src_scale_ * w[i] - theta * y[i];
      s += d * d;
    }
    partial_[c] = s;
  }
  sum_chunks(1, out);
}

double measure_read_bandwidth(int64_t n, int repeats) {
  CpuBasis b(n, 1, 0);
  b.random_normal(0, 1, 0);
  double out[1];
  double best = 0.0;
  for (int i = 0; i < std::max(repeats, 1); ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    b.dots(nullptr, 0, 0, out);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > 0) best = std::max(best, 8.0 * static_cast<double>(n) / dt);
  }
  return best;
}

}  // namespace pycurv
