// The Krylov basis on a CUDA device and the memory-bound kernels on it: the
// backend Lanczos<CudaBasis> runs on, with exactly CpuBasis's interface.
//
// This header is plain C++ (no CUDA syntax, no CUDA headers): the binding is
// compiled by the host compiler and sees only raw pointers, sizes and an
// opaque stream handle. Everything CUDA lives in basis_cuda.cu.
//
// Conventions shared with CpuBasis:
//  * slot(i), ritz(r) are device pointers (with host_basis, device-visible
//    pointers into pinned mapped host memory);
//  * out, h, C, s are host arrays. Coefficients go up with an asynchronous copy
//    from a pinned staging buffer; every reduction comes down with one small
//    asynchronous copy followed by one synchronisation of the stream, so each
//    call that returns sums (dots, update_dots, update_norm, ortho_fused,
//    residual) waits for the stream once, and the others do not wait at all;
//    a Lanczos step in one process is one ortho_fused: one wait per step;
//  * reductions are deterministic: a fixed grid for a given (n, number of
//    vectors, device), per-block partial sums in a fixed order, then one block
//    per column adding the partials in block order. Same inputs, same GPU:
//    the same bits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

struct CUstream_st;  // cudaStream_t is CUstream_st*
struct CUevent_st;   // cudaEvent_t is CUevent_st*

namespace pycurv {

// Element type of a matvec output (the pointer the Lanczos state hands back to
// dots() and residual()): cast to float64 as it is loaded.
enum class DType : int { F64 = 0, F32 = 1, F16 = 2, BF16 = 3 };

// A CUDA runtime call failed; the message names the call and the CUDA error.
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A device (or pinned host) allocation failed.
class DeviceMemoryError : public std::runtime_error {
 public:
  DeviceMemoryError(const std::string& what, size_t bytes) : std::runtime_error(what), bytes_(bytes) {}
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_;
};

class CudaBasis {
 public:
  // n: rows held here; nslots: basis vectors (ncv + 1); nritz: Ritz-vector
  // buffers; device: CUDA device index; stream: the caller's stream (nullptr:
  // the legacy default stream); host_basis: keep the basis and Ritz vectors in
  // pinned host memory mapped into the device's address space (the kernels
  // read it over the bus: slower, but only a few vectors live on the device).
  CudaBasis(int64_t n, int nslots, int nritz, int device, CUstream_st* stream, bool host_basis);
  ~CudaBasis();  // never throws: frees what it can
  CudaBasis(const CudaBasis&) = delete;
  CudaBasis& operator=(const CudaBasis&) = delete;

  int64_t rows() const { return n_; }
  int slots() const { return nslots_; }
  int ritz_slots() const { return nritz_; }
  int device() const { return device_; }
  CUstream_st* stream() const { return stream_; }
  bool host_basis() const { return host_basis_; }
  // Vectors are ld() doubles apart: n rounded up to 256 bytes, so that every
  // vector starts aligned (coalesced loads; XLA imports it without a copy).
  int64_t ld() const { return ld_; }
  double* slot(int i) { return basis_ + static_cast<int64_t>(i) * ld_; }
  const double* slot(int i) const { return basis_ + static_cast<int64_t>(i) * ld_; }
  double* ritz(int r) { return ritz_ + static_cast<int64_t>(r) * ld_; }
  const double* ritz(int r) const { return ritz_ + static_cast<int64_t>(r) * ld_; }

  // How to read the matvec output pointer passed to dots() and residual():
  // element type and stride in elements (1: contiguous). The Lanczos state
  // treats that pointer as opaque and only hands it back here.
  void set_source_format(DType dtype, int64_t stride);
  // Products passed as src to dots() and residual() are read multiplied by s
  // (a power of two chosen by the Lanczos state; 1 until it is set).
  void set_source_scale(double s) { src_scale_ = s; }
  // A magnitude of x = src (the matvec output, read unscaled) or, if src is
  // null, of slot w, as two sums that neither overflow nor underflow:
  // out[0] = sum of |x_i| 2^-64 over |x_i| >= 1, out[1] = sum of |x_i| 2^64
  // over |x_i| < 1.
  void magnitude(const double* src, int w, double* out);

