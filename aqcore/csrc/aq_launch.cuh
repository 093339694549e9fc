// Launch templates of the tile kernels, instantiated once each in the k_*.cu translation
// units (compiled in parallel). AQ_LAUNCH(blocks, threads, argument, kernel...) launches on
// PyTorch's current stream unless the includer defined it (the CPU emulator of the tests).
#pragma once

#ifndef AQ_LAUNCH
#include <c10/cuda/CUDAStream.h>
#define AQ_LAUNCH(blocks, threads, arg, ...) \
  __VA_ARGS__<<<(blocks), (threads), 0, c10::cuda::getCurrentCUDAStream()>>>(arg)
#endif

#include "aq_compress.cuh"
#include "aq_decompress.cuh"

namespace aq {

inline int64_t tile_blocks(int64_t tiles) { return (tiles + kWarpsPerBlock - 1) / kWarpsPerBlock; }

template <int DT, bool STATS>
void launch_compress_kernel(const CompressParams& p) {
  const int64_t blocks = tile_blocks(p.rows * p.tiles_per_row);
  const int threads = 32 * kWarpsPerBlock;
  if (blocks == 0) return;
  if constexpr (STATS) {
    AQ_LAUNCH(blocks, threads, p, compress_tiles<DT, true>);
  } else if (p.group_size != kFastGroup) {
    AQ_LAUNCH(blocks, threads, p, compress_generic<DT>);
  } else {
    AQ_LAUNCH(blocks, threads, p, compress_tiles<DT, false>);
  }
}

template <int DT>
void launch_decompress_kernel(const DecompressParams& p) {
  const int64_t blocks = tile_blocks(p.rows * p.tiles_per_row);
  const int threads = 32 * kWarpsPerBlock;
  if (blocks == 0) return;
  if (p.group_size != kFastGroup) {
    AQ_LAUNCH(blocks, threads, p, decompress_generic<DT>);
  } else {
    AQ_LAUNCH(blocks, threads, p, decompress_tiles<DT>);
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
