// Thick-restart Lanczos with full reorthogonalisation, driven by reverse
// communication. Templated on the basis backend (CPU or CUDA); no Python here.
//
// The state owns the float64 Krylov basis and everything derived from it. Its
// driver calls advance() and answers what it asks for:
//   MATVEC  w = A q for q = matvec_input(); the driver hands w back through
//           set_matvec_output() (a pointer to this process's rows of w).
//   REDUCE  sum the reduce_buffer() over all processes that hold rows of the
//           basis (nothing to do in one process; an all-reduce when sharded).
//   STEP    a Lanczos step finished: progress may be read, stop() requested.
//   DONE    results are ready.
// Every decision is taken on reduced values only, so every process holding a
// shard of the basis takes the same branch.
//
// Algorithm (Wu & Simon, SIAM J. Matrix Anal. Appl. 22, 2000; Stewart's
// Krylov-Schur form): the basis V satisfies A V = V T + f b^T with T symmetric,
// f orthogonal to V. Each step appends q = f/|f| and orthogonalises A q against
// the whole basis by classical Gram-Schmidt twice, fused so the basis is read
// at most three times (pass 1: h = V^T w; pass 2: w -= V h while accumulating
// h2 = V^T w block by block; pass 3, w -= V h2, only if |h2| says it is needed).
// Residual of Ritz pair (theta, V s): |f| |b^T s| plus bookkeeping of anything
// dropped (breakdowns, couplings to locked vectors). When the basis is full,
// wanted Ritz vectors are kept and the residual is carried on (thick restart).
// A breakdown (|f| ~ 0) means an invariant subspace: its Ritz values are exact,
// and the search continues from a random vector orthogonal to the basis when
// more is needed. Single-vector Krylov spaces hold one copy of a repeated
// eigenvalue; with check_multiplicity the converged wanted pairs are locked and
// a fresh random chain in their orthogonal complement must converge without
// entering the wanted set before the answer is accepted.
//
// Scale. Squared norms of vectors near 1e-160 underflow and near 1e160
// overflow, so the state never sums squares of the caller's raw numbers: the
// first nonzero product (and a caller's start vector) is first measured with
// sums of |x| that cannot under- or overflow (CpuBasis::magnitude), and every
// product is then read multiplied by a fixed even power of two s that brings
// it near 1. Powers of two scale every operation exactly, so the state runs
// on s A, bit for bit what it would do on A where no squared norm leaves the
// range, and reports eigenvalues and residuals divided by s.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "pycurv/rng.hpp"
#include "pycurv/symeig.hpp"

namespace pycurv {

enum class Which : int { LA = 0, SA = 1, BE = 2 };
enum class Request : int { Matvec = 1, Reduce = 2, Step = 3, Done = 4 };
enum class Status : int { Running = 0, Converged = 1, MaxMatvecs = 2, NoiseFloor = 3, Stopped = 4 };

struct Options {
  int64_t n_local = 0;    // rows of every vector held by this process
  int64_t n_global = 0;   // dimension of the operator
  int64_t offset = 0;     // global index of this process's first row
  int k = 1;              // wanted eigenvalues
  int ncv = 0;            // basis vectors kept (memory: ncv + 1 vectors)
  Which which = Which::LA;
  double tol = 1e-6;      // relative tolerance on the residual, or on the eigenvalue error estimate
  bool tol_on_eigenvalue = false;  // tol bounds min(r, r^2/gap) (the estimated eigenvalue error), not r
  int64_t max_matvecs = 0;
  // No convergence is declared before this many products: a Krylov space of
  // fewer dimensions cannot yet tell an isolated top eigenvalue from a
  // cluster, and its Ritz value converges to the cluster's. Not applied once
  // a random start's Krylov space is exhausted (its Ritz values are exact).
  int64_t min_matvecs = 0;
  uint64_t seed = 0;
  bool start_given = false;        // slot 0 holds the caller's start vector
  bool check_multiplicity = false; // verify no copy of a wanted eigenvalue is missing
  bool explicit_residuals = false; // confirm convergence with |A y - theta y| computed
  bool want_vectors = true;
  bool yield_reduce = true;        // false: one process, reductions are the identity
  double unit_roundoff = 0x1p-53;  // of the arithmetic inside the matvec
};

// The smallest relative residual that the recurrence's estimate |f| |b^T s|
// certifies on its own: the true residual differs from it by the rounding of
// the product and of the basis, about sqrt(n) eps |A| (64 for a wide margin).
// A tolerance below it is confirmed by residuals computed from A y.
inline double certifiable_tol(int64_t n) {
  return 64.0 * 0x1p-53 * std::sqrt(static_cast<double>(std::max<int64_t>(n, 1)));
}

// Raised when a reduced norm of A q is NaN or Inf.
class NonFiniteError : public std::runtime_error {
 public:
  NonFiniteError(const std::string& what, int64_t matvec) : std::runtime_error(what), matvec_(matvec) {}
  int64_t matvec() const { return matvec_; }

