// One bit per value for 0/1 tensors (dropout and ReLU masks): reference.pack_bits /
// unpack_bits, value i at bit i % 8 of byte i // 8. Each thread handles chunks of 16 mask
// bytes (2 packed bytes); a block covers kChunksPerThread chunks per thread, coalesced.
// Included by k_dispatch.cu only (these kernels are not templates).
#pragma once

#include "aq_common.cuh"

namespace aq {

// Nonzero bytes of w -> 4 bits (byte i -> bit i).
AQ_DEV uint32_t nonzero_nibble(uint32_t w) {
  const uint32_t high = ((w & 0x7f7f7f7fu) + 0x7f7f7f7fu) | w;  // bit 7 of a byte: byte != 0
  const uint32_t ones = (high >> 7) & 0x01010101u;
  return (ones * 0x01020408u) >> 24;  // gathers bits 0, 8, 16, 24 into bits 24..27
}

// 4 bits -> 4 bytes holding 0 or 1.
AQ_DEV uint32_t nibble_bytes(uint32_t b) { return ((b & 15u) * 0x00204081u) & 0x01010101u; }

__global__ void __launch_bounds__(kBitsThreads) pack_bits_kernel(BitsParams p) {
  const uint8_t* in = p.in;
  uint8_t* out = p.out;
  const int64_t n = p.n;
  const bool aligned = p.aligned != 0;
  const int64_t chunks = (n + 15) / 16;
  const int64_t out_bytes = (n + 7) / 8;
#pragma unroll
  for (int i = 0; i < kChunksPerThread; ++i) {
    const int64_t chunk =
        (static_cast<int64_t>(blockIdx.x) * kChunksPerThread + i) * kBitsThreads + threadIdx.x;
    if (chunk >= chunks) return;
    const int64_t first = chunk * 16;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (aligned && first + 16 <= n) {
      v = *reinterpret_cast<const uint4*>(in + first);
    } else {
      for (int e = 0; e < 16 && first + e < n; ++e) {
        set_word(v, e >> 2, word(v, e >> 2) | (static_cast<uint32_t>(in[first + e]) << (8 * (e & 3))));
      }
    }
    const uint32_t bits = nonzero_nibble(v.x) | (nonzero_nibble(v.y) << 4) |
                          (nonzero_nibble(v.z) << 8) | (nonzero_nibble(v.w) << 12);
    if (aligned && 2 * chunk + 2 <= out_bytes) {
      *reinterpret_cast<uint16_t*>(out + 2 * chunk) = static_cast<uint16_t>(bits);
    } else {
      out[2 * chunk] = static_cast<uint8_t>(bits);
      if (2 * chunk + 1 < out_bytes) out[2 * chunk + 1] = static_cast<uint8_t>(bits >> 8);
    }
  }
}

__global__ void __launch_bounds__(kBitsThreads) unpack_bits_kernel(BitsParams p) {
  const uint8_t* in = p.in;
  uint8_t* out = p.out;
  const int64_t n = p.n;
  const bool aligned = p.aligned != 0;
  const int64_t chunks = (n + 15) / 16;
#pragma unroll
  for (int i = 0; i < kChunksPerThread; ++i) {
    const int64_t chunk =
        (static_cast<int64_t>(blockIdx.x) * kChunksPerThread + i) * kBitsThreads + threadIdx.x;
    if (chunk >= chunks) return;
    const int64_t first = chunk * 16;
    uint32_t bits = in[2 * chunk];
    if (first + 8 < n) bits |= static_cast<uint32_t>(in[2 * chunk + 1]) << 8;
    const uint4 v = make_uint4(nibble_bytes(bits), nibble_bytes(bits >> 4), nibble_bytes(bits >> 8),
                               nibble_bytes(bits >> 12));
    if (aligned && first + 16 <= n) {
      *reinterpret_cast<uint4*>(out + first) = v;
    } else {
      for (int e = 0; e < 16 && first + e < n; ++e) {
        out[first + e] = static_cast<uint8_t>(word(v, e >> 2) >> (8 * (e & 3)));
      }
    }
  }
}

}  // namespace aq
