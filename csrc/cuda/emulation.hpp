// A CPU emulation of the part of CUDA that basis_cuda.cu uses, so that the CUDA
// backend (kernels, host code, binding) can be built and tested on machines
// without a GPU: CMake PYCURV_CUDA=EMULATE compiles basis_cuda.cu with the host
// compiler and this header instead of the CUDA toolkit.
//
// Every thread of a block is a fiber on one CPU thread. A fiber runs until it
// reaches __syncthreads() or a warp shuffle; then the next one runs. When all
// threads of the block (or all lanes of the warp) wait, they are released. The
// order in which fibers run is shuffled at every barrier, so a missing barrier
// shows up as a wrong or non-reproducible result. The emulation is strict where
// CUDA leaves behaviour undefined: a barrier not reached by every thread, a
// shuffle not reached by every lane, shared memory beyond the launch's size and
// writes past the end of a device allocation are reported as errors.
//
// Device memory is host memory (filled with NaN when allocated, so reading what
// was never written shows), with a canary after each allocation that every
// synchronisation checks. Streams and events are no-ops: everything is
// synchronous. The emulated device is configured by environment variables:
//   PYCURV_EMULATE_DEVICES  number of devices (default 1; 0: none visible)
//   PYCURV_EMULATE_SMS      multiprocessors (default 4)
//   PYCURV_EMULATE_SMEM     opt-in shared memory per block in bytes (default 101376)
//   PYCURV_EMULATE_MEMORY   device memory in bytes (default 4 GiB)
// Only x86-64 is supported (the fiber switch is eight instructions of assembly).
#pragma once

#if !defined(__x86_64__)
#error "the CUDA emulation (PYCURV_CUDA=EMULATE) supports x86-64 only"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)

using std::max;
using std::min;

// ---- runtime API types -------------------------------------------------------------

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoDevice = 100,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
};
typedef CUstream_st* cudaStream_t;
typedef CUevent_st* cudaEvent_t;
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice,
                      cudaMemcpyDefault };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMemoryPoolsSupported,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2,
                      cudaMemoryTypeManaged = 3 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
};
struct cudaPointerAttributes {
  cudaMemoryType type = cudaMemoryTypeUnregistered;
  int device = 0;
  void* devicePointer = nullptr;
  void* hostPointer = nullptr;
};
struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  int major, minor;
  int multiProcessorCount;
};
constexpr unsigned cudaHostAllocMapped = 2, cudaHostAllocPortable = 1, cudaEventDisableTiming = 2;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct __half {
  uint16_t bits;
};

struct CUevent_st {
  bool recorded = false;
};

