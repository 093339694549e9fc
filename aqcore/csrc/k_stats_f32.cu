// Compression kernels for f32 rows that also emit the error-model statistics.
#include "aq_launch.cuh"

template void aq::launch_compress_kernel<aq::kF32, true>(const aq::CompressParams&);
