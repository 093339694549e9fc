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

void allocate(const at::Tensor& weighted, const c10::optional<at::Tensor>& costs, int64_t budget,
              at::Tensor& choice, const c10::optional<at::Tensor>& table, at::Tensor& scratch,
              const std::vector<int64_t>& codes, const std::vector<int64_t>& slots,
              const std::vector<int64_t>& payloads) {
  check_cuda({&weighted, &choice, &scratch});
  TORCH_CHECK(weighted.dim() == 2 && weighted.scalar_type() == at::kFloat && weighted.is_contiguous(),
              "weighted must be a contiguous (rows, levels) float32 tensor");
  const int64_t rows = weighted.size(0), levels = weighted.size(1);
  TORCH_CHECK(levels >= 1 && levels <= 8, "1 to 8 levels");
  TORCH_CHECK(choice.scalar_type() == at::kLong && choice.numel() == rows && scratch.numel() == rows &&
                  scratch.scalar_type() == at::kLong, "choice and scratch: (rows,) int64");
  aq::AllocateParams p{};
  p.weighted = weighted.data_ptr<float>();
  if (costs.has_value()) {
    check_cuda({&weighted, &*costs});
    TORCH_CHECK(costs->scalar_type() == at::kLong && costs->is_contiguous() &&
                    costs->numel() == rows * levels, "costs: contiguous (rows, levels) int64");
    p.costs = costs->data_ptr<int64_t>();
  }
  if (table.has_value()) {
    check_cuda({&weighted, &*table});
    TORCH_CHECK(table->scalar_type() == at::kLong && table->is_contiguous() && table->numel() == 4 * rows,
                "table: contiguous (rows, 4) int64");
    TORCH_CHECK(static_cast<int64_t>(codes.size()) == levels && static_cast<int64_t>(payloads.size()) == levels,
                "a table needs codes and payloads per level");
    p.table = table->data_ptr<int64_t>();
  }
  TORCH_CHECK(costs.has_value() || static_cast<int64_t>(slots.size()) == levels,
              "without costs, slots gives the cost per level");
  p.choice = choice.data_ptr<int64_t>();
  p.scratch = scratch.data_ptr<int64_t>();
  p.rows = rows;
  p.budget = budget;
  p.levels = static_cast<int>(levels);
  for (int l = 0; l < p.levels; ++l) {
    p.code[l] = l < static_cast<int>(codes.size()) ? static_cast<int>(codes[l]) : 0;
    p.slot[l] = l < static_cast<int>(slots.size()) ? slots[l] : 0;
    p.payload[l] = l < static_cast<int>(payloads.size()) ? payloads[l] : 0;
  }
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(weighted.device());
  aq::launch_allocate(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void zero_if(const at::Tensor& flag, const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK(flag.is_cuda() && flag.numel() == 1 && flag.scalar_type() == at::kBool,
              "flag must be one CUDA bool");
  const c10::cuda::CUDAGuard guard(flag.device());
  aq::ZeroParams p{};
  p.flag = reinterpret_cast<const uint8_t*>(flag.data_ptr<bool>());
  for (const at::Tensor& t : tensors) {
    check_cuda({&flag, &t});
    TORCH_CHECK(t.is_non_overlapping_and_dense(), "zero_if takes dense tensors");
    p.data[p.count] = static_cast<uint8_t*>(t.data_ptr());
    p.bytes[p.count] = t.numel() * t.element_size();
    if (++p.count == aq::kZeroTensors) {
      aq::launch_zero_if(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      p.count = 0;
    }
  }
  aq::launch_zero_if(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compress", &compress, "fused compression of (rows, values) into payload + meta");
  m.def("decompress", &decompress, "fused decompression into (rows, values)");
  m.def("pack_bits", &pack_bits, "pack a byte mask at one bit per value (nonzero -> 1)");
  m.def("unpack_bits", &unpack_bits, "unpack a bit mask into 0/1 bytes");
  m.def("zero_if", &zero_if, "zero dense tensors in place when a device bool is set");
  m.def("allocate", &allocate, "per-row level allocation under a byte budget (allocate.py)");
}
