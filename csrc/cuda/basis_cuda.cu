// Kernels of the CUDA basis backend (see basis_cuda.cuh for the contract).
//
// Every kernel works on the caller's stream and none synchronises the device.
// Reductions are deterministic: the grid of a kernel depends only on n, the
// number of vectors and the device, each block sums a fixed set of row tiles
// in a fixed order, and a second kernel adds the per-block partial sums of
// each column in block order.
//
// Built with PYCURV_CUDA_EMULATION (CMake: PYCURV_CUDA=EMULATE) the same file
// is compiled by the host compiler against emulation.hpp, which runs every
// thread of a block as a fiber on the CPU: the tests then check these kernels
// and this host code on machines without a GPU. The only concessions are the
// three macros below (launch, shared memory), which expand to plain CUDA.
#include "basis_cuda.cuh"

#if defined(PYCURV_CUDA_EMULATION)
#include "emulation.hpp"
#define PYCURV_LAUNCH(kernel, grid, smem, stream, ...) \
  (static_cast<void>(stream), ::pycurv::emu::launch(kernel, (grid), kThreads, (smem), __VA_ARGS__))
#define PYCURV_DYNAMIC_SHARED(T, name) T* name = ::pycurv::emu::dynamic_shared<T>()
#define PYCURV_SHARED(T, name, count) T* name = ::pycurv::emu::static_shared<T>(__LINE__, (count))
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define PYCURV_LAUNCH(kernel, grid, smem, stream, ...) kernel<<<(grid), kThreads, (smem), (stream)>>>(__VA_ARGS__)
#define PYCURV_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#define PYCURV_SHARED(T, name, count) __shared__ T name[count]
#endif

#include <algorithm>
#include <cstring>
#include <sstream>

#include "pycurv/rng.hpp"

