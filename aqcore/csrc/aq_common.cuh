// Device helpers shared by the aqcore kernels.
//
// Everything here reproduces aqcore/reference.py operation by operation: float32 math
// with explicit rounding (no contraction into FMA), the counter-based noise of
// aqcore/noise.py, and the bfloat16 outward rounding of the metadata. Functions that
// need PTX have a portable C++ body as well, so the kernels compile as plain C++ too.
#pragma once

#include <cstdint>
#include <type_traits>

#include "aq_types.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#define AQ_DEV __device__ __forceinline__
#define AQ_HD __host__ __device__ __forceinline__

namespace aq {

constexpr unsigned kFull = 0xffffffffu;

// Level ids: 0..3 plain 8/4/2/1 bits, 4..6 aq1/aq0.5/aq0.25 (2 bits, average of 2/4/8).
constexpr int kLevels = 7;
AQ_HD constexpr int level_bits(int id) { return id < 4 ? (8 >> id) : 2; }
AQ_HD constexpr int level_avg(int id) { return id < 4 ? 1 : (1 << (id - 3)); }

// Call f(std::integral_constant-like tag) with the level id as a compile-time value.
template <int ID> struct LevelTag {
  static constexpr int id = ID;
  static constexpr int bits = level_bits(ID);
  static constexpr int avg = level_avg(ID);
};

template <class F>
AQ_DEV void with_level(int id, F&& f) {
  switch (id) {
    case 0: f(LevelTag<0>{}); break;
    case 1: f(LevelTag<1>{}); break;
    case 2: f(LevelTag<2>{}); break;
    case 3: f(LevelTag<3>{}); break;
    case 4: f(LevelTag<4>{}); break;
    case 5: f(LevelTag<5>{}); break;
    default: f(LevelTag<6>{}); break;
  }
}

AQ_HD constexpr int ilog2(int x) { return x <= 1 ? 0 : 1 + ilog2(x >> 1); }

// ---------------------------------------------------------------------------------
// Element access: a "piece" is 16 bytes of raw input held as a uint4.

template <int DT> struct Elem {
  static constexpr int size = 2;
  static constexpr int per_piece = 8;
};
template <> struct Elem<kF32> {
  static constexpr int size = 4;
  static constexpr int per_piece = 4;
};

AQ_DEV uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

AQ_DEV void set_word(uint4& v, int i, uint32_t w) {
  if (i == 0) v.x = w;
  else if (i == 1) v.y = w;
  else if (i == 2) v.z = w;
  else v.w = w;
}

AQ_DEV float half_bits_to_float(uint32_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
#else
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {
      int e = -14;
      while (!(man & 0x400u)) {
        man <<= 1;
        --e;
      }
      bits = sign | (static_cast<uint32_t>(e + 127) << 23) | ((man & 0x3ffu) << 13);
    }
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  return __uint_as_float(bits);
#endif
}

// Round-to-nearest-even float -> 16-bit, two values at a time (lo in the low half).
AQ_DEV uint32_t pack_bf16x2(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
#else
  auto one = [](float f) -> uint32_t {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
  };
  return one(lo) | (one(hi) << 16);
#endif
}

AQ_DEV uint32_t pack_f16x2(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
#else
  auto one = [](float f) -> uint32_t {
    uint32_t x = __float_as_uint(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return sign | 0x7e00u;
    if (x >= 0x477ff000u) return sign | 0x7c00u;  // rounds to infinity
    if (x < 0x38800000u) {  // half subnormal or zero: let a float add do the rounding
      const float r = __uint_as_float(x) + 0.5f;
      return sign | (__float_as_uint(r) - 0x3f000000u);
    }
    const uint32_t odd = (x >> 13) & 1u;
    x += 0xc8000fffu + odd;  // rebias the exponent (-112 << 23) and round half to even
    return sign | (x >> 13);
  };
  return one(lo) | (one(hi) << 16);
#endif
}

// Element e (compile-time after unrolling) of a raw piece, as float.
template <int DT>
AQ_DEV float elem(const uint4& v, int e) {
  if constexpr (DT == kF32) {
    return __uint_as_float(word(v, e));
  } else {
    const uint32_t w = word(v, e >> 1);
    if constexpr (DT == kBF16) {
      return __uint_as_float((e & 1) ? (w & 0xffff0000u) : (w << 16));
    } else {
      return half_bits_to_float((e & 1) ? (w >> 16) : (w & 0xffffu));
    }
  }
}

// Raw bits of element e of a piece (16 or 32 bits).
template <int DT>
AQ_DEV uint32_t elem_bits(const uint4& v, int e) {
  if constexpr (DT == kF32) {
    return word(v, e);
  } else {
    const uint32_t w = word(v, e >> 1);
    return (e & 1) ? (w >> 16) : (w & 0xffffu);
  }
}

template <int DT>
AQ_DEV void set_elem_bits(uint4& v, int e, uint32_t bits) {
  if constexpr (DT == kF32) {
    set_word(v, e, bits);
  } else {
    const uint32_t w = word(v, e >> 1);
    set_word(v, e >> 1, (e & 1) ? ((w & 0xffffu) | (bits << 16)) : ((w & 0xffff0000u) | bits));
  }
}

// Loads elements [first, first + per_piece) of a row of n elements; elements past the end
// read as +0.0 (the reference pads AQ runs with zeros). `aligned`: the row starts on 16 bytes;
// `whole`: the caller knows the piece is aligned and inside the row.
template <int DT>
AQ_DEV uint4 load_piece(const void* row, int64_t first, int64_t n, bool aligned,
                        bool whole) {
  constexpr int VU = Elem<DT>::per_piece;
  if (whole || (aligned && first + VU <= n)) {
    return *reinterpret_cast<const uint4*>(static_cast<const char*>(row) + first * Elem<DT>::size);
  }
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int e = 0; e < VU; ++e) {
    if (first + e < n) {
      uint32_t bits;
      if constexpr (DT == kF32) {
        bits = static_cast<const uint32_t*>(row)[first + e];
      } else {
        bits = static_cast<const uint16_t*>(row)[first + e];
      }
      set_elem_bits<DT>(v, e, bits);
    }
  }
  return v;
}

// Stores the 16 bytes of a piece's output bits to elements [first, first + VU) of a row of
// n elements, skipping elements past the end.
template <int DT>
AQ_DEV void store_piece_bits(void* row, int64_t first, int64_t n, bool aligned, bool whole,
                             const uint4& out) {
  constexpr int VU = Elem<DT>::per_piece;
  if (whole || (aligned && first + VU <= n)) {
    *reinterpret_cast<uint4*>(static_cast<char*>(row) + first * Elem<DT>::size) = out;
    return;
  }
#pragma unroll
  for (int e = 0; e < VU; ++e) {
    if (first + e < n) {
      if constexpr (DT == kF32) {
        static_cast<uint32_t*>(row)[first + e] = elem_bits<DT>(out, e);
      } else {
        static_cast<uint16_t*>(row)[first + e] = static_cast<uint16_t>(elem_bits<DT>(out, e));
      }
    }
  }
}

// Stores a piece of float values, converted round-to-nearest-even.
template <int DT>
AQ_DEV void store_piece(void* row, int64_t first, int64_t n, bool aligned, bool whole,
                        const float (&v)[Elem<DT>::per_piece]) {
  uint4 out;
  if constexpr (DT == kF32) {
    out = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                     __float_as_uint(v[3]));
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = DT == kBF16 ? pack_bf16x2(v[2 * i], v[2 * i + 1]) : pack_f16x2(v[2 * i], v[2 * i + 1]);
    }
    out = make_uint4(w[0], w[1], w[2], w[3]);
  }
  store_piece_bits<DT>(row, first, n, aligned, whole, out);
}

