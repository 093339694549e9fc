// Compression kernels for f16 rows that also emit the error-model statistics.
#include "aq_launch.cuh"

template void aq::launch_compress_kernel<aq::kF16, true>(const aq::CompressParams&);
