// Python binding of the CUDA Lanczos state (module pycurv._cuda). Glue only:
// the algorithm lives in include/pycurv/lanczos.hpp, the kernels in
// cuda/basis_cuda.cu. This file is compiled by the host compiler and sees no
// CUDA header: device memory is raw pointers, streams are opaque handles.
//
// Arrays cross the boundary without copies:
//  * out: DeviceArray, a view of a basis vector (or a fresh device buffer for
//    the eigenvectors) exporting __dlpack__/__dlpack_device__ and
//    __cuda_array_interface__ (v3), so torch.from_dlpack, cupy.from_dlpack,
//    cupy.asarray and jax.dlpack.from_dlpack all see the same memory;
//  * in: any object with __dlpack__ or __cuda_array_interface__ on the
//    state's device, float64/32/16 or bfloat16, any stride, shape (n,) or
//    (n, 1); host arrays (NumPy) are copied up.
// Streams: the state works on the stream it was given (the framework's current
// stream). A consumer on another stream is made to wait for it with an event
// (DLPack's stream argument, the interface's "stream" entry), and the state
// waits for a producer's stream the same way: the host never synchronises the
// device for an exchange.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../cuda/basis_cuda.cuh"
#include "../cuda/dlpack.h"
#include "pycurv/lanczos.hpp"
#include "state_common.hpp"

namespace py = pybind11;
using pycurv::CudaBasis;
using pycurv::DType;
using pycurv::Lanczos;
using pycurv::Options;