namespace pycurv {
namespace emu {

// ---- state -----------------------------------------------------------------------------

enum class FiberState { Run, BlockWait, WarpWait, Done };

struct Fiber {
  void* sp = nullptr;
  unsigned tid = 0;
  FiberState state = FiberState::Run;
};

struct Allocation {
  size_t bytes;
  bool device;
};

constexpr size_t kCanary = 64;
constexpr unsigned char kCanaryByte = 0xA5;
constexpr size_t kFiberStack = 64 << 10;

struct World {
  // launch
  dim3 block_idx, block_dim, grid_dim;
  Fiber* current = nullptr;
  void* sched_sp = nullptr;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<double> warp_slots;
  std::vector<unsigned char> dyn_smem;
  size_t dyn_bytes = 0;
  std::map<int, std::vector<unsigned char>> static_smem;
  uint64_t rng = 0x9E3779B97F4A7C15ull;
  // runtime
  cudaError_t last_error = cudaSuccess;
  int device = 0;
  std::map<const void*, size_t> func_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize
  std::map<uintptr_t, Allocation> allocations;
  size_t device_bytes = 0;
  // Host waits on the device: stream, event and device synchronisations and
  // synchronous copies (each a stall of the host on a real GPU).
  uint64_t host_syncs = 0;
};

inline World& world() {
  static World w;
  return w;
}

inline long env_long(const char* name, long fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtol(v, nullptr, 10) : fallback;
}
inline int device_count() { return static_cast<int>(env_long("PYCURV_EMULATE_DEVICES", 1)); }
inline int sms() { return static_cast<int>(std::max(1L, env_long("PYCURV_EMULATE_SMS", 4))); }
inline size_t smem_optin() { return static_cast<size_t>(std::max(1024L, env_long("PYCURV_EMULATE_SMEM", 101376))); }
inline size_t memory_bytes() { return static_cast<size_t>(env_long("PYCURV_EMULATE_MEMORY", 4L << 30)); }

inline cudaError_t fail(cudaError_t e) {
  world().last_error = e;
  return e;
}

// ---- fibers ----------------------------------------------------------------------------

extern "C" void pycurv_emu_switch(void** save_sp, void* load_sp);
__asm__(
    ".text\n"
    ".globl pycurv_emu_switch\n"
    ".hidden pycurv_emu_switch\n"
    ".type pycurv_emu_switch,@function\n"
    "pycurv_emu_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size pycurv_emu_switch, .-pycurv_emu_switch\n");

inline void yield_to_scheduler() {
  World& w = world();
  pycurv_emu_switch(&w.current->sp, w.sched_sp);
}

[[noreturn]] inline void fiber_entry() {
  World& w = world();
  try {
    (*w.body)();
  } catch (...) {
    if (!w.error) w.error = std::current_exception();
  }
  w.current->state = FiberState::Done;
  yield_to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

inline void* fresh_stack(char* base) {
  auto top = reinterpret_cast<uintptr_t>(base + kFiberStack) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                            // return address of fiber_entry (never used)
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);     // where the first switch returns to
  for (int i = 0; i < 6; ++i) *--sp = 0;                // rbp, rbx, r12-r15
  return sp;
}

inline uint64_t next_random() {
  uint64_t& x = world().rng;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return x;
}

[[noreturn]] inline void launch_error(const std::string& what) {
  world().last_error = cudaErrorLaunchFailure;
  throw std::runtime_error("pycurv CUDA emulation: " + what);
}

inline void run_block(unsigned threads) {
  World& w = world();
  if (w.stacks.size() < threads) {
    while (w.stacks.size() < threads) w.stacks.emplace_back(new char[kFiberStack]);
  }
  w.fibers.assign(threads, Fiber{});
  w.warp_slots.assign(threads, 0.0);
  w.static_smem.clear();
  w.dyn_smem.assign(w.dyn_bytes + kCanary, 0xFF);  // NaN until written
  std::fill(w.dyn_smem.end() - kCanary, w.dyn_smem.end(), kCanaryByte);
  for (unsigned t = 0; t < threads; ++t) {
    w.fibers[t].tid = t;
    w.fibers[t].sp = fresh_stack(w.stacks[t].get());
  }
  std::vector<unsigned> order(threads);
  for (;;) {
    // Run every runnable fiber, in a random order, until it waits or finishes.
    order.clear();
    for (unsigned t = 0; t < threads; ++t)
      if (w.fibers[t].state == FiberState::Run) order.push_back(t);
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[next_random() % i]);
    for (unsigned t : order) {
      w.current = &w.fibers[t];
      pycurv_emu_switch(&w.sched_sp, w.fibers[t].sp);
    }
    w.current = nullptr;
    if (w.error) std::rethrow_exception(w.error);
    unsigned done = 0, block_wait = 0;
    bool released = false;
    for (unsigned t = 0; t < threads; ++t) {
      done += w.fibers[t].state == FiberState::Done;
      block_wait += w.fibers[t].state == FiberState::BlockWait;
    }
    if (done == threads) break;
    for (unsigned w0 = 0; w0 < threads; w0 += 32) {
      unsigned waiting = 0;
      for (unsigned t = w0; t < std::min(w0 + 32, threads); ++t) waiting += w.fibers[t].state == FiberState::WarpWait;
      if (waiting == 0) continue;
      if (waiting != std::min(32u, threads - w0))
        launch_error("a warp shuffle was not reached by every lane of warp " + std::to_string(w0 / 32));
      for (unsigned t = w0; t < std::min(w0 + 32, threads); ++t) w.fibers[t].state = FiberState::Run;
      released = true;
    }
    if (released) continue;
    if (block_wait != threads)
      launch_error("__syncthreads() was not reached by every thread of block " + std::to_string(w.block_idx.x) + " (" +
                   std::to_string(done) + " of " + std::to_string(threads) + " threads had finished)");
    for (Fiber& f : w.fibers) f.state = FiberState::Run;
  }
  if (!std::all_of(w.dyn_smem.end() - kCanary, w.dyn_smem.end(), [](unsigned char c) { return c == kCanaryByte; }))
    launch_error("a kernel wrote past the end of its dynamic shared memory");
}

template <class Kernel, class... Args>
void launch(Kernel kernel, int grid, int threads, size_t smem, Args... args) {
  World& w = world();
  if (grid < 1 || threads < 1 || threads > 1024 || threads % 32 != 0) {
    fail(cudaErrorInvalidConfiguration);
    return;
  }
  const auto it = w.func_smem.find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = it != w.func_smem.end() ? it->second : size_t(48) << 10;
  if (smem > allowed) {  // CUDA refuses the launch
    fail(cudaErrorInvalidValue);
    return;
  }
  const std::function<void()> body = [&]() { kernel(args...); };
  w.body = &body;
  w.error = nullptr;
  w.block_dim = dim3{static_cast<unsigned>(threads), 1, 1};
  w.grid_dim = dim3{static_cast<unsigned>(grid), 1, 1};
  w.dyn_bytes = smem;
  try {
    for (int b = 0; b < grid; ++b) {
      w.block_idx = dim3{static_cast<unsigned>(b), 1, 1};
      run_block(static_cast<unsigned>(threads));
    }
  } catch (...) {
    w.body = nullptr;
    if (w.last_error == cudaSuccess) w.last_error = cudaErrorLaunchFailure;
    throw;
  }
  w.body = nullptr;
}

template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(world().dyn_smem.data());
}