// Asynchronous 16-byte global -> shared copies (cp.async, L2 only): a warp prefetches its
// next tile while it computes on the current one.
AQ_DEV void copy_async16(uint4* shared_dst, const void* global_src) {
#if defined(__CUDA_ARCH__)
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(global_src) : "memory");
#else
  *shared_dst = *static_cast<const uint4*>(global_src);
#endif
}

AQ_DEV void copy_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most N committed groups of this thread's copies are still in flight.
template <int N>
AQ_DEV void copy_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// ---------------------------------------------------------------------------------
// NaN-propagating minimum (torch.amin semantics): float, and packed 16-bit pairs.

AQ_DEV float min_nan(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  if (a != a) return a;
  if (b != b) return b;
  return b < a ? b : a;
#endif
}

template <int DT, bool MAX>
AQ_DEV uint32_t minmax2_nan(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  if constexpr (DT == kBF16 && MAX) {
    asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  } else if constexpr (DT == kBF16) {
    asm("min.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  } else if constexpr (MAX) {
    asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  } else {
    asm("min.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  }
  return r;
#else
  auto to_f = [](uint32_t h) {
    return DT == kBF16 ? __uint_as_float(h << 16) : half_bits_to_float(h);
  };
  auto one = [&](uint32_t x, uint32_t y) -> uint32_t {
    const float fx = to_f(x), fy = to_f(y);
    if (fx != fx || fy != fy) return 0x7fffu;
    return (MAX ? fy > fx : fy < fx) ? y : x;
  };
  return one(a & 0xffffu, b & 0xffffu) | (one(a >> 16, b >> 16) << 16);
#endif
}

template <int DT>
AQ_DEV uint32_t min2_nan(uint32_t a, uint32_t b) { return minmax2_nan<DT, false>(a, b); }

template <int DT>
AQ_DEV uint32_t max2_nan(uint32_t a, uint32_t b) { return minmax2_nan<DT, true>(a, b); }

// Flips the sign of both halves (a - b order is irrelevant: used to turn max into min).
AQ_DEV uint32_t neg2(uint32_t a) { return a ^ 0x80008000u; }

template <int DT>
AQ_DEV float half16_to_float(uint32_t h) {
  return DT == kBF16 ? __uint_as_float(h << 16) : half_bits_to_float(h);
}

// ---------------------------------------------------------------------------------
// bfloat16 outward rounding (reference.bf16_round_outward): returns float32, never -0.

AQ_DEV float bf16_round(float x, bool up) {
  const uint32_t bits = __float_as_uint(x);
  uint32_t r = bits & 0xffff0000u;
  const bool away = up ? (x > 0.0f) : (x < 0.0f);
  if (r != bits && away) r += 0x10000u;
  return __fadd_rn(__uint_as_float(r), 0.0f);
}

// ---------------------------------------------------------------------------------
// Counter-based noise (noise.py): one hash per pair of codes p = i >> 1,
// h = mix32(lo(p) ^ key(seed, hi(p))), u = (half + 0.5) * 2^-16 with half = h >> 16 for an
// even code index i and h & 0xffff for an odd one.
//
// The kernels carry a code's noise as "noise bits": the float 2^23 + half, whose low 16
// mantissa bits are the half. noise_value turns them into u with one exact FMA.

constexpr uint32_t kMix1 = 0x7feb352du;
constexpr uint32_t kMix2 = 0x846ca68bu;
constexpr uint32_t kGolden = 0x9e3779b9u;
constexpr uint32_t kMagic = 0x4b000000u;  // float bits of 2^23: integers 0..2^23 in the mantissa

// The middle of mix32: mix32(x) == y ^ (y >> 16) with y = mix_rounds(x ^ (x >> 16)). The
// last xorshift is left to the half extraction (even_bits / odd_bits), where it is free.
AQ_DEV uint32_t mix_rounds(uint32_t x) {
  x *= kMix1;
  x ^= x >> 15;
  return x * kMix2;
}

AQ_DEV uint32_t mix32(uint32_t x) {
  const uint32_t y = mix_rounds(x ^ (x >> 16));
  return y ^ (y >> 16);
}

AQ_DEV uint32_t stream_key(uint64_t seed, uint32_t hi) {
  const uint32_t inner = mix32(static_cast<uint32_t>(seed >> 32) ^ mix32(hi ^ kGolden));
  return mix32(static_cast<uint32_t>(seed) ^ inner);
}

// Bytes of a and b picked by the four selector nibbles (PRMT; b's bytes are 4..7).
AQ_DEV uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t selector) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, selector);
#else
  const uint64_t both = static_cast<uint64_t>(a) | (static_cast<uint64_t>(b) << 32);
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t pick = (selector >> (4 * i)) & 7u;
    r |= static_cast<uint32_t>((both >> (8 * pick)) & 0xffu) << (8 * i);
  }
  return r;