namespace pycurv {
namespace {

constexpr int kThreads = 256;            // threads per block of every kernel
constexpr int kWarps = kThreads / 32;
constexpr size_t kTileBytes = 64 << 10;  // shared memory for one tile of the basis
constexpr int kMaxBlocksPerSm = 2048 / kThreads;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls are not blamed
    throw CudaError(std::string("pycurv: CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

std::string gib(double bytes) {
  std::ostringstream s;
  s.precision(3);
  s << bytes / double(1ull << 30) << " GiB";
  return s.str();
}

__device__ __forceinline__ double load_src(const void* src, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::F32:
      return static_cast<double>(static_cast<const float*>(src)[i]);
    case DType::F16:
      return static_cast<double>(__half2float(static_cast<const __half*>(src)[i]));
    case DType::BF16: {  // bfloat16 is the top half of a float32
      const uint32_t bits = static_cast<const uint16_t*>(src)[i];
      return static_cast<double>(__uint_as_float(bits << 16));
    }
    default:
      return static_cast<const double*>(src)[i];
  }
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // complete in lane 0
}

// Sum over the block in a fixed order (warps, then warp sums in warp order);
// complete in thread 0. `scratch` holds kWarps doubles of shared memory.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0)
    for (int i = 0; i < kWarps; ++i) s += scratch[i];
  return s;
}

double elem_vectors(DType t) {  // size of one element in units of a float64
  switch (t) {
    case DType::F32: return 0.5;
    case DType::F16:
    case DType::BF16: return 0.25;
    default: return 1.0;
  }
}

// S[i * rows + j] <- V_i[r0 + j] for i < nv, j < rows (0 beyond the m rows that
// exist), rows = 1 << shift: the block's threads read the tile of the basis
// from memory once, consecutive threads consecutive rows (coalesced).
__device__ __forceinline__ void stage_tile(double* S, const double* V, int64_t ld, int nv, int shift, int64_t r0,
                                           int m) {
  const int rows = 1 << shift;
  const int elems = nv << shift;
#pragma unroll 8
  for (int e = threadIdx.x; e < elems; e += kThreads) {
    const int i = e >> shift, j = e & (rows - 1);
    S[e] = j < m ? V[static_cast<int64_t>(i) * ld + r0 + j] : 0.0;
  }
}

// ---- the Gram-Schmidt passes ------------------------------------------------
//
// One kernel for the three passes. The rows are cut into tiles of `rows` rows
// (a power of two); block b takes tiles b, b + grid, b + 2 grid, ... For each
// tile it stages V[0:nv] (nv x rows doubles) in shared memory, reading the basis
// from memory exactly once, then
//   w    <- src (cast to float64) if src is given, else w;
//   w    <- w - V h             if update;          (each thread: its rows)
//   acc  += V^T w over the tile if dots;            (warp i: columns i, i + 8, ...)
//   norm += w^T w.
// The block's acc and norm go to partial[block * width + ...], width = nv + 1
// with dots (the norm last), 1 without.
struct OrthoArgs {
  const double* V;  // slot 0; slot i at V + i * ld
  int64_t n, ld;
  int nv;
  double* w;
  const void* src;  // the matvec output, or nullptr
  DType src_dtype;
  int64_t src_stride;
  double src_scale;  // src is read multiplied by this power of two
  const double* h;  // device, nv entries (update)
  double* partial;
  int rows, shift;  // tile rows = 1 << shift
  int64_t ntiles;
  bool update, dots;
  // Pass 3 of a fused step (nullptr: always run): run only if |h| > gate_ratio
  // sqrt(max(0, *gate_w1)), h the second pass's dots and *gate_w1 its norm^2,
  // all on the device. Every block takes the same decision; a block that
  // skips reads nothing and writes 0 for the norm and for "ran".
  const double* gate_w1;
  double gate_ratio;
};

__global__ void __launch_bounds__(kThreads) ortho_kernel(OrthoArgs a) {
  PYCURV_DYNAMIC_SHARED(double, smem);
  PYCURV_SHARED(double, warp_sums, kWarps);
  const int TR = a.rows;
  double* S = smem;                                  // nv x TR, row-major by vector
  double* wsh = S + static_cast<size_t>(a.nv) * TR;  // TR
  double* hsh = wsh + TR;                            // nv
  double* acc = hsh + a.nv;                          // nv
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (a.gate_w1) {
    double hh = 0.0;
    for (int i = 0; i < a.nv; ++i) hh += a.h[i] * a.h[i];
    if (!(sqrt(hh) > a.gate_ratio * sqrt(max(0.0, *a.gate_w1)))) {
      if (tid == 0) a.partial[2 * static_cast<size_t>(blockIdx.x)] = a.partial[2 * static_cast<size_t>(blockIdx.x) + 1] = 0.0;
      return;  // every thread of the block returns here: no barrier is left waiting
    }
  }

  for (int i = tid; i < a.nv; i += kThreads) {
    hsh[i] = a.update ? a.h[i] : 0.0;
    acc[i] = 0.0;
  }
  __syncthreads();
  const bool store = a.update || a.src != nullptr;
  double norm = 0.0;
  for (int64_t t = blockIdx.x; t < a.ntiles; t += gridDim.x) {
    const int64_t r0 = t * TR;
    const int m = static_cast<int>(min(static_cast<int64_t>(TR), a.n - r0));
    stage_tile(S, a.V, a.ld, a.nv, a.shift, r0, m);
    __syncthreads();
    for (int j = tid; j < TR; j += kThreads) {
      double x = 0.0;
      if (j < m) {
        const int64_t r = r0 + j;
        x = a.src ? a.src_scale * load_src(a.src, a.src_dtype, r * a.src_stride) : a.w[r];
        if (a.update) {
          double s = 0.0;
          for (int i = 0; i < a.nv; ++i) s += hsh[i] * S[i * TR + j];
          x -= s;
        }
        if (store) a.w[r] = x;
        norm += x * x;
      }
      wsh[j] = x;
    }
    __syncthreads();
    if (a.dots) {
      for (int i = warp; i < a.nv; i += kWarps) {
        const double* Si = S + i * TR;
        double p = 0.0;
        for (int j = lane; j < TR; j += 32) p += Si[j] * wsh[j];
        p = warp_sum(p);
        if (lane == 0) acc[i] += p;  // column i belongs to one warp: no race, fixed order
      }
    }
    __syncthreads();  // the next tile overwrites S and wsh
  }
  const double total = block_sum(norm, warp_sums);
  const int nsums = a.dots ? a.nv : 0;
  const int width = nsums + 1 + (a.gate_w1 ? 1 : 0);
  double* out = a.partial + static_cast<size_t>(blockIdx.x) * width;
  if (a.dots)
    for (int i = tid; i < a.nv; i += kThreads) out[i] = acc[i];
  if (tid == 0) {
    out[nsums] = total;
    if (a.gate_w1) out[nsums + 1] = 1.0;  // ran
  }
}

// out[c] = sum over blocks b (in order) of partial[b * width + c]; one block per column.
__global__ void __launch_bounds__(kThreads) sum_columns_kernel(const double* partial, int blocks, int width,
                                                               double* out) {
  PYCURV_SHARED(double, warp_sums, kWarps);
  const int c = blockIdx.x;
  double s = 0.0;
  for (int b = threadIdx.x; b < blocks; b += kThreads) s += partial[static_cast<size_t>(b) * width + c];
  s = block_sum(s, warp_sums);
  if (threadIdx.x == 0) out[c] = s;
}

// Y_c[r] = sum_i C[c * nold + i] V_i[r] for c < nnew. The tile of V is staged in
// shared memory before anything is written, so Y may be V itself (in place):
// a block writes only rows of the tile it has just read.
struct CombineArgs {
  const double* V;
  int64_t n, ld;
  int nold;
  const double* C;  // device, column-major nold x nnew
  int nnew;
  double* Y;
  int64_t ldy;
  int rows, shift;
  int64_t ntiles;
};

__global__ void __launch_bounds__(kThreads) combine_kernel(CombineArgs a) {
  PYCURV_DYNAMIC_SHARED(double, smem);
  double* S = smem;  // nold x TR
  const int TR = a.rows;
  const int tid = threadIdx.x;
  const int out_elems = a.nnew * TR;
  for (int64_t t = blockIdx.x; t < a.ntiles; t += gridDim.x) {
    const int64_t r0 = t * TR;
    const int m = static_cast<int>(min(static_cast<int64_t>(TR), a.n - r0));
    stage_tile(S, a.V, a.ld, a.nold, a.shift, r0, m);
    __syncthreads();
    for (int e = tid; e < out_elems; e += kThreads) {
      const int c = e >> a.shift, j = e & (TR - 1);
      if (j < m) {
        const double* Cc = a.C + static_cast<int64_t>(c) * a.nold;
        double s = 0.0;
        for (int i = 0; i < a.nold; ++i) s += Cc[i] * S[i * TR + j];
        a.Y[static_cast<int64_t>(c) * a.ldy + r0 + j] = s;
      }
    }
    __syncthreads();  // every output of this tile is written before S is reused
  }
}

__global__ void scale_kernel(double* w, int64_t n, double a) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x)
    w[r] *= a;
}

