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

// Bytes [b0, b1, b2, b3] of the four 1-bit codes in bits 0..3 of c.
AQ_DEV uint32_t spread_bits4(uint32_t c) { return ((c & 15u) * 0x00204081u) & 0x01010101u; }

// Bytes [q0, q1, q2, q3] of the four 2-bit codes in bits 0..7 of c (bits 16.. of c zero).
AQ_DEV uint32_t spread_pairs4(uint32_t c) {
  const uint32_t x = (c | (c << 12)) & 0x000f000fu;
  return (x | (x << 6)) & 0x03030303u;
}

// PRMT selectors from one code per byte: byte q -> nibbles (2q, 2q + 1), the two bytes of
// 16-bit value q in the table words (t0 = values 0, 1; t1 = values 2, 3).
AQ_DEV uint32_t table_selectors(uint32_t codes_in_bytes) {
  return codes_in_bytes * 0x22u + 0x10101010u;
}

// Round-to-nearest 16-bit conversion of two floats (lo in the low half).
template <int DT>
AQ_DEV uint32_t pack16x2(float lo, float hi) {
  return DT == kBF16 ? pack_bf16x2(lo, hi) : pack_f16x2(lo, hi);
}

// Decompresses the groups of one tile. Lane l derives the parameters (or the 1-2 bit value
// table) of group l % NG once, with its division; the other lanes take them by shuffles.
// 16-bit outputs of 1-2 bit codes pick their converted values from the table by PRMT.
template <int DT, int B, int K>
AQ_DEV void decompress_tile(char* row, bool aligned, const Tile& c, const DecompressParams& p) {
  constexpr int VU = Elem<DT>::per_piece;
  constexpr int CU = VU >= K ? VU / K : 1;
  constexpr int P = K > VU ? K / VU : 1;
  constexpr int SG = kFastGroup * K / (32 * VU);
  constexpr int NG = kTileGroups / K;
  constexpr uint32_t kMask = (1u << B) - 1u;
  constexpr bool kTable16 = DT != kF32 && B <= 2;
  using Bits = typename std::conditional<(CU * B > 32), uint64_t, uint32_t>::type;

  const int lane = c.lane;
  const int64_t ncodes = (c.F + K - 1) / K;
  const int64_t gpr = (ncodes + kFastGroup - 1) / kFastGroup;
  const int64_t g0 = c.t * NG;
  const int ng = static_cast<int>(gpr - g0 < NG ? gpr - g0 : NG);
  const int64_t v0 = c.t * (kTileGroups * kFastGroup);

  // Issue every load of the tile before the first use.
  const int gq = lane & (NG - 1);
  const uint32_t my_meta = gq < ng ? p.meta[c.ri.group_off + g0 + gq] : kNanMeta;
  Bits codes[NG][SG];
#pragma unroll
  for (int gi = 0; gi < NG; ++gi) {
    if (gi < ng) {
      const uint8_t* bytes = p.payload + c.ri.byte_off + (g0 + gi) * (kFastGroup * B / 8);
#pragma unroll
      for (int s = 0; s < SG; ++s) codes[gi][s] = load_codes<B, CU, P, Bits>(bytes, s * 32 + lane);
    }
  }
  const bool whole = aligned && v0 + kTileGroups * kFastGroup <= c.F;  // no bounds checks
  const GroupParams mine = params_from_meta(meta_lo(my_meta), meta_hi(my_meta), B);
  // Values of the 2^B codes (1-2 bits), with the same operations as dequantize.
  float values[B <= 2 ? (1 << B) : 1];
  if constexpr (B <= 2) {
#pragma unroll
    for (int q = 0; q < (1 << B); ++q) values[q] = dequantize(q, mine);
  }
  uint32_t words[2] = {0u, 0u};  // kTable16: the values converted, two per word
  if constexpr (kTable16) {
    words[0] = pack16x2<DT>(values[0], values[1]);
    if constexpr (B == 2) words[1] = pack16x2<DT>(values[2], values[3]);
  }

#pragma unroll
  for (int gi = 0; gi < NG; ++gi) {
    if (gi >= ng) break;
    auto take = [&](auto v) { return NG > 1 ? __shfl_sync(kFull, v, gi) : v; };
    const int64_t piece0 = v0 + static_cast<int64_t>(gi * SG * 32 + lane) * VU;
    if constexpr (kTable16) {
      const uint32_t t0 = take(words[0]);
      const uint32_t t1 = B == 2 ? take(words[1]) : t0;
#pragma unroll
      for (int s = 0; s < SG; ++s) {
        const uint32_t w = static_cast<uint32_t>(codes[gi][s]);
        uint32_t out[4];
        if constexpr (K == 1 && B == 1) {  // 8 codes, two per word
          const uint32_t lo = table_selectors(spread_bits4(w));
          const uint32_t hi = table_selectors(spread_bits4(w >> 4));
          out[0] = byte_perm(t0, t1, lo);
          out[1] = byte_perm(t0, t1, lo >> 16);
          out[2] = byte_perm(t0, t1, hi);
          out[3] = byte_perm(t0, t1, hi >> 16);
        } else if constexpr (K == 1) {  // 8 two-bit codes in 16 bits
          const uint32_t lo = table_selectors(spread_pairs4(w & 0xffffu));
          const uint32_t hi = table_selectors(spread_pairs4(w >> 8));
          out[0] = byte_perm(t0, t1, lo);
          out[1] = byte_perm(t0, t1, lo >> 16);
          out[2] = byte_perm(t0, t1, hi);
          out[3] = byte_perm(t0, t1, hi >> 16);
        } else {  // AQ: each code fills K / 2 words with its value twice
#pragma unroll
          for (int cc = 0; cc < CU; ++cc) {
            const uint32_t q = (w >> (B * cc)) & kMask;
            const uint32_t word = byte_perm(t0, t1, q * 0x2222u + 0x1010u);
#pragma unroll
            for (int i = 0; i < K / 2; ++i) out[cc * (K / 2) + i] = word;
          }
        }
        const int64_t first = piece0 + static_cast<int64_t>(s * 32) * VU;
        store_piece_bits<DT>(row, first, c.F, aligned, whole,
                             make_uint4(out[0], out[1], out[2], out[3]));
      }
    } else {
      GroupParams g;
      float table[B <= 2 ? (1 << B) : 1];
      if constexpr (B <= 2) {
#pragma unroll
        for (int q = 0; q < (1 << B); ++q) table[q] = take(values[q]);
        g.zero_form = false;
      } else {
        g.base = take(mine.base);
        g.step = take(mine.step);
        g.zero_form = take(mine.zero_form ? 1u : 0u) != 0u;
      }
      auto emit = [&](auto zero_tag) {
        constexpr bool kZero = decltype(zero_tag)::value;
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
          const int64_t first = piece0 + static_cast<int64_t>(s * 32) * VU;
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