#endif
}

// Noise bits of the even code of a pair (the high half of h = high half of y): one funnel
// shift of (kMagic >> 16 : y).
AQ_DEV uint32_t even_bits(uint32_t y) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(y, kMagic >> 16, 16);
#else
  return (y >> 16) | kMagic;
#endif
}

// Noise bits of the odd code (low half of h = y_lo ^ y_hi), from the even code's bits.
AQ_DEV uint32_t odd_bits(uint32_t y, uint32_t even) { return (y & 0xffffu) ^ even; }

// u = (half + 0.5) * 2^-16 from noise bits: (2^23 + half) * 2^-16 - (128 - 2^-17), exact.
AQ_DEV float noise_value(uint32_t bits) {
  return __fmaf_rn(__uint_as_float(bits), 1.52587890625e-05f, -127.99999237060546875f);
}

// t + u, rounded once (the reference's t + u).
AQ_DEV float add_noise(float t, uint32_t bits) { return __fadd_rn(t, noise_value(bits)); }

// Keys of the pair blocks a group starting at absolute code index `first` can touch.
struct GroupKeys {
  uint32_t lo0;    // low 32 bits of the pair index of the group's first code
  uint32_t key_a;  // key of that pair's block of 2^32 pairs
  uint32_t key_b;  // key of the next block (a group crosses at most one boundary)
  uint32_t odd;    // the group's first code index is odd
};