template <class T>
T* static_shared(int key, size_t count) {
  auto& slot = world().static_smem[key];
  if (slot.empty()) slot.assign(sizeof(T) * count, 0xFF);
  return reinterpret_cast<T*>(slot.data());
}

inline dim3 thread_index() { return dim3{world().current->tid, 1, 1}; }

// ---- device memory ----------------------------------------------------------------------

inline void* allocate(size_t bytes, bool device) {
  World& w = world();
  if (device && w.device_bytes + bytes > memory_bytes()) return nullptr;
  const size_t total = (bytes + kCanary + 255) / 256 * 256;
  auto* p = static_cast<unsigned char*>(std::aligned_alloc(256, total));
  if (!p) return nullptr;
  std::memset(p, 0xFF, bytes);  // NaN: reads of what was never written show
  std::memset(p + bytes, kCanaryByte, kCanary);
  w.allocations[reinterpret_cast<uintptr_t>(p)] = Allocation{bytes, device};
  if (device) w.device_bytes += bytes;
  return p;
}

inline bool canary_intact(uintptr_t base, const Allocation& a) {
  const auto* c = reinterpret_cast<const unsigned char*>(base + a.bytes);
  return std::all_of(c, c + kCanary, [](unsigned char x) { return x == kCanaryByte; });
}

inline cudaError_t check_canaries() {
  for (const auto& [base, a] : world().allocations)
    if (!canary_intact(base, a)) return fail(cudaErrorIllegalAddress);
  return cudaSuccess;
}

