// The kernels of aqcore/csrc built for the CPU emulator, with the bindings of ops.cpp and two
// test hooks (the persistent grid size, and the noise of both hash paths).
#include "emu_prelude.h"
#include "k_compress_bf16.cu"
#include "k_compress_f16.cu"
#include "k_compress_f32.cu"
#include "k_decompress.cu"
#include "k_dispatch.cu"
#include "k_stats_bf16.cu"
#include "k_stats_f16.cu"
#include "k_stats_f32.cu"
#include "aq_params.h"

namespace aq {
uint4 aq_smem[kWarpsPerBlock * 2 * tile_steps<kF32>() * 32];
}

namespace {

void compress(const at::Tensor& rows, at::Tensor& payload, at::Tensor& meta,
              const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& stats,
              int64_t level, int64_t group_size, int64_t seed, int64_t key0, int64_t row_bytes,
              int64_t row_groups) {
  const aq::CompressParams p = aq::compress_params(rows, payload, meta, table, stats, level,
                                                   group_size, seed, key0, row_bytes, row_groups);
  aq::launch_compress(aq::dtype_code(rows.scalar_type()), p, stats.has_value());
}

void decompress(const at::Tensor& payload, const at::Tensor& meta, at::Tensor& out,
                const c10::optional<at::Tensor>& table, int64_t level, int64_t group_size,
                int64_t row_bytes, int64_t row_groups) {
  const aq::DecompressParams p =
      aq::decompress_params(payload, meta, out, table, level, group_size, row_bytes, row_groups);
  aq::launch_decompress(aq::dtype_code(out.scalar_type()), p);
}

void pack_bits(const at::Tensor& mask, at::Tensor& out) {
  aq::launch_pack_bits(aq::bits_params(mask, out, mask.numel()));
}

void unpack_bits(const at::Tensor& packed, at::Tensor& out) {
  aq::launch_unpack_bits(aq::bits_params(packed, out, out.numel()));
}

// Noise of absolute code indices [first, first + n): row 0 through noise_hash (any index),
// row 1 through the fast path of compress_whole_tile (lane-steps of `cu` codes).
at::Tensor noise_paths(int64_t seed, int64_t first, int64_t n, bool big, int64_t key0,
                       int64_t cu) {
  at::Tensor out = at::empty({2, n}, at::kFloat);
  float* o = out.data_ptr<float>();
  const aq::GroupKeys k = aq::group_keys(static_cast<uint64_t>(first), big,
                                         static_cast<uint64_t>(seed), static_cast<uint32_t>(key0));
  for (int64_t i = 0; i < n; ++i) {
    o[i] = aq::add_noise(0.0f, aq::noise_hash(k, static_cast<uint32_t>(i)));
    const uint32_t lo_first = k.lo0 + static_cast<uint32_t>(i - i % cu);
    const uint32_t key = lo_first < k.lo0 ? k.key_b : k.key_a;
    const uint32_t a = lo_first ^ (lo_first >> 16) ^ key ^ (key >> 16);
    o[n + i] = aq::add_noise(0.0f, aq::mix_finish(a ^ static_cast<uint32_t>(i % cu)));
  }
  return out;
}

void set_resident_blocks(int blocks) { aq::emu_resident = blocks; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compress", &compress);
  m.def("decompress", &decompress);
  m.def("pack_bits", &pack_bits);
  m.def("unpack_bits", &unpack_bits);
  m.def("noise_paths", &noise_paths);
  m.def("set_resident_blocks", &set_resident_blocks);
}
