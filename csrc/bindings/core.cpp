// Python binding of the CPU Lanczos state. Glue only: the algorithm lives in
// include/pycurv/lanczos.hpp and the kernels in cpu/basis_cpu.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "../cpu/basis_cpu.hpp"
#include "pycurv/lanczos.hpp"
#include "pycurv/tridiag.hpp"
#include "state_common.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using pycurv::CpuBasis;
using pycurv::Lanczos;
using pycurv::Options;

namespace {

class CpuState {
 public:
  CpuState(const Options& o, int nritz) : basis_(o.n_local, o.ncv + 1, nritz), lz_(o, &basis_), n_(o.n_local) {}

  // Zero-copy views whose base object keeps this state alive.
  py::array view(const double* p, py::ssize_t len, py::handle self, bool writeable) const {
    py::array a(py::dtype::of<double>(), {len}, {static_cast<py::ssize_t>(sizeof(double))}, p, self);
    if (!writeable) py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
    return a;
  }

  void set_matvec_output(py::array_t<double, py::array::c_style | py::array::forcecast> w) {
    if (w.size() != n_)
      throw std::invalid_argument("matvec output has " + std::to_string(w.size()) + " entries, expected " +
                                  std::to_string(n_));
    out_keep_ = w;
    lz_.set_matvec_output(w.data());
  }

  CpuBasis basis_;
  Lanczos<CpuBasis> lz_;
  int64_t n_;
  py::object out_keep_ = py::none();
};

// Fixed-step Lanczos for quadrature: the basis and the recurrence (tridiag.hpp).
class CpuTridiag {
 public:
  CpuTridiag(int64_t n, int steps) : basis_(n, steps + 1, 0), td_(n, steps, &basis_), n_(n) {}

  void set_matvec_output(py::array_t<double, py::array::c_style | py::array::forcecast> w) {
    if (w.size() != n_)
      throw std::invalid_argument("matvec output has " + std::to_string(w.size()) + " entries, expected " +
                                  std::to_string(n_));
    out_keep_ = w;
    td_.set_matvec_output(w.data());
  }

