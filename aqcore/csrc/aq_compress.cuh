// Fused compression: one pass reads each value once and writes codes + bf16 metadata.
//
// Work is cut into tiles of 8 * group_size raw values of one row (one aq0.25 group, or
// eight plain groups), so every row has the same number of tiles whatever its level and
// rows of different levels share one launch. For group_size 256, compress_tiles runs
// persistent warps: each prefetches its next tile into shared memory (cp.async, two
// stages) while it computes on the current one, lane l owning the 16-byte pieces
// l, l + 32, ... of the tile (coalesced loads; a lane's codes are consecutive). A tile that
// is not whole (the row's last, or a row not 16-byte aligned) and other group sizes take
// compress_generic_tile: one code per lane and step, two passes, exact in every case.
#pragma once

#include "aq_common.cuh"

namespace aq {

extern __shared__ uint4 aq_smem[];

struct RowInfo {
  int level;
  int64_t byte_off;
  int64_t group_off;
  int64_t row;  // the row in the tensor (mixed levels: the table lists rows by level)
};

// Row i of the launch order. Mixed levels: table entry i = {level, byte offset, group offset,
// row}, entries sorted by level so that the warps of an SM mostly run one level's code (the
// unrolled level bodies do not fit the instruction cache together).
AQ_DEV RowInfo row_info(const int64_t* table, int level, int64_t row_bytes, int64_t row_groups,
                        int64_t i) {
  if (table != nullptr) {
    const int64_t* e = table + 4 * i;
    return {static_cast<int>(e[0]), e[1], e[2], e[3]};
  }
  return {level, i * row_bytes, i * row_groups, i};
}

// Launch-order row and tile-in-row of a tile; 64-bit division (~70 instructions) only when
// needed.
AQ_DEV void split_tile(int64_t tile, int64_t tiles_per_row, int64_t& row, int64_t& t) {
  if (tile <= 0xffffffffll && tiles_per_row <= 0xffffffffll) {
    row = static_cast<uint32_t>(tile) / static_cast<uint32_t>(tiles_per_row);
  } else {
    row = tile / tiles_per_row;
  }
  t = tile - row * tiles_per_row;
}

struct Tile {
  int lane;
  int64_t t;          // tile number within the row
  int64_t F;          // row length
  int64_t idx_row;    // row * F: absolute code index of the row's first code slot
  int64_t v0;         // first raw value of the tile in the row
  RowInfo ri;
  const char* row;    // the row's first value
  bool whole;         // row start 16-byte aligned and the tile inside the row
};

// Where a tile lies, and its row's level and offsets (a table load for mixed levels). Tiles
// of the first row of a one-level launch (all of them for one row) skip the 64-bit products.
template <int DT, class P>
AQ_DEV Tile locate(const P& p, int64_t tile, int lane, const void* base) {
  Tile c;
  c.lane = lane;
  c.F = p.row_numel;
  if (tile < p.tiles_per_row && p.table == nullptr) {
    c.t = tile;
    c.idx_row = 0;
    c.row = static_cast<const char*>(base);
    c.ri = {p.level, 0, 0, 0};
  } else {
    int64_t i;
    split_tile(tile, p.tiles_per_row, i, c.t);
    c.ri = row_info(p.table, p.level, p.row_bytes, p.row_groups, i);
    c.idx_row = c.ri.row * p.row_numel;
    c.row = static_cast<const char*>(base) + c.idx_row * Elem<DT>::size;
  }
  c.v0 = c.t * (kTileGroups * kFastGroup);
  c.whole = (reinterpret_cast<uintptr_t>(c.row) & 15) == 0 &&
            c.v0 + kTileGroups * kFastGroup <= c.F;
  return c;
}

// Quantization mode of a group, uniform over the warp.
enum Mode : int { kNonFinite = 0, kFlat = 1, kFast = 2, kFastZero = 3, kExact = 4 };

// Writes the codes of one piece: `bits` holds its CU codes (b bits each, first code in the
// lowest bits); with P = 2 only odd lanes hold a code.
template <int B, int CU, int P, class Bits>
AQ_DEV void store_codes(uint8_t* group_bytes, int piece, int lane, Bits bits) {
  constexpr int WB = CU * B / P;  // payload bits per piece
  if constexpr (P == 1 && CU * B >= 8) {
    constexpr int NB = CU * B / 8;
    uint8_t* dst = group_bytes + piece * NB;
    if constexpr (NB == 1) *dst = static_cast<uint8_t>(bits);
    else if constexpr (NB == 2) *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(bits);
    else if constexpr (NB == 4) *reinterpret_cast<uint32_t*>(dst) = static_cast<uint32_t>(bits);
    else *reinterpret_cast<uint64_t*>(dst) = static_cast<uint64_t>(bits);
  } else {
    constexpr int LPB = 8 * P / (CU * B);  // lanes sharing one byte
    static_assert(WB * LPB == 8 || P == 2, "byte assembly");
    const int shift = ((lane % LPB) / P) * (CU * B);
    uint32_t v = (P == 1 || (lane & 1)) ? (static_cast<uint32_t>(bits) << shift) : 0u;
    v = or_lanes(v, LPB);
    if (lane % LPB == 0) group_bytes[piece / LPB] = static_cast<uint8_t>(v);
  }
}

// Values of the CU codes of one piece of a whole tile (P = 1): the raw values, or the
// averages of runs of K, summed left to right and divided once (== * 1/K, K a power of 2).
template <int DT, int K, int CU>
AQ_DEV void piece_values(const uint4& r, float (&v)[CU]) {
#pragma unroll
  for (int cc = 0; cc < CU; ++cc) {
    float total = elem<DT>(r, cc * K);
#pragma unroll
    for (int i = 1; i < K; ++i) total = __fadd_rn(total, elem<DT>(r, cc * K + i));
    v[cc] = K == 1 ? total : __fmul_rn(total, 1.0f / K);
  }
}

// A code spanning the pieces of lanes 2m and 2m + 1 (float32 aq0.25): its average, on both.
template <int DT, int K>
AQ_DEV float pair_value(const uint4& r, int lane) {
  constexpr int VU = Elem<DT>::per_piece;
  float half = elem<DT>(r, 0);
#pragma unroll
  for (int i = 1; i < VU; ++i) half = __fadd_rn(half, elem<DT>(r, i));
  float total = __shfl_xor_sync(kFull, half, 1);  // the even lane's first half
#pragma unroll
  for (int i = 0; i < VU; ++i) total = __fadd_rn(total, elem<DT>(r, i));
  const float v = __fmul_rn(total, 1.0f / K);
  const float other = __shfl_xor_sync(kFull, v, 1);
  return (lane & 1) ? v : other;
}

// The codes of one piece of a kFast (ZERO: kFastZero, B >= 2) group, first code lowest:
// the reference's floor(t + u) and clamp for t >= 0 (v >= base) and finite parameters.
// floor is a round-down add of 2^23 (2^23 + 1 folds the zero-keeping + 1 in) and the clamp an
// unsigned min on those float bits; the 2^23s leave in one subtraction per piece (8-bit
// codes: their low bytes are gathered instead). A zero of a zero-keeping group gets code 0.
template <int B, int CU, class Bits, bool ZERO>
AQ_DEV Bits fast_codes(const float (&v)[CU], float base, float scale,
                       const uint32_t (&noise)[CU]) {
  float x[CU];
#pragma unroll
  for (int cc = 0; cc < CU; ++cc) {
    x[cc] = add_noise(__fmul_rn(__fsub_rn(v[cc], base), scale), noise[cc]);
  }
  if constexpr (B == 1) {
    uint32_t bits = 0;
#pragma unroll
    for (int cc = 0; cc < CU; ++cc) bits = set_bit_if_at_least_one(bits, x[cc], 1u << cc);
    return bits;
  } else {
    uint32_t r[CU];
#pragma unroll
    for (int cc = 0; cc < CU; ++cc) {
      r[cc] = __float_as_uint(__fadd_rd(x[cc], ZERO ? 8388609.0f : 8388608.0f));
      r[cc] = umin_opaque(r[cc], kMagic + (1u << B) - 1u);
      if constexpr (ZERO) r[cc] = v[cc] == 0.0f ? kMagic : r[cc];
    }
    if constexpr (B == 8) {
      static_assert(CU % 4 == 0, "whole words of 8-bit codes");
      Bits bits = 0;
#pragma unroll
      for (int w = 0; w < CU / 4; ++w) {
        const uint32_t lo = byte_perm(r[4 * w], r[4 * w + 1], 0x0040u);
        const uint32_t hi = byte_perm(r[4 * w + 2], r[4 * w + 3], 0x0040u);
        bits |= static_cast<Bits>(byte_perm(lo, hi, 0x5410u)) << (32 * w);
      }
      return bits;
    } else {
      static_assert(CU * B <= 32, "one word of codes");
      uint32_t bits = 0, magic = 0;
#pragma unroll
      for (int cc = 0; cc < CU; ++cc) {
        bits += r[cc] << (cc * B);  // an IMAD each
        magic += kMagic << (cc * B);
      }
      return static_cast<Bits>(bits - magic);
    }
  }
}

// Compresses the groups of level (B, K) of one whole tile held in shared memory `buf`.
template <int DT, int B, int K>
AQ_DEV void compress_whole_tile(const uint4* buf, const Tile& c, const CompressParams& p) {
  constexpr int VU = Elem<DT>::per_piece;
  constexpr int CU = VU >= K ? VU / K : 1;            // codes per piece
  constexpr int P = K > VU ? K / VU : 1;              // pieces per code
  constexpr int SG = kFastGroup * K / (32 * VU);      // steps per group
  constexpr int NG = kTileGroups / K;                 // groups per tile
  constexpr int M = ilog2(NG);
  constexpr int LPG = 32 >> M;                        // lanes per group after the reduction
  using Bits = typename std::conditional<(CU * B > 32), uint64_t, uint32_t>::type;
  static_assert(P <= 2, "a code spans at most two pieces");
  const float inf = __uint_as_float(0x7f800000u);
  const int lane = c.lane;
  const int64_t g0 = c.t * NG;

  auto piece = [&](int gi, int s) { return buf[(gi * SG + s) * 32 + lane]; };
  auto values = [&](int gi, int s, float (&v)[CU]) {
    const uint4 r = piece(gi, s);
    if constexpr (P == 1) {
      piece_values<DT, K, CU>(r, v);
    } else {
      v[0] = pair_value<DT, K>(r, lane);
    }
  };

  // 1. Range of every group; the lane then owns group gq (its metadata, its parameters).
  const int gq = lane >> (5 - M);
  float lo, hi;
  if constexpr (K == 1 && DT != kF32) {
    uint32_t red[NG];  // per group: (min, -max) as a 16-bit pair
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      const uint4 r0 = piece(gi, 0);
      uint32_t mn = r0.x, mx = r0.x;
#pragma unroll
      for (int s = 0; s < SG; ++s) {
        const uint4 r = s == 0 ? r0 : piece(gi, s);
#pragma unroll
        for (int w = s == 0 ? 1 : 0; w < 4; ++w) {
          mn = min2_nan<DT>(mn, word(r, w));
          mx = max2_nan<DT>(mx, word(r, w));
        }
      }
      const uint32_t nx = neg2(mx);  // (min, -max) of both halves, then of the group
      red[gi] = min2_nan<DT>(byte_perm(mn, nx, 0x5410u), byte_perm(mn, nx, 0x7632u));
    }
    const uint32_t r = transpose_reduce<M>(red, lane, [](uint32_t a, uint32_t b) {
      return min2_nan<DT>(a, b);
    });
    lo = half16_to_float<DT>(r & 0xffffu);
    hi = -half16_to_float<DT>(r >> 16);
  } else {
    float mn[NG], nx[NG];
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      mn[gi] = inf;
      nx[gi] = inf;
#pragma unroll
      for (int s = 0; s < SG; ++s) {
        float v[CU];
        values(gi, s, v);
#pragma unroll
        for (int cc = 0; cc < CU; ++cc) {
          mn[gi] = min_nan(mn[gi], v[cc]);
          nx[gi] = min_nan(nx[gi], -v[cc]);
        }
      }
    }
    auto op = [](float a, float b) { return min_nan(a, b); };
    lo = transpose_reduce<M>(mn, lane, op);
    hi = -transpose_reduce<M>(nx, lane, op);
  }

  // 2. Metadata of the lane's group (reference.group_meta).
  const bool finite = ((__float_as_uint(lo) & 0x7f800000u) != 0x7f800000u) &&
                      ((__float_as_uint(hi) & 0x7f800000u) != 0x7f800000u);
  const bool keep_zero = finite && B >= 2 && lo == 0.0f;
  if (__any_sync(kFull, keep_zero)) {  // smallest positive value of the zero-holding groups
    float pm[NG];
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      pm[gi] = inf;
#pragma unroll
      for (int s = 0; s < SG; ++s) {
        float v[CU];
        values(gi, s, v);
#pragma unroll
        for (int cc = 0; cc < CU; ++cc) {
          if (v[cc] > 0.0f) pm[gi] = min_nan(pm[gi], v[cc]);
        }
      }
    }
    const float pmin = transpose_reduce<M>(pm, lane, [](float a, float b) { return min_nan(a, b); });
    if (keep_zero && pmin != inf) lo = pmin;
  }
  // bfloat16 values are their own bfloat16 rounding (only -0 becomes +0).
  constexpr bool kExactBf16 = DT == kBF16 && K == 1;
  const float lo_r = kExactBf16 ? __fadd_rn(lo, 0.0f) : bf16_round(lo, false);
  const float hi_r = kExactBf16 ? __fadd_rn(hi, 0.0f) : bf16_round(hi, true);
  const bool zero_form = keep_zero || lo_r == hi_r;
  const float m0 = zero_form ? hi_r : lo_r;
  const float m1 = zero_form ? lo_r : hi_r;
  if ((lane & (LPG - 1)) == 0) {
    p.meta[c.ri.group_off + g0 + gq] = finite ? meta_word(m0, m1) : kNanMeta;
  }
  const GroupParams mine = params_from_meta(m0, m1, B);
  const bool hash_fast = (static_cast<uint32_t>(c.idx_row) & (CU - 1)) == 0;
  int mode;
  if (!finite) {
    mode = kNonFinite;
  } else if (!(mine.span > 0.0f)) {
    mode = kFlat;
  } else if (hash_fast && mine.span < inf && mine.scale < inf) {
    mode = zero_form ? kFastZero : kFast;
  } else {
    mode = kExact;
  }

  // 3. Rounding, packing, stores. Group gi's parameters live on lane gi * LPG.
  uint8_t* tile_bytes = p.payload + c.ri.byte_off + g0 * (kFastGroup * B / 8);
  const uint64_t tile_first = static_cast<uint64_t>(c.idx_row + g0 * kFastGroup);  // code index

  // One piece of a kFast / kFastZero group: noise of whole pairs when CU >= 2 (the mode
  // guarantees the alignment), else one code's noise from the group keys.
  auto fast_piece = [&](auto zero_tag, int gi, int s, float base, float scale,
                        const GroupKeys& keys, uint32_t fold_a, uint32_t fold_b) {
    const int pc = s * 32 + lane;
    const int first = P == 1 ? pc * CU : pc / 2;
    float v[CU];
    values(gi, s, v);
    uint32_t noise[CU];
    if constexpr (CU >= 2) {
      const uint32_t lo = keys.lo0 + static_cast<uint32_t>(first / 2);
      const uint32_t fold = lo < keys.lo0 ? fold_b : fold_a;
      piece_noise<CU>(lo ^ (lo >> 16) ^ fold, noise);
    } else {
      noise[0] = noise_bits(keys, static_cast<uint32_t>(first));
    }
    constexpr bool kZero = decltype(zero_tag)::value && B >= 2;  // 1-bit groups never keep zeros
    const Bits bits = fast_codes<B, CU, Bits, kZero>(v, base, scale, noise);
    store_codes<B, CU, P>(tile_bytes + gi * (kFastGroup * B / 8), pc, lane, bits);
  };

  if (__all_sync(kFull, mode == kFast || mode == kFastZero) && !p.big) {
    // The common case, unrolled: no per-group branches but the zero-keeping choice.
    const uint32_t zero_lanes = __ballot_sync(kFull, mode == kFastZero);
    const uint32_t fold0 = p.key0 ^ (p.key0 >> 16);
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      const int src = gi * LPG;
      const float base = M > 0 ? __shfl_sync(kFull, mine.base, src) : mine.base;
      const float scale = M > 0 ? __shfl_sync(kFull, mine.scale, src) : mine.scale;
      const GroupKeys keys = group_keys(tile_first + gi * kFastGroup, false, p.seed, p.key0);
      auto run = [&](auto zero_tag) {
#pragma unroll
        for (int s = 0; s < SG; ++s) fast_piece(zero_tag, gi, s, base, scale, keys, fold0, fold0);
      };
      if (B >= 2 && ((zero_lanes >> src) & 1u)) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    }
    return;
  }

