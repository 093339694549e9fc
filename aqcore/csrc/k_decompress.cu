// Decompression kernels for every output dtype.
#include "aq_launch.cuh"

template void aq::launch_decompress_kernel<aq::kF32>(const aq::DecompressParams&);
template void aq::launch_decompress_kernel<aq::kF16>(const aq::DecompressParams&);
template void aq::launch_decompress_kernel<aq::kBF16>(const aq::DecompressParams&);
