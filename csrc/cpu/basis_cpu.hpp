// The Krylov basis in host memory and the memory-bound kernels on it.
//
// Every kernel that reduces (dot products, norms) sums over fixed chunks of
// rows and adds the chunk sums in chunk order, so results are bit-identical
// whatever the number of OpenMP threads. Sums returned here are local to this
// process; the Lanczos state asks its driver to all-reduce them (REDUCE).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>
#if defined(_WIN32)
#include <malloc.h>
#endif

namespace pycurv {

class CpuBasis {
 public:
  // n: rows held here; nslots: basis vectors (ncv + 1); nritz: Ritz-vector buffers.
  CpuBasis(int64_t n, int nslots, int nritz);

  int64_t rows() const { return n_; }
  int slots() const { return nslots_; }
  int ritz_slots() const { return nritz_; }
  double* slot(int i) { return data_.get() + static_cast<int64_t>(i) * n_; }
  const double* slot(int i) const { return data_.get() + static_cast<int64_t>(i) * n_; }
  double* ritz(int r) { return ritz_.get() + static_cast<int64_t>(r) * n_; }
  const double* ritz(int r) const { return ritz_.get() + static_cast<int64_t>(r) * n_; }

  // Products passed as src to dots() and residual() are read multiplied by s
  // (a power of two chosen by the Lanczos state; 1 until it is set).
  void set_source_scale(double s) { src_scale_ = s; }
  // A magnitude of x = src (a product, read unscaled) or, if src is null, of
  // slot w, as two sums that neither overflow nor underflow: out[0] = sum of
  // |x_i| 2^-64 over |x_i| >= 1, out[1] = sum of |x_i| 2^64 over |x_i| < 1.
  // (Squares of numbers below 1e-154 or above 1e154 leave the float64 range.)
  void magnitude(const double* src, int w, double* out);
  // Pass 1. If src is given it is first copied into slot w (times the source
  // scale, fused with the dots). out[i] = <V_i, w> for i < nv; out[nv] = <w, w>.
  void dots(const double* src, int w, int nv, double* out);
  // Pass 2. w -= V[0:nv] h, then out[i] = <V_i, w>, out[nv] = <w, w>; the
  // second read of each row block of V comes from cache.
  void update_dots(int w, int nv, const double* h, double* out);
  // Pass 3. w -= V[0:nv] h; out[0] = <w, w>.
  void update_norm(int w, int nv, const double* h, double* out);
  void scale(int w, double a);
  // Slot w <- normal random vector: entry i is normal_at(key, offset + i).
  void random_normal(int w, uint64_t key, int64_t offset);
  // In place: slots [0, nnew) <- slots [0, nold) * C, C column-major nold x nnew.
  void combine(int nold, const double* C, int nnew);
  // Ritz buffer r <- slots [0, nold) * s.
  void ritz_vector(int nold, const double* s, int r);
  // out[0] = |s w - theta * ritz_r|^2 with w an external vector of this process's rows, s the source scale.
  void residual(const double* w, int r, double theta, double* out);

  // Bytes the kernels called so far must move between memory and the cores at
  // the least (every basis vector read once per pass, w read and written where
  // it changes): the traffic model behind the bandwidth roofline in bench/.
  double bytes_moved() const { return bytes_; }

 private:
  int64_t chunks() const;
  // Whether a kernel that touches `vectors` vectors of length n runs on the
  // OpenMP team: only when it streams at least kThreadedMin doubles. Shorter
  // kernels gain little from a second thread and lose much when the cores are
  // shared: the caller's own threads (OpenBLAS, torch) spin for a while after
  // each product, and a team that waits for a descheduled member pays a
  // scheduler time slice per kernel (measured: 8x slower solves at n = 1e5
  // with a NumPy matvec on 2 cores).
  bool threaded(double vectors) const;
  void sum_chunks(int width, double* out) const;

  int64_t n_;
  int nslots_;
  int nritz_;
  struct Free {
#if defined(_WIN32)
    void operator()(double* p) const { _aligned_free(p); }
#else
    void operator()(double* p) const { std::free(p); }
#endif
  };
  std::unique_ptr<double[], Free> data_;
  std::unique_ptr<double[], Free> ritz_;
  std::vector<double> partial_;
  double bytes_ = 0.0;
  double src_scale_ = 1.0;
  void count(double vectors) { bytes_ += vectors * 8.0 * static_cast<double>(n_); }
};

// Best-of-`repeats` read bandwidth (bytes/s) of this machine for one pass over
// n doubles with the basis kernels' threading and memory layout: the roofline
// reference in bench/.
double measure_read_bandwidth(int64_t n, int repeats);

}  // namespace pycurv