namespace {

CUstream_st* as_stream(uintptr_t s) { return reinterpret_cast<CUstream_st*>(s); }

// DLPack and the CUDA array interface name the legacy default stream 1, never 0.
uintptr_t exchange_stream(uintptr_t s) { return s == 0 ? 1 : s; }

// ---- device buffers handed to Python --------------------------------------------

struct DeviceBuffer {
  DeviceBuffer(int device, size_t bytes) : device(device), ptr(pycurv::device_alloc(device, bytes)) {}
  ~DeviceBuffer() { pycurv::device_free(device, ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  int device;
  void* ptr;
};

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    default: return "float64";
  }
}
size_t itemsize(DType t) { return t == DType::F64 ? 8 : t == DType::F32 ? 4 : 2; }

uint16_t float_to_bfloat16(float f) {  // round to nearest even, as frameworks do
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float bfloat16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// An array in device memory: a view into a Lanczos state (kept alive by
// `owner`) or a buffer of its own. The state's vectors are float64; arrays
// made with from_numpy may also be float32, float16 or bfloat16.
class DeviceArray {
 public:
  DeviceArray(void* ptr, std::vector<int64_t> shape, int device, uintptr_t stream, py::object owner,
              std::shared_ptr<DeviceBuffer> buffer, DType dtype = DType::F64)
      : ptr_(ptr), shape_(std::move(shape)), device_(device), stream_(stream), owner_(std::move(owner)),
        buffer_(std::move(buffer)), dtype_(dtype) {}

  int64_t size() const {
    int64_t s = 1;
    for (int64_t d : shape_) s *= d;
    return s;
  }
  py::tuple shape() const {
    py::tuple t(shape_.size());
    for (size_t i = 0; i < shape_.size(); ++i) t[i] = shape_[i];
    return t;
  }

  py::object dlpack(py::object stream, py::object max_version, py::object dl_device, py::object copy);
  py::tuple dlpack_device() const { return py::make_tuple(static_cast<int>(kDLCUDA), device_); }
  py::dict cuda_array_interface() const {
    if (dtype_ == DType::BF16)  // the interface has no type string for bfloat16: use DLPack
      throw py::attribute_error("__cuda_array_interface__ has no bfloat16 type; use __dlpack__");
    py::dict d;
    d["shape"] = shape();
    d["typestr"] = dtype_ == DType::F64 ? "<f8" : dtype_ == DType::F32 ? "<f4" : "<f2";
    // Not marked read-only: PyTorch refuses read-only imports. The Lanczos
    // input must not be written all the same (it is a basis vector).
    d["data"] = py::make_tuple(reinterpret_cast<uintptr_t>(ptr_), false);
    d["strides"] = py::none();
    d["version"] = 3;
    d["stream"] = exchange_stream(stream_);
    return d;
  }
  py::array numpy() const {
    const size_t bytes = itemsize(dtype_) * static_cast<size_t>(size());
    std::vector<py::ssize_t> shape(shape_.begin(), shape_.end());
    py::array raw;
    if (dtype_ == DType::F64) raw = py::array_t<double>(shape);
    else if (dtype_ == DType::F32) raw = py::array_t<float>(shape);
    else raw = py::array_t<uint16_t>(shape);
    {
      py::gil_scoped_release release;
      pycurv::stream_sync(device_, as_stream(stream_));
      if (bytes > 0) pycurv::copy_to_host(device_, raw.mutable_data(), ptr_, bytes);
    }
    if (dtype_ == DType::F16) return raw.attr("view")("float16");
    if (dtype_ == DType::BF16) {  // NumPy has no bfloat16: widen to float32
      py::array_t<float> out(shape);
      const auto* b = static_cast<const uint16_t*>(raw.data());
      for (int64_t i = 0; i < size(); ++i) out.mutable_data()[i] = bfloat16_to_float(b[i]);
      return out;
    }
    return raw;
  }
  std::string repr() const {
    std::string s = std::string("<pycurv._cuda.DeviceArray ") + dtype_name(dtype_) + " shape=(";
    for (size_t i = 0; i < shape_.size(); ++i) s += (i ? ", " : "") + std::to_string(shape_[i]);
    if (shape_.size() == 1) s += ",";
    return s + ") device=cuda:" + std::to_string(device_) + ">";
  }

  void* ptr_;
  std::vector<int64_t> shape_;
  int device_;
  uintptr_t stream_;
  py::object owner_;
  std::shared_ptr<DeviceBuffer> buffer_;
  DType dtype_;
};

struct ExportCtx {
  DLManagedTensor mt{};
  std::vector<int64_t> shape;
  py::object owner;
  std::shared_ptr<DeviceBuffer> buffer;
};

void export_deleter(DLManagedTensor* self) {
  auto* ctx = static_cast<ExportCtx*>(self->manager_ctx);
  if (!Py_IsInitialized()) return;  // interpreter gone: leak rather than crash
  py::gil_scoped_acquire gil;
  delete ctx;
}

void capsule_destructor(PyObject* cap) {
  // Called when the capsule dies; a consumer renames it "used_dltensor" and
  // calls the deleter itself, so only an unconsumed capsule is released here.
  if (!PyCapsule_IsValid(cap, "dltensor")) return;
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
  if (mt && mt->deleter) mt->deleter(mt);
  PyErr_Restore(type, value, tb);
}

py::object DeviceArray::dlpack(py::object stream, py::object max_version, py::object dl_device, py::object copy) {
  (void)max_version;  // the unversioned capsule is what every consumer accepts
  if (!dl_device.is_none()) {
    auto dev = dl_device.cast<std::pair<int, int>>();
    if (dev.first != kDLCUDA || dev.second != device_)
      throw py::buffer_error("pycurv DeviceArray lives on cuda:" + std::to_string(device_) +
                             " and cannot be exported to another device without a copy");
  }
  if (!copy.is_none() && copy.cast<bool>())
    throw py::buffer_error("pycurv DeviceArray does not export copies; copy it with the consuming framework");
  // The consumer will use the data on its stream: make that stream wait for ours.
  if (!stream.is_none()) {
    const long long s = stream.cast<long long>();
    if (s != -1) pycurv::stream_wait(device_, as_stream(stream_), as_stream(static_cast<uintptr_t>(s)));
  } else {
    pycurv::stream_wait(device_, as_stream(stream_), as_stream(1));
  }
  auto* ctx = new ExportCtx();
  ctx->shape = shape_;
  ctx->owner = owner_;
  ctx->buffer = buffer_;
  DLTensor& t = ctx->mt.dl_tensor;
  t.data = ptr_;
  t.device = DLDevice{kDLCUDA, device_};
  t.ndim = static_cast<int32_t>(shape_.size());
  t.dtype = dtype_ == DType::BF16 ? DLDataType{static_cast<uint8_t>(kDLBfloat), 16, 1}
                                  : DLDataType{static_cast<uint8_t>(kDLFloat), static_cast<uint8_t>(8 * itemsize(dtype_)), 1};
  t.shape = ctx->shape.data();
  t.strides = nullptr;
  t.byte_offset = 0;
  ctx->mt.manager_ctx = ctx;
  ctx->mt.deleter = export_deleter;
  PyObject* cap = PyCapsule_New(&ctx->mt, "dltensor", capsule_destructor);
  if (!cap) {
    delete ctx;
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(cap);
}

// ---- arrays coming in --------------------------------------------------------------

// A vector of n elements the kernels can read: where, of what type, what stride
// (in elements), and what keeps it alive until released.
struct Imported {
  const void* ptr = nullptr;
  DType dtype = DType::F64;
  int64_t stride = 1;
  bool host = false;               // a host array: copy it up
  py::object keep;                 // the exporting object or the host array
  DLManagedTensor* mt = nullptr;   // consumed DLPack tensor, released with its deleter

  Imported() = default;
  Imported(const Imported&) = delete;
  Imported& operator=(const Imported&) = delete;
  Imported(Imported&& o) noexcept { *this = std::move(o); }
  Imported& operator=(Imported&& o) noexcept {
    release();
    ptr = o.ptr;
    dtype = o.dtype;
    stride = o.stride;
    host = o.host;
    keep = std::move(o.keep);
    mt = o.mt;
    o.mt = nullptr;
    return *this;
  }
  ~Imported() { release(); }
  void release() {
    if (mt && mt->deleter) mt->deleter(mt);
    mt = nullptr;
    keep = py::object();
  }
};

std::string device_name(int dev) { return "cuda:" + std::to_string(dev); }

DType dtype_from_dlpack(const DLDataType& t, const std::string& what) {
  if (t.lanes == 1) {
    if (t.code == kDLFloat && t.bits == 64) return DType::F64;
    if (t.code == kDLFloat && t.bits == 32) return DType::F32;
    if (t.code == kDLFloat && t.bits == 16) return DType::F16;
    if (t.code == kDLBfloat && t.bits == 16) return DType::BF16;
  }
  const char* kinds[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  const std::string kind = t.code <= 6 ? kinds[t.code] : "code " + std::to_string(t.code);
  throw py::type_error(what + " has dtype " + kind + std::to_string(t.bits) +
                       (t.lanes != 1 ? "x" + std::to_string(t.lanes) : std::string()) +
                       "; expected float64, float32, float16 or bfloat16");
}

DType dtype_from_typestr(const std::string& ts, const std::string& what) {
  if (ts.size() >= 3 && (ts[0] == '<' || ts[0] == '|' || ts[0] == '=')) {
    const std::string k = ts.substr(1);
    if (k == "f8") return DType::F64;
    if (k == "f4") return DType::F32;
    if (k == "f2") return DType::F16;
  }
  throw py::type_error(what + " has type string '" + ts + "'; expected float64, float32 or float16 (<f8, <f4, <f2)");
}

void check_shape(const std::vector<int64_t>& shape, int64_t n, const std::string& what) {
  const bool ok = (shape.size() == 1 && shape[0] == n) || (shape.size() == 2 && shape[0] == n && shape[1] == 1);
  if (!ok) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    if (shape.size() == 1) s += ",";
    s += ")";
    throw py::value_error(what + " has shape " + s + "; expected (" + std::to_string(n) + ",)");
  }
}

Imported import_host(py::handle obj, int64_t n, const std::string& what) {
  py::array arr = py::array::ensure(obj);
  if (!arr) throw py::type_error(what + " is " + std::string(py::str(py::type::of(obj).attr("__name__"))) +
                                 ", which is neither a device array nor an array of numbers");
  const char kind = arr.dtype().kind();
  if (kind == 'c') throw py::type_error(what + " is complex; the operator must be real symmetric");
  if (kind != 'f' && kind != 'i' && kind != 'u')
    throw py::type_error(what + " has dtype " + std::string(py::str(arr.dtype())) + "; expected real numbers");
  auto a = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(arr);
  std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
  check_shape(shape, n, what);
  Imported im;
  im.ptr = a.data();
  im.dtype = DType::F64;
  im.stride = 1;
  im.host = true;
  im.keep = a;
  return im;
}

// Reads obj as a vector of n elements on `device`, made safe to use on `stream`.
Imported import_vector(py::handle obj, int64_t n, int device, uintptr_t stream, const std::string& what) {
  if (py::hasattr(obj, "__dlpack_device__")) {
    py::tuple dev = obj.attr("__dlpack_device__")();
    const int type = dev[0].cast<int>(), id = dev[1].cast<int>();
    if (type == kDLCPU) return import_host(obj, n, what);
    if (type != kDLCUDA && type != kDLCUDAManaged)
      throw py::type_error(what + " lives on DLPack device type " + std::to_string(type) +
                           "; pycurv's CUDA backend reads CUDA device memory or host arrays");
    if (id != device)
      throw py::value_error(what + " lives on " + device_name(id) + ", but the Lanczos vectors live on " +
                            device_name(device) + "; compute it on the operator's device");
    if (py::hasattr(obj, "__dlpack__")) {
      py::object cap;
      try {
        cap = obj.attr("__dlpack__")(py::arg("stream") = exchange_stream(stream));
      } catch (py::error_already_set& e) {
        if (!e.matches(PyExc_TypeError)) throw;
        cap = obj.attr("__dlpack__")();  // an exporter without the stream argument
        // It promises nothing about the stream its data was written on. The legacy
        // default stream does not order non-blocking streams (torch side streams,
        // XLA's), so only a wait for the whole device is safe.
        pycurv::device_sync(device);
      }
      if (!PyCapsule_IsValid(cap.ptr(), "dltensor"))
        throw py::type_error(what + ": __dlpack__ did not return an unversioned DLPack capsule");
      auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
      PyCapsule_SetName(cap.ptr(), "used_dltensor");  // consumed: we call the deleter
      Imported im;
      im.mt = mt;
      const DLTensor& t = mt->dl_tensor;
      std::vector<int64_t> shape(t.shape, t.shape + t.ndim);
      check_shape(shape, n, what);
      im.dtype = dtype_from_dlpack(t.dtype, what);
      im.stride = t.strides ? t.strides[0] : 1;
      im.ptr = static_cast<const char*>(t.data) + t.byte_offset;
      return im;
    }
  }
  if (py::hasattr(obj, "__cuda_array_interface__")) {
    py::dict d = obj.attr("__cuda_array_interface__");
    std::vector<int64_t> shape = d["shape"].cast<std::vector<int64_t>>();
    check_shape(shape, n, what);
    Imported im;
    im.dtype = dtype_from_typestr(d["typestr"].cast<std::string>(), what);
    const int64_t itemsize = im.dtype == DType::F64 ? 8 : im.dtype == DType::F32 ? 4 : 2;
    py::tuple data = d["data"];
    im.ptr = reinterpret_cast<const void*>(data[0].cast<uintptr_t>());
    if (d.contains("strides") && !d["strides"].is_none()) {
      const int64_t bytes = d["strides"].cast<std::vector<int64_t>>().at(0);
      if (bytes % itemsize != 0) throw py::value_error(what + " has a stride that is not a multiple of its item size");
      im.stride = bytes / itemsize;
    }
    const int owner = pycurv::pointer_device(im.ptr);
    if (owner == -1)
      throw py::value_error(what + " exposes __cuda_array_interface__ but its data is in host memory");
    if (owner >= 0 && owner != device)
      throw py::value_error(what + " lives on " + device_name(owner) + ", but the Lanczos vectors live on " +
                            device_name(device) + "; compute it on the operator's device");
    if (d.contains("stream") && !d["stream"].is_none()) {
      const uintptr_t s = d["stream"].cast<uintptr_t>();
      pycurv::stream_wait(device, as_stream(s), as_stream(stream));
    }
    im.keep = py::reinterpret_borrow<py::object>(obj);
    return im;
  }
  return import_host(obj, n, what);
}

// ---- the state -------------------------------------------------------------------------

class CudaState {
 public:
  CudaState(const Options& o, int nritz, int device, uintptr_t stream, bool host_basis)
      : basis_(o.n_local, o.ncv + 1, nritz, device, as_stream(stream), host_basis), lz_(o, &basis_),
        n_(o.n_local), device_(device), stream_(stream) {}

  // The matvec output: kept until the next one (the state reads it during the
  // next advance(), and again for an explicit residual).
  void set_matvec_output(py::handle obj) {
    pycurv::ScopedDevice guard(device_);
    Imported im = import_vector(obj, n_, device_, stream_, "the matvec output");
    if (im.host) {
      double* dst = basis_.scratch(1);
      basis_.copy(dst, im.ptr, sizeof(double) * static_cast<size_t>(n_));
      im.ptr = dst;
      im.keep = py::object();
    }
    out_ = std::move(im);
    basis_.set_source_format(out_.dtype, out_.stride);
    lz_.set_matvec_output(static_cast<const double*>(out_.ptr));  // opaque to the state; typed by the basis
    timer_.end(basis_.stream());
  }

  void set_start_vector(py::handle obj) {
    pycurv::ScopedDevice guard(device_);
    Imported im = import_vector(obj, n_, device_, stream_, "v0");
    double* slot0 = basis_.slot(0);
    if (im.host) {
      basis_.copy(slot0, im.ptr, sizeof(double) * static_cast<size_t>(n_));
    } else {
      basis_.load_vector(slot0, im.ptr, im.dtype, im.stride);
      basis_.synchronize();  // the source may be released as soon as we return
    }
  }

  DeviceArray matvec_input(py::object self) {
    pycurv::ScopedDevice guard(device_);
    const double* p = lz_.matvec_input();
    if (basis_.host_basis()) {  // the product reads device memory, not the bus
      double* dst = basis_.scratch(0);
      basis_.copy(dst, p, sizeof(double) * static_cast<size_t>(n_));
      p = dst;
    }
    timer_.begin(basis_.stream());
    return DeviceArray(const_cast<double*>(p), {n_}, device_, stream_, std::move(self), nullptr);
  }

  DeviceArray copy_out(const std::vector<const double*>& rows) {
    pycurv::ScopedDevice guard(device_);
    const size_t bytes = sizeof(double) * static_cast<size_t>(n_);
    auto buf = std::make_shared<DeviceBuffer>(device_, bytes * std::max<size_t>(rows.size(), 1));
    for (size_t i = 0; i < rows.size(); ++i) basis_.copy(static_cast<char*>(buf->ptr) + i * bytes, rows[i], bytes);
    // The vectors keep the stream they are ordered on alive (their exports name it).
    return DeviceArray(buf->ptr, {static_cast<int64_t>(rows.size()), n_}, device_, stream_, stream_owner_, buf);
  }

  // The framework's object for the stream (a cupy.cuda.Stream, a torch.cuda.Stream),
  // held so the stream outlives the basis, which frees on it, and the vectors handed
  // out, which name it: declared first, released last.
  py::object stream_owner_;
  CudaBasis basis_;
  Lanczos<CudaBasis> lz_;
  int64_t n_;
  int device_;
  uintptr_t stream_;
  Imported out_;
  pycurv::IntervalTimer timer_;
};

py::list devices() {
  std::string err;
  py::list out;
  for (const auto& d : pycurv::cuda_devices(&err)) {
    py::dict e;
    e["index"] = d.index;
    e["name"] = d.name;
    e["total_memory"] = d.total_memory;
    e["compute_capability"] = std::to_string(d.major) + "." + std::to_string(d.minor);
    e["multiprocessors"] = d.multiprocessors;
    out.append(e);
  }
  return out;
}

}  // namespace

#ifndef PYCURV_CUDA_ARCHITECTURES
#define PYCURV_CUDA_ARCHITECTURES "unknown"
#endif

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pycurv compiled core on CUDA devices: the float64 Krylov basis and its kernels on the GPU.";

  // The CPU core's NonFiniteError is the base, so one except clause catches both.
  py::module_ core = py::module_::import("pycurv._core");
  py::object base = core.attr("NonFiniteError");
  py::register_local_exception<pycurv::NonFiniteError>(m, "NonFiniteError", base);
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const pycurv::DeviceMemoryError& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    } catch (const pycurv::CudaError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  py::class_<DeviceArray>(m, "DeviceArray",
                          "An array in CUDA device memory, exported zero-copy through DLPack and "
                          "__cuda_array_interface__ (torch.from_dlpack, cupy.from_dlpack, jax.dlpack.from_dlpack).")
      // stream may come positionally: some consumers (older JAX) pass it so.
      .def("__dlpack__", &DeviceArray::dlpack, py::arg("stream") = py::none(), py::kw_only(),
           py::arg("max_version") = py::none(), py::arg("dl_device") = py::none(), py::arg("copy") = py::none())
      .def("__dlpack_device__", &DeviceArray::dlpack_device)
      .def_property_readonly("__cuda_array_interface__", &DeviceArray::cuda_array_interface)
      .def_property_readonly("shape", &DeviceArray::shape)
      .def_property_readonly("dtype", [](const DeviceArray& a) { return std::string(dtype_name(a.dtype_)); })
      .def_property_readonly("device", [](const DeviceArray& a) { return device_name(a.device_); })
      .def_property_readonly("ptr", [](const DeviceArray& a) { return reinterpret_cast<uintptr_t>(a.ptr_); })
      .def("__len__", [](const DeviceArray& a) { return a.shape_.empty() ? 0 : a.shape_[0]; })
      .def("numpy", &DeviceArray::numpy,
           "Copy to a host NumPy array (waits for the array's stream); bfloat16 comes back as float32.")
      .def("__repr__", &DeviceArray::repr)
      .def_static(
          "from_numpy",
          [](py::array a, int device, py::object dtype) {
            std::string name = dtype.is_none() ? std::string(py::str(a.dtype())) : std::string(py::str(dtype));
            if (name != "float32" && name != "float16" && name != "bfloat16") name = "float64";
            const DType t = name == "float32" ? DType::F32 : name == "float16" ? DType::F16
                          : name == "bfloat16" ? DType::BF16 : DType::F64;
            py::array host;
            if (t == DType::BF16) {
              auto f = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a);
              py::array_t<uint16_t> bits(std::vector<py::ssize_t>(f.shape(), f.shape() + f.ndim()));
              for (py::ssize_t i = 0; i < f.size(); ++i) bits.mutable_data()[i] = float_to_bfloat16(f.data()[i]);
              host = bits;
            } else {
              host = py::module_::import("numpy").attr("ascontiguousarray")(a, name);
            }
            std::vector<int64_t> shape(host.shape(), host.shape() + host.ndim());
            const size_t bytes = itemsize(t) * static_cast<size_t>(host.size());
            auto buf = std::make_shared<DeviceBuffer>(device, bytes);
            if (bytes) pycurv::copy_to_device(device, buf->ptr, host.data(), bytes);
            return DeviceArray(buf->ptr, shape, device, 0, py::none(), buf, t);
          },
          py::arg("a"), py::arg("device") = 0, py::arg("dtype") = py::none(),
          "A device copy of a host array: float64, or float32/float16 (kept), or dtype='bfloat16' "
          "(rounded to nearest even). For tests and examples without a GPU framework.");