inline cudaError_t release(void* p, bool device) {
  if (!p) return cudaSuccess;
  World& w = world();
  auto it = w.allocations.find(reinterpret_cast<uintptr_t>(p));
  if (it == w.allocations.end() || it->second.device != device) return fail(cudaErrorInvalidValue);
  const bool intact = canary_intact(it->first, it->second);
  if (device) w.device_bytes -= it->second.bytes;
  w.allocations.erase(it);
  std::free(p);
  return intact ? cudaSuccess : fail(cudaErrorIllegalAddress);
}

// The allocation containing p, if any.
inline const std::pair<const uintptr_t, Allocation>* find(const void* p) {
  World& w = world();
  const auto addr = reinterpret_cast<uintptr_t>(p);
  auto it = w.allocations.upper_bound(addr);
  if (it == w.allocations.begin()) return nullptr;
  --it;
  return addr < it->first + std::max<size_t>(it->second.bytes, 1) ? &*it : nullptr;
}

inline bool range_ok(const void* p, size_t bytes) {
  const auto* a = find(p);
  return !a || reinterpret_cast<uintptr_t>(p) + bytes <= a->first + a->second.bytes;
}

}  // namespace emu
}  // namespace pycurv

#define threadIdx (::pycurv::emu::thread_index())
#define blockIdx (::pycurv::emu::world().block_idx)
#define blockDim (::pycurv::emu::world().block_dim)
#define gridDim (::pycurv::emu::world().grid_dim)

// ---- device functions ----------------------------------------------------------------------

inline void __syncthreads() {
  auto& w = ::pycurv::emu::world();
  w.current->state = ::pycurv::emu::FiberState::BlockWait;
  ::pycurv::emu::yield_to_scheduler();
}

inline double __shfl_down_sync(unsigned mask, double v, unsigned delta) {
  if (mask != 0xffffffffu) ::pycurv::emu::launch_error("only full-warp shuffles are emulated");
  auto& w = ::pycurv::emu::world();
  const unsigned tid = w.current->tid, lane = tid & 31;
  w.warp_slots[tid] = v;
  w.current->state = ::pycurv::emu::FiberState::WarpWait;  // every lane has written
  ::pycurv::emu::yield_to_scheduler();
  const double r = lane + delta < 32 ? w.warp_slots[tid + delta] : v;
  w.current->state = ::pycurv::emu::FiberState::WarpWait;  // every lane has read
  ::pycurv::emu::yield_to_scheduler();
  return r;
}

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float __half2float(__half h) {  // IEEE binary16 -> binary32, exactly
  const uint32_t sign = (h.bits >> 15) & 1u, exp = (h.bits >> 10) & 0x1Fu, frac = h.bits & 0x3FFu;
  float mag;
  if (exp == 0)
    mag = std::ldexp(static_cast<float>(frac), -24);
  else if (exp == 31)
    mag = frac ? NAN : INFINITY;
  else
    mag = std::ldexp(static_cast<float>(frac | 0x400u), static_cast<int>(exp) - 25);
  return sign ? -mag : mag;
}