  // Pass 1. If src is given it is first copied into slot w (cast to float64,
  // times the source scale, fused with the dots). out[i] = <V_i, w> for i < nv; out[nv] = <w, w>.
  void dots(const double* src, int w, int nv, double* out);
  // Pass 2. w -= V[0:nv] h, then out[i] = <V_i, w>, out[nv] = <w, w>; each
  // tile of V is read from memory once, into shared memory, for both halves.
  void update_dots(int w, int nv, const double* h, double* out);
  // Pass 3. w -= V[0:nv] h; out[0] = <w, w>.
  void update_norm(int w, int nv, const double* h, double* out);
  // Passes 1, 2 and 3 of a step queued back to back, the coefficients of each
  // pass read on the device from the previous pass's sums, with one wait for
  // the host at the end: out[0, nv] = pass 1's sums (as dots), out[nv + 1,
  // 2 nv + 1] = pass 2's (as update_dots with h = pass 1's dots), out[2 nv + 2]
  // = <w, w> after pass 3 and out[2 nv + 3] = 1 if pass 3 ran, 0 if not. Pass 3
  // (as update_norm with pass 2's dots) runs only when their norm exceeds
  // pass3_ratio * sqrt(pass 2's <w, w>), decided on the device. nv >= 1.
  void ortho_fused(const double* src, int w, int nv, double pass3_ratio, double* out);
  void scale(int w, double a);
  // Slot w <- normal random vector: entry i is normal_at(key, offset + i), the
  // CPU backend's vector (up to the last bit of the device's log and cos).
  void random_normal(int w, uint64_t key, int64_t offset);
  // In place: slots [0, nnew) <- slots [0, nold) * C, C column-major nold x nnew.
  void combine(int nold, const double* C, int nnew);
  // Ritz buffer r <- slots [0, nold) * s.
  void ritz_vector(int nold, const double* s, int r);
  // out[0] = |s w - theta * ritz_r|^2 with w the matvec output (see set_source_format), s the source scale.
  void residual(const double* w, int r, double theta, double* out);

  // dst (n doubles, device-visible) <- src (n elements of dtype, stride in
  // elements, device-visible), cast to float64; asynchronous on the stream.
  void load_vector(double* dst, const void* src, DType dtype, int64_t stride);
  // Asynchronous copies on the stream (any direction; host memory must stay
  // valid until the stream reaches the copy, or be pageable).
  void copy(void* dst, const void* src, size_t bytes);
  // Waits for the stream.
  void synchronize();
  // A device buffer of n doubles owned by the basis (allocated on first use):
  // the matvec input when the basis lives in host memory, host uploads.
  double* scratch(int which);

  // Bytes the kernels called so far must move between memory and the cores at
  // the least: the same traffic model as CpuBasis::bytes_moved.
  double bytes_moved() const { return bytes_; }
  // Bytes held on the device (basis, Ritz buffers, scratch, partial sums).
  size_t device_bytes() const { return device_bytes_; }

 private:
  struct Tile {
    int rows = 1;   // rows per tile (a power of two)
    int shift = 0;  // log2(rows)
    int grid = 0;   // blocks (0: not computed yet)
    size_t smem = 0;
  };
  const Tile& ortho_tile(int nv);
  const Tile& combine_tile(int nold);
  void release();
  const double* upload(const double* host, size_t count);
  void reduce_partials(int width, int blocks, double* dst);
  void fetch_sums(int count, double* out);
  void download_sums(int width, int blocks, double* out);
  double* alloc_device(size_t bytes, const char* what);
  void free_device(double* p);
  void count(double vectors) { bytes_ += vectors * 8.0 * static_cast<double>(n_); }