#pragma unroll 1
  for (int gi = 0; gi < NG; ++gi) {  // a rolled loop: one copy of each mode's code
    GroupParams g = mine;
    int gmode = mode;
    if constexpr (M > 0) {
      const int src = gi * LPG;
      g.base = __shfl_sync(kFull, mine.base, src);
      g.scale = __shfl_sync(kFull, mine.scale, src);
      const uint32_t flags = __shfl_sync(kFull, mine.levels | (zero_form ? 256u : 0u) |
                                                    (static_cast<uint32_t>(mode) << 9), src);
      g.levels = flags & 255u;
      g.zero_form = (flags & 256u) != 0;
      gmode = static_cast<int>(flags >> 9);
      g.span = 1.0f;  // only kExact reads it, and kExact groups have span > 0
    }
    uint8_t* bytes = tile_bytes + gi * (kFastGroup * B / 8);
    const GroupKeys keys = group_keys(tile_first + gi * kFastGroup, p.big != 0, p.seed, p.key0);
    const uint32_t fold_a = keys.key_a ^ (keys.key_a >> 16);
    const uint32_t fold_b = keys.key_b ^ (keys.key_b >> 16);

    auto emit = [&](auto mode_tag) {
      constexpr int MODE = decltype(mode_tag)::value;
#pragma unroll
      for (int s = 0; s < SG; ++s) {
        if constexpr (MODE == kFast || MODE == kFastZero) {
          fast_piece(std::integral_constant<bool, MODE == kFastZero>{}, gi, s, g.base, g.scale,
                     keys, fold_a, fold_b);
          continue;
        }
        const int pc = s * 32 + lane;                     // piece within the group
        const int first = P == 1 ? pc * CU : pc / 2;      // its first code within the group
        float v[CU];
        if constexpr (MODE != kNonFinite) values(gi, s, v);
        Bits bits = 0;
        if constexpr (MODE == kExact) {
#pragma unroll
          for (int cc = 0; cc < CU; ++cc) {
            const uint32_t noise = noise_bits(keys, static_cast<uint32_t>(first + cc));
            bits |= static_cast<Bits>(quantize_exact(v[cc], g, noise)) << (cc * B);
          }
        } else if constexpr (MODE == kFlat) {
#pragma unroll
          for (int cc = 0; cc < CU; ++cc) {
            const uint32_t q = (g.zero_form && v[cc] != 0.0f) ? 1u : 0u;
            bits |= static_cast<Bits>(q) << (cc * B);
          }
        }
        store_codes<B, CU, P>(bytes, pc, lane, bits);
      }
    };
    switch (gmode) {
      case kNonFinite: emit(std::integral_constant<int, kNonFinite>{}); break;
      case kFlat: emit(std::integral_constant<int, kFlat>{}); break;
      case kFast: emit(std::integral_constant<int, kFast>{}); break;
      case kFastZero: emit(std::integral_constant<int, kFastZero>{}); break;
      default: emit(std::integral_constant<int, kExact>{}); break;
    }
  }
}

