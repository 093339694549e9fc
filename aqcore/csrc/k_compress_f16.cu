// Compression kernels for f16 rows.
#include "aq_launch.cuh"

template void aq::launch_compress_kernel<aq::kF16, false>(const aq::CompressParams&);
