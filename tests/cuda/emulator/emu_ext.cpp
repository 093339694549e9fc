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

// Noise of absolute code indices [first, first + n): row 0 through noise_bits (any index),
// row 1 through piece_noise (the fast path: pieces of `cu` codes, first a multiple of cu).
template <int CU>
void piece_path(const aq::GroupKeys& k, int64_t i, float* o) {
  const uint32_t lo = k.lo0 + static_cast<uint32_t>(i / 2);
  const uint32_t key = lo < k.lo0 ? k.key_b : k.key_a;
  uint32_t bits[CU];
  aq::piece_noise<CU>(lo ^ (lo >> 16) ^ key ^ (key >> 16), bits);
  for (int c = 0; c < CU; ++c) o[i + c] = aq::noise_value(bits[c]);
}

at::Tensor noise_paths(int64_t seed, int64_t first, int64_t n, bool big, int64_t key0,
                       int64_t cu) {
  at::Tensor out = at::empty({2, n}, at::kFloat);
  float* o = out.data_ptr<float>();
  const aq::GroupKeys k = aq::group_keys(static_cast<uint64_t>(first), big,
                                         static_cast<uint64_t>(seed), static_cast<uint32_t>(key0));
  for (int64_t i = 0; i < n; ++i) {
    o[i] = aq::noise_value(aq::noise_bits(k, static_cast<uint32_t>(i)));
  }
  for (int64_t i = 0; i < n; i += cu) {
    if (cu == 2) piece_path<2>(k, i, o + n);
    else if (cu == 4) piece_path<4>(k, i, o + n);
    else if (cu == 8) piece_path<8>(k, i, o + n);
    else o[n + i] = aq::noise_value(aq::noise_bits(k, static_cast<uint32_t>(i)));
  }
  return out;
}

void zero_if(const at::Tensor& flag, const std::vector<at::Tensor>& tensors) {
  aq::ZeroParams p{};
  p.flag = reinterpret_cast<const uint8_t*>(flag.data_ptr<bool>());
  for (const at::Tensor& t : tensors) {
    p.data[p.count] = static_cast<uint8_t*>(t.data_ptr());
    p.bytes[p.count] = t.numel() * t.element_size();
    if (++p.count == aq::kZeroTensors) {
      aq::launch_zero_if(p);
      p.count = 0;
    }
  }
  aq::launch_zero_if(p);
}

void set_resident_blocks(int blocks) { aq::emu_resident = blocks; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compress", &compress);
  m.def("decompress", &decompress);
  m.def("pack_bits", &pack_bits);
  m.def("unpack_bits", &unpack_bits);
  m.def("noise_paths", &noise_paths);
  m.def("zero_if", &zero_if);
  m.def("set_resident_blocks", &set_resident_blocks);
}