// ---------------------------------------------------------------------------------
// Error-model partials of one tile (errors.level_errors), from the registers already
// loaded: plain groups' n R^2, AQ run deviation energy and n R^2 over groups of averages.

template <int DT, int K, class Piece>
AQ_DEV void aq_tile_stats(Piece piece, int lane, int64_t v0, int64_t F, float& dev,
                          float& spread) {
  constexpr int VU = Elem<DT>::per_piece;
  constexpr int CU = VU >= K ? VU / K : 1;
  constexpr int P = K > VU ? K / VU : 1;
  constexpr int NG = kTileGroups / K;  // groups of 256 averages per tile
  constexpr int M = ilog2(NG);
  constexpr int TS = kTileGroups * kFastGroup / (32 * VU);
  constexpr int SG = TS / NG;
  const float inf = __uint_as_float(0x7f800000u);
  float mn[NG], nx[NG];
  float d = 0.0f;
#pragma unroll
  for (int gi = 0; gi < NG; ++gi) {
    mn[gi] = inf;
    nx[gi] = inf;
#pragma unroll
    for (int s = 0; s < SG; ++s) {
      const uint4 r = piece(gi * SG + s);
      const int64_t piece_first = v0 + static_cast<int64_t>((gi * SG + s) * 32 + lane) * VU;
      auto x = [&](int e) { return elem<DT>(r, e); };  // +0.0 past the row end
#pragma unroll
      for (int cc = 0; cc < CU; ++cc) {
        float total;
        int64_t start;
        if constexpr (P == 1) {
          start = piece_first + cc * K;
          total = x(cc * K);
#pragma unroll
          for (int i = 1; i < K; ++i) total = __fadd_rn(total, x(cc * K + i));
        } else {
          start = piece_first - (lane & 1) * VU;
          float half = x(0);
#pragma unroll
          for (int i = 1; i < VU; ++i) half = __fadd_rn(half, x(i));
          total = __shfl_xor_sync(kFull, half, 1);
#pragma unroll
          for (int i = 0; i < VU; ++i) total = __fadd_rn(total, x(i));
        }
        const int64_t count = F - start;
        float mean = count >= K ? __fmul_rn(total, 1.0f / K)
                                : __fdiv_rn(total, static_cast<float>(count > 0 ? count : 1));
        if constexpr (P == 2) {
          const float other = __shfl_xor_sync(kFull, mean, 1);
          mean = (lane & 1) ? mean : other;
        }
        if (count > 0) {
          mn[gi] = min_nan(mn[gi], mean);
          nx[gi] = min_nan(nx[gi], -mean);
        }
        if constexpr (K > 1) {
          constexpr int NV = P == 1 ? K : VU;  // values of this run held by this lane
#pragma unroll
          for (int i = 0; i < NV; ++i) {
            const int e = P == 1 ? cc * K + i : i;
            if (piece_first + e < F) {
              const float dx = __fsub_rn(x(e), mean);
              d = __fmaf_rn(dx, dx, d);
            }
          }
        }
      }
    }
  }
  auto op = [](float a, float b) { return min_nan(a, b); };
  const float lo = transpose_reduce<M>(mn, lane, op);
  const float hi = -transpose_reduce<M>(nx, lane, op);
  const int gq = lane >> (5 - M);
  const int64_t n = (F + K - 1) / K - (v0 / K + static_cast<int64_t>(gq) * kFastGroup);
  const float range = __fsub_rn(hi, lo);
  const bool owner = (lane & ((32 >> M) - 1)) == 0 && n > 0;
  const float nn = static_cast<float>(n < kFastGroup ? n : kFastGroup);
  spread = warp_sum(owner ? __fmul_rn(__fmul_rn(range, range), nn) : 0.0f);
  dev = warp_sum(d);
}

