// Per-row level allocation on the device (aqcore/allocate.py is the specification, step by
// step): one block searches the Lagrange multiplier 32 ways at a time (warp w tries pattern
// w), then every thread sets its rows, the repair runs as a block-wide prefix sum, and the
// row table of format.py's allocated layout is built with warp ballots, one warp per level.
#include <c10/cuda/CUDAStream.h>

#include "aq_types.h"

namespace aq {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr uint32_t kInfBits = 0x7F800000u;

__device__ __forceinline__ int64_t cost_of(const AllocateParams& p, int64_t row, int l) {
  return p.costs != nullptr ? p.costs[row * p.levels + l] : p.slot[l];
}

// The largest l minimising w[l] + lam * cost[l], each operation rounded (allocate._choices).
__device__ __forceinline__ int choose(const AllocateParams& p, int64_t row, float lam) {
  const float* w = p.weighted + row * p.levels;
  int best = p.levels - 1;
  float best_v = __fadd_rn(w[best], __fmul_rn(lam, static_cast<float>(cost_of(p, row, best))));
  for (int l = p.levels - 2; l >= 0; --l) {
    const float v = __fadd_rn(w[l], __fmul_rn(lam, static_cast<float>(cost_of(p, row, l))));
    if (v < best_v) {
      best_v = v;
      best = l;
    }
  }
  return best;
}

__device__ __forceinline__ int64_t warp_sum(int64_t v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Total cost of every row's choice at multiplier pattern `bits`, summed by one warp.
__device__ int64_t warp_total(const AllocateParams& p, uint32_t bits, int lane) {
  const float lam = __uint_as_float(bits);
  int64_t total = 0;
  for (int64_t r = lane; r < p.rows; r += 32) total += cost_of(p, r, choose(p, r, lam));
  return warp_sum(total);
}

// Inclusive prefix sum over the block (one value per thread, thread order); carry-free.
__device__ int64_t block_scan(int64_t v, int64_t* partial) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t up = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += up;
  }
  if (lane == 31) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int64_t s = partial[lane];
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t up = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += up;
    }
    partial[lane] = s;
  }
  __syncthreads();
  const int64_t before = warp > 0 ? partial[warp - 1] : 0;
  __syncthreads();  // partial is reused by the next call
  return v + before;
}

__global__ void __launch_bounds__(kThreads) allocate_kernel(const AllocateParams p) {
  __shared__ int64_t totals[kWarps];
  __shared__ int64_t partial[kWarps];
  __shared__ uint32_t lo, hi;
  __shared__ int64_t counts[8], bases[8], firsts[8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  // Step 2: the multiplier.
  if (warp == 0) {
    const int64_t at_zero = warp_total(p, 0u, lane);
    if (lane == 0) {
      lo = 0;
      hi = at_zero <= p.budget ? 0u : kInfBits;
    }
  }
  __syncthreads();
  while (hi - lo > 1) {
    const uint64_t span = hi - lo;
    if (warp < kWarps - 1) {
      const uint32_t trial = lo + static_cast<uint32_t>((warp + 1) * span / kWarps);
      const int64_t t = warp_total(p, trial, lane);
      if (lane == 0) totals[warp] = t;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int first = kWarps - 1;
      for (int w = 0; w < kWarps - 1; ++w) {
        if (totals[w] <= p.budget) {
          first = w;
          break;
        }
      }
      const uint32_t l = lo;
      const uint32_t new_hi = first < kWarps - 1 ? l + static_cast<uint32_t>((first + 1) * span / kWarps) : hi;
      lo = first > 0 ? l + static_cast<uint32_t>(first * span / kWarps) : l;
      hi = new_hi;
    }
    __syncthreads();
  }

  // Steps 1 and 3: each row's choice, and the repair in row order.
  const float lam = __uint_as_float(hi);
  const float below = __uint_as_float(hi > 0 ? hi - 1 : 0);
  int64_t spent = 0;
  for (int64_t r = threadIdx.x; r < p.rows; r += kThreads) {
    const int c = choose(p, r, lam);
    p.choice[r] = c;
    spent += cost_of(p, r, c);
  }
  spent = block_scan(spent, partial);
  if (threadIdx.x == kThreads - 1) totals[0] = p.budget - spent;
  __syncthreads();
  const int64_t left = totals[0];
  int64_t carried = 0;
  for (int64_t start = 0; start < p.rows; start += kThreads) {
    const int64_t r = start + threadIdx.x;
    int alt = 0;
    int64_t extra = 0;
    if (r < p.rows) {
      alt = choose(p, r, below);
      extra = cost_of(p, r, alt) - cost_of(p, r, static_cast<int>(p.choice[r]));
      if (extra < 0) extra = 0;
    }
    const int64_t upto = carried + block_scan(extra, partial);
    if (r < p.rows && extra > 0 && upto <= left) p.choice[r] = alt;
    if (threadIdx.x == kThreads - 1) totals[1] = upto;
    __syncthreads();
    carried = totals[1];
    __syncthreads();
  }
  if (p.table == nullptr) return;

  // The row table (every choice is written: the loop above ends on a barrier): warp l
  // ranks the rows of level l, in row order, with ballots.
  if (warp < p.levels) {
    int64_t n = 0;
    for (int64_t start = 0; start < p.rows; start += 32) {
      const int64_t r = start + lane;
      const bool mine = r < p.rows && p.choice[r] == warp;
      const uint32_t ballot = __ballot_sync(0xffffffffu, mine);
      if (mine) p.scratch[r] = n + __popc(ballot & ((1u << lane) - 1));  // rank in its level
      n += __popc(ballot);
    }
    if (lane == 0) counts[warp] = n;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // levels in code order: slots of a lower code come first
    int64_t bytes = 0, slots = 0;
    for (int code = 0; code < 8; ++code) {
      for (int l = 0; l < p.levels; ++l) {
        if (p.code[l] != code) continue;
        bases[l] = bytes;
        firsts[l] = slots;
        bytes += counts[l] * p.slot[l];
        slots += counts[l];
      }
    }
  }
  __syncthreads();
  for (int64_t r = threadIdx.x; r < p.rows; r += kThreads) {
    const int l = static_cast<int>(p.choice[r]);
    const int64_t rank = p.scratch[r];
    const int64_t start = bases[l] + rank * p.slot[l];
    int64_t* e = p.table + 4 * (firsts[l] + rank);
    e[0] = p.code[l];
    e[1] = start;
    e[2] = (start + p.payload[l]) / 4;
    e[3] = r;
  }
}

}  // namespace

void launch_allocate(const AllocateParams& p) {
  allocate_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
}

}  // namespace aq