// ---- runtime API ------------------------------------------------------------------------------

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorMemoryAllocation: return "out of memory (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    case cudaErrorInvalidDevice: return "invalid device ordinal (emulated)";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected (emulated)";
    case cudaErrorNotReady: return "device not ready (emulated)";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered (emulated: write past an allocation)";
    default: return "unspecified launch failure (emulated)";
  }
}
inline cudaError_t cudaGetLastError() {
  auto& w = ::pycurv::emu::world();
  const cudaError_t e = w.last_error;
  w.last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = ::pycurv::emu::device_count();
  return *n > 0 ? cudaSuccess : ::pycurv::emu::fail(cudaErrorNoDevice);
}
inline cudaError_t cudaGetDevice(int* d) {
  if (::pycurv::emu::device_count() < 1) return ::pycurv::emu::fail(cudaErrorNoDevice);
  *d = ::pycurv::emu::world().device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= ::pycurv::emu::device_count()) return ::pycurv::emu::fail(cudaErrorInvalidDevice);
  ::pycurv::emu::world().device = d;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d < 0 || d >= ::pycurv::emu::device_count()) return ::pycurv::emu::fail(cudaErrorInvalidDevice);
  std::snprintf(p->name, sizeof p->name, "pycurv CUDA emulation (CPU)");
  p->totalGlobalMem = ::pycurv::emu::memory_bytes();
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = ::pycurv::emu::sms();
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = ::pycurv::emu::sms(); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = static_cast<int>(::pycurv::emu::smem_optin()); break;
    case cudaDevAttrMemoryPoolsSupported: *v = 1; break;
  }
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
template <class K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, K) {
  a->sharedSizeBytes = 8 * sizeof(double);  // the block-sum scratch
  return cudaSuccess;
}
template <class K>
cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > ::pycurv::emu::smem_optin())
    return ::pycurv::emu::fail(cudaErrorInvalidValue);
  ::pycurv::emu::world().func_smem[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(bytes);
  return cudaSuccess;
}
template <class K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int threads, size_t smem) {
  const size_t per_sm = ::pycurv::emu::smem_optin() + 1024;
  const int by_threads = 2048 / threads;
  const int by_smem = static_cast<int>(per_sm / (smem + 8 * sizeof(double)));
  *n = std::max(0, std::min(by_threads, by_smem));
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = ::pycurv::emu::allocate(bytes, true);
  return *p ? cudaSuccess : ::pycurv::emu::fail(cudaErrorMemoryAllocation);
}
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
inline cudaError_t cudaFree(void* p) { return ::pycurv::emu::release(p, true); }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
inline cudaError_t cudaMallocHost(void** p, size_t bytes) {
  *p = ::pycurv::emu::allocate(bytes, false);
  return *p ? cudaSuccess : ::pycurv::emu::fail(cudaErrorMemoryAllocation);
}
inline cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned) { return cudaMallocHost(p, bytes); }
inline cudaError_t cudaHostGetDevicePointer(void** d, void* h, unsigned) {
  *d = h;
  return cudaSuccess;
}
inline cudaError_t cudaFreeHost(void* p) { return ::pycurv::emu::release(p, false); }
inline cudaError_t cudaMemGetInfo(size_t* free_b, size_t* total_b) {
  *total_b = ::pycurv::emu::memory_bytes();
  *free_b = *total_b - std::min(*total_b, ::pycurv::emu::world().device_bytes);
  return cudaSuccess;
}
namespace pycurv {
namespace emu {
inline cudaError_t copy(void* dst, const void* src, size_t bytes) {
  if (!range_ok(dst, bytes) || !range_ok(src, bytes)) return fail(cudaErrorInvalidValue);
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t host_wait() {
  ++world().host_syncs;
  return check_canaries();
}
}  // namespace emu
}  // namespace pycurv
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  const cudaError_t err = ::pycurv::emu::copy(dst, src, bytes);
  return err != cudaSuccess ? err : ::pycurv::emu::host_wait();
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  return ::pycurv::emu::copy(dst, src, bytes);
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return ::pycurv::emu::host_wait(); }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new CUevent_st();
  return cudaSuccess;
}
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { return cudaEventCreate(e); }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
  e->recorded = true;
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return ::pycurv::emu::host_wait(); }
inline cudaError_t cudaDeviceSynchronize() { return ::pycurv::emu::host_wait(); }
inline cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  if (!a->recorded || !b->recorded) return ::pycurv::emu::fail(cudaErrorInvalidValue);
  *ms = 0.0f;  // no device clock to read
  return cudaSuccess;
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* p) {
  *attr = cudaPointerAttributes{};
  if (const auto* a = ::pycurv::emu::find(p)) {
    attr->type = a->second.device ? cudaMemoryTypeDevice : cudaMemoryTypeHost;
    attr->device = ::pycurv::emu::world().device;
    attr->devicePointer = const_cast<void*>(p);
    attr->hostPointer = a->second.device ? nullptr : const_cast<void*>(p);
  }
  return cudaSuccess;
}