 private:
  int64_t matvec_;
};

// A basis with ortho_fused(src, w, nv, pass3_ratio, out) runs the three
// Gram-Schmidt passes of a step back to back on its device and returns all
// their sums at once (one host wait per step instead of one per pass); see
// CudaBasis::ortho_fused. Used in one process only: across processes every
// pass's sums must be reduced before the next pass can use them.
template <class B, class = void>
struct has_fused_ortho : std::false_type {};
template <class B>
struct has_fused_ortho<B, std::void_t<decltype(&B::ortho_fused)>> : std::true_type {};

// ---- scale (shared by Lanczos and Tridiag) --------------------------------
// From the reduced sums of Basis::magnitude (big: |x| 2^-64 over |x| >= 1;
// small: |x| 2^64 over |x| < 1): 1 and *e with 2^e within a factor 2 of the
// largest sum, so max|x| / 2 <= 2^e <= n max|x|; 0 for the zero vector; -1
// if the vector is not finite.
inline int magnitude_exponent(double big, double small, int* e) {
  if (!std::isfinite(big) || !std::isfinite(small)) return -1;
  if (big > 0.0) {
    *e = std::ilogb(big) + 64;
    return 1;
  }
  if (small > 0.0) {
    *e = std::ilogb(small) - 64;
    return 1;
  }
  return 0;
}
// The even exponent p with 2^p 2^e in [1, 4): entries of the scaled vector
// lie within [1/n, 4] of each other at the top, so its squared norm neither
// under- nor overflows. Even, so that square roots scale exactly too;
// within [-1022, 1022], so that 2^p is a normal number.
inline int scale_exponent(int e) {
  const int p = -(e - (((e % 2) + 2) % 2));
  return std::max(-1022, std::min(1022, p));
}

template <class Basis>
class Lanczos {
 public:
  Lanczos(const Options& opt, Basis* basis) : o_(opt), B_(basis) {
    if (opt.k < 1 || opt.k > opt.n_global) throw std::invalid_argument("k must satisfy 1 <= k <= n");
    if (opt.ncv < opt.k || opt.ncv > opt.n_global) throw std::invalid_argument("ncv must satisfy k <= ncv <= n");
    if (opt.ncv < opt.n_global && opt.ncv < opt.k + 2)
      throw std::invalid_argument("ncv must be at least k + 2 unless ncv == n");
    const int m = o_.ncv;
    T_.assign(static_cast<size_t>(m) * m, 0.0);
    E_.assign(static_cast<size_t>(m) * m, 0.0);
    b_.assign(m, 0.0);
    drift_.assign(m, 0.0);
    coup_.assign(m, 0.0);
    Cl_.assign(static_cast<size_t>(m) * m, 0.0);
    theta_.assign(m, 0.0);
    S_.assign(static_cast<size_t>(m) * m, 0.0);
    rho_.assign(m, 0.0);
    rb_.assign(m, 0.0);
    work_.assign(m, 0.0);
    h_.assign(m + 2, 0.0);
    red_.assign(m + 2, 0.0);
    need_verify_ = o_.check_multiplicity && o_.k >= 2;
    tol_est_ = std::max(o_.tol, certifiable_tol(o_.n_global));
    if (o_.tol < tol_est_ && !o_.explicit_residuals)
      throw std::invalid_argument("tol below certifiable_tol(n) needs explicit_residuals (see make_options)");
  }

  // ---- driver interface -------------------------------------------------
  Request advance() {
    for (;;) {
      switch (pc_) {
        case Pc::Start: {
          chain_user_ = o_.start_given;
          if (o_.start_given) {  // the caller's numbers may be anywhere in the float64 range
            B_->magnitude(nullptr, 0, red_.data());
            gate(Pc::StartMeasured, 2);
            break;
          }
          B_->random_normal(0, rng_key(o_.seed, stream_++), o_.offset);
          ortho_begin(0, 0, /*src=*/nullptr, Pc::StartDone);
          break;
        }
        case Pc::StartMeasured: {
          int e = 0;
          const int m = magnitude_exponent(red_[0], red_[1], &e);
          if (m < 0) throw std::invalid_argument("the start vector is not finite");
          if (m == 0) throw std::invalid_argument("the start vector is zero");
          B_->scale(0, std::ldexp(1.0, pycurv::scale_exponent(e)));
          ortho_begin(0, 0, /*src=*/nullptr, Pc::StartDone);
          break;
        }
        case Pc::StartDone: {
          const double nrm = std::sqrt(onorm2_);
          if (!(nrm > 0.0) || !std::isfinite(nrm))
            throw std::invalid_argument("the start vector is zero or not finite");
          B_->scale(0, 1.0 / nrm);
          pending_ = true;
          std::fill(coup_.begin(), coup_.end(), 0.0);
          pc_ = Pc::Expand;
          break;
        }
        case Pc::Expand: {
          in_slot_ = L_ + a_;
          in_ritz_ = -1;
          pc_ = Pc::AfterMatvec;
          return Request::Matvec;
        }
        case Pc::AfterMatvec: {
          ++n_matvecs_;
          if (!scaled_) {  // until a product is nonzero, its scale is unknown
            B_->magnitude(out_ptr_, 0, red_.data());
            gate(Pc::ProductMeasured, 2);
            break;
          }
          const int s = L_ + a_;
          ortho_begin(s + 1, s + 1, out_ptr_, Pc::StepDone);
          break;
        }
        case Pc::ProductMeasured: {
          int e = 0;
          const int m = magnitude_exponent(red_[0], red_[1], &e);
          if (m < 0) throw NonFiniteError("matvec returned non-finite values", n_matvecs_);
          if (m > 0) {  // a zero product stays zero whatever the scale: decide at the first nonzero one
            scale_exp_ = pycurv::scale_exponent(e);
            scaled_ = true;
            B_->set_source_scale(std::ldexp(1.0, scale_exp_));
          }
          const int s = L_ + a_;
          ortho_begin(s + 1, s + 1, out_ptr_, Pc::StepDone);
          break;
        }
        case Pc::Gate: {
          pc_ = gate_next_;
          if (o_.yield_reduce) return Request::Reduce;
          break;
        }
        case Pc::OrthoP1R: {
          ortho_after_p1();
          break;
        }
        case Pc::OrthoP2R: {
          ortho_after_p2();
          break;
        }
        case Pc::OrthoP3R: {
          onorm2_ = red_[0];
          pass3_ = true;
          pc_ = oret_;
          break;
        }
        case Pc::StepDone: {
          step_done();
          pc_ = Pc::AfterStep;
          return Request::Step;
        }
        case Pc::AfterStep: {
          decide();
          break;
        }
        case Pc::InjectDone: {
          inject_done();
          break;
        }
        case Pc::CheckNext: {
          check_next();
          if (pc_ == Pc::CheckMatvec) {
            pc_ = Pc::CheckAfterMatvec;
            return Request::Matvec;
          }
          break;
        }
        case Pc::CheckAfterMatvec: {
          ++n_matvecs_;
          const int w = wanted_[check_i_];
          B_->residual(out_ptr_, ritz_slot_for(check_i_), cand_value(w), red_.data());
          gate(Pc::CheckResidual, 1);
          break;
        }
        case Pc::CheckResidual: {
          xres_[check_i_] = std::sqrt(std::max(0.0, red_[0]));
          ++check_i_;
          pc_ = Pc::CheckNext;
          break;
        }
        case Pc::Finish: {
          finish_vectors();
          pc_ = Pc::Done;
          return Request::Done;
        }
        case Pc::Done:
          return Request::Done;
        default:
          throw std::logic_error("pycurv: invalid Lanczos state");
      }
    }
  }