__global__ void random_normal_kernel(double* w, int64_t n, uint64_t key, int64_t offset) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x)
    w[r] = normal_at(key, static_cast<uint64_t>(offset + r));
}

__global__ void load_kernel(double* dst, int64_t n, const void* src, DType dtype, int64_t stride) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[r] = load_src(src, dtype, r * stride);
}

// partial[block] = sum over the block's rows of (scale w_r - theta y_r)^2 (fixed grid-stride order).
__global__ void __launch_bounds__(kThreads) residual_kernel(const void* src, DType dtype, int64_t stride,
                                                            double scale, const double* y, double theta, int64_t n,
                                                            double* partial) {
  PYCURV_SHARED(double, warp_sums, kWarps);
  double s = 0.0;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    const double d = scale * load_src(src, dtype, r * stride) - theta * y[r];
    s += d * d;
  }
  s = block_sum(s, warp_sums);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// partial[2 block + 0] = sum of |x_r| 2^-64 over |x_r| >= 1, partial[2 block + 1]
// = sum of |x_r| 2^64 over |x_r| < 1, over the block's rows (fixed order): a
// magnitude of x whose sums cannot under- or overflow (see CudaBasis::magnitude).
__global__ void __launch_bounds__(kThreads) magnitude_kernel(const void* src, DType dtype, int64_t stride,
                                                             int64_t n, double* partial) {
  PYCURV_SHARED(double, warp_sums, kWarps);
  double big = 0.0, small = 0.0;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    const double a = fabs(load_src(src, dtype, r * stride));
    if (a >= 1.0) {
      big += a * 0x1p-64;
    } else {  // NaN lands here: both sums must stay finite for a finite x
      small += a * 0x1p64;
    }
  }
  big = block_sum(big, warp_sums);
  __syncthreads();  // warp_sums is reused
  small = block_sum(small, warp_sums);
  if (threadIdx.x == 0) {
    partial[2 * static_cast<size_t>(blockIdx.x)] = big;
    partial[2 * static_cast<size_t>(blockIdx.x) + 1] = small;
  }
}

// The roofline reference: one pass over x at the best the memory allows (four
// independent loads in flight per thread, every block resident at once).
__global__ void __launch_bounds__(kThreads) read_kernel(const double* x, int64_t n, double* partial) {
  PYCURV_SHARED(double, warp_sums, kWarps);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  for (; i + 3 * stride < n; i += 4 * stride) {
    s0 += x[i];
    s1 += x[i + stride];
    s2 += x[i + 2 * stride];
    s3 += x[i + 3 * stride];
  }
  for (; i < n; i += stride) s0 += x[i];
  const double s = block_sum((s0 + s1) + (s2 + s3), warp_sums);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

int elementwise_grid(int64_t n, int sms) {
  const int64_t need = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(need, 8 * static_cast<int64_t>(sms))));
}

}  // namespace

// ---- CudaBasis ----------------------------------------------------------------

