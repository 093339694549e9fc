// Compression kernels for f32 rows.
#include "aq_launch.cuh"

template void aq::launch_compress_kernel<aq::kF32, false>(const aq::CompressParams&);