  // MATVEC: the vector to multiply (this process's rows).
  const double* matvec_input() const { return in_ritz_ >= 0 ? B_->ritz(in_ritz_) : B_->slot(in_slot_); }
  void set_matvec_output(const double* w) { out_ptr_ = w; }
  // REDUCE: the buffer to sum over processes, in place.
  double* reduce_buffer() { return red_.data(); }
  int reduce_size() const { return red_n_; }
  void stop() { stop_requested_ = true; }

  // ---- results and progress --------------------------------------------
  Status status() const { return status_; }
  int64_t n_matvecs() const { return n_matvecs_; }
  int n_restarts() const { return n_restarts_; }
  int n_breakdowns() const { return n_breakdowns_; }
  int n_pass3() const { return n_pass3_; }
  int n_verify_rounds() const { return n_verify_; }
  int basis_size() const { return L_ + a_; }
  int n_locked() const { return L_; }
  double anorm() const { return unscale(anorm_); }
  double noise_level() const { return noise_; }
  double asymmetry() const { return unscale(asym_); }
  double max_h2_ratio() const { return h2_ratio_; }
  bool residuals_explicit() const { return explicit_done_; }
  // Wanted Ritz values (wanted end first), their residual norms and bounds,
  // in the units of A (the state works on s A; see "Scale" above).
  std::vector<double> values() const { return unscaled(out_values_); }
  std::vector<double> residuals() const { return unscaled(out_res_); }
  std::vector<double> error_bounds() const { return unscaled(out_bounds_); }
  std::vector<double> current_values() {
    std::vector<double> v;
    for (int w : wanted_) v.push_back(cand_value(w));
    return unscaled(v);
  }
  std::vector<double> current_residuals() {
    std::vector<double> v;
    for (int w : wanted_) v.push_back(cand_rho(w));
    return unscaled(v);
  }
  int n_vectors() const { return static_cast<int>(out_values_.size()); }
  // log2 of the factor s the products are multiplied by (0 until a product is nonzero).
  int scale_exponent() const { return scale_exp_; }
  // The matvec's arithmetic can be learned from its first output.
  void set_unit_roundoff(double u) { o_.unit_roundoff = u; }
  bool vectors_ready() const { return vectors_ready_; }
  // History, one entry per Lanczos step: matvecs so far, best wanted Ritz
  // value, largest relative residual among the wanted.
  const std::vector<double>& hist_matvecs() const { return hist_mv_; }
  std::vector<double> hist_value() const { return unscaled(hist_val_); }
  const std::vector<double>& hist_residual() const { return hist_res_; }

 private:
  enum class Pc {
    Start, StartMeasured, StartDone, Expand, AfterMatvec, ProductMeasured, Gate, OrthoP1R, OrthoP2R,
    OrthoP3R, StepDone, AfterStep, InjectDone, CheckNext, CheckMatvec, CheckAfterMatvec,
    CheckResidual, Finish, Done
  };

  // ---- scale ---------------------------------------------------------------
  double unscale(double x) const { return std::ldexp(x, -scale_exp_); }
  std::vector<double> unscaled(std::vector<double> v) const {
    for (double& x : v) x = unscale(x);
    return v;
  }

  // The first n values of red_ hold this process's partial sums; they must be
  // summed over processes (a REDUCE request) before the state goes on at next.
  void gate(Pc next, int n) {
    pc_ = Pc::Gate;
    gate_next_ = next;
    red_n_ = n;
  }

  // ---- CGS2 orthogonalisation of slot w against slots [0, nv) -------------
  void ortho_begin(int w, int nv, const double* src, Pc ret) {
    ow_ = w;
    onv_ = nv;
    oret_ = ret;
    pass3_ = false;
    fused_ = false;
    if constexpr (has_fused_ortho<Basis>::value) {
      if (!o_.yield_reduce && nv > 0) {
        // Layout: pass 1's nv + 1 sums, pass 2's nv + 1, then pass 3's norm and
        // whether pass 3 ran (decided on the device by the rule of ortho_after_p2).
        fsums_.resize(2 * static_cast<size_t>(nv) + 4);
        B_->ortho_fused(src, w, nv, kPass3, fsums_.data());
        fused_ = true;
        std::copy(fsums_.begin(), fsums_.begin() + nv + 1, red_.begin());
        gate(Pc::OrthoP1R, nv + 1);
        return;
      }
    }
    B_->dots(src, w, nv, red_.data());
    gate(Pc::OrthoP1R, nv + 1);
  }
  void ortho_after_p1() {
    ow2_ = red_[onv_];
    if (!std::isfinite(ow2_)) {
      for (int i = 0; i < onv_; ++i) h_[i] = 0.0;
      if (oret_ == Pc::StepDone)
        throw NonFiniteError("matvec returned non-finite values", n_matvecs_);
      throw std::runtime_error("non-finite value in the Krylov basis");
    }
    std::copy(red_.begin(), red_.begin() + onv_, h_.begin());
    if (onv_ == 0) {
      h2norm_ = 0.0;
      onorm2_ = ow2_;
      pc_ = oret_;
      return;
    }
    if (fused_) {
      std::copy(fsums_.begin() + onv_ + 1, fsums_.begin() + 2 * onv_ + 2, red_.begin());
    } else {
      B_->update_dots(ow_, onv_, h_.data(), red_.data());
    }
    gate(Pc::OrthoP2R, onv_ + 1);
  }
  void ortho_after_p2() {
    h2_.assign(red_.begin(), red_.begin() + onv_);
    const double w1 = std::max(0.0, red_[onv_]);
    double hh = 0.0;
    for (double x : h2_) hh += x * x;
    h2norm_ = std::sqrt(hh);
    const double w1n = std::sqrt(w1);
    // The second projection h2 measures how far pass 2 left w from orthogonal.
    // Below ~64 eps of |w| it is rounding noise and a third pass changes nothing.
    // Fused, the device has taken this decision already (same rule); follow it.
    if (fused_ ? fsums_[2 * onv_ + 3] > 0.0 : h2norm_ > kPass3 * w1n) {
      ++n_pass3_;
      if (fused_) {
        red_[0] = fsums_[2 * onv_ + 2];
      } else {
        B_->update_norm(ow_, onv_, h2_.data(), red_.data());
      }
      gate(Pc::OrthoP3R, 1);
      return;
    }
    if (w1n > 0.0) h2_ratio_ = std::max(h2_ratio_, h2norm_ / w1n);
    onorm2_ = w1;
    pc_ = oret_;
  }

