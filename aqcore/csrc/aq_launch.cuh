// Launch templates of the tile kernels, instantiated once each in the k_*.cu translation
// units (compiled in parallel). AQ_LAUNCH(blocks, threads, shared bytes, argument, kernel...)
// launches on PyTorch's current stream, and resident_blocks sizes persistent grids, unless
// the includer defined them (a CPU emulator for testing the kernel source).
#pragma once

#ifndef AQ_LAUNCH
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#define AQ_LAUNCH(blocks, threads, smem, arg, ...) \
  __VA_ARGS__<<<(blocks), (threads), (smem), c10::cuda::getCurrentCUDAStream()>>>(arg)

namespace aq {
// Blocks of `kernel` resident on the whole current GPU at once (the persistent grid), after
// raising its dynamic shared memory limit. `cache` (one per kernel: the caller's static)
// keeps the answer per device.
template <class Kernel>
int64_t resident_blocks(Kernel kernel, int threads, int smem, int (&cache)[64]) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 64 && cache[device] > 0) return cache[device];
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int count = (per_sm > 0 ? per_sm : 1) * sms;
  if (device < 64) cache[device] = count;
  return count;
}
}  // namespace aq
#endif

#include "aq_compress.cuh"
#include "aq_decompress.cuh"

namespace aq {

inline int64_t tile_blocks(int64_t tiles) { return (tiles + kWarpsPerBlock - 1) / kWarpsPerBlock; }

template <int DT, bool STATS>
void launch_compress_kernel(const CompressParams& p) {
  const int64_t tiles = p.rows * p.tiles_per_row;
  const int threads = 32 * kWarpsPerBlock;
  if (tiles == 0) return;
  if constexpr (!STATS) {
    if (p.group_size != kFastGroup) {
      AQ_LAUNCH(tile_blocks(tiles), threads, 0, p, compress_generic<DT>);
      return;
    }
  }
  constexpr int smem = compress_smem_bytes<DT>();
  static int cache[64] = {};  // this kernel's resident blocks per device
  const int64_t resident = resident_blocks(compress_tiles<DT, STATS>, threads, smem, cache);
  const int64_t needed = tile_blocks(tiles);
  AQ_LAUNCH(needed < resident ? needed : resident, threads, smem, p, compress_tiles<DT, STATS>);
}

template <int DT>
void launch_decompress_kernel(const DecompressParams& p) {
  const int64_t blocks = tile_blocks(p.rows * p.tiles_per_row);
  const int threads = 32 * kWarpsPerBlock;
  if (blocks == 0) return;
  if (p.group_size != kFastGroup) {
    AQ_LAUNCH(blocks, threads, 0, p, decompress_generic<DT>);
  } else {
    AQ_LAUNCH(blocks, threads, 0, p, decompress_tiles<DT>);
  }
}

extern template void launch_compress_kernel<kF32, false>(const CompressParams&);
extern template void launch_compress_kernel<kF16, false>(const CompressParams&);
extern template void launch_compress_kernel<kBF16, false>(const CompressParams&);
extern template void launch_compress_kernel<kF32, true>(const CompressParams&);
extern template void launch_compress_kernel<kF16, true>(const CompressParams&);
extern template void launch_compress_kernel<kBF16, true>(const CompressParams&);
extern template void launch_decompress_kernel<kF32>(const DecompressParams&);
extern template void launch_decompress_kernel<kF16>(const DecompressParams&);
extern template void launch_decompress_kernel<kBF16>(const DecompressParams&);

}  // namespace aq
