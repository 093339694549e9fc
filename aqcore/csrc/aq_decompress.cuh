// Fused decompression: read codes + metadata, dequantize, repeat AQ averages, convert to
// the output dtype and write, in one pass. Same tiling as aq_compress.cuh.
#pragma once

#include "aq_common.cuh"
#include "aq_compress.cuh"

namespace aq {

// The payload bits of one piece, first code in the lowest bits (see store_codes).
template <int B, int CU, int P, class Bits>
AQ_DEV Bits load_codes(const uint8_t* group_bytes, int piece) {
  if constexpr (P == 1 && CU * B >= 8) {
    constexpr int NB = CU * B / 8;
    const uint8_t* src = group_bytes + piece * NB;
    if constexpr (NB == 1) return *src;
    else if constexpr (NB == 2) return *reinterpret_cast<const uint16_t*>(src);
    else if constexpr (NB == 4) return *reinterpret_cast<const uint32_t*>(src);
    else return *reinterpret_cast<const uint64_t*>(src);
  } else {
    const int bit = P == 1 ? piece * (CU * B) : (piece / 2) * B;
    return static_cast<Bits>((group_bytes[bit >> 3] >> (bit & 7)) & ((1u << (CU * B)) - 1u));
  }
}

template <int DT, int B, int K>
AQ_DEV void decompress_tile(char* row, bool aligned, const Tile& c, const DecompressParams& p) {
  constexpr int VU = Elem<DT>::per_piece;
  constexpr int CU = VU >= K ? VU / K : 1;
  constexpr int P = K > VU ? K / VU : 1;
  constexpr int SG = kFastGroup * K / (32 * VU);
  constexpr int NG = kTileGroups / K;
  constexpr uint32_t kMask = (1u << B) - 1u;
  using Bits = typename std::conditional<(CU * B > 32), uint64_t, uint32_t>::type;

  const int lane = c.lane;
  const int64_t ncodes = (c.F + K - 1) / K;
  const int64_t gpr = (ncodes + kFastGroup - 1) / kFastGroup;
  const int64_t g0 = c.t * NG;
  const int ng = static_cast<int>(gpr - g0 < NG ? gpr - g0 : NG);
  const int64_t v0 = c.t * (kTileGroups * kFastGroup);

  // Issue every load of the tile before the first use.
  uint32_t metas[NG];
  Bits codes[NG][SG];
#pragma unroll
  for (int gi = 0; gi < NG; ++gi) {
    if (gi < ng) {
      const int64_t group = g0 + gi;
      metas[gi] = p.meta[c.ri.group_off + group];
      const uint8_t* bytes = p.payload + c.ri.byte_off + group * (kFastGroup * B / 8);
#pragma unroll
      for (int s = 0; s < SG; ++s) codes[gi][s] = load_codes<B, CU, P, Bits>(bytes, s * 32 + lane);
    }
  }
  const bool whole = aligned && v0 + kTileGroups * kFastGroup <= c.F;  // no bounds checks
#pragma unroll
  for (int gi = 0; gi < NG; ++gi) {
    if (gi >= ng) break;
    const GroupParams g = params_from_meta(meta_lo(metas[gi]), meta_hi(metas[gi]), B);
    auto emit = [&](auto zero_tag) {
      constexpr bool kZero = decltype(zero_tag)::value;
      // 1- and 2-bit codes pick one of their 2^b values, computed once per group with the
      // same operations (so the same bits); wider codes are dequantized one by one.
      float table[B <= 2 ? (1 << B) : 1];
      if constexpr (B <= 2) {
#pragma unroll
        for (int q = 0; q < (1 << B); ++q) table[q] = dequantize(q, g);
      }
#pragma unroll
      for (int s = 0; s < SG; ++s) {
        float vals[VU];
#pragma unroll
        for (int cc = 0; cc < CU; ++cc) {
          const Bits w = codes[gi][s];
          float v;
          if constexpr (B == 1) {
            v = (w & (Bits(1) << cc)) ? table[1] : table[0];
          } else if constexpr (B == 2) {
            const bool b0 = (w & (Bits(1) << (2 * cc))) != 0;
            const float low = b0 ? table[1] : table[0];
            const float high = b0 ? table[3] : table[2];
            v = (w & (Bits(2) << (2 * cc))) ? high : low;
          } else {
            const uint32_t code = static_cast<uint32_t>(w >> (cc * B)) & kMask;
            const float grid = __fsub_rn(__uint_as_float(0x4b000000u | code),
                                         kZero ? 8388609.0f : 8388608.0f);
            v = __fadd_rn(g.base, __fmul_rn(grid, g.step));
            if constexpr (kZero) v = code == 0 ? 0.0f : v;
          }
#pragma unroll
          for (int i = 0; i < VU / CU; ++i) vals[cc * (VU / CU) + i] = v;
        }
        const int64_t first = v0 + static_cast<int64_t>((gi * SG + s) * 32 + lane) * VU;
        store_piece<DT>(row, first, c.F, aligned, whole, vals);
      }
    };
    if (B > 2 && g.zero_form) {
      emit(std::true_type{});
    } else {
      emit(std::false_type{});
    }
  }
}

template <int DT>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) decompress_tiles(DecompressParams p) {
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (tile >= p.rows * p.tiles_per_row) return;
  const Tile c = locate<DT>(p, tile, threadIdx.x & 31, p.out);
  char* rowp = const_cast<char*>(c.row);
  const bool aligned = (reinterpret_cast<uintptr_t>(rowp) & 15) == 0;
  with_level(c.ri.level, [&](auto L) {
    decompress_tile<DT, decltype(L)::bits, decltype(L)::avg>(rowp, aligned, c, p);
  });
}