  // ---- after the three passes of a Lanczos step ---------------------------
  void step_done() {
    const int a = a_;
    const int nv = onv_;  // = L_ + a_ + 1: locked, active, and the multiplied vector
    // Column a of the projected matrix. Couplings to active vectors are the
    // theoretical ones (|f| b from the previous step or restart); the computed
    // h serve for orthogonalisation and for the asymmetry/noise diagnostic.
    const double alpha = h_[nv - 1] + (nv - 1 < static_cast<int>(h2_.size()) ? h2_[nv - 1] : 0.0);
    for (int c = 0; c < a; ++c) {
      const double comp = h_[L_ + c] + (pass2_value(L_ + c));
      asym_ = std::max(asym_, std::fabs(comp - coup_[c]));
      E(c, a) = comp - coup_[c];
      e_sum2_ += E(c, a) * E(c, a);
      ++e_count_;
      T(c, a) = coup_[c];
      T(a, c) = coup_[c];
    }
    for (int l = 0; l < L_; ++l) Cl(l, a) = h_[l] + pass2_value(l);
    T(a, a) = alpha;
    drift_[a] = 0.0;
    a_ = a + 1;
    const double wnorm = std::sqrt(ow2_);
    beta_ = std::sqrt(std::max(0.0, onorm2_));
    const int j = L_ + a_;
    std::fill(b_.begin(), b_.begin() + a_, 0.0);
    const bool breakdown =
        beta_ <= kBreakdown * std::sqrt(static_cast<double>(j)) * wnorm || j >= o_.n_global;
    if (breakdown) {
      drift_[a_ - 1] += beta_;
      beta_ = 0.0;
      pending_ = false;
      chain_exhausted_ = true;
      ++n_breakdowns_;
    } else {
      B_->scale(j, 1.0 / beta_);
      b_[a_ - 1] = 1.0;
      pending_ = true;
      std::fill(coup_.begin(), coup_.end(), 0.0);
      coup_[a_ - 1] = beta_;
    }
    rayleigh_ritz();
    record_history();
  }
  double pass2_value(int i) const { return i < static_cast<int>(h2_.size()) ? h2_[i] : 0.0; }

  double& T(int r, int c) { return T_[static_cast<size_t>(r) * o_.ncv + c]; }
  double& Cl(int l, int c) { return Cl_[static_cast<size_t>(l) * o_.ncv + c]; }
  double& S(int r, int c) { return S_[static_cast<size_t>(r) * o_.ncv + c]; }
  double& E(int r, int c) { return E_[static_cast<size_t>(r) * o_.ncv + c]; }
  // E leaves the relation at a restart or a lock: its Frobenius norm stays a bound.
  void carry_defect() {
    for (double e : E_) carried2_ += e * e;
    std::fill(E_.begin(), E_.end(), 0.0);
  }

  // Eigen-decomposition of the active block and residual bounds of its Ritz pairs.
  void rayleigh_ritz() {
    const int a = a_;
    std::vector<double> z(static_cast<size_t>(a) * a);
    if (!symeig(a, T_.data(), o_.ncv, theta_.data(), z.data(), work_.data()))
      throw std::runtime_error("pycurv: tridiagonal eigensolver did not converge");
    for (int r = 0; r < a; ++r)
      for (int c = 0; c < a; ++c) S(r, c) = z[static_cast<size_t>(r) * a + c];
    parallel_ = L_ == 0;
    for (int i = 0; i < a; ++i) {
      double bs = 0.0, ds = 0.0;
      for (int c = 0; c < a; ++c) {
        bs += b_[c] * S(c, i);
        ds += drift_[c] * std::fabs(S(c, i));
      }
      double cl2 = 0.0;
      for (int l = 0; l < L_; ++l) {
        double x = 0.0;
        for (int c = 0; c < a; ++c) x += Cl(l, c) * S(c, i);
        cl2 += x * x;
      }
      const double r = beta_ * std::fabs(bs) + ds;
      rho_[i] = std::sqrt(r * r + cl2);
      rb_[i] = beta_ * std::fabs(bs);
      if (ds != 0.0 || cl2 != 0.0) parallel_ = false;
      anorm_ = std::max(anorm_, std::fabs(theta_[i]));
    }
    for (int l = 0; l < L_; ++l) anorm_ = std::max(anorm_, std::fabs(lock_theta_[l]));
    select_wanted();
  }

