// The launch functions of aq_types.h: the runtime dtype switch, and the mask kernels.
#include "aq_bits.cuh"
#include "aq_zero.cuh"
#include "aq_launch.cuh"

namespace aq {

void launch_compress(int dtype, const CompressParams& p, bool stats) {
  if (dtype == kF32) {
    stats ? launch_compress_kernel<kF32, true>(p) : launch_compress_kernel<kF32, false>(p);
  } else if (dtype == kF16) {
    stats ? launch_compress_kernel<kF16, true>(p) : launch_compress_kernel<kF16, false>(p);
  } else {
    stats ? launch_compress_kernel<kBF16, true>(p) : launch_compress_kernel<kBF16, false>(p);
  }
}

void launch_decompress(int dtype, const DecompressParams& p) {
  if (dtype == kF32) launch_decompress_kernel<kF32>(p);
  else if (dtype == kF16) launch_decompress_kernel<kF16>(p);
  else launch_decompress_kernel<kBF16>(p);
}

static int64_t bits_blocks(int64_t n) {
  const int64_t chunks = (n + 15) / 16;
  const int64_t per_block = static_cast<int64_t>(kBitsThreads) * kChunksPerThread;
  return (chunks + per_block - 1) / per_block;
}

void launch_pack_bits(const BitsParams& b) {
  const int64_t blocks = bits_blocks(b.n);
  if (blocks > 0) AQ_LAUNCH(blocks, kBitsThreads, 0, b, pack_bits_kernel);
}

void launch_unpack_bits(const BitsParams& b) {
  const int64_t blocks = bits_blocks(b.n);
  if (blocks > 0) AQ_LAUNCH(blocks, kBitsThreads, 0, b, unpack_bits_kernel);
}

void launch_zero_if(const ZeroParams& p) {
  const int64_t blocks = static_cast<int64_t>(kZeroBlocks) * p.count;
  if (blocks > 0) AQ_LAUNCH(blocks, kZeroThreads, 0, p, zero_if_kernel);
}

}  // namespace aq
