// The float32 forward of a stride-1 3 × 3 convolution by Winograd's minimal filtering F(2 × 2, 3 × 3) (Lavin and
// Gray, "Fast Algorithms for Convolutional Neural Networks", 2016), called through XLA's FFI:
//   y[tile] = Aᵀ [ sum over ci of (Bᵀ d[tile, ci] B) ⊙ u[ci] ] A
// for each 2 × 2 tile of outputs, d its 4 × 4 input patch (x padded), u = G k Gᵀ the kernel transformed by XLA
// (convnext_audio_jax.native.conv_winograd) into the packed layout read here: (CO / kCoBlock, 16, CI, kCoBlock), one
// contiguous CI × kCoBlock panel per CO block and transform point.
//   Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1],  Aᵀ = [1 1 1 0; 0 1 -1 -1]
//
// Why: the direct kernel (conv.cc) runs near the FMA units' peak, so only fewer multiplications make a 3 × 3 layer
// faster: 16 per 4 outputs and channel pair instead of 36. The sums over CI are the same register-blocked products
// as the direct kernel's (conv_micro.h), one per transform point; the transforms cost O(CI + CO) per tile against
// O(CI × CO) for the products. Rounding differs from the direct sum (the transforms add and subtract inputs before
// the products): ~1e-6 relative to the largest output instead of ~1e-7 (tests/test_conv.py).
//
// A task owns a chunk of tiles and a group of CO: it transforms its tiles' input patches (all CI) into v
// (16 × tiles × CI), then per transform point and CO block one product v[point] (tiles × CI) · u[block, point]
// (CI × kCoBlock) into m, then transforms m's 4 × 4 sums of each tile into its 2 × 2 outputs. Each output is one
// fixed-order computation, independent of scheduling.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "conv_micro.h"
#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using convnext_audio_jax::ConvBlock;
using convnext_audio_jax::kCoBlock;
using convnext_audio_jax::kRows;
using convnext_audio_jax::kVec;
using convnext_audio_jax::kVectors;
using convnext_audio_jax::Load;
using convnext_audio_jax::Store;
using convnext_audio_jax::Vec;

constexpr int64_t kPoints = 16;                 // the 4 × 4 transform points
constexpr int64_t kGroupChannels = 64;          // CO per task: the input transform is shared by its CO blocks
constexpr int64_t kMaxChunk = 16 * kRows;       // tiles per task
constexpr int64_t kInputBytes = 1 << 20;        // bound on a task's v: its 16 slices of tiles × CI stay near L2
constexpr int64_t kNoOffset[1] = {0};           // the products' one "tap"