CudaBasis::CudaBasis(int64_t n, int nslots, int nritz, int device, CUstream_st* stream, bool host_basis)
    : n_(n), ld_((n + 31) / 32 * 32), nslots_(nslots), nritz_(nritz), device_(device), stream_(stream),
      host_basis_(host_basis) {
  if (n < 1 || nslots < 1 || nritz < 0) throw std::invalid_argument("CudaBasis: bad sizes");
  ScopedDevice guard(device);
  int v = 0;
  check(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  smem_optin_ = static_cast<size_t>(v);
  check(cudaDeviceGetAttribute(&v, cudaDevAttrMemoryPoolsSupported, device), "cudaDeviceGetAttribute");
  pools_ = v != 0;

  // Kernels may use dynamic shared memory up to the device's opt-in limit.
  cudaFuncAttributes fa{};
  check(cudaFuncGetAttributes(&fa, ortho_kernel), "cudaFuncGetAttributes");
  ortho_limit_ = smem_optin_ - fa.sharedSizeBytes;
  check(cudaFuncSetAttribute(ortho_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(ortho_limit_)),
        "cudaFuncSetAttribute");
  check(cudaFuncGetAttributes(&fa, combine_kernel), "cudaFuncGetAttributes");
  combine_limit_ = smem_optin_ - fa.sharedSizeBytes;
  check(cudaFuncSetAttribute(combine_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(combine_limit_)),
        "cudaFuncSetAttribute");
  ortho_tiles_.resize(nslots + 1);
  combine_tiles_.resize(nslots + 1);
  ortho_tile(nslots);  // throws now if one row of the widest pass does not fit

  try {
    const size_t basis_bytes = sizeof(double) * static_cast<size_t>(ld_) * nslots;
    const size_t ritz_bytes = sizeof(double) * static_cast<size_t>(ld_) * nritz;
    if (host_basis_) {
      void* p = nullptr;
      const cudaError_t err = cudaHostAlloc(&p, basis_bytes + ritz_bytes, cudaHostAllocMapped | cudaHostAllocPortable);
      if (err != cudaSuccess) {
        cudaGetLastError();
        throw DeviceMemoryError("pycurv: cannot allocate " + std::to_string(basis_bytes + ritz_bytes) + " bytes (" +
                                    gib(double(basis_bytes + ritz_bytes)) +
                                    ") of pinned host memory for the Krylov basis (" + std::to_string(nslots) +
                                    " vectors of n=" + std::to_string(n) +
                                    " float64): pass a smaller ncv (memory grows linearly with it)",
                                basis_bytes + ritz_bytes);
      }
      host_alloc_ = p;
      void* dev = nullptr;
      check(cudaHostGetDevicePointer(&dev, p, 0), "cudaHostGetDevicePointer");
      basis_ = static_cast<double*>(dev);
      ritz_ = nritz > 0 ? basis_ + static_cast<size_t>(ld_) * nslots : nullptr;
    } else {
      basis_ = alloc_device(basis_bytes, "the Krylov basis");
      ritz_ = nritz > 0 ? alloc_device(ritz_bytes, "the Ritz vectors") : nullptr;
    }
    partial_cap_ = static_cast<size_t>(kMaxBlocksPerSm) * sms_ * (nslots + 2);
    partial_ = alloc_device(sizeof(double) * partial_cap_, "partial sums");
    sums_dev_ = alloc_device(sizeof(double) * (2 * static_cast<size_t>(nslots) + 4), "sums");
    coef_cap_ = static_cast<size_t>(nslots) * nslots + 2;
    coef_dev_ = alloc_device(sizeof(double) * coef_cap_, "coefficients");
    void* p = nullptr;
    check(cudaMallocHost(&p, sizeof(double) * (2 * static_cast<size_t>(nslots) + 4)), "cudaMallocHost");
    sums_host_ = static_cast<double*>(p);
    check(cudaMallocHost(&p, sizeof(double) * coef_cap_), "cudaMallocHost");
    coef_host_ = static_cast<double*>(p);
    cudaEvent_t ev = nullptr;
    check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
    coef_ready_ = ev;
  } catch (...) {
    release();
    throw;
  }
}

CudaBasis::~CudaBasis() {
  ScopedDevice guard(device_, std::nothrow);
  release();
}

void CudaBasis::release() {
  if (host_basis_) {
    if (host_alloc_) {
      cudaStreamSynchronize(stream_);  // kernels may still read the mapped memory
      cudaFreeHost(host_alloc_);
      host_alloc_ = nullptr;
    }
  } else {
    free_device(basis_);
    free_device(ritz_);
  }
  basis_ = ritz_ = nullptr;
  free_device(partial_);
  free_device(sums_dev_);
  free_device(coef_dev_);
  free_device(scratch_[0]);
  free_device(scratch_[1]);
  partial_ = sums_dev_ = coef_dev_ = scratch_[0] = scratch_[1] = nullptr;
  if (coef_ready_) {
    cudaEventSynchronize(coef_ready_);  // the staging buffer may still be read by a copy
    cudaEventDestroy(coef_ready_);
    coef_ready_ = nullptr;
  }
  if (sums_host_) cudaFreeHost(sums_host_);
  if (coef_host_) cudaFreeHost(coef_host_);
  sums_host_ = coef_host_ = nullptr;
  cudaGetLastError();
}

double* CudaBasis::alloc_device(size_t bytes, const char* what) {
  if (bytes == 0) bytes = sizeof(double);
  void* p = nullptr;
  // Stream-ordered allocation where the device supports it: no implicit
  // device-wide synchronisation at allocation or release.
  cudaError_t err = pools_ ? cudaMallocAsync(&p, bytes, stream_) : cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    cudaGetLastError();
    std::ostringstream s;
    s << "pycurv: cannot allocate " << what << " on cuda:" << device_ << ": " << bytes << " bytes ("
      << gib(double(bytes)) << ") for " << nslots_ << " basis vectors of n=" << n_
      << " float64 (8 n (ncv + 1) bytes in all, plus the Ritz vectors), with " << gib(double(free_b)) << " free of "
      << gib(double(total_b)) << " (" << cudaGetErrorString(err)
      << "); pass a smaller ncv, or host_basis=True to keep the basis in pinned host memory (slower: the kernels "
         "then read it over the bus). The basis comes from CUDA's own memory pool, outside PyTorch's caching "
         "allocator and JAX's preallocation: torch.cuda.empty_cache() returns what torch has cached unused, and "
         "XLA_PYTHON_CLIENT_PREALLOCATE=false (set before JAX starts) stops JAX from taking 75% of the memory";
    throw DeviceMemoryError(s.str(), bytes);
  }
  device_bytes_ += bytes;
  return static_cast<double*>(p);
}

