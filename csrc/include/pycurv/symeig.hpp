// Eigen-decomposition of a small dense symmetric matrix: the Rayleigh-Ritz step
// of the Lanczos solver (the projected matrix is at most ncv x ncv).
//
// Householder reduction to tridiagonal form followed by the implicit QL method
// with Wilkinson shifts on the tridiagonal matrix (the EISPACK tred2/tql2 pair,
// Bowdler, Martin, Reinsch & Wilkinson, Numer. Math. 11, 1968). Backward
// stable: eigenvalues carry an absolute error of a small multiple of
// eps * ||T||, the accuracy the Ritz values need.
//
// Host-only, no allocation, no Python: shared by the CPU and CUDA backends.
#pragma once

#include <cmath>
#include <cstdint>

namespace pycurv {

// Reduces the symmetric matrix held in z (n x n, row-major, both triangles) to
// tridiagonal form, overwriting z with the orthogonal transformation.
// On return d holds the diagonal and e[1..n-1] the sub-diagonal (e[0] = 0).
inline void tridiagonalize(int n, double* z, double* d, double* e) {
  auto Z = [z, n](int r, int c) -> double& { return z[static_cast<int64_t>(r) * n + c]; };
  for (int j = 0; j < n; ++j) d[j] = Z(n - 1, j);
  for (int i = n - 1; i > 0; --i) {
    double scale = 0.0, h = 0.0;
    for (int k = 0; k < i; ++k) scale += std::fabs(d[k]);
    if (scale == 0.0) {
      e[i] = d[i - 1];
      for (int j = 0; j < i; ++j) {
        d[j] = Z(i - 1, j);
        Z(i, j) = 0.0;
        Z(j, i) = 0.0;
      }
    } else {
      for (int k = 0; k < i; ++k) {
        d[k] /= scale;
        h += d[k] * d[k];
      }
      double f = d[i - 1];
      double g = std::sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (int j = 0; j < i; ++j) e[j] = 0.0;
      for (int j = 0; j < i; ++j) {
        f = d[j];
        Z(j, i) = f;
        g = e[j] + Z(j, j) * f;
        for (int k = j + 1; k <= i - 1; ++k) {
          g += Z(k, j) * d[k];
          e[k] += Z(k, j) * f;
        }
        e[j] = g;
      }
      f = 0.0;
      for (int j = 0; j < i; ++j) {
        e[j] /= h;
        f += e[j] * d[j];
      }
      const double hh = f / (h + h);
      for (int j = 0; j < i; ++j) e[j] -= hh * d[j];
      for (int j = 0; j < i; ++j) {
        f = d[j];
        g = e[j];
        for (int k = j; k <= i - 1; ++k) Z(k, j) -= (f * e[k] + g * d[k]);
        d[j] = Z(i - 1, j);
        Z(i, j) = 0.0;
      }
    }
    d[i] = h;
  }
  // Accumulate the transformations.
  for (int i = 0; i < n - 1; ++i) {
    Z(n - 1, i) = Z(i, i);
    Z(i, i) = 1.0;
    const double h = d[i + 1];
    if (h != 0.0) {
      for (int k = 0; k <= i; ++k) d[k] = Z(k, i + 1) / h;
      for (int j = 0; j <= i; ++j) {
        double g = 0.0;
        for (int k = 0; k <= i; ++k) g += Z(k, i + 1) * Z(k, j);
        for (int k = 0; k <= i; ++k) Z(k, j) -= g * d[k];
      }
    }
    for (int k = 0; k <= i; ++k) Z(k, i + 1) = 0.0;
  }
  for (int j = 0; j < n; ++j) {
    d[j] = Z(n - 1, j);
    Z(n - 1, j) = 0.0;
  }
  Z(n - 1, n - 1) = 1.0;
  e[0] = 0.0;
}

// Implicit QL on the tridiagonal (d, e) from tridiagonalize, accumulating the
// rotations into z. On return d holds the eigenvalues in ascending order and
// column i of z the matching unit eigenvector. Returns false if an eigenvalue
// needed more than 60 sweeps (never seen for finite input).
inline bool tridiagonal_ql(int n, double* d, double* e, double* z) {
  auto Z = [z, n](int r, int c) -> double& { return z[static_cast<int64_t>(r) * n + c]; };
  for (int i = 1; i < n; ++i) e[i - 1] = e[i];
  if (n > 0) e[n - 1] = 0.0;
  double f = 0.0, tst1 = 0.0;
  const double eps = 0x1p-52;
  for (int l = 0; l < n; ++l) {
    tst1 = std::fmax(tst1, std::fabs(d[l]) + std::fabs(e[l]));
    int m = l;
    while (m < n) {
      if (std::fabs(e[m]) <= eps * tst1) break;
      ++m;
    }
    if (m == n) m = n - 1;  // e[n-1] == 0, reached only through NaN input
    if (m > l) {
      int iter = 0;
      do {
        if (++iter > 60) return false;
        double g = d[l];
        double p = (d[l + 1] - g) / (2.0 * e[l]);
        double r = std::hypot(p, 1.0);
        if (p < 0) r = -r;
        d[l] = e[l] / (p + r);
        d[l + 1] = e[l] * (p + r);
        const double dl1 = d[l + 1];
        double h = g - d[l];
        for (int i = l + 2; i < n; ++i) d[i] -= h;
        f += h;
        p = d[m];
        double c = 1.0, c2 = 1.0, c3 = 1.0;
        const double el1 = e[l + 1];
        double s = 0.0, s2 = 0.0;
        for (int i = m - 1; i >= l; --i) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i];
          h = c * p;
          r = std::hypot(p, e[i]);
          e[i + 1] = s * r;
          s = e[i] / r;
          c = p / r;
          p = c * d[i] - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]);
          for (int k = 0; k < n; ++k) {
            h = Z(k, i + 1);
            Z(k, i + 1) = s * Z(k, i) + c * h;
            Z(k, i) = c * Z(k, i) - s * h;
          }
        }
        p = -s * s2 * c3 * el1 * e[l] / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (std::fabs(e[l]) > eps * tst1);
    }
    d[l] += f;
    e[l] = 0.0;
  }
  // Selection sort into ascending order (n is small).
  for (int i = 0; i < n - 1; ++i) {
    int kmin = i;
    double p = d[i];
    for (int j = i + 1; j < n; ++j) {
      if (d[j] < p) {
        kmin = j;
        p = d[j];
      }
    }
    if (kmin != i) {
      d[kmin] = d[i];
      d[i] = p;
      for (int r = 0; r < n; ++r) {
        const double t = Z(r, i);
        Z(r, i) = Z(r, kmin);
        Z(r, kmin) = t;
      }
    }
  }
  return true;
}