// piece(s): the lane's 16-byte piece of step s of the tile (zeros past the row end).
template <int DT, class Piece>
AQ_DEV void tile_stats(Piece piece, int lane, int64_t v0, int64_t F, float* out) {
  float unused, dev2, dev4, dev8, plain, sp2, sp4, sp8;
  aq_tile_stats<DT, 1>(piece, lane, v0, F, unused, plain);
  aq_tile_stats<DT, 2>(piece, lane, v0, F, dev2, sp2);
  aq_tile_stats<DT, 4>(piece, lane, v0, F, dev4, sp4);
  aq_tile_stats<DT, 8>(piece, lane, v0, F, dev8, sp8);
  if (lane < kStatColumns) {
    // plain b bits: n R^2 / (6 (2^b - 1)^2); AQ k: D_k + k n R^2 / (6 * 3^2)
    float v;
    if (lane == 0) v = __fdiv_rn(plain, 390150.0f);
    else if (lane == 1) v = __fdiv_rn(plain, 1350.0f);
    else if (lane == 2) v = __fdiv_rn(plain, 54.0f);
    else if (lane == 3) v = __fdiv_rn(plain, 6.0f);
    else if (lane == 4) v = __fadd_rn(dev2, __fmul_rn(2.0f, __fdiv_rn(sp2, 54.0f)));
    else if (lane == 5) v = __fadd_rn(dev4, __fmul_rn(4.0f, __fdiv_rn(sp4, 54.0f)));
    else v = __fadd_rn(dev8, __fmul_rn(8.0f, __fdiv_rn(sp8, 54.0f)));
    out[lane] = v;
  }
}