  // Candidates are encoded as c < L_: locked vector c; c >= L_: active Ritz pair c - L_.
  double cand_value(int c) const { return c < L_ ? lock_theta_[c] : theta_[c - L_]; }
  double cand_rho(int c) const { return c < L_ ? lock_rho_[c] : rho_[c - L_]; }
  double scale_of(double v) const { return std::max(std::fabs(v), anorm_); }
  // The estimated eigenvalue error of candidate c with residual norm r:
  // min(r, r^2/gap), gap standing in for the distance to the rest of the
  // spectrum (Kato-Temple): the distance to each other Ritz value less that
  // value's own residual, the nearest. An unconverged neighbour (a continuum
  // edge, a cluster still being resolved) shrinks it to nothing and r stands;
  // an eigenvalue the Krylov space has not seen at all can still make it
  // optimistic. For the extreme Ritz value of the basis, Lehmann's bound under
  // the same assumption (see lehmann_error). Reported as the result's error bounds.
  double error_estimate(int c, double r) const {
    const double v = cand_value(c);
    double gap = INFINITY;
    bool top = true, bottom = true;
    for (int d = 0; d < L_ + a_; ++d) {
      if (d == c) continue;
      gap = std::min(gap, std::fabs(cand_value(d) - v) - cand_rho(d));
      if (cand_value(d) >= v) top = false;
      if (cand_value(d) <= v) bottom = false;
    }
    if (!(std::isfinite(gap) && gap > 0)) return r;
    if (parallel_ && c >= L_ && (top || bottom)) return std::min(r, lehmann_error(c - L_, r, gap, top ? 1.0 : -1.0));
    return r < gap ? r * (r / gap) : r;
  }
  // Lehmann's bound (Lehmann 1963; Beattie & Goerisch's form for Krylov
  // spaces) for the extreme Ritz value theta_i of the active basis, assuming
  // what the gap above assumes: no eigenvalue but the one theta_i approximates
  // lies beyond rho = theta_i - s gap (s = +1 at the top, -1 at the bottom).
  // Then 1/(lambda - rho) is the only positive eigenvalue of (A - rho)^-1, and
  // Rayleigh-Ritz on the space (A - rho) V bounds it from below: with
  // d_j = s (theta_j - rho) and the residuals A y_j - theta_j y_j = b_j f of a
  // Lanczos basis (all along its next vector f), |lambda - theta_i| <= t, the
  // root in (0, b_i^2 / d_i] of
  //   b_i^2 / (d_i t) + sum_{j != i} b_j^2 / (d_j (d_i + t - d_j)) = 1.
  // The single term is Kato-Temple's r^2/gap; the others (each d_j < 0) only
  // shrink it: what the basis has learnt about the rest of the spectrum. On the
  // BatchNorm convnet of bench/test_bench_peers.py it is about half of r^2/gap
  // (6-7 times the true error, where r^2/gap is 14 times it).
  double lehmann_error(int i, double r, double gap, double s) const {
    const double di = gap, bi2 = r * r;
    const double rho = theta_[i] - s * gap;
    if (bi2 == 0.0) return 0.0;
    auto g = [&](double t) {
      double sum = bi2 / (di * t);
      for (int j = 0; j < a_; ++j) {
        if (j == i || rb_[j] == 0.0) continue;
        const double dj = s * (theta_[j] - rho);  // <= -rho_[j] < 0
        sum += rb_[j] * rb_[j] / (dj * (di + t - dj));
      }
      return sum - 1.0;
    };
    double lo = 0.0, hi = bi2 / di;  // g(0+) = +inf, g(hi) <= 0
    for (int it = 0; it < 200 && hi - lo > 1e-3 * hi; ++it) {
      const double mid = 0.5 * (lo + hi);
      (g(mid) > 0.0 ? lo : hi) = mid;
    }
    return hi;
  }
  // What tol bounds: the residual norm r, or with tol_on_eigenvalue the error estimate.
  double tested_error(int c, double r) const { return o_.tol_on_eigenvalue ? error_estimate(c, r) : r; }
  bool cand_converged(int c) const {
    return tested_error(c, cand_rho(c)) <= est_safety_ * tol_est_ * scale_of(cand_value(c));
  }

  // Orders candidates best first for `which` (for BE: alternately from the top
  // and the bottom) and picks the wanted ones (wanted end first).
  std::vector<int> priority(bool active_only) const {
    std::vector<int> idx;
    const int total = L_ + a_;
    for (int c = active_only ? L_ : 0; c < total; ++c) idx.push_back(c);
    std::stable_sort(idx.begin(), idx.end(), [this](int x, int y) { return cand_value(x) < cand_value(y); });
    if (o_.which == Which::LA) {
      std::reverse(idx.begin(), idx.end());
      return idx;
    }
    if (o_.which == Which::SA) return idx;
    std::vector<int> out;
    int lo = 0, hi = static_cast<int>(idx.size()) - 1;
    bool top = true;
    while (lo <= hi) {
      out.push_back(top ? idx[hi--] : idx[lo++]);
      top = !top;
    }
    return out;
  }
  void select_wanted() {
    std::vector<int> pr = priority(false);
    const int nw = std::min<int>(o_.k, static_cast<int>(pr.size()));
    wanted_.assign(pr.begin(), pr.begin() + nw);
    // Output order: descending for LA and BE, ascending for SA.
    std::stable_sort(wanted_.begin(), wanted_.end(), [this](int x, int y) {
      return o_.which == Which::SA ? cand_value(x) < cand_value(y) : cand_value(x) > cand_value(y);
    });
  }
  bool all_wanted_converged() const {
    if (static_cast<int>(wanted_.size()) < o_.k) return false;
    for (int w : wanted_)
      if (!cand_converged(w)) return false;
    return true;
  }
  double worst_relative_residual() const {
    double r = 0.0;
    for (int w : wanted_) {
      const double s = scale_of(cand_value(w));
      r = std::max(r, s > 0 ? cand_rho(w) / s : (cand_rho(w) > 0 ? INFINITY : 0.0));
    }
    return r;
  }

  void record_history() {
    hist_mv_.push_back(static_cast<double>(n_matvecs_));
    hist_val_.push_back(wanted_.empty() ? NAN : cand_value(wanted_.front()));
    hist_res_.push_back(worst_relative_residual());
  }

  // ---- the decision after each step ---------------------------------------
  void decide() {
    const int j = L_ + a_;
    if (stop_requested_) return finish(Status::Stopped);
    const bool whole = j >= o_.n_global;
    const bool early = n_matvecs_ < o_.min_matvecs && !(chain_exhausted_ && !chain_user_);
    const bool conv = !early && all_wanted_converged();
    if (whole) return finish_check();

    if (phase_ == Phase::Verify) {
      bool contributes = false;
      for (int w : wanted_)
        if (w >= L_ && beats_locked(w)) contributes = true;
      const bool ext_conv = extremes_converged();
      if (conv && !contributes && ext_conv) return finish_check();
      if (conv && contributes) return start_verify();
    } else if (conv) {
      if ((chain_exhausted_ && chain_user_) || need_verify_) return start_verify();
      return finish_check();
    }
    if (n_matvecs_ >= o_.max_matvecs) return finish(Status::MaxMatvecs);
    if (noise_stagnation()) return finish_check();
    continue_search();
  }

  void continue_search() {
    const int j = L_ + a_;
    if (chain_exhausted_) {
      if (j >= o_.ncv) restart();
      return inject();
    }
    if (j >= o_.ncv) restart();
    pc_ = Pc::Expand;
  }