  int64_t n_, ld_;
  int nslots_, nritz_, device_;
  CUstream_st* stream_;
  bool host_basis_;
  bool pools_ = false;
  int sms_ = 1;
  size_t smem_optin_ = 48 << 10;
  size_t ortho_limit_ = 0, combine_limit_ = 0;  // dynamic shared memory per block
  std::vector<Tile> ortho_tiles_, combine_tiles_;  // by number of vectors
  void* host_alloc_ = nullptr;  // pinned mapped allocation (host_basis)
  double* basis_ = nullptr;
  double* ritz_ = nullptr;
  double* partial_ = nullptr;  // per-block partial sums
  size_t partial_cap_ = 0;     // in doubles
  double* sums_dev_ = nullptr; // reduced sums on the device
  double* sums_host_ = nullptr;  // pinned
  double* coef_dev_ = nullptr;
  double* coef_host_ = nullptr;  // pinned staging for uploads
  size_t coef_cap_ = 0;
  CUevent_st* coef_ready_ = nullptr;  // recorded after each upload from coef_host_
  double* scratch_[2] = {nullptr, nullptr};
  DType src_dtype_ = DType::F64;
  int64_t src_stride_ = 1;
  double src_scale_ = 1.0;
  double bytes_ = 0.0;
  size_t device_bytes_ = 0;
};

// ---- small device utilities for the binding ---------------------------------

struct DeviceInfo {
  int index;
  std::string name;
  size_t total_memory;
  int major, minor;
  int multiprocessors;
};

// Devices the CUDA runtime can see; empty (with the reason in *error) when
// there is no device or no usable driver. Never throws.
std::vector<DeviceInfo> cuda_devices(std::string* error);
// "13.0" style versions of the runtime this module was built with and of the
// installed driver ("none" without a driver).
std::string cuda_runtime_version();
std::string cuda_driver_version();

// Makes `consumer` wait for the work queued so far on `producer` (an event,
// no host synchronisation); nothing when they are the same stream.
void stream_wait(int device, CUstream_st* producer, CUstream_st* consumer);

// Waits on the host for the work queued so far on a stream.
void stream_sync(int device, CUstream_st* stream);
// Device that owns a pointer: its index, -1 for host memory (pageable or
// pinned), -2 when the runtime cannot tell.
int pointer_device(const void* p);

// Sets the current device for the lifetime of the object, then restores it.
// The plain constructor throws CudaError when the device cannot be made
// current; the std::nothrow one is for cleanup paths (destructors, DLPack
// deleters, which C calls), where an exception is std::terminate: it leaves the
// current device as it is and the release goes ahead (and fails quietly).
class ScopedDevice {
 public:
  explicit ScopedDevice(int device);
  ScopedDevice(int device, const std::nothrow_t&) noexcept;
  ~ScopedDevice();
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  int previous_ = -1;
};

// Device memory for arrays handed to Python (freed by their DLPack deleter).
// device_free never throws (it runs in destructors and C callbacks).
void* device_alloc(int device, size_t bytes);
void device_free(int device, void* p) noexcept;
// Waits on the host for all work on the device, on every stream.
void device_sync(int device);
// Synchronous copies between host and device (for small diagnostics).
void copy_to_host(int device, void* dst, const void* src, size_t bytes);
void copy_to_device(int device, void* dst, const void* src, size_t bytes);

// Device time between pairs of events recorded on a stream: the time the
// matvecs took on the GPU, measured without synchronising the host.
class IntervalTimer {
 public:
  IntervalTimer() = default;
  ~IntervalTimer();
  IntervalTimer(const IntervalTimer&) = delete;
  IntervalTimer& operator=(const IntervalTimer&) = delete;
  void begin(CUstream_st* stream);
  void end(CUstream_st* stream);
  // Seconds of every finished interval so far; waits for the last one.
  double seconds();

 private:
  void harvest(bool wait);
  CUevent_st* start_ = nullptr;
  CUevent_st* stop_ = nullptr;
  bool open_ = false, pending_ = false;
  double total_ = 0.0;
};

#if defined(PYCURV_CUDA_EMULATION)
// Times the host has waited on the emulated device so far (stream, event and
// device synchronisations, synchronous copies): the tests count them per step.
uint64_t emulated_host_syncs();
#endif

// Best-of-`repeats` read bandwidth (bytes/s) of one pass over n doubles by a
// plain streaming read kernel: the roofline reference in bench/.
double measure_read_bandwidth(int64_t n, int repeats, int device);

}  // namespace pycurv