void CudaBasis::free_device(double* p) {
  if (!p) return;
  if (!pools_ || cudaFreeAsync(p, stream_) != cudaSuccess) {
    cudaGetLastError();
    cudaFree(p);
  }
}

double* CudaBasis::scratch(int which) {
  if (which < 0 || which > 1) throw std::invalid_argument("CudaBasis::scratch: index 0 or 1");
  if (!scratch_[which]) scratch_[which] = alloc_device(sizeof(double) * static_cast<size_t>(ld_), "a work vector");
  return scratch_[which];
}

// Tile rows: the largest power of two up to kThreads whose tile of the basis
// fits in kTileBytes (several blocks per multiprocessor, to keep enough loads in
// flight) and in the device's shared memory. Grid: as many blocks as can be
// resident at once. Both depend only on (n, nv, device): the reductions' order
// is fixed. Cached per nv, since the occupancy query costs host time.
const CudaBasis::Tile& CudaBasis::ortho_tile(int nv) {
  Tile& t = ortho_tiles_.at(nv);
  if (t.grid > 0) return t;
  auto bytes = [nv](int rows) { return sizeof(double) * (static_cast<size_t>(nv) * rows + rows + 2 * static_cast<size_t>(nv)); };
  int rows = kThreads, shift = 8;
  while (rows > 1 && (sizeof(double) * static_cast<size_t>(nv) * rows > kTileBytes || bytes(rows) > ortho_limit_)) {
    rows >>= 1;
    --shift;
  }
  if (bytes(rows) > ortho_limit_)
    throw std::invalid_argument("pycurv: ncv=" + std::to_string(nslots_ - 1) +
                                " is too large for the CUDA backend on this device (one row of the basis must fit in " +
                                std::to_string(ortho_limit_) + " bytes of shared memory); pass a smaller ncv");
  const size_t smem = bytes(rows);
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ortho_kernel, kThreads, smem), "cudaOccupancy");
  const int64_t ntiles = (n_ + rows - 1) / rows;
  t.rows = rows;
  t.shift = shift;
  t.smem = smem;
  // At most kMaxBlocksPerSm per multiprocessor: the partial-sum buffer is sized for that.
  const int64_t resident = static_cast<int64_t>(std::min(std::max(per_sm, 1), kMaxBlocksPerSm)) * sms_;
  t.grid = static_cast<int>(std::min<int64_t>(ntiles, resident));
  return t;
}

const CudaBasis::Tile& CudaBasis::combine_tile(int nold) {
  Tile& t = combine_tiles_.at(nold);
  if (t.grid > 0) return t;
  auto bytes = [nold](int rows) { return sizeof(double) * static_cast<size_t>(nold) * rows; };
  int rows = kThreads, shift = 8;
  while (rows > 1 && (bytes(rows) > kTileBytes || bytes(rows) > combine_limit_)) {
    rows >>= 1;
    --shift;
  }
  if (bytes(rows) > combine_limit_)
    throw std::invalid_argument("pycurv: ncv is too large for the CUDA backend's shared memory; pass a smaller ncv");
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, combine_kernel, kThreads, bytes(rows)),
        "cudaOccupancy");
  const int64_t ntiles = (n_ + rows - 1) / rows;
  t.rows = rows;
  t.shift = shift;
  t.smem = bytes(rows);
  // At most kMaxBlocksPerSm per multiprocessor: the partial-sum buffer is sized for that.
  const int64_t resident = static_cast<int64_t>(std::min(std::max(per_sm, 1), kMaxBlocksPerSm)) * sms_;
  t.grid = static_cast<int>(std::min<int64_t>(ntiles, resident));
  return t;
}

const double* CudaBasis::upload(const double* host, size_t count) {
  if (count > coef_cap_) throw std::logic_error("CudaBasis::upload: too many coefficients");
  if (count == 0) return coef_dev_;
  // The previous upload's copy must have left the staging buffer before it is rewritten.
  check(cudaEventSynchronize(coef_ready_), "cudaEventSynchronize");
  std::memcpy(coef_host_, host, sizeof(double) * count);
  check(cudaMemcpyAsync(coef_dev_, coef_host_, sizeof(double) * count, cudaMemcpyHostToDevice, stream_),
        "cudaMemcpyAsync (coefficients)");
  check(cudaEventRecord(coef_ready_, stream_), "cudaEventRecord");
  return coef_dev_;
}

void CudaBasis::reduce_partials(int width, int blocks, double* dst) {
  PYCURV_LAUNCH(sum_columns_kernel, width, 0, stream_, partial_, blocks, width, dst);
  check(cudaGetLastError(), "sum_columns_kernel launch");
}