  // In the verification phase an active value beats the locked ones if it is
  // better than the worst locked wanted value by more than the tolerance.
  bool beats_locked(int w) const {
    const double v = cand_value(w);
    const double tie = tol_est_ * scale_of(v);
    bool beats = false;
    if (o_.which != Which::SA) {
      double worst = INFINITY;
      for (int l = 0; l < L_; ++l)
        if (o_.which == Which::LA || lock_theta_[l] >= lock_mid_) worst = std::min(worst, lock_theta_[l]);
      if (std::isfinite(worst) && v > worst + tie) beats = true;
    }
    if (o_.which != Which::LA) {
      double worst = -INFINITY;
      for (int l = 0; l < L_; ++l)
        if (o_.which == Which::SA || lock_theta_[l] < lock_mid_) worst = std::max(worst, lock_theta_[l]);
      if (std::isfinite(worst) && v < worst - tie) beats = true;
    }
    return beats;
  }
  // The verification chain's extreme Ritz pair (both for BE) is known well
  // enough to decide whether it belongs to the wanted set: its residual is
  // within tol, or within a tenth of its distance to the worst locked value. A
  // random-start Ritz pair with such a residual is resolved locally, so an
  // eigenvalue beyond the wanted boundary would already have pulled it up.
  bool extremes_converged() const {
    if (a_ == 0) return false;
    auto settled = [this](int c, double boundary) {
      const double v = cand_value(c);
      const double slack = std::isfinite(boundary) ? 0.1 * std::fabs(boundary - v) : 0.0;
      return cand_rho(c) <= std::max(est_safety_ * tol_est_ * scale_of(v), slack);
    };
    bool ok = true;
    if (o_.which != Which::SA) {  // top of the chain against the lowest locked high value
      double worst = INFINITY;
      for (int l = 0; l < L_; ++l)
        if (o_.which == Which::LA || lock_theta_[l] >= lock_mid_) worst = std::min(worst, lock_theta_[l]);
      ok = ok && settled(L_ + a_ - 1, cand_value(L_ + a_ - 1) < worst ? worst : NAN);
    }
    if (o_.which != Which::LA) {  // bottom of the chain against the highest locked low value
      double worst = -INFINITY;
      for (int l = 0; l < L_; ++l)
        if (o_.which == Which::SA || lock_theta_[l] < lock_mid_) worst = std::max(worst, lock_theta_[l]);
      ok = ok && settled(L_, cand_value(L_) > worst ? worst : NAN);
    }
    return ok;
  }

  // Heuristic stop for a matvec whose own error floors the residuals: with a
  // known low-precision matvec, no halving of the residual for a long stretch
  // once it is near the roundoff level triggers the explicit check.
  bool noise_stagnation() {
    const double r = worst_relative_residual();
    if (r < best_res_ * 0.5) {
      best_res_ = r;
      best_res_at_ = n_matvecs_;
      return false;
    }
    const double floor = 100.0 * o_.unit_roundoff * std::sqrt(static_cast<double>(o_.n_global));
    const int64_t window = std::max<int64_t>(30, 2 * o_.ncv);
    if (best_res_ <= floor && n_matvecs_ - best_res_at_ >= window) {
      stagnated_ = true;
      return true;
    }
    return false;
  }

  // ---- thick restart -----------------------------------------------------
  // Number of active Ritz vectors kept at a restart. The next cycle runs
  // acap - p steps on the spectrum below the kept ones; a Chebyshev argument
  // makes the wanted residual shrink like exp(-2 (acap - p) sqrt(gamma_p)),
  // gamma_p = (theta_target - theta_{p+1}) / (theta_{p+1} - theta_far). Keep the
  // p that maximises (acap - p) sqrt(gamma_p) (the adaptive thick restart of
  // Yamazaki, Bai, Simon, Wang & Wu, ACM TOMS 37, 2010). BE uses half the basis.
  // Number of active Ritz vectors kept at a restart: the wanted ones and half
  // of the rest of the basis (what ARPACK's exact-shift implicit restart keeps
  // for k = 1). Measured against adaptive choices (maximising the Chebyshev
  // rate of the next cycle, keeping far-end Ritz vectors as well), none used
  // fewer matvecs on the benchmark spectra; see bench/RESULTS.md.
  int keep_count() const {
    const int acap = o_.ncv - L_;
    int kw = 0;
    for (int w : wanted_)
      if (w >= L_) ++kw;
    if (phase_ == Phase::Verify) kw += (o_.which == Which::BE ? 2 : 1);
    kw = std::max(kw, 1);
    const int pmax = std::max(1, std::min(acap - 2, a_ - 1));
    return std::max(1, std::min(kw + (acap - kw) / 2, pmax));
  }

  void restart() {
    const int a = a_;
    const int p = std::min(keep_count(), a);
    const std::vector<int> pr = priority(true);
    const std::vector<int> keep(pr.begin(), pr.begin() + p);  // candidate indices (>= L_)
    const int j = L_ + a;
    const int nnew = L_ + p + (pending_ ? 1 : 0);
    const int nold = j + (pending_ ? 1 : 0);
    std::vector<double> C(static_cast<size_t>(nold) * nnew, 0.0);
    for (int l = 0; l < L_; ++l) C[static_cast<size_t>(l) * nold + l] = 1.0;
    for (int c = 0; c < p; ++c) {
      const int i = keep[c] - L_;
      for (int r = 0; r < a; ++r) C[static_cast<size_t>(L_ + c) * nold + L_ + r] = S(r, i);
    }
    if (pending_) C[static_cast<size_t>(L_ + p) * nold + j] = 1.0;
    B_->combine(nold, C.data(), nnew);

    std::vector<double> nb(p), nd(p), ncl(static_cast<size_t>(L_) * p), nth(p);
    for (int c = 0; c < p; ++c) {
      const int i = keep[c] - L_;
      double bs = 0.0, ds = 0.0;
      for (int r = 0; r < a; ++r) {
        bs += b_[r] * S(r, i);
        ds += drift_[r] * std::fabs(S(r, i));
      }
      nb[c] = bs;
      nd[c] = ds;
      nth[c] = theta_[i];
      for (int l = 0; l < L_; ++l) {
        double x = 0.0;
        for (int r = 0; r < a; ++r) x += Cl(l, r) * S(r, i);
        ncl[static_cast<size_t>(l) * p + c] = x;
      }
    }
    std::fill(T_.begin(), T_.end(), 0.0);
    carry_defect();
    for (int c = 0; c < p; ++c) {
      T(c, c) = nth[c];
      b_[c] = nb[c];
      drift_[c] = nd[c];
      for (int l = 0; l < L_; ++l) Cl(l, c) = ncl[static_cast<size_t>(l) * p + c];
    }
    a_ = p;
    for (int c = 0; c < p; ++c) coup_[c] = beta_ * b_[c];
    ++n_restarts_;
    rayleigh_ritz();
  }

