// Runs the aqcore CUDA kernel source on the CPU: one std::thread per lane, warp primitives
// through a barrier, warps one after another (the kernels share nothing between warps).
// Only what the kernels use; device-only PTX has portable bodies in aq_common.cuh.
#pragma once
#include <barrier>
#include <cfenv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct alignas(16) uint4 { uint32_t x, y, z, w; };
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
struct dim3e { unsigned x = 0, y = 0, z = 0; };
inline thread_local dim3e threadIdx, blockIdx;
inline dim3e blockDim, gridDim;

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline float __fadd_rd(float a, float b) {
  volatile float va = a, vb = b;
  std::fesetround(FE_DOWNWARD);
  volatile float r = va + vb;
  std::fesetround(FE_TONEAREST);
  return r;
}
inline unsigned __float2uint_rd(float x) {
  if (x != x) return 0u;
  const double f = std::floor(static_cast<double>(x));
  if (f <= 0.0) return 0u;
  if (f >= 4294967295.0) return 0xffffffffu;
  return static_cast<unsigned>(f);
}
inline float __uint2float_rn(unsigned u) { return static_cast<float>(u); }

namespace emu {
struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[32];
};
inline thread_local int lane_id = 0;
inline thread_local Warp* cur = nullptr;

template <class T>
T exchange(T v, int src) {
  static_assert(sizeof(T) <= 8, "32/64-bit values only");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  cur->slot[lane_id] = bits;
  cur->bar.arrive_and_wait();
  const uint64_t got = cur->slot[src & 31];
  cur->bar.arrive_and_wait();
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

template <class P>
void launch(void (*kernel)(P), int64_t blocks, int threads, const P& p) {
  gridDim.x = static_cast<unsigned>(blocks);
  blockDim.x = static_cast<unsigned>(threads);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int w = 0; w < threads / 32; ++w) {
      Warp warp;
      std::vector<std::thread> lanes;
      for (int l = 0; l < 32; ++l) {
        lanes.emplace_back([&, l] {
          threadIdx.x = w * 32 + l;
          blockIdx.x = static_cast<unsigned>(b);
          lane_id = l;
          cur = &warp;
          std::fesetround(FE_TONEAREST);
          kernel(p);
        });
      }
      for (auto& t : lanes) t.join();
    }
  }
}
}  // namespace emu

template <class T> T __shfl_sync(unsigned, T v, int src) { return emu::exchange(v, src); }
template <class T> T __shfl_xor_sync(unsigned, T v, int m) {
  return emu::exchange(v, emu::lane_id ^ m);
}
inline bool __all_sync(unsigned, bool pred) {
  uint32_t all = 1;
  for (int l = 0; l < 32; ++l) all &= emu::exchange<uint32_t>(pred ? 1u : 0u, l);
  return all != 0;
}
inline unsigned __ballot_sync(unsigned, bool pred) {
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= emu::exchange<uint32_t>(pred ? 1u : 0u, l) << l;
  return bits;
}
inline bool __any_sync(unsigned, bool pred) {
  uint32_t any = 0;
  for (int l = 0; l < 32; ++l) any |= emu::exchange<uint32_t>(pred ? 1u : 0u, l);
  return any != 0;
}

// aq_launch.cuh: launches run here; persistent grids get a few blocks so that warps loop.
#define AQ_LAUNCH(blocks, threads, smem, arg, ...) emu::launch(__VA_ARGS__, blocks, threads, arg)
#define __shared__

namespace aq {
inline int emu_resident = 3;
template <class K>
int64_t resident_blocks(K, int, int, int (&)[64]) {
  return emu_resident;
}
}  // namespace aq
