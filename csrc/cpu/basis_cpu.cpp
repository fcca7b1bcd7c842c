#include "basis_cpu.hpp"

#include <algorithm>
#include <cstring>
#include <new>

#include "pycurv/rng.hpp"

namespace pycurv {
namespace {

// Rows per deterministic partial sum. Fixed, so the summation order (and hence
// every bit of the result) does not depend on the number of threads.
constexpr int64_t kChunk = 8192;

// Row block whose nv basis vectors fit in about 512 KiB of cache: pass 2 then
// reads each block of V from memory once and from cache the second time.
inline int64_t sub_block(int nv) {
  int64_t b = 65536 / std::max(nv, 1);
  b = std::max<int64_t>(64, std::min<int64_t>(kChunk, b));
  return b & ~int64_t(7);
}

inline double dot(const double* __restrict a, const double* __restrict b, int64_t m) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < m; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(double* __restrict y, double a, const double* __restrict x, int64_t m) {
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) y[i] += a * x[i];
}

}  // namespace

CpuBasis::CpuBasis(int64_t n, int nslots, int nritz)
    : n_(n), nslots_(nslots), nritz_(nritz) {
  // Uninitialised on purpose: pages are touched by the kernels that first write them.
  data_.reset(new double[static_cast<size_t>(n) * nslots]);
  if (nritz > 0) ritz_.reset(new double[static_cast<size_t>(n) * nritz]);
}

int64_t CpuBasis::chunks() const { return std::max<int64_t>(1, (n_ + kChunk - 1) / kChunk); }

void CpuBasis::sum_chunks(int width, double* out) const {
  const int64_t nc = chunks();
  for (int i = 0; i < width; ++i) out[i] = 0.0;
  for (int64_t c = 0; c < nc; ++c) {
    const double* p = partial_.data() + c * width;
    for (int i = 0; i < width; ++i) out[i] += p[i];
  }
}

void CpuBasis::dots(const double* src, int w, int nv, double* out) {
  const int64_t nc = chunks();
  const int width = nv + 1;
  partial_.assign(static_cast<size_t>(nc) * width, 0.0);
  double* wv = slot(w);
  const int64_t sub = sub_block(nv);
#pragma omp parallel for schedule(static) if (nc > 1)
  for (int64_t c = 0; c < nc; ++c) {
    double* p = partial_.data() + c * width;
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
    for (int64_t r0 = c * kChunk; r0 < r1; r0 += sub) {
      const int64_t m = std::min(sub, r1 - r0);
      double* wb = wv + r0;
      if (src) std::memcpy(wb, src + r0, sizeof(double) * m);
      for (int i = 0; i < nv; ++i) p[i] += dot(slot(i) + r0, wb, m);
      p[nv] += dot(wb, wb, m);
    }
  }
  sum_chunks(width, out);
}

void CpuBasis::update_dots(int w, int nv, const double* h, double* out) {
  const int64_t nc = chunks();
  const int width = nv + 1;
  partial_.assign(static_cast<size_t>(nc) * width, 0.0);
  double* wv = slot(w);
  const int64_t sub = sub_block(nv);
#pragma omp parallel for schedule(static) if (nc > 1)
  for (int64_t c = 0; c < nc; ++c) {
    double* p = partial_.data() + c * width;
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
    for (int64_t r0 = c * kChunk; r0 < r1; r0 += sub) {
      const int64_t m = std::min(sub, r1 - r0);
      double* wb = wv + r0;
      for (int i = 0; i < nv; ++i) axpy(wb, -h[i], slot(i) + r0, m);
      for (int i = 0; i < nv; ++i) p[i] += dot(slot(i) + r0, wb, m);
      p[nv] += dot(wb, wb, m);
    }
  }
  sum_chunks(width, out);
}

void CpuBasis::update_norm(int w, int nv, const double* h, double* out) {
  const int64_t nc = chunks();
  partial_.assign(static_cast<size_t>(nc), 0.0);
  double* wv = slot(w);
  const int64_t sub = sub_block(nv);
#pragma omp parallel for schedule(static) if (nc > 1)
  for (int64_t c = 0; c < nc; ++c) {
    double s = 0.0;
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
    for (int64_t r0 = c * kChunk; r0 < r1; r0 += sub) {
      const int64_t m = std::min(sub, r1 - r0);
      double* wb = wv + r0;
      for (int i = 0; i < nv; ++i) axpy(wb, -h[i], slot(i) + r0, m);
      s += dot(wb, wb, m);
    }
    partial_[c] = s;
  }
  sum_chunks(1, out);
}

void CpuBasis::scale(int w, double a) {
  double* wv = slot(w);
  const int64_t nc = chunks();
#pragma omp parallel for schedule(static) if (nc > 1)
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
#pragma omp simd
    for (int64_t r = c * kChunk; r < r1; ++r) wv[r] *= a;
  }
}

void CpuBasis::random_normal(int w, uint64_t key, int64_t offset) {
  double* wv = slot(w);
  const int64_t nc = chunks();
#pragma omp parallel for schedule(static) if (nc > 1)
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
    for (int64_t r = c * kChunk; r < r1; ++r) wv[r] = normal_at(key, static_cast<uint64_t>(offset + r));
  }
}

void CpuBasis::combine(int nold, const double* C, int nnew) {
  const int64_t nc = chunks();
  const int64_t sub = sub_block(std::max(nold, nnew));
#pragma omp parallel if (nc > 1)
  {
    std::vector<double> buf(static_cast<size_t>(nnew) * sub);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t r1 = std::min(n_, (c + 1) * kChunk);
      for (int64_t r0 = c * kChunk; r0 < r1; r0 += sub) {
        const int64_t m = std::min(sub, r1 - r0);
        for (int j = 0; j < nnew; ++j) {
          double* o = buf.data() + static_cast<int64_t>(j) * sub;
          std::fill(o, o + m, 0.0);
          for (int i = 0; i < nold; ++i) {
            const double cij = C[static_cast<int64_t>(j) * nold + i];
            if (cij != 0.0) axpy(o, cij, slot(i) + r0, m);
          }
        }
        for (int j = 0; j < nnew; ++j)
          std::memcpy(slot(j) + r0, buf.data() + static_cast<int64_t>(j) * sub, sizeof(double) * m);
      }
    }
  }
}

void CpuBasis::ritz_vector(int nold, const double* s, int r) {
  double* y = ritz(r);
  const int64_t nc = chunks();
  const int64_t sub = sub_block(nold);
#pragma omp parallel for schedule(static) if (nc > 1)
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
    for (int64_t r0 = c * kChunk; r0 < r1; r0 += sub) {
      const int64_t m = std::min(sub, r1 - r0);
      std::fill(y + r0, y + r0 + m, 0.0);
      for (int i = 0; i < nold; ++i)
        if (s[i] != 0.0) axpy(y + r0, s[i], slot(i) + r0, m);
    }
  }
}

void CpuBasis::residual(const double* w, int r, double theta, double* out) {
  const double* y = ritz(r);
  const int64_t nc = chunks();
  partial_.assign(static_cast<size_t>(nc), 0.0);
#pragma omp parallel for schedule(static) if (nc > 1)
  for (int64_t c = 0; c < nc; ++c) {
    double s = 0.0;
    const int64_t r1 = std::min(n_, (c + 1) * kChunk);
#pragma omp simd reduction(+ : s)
    for (int64_t i = c * kChunk; i < r1; ++i) {
      const double d = w[i] - theta * y[i];
      s += d * d;
    }
    partial_[c] = s;
  }
  sum_chunks(1, out);
}

}  // namespace pycurv