  // ---- verification of multiplicities --------------------------------------
  // Locks the wanted Ritz pairs, drops the rest of the basis, and starts a
  // random chain orthogonal to the locked vectors.
  void start_verify() {
    const int k = static_cast<int>(wanted_.size());
    if (k >= o_.n_global) return finish_check();
    carry_defect();
    const int j = L_ + a_;
    std::vector<double> C(static_cast<size_t>(j) * k, 0.0);
    std::vector<double> th(k), rh(k);
    for (int c = 0; c < k; ++c) {
      const int w = wanted_[c];
      if (w < L_) {
        C[static_cast<size_t>(c) * j + w] = 1.0;
      } else {
        for (int r = 0; r < a_; ++r) C[static_cast<size_t>(c) * j + L_ + r] = S(r, w - L_);
      }
      th[c] = cand_value(w);
      rh[c] = cand_rho(w);
    }
    B_->combine(j, C.data(), k);
    lock_theta_ = th;
    lock_rho_ = rh;
    // Split point between the high and low wanted values, for BE.
    std::vector<double> sorted = th;
    std::sort(sorted.begin(), sorted.end());
    const int k_lo = o_.k / 2;
    lock_mid_ = k_lo < k ? sorted[k_lo] : INFINITY;
    L_ = k;
    a_ = 0;
    beta_ = 0.0;
    pending_ = false;
    std::fill(T_.begin(), T_.end(), 0.0);
    std::fill(Cl_.begin(), Cl_.end(), 0.0);
    phase_ = Phase::Verify;
    ++n_verify_;
    select_wanted();
    inject();
  }

  // Continues from a random vector orthogonal to the basis.
  void inject() {
    const int s = L_ + a_;
    if (s >= o_.n_global) return finish_check();
    B_->random_normal(s, rng_key(o_.seed, stream_++), o_.offset);
    ortho_begin(s, s, nullptr, Pc::InjectDone);
  }
  void inject_done() {
    const double nrm = std::sqrt(std::max(0.0, onorm2_));
    if (!(nrm > 1e-10 * std::sqrt(ow2_))) return finish_check();  // basis spans everything
    B_->scale(L_ + a_, 1.0 / nrm);
    pending_ = true;
    beta_ = 0.0;
    std::fill(coup_.begin(), coup_.end(), 0.0);
    chain_user_ = false;
    chain_exhausted_ = false;
    pc_ = Pc::Expand;
  }

  // ---- convergence confirmed on A itself, then results -------------------
  void finish_check() {
    if (!o_.explicit_residuals) {
      if (stagnated_) noise_ = std::max(noise_, worst_relative_residual());
      return finish(stagnated_ ? Status::NoiseFloor : Status::Converged);
    }
    if (bounded_by_coefficients()) return;
    check_i_ = 0;
    xres_.assign(wanted_.size(), 0.0);
    pc_ = Pc::CheckNext;
  }
  // The residual of the products already made, without another one. Every
  // product is expanded exactly (in float64) in the basis: A V = V (T + E) + f b^T,
  // E holding the Gram-Schmidt coefficients that the tridiagonal (or, after a
  // restart, arrowhead) T leaves out: a low-precision or not quite symmetric
  // product's error. For a Ritz pair (theta, V s) the residual is then
  // sqrt(r^2 + ||E s||^2), r the recurrence's (f is orthogonal to V); the part
  // of E that a thick restart drops from the basis (V -> V S) is carried as
  // its Frobenius norm, a bound added on. Where that passes the test, the
  // product an explicit check would cost is saved; it is still made where it
  // does not, with locked vectors, at a noise floor and for a tolerance below
  // what the recurrence certifies. (Without a third Gram-Schmidt pass the
  // second projection stays in f: below 64 eps of it, float64 rounding.)
  // The bound is for the products made; a fresh product of y carries an
  // error of its own, of about sqrt(n) times the typical entry of E (each is
  // a product's error along one basis direction). Where that estimate is
  // above a tenth of the tolerance, the check is made with A y computed, and
  // the noise floor is found as before.
  bool bounded_by_coefficients() {
    if (L_ != 0 || stagnated_ || o_.tol < tol_est_) return false;
    const double fresh = e_count_ > 0 ? std::sqrt(static_cast<double>(o_.n_global) * e_sum2_ / e_count_) : 0.0;
    const double carried = std::sqrt(carried2_);
    std::vector<double> r(wanted_.size());
    for (size_t i = 0; i < wanted_.size(); ++i) {
      const int w = wanted_[i], col = w - L_;
      double es2 = 0.0;
      for (int row = 0; row < a_; ++row) {
        double x = 0.0;
        for (int c = 0; c < a_; ++c) x += E(row, c) * S(c, col);
        es2 += x * x;
      }
      r[i] = std::sqrt(cand_rho(w) * cand_rho(w) + es2) + carried;
      const double thr = o_.tol * scale_of(cand_value(w));
      if (!(fresh <= 0.1 * thr && tested_error(w, r[i]) <= thr)) return false;
    }
    xres_ = r;
    finish(Status::Converged, true);
    explicit_done_ = false;
    return true;
  }
  int ritz_slot_for(int i) const { return o_.want_vectors ? i : 0; }
  void assemble(int i) {
    const int w = wanted_[i];
    const int j = L_ + a_;
    std::vector<double> s(j, 0.0);
    if (w < L_) {
      s[w] = 1.0;
    } else {
      for (int r = 0; r < a_; ++r) s[L_ + r] = S(r, w - L_);
    }
    B_->ritz_vector(j, s.data(), ritz_slot_for(i));
  }
  void check_next() {
    if (check_i_ < static_cast<int>(wanted_.size())) {
      assemble(check_i_);
      in_ritz_ = ritz_slot_for(check_i_);
      pc_ = Pc::CheckMatvec;
      return;
    }
    explicit_done_ = true;
    bool ok = true;
    double ratio = 0.0, worst = 0.0;
    for (size_t i = 0; i < wanted_.size(); ++i) {
      const int w = wanted_[i];
      const double thr = o_.tol * scale_of(cand_value(w));
      if (tested_error(w, xres_[i]) > thr) ok = false;
      ratio = std::max(ratio, xres_[i] / std::max(cand_rho(w), std::numeric_limits<double>::min()));
      worst = std::max(worst, xres_[i] / std::max(scale_of(cand_value(w)), std::numeric_limits<double>::min()));
    }
    const bool vectors_now = o_.want_vectors;
    if (ok) {
      vectors_ready_ = vectors_now;
      return finish(Status::Converged, true);
    }
    // The computed residual disagrees with the recurrence's estimate: the
    // matvec is not the fixed symmetric operator the estimate assumes to this
    // accuracy (low-precision or non-deterministic arithmetic). Iterating
    // cannot go below that floor.
    const bool more = ratio <= 10.0 && !stagnated_ && n_matvecs_ < o_.max_matvecs;
    if (o_.tol < tol_est_) {
      // A tolerance below what the recurrence certifies: iterate while the
      // computed residual follows the estimate down; once the estimate falls
      // below it (ratio > 10), rounding in float64 is the floor.
      noise_ = worst;
      if (more && n_checks_failed_ < 6) {
        ++n_checks_failed_;
        est_safety_ *= 0.01 / std::max(ratio, 1.0);
        explicit_done_ = false;
        select_wanted();
        return continue_search();
      }
    }
    noise_ = std::max(noise_, worst);
    if (!more || n_checks_failed_ >= 2) {
      vectors_ready_ = vectors_now;
      return finish(n_matvecs_ >= o_.max_matvecs && ratio <= 10.0 && !stagnated_ ? Status::MaxMatvecs
                                                                              : Status::NoiseFloor,
                    true);
    }
    ++n_checks_failed_;
    est_safety_ *= 0.5 / std::max(ratio, 1.0);
    explicit_done_ = false;
    select_wanted();
    continue_search();
  }

