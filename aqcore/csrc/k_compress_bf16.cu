// Compression kernels for bf16 rows.
#include "aq_launch.cuh"

template void aq::launch_compress_kernel<aq::kBF16, false>(const aq::CompressParams&);
