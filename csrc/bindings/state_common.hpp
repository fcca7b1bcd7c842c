// What the CPU and CUDA bindings of the Lanczos state share: the options built
// from the keyword arguments, and the results and progress read back. A state
// type has members lz_ (the Lanczos<Basis>) and basis_.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "pycurv/lanczos.hpp"

namespace pycurv_binding {

namespace py = pybind11;

inline py::array_t<double> to_array(const std::vector<double>& v) {
  py::array_t<double> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

inline pycurv::Options make_options(int64_t n_local, int64_t n_global, int64_t offset, int k, int ncv, int which,
                                    double tol, int64_t max_matvecs, uint64_t seed, bool start_given,
                                    bool check_multiplicity, bool explicit_residuals, bool want_vectors,
                                    bool yield_reduce, double unit_roundoff, bool tol_on_eigenvalue = false,
                                    int64_t min_matvecs = 0) {
  if (n_local < 0 || n_global < 1 || offset < 0 || offset + n_local > n_global)
    throw std::invalid_argument("inconsistent n_local, n_global, offset");
  if (which < 0 || which > 2) throw std::invalid_argument("which must be 0 (LA), 1 (SA) or 2 (BE)");
  pycurv::Options o;
  o.n_local = n_local;
  o.n_global = n_global;
  o.offset = offset;
  o.k = k;
  o.ncv = ncv;
  o.which = static_cast<pycurv::Which>(which);
  o.tol = tol;
  o.tol_on_eigenvalue = tol_on_eigenvalue;
  o.max_matvecs = max_matvecs;
  if (min_matvecs < 0) throw std::invalid_argument("min_matvecs must be >= 0");
  o.min_matvecs = min_matvecs;
  o.seed = seed;
  o.start_given = start_given;
  o.check_multiplicity = check_multiplicity;
  // Below what the recurrence certifies, convergence is confirmed on A itself.
  o.explicit_residuals = explicit_residuals || tol < pycurv::certifiable_tol(n_global);
  o.want_vectors = want_vectors;
  o.yield_reduce = yield_reduce;
  o.unit_roundoff = unit_roundoff;
  return o;
}

// Ritz-vector buffers: the k wanted vectors, or one for the explicit residual check.
inline int ritz_buffers(const pycurv::Options& o) { return o.want_vectors ? o.k : (o.explicit_residuals ? 1 : 0); }

template <class State>
void def_results(py::class_<State>& c) {
  c.def("stop", [](State& s) { s.lz_.stop(); })
      .def_property_readonly("status", [](State& s) { return static_cast<int>(s.lz_.status()); })
      .def_property_readonly("n_matvecs", [](State& s) { return s.lz_.n_matvecs(); })
      .def_property_readonly("n_restarts", [](State& s) { return s.lz_.n_restarts(); })
      .def_property_readonly("n_breakdowns", [](State& s) { return s.lz_.n_breakdowns(); })
      .def_property_readonly("n_pass3", [](State& s) { return s.lz_.n_pass3(); })
      .def_property_readonly("n_verify_rounds", [](State& s) { return s.lz_.n_verify_rounds(); })
      .def_property_readonly("basis_size", [](State& s) { return s.lz_.basis_size(); })
      .def_property_readonly("n_locked", [](State& s) { return s.lz_.n_locked(); })
      .def_property_readonly("bytes_moved", [](State& s) { return s.basis_.bytes_moved(); },
                             "Bytes the basis kernels must move at the least (traffic model for the roofline).")
      .def_property_readonly("anorm", [](State& s) { return s.lz_.anorm(); })
      .def_property_readonly("noise_level", [](State& s) { return s.lz_.noise_level(); })
      .def_property_readonly("asymmetry", [](State& s) { return s.lz_.asymmetry(); })
      .def_property_readonly("max_h2_ratio", [](State& s) { return s.lz_.max_h2_ratio(); })
      .def_property_readonly("residuals_explicit", [](State& s) { return s.lz_.residuals_explicit(); })
      .def("values", [](State& s) { return to_array(s.lz_.values()); })
      .def("residuals", [](State& s) { return to_array(s.lz_.residuals()); })
      .def("error_bounds", [](State& s) { return to_array(s.lz_.error_bounds()); })
      .def("set_unit_roundoff", [](State& s, double u) { s.lz_.set_unit_roundoff(u); }, py::arg("u"))
      .def("current_values", [](State& s) { return to_array(s.lz_.current_values()); })
      .def("current_residuals", [](State& s) { return to_array(s.lz_.current_residuals()); })
      .def("history", [](State& s) {
        py::dict d;
        d["n_matvecs"] = to_array(s.lz_.hist_matvecs());
        d["value"] = to_array(s.lz_.hist_value());
        d["residual"] = to_array(s.lz_.hist_residual());
        return d;
      });
}

}  // namespace pycurv_binding