// Bᵀ d B for one tile and one vector (or, for a CI tail, one float) of channels: d[a][b] at src + a * line + b * ci.
template <typename V, typename LoadFn, typename StoreFn>
inline void InputTransform(const float* src, int64_t line, int64_t pixel, float* dst, int64_t point_stride,
                           LoadFn load, StoreFn store) {
  V d[4][4], t[4][4];
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) d[a][b] = load(src + a * line + b * pixel);
  for (int b = 0; b < 4; ++b) {  // t = Bᵀ d
    t[0][b] = d[0][b] - d[2][b];
    t[1][b] = d[1][b] + d[2][b];
    t[2][b] = d[2][b] - d[1][b];
    t[3][b] = d[1][b] - d[3][b];
  }
  for (int a = 0; a < 4; ++a) {  // v = t B
    store(dst + (a * 4 + 0) * point_stride, t[a][0] - t[a][2]);
    store(dst + (a * 4 + 1) * point_stride, t[a][1] + t[a][2]);
    store(dst + (a * 4 + 2) * point_stride, t[a][2] - t[a][1]);
    store(dst + (a * 4 + 3) * point_stride, t[a][1] - t[a][3]);
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                   ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), ud = u.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || ud.size() != 4 || yd.size() != 4 || xd[0] != yd[0] || ud[1] != kPoints || ud[2] != xd[3] ||
      ud[3] != kCoBlock || ud[0] * kCoBlock < yd[3] || yd[3] % kVec != 0 || xd[1] < (yd[1] + 1) / 2 * 2 + 2 ||
      xd[2] < (yd[2] + 1) / 2 * 2 + 2) {
    return ffi::Error::InvalidArgument("conv_winograd expects x (B, HX, WX, CI) padded to cover 2 × 2 tiles of the "
                                       "(B, H, W, CO) result (HX ≥ 2⌈H/2⌉ + 2, WX ≥ 2⌈W/2⌉ + 2), u (⌈CO / block⌉, "
                                       "16, CI, block) and CO a multiple of the vector width");
  }
  const int64_t batch = xd[0], hx = xd[1], wx = xd[2], ci = xd[3], h = yd[1], w = yd[2], co = yd[3];
  const int64_t tiles_h = (h + 1) / 2, tiles_w = (w + 1) / 2, tiles = batch * tiles_h * tiles_w;
  const int64_t co_blocks = (co + kCoBlock - 1) / kCoBlock;
  const int64_t group_blocks = std::max<int64_t>(1, kGroupChannels / kCoBlock);
  const int64_t groups = (co_blocks + group_blocks - 1) / group_blocks;
  // Tiles per task: enough tasks for every thread, at most kMaxChunk, and v within kInputBytes.
  const int64_t wanted = 8 * (pool.num_threads() + 1), chunks_wanted = (wanted + groups - 1) / groups;
  const int64_t fit = std::max<int64_t>(kRows, kInputBytes / (kPoints * ci * int64_t(sizeof(float))) / kRows * kRows);
  const int64_t even = ((tiles + chunks_wanted - 1) / chunks_wanted + kRows - 1) / kRows * kRows;
  const int64_t chunk_size = std::min<int64_t>({std::max<int64_t>(even, 4 * kRows), kMaxChunk, fit});
  const int64_t chunks = (tiles + chunk_size - 1) / chunk_size;
  const float* xp = x.typed_data();
  const float* up = u.typed_data();
  float* yp = y->typed_data();
  convnext_audio_jax::ParallelFor(pool, groups * chunks, [=](int64_t task) {
    const int64_t group = task % groups, chunk = task / groups;
    const int64_t t_begin = chunk * chunk_size, count = std::min<int64_t>(tiles, t_begin + chunk_size) - t_begin;
    const int64_t b_begin = group * group_blocks, b_end = std::min<int64_t>(co_blocks, b_begin + group_blocks);
    // Kept per thread across tasks and calls: fresh blocks of this size (~1 MiB) were mapped and zeroed per task
    // (page faults, memset: ~10 % of the time).
    thread_local std::vector<float> v, m;
    v.resize(std::max<size_t>(v.size(), kPoints * chunk_size * ci));
    m.resize(std::max<size_t>(m.size(), kPoints * chunk_size * group_blocks * kCoBlock));
    // v[point][tile][c]: the input transform of each tile's patch.
    for (int64_t t = 0; t < count; ++t) {
      const int64_t tile = t_begin + t, tw = tile % tiles_w, th = (tile / tiles_w) % tiles_h;
      const int64_t b = tile / (tiles_w * tiles_h);
      const float* src = xp + ((b * hx + 2 * th) * wx + 2 * tw) * ci;
      float* dst = v.data() + t * ci;
      const int64_t stride = chunk_size * ci;
      int64_t c = 0;
      for (; c + kVec <= ci; c += kVec)
        InputTransform<Vec>(src + c, wx * ci, ci, dst + c, stride, [](const float* p) { return Load(p); },
                            [](float* p, Vec s) { Store(p, s); });
      for (; c < ci; ++c)
        InputTransform<float>(src + c, wx * ci, ci, dst + c, stride, [](const float* p) { return *p; },
                              [](float* p, float s) { *p = s; });
    }
    // m[point][tile][block channel] = v[point] · u[block, point], per point and CO block of the group.
    const float* rows[kRows];
    const int64_t m_stride = group_blocks * kCoBlock;
    for (int64_t point = 0; point < kPoints; ++point) {
      for (int64_t block = b_begin; block < b_end; ++block) {
        const int vectors = static_cast<int>(std::min<int64_t>(kCoBlock, co - block * kCoBlock) / kVec);
        const float* panel = up + (block * kPoints + point) * ci * kCoBlock;
        float* out = m.data() + point * chunk_size * m_stride + (block - b_begin) * kCoBlock;
        for (int64_t t = 0; t < count; t += kRows) {
          const int n = static_cast<int>(std::min<int64_t>(kRows, count - t));
          for (int r = 0; r < n; ++r) rows[r] = v.data() + (point * chunk_size + t + r) * ci;
          convnext_audio_jax::Dispatch<ConvBlock, kRows, kVectors>(n, vectors, rows, kNoOffset, int64_t{1}, ci, panel,
                                                                  false, out + t * m_stride, m_stride);
        }
      }
    }
    // y[tile] = Aᵀ m[tile] A, the outputs inside the image.
    const int64_t c_begin = b_begin * kCoBlock, c_end = std::min<int64_t>(co, b_end * kCoBlock);
    for (int64_t t = 0; t < count; ++t) {
      const int64_t tile = t_begin + t, tw = tile % tiles_w, th = (tile / tiles_w) % tiles_h;
      const int64_t b = tile / (tiles_w * tiles_h);
      const int64_t rows_out = std::min<int64_t>(2, h - 2 * th), cols_out = std::min<int64_t>(2, w - 2 * tw);
      float* dst = yp + ((b * h + 2 * th) * w + 2 * tw) * co;
      for (int64_t c = c_begin; c < c_end; c += kVec) {
        const float* src = m.data() + t * m_stride + (c - c_begin);
        Vec s[2][4];
        for (int b2 = 0; b2 < 4; ++b2) {  // s = Aᵀ m
          const Vec m0 = Load(src + (0 * 4 + b2) * chunk_size * m_stride);
          const Vec m1 = Load(src + (1 * 4 + b2) * chunk_size * m_stride);
          const Vec m2 = Load(src + (2 * 4 + b2) * chunk_size * m_stride);
          const Vec m3 = Load(src + (3 * 4 + b2) * chunk_size * m_stride);
          s[0][b2] = m0 + m1 + m2;
          s[1][b2] = m1 - m2 - m3;
        }
        for (int64_t a = 0; a < rows_out; ++a) {  // y = s A
          Store(dst + (a * w + 0) * co + c, s[a][0] + s[a][1] + s[a][2]);
          if (cols_out > 1) Store(dst + (a * w + 1) * co + c, s[a][1] - s[a][2] - s[a][3]);
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// The CO block of u's packed layout (the register block's width: 64 with AVX-512, 16 with AVX2).
extern "C" int64_t ConvnextAudioJaxWinogradCoBlock() { return kCoBlock; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvWinogradForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