  void finish(Status st, bool explicit_values = false) {
    status_ = st;
    out_values_.clear();
    out_res_.clear();
    out_bounds_.clear();
    for (size_t i = 0; i < wanted_.size(); ++i) {
      out_values_.push_back(cand_value(wanted_[i]));
      out_res_.push_back(explicit_values ? xres_[i] : cand_rho(wanted_[i]));
      out_bounds_.push_back(error_estimate(wanted_[i], out_res_.back()));
    }
    explicit_done_ = explicit_values;
    pc_ = Pc::Finish;
  }
  void finish_vectors() {
    if (!o_.want_vectors || vectors_ready_) return;
    for (size_t i = 0; i < wanted_.size(); ++i) assemble(static_cast<int>(i));
    vectors_ready_ = true;
  }

  // Thresholds. kPass3: a third Gram-Schmidt pass when the second projection
  // exceeds 64 eps of the vector. kBreakdown: |f| below this many eps of |A q|
  // (times sqrt(j)) is rounding noise, i.e. an invariant subspace.
  static constexpr double kPass3 = 64.0 * 0x1p-52;
  static constexpr double kBreakdown = 16.0 * 0x1p-52;

  enum class Phase { Main, Verify };

  Options o_;
  Basis* B_;
  double tol_est_ = 0.0;  // tolerance for the recurrence's residual estimates: max(tol, certifiable_tol)
  bool scaled_ = false;   // the products' scale is known (a product was nonzero)
  int scale_exp_ = 0;     // products are read multiplied by 2^scale_exp_
  Pc pc_ = Pc::Start;
  Phase phase_ = Phase::Main;
  Status status_ = Status::Running;

  int L_ = 0;  // locked vectors, slots [0, L_)
  int a_ = 0;  // active vectors, slots [L_, L_ + a_); pending vector at slot L_ + a_
  bool pending_ = false;
  double beta_ = 0.0;
  std::vector<double> T_, b_, drift_, coup_, Cl_;
  std::vector<double> theta_, S_, rho_, rb_, work_;
  bool parallel_ = true;  // every active residual is along the next Lanczos vector (no locked vectors, no drift)
  std::vector<double> lock_theta_, lock_rho_;
  double lock_mid_ = INFINITY;
  std::vector<int> wanted_;

  // orthogonalisation sub-state
  int ow_ = 0, onv_ = 0;
  Pc oret_ = Pc::Start;
  double ow2_ = 0.0, onorm2_ = 0.0, h2norm_ = 0.0;
  bool pass3_ = false;
  bool fused_ = false;        // this orthogonalisation's sums came from ortho_fused, in fsums_
  std::vector<double> fsums_;
  Pc gate_next_ = Pc::Start;
  std::vector<double> h_, h2_, red_;
  int red_n_ = 0;

  // matvec hand-over
  int in_slot_ = 0, in_ritz_ = -1;
  const double* out_ptr_ = nullptr;

  // bookkeeping
  uint64_t stream_ = 0;
  bool chain_user_ = false, chain_exhausted_ = false, need_verify_ = false;
  bool stop_requested_ = false;
  int64_t n_matvecs_ = 0;
  int n_restarts_ = 0, n_breakdowns_ = 0, n_pass3_ = 0, n_verify_ = 0;
  double anorm_ = 0.0, asym_ = 0.0, h2_ratio_ = 0.0, noise_ = 0.0;
  std::vector<double> E_;  // the products' Gram-Schmidt coefficients outside T (bounded_by_coefficients)
  double carried2_ = 0.0;  // ||E||_F^2 dropped from the basis by restarts and locks
  double e_sum2_ = 0.0;    // every entry of E recorded, squared and summed, and their number
  int64_t e_count_ = 0;
  double est_safety_ = 1.0;
  double best_res_ = INFINITY;
  int64_t best_res_at_ = 0;
  bool stagnated_ = false, explicit_done_ = false, vectors_ready_ = false;
  int n_checks_failed_ = 0;
  int check_i_ = 0;
  std::vector<double> xres_;

  std::vector<double> out_values_, out_res_, out_bounds_;
  std::vector<double> hist_mv_, hist_val_, hist_res_;
};

}  // namespace pycurv