  // The request enum is the CPU core's (one C++ type, registered once).
  m.attr("Request") = core.attr("Request");

  py::class_<CudaState> state(m, "LanczosState");
  state
      .def(py::init([](int64_t n_local, int64_t n_global, int64_t offset, int k, int ncv, int which, double tol,
                       int64_t max_matvecs, uint64_t seed, bool start_given, bool check_multiplicity,
                       bool explicit_residuals, bool want_vectors, bool yield_reduce, double unit_roundoff,
                       int device, uintptr_t stream, bool host_basis, py::object stream_owner,
                       bool tol_on_eigenvalue, int64_t min_matvecs) {
             const Options o = pycurv_binding::make_options(
                 n_local, n_global, offset, k, ncv, which, tol, max_matvecs, seed, start_given, check_multiplicity,
                 explicit_residuals, want_vectors, yield_reduce, unit_roundoff, tol_on_eigenvalue, min_matvecs);
             if (n_local < 1) throw std::invalid_argument("n_local must be >= 1 on a GPU");
             if (device < 0) throw std::invalid_argument("device must be a CUDA device index >= 0");
             CudaState* st = nullptr;
             {
               py::gil_scoped_release release;
               st = new CudaState(o, pycurv_binding::ritz_buffers(o), device, stream, host_basis);
             }
             st->stream_owner_ = std::move(stream_owner);
             return st;
           }),
           py::kw_only(), py::arg("n_local"), py::arg("n_global"), py::arg("offset"), py::arg("k"), py::arg("ncv"),
           py::arg("which"), py::arg("tol"), py::arg("max_matvecs"), py::arg("seed"), py::arg("start_given"),
           py::arg("check_multiplicity"), py::arg("explicit_residuals"), py::arg("want_vectors"),
           py::arg("yield_reduce"), py::arg("unit_roundoff"), py::arg("device"), py::arg("stream") = 0,
           py::arg("host_basis") = false, py::arg("stream_owner") = py::none(),
           py::arg("tol_on_eigenvalue") = false, py::arg("min_matvecs") = 0)
      .def(
          "advance",
          [](CudaState& s) {
            py::gil_scoped_release release;
            pycurv::ScopedDevice guard(s.device_);
            return s.lz_.advance();
          },
          "Run until the next request; returns a Request.")
      .def("set_start_vector", &CudaState::set_start_vector, py::arg("v0"),
           "Copy the start vector (a device array or a host array, cast to float64) into the basis.")
      .def("matvec_input", [](py::object self) { return self.cast<CudaState&>().matvec_input(self); },
           "The vector to multiply: a DeviceArray view of a basis vector (do not write to it).")
      .def("set_matvec_output", &CudaState::set_matvec_output, py::arg("w"),
           "A @ x: a device array (float64/32/16 or bfloat16, any stride, shape (n,) or (n, 1)) or a host array.")
      .def("reduce_buffer",
           [](py::object self) {
             CudaState& s = self.cast<CudaState&>();
             py::array a(py::dtype::of<double>(), {static_cast<py::ssize_t>(s.lz_.reduce_size())},
                         {static_cast<py::ssize_t>(sizeof(double))}, s.lz_.reduce_buffer(), self);
             return a;
           },
           "The host buffer of partial sums to reduce over processes in place (REDUCE).")
      .def(
          "basis",
          [](CudaState& s, int count) {
            if (count < 0 || count > s.basis_.slots()) throw std::invalid_argument("count out of range");
            std::vector<const double*> rows;
            for (int i = 0; i < count; ++i) rows.push_back(s.basis_.slot(i));
            return s.copy_out(rows);
          },
          py::arg("count"), "A device copy of the first `count` basis vectors (rows).")
      .def(
          "eigenvectors",
          [](CudaState& s) {
            if (!s.lz_.vectors_ready()) throw std::runtime_error("eigenvectors were not computed");
            std::vector<const double*> rows;
            for (int i = 0; i < s.lz_.n_vectors(); ++i) rows.push_back(s.basis_.ritz(i));
            return s.copy_out(rows);
          },
          "The Ritz vectors, one per row, wanted end first, in a device buffer of their own.")
      .def_property_readonly("device", [](CudaState& s) { return s.device_; })
      .def_property_readonly("stream", [](CudaState& s) { return s.stream_; })
      .def_property_readonly("host_basis", [](CudaState& s) { return s.basis_.host_basis(); })
      .def_property_readonly("device_bytes", [](CudaState& s) { return s.basis_.device_bytes(); },
                             "Bytes of device memory the state holds.")
      .def_property_readonly(
          "matvec_seconds",
          [](CudaState& s) {
            py::gil_scoped_release release;
            pycurv::ScopedDevice guard(s.device_);
            return s.timer_.seconds();
          },
          "Device time of the matvecs (events on the state's stream around each product).");
  pycurv_binding::def_results(state);