// ---------------------------------------------------------------------------------
// Any group size (a multiple of 32): one code per lane and step, two passes per group.

template <int DT, int K>
AQ_DEV float code_value(const char* row, int64_t j, int64_t F) {
  auto at = [&](int64_t i) -> float {
    if constexpr (DT == kF32) {
      return reinterpret_cast<const float*>(row)[i];
    } else {
      const uint32_t h = reinterpret_cast<const uint16_t*>(row)[i];
      return half16_to_float<DT>(h);
    }
  };
  float total = at(j * K);
#pragma unroll
  for (int i = 1; i < K; ++i) total = __fadd_rn(total, j * K + i < F ? at(j * K + i) : 0.0f);
  if constexpr (K == 1) {
    return total;
  } else {
    const int64_t count = F - j * K;
    return count >= K ? __fmul_rn(total, 1.0f / K) : __fdiv_rn(total, static_cast<float>(count));
  }
}

template <int DT, int B, int K>
AQ_DEV void compress_generic_tile(const char* row, const Tile& c, const CompressParams& p) {
  constexpr int NG = kTileGroups / K;
  constexpr uint32_t kMax = (1u << B) - 1u;
  const int G = p.group_size;
  const int lane = c.lane;
  const float inf = __uint_as_float(0x7f800000u);
  const int64_t ncodes = (c.F + K - 1) / K;
  const int64_t gpr = (ncodes + G - 1) / G;
  const int64_t g0 = c.t * NG;
  const int ng = static_cast<int>(gpr - g0 < NG ? gpr - g0 : NG);
#pragma unroll 1
  for (int gi = 0; gi < ng; ++gi) {
    const int64_t group = g0 + gi;
    const int64_t first = group * G;
    float mn = inf, nx = inf;
#pragma unroll 1
    for (int s = 0; s < G / 32; ++s) {
      const int64_t j = first + s * 32 + lane;
      if (j < ncodes) {
        const float v = code_value<DT, K>(row, j, c.F);
        mn = min_nan(mn, v);
        nx = min_nan(nx, -v);
      }
    }
    float lo = warp_min_nan(mn);
    const float hi = -warp_min_nan(nx);
    const bool finite = ((__float_as_uint(lo) & 0x7f800000u) != 0x7f800000u) &&
                        ((__float_as_uint(hi) & 0x7f800000u) != 0x7f800000u);
    const bool keep_zero = finite && B >= 2 && lo == 0.0f;
    if (keep_zero) {
      float pm = inf;
#pragma unroll 1
      for (int s = 0; s < G / 32; ++s) {
        const int64_t j = first + s * 32 + lane;
        if (j < ncodes) {
          const float v = code_value<DT, K>(row, j, c.F);
          if (v > 0.0f) pm = min_nan(pm, v);
        }
      }
      pm = warp_min_nan(pm);
      if (pm != inf) lo = pm;
    }
    const float lo_r = bf16_round(lo, false);
    const float hi_r = bf16_round(hi, true);
    const bool zero_form = keep_zero || lo_r == hi_r;
    const float m0 = zero_form ? hi_r : lo_r;
    const float m1 = zero_form ? lo_r : hi_r;
    if (lane == 0) p.meta[c.ri.group_off + group] = finite ? meta_word(m0, m1) : kNanMeta;
    const GroupParams g = params_from_meta(m0, m1, B);
    const GroupKeys keys = group_keys(static_cast<uint64_t>(c.idx_row + first), p.big != 0,
                                      p.seed, p.key0);
    uint8_t* bytes = p.payload + c.ri.byte_off + group * (G * B / 8);
#pragma unroll 1
    for (int s = 0; s < G / 32; ++s) {
      const int k = s * 32 + lane;
      const int64_t j = first + k;
      uint32_t q = 0;
      if (finite && j < ncodes) {
        const uint32_t noise = noise_bits(keys, static_cast<uint32_t>(k));
        q = quantize_exact(code_value<DT, K>(row, j, c.F), g, noise);
      }
      store_codes<B, 1, 1>(bytes, k, lane, q & kMax);
    }
  }
}

