// Zero many tensors when a device flag is set: the gradient guard's reset of a bad step
// (aqcore/guard.py), kZeroTensors tensors per launch, decided on the device without a host
// read. When the flag is clear (every good step) each block returns at once.
// Included by k_dispatch.cu only.
#pragma once

#include "aq_common.cuh"

namespace aq {

constexpr int kZeroThreads = 256;
constexpr int kZeroBlocks = 64;  // per tensor; grid-stride loops cover the rest

// Block b zeroes part of tensor b / kZeroBlocks (a one-dimensional grid of kZeroBlocks
// blocks per tensor).
__global__ void __launch_bounds__(kZeroThreads) zero_if_kernel(const ZeroParams p) {
  if (*p.flag == 0) return;
  const int tensor = static_cast<int>(blockIdx.x / kZeroBlocks);
  uint8_t* data = p.data[tensor];
  const int64_t n = p.bytes[tensor];
  const int64_t first = static_cast<int64_t>(blockIdx.x % kZeroBlocks) * kZeroThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(kZeroBlocks) * kZeroThreads;
  const int64_t wide = (reinterpret_cast<uintptr_t>(data) & 15) == 0 ? n / 16 : 0;
  for (int64_t i = first; i < wide; i += stride) {
    reinterpret_cast<uint4*>(data)[i] = make_uint4(0u, 0u, 0u, 0u);
  }
  for (int64_t i = 16 * wide + first; i < n; i += stride) data[i] = 0;
}

}  // namespace aq
