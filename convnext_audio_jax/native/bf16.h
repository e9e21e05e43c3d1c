// Shared by the bfloat16 kernels of this folder (matmul.cc, conv_bf16.cc): pairs of bfloat16 values in the order
// the AVX512-BF16 and AMX-BF16 dot products read them, and the AMX tile unit (the operating system's permission,
// the tile layout, the 32 x 32 block step and the packing of the second operand).
#ifndef CONVNEXT_AUDIO_JAX_NATIVE_BF16_H_
#define CONVNEXT_AUDIO_JAX_NATIVE_BF16_H_

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define CONVNEXT_AUDIO_JAX_BF16_DOT 1
#include <immintrin.h>

#include <cstdint>

namespace convnext_audio_jax::bf16 {

// 16 pairs (even[c], odd[c]) from 16 bfloat16 evens followed by 16 odds.
inline __m512i Pairs(__m512i evens_then_odds) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, evens_then_odds);
}
// From bfloat16 rows, or float32 rows rounded to nearest even (as XLA's conversion rounds).
inline __m512i Pairs(const uint16_t* even, const uint16_t* odd) {
  const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even));
  const __m256i o = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd));
  return Pairs(_mm512_inserti64x4(_mm512_castsi256_si512(e), o, 1));
}
inline __m512i Pairs(const float* even, const float* odd) {
  return Pairs((__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(odd), _mm512_loadu_ps(even)));
}

}  // namespace convnext_audio_jax::bf16

#endif  // AVX512-BF16

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#define CONVNEXT_AUDIO_JAX_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

namespace convnext_audio_jax::amx {

using bf16::Pairs;

constexpr int64_t kDepth = 32;           // bfloat16 values of the summed dimension per tile row (64 bytes)
constexpr int64_t kPanel = 16 * kDepth;  // bfloat16 values in one packed 16-column tile

// Linux hands out the AMX tile data state only on request (once per process).
inline bool RequestTiles() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: accumulators (16 × 16 float32), 4-5: the first operand (16 rows × 32 bfloat16), 6-7: the packed
// second operand (16 pairs of rows × 16 columns × 2).
inline void ConfigureTiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);
}

// The 32 x 32 float32 block both tile kernels compute: accumulator tiles 0-3 hold rows 0-15 / 16-31 times columns
// 0-15 / 16-31.
inline void ZeroBlock() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Adds 32 rows of 32 bfloat16 values (`stride` bytes apart, read in place) times the two packed 16-column tiles
// w0 and w1 to the block.
inline void AccumulateBlock(const uint16_t* rows, int64_t stride, const uint16_t* w0, const uint16_t* w1) {
  _tile_loadd(4, rows, stride);
  _tile_loadd(5, rows + 16 * (stride / 2), stride);
  _tile_loadd(6, w0, 64);
  _tile_loadd(7, w1, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// The block as float32 rows of 32 values.
inline void StoreBlock(float (&block)[32][32]) {
  _tile_stored(0, &block[0][0], 32 * 4);
  _tile_stored(1, &block[0][16], 32 * 4);
  _tile_stored(2, &block[16][0], 32 * 4);
  _tile_stored(3, &block[16][16], 32 * 4);
}

// w (depth, cols), bfloat16 (as uint16_t) or float32 -> for column block nb (16 columns) and each 32-deep block kb
// a 16 × 32 bfloat16 tile whose row p holds, for each column, the pair w[kb*32 + 2p, n], w[kb*32 + 2p + 1, n] (the
// layout _tile_dpbf16ps reads its second operand in); tile (nb, kb) at packed + (nb * depth / 32 + kb) * kPanel.
template <typename T>
void PackColumns(const T* w, int64_t depth, int64_t cols, int64_t nb, uint16_t* packed) {
  const int64_t blocks = depth / kDepth;
  for (int64_t kb = 0; kb < blocks; ++kb) {
    uint16_t* tile = packed + (nb * blocks + kb) * kPanel;
    for (int64_t p = 0; p < 16; ++p) {
      const T* even = w + (kb * kDepth + 2 * p) * cols + nb * 16;
      _mm512_storeu_si512(tile + p * 32, Pairs(even, even + cols));
    }
  }
}

}  // namespace convnext_audio_jax::amx

#endif  // AMX
#endif  // CONVNEXT_AUDIO_JAX_NATIVE_BF16_H_
