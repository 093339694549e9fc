// Compression kernels for bf16 rows that also emit the error-model statistics.
#include "aq_launch.cuh"

template void aq::launch_compress_kernel<aq::kBF16, true>(const aq::CompressParams&);