// Eigen-decomposition of the symmetric matrix a (n x n, row-major, leading
// dimension lda). w: n eigenvalues ascending; z: n x n row-major, eigenvector i
// in column i; work: n doubles. The matrix is scaled to max |a_ij| = 1 first so
// that products of two off-diagonal entries neither underflow nor overflow.
// Returns false on failure to converge.
inline bool symeig(int n, const double* a, int lda, double* w, double* z, double* work) {
  double amax = 0.0;
  for (int r = 0; r < n; ++r)
    for (int c = 0; c < n; ++c) amax = std::fmax(amax, std::fabs(a[static_cast<int64_t>(r) * lda + c]));
  const double inv = amax > 0.0 ? 1.0 / amax : 1.0;
  const bool rescale = amax > 0.0 && std::isfinite(inv);
  for (int r = 0; r < n; ++r)
    for (int c = 0; c < n; ++c)
      z[static_cast<int64_t>(r) * n + c] = a[static_cast<int64_t>(r) * lda + c] * (rescale ? inv : 1.0);
  if (n == 0) return true;
  tridiagonalize(n, z, w, work);
  const bool ok = tridiagonal_ql(n, w, work, z);
  if (rescale)
    for (int i = 0; i < n; ++i) w[i] *= amax;
  return ok;
}

}  // namespace pycurv