void CudaBasis::fetch_sums(int count, double* out) {
  check(cudaMemcpyAsync(sums_host_, sums_dev_, sizeof(double) * count, cudaMemcpyDeviceToHost, stream_),
        "cudaMemcpyAsync (sums)");
  check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (after a reduction)");
  std::memcpy(out, sums_host_, sizeof(double) * count);
}

void CudaBasis::download_sums(int width, int blocks, double* out) {
  reduce_partials(width, blocks, sums_dev_);
  fetch_sums(width, out);
}

void CudaBasis::set_source_format(DType dtype, int64_t stride) {
  src_dtype_ = dtype;
  src_stride_ = stride;
}

namespace {
void launch_ortho(const OrthoArgs& a, int grid, size_t smem, CUstream_st* stream) {
  PYCURV_LAUNCH(ortho_kernel, grid, smem, stream, a);
  check(cudaGetLastError(), "ortho_kernel launch");
}
}  // namespace

void CudaBasis::dots(const double* src, int w, int nv, double* out) {
  count(nv + 1 + (src ? 1.0 + elem_vectors(src_dtype_) : 0.0));  // V and w read; src read and w written
  const Tile& t = ortho_tile(nv);
  OrthoArgs a{slot(0), n_, ld_, nv, slot(w), src, src_dtype_, src_stride_, src_scale_, nullptr, partial_,
              t.rows, t.shift, (n_ + t.rows - 1) / t.rows, false, true, nullptr, 0.0};
  launch_ortho(a, t.grid, t.smem, stream_);
  download_sums(nv + 1, t.grid, out);
}

void CudaBasis::update_dots(int w, int nv, const double* h, double* out) {
  count(nv + 2);  // V read once (staged for the second half), w read and written
  const double* hd = upload(h, nv);
  const Tile& t = ortho_tile(nv);
  OrthoArgs a{slot(0), n_, ld_, nv, slot(w), nullptr, DType::F64, 1, 1.0, hd, partial_,
              t.rows, t.shift, (n_ + t.rows - 1) / t.rows, true, true, nullptr, 0.0};
  launch_ortho(a, t.grid, t.smem, stream_);
  download_sums(nv + 1, t.grid, out);
}

void CudaBasis::update_norm(int w, int nv, const double* h, double* out) {
  count(nv + 2);
  const double* hd = upload(h, nv);
  const Tile& t = ortho_tile(nv);
  OrthoArgs a{slot(0), n_, ld_, nv, slot(w), nullptr, DType::F64, 1, 1.0, hd, partial_,
              t.rows, t.shift, (n_ + t.rows - 1) / t.rows, true, false, nullptr, 0.0};
  launch_ortho(a, t.grid, t.smem, stream_);
  download_sums(1, t.grid, out);
}

void CudaBasis::ortho_fused(const double* src, int w, int nv, double pass3_ratio, double* out) {
  if (nv < 1) throw std::logic_error("CudaBasis::ortho_fused: needs at least one basis vector");
  const Tile& t = ortho_tile(nv);
  const int64_t ntiles = (n_ + t.rows - 1) / t.rows;
  const int width = nv + 1;
  double* p1 = sums_dev_;          // <V_i, w>, <w, w>
  double* p2 = sums_dev_ + width;  // the same after w -= V p1
  double* p3 = p2 + width;         // <w, w> after w -= V p2 (if it ran), ran
  count(nv + 1 + (src ? 1.0 + elem_vectors(src_dtype_) : 0.0));
  OrthoArgs a1{slot(0), n_, ld_, nv, slot(w), src, src_dtype_, src_stride_, src_scale_, nullptr, partial_,
               t.rows, t.shift, ntiles, false, true, nullptr, 0.0};
  launch_ortho(a1, t.grid, t.smem, stream_);
  reduce_partials(width, t.grid, p1);
  count(nv + 2);
  OrthoArgs a2{slot(0), n_, ld_, nv, slot(w), nullptr, DType::F64, 1, 1.0, p1, partial_,
               t.rows, t.shift, ntiles, true, true, nullptr, 0.0};
  launch_ortho(a2, t.grid, t.smem, stream_);
  reduce_partials(width, t.grid, p2);
  OrthoArgs a3{slot(0), n_, ld_, nv, slot(w), nullptr, DType::F64, 1, 1.0, p2, partial_,
               t.rows, t.shift, ntiles, true, false, p2 + nv, pass3_ratio};
  launch_ortho(a3, t.grid, t.smem, stream_);
  reduce_partials(2, t.grid, p3);
  fetch_sums(2 * width + 2, out);  // the step's one wait
  if (out[2 * width + 1] > 0.0) {
    out[2 * width + 1] = 1.0;
    count(nv + 2);
  }
}

void CudaBasis::scale(int w, double a) {
  count(2);
  PYCURV_LAUNCH(scale_kernel, elementwise_grid(n_, sms_), 0, stream_, slot(w), n_, a);
  check(cudaGetLastError(), "scale_kernel launch");
}

