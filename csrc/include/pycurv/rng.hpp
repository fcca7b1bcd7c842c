// Counter-based normal random numbers: entry i of a random vector depends only on
// (seed, stream, global index i). A basis sharded across processes or devices
// therefore gets exactly the rows of the vector a single process would draw, and
// the CPU and CUDA backends draw the same vectors.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PYCURV_HD __host__ __device__ __forceinline__
#else
#define PYCURV_HD inline
#endif

namespace pycurv {

PYCURV_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Key of one random vector: mixes the user's seed with the stream number.
PYCURV_HD uint64_t rng_key(uint64_t seed, uint64_t stream) {
  return splitmix64(splitmix64(seed) ^ (stream * 0xD1B54A32D192ED03ull + 0x632BE59BD9B4E019ull));
}

// Standard normal variate number i of the vector with the given key (Box-Muller).
PYCURV_HD double normal_at(uint64_t key, uint64_t i) {
  const uint64_t a = splitmix64(key + 2 * i);
  const uint64_t b = splitmix64(key + 2 * i + 1);
  const double u1 = static_cast<double>((a >> 11) + 1) * 0x1p-53;  // (0, 1]
  const double u2 = static_cast<double>(b >> 11) * 0x1p-53;        // [0, 1)
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace pycurv