// ---------------------------------------------------------------------------------

template <int DT>
AQ_HD constexpr int tile_steps() {
  return kTileGroups * kFastGroup / (32 * Elem<DT>::per_piece);
}

// Dynamic shared memory of compress_tiles: two tile stages per warp.
template <int DT>
AQ_HD constexpr int compress_smem_bytes() {
  return kWarpsPerBlock * 2 * tile_steps<DT>() * 32 * static_cast<int>(sizeof(uint4));
}

template <int DT, bool STATS>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) compress_tiles(CompressParams p) {
  constexpr int VU = Elem<DT>::per_piece;
  constexpr int TS = tile_steps<DT>();
  const int lane = threadIdx.x & 31;
  uint4* stages = aq_smem + (threadIdx.x >> 5) * (2 * TS * 32);
  const int64_t total = p.rows * p.tiles_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (tile >= total) return;

  // A lane's pieces of a whole tile: one base address, constant offsets (no per-copy math).
  auto prefetch = [&](const Tile& c, uint4* stage) {
    if (!c.whole) return;
    const char* src = c.row + (c.v0 + static_cast<int64_t>(lane) * VU) * Elem<DT>::size;
#pragma unroll
    for (int s = 0; s < TS; ++s) copy_async16(stage + s * 32 + lane, src + s * 32 * 16);
  };
  prefetch(locate<DT>(p, tile, lane, p.in), stages);
  copy_async_commit();
  for (int k = 0;; ++k) {
    const Tile cur = locate<DT>(p, tile, lane, p.in);  // a mixed-level row table load, early
    const int64_t next = tile + stride;
    const bool more = next < total;
    if (more) prefetch(locate<DT>(p, next, lane, p.in), stages + ((k + 1) & 1) * TS * 32);
    copy_async_commit();
    copy_async_wait<1>();  // this lane's pieces of the current tile have landed
    const uint4* buf = stages + (k & 1) * TS * 32;
    float* stats_at = STATS ? p.stats + (cur.ri.row * p.tiles_per_row + cur.t) * kStatColumns
                            : nullptr;  // in the tensor's row order
    if (cur.whole) {
      if constexpr (STATS) {
        tile_stats<DT>([&](int s) { return buf[s * 32 + lane]; }, lane, cur.v0, cur.F, stats_at);
      }
      with_level(cur.ri.level, [&](auto L) {
        compress_whole_tile<DT, decltype(L)::bits, decltype(L)::avg>(buf, cur, p);
      });
    } else {
      if constexpr (STATS) {
        tile_stats<DT>([&](int s) {
          return load_piece<DT>(cur.row, cur.v0 + static_cast<int64_t>(s * 32 + lane) * VU, cur.F,
                                false, false);
        }, lane, cur.v0, cur.F, stats_at);
      }
      with_level(cur.ri.level, [&](auto L) {
        compress_generic_tile<DT, decltype(L)::bits, decltype(L)::avg>(cur.row, cur, p);
      });
    }
    if (!more) break;
    tile = next;
  }
}

template <int DT>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) compress_generic(CompressParams p) {
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (tile >= p.rows * p.tiles_per_row) return;
  const Tile c = locate<DT>(p, tile, threadIdx.x & 31, p.in);
  with_level(c.ri.level, [&](auto L) {
    compress_generic_tile<DT, decltype(L)::bits, decltype(L)::avg>(c.row, c, p);
  });
}

}  // namespace aq