void CudaBasis::random_normal(int w, uint64_t key, int64_t offset) {
  count(1);
  PYCURV_LAUNCH(random_normal_kernel, elementwise_grid(n_, sms_), 0, stream_, slot(w), n_, key, offset);
  check(cudaGetLastError(), "random_normal_kernel launch");
}

void CudaBasis::combine(int nold, const double* C, int nnew) {
  count(nold + nnew);
  const double* Cd = upload(C, static_cast<size_t>(nold) * nnew);
  const Tile& t = combine_tile(nold);
  CombineArgs a{slot(0), n_, ld_, nold, Cd, nnew, slot(0), ld_, t.rows, t.shift, (n_ + t.rows - 1) / t.rows};
  PYCURV_LAUNCH(combine_kernel, t.grid, t.smem, stream_, a);
  check(cudaGetLastError(), "combine_kernel launch");
}

void CudaBasis::ritz_vector(int nold, const double* s, int r) {
  count(nold + 1);
  const double* sd = upload(s, nold);
  const Tile& t = combine_tile(nold);
  CombineArgs a{slot(0), n_, ld_, nold, sd, 1, ritz(r), ld_, t.rows, t.shift, (n_ + t.rows - 1) / t.rows};
  PYCURV_LAUNCH(combine_kernel, t.grid, t.smem, stream_, a);
  check(cudaGetLastError(), "combine_kernel launch");
}

void CudaBasis::residual(const double* w, int r, double theta, double* out) {
  count(1.0 + elem_vectors(src_dtype_));
  const int grid = elementwise_grid(n_, sms_);
  PYCURV_LAUNCH(residual_kernel, grid, 0, stream_, w, src_dtype_, src_stride_, src_scale_, ritz(r), theta, n_,
                partial_);
  check(cudaGetLastError(), "residual_kernel launch");
  download_sums(1, grid, out);
}

void CudaBasis::magnitude(const double* src, int w, double* out) {
  const bool ext = src != nullptr;
  count(ext ? elem_vectors(src_dtype_) : 1.0);
  const int grid = elementwise_grid(n_, sms_);
  PYCURV_LAUNCH(magnitude_kernel, grid, 0, stream_, ext ? static_cast<const void*>(src) : slot(w),
                ext ? src_dtype_ : DType::F64, ext ? src_stride_ : int64_t(1), n_, partial_);
  check(cudaGetLastError(), "magnitude_kernel launch");
  download_sums(2, grid, out);
}

void CudaBasis::load_vector(double* dst, const void* src, DType dtype, int64_t stride) {
  PYCURV_LAUNCH(load_kernel, elementwise_grid(n_, sms_), 0, stream_, dst, n_, src, dtype, stride);
  check(cudaGetLastError(), "load_kernel launch");
}

void CudaBasis::copy(void* dst, const void* src, size_t bytes) {
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_), "cudaMemcpyAsync");
}

void CudaBasis::synchronize() { check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

// ---- device utilities -----------------------------------------------------------

std::vector<DeviceInfo> cuda_devices(std::string* error) {
  std::vector<DeviceInfo> out;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    if (error) *error = cudaGetErrorString(err);
    return out;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p{};
    err = cudaGetDeviceProperties(&p, i);
    if (err != cudaSuccess) {
      cudaGetLastError();
      if (error) *error = cudaGetErrorString(err);
      continue;
    }
    out.push_back(DeviceInfo{i, p.name, p.totalGlobalMem, p.major, p.minor, p.multiProcessorCount});
  }
  if (out.empty() && error && error->empty()) *error = "no CUDA device is visible";
  return out;
}

namespace {
std::string version_string(int v) {
  if (v <= 0) return "none";
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}
}  // namespace

std::string cuda_runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) cudaGetLastError();
  return version_string(v);
}

std::string cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) cudaGetLastError();
  return version_string(v);
}

namespace {
bool same_stream(CUstream_st* a, CUstream_st* b) {
  // 0 and cudaStreamLegacy (1) both name the legacy default stream.
  auto canon = [](CUstream_st* s) { return s == nullptr ? reinterpret_cast<CUstream_st*>(1) : s; };
  return canon(a) == canon(b);
}
}  // namespace

void stream_wait(int device, CUstream_st* producer, CUstream_st* consumer) {
  if (same_stream(producer, consumer)) return;
  ScopedDevice guard(device);
  cudaEvent_t ev = nullptr;
  check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
  cudaError_t err = cudaEventRecord(ev, producer);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(consumer, ev, 0);
  cudaEventDestroy(ev);  // released once the wait is satisfied
  check(err, "cudaStreamWaitEvent");
}

void stream_sync(int device, CUstream_st* stream) {
  ScopedDevice guard(device);
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

int pointer_device(const void* p) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();
    return -2;
  }
  switch (attr.type) {
    case cudaMemoryTypeDevice:
    case cudaMemoryTypeManaged:
      return attr.device;
    case cudaMemoryTypeHost:
    case cudaMemoryTypeUnregistered:
      return -1;
    default:
      return -2;
  }
}

