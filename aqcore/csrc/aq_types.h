// The interface between the PyTorch binding (ops.cpp, plain C++) and the CUDA kernels:
// parameter blocks and the host functions that launch them (defined in k_dispatch.cu).
#pragma once

#include <cstdint>

namespace aq {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr int kFastGroup = 256;   // the group size the tiled kernels are built for
constexpr int kTileGroups = 8;    // a tile is 8 groups of raw values (one aq0.25 group)
constexpr int kWarpsPerBlock = 4;
constexpr int kStatColumns = 7;   // one per quantized level, errors.ERROR_LEVELS order
constexpr int kBitsThreads = 256;
constexpr int kChunksPerThread = 4;
constexpr int kZeroTensors = 40;  // tensors per zero_if launch (they travel as kernel arguments)

struct CompressParams {
  const void* in;         // (rows, row_numel) values, contiguous
  uint8_t* payload;
  uint32_t* meta;         // one (m0 | m1 << 16) word per group
  float* stats;           // (tiles, kStatColumns) error-model partials, or null
  const int64_t* table;   // per row {level, byte offset, group offset, row} by level, or null
  int64_t rows;
  int64_t row_numel;
  int64_t tiles_per_row;
  int64_t row_bytes;      // without a table: every row has `level`, these strides
  int64_t row_groups;
  uint64_t seed;
  uint32_t key0;          // noise.stream_key(seed, 0)
  int32_t level;
  int32_t group_size;
  int32_t big;            // rows * row_numel > 2^33: the noise key depends on index >> 33
};

struct DecompressParams {
  const uint8_t* payload;
  const uint32_t* meta;
  void* out;              // (rows, row_numel), contiguous
  const int64_t* table;
  int64_t rows;
  int64_t row_numel;
  int64_t tiles_per_row;
  int64_t row_bytes;
  int64_t row_groups;
  int32_t level;
  int32_t group_size;
};

struct BitsParams {
  const uint8_t* in;
  uint8_t* out;
  int64_t n;    // number of mask values
  int aligned;  // both buffers start on 16 bytes
};

struct AllocateParams {
  const float* weighted;   // (rows, levels) C_n e_n(l), finite, >= 0
  const int64_t* costs;    // (rows, levels) bytes, or null: slot[l] for every row
  int64_t* choice;         // (rows,) out: level index
  int64_t* table;          // (rows, 4) out: the allocated layout's row table, or null
  int64_t* scratch;        // (rows,)
  int64_t rows;
  int64_t budget;
  int levels;              // <= 8, most to least expensive
  int code[8];             // level ids (aq_common.cuh) of the ladder
  int64_t slot[8];         // bytes of a row's slot per level (codes + metadata, aligned)
  int64_t payload[8];      // aligned code bytes of a row per level
};

struct ZeroParams {
  const uint8_t* flag;            // a bool: zero the tensors' bytes when it is set
  uint8_t* data[kZeroTensors];    // dense tensors' first bytes
  int64_t bytes[kZeroTensors];
  int count;
};

// Launch on PyTorch's current CUDA stream.
void launch_compress(int dtype, const CompressParams& p, bool stats);
void launch_decompress(int dtype, const DecompressParams& p);
void launch_pack_bits(const BitsParams& b);
void launch_unpack_bits(const BitsParams& b);
void launch_allocate(const AllocateParams& p);
void launch_zero_if(const ZeroParams& p);

}  // namespace aq