  m.def("devices", &devices,
        "CUDA devices visible to this module: a list of dicts (index, name, total_memory, compute_capability, "
        "multiprocessors); empty, never an error, without a GPU or a driver.");
  m.def(
      "device_error",
      []() {
        std::string err;
        pycurv::cuda_devices(&err);
        return err;
      },
      "Why no device is visible ('' when devices() is not empty).");
  m.def("build_info", []() {
    py::dict d;
    d["cuda_runtime"] = pycurv::cuda_runtime_version();
    d["cuda_driver"] = pycurv::cuda_driver_version();
    d["architectures"] = std::string(PYCURV_CUDA_ARCHITECTURES);
#ifdef PYCURV_CUDA_EMULATION
    d["emulated"] = true;  // kernels run on the CPU: a test build
#else
    d["emulated"] = false;
#endif
    return d;
  });
#ifdef PYCURV_CUDA_EMULATION
  m.def("host_syncs", &pycurv::emulated_host_syncs,
        "Emulated builds only: times the host has waited on the device so far (stream, event and device "
        "synchronisations, synchronous copies).");
#endif
  m.def(
      "read_bandwidth",
      [](int64_t n, int repeats, int device) {
        if (n < 1) throw std::invalid_argument("n must be >= 1");
        py::gil_scoped_release release;
        return pycurv::measure_read_bandwidth(n, repeats, device);
      },
      py::arg("n") = 1 << 27, py::arg("repeats") = 5, py::arg("device") = 0,
      "Device read bandwidth in bytes/s of one streaming pass over n doubles (best of repeats; 0 on the emulation).");
}