  CpuBasis basis_;
  pycurv::Tridiag<CpuBasis> td_;
  int64_t n_;
  py::object out_keep_ = py::none();
};

py::array vector_view(const double* p, py::ssize_t len, py::handle self, bool writeable) {
  py::array a(py::dtype::of<double>(), {len}, {static_cast<py::ssize_t>(sizeof(double))}, p, self);
  if (!writeable) py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return a;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pycurv compiled core: float64 thick-restart Lanczos with full reorthogonalisation (CPU).";

  py::register_exception<pycurv::NonFiniteError>(m, "NonFiniteError", PyExc_FloatingPointError);

  py::enum_<pycurv::Request>(m, "Request")
      .value("MATVEC", pycurv::Request::Matvec)
      .value("REDUCE", pycurv::Request::Reduce)
      .value("STEP", pycurv::Request::Step)
      .value("DONE", pycurv::Request::Done);

  py::class_<CpuState> state(m, "LanczosState");
  state
      .def(py::init([](int64_t n_local, int64_t n_global, int64_t offset, int k, int ncv, int which, double tol,
                       int64_t max_matvecs, uint64_t seed, bool start_given, bool check_multiplicity,
                       bool explicit_residuals, bool want_vectors, bool yield_reduce, double unit_roundoff, bool tol_on_eigenvalue,
                       int64_t min_matvecs) {
             const Options o = pycurv_binding::make_options(
                 n_local, n_global, offset, k, ncv, which, tol, max_matvecs, seed, start_given, check_multiplicity,
                 explicit_residuals, want_vectors, yield_reduce, unit_roundoff, tol_on_eigenvalue, min_matvecs);
             return new CpuState(o, pycurv_binding::ritz_buffers(o));
           }),
           py::kw_only(), py::arg("n_local"), py::arg("n_global"), py::arg("offset"), py::arg("k"), py::arg("ncv"),
           py::arg("which"), py::arg("tol"), py::arg("max_matvecs"), py::arg("seed"), py::arg("start_given"),
           py::arg("check_multiplicity"), py::arg("explicit_residuals"), py::arg("want_vectors"),
           py::arg("yield_reduce"), py::arg("unit_roundoff"), py::arg("tol_on_eigenvalue") = false,
           py::arg("min_matvecs") = 0)
      .def(
          "advance",
          [](CpuState& s) {
            py::gil_scoped_release release;
            return s.lz_.advance();
          },
          "Run until the next request; returns a Request.")
      .def("start_vector",
           [](py::object self) {
             CpuState& s = self.cast<CpuState&>();
             return s.view(s.basis_.slot(0), s.n_, self, true);
           })
      .def("matvec_input",
           [](py::object self) {
             CpuState& s = self.cast<CpuState&>();
             return s.view(s.lz_.matvec_input(), s.n_, self, false);
           })
      .def("set_matvec_output", &CpuState::set_matvec_output, py::arg("w"))
      .def("reduce_buffer",
           [](py::object self) {
             CpuState& s = self.cast<CpuState&>();
             return s.view(s.lz_.reduce_buffer(), s.lz_.reduce_size(), self, true);
           })
      .def("basis",
           [](py::object self, int count) {
             CpuState& s = self.cast<CpuState&>();
             if (count < 0 || count > s.basis_.slots()) throw std::invalid_argument("count out of range");
             py::array a(py::dtype::of<double>(), {static_cast<py::ssize_t>(count), static_cast<py::ssize_t>(s.n_)},
                         {static_cast<py::ssize_t>(s.n_ * sizeof(double)), static_cast<py::ssize_t>(sizeof(double))},
                         s.basis_.slot(0), self);
             py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
             return a;
           },
           py::arg("count"), "Read-only view of the first `count` basis vectors (rows).")
      .def("eigenvectors",
           [](CpuState& s) {
             const int nv = s.lz_.n_vectors();
             if (!s.lz_.vectors_ready()) throw std::runtime_error("eigenvectors were not computed");
             py::array_t<double> a({static_cast<py::ssize_t>(nv), static_cast<py::ssize_t>(s.n_)});
             for (int i = 0; i < nv; ++i)
               std::copy(s.basis_.ritz(i), s.basis_.ritz(i) + s.n_, a.mutable_data() + static_cast<int64_t>(i) * s.n_);
             return a;
           },
           "Copy of the Ritz vectors, one per row, wanted end first.");
  pycurv_binding::def_results(state);

  py::class_<CpuTridiag>(m, "TridiagState")
      .def(py::init([](int64_t n, int steps) {
             if (n < 1) throw std::invalid_argument("n must be >= 1, got " + std::to_string(n));
             if (steps < 1) throw std::invalid_argument("steps must be >= 1, got " + std::to_string(steps));
             return new CpuTridiag(n, steps);
           }),
           py::kw_only(), py::arg("n"), py::arg("steps"))
      .def(
          "advance",
          [](CpuTridiag& s) {
            py::gil_scoped_release release;
            return s.td_.advance();
          },
          "Run until the next request (MATVEC or DONE).")
      .def("start_vector",
           [](py::object self) {
             CpuTridiag& s = self.cast<CpuTridiag&>();
             return vector_view(s.basis_.slot(0), s.n_, self, true);
           })
      .def("matvec_input",
           [](py::object self) {
             CpuTridiag& s = self.cast<CpuTridiag&>();
             return vector_view(s.td_.matvec_input(), s.n_, self, false);
           })
      .def("set_matvec_output", &CpuTridiag::set_matvec_output, py::arg("w"))
      .def("alphas", [](CpuTridiag& s) { return pycurv_binding::to_array(s.td_.alphas()); })
      .def("betas", [](CpuTridiag& s) { return pycurv_binding::to_array(s.td_.betas()); })
      .def_property_readonly("n_matvecs", [](CpuTridiag& s) { return s.td_.n_matvecs(); })
      .def_property_readonly("steps_done", [](CpuTridiag& s) { return s.td_.steps_done(); })
      .def_property_readonly("exhausted", [](CpuTridiag& s) { return s.td_.exhausted(); })
      .def_property_readonly("n_pass3", [](CpuTridiag& s) { return s.td_.n_pass3(); })
      .def_property_readonly("last_beta", [](CpuTridiag& s) { return s.td_.last_beta(); });

  m.def(
      "symeig",
      [](py::array_t<double, py::array::c_style | py::array::forcecast> a) {
        if (a.ndim() != 2 || a.shape(0) != a.shape(1)) throw std::invalid_argument("symeig needs a square matrix");
        const int n = static_cast<int>(a.shape(0));
        py::array_t<double> w(n), z({n, n});
        std::vector<double> work(std::max(n, 1));
        bool ok;
        {
          py::gil_scoped_release release;
          ok = pycurv::symeig(n, a.data(), n, w.mutable_data(), z.mutable_data(), work.data());
        }
        if (!ok) throw std::runtime_error("symeig: QL iteration did not converge");
        return py::make_tuple(w, z);
      },
      py::arg("a"),
      "Eigen-decomposition of a small dense symmetric matrix with the core's Ritz solver "
      "(Householder tridiagonalisation + implicit QL). Returns (ascending eigenvalues, eigenvectors as columns).");

  m.def("build_info", []() {
    py::dict d;
#ifdef _OPENMP
    d["openmp"] = true;
    d["max_threads"] = omp_get_max_threads();
#else
    d["openmp"] = false;
    d["max_threads"] = 1;
#endif
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = std::string("unknown");
#endif
    d["cxx_standard"] = static_cast<long>(__cplusplus);
    return d;
  });

  m.def(
      "read_bandwidth",
      [](int64_t n, int repeats) {
        if (n < 1) throw std::invalid_argument("n must be >= 1");
        py::gil_scoped_release release;
        return pycurv::measure_read_bandwidth(n, repeats);
      },
      py::arg("n") = 64 << 20, py::arg("repeats") = 5,
      "Read bandwidth in bytes/s of one threaded pass over n doubles (best of repeats).");

  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 1) throw std::invalid_argument("the number of threads must be >= 1");
#ifdef _OPENMP
        omp_set_num_threads(n);
#endif
      },
      py::arg("n"), "Threads used by the CPU kernels (OpenMP); no effect without OpenMP.");
}