AQ_DEV GroupKeys group_keys(uint64_t first, bool big, uint64_t seed, uint32_t key0) {
  GroupKeys k;
  const uint64_t pair = first >> 1;
  k.lo0 = static_cast<uint32_t>(pair);
  k.odd = static_cast<uint32_t>(first & 1u);
  if (big) {
    const uint32_t hi = static_cast<uint32_t>(pair >> 32);
    k.key_a = stream_key(seed, hi);
    k.key_b = stream_key(seed, hi + 1u);
  } else {
    k.key_a = k.key_b = key0;
  }
  return k;
}

// Noise bits of the code at offset `off` (< 2^31) after the group's first code: any index.
AQ_DEV uint32_t noise_bits(const GroupKeys& k, uint32_t off) {
  const uint32_t s = k.odd + off;
  const uint32_t lo = k.lo0 + (s >> 1);
  const uint32_t key = lo < k.lo0 ? k.key_b : k.key_a;
  const uint32_t x = lo ^ key;
  const uint32_t y = mix_rounds(x ^ (x >> 16));
  const uint32_t even = even_bits(y);
  return (s & 1u) ? odd_bits(y, even) : even;
}

// Noise bits of CU consecutive codes whose first code is even and whose first pair lo is a
// multiple of CU / 2, from a = lo ^ (lo >> 16) ^ key ^ (key >> 16): pair lo + j has the
// same high half, so mix32's first round of pair j is a ^ j (no carry, no second key).
template <int CU>
AQ_DEV void piece_noise(uint32_t a, uint32_t (&bits)[CU]) {
  static_assert(CU % 2 == 0, "whole pairs");
#pragma unroll
  for (int j = 0; j < CU / 2; ++j) {
    const uint32_t y = mix_rounds(a ^ static_cast<uint32_t>(j));
    bits[2 * j] = even_bits(y);
    bits[2 * j + 1] = odd_bits(y, bits[2 * j]);
  }
}