// Any group size: one code per lane and step.
template <int DT, int B, int K>
AQ_DEV void decompress_generic_tile(char* row, const Tile& c, const DecompressParams& p) {
  constexpr int NG = kTileGroups / K;
  constexpr uint32_t kMask = (1u << B) - 1u;
  const int G = p.group_size;
  const int lane = c.lane;
  const int64_t ncodes = (c.F + K - 1) / K;
  const int64_t gpr = (ncodes + G - 1) / G;
  const int64_t g0 = c.t * NG;
  const int ng = static_cast<int>(gpr - g0 < NG ? gpr - g0 : NG);
#pragma unroll 1
  for (int gi = 0; gi < ng; ++gi) {
    const int64_t group = g0 + gi;
    const uint32_t m = p.meta[c.ri.group_off + group];
    const GroupParams g = params_from_meta(meta_lo(m), meta_hi(m), B);
    const uint8_t* bytes = p.payload + c.ri.byte_off + group * (G * B / 8);
#pragma unroll 1
    for (int s = 0; s < G / 32; ++s) {
      const int k = s * 32 + lane;
      const int64_t j = group * G + k;
      if (j >= ncodes) break;
      const int bit = k * B;
      const uint32_t code = (bytes[bit >> 3] >> (bit & 7)) & kMask;
      const float v = dequantize(code, g);
      uint32_t bits;
      if constexpr (DT == kF32) bits = __float_as_uint(v);
      else if constexpr (DT == kBF16) bits = pack_bf16x2(v, 0.0f) & 0xffffu;
      else bits = pack_f16x2(v, 0.0f) & 0xffffu;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const int64_t idx = j * K + i;
        if (idx < c.F) {
          if constexpr (DT == kF32) reinterpret_cast<uint32_t*>(row)[idx] = bits;
          else reinterpret_cast<uint16_t*>(row)[idx] = static_cast<uint16_t>(bits);
        }
      }
    }
  }
}

template <int DT>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) decompress_generic(DecompressParams p) {
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (tile >= p.rows * p.tiles_per_row) return;
  const Tile c = locate<DT>(p, tile, threadIdx.x & 31, p.out);
  char* rowp = const_cast<char*>(c.row);
  with_level(c.ri.level, [&](auto L) {
    decompress_generic_tile<DT, decltype(L)::bits, decltype(L)::avg>(rowp, c, p);
  });
}

}  // namespace aq
