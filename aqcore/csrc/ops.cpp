// PyTorch bindings of the aqcore kernels: device checks, the current device, launches.
// Buffers are allocated by aqcore/kernels.py; this file only fills them.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "aq_params.h"

namespace {

void check_cuda(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->is_cuda() && t->device() == tensors.begin()[0]->device(),
                "aqcore kernels need all tensors on the same CUDA device");
  }
}

void compress(const at::Tensor& rows, at::Tensor& payload, at::Tensor& meta,
              const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& stats,
              int64_t level, int64_t group_size, int64_t seed, int64_t key0, int64_t row_bytes,
              int64_t row_groups) {
  check_cuda({&rows, &payload, &meta});
  if (table.has_value()) check_cuda({&rows, &*table});
  if (stats.has_value()) check_cuda({&rows, &*stats});
  const c10::cuda::CUDAGuard guard(rows.device());
  const aq::CompressParams p = aq::compress_params(rows, payload, meta, table, stats, level,
                                                   group_size, seed, key0, row_bytes, row_groups);
  aq::launch_compress(aq::dtype_code(rows.scalar_type()), p, stats.has_value());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void decompress(const at::Tensor& payload, const at::Tensor& meta, at::Tensor& out,
                const c10::optional<at::Tensor>& table, int64_t level, int64_t group_size,
                int64_t row_bytes, int64_t row_groups) {
  check_cuda({&out, &payload, &meta});
  if (table.has_value()) check_cuda({&out, &*table});
  const c10::cuda::CUDAGuard guard(out.device());
  const aq::DecompressParams p =
      aq::decompress_params(payload, meta, out, table, level, group_size, row_bytes, row_groups);
  aq::launch_decompress(aq::dtype_code(out.scalar_type()), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void pack_bits(const at::Tensor& mask, at::Tensor& out) {
  check_cuda({&mask, &out});
  TORCH_CHECK(out.numel() == (mask.numel() + 7) / 8, "out must hold ceil(n / 8) bytes");
  const c10::cuda::CUDAGuard guard(mask.device());
  aq::launch_pack_bits(aq::bits_params(mask, out, mask.numel()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void unpack_bits(const at::Tensor& packed, at::Tensor& out) {
  check_cuda({&out, &packed});
  TORCH_CHECK(packed.numel() >= (out.numel() + 7) / 8, "packed holds too few bytes");
  const c10::cuda::CUDAGuard guard(out.device());
  aq::launch_unpack_bits(aq::bits_params(packed, out, out.numel()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compress", &compress, "fused compression of (rows, values) into payload + meta");
  m.def("decompress", &decompress, "fused decompression into (rows, values)");
  m.def("pack_bits", &pack_bits, "pack a byte mask at one bit per value (nonzero -> 1)");
  m.def("unpack_bits", &unpack_bits, "unpack a bit mask into 0/1 bytes");
}