// Unsigned minimum kept as one instruction (the compiler would fold a clamp followed by a
// shift into compare + select of pre-shifted constants).
AQ_DEV uint32_t umin_opaque(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("min.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
#else
  return a < b ? a : b;
#endif
}

// bits | (1 << shift) when x >= 1 (a 1-bit code: min(floor(x), 1) for x >= 0).
AQ_DEV uint32_t set_bit_if_at_least_one(uint32_t bits, float x, uint32_t mask) {
#if defined(__CUDA_ARCH__)
  asm("{\n .reg .pred p;\n setp.ge.f32 p, %1, 0f3F800000;\n @p or.b32 %0, %0, %2;\n}"
      : "+r"(bits)
      : "f"(x), "r"(mask));
  return bits;
#else
  return x >= 1.0f ? (bits | mask) : bits;
#endif
}

// ---------------------------------------------------------------------------------
// One group's quantization parameters, derived from its bf16 metadata (format.py).

struct GroupParams {
  float base;      // grid origin: m0 (plain) or m1 (zero-keeping)
  float scale;     // levels / span (compress)
  float step;      // span / levels (decompress)
  float span;
  uint32_t levels; // number of grid steps: 2^b - 1, one less when zero-keeping
  bool zero_form;
};

AQ_DEV GroupParams params_from_meta(float m0, float m1, int bits) {
  GroupParams g;
  g.zero_form = m0 >= m1;
  g.base = g.zero_form ? m1 : m0;
  g.span = g.zero_form ? __fsub_rn(m0, m1) : __fsub_rn(m1, m0);
  g.levels = ((1u << bits) - 1u) - (g.zero_form ? 1u : 0u);
  const float levels_f = static_cast<float>(g.levels);
  g.scale = __fdiv_rn(levels_f, g.span);
  g.step = g.levels > 0 ? __fdiv_rn(g.span, levels_f) : 0.0f;
  return g;
}

// The reference's rounding of one value, every special case included:
// q = min(max(floor(t + u), 0), levels) with NaN -> 0, then the zero-keeping shift.
AQ_DEV uint32_t quantize_exact(float v, const GroupParams& g, uint32_t noise) {
  uint32_t q = 0;
  if (g.span > 0.0f) {
    const float t = __fmul_rn(__fsub_rn(v, g.base), g.scale);
    q = __float2uint_rd(add_noise(t, noise));  // saturates: negatives and NaN give 0
    q = q < g.levels ? q : g.levels;
  }
  q += g.zero_form ? 1u : 0u;
  return (g.zero_form && v == 0.0f) ? 0u : q;
}

// Dequantization of one code (reference.dequantize_groups).
AQ_DEV float dequantize(uint32_t code, const GroupParams& g) {
  // float(code - zero_form) exactly, via the 2^23 magic number (code < 256).
  const float grid = __fsub_rn(__uint_as_float(0x4b000000u | code),
                               g.zero_form ? 8388609.0f : 8388608.0f);
  const float v = __fadd_rn(g.base, __fmul_rn(grid, g.step));
  return (g.zero_form && code == 0) ? 0.0f : v;
}

// bf16 metadata of a group: (m0, m1) packed as m0 | m1 << 16; NaN for non-finite groups.
constexpr uint32_t kNanMeta = 0x7fc07fc0u;

AQ_DEV uint32_t meta_word(float m0, float m1) {
  return (__float_as_uint(m0) >> 16) | (__float_as_uint(m1) & 0xffff0000u);
}

AQ_DEV float meta_lo(uint32_t w) { return __uint_as_float(w << 16); }
AQ_DEV float meta_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// ---------------------------------------------------------------------------------
// Warp reductions.

// Reduces 2^M values per lane over the warp with a transposing butterfly: afterwards the
// lane holds the full reduction of value number (lane >> (5 - M)). 2^M + 5 - M - 1
// shuffles instead of 5 * 2^M.
template <int M, class T, class Op>
AQ_DEV T transpose_reduce(T (&a)[1 << M], int lane, Op op) {
#pragma unroll
  for (int i = 0; i < M; ++i) {
    const int d = 16 >> i;
    constexpr int n = 1 << M;
    const int h = n >> (i + 1);
    const bool up = (lane & d) != 0;
#pragma unroll
    for (int j = 0; j < (n >> 1); ++j) {
      if (j < h) {
        const T send = up ? a[j] : a[j + h];
        const T keep = up ? a[j + h] : a[j];
        a[j] = op(keep, __shfl_xor_sync(kFull, send, d));
      }
    }
  }
#pragma unroll
  for (int d = 16 >> M; d >= 1; d >>= 1) a[0] = op(a[0], __shfl_xor_sync(kFull, a[0], d));
  return a[0];
}

template <class T>
AQ_DEV T warp_sum(T v) {
#pragma unroll
  for (int d = 16; d >= 1; d >>= 1) v += __shfl_xor_sync(kFull, v, d);
  return v;
}

AQ_DEV float warp_min_nan(float v) {
#pragma unroll
  for (int d = 16; d >= 1; d >>= 1) v = min_nan(v, __shfl_xor_sync(kFull, v, d));
  return v;
}

// ORs byte fragments of `lanes` consecutive lanes (a power of two <= 32) together.
AQ_DEV uint32_t or_lanes(uint32_t v, int lanes) {
  for (int m = 1; m < lanes; m <<= 1) v |= __shfl_xor_sync(kFull, v, m);
  return v;
}

}  // namespace aq
