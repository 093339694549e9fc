// Kernel parameters from tensors (host code shared by the bindings and their tests).
#pragma once

#include <torch/extension.h>

#include "aq_types.h"

namespace aq {

inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "aqcore kernels take float32, float16 or bfloat16, not ", t);
  }
  return kF32;
}

inline const int64_t* table_ptr(const c10::optional<at::Tensor>& table, int64_t rows) {
  if (!table.has_value()) return nullptr;
  TORCH_CHECK(table->scalar_type() == at::kLong && table->is_contiguous() &&
                  table->numel() == 4 * rows,
              "table must hold (level, byte offset, group offset, row) per row as int64");
  return table->data_ptr<int64_t>();
}

inline int64_t tiles_per_row(int64_t row_numel, int64_t group_size) {
  const int64_t tile = kTileGroups * group_size;
  return (row_numel + tile - 1) / tile;
}

inline void check_group_size(int64_t group_size) {
  TORCH_CHECK(group_size >= 32 && group_size % 32 == 0,
              "group_size must be a positive multiple of 32, got ", group_size);
}

inline CompressParams compress_params(const at::Tensor& rows, at::Tensor& payload, at::Tensor& meta,
                                      const c10::optional<at::Tensor>& table,
                                      const c10::optional<at::Tensor>& stats, int64_t level,
                                      int64_t group_size, int64_t seed, int64_t key0,
                                      int64_t row_bytes, int64_t row_groups) {
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous(), "rows must be contiguous (rows, values)");
  TORCH_CHECK(payload.scalar_type() == at::kByte && payload.is_contiguous(), "payload must be uint8");
  TORCH_CHECK(meta.element_size() * meta.numel() % 4 == 0 && meta.is_contiguous(),
              "meta must be contiguous (groups, 2) bfloat16");
  check_group_size(group_size);
  CompressParams p{};
  p.in = rows.data_ptr();
  p.payload = payload.data_ptr<uint8_t>();
  p.meta = static_cast<uint32_t*>(meta.data_ptr());
  p.rows = rows.size(0);
  p.row_numel = rows.size(1);
  p.table = table_ptr(table, p.rows);
  p.tiles_per_row = tiles_per_row(p.row_numel, group_size);
  p.row_bytes = row_bytes;
  p.row_groups = row_groups;
  p.seed = static_cast<uint64_t>(seed);
  p.key0 = static_cast<uint32_t>(key0);
  p.level = static_cast<int32_t>(level);
  p.group_size = static_cast<int32_t>(group_size);
  p.big = static_cast<uint64_t>(p.rows) * static_cast<uint64_t>(p.row_numel) > (1ull << 33);
  if (stats.has_value()) {
    TORCH_CHECK(group_size == kFastGroup, "fused error statistics need group_size 256");
    TORCH_CHECK(stats->scalar_type() == at::kFloat && stats->is_contiguous() &&
                    stats->numel() == p.rows * p.tiles_per_row * kStatColumns,
                "stats must be float32 (tiles, 7)");
    p.stats = stats->data_ptr<float>();
  }
  return p;
}

inline DecompressParams decompress_params(const at::Tensor& payload, const at::Tensor& meta,
                                          at::Tensor& out, const c10::optional<at::Tensor>& table,
                                          int64_t level, int64_t group_size, int64_t row_bytes,
                                          int64_t row_groups) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "out must be contiguous (rows, values)");
  TORCH_CHECK(payload.scalar_type() == at::kByte && payload.is_contiguous(), "payload must be uint8");
  TORCH_CHECK(meta.is_contiguous(), "meta must be contiguous");
  check_group_size(group_size);
  DecompressParams p{};
  p.payload = payload.data_ptr<uint8_t>();
  p.meta = static_cast<const uint32_t*>(meta.data_ptr());
  p.out = out.data_ptr();
  p.rows = out.size(0);
  p.row_numel = out.size(1);
  p.table = table_ptr(table, p.rows);
  p.tiles_per_row = tiles_per_row(p.row_numel, group_size);
  p.row_bytes = row_bytes;
  p.row_groups = row_groups;
  p.level = static_cast<int32_t>(level);
  p.group_size = static_cast<int32_t>(group_size);
  return p;
}

inline BitsParams bits_params(const at::Tensor& in, at::Tensor& out, int64_t n) {
  TORCH_CHECK(in.is_contiguous() && out.is_contiguous() && in.element_size() == 1 &&
                  out.element_size() == 1,
              "bit packing works on contiguous 1-byte tensors");
  BitsParams b{};
  b.in = static_cast<const uint8_t*>(in.data_ptr());
  b.out = static_cast<uint8_t*>(out.data_ptr());
  b.n = n;
  b.aligned = ((reinterpret_cast<uintptr_t>(b.in) | reinterpret_cast<uintptr_t>(b.out)) & 15) == 0;
  return b;
}

}  // namespace aq
