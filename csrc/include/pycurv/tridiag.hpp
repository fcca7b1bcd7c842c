// A fixed number of Lanczos steps from a given start vector, returning the
// tridiagonal matrix: the kernel of stochastic Lanczos quadrature (SLQ).
// Templated on the basis backend; no Python here. Driven by reverse
// communication like Lanczos<Basis> (lanczos.hpp), one process only:
//   MATVEC  w = A q for q = matvec_input(); hand w back with set_matvec_output().
//   DONE    alphas() and betas() are ready.
//
// Unlike Lanczos<Basis> there is no restart, no convergence test and no
// injection after a breakdown: the Gauss quadrature of the start vector's
// spectral measure is defined by the Krylov space of that one vector, so the
// recurrence stops where the space is exhausted (|f| ~ 0, or m = n), and
// returns fewer steps than asked. Every step orthogonalises A q against the
// whole basis by classical Gram-Schmidt twice (a third pass where the second
// projection says it is needed), in float64, with the same fused kernels and
// the same power-of-two scaling of the products as lanczos.hpp (see "Scale"
// there): the state runs on s A and reports the coefficients divided by s.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "pycurv/lanczos.hpp"

namespace pycurv {

template <class Basis>
class Tridiag {
 public:
  // basis: at least steps + 1 slots of n rows; slot 0 holds the start vector
  // (any nonzero finite scale) before the first advance().
  Tridiag(int64_t n, int steps, Basis* basis) : n_(n), m_(steps), B_(basis) {
    if (n < 1) throw std::invalid_argument("n must be >= 1");
    if (steps < 1) throw std::invalid_argument("steps must be >= 1");
    if (basis->slots() < steps + 1) throw std::invalid_argument("the basis needs steps + 1 slots");
    red_.assign(static_cast<size_t>(steps) + 2, 0.0);
    h_.assign(static_cast<size_t>(steps) + 2, 0.0);
  }

  Request advance() {
    for (;;) {
      switch (pc_) {
        case Pc::Start: {
          B_->magnitude(nullptr, 0, red_.data());
          int e = 0;
          const int k = magnitude_exponent(red_[0], red_[1], &e);
          if (k < 0) throw std::invalid_argument("the start vector is not finite");
          if (k == 0) throw std::invalid_argument("the start vector is zero");
          B_->scale(0, std::ldexp(1.0, scale_exponent(e)));
          B_->dots(nullptr, 0, 0, red_.data());
          const double nrm = std::sqrt(red_[0]);
          if (!(nrm > 0.0) || !std::isfinite(nrm)) throw std::invalid_argument("the start vector is zero or not finite");
          B_->scale(0, 1.0 / nrm);
          pc_ = Pc::AfterMatvec;
          return Request::Matvec;
        }
        case Pc::AfterMatvec: {
          ++n_matvecs_;
          const int j = static_cast<int>(alpha_.size());  // the product was A q_j
          if (!scaled_) {
            B_->magnitude(out_, 0, red_.data());
            int e = 0;
            const int k = magnitude_exponent(red_[0], red_[1], &e);
            if (k < 0) throw NonFiniteError("matvec returned non-finite values", n_matvecs_);
            if (k > 0) {
              scale_exp_ = scale_exponent(e);
              scaled_ = true;
              B_->set_source_scale(std::ldexp(1.0, scale_exp_));
            }
          }
          orthogonalise(j + 1);
          const double alpha = h_[j];
          if (!std::isfinite(alpha) || !std::isfinite(wnorm_))
            throw NonFiniteError("matvec returned non-finite values", n_matvecs_);
          alpha_.push_back(alpha);
          const int done = j + 1;
          // |f| below a few eps of |A q| (times sqrt(j)) is rounding noise: the
          // Krylov space of the start vector is invariant.
          const bool breakdown = beta_ <= kBreakdown * std::sqrt(static_cast<double>(done)) * wnorm_ ||
                                 static_cast<int64_t>(done) >= n_;
          if (breakdown) {
            exhausted_ = true;
            return finish();
          }
          if (done >= m_) return finish();
          beta_out_.push_back(beta_);
          B_->scale(done, 1.0 / beta_);
          in_ = done;
          pc_ = Pc::AfterMatvec;
          return Request::Matvec;
        }
        case Pc::Done:
          return Request::Done;
      }
    }
  }

  const double* matvec_input() const { return B_->slot(in_); }
  void set_matvec_output(const double* w) { out_ = w; }

  int64_t n_matvecs() const { return n_matvecs_; }
  int steps_done() const { return static_cast<int>(alpha_.size()); }
  // Whether the recurrence stopped because the Krylov space was exhausted (|f| ~ 0 or m = n).
  bool exhausted() const { return exhausted_; }
  int n_pass3() const { return n_pass3_; }
  // Diagonal (steps_done) and off-diagonal (steps_done - 1) of T, in the units of A.
  std::vector<double> alphas() const { return unscaled(alpha_); }
  std::vector<double> betas() const { return unscaled(beta_out_); }
  // |f| after the last step (0 after a breakdown): the size of what the quadrature leaves out.
  double last_beta() const { return exhausted_ ? 0.0 : std::ldexp(beta_, -scale_exp_); }

 private:
  enum class Pc { Start, AfterMatvec, Done };

  std::vector<double> unscaled(std::vector<double> v) const {
    for (double& x : v) x = std::ldexp(x, -scale_exp_);
    return v;
  }

  // Loads the product into slot nv and orthogonalises it against slots [0, nv)
  // by CGS2 (third pass if needed). h_ = total projection, beta_ = |f|, wnorm_ = |A q|.
  void orthogonalise(int nv) {
    B_->dots(out_, nv, nv, red_.data());
    wnorm_ = std::sqrt(std::max(0.0, red_[nv]));
    std::copy(red_.begin(), red_.begin() + nv, h_.begin());
    B_->update_dots(nv, nv, h_.data(), red_.data());
    double hh = 0.0;
    for (int i = 0; i < nv; ++i) {
      h_[i] += red_[i];
      hh += red_[i] * red_[i];
    }
    double w2 = std::max(0.0, red_[nv]);
    if (std::sqrt(hh) > kPass3 * std::sqrt(w2)) {
      ++n_pass3_;
      std::vector<double> h2(red_.begin(), red_.begin() + nv);
      B_->update_norm(nv, nv, h2.data(), red_.data());
      w2 = std::max(0.0, red_[0]);
    }
    beta_ = std::sqrt(w2);
  }

  Request finish() {
    pc_ = Pc::Done;
    return Request::Done;
  }

  static constexpr double kPass3 = 64.0 * 0x1p-52;
  static constexpr double kBreakdown = 16.0 * 0x1p-52;

  int64_t n_;
  int m_;
  Basis* B_;
  Pc pc_ = Pc::Start;
  bool scaled_ = false;
  int scale_exp_ = 0;
  int in_ = 0;
  const double* out_ = nullptr;
  std::vector<double> red_, h_;
  std::vector<double> alpha_, beta_out_;
  double beta_ = 0.0, wnorm_ = 0.0;
  bool exhausted_ = false;
  int64_t n_matvecs_ = 0;
  int n_pass3_ = 0;
};

}  // namespace pycurv