ScopedDevice::ScopedDevice(int device) {
  int cur = -1;
  if (cudaGetDevice(&cur) != cudaSuccess) {
    cudaGetLastError();
    cur = -1;
  }
  if (cur != device) {
    check(cudaSetDevice(device), "cudaSetDevice");
    previous_ = cur;
  }
}

ScopedDevice::ScopedDevice(int device, const std::nothrow_t&) noexcept {
  int cur = -1;
  if (cudaGetDevice(&cur) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  if (cur != device) {
    if (cudaSetDevice(device) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    previous_ = cur;
  }
}

ScopedDevice::~ScopedDevice() {
  if (previous_ >= 0 && cudaSetDevice(previous_) != cudaSuccess) cudaGetLastError();
}

void* device_alloc(int device, size_t bytes) {
  ScopedDevice guard(device);
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes ? bytes : 1);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw DeviceMemoryError("pycurv: cannot allocate " + std::to_string(bytes) + " bytes (" + gib(double(bytes)) +
                                ") on cuda:" + std::to_string(device) + " for the eigenvectors: " +
                                cudaGetErrorString(err),
                            bytes);
  }
  return p;
}

void device_free(int device, void* p) noexcept {
  if (!p) return;
  ScopedDevice guard(device, std::nothrow);
  if (cudaFree(p) != cudaSuccess) cudaGetLastError();
}

void device_sync(int device) {
  ScopedDevice guard(device);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

void copy_to_host(int device, void* dst, const void* src, size_t bytes) {
  ScopedDevice guard(device);
  check(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "cudaMemcpy (to host)");
}

void copy_to_device(int device, void* dst, const void* src, size_t bytes) {
  ScopedDevice guard(device);
  check(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "cudaMemcpy (to device)");
}

IntervalTimer::~IntervalTimer() {
  if (start_) cudaEventDestroy(start_);
  if (stop_) cudaEventDestroy(stop_);
  cudaGetLastError();
}

void IntervalTimer::begin(CUstream_st* stream) {
  harvest(false);
  if (!start_) {
    cudaEvent_t a = nullptr, b = nullptr;
    check(cudaEventCreate(&a), "cudaEventCreate");
    check(cudaEventCreate(&b), "cudaEventCreate");
    start_ = a;
    stop_ = b;
  }
  check(cudaEventRecord(start_, stream), "cudaEventRecord");
  open_ = true;
}

void IntervalTimer::end(CUstream_st* stream) {
  if (!open_) return;
  check(cudaEventRecord(stop_, stream), "cudaEventRecord");
  open_ = false;
  pending_ = true;
}

void IntervalTimer::harvest(bool wait) {
  if (!pending_) return;
  // After the reductions that follow a matvec the stream has passed stop_;
  // waiting here is then free. Only seconds() at the very end may wait.
  if (wait || cudaEventQuery(stop_) != cudaSuccess) {
    cudaGetLastError();
    check(cudaEventSynchronize(stop_), "cudaEventSynchronize");
  }
  float ms = 0.0f;
  check(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
  total_ += 1e-3 * ms;
  pending_ = false;
}

double IntervalTimer::seconds() {
  harvest(true);
  return total_;
}

double measure_read_bandwidth(int64_t n, int repeats, int device) {
  ScopedDevice guard(device);
  int sms = 1;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const int grid = kMaxBlocksPerSm * sms;
  void* x = nullptr;
  void* partial = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  double best = 0.0;
  cudaError_t err = cudaMalloc(&x, sizeof(double) * static_cast<size_t>(n));
  if (err == cudaSuccess) err = cudaMalloc(&partial, sizeof(double) * grid);
  if (err == cudaSuccess) err = cudaEventCreate(&e0);
  if (err == cudaSuccess) err = cudaEventCreate(&e1);
  if (err == cudaSuccess) {
    PYCURV_LAUNCH(random_normal_kernel, grid, 0, nullptr, static_cast<double*>(x), n, uint64_t(1), int64_t(0));
    for (int i = 0; err == cudaSuccess && i < std::max(repeats, 1) + 1; ++i) {  // the first pass warms up
      cudaEventRecord(e0, nullptr);
      PYCURV_LAUNCH(read_kernel, grid, 0, nullptr, static_cast<const double*>(x), n, static_cast<double*>(partial));
      cudaEventRecord(e1, nullptr);
      err = cudaEventSynchronize(e1);
      float ms = 0.0f;
      if (err == cudaSuccess) err = cudaEventElapsedTime(&ms, e0, e1);
      if (err == cudaSuccess && i > 0 && ms > 0) best = std::max(best, 8.0 * static_cast<double>(n) / (1e-3 * ms));
    }
  }
  if (e0) cudaEventDestroy(e0);
  if (e1) cudaEventDestroy(e1);
  if (partial) cudaFree(partial);
  if (x) cudaFree(x);
  check(err, "measure_read_bandwidth");
  return best;
}

#if defined(PYCURV_CUDA_EMULATION)
uint64_t emulated_host_syncs() { return emu::world().host_syncs; }
#endif

}  // namespace pycurv
