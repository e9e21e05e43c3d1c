// The float32 forward of a stride-1 3 × 3 convolution by Winograd's minimal filtering F(2 × 2, 3 × 3) (Lavin and
// Gray, "Fast Algorithms for Convolutional Neural Networks", 2016), called through XLA's FFI:
//   y[tile] = Aᵀ [ sum over ci of (Bᵀ d[tile, ci] B) ⊙ u[ci] ] A
// for each 2 × 2 tile of outputs, d its 4 × 4 input patch (x padded), u = G k Gᵀ the transformed kernel
// (ConvWinogradKernel, a call of its own) in the packed layout read here: (⌈CO / kCoBlock⌉, 16, CI, kCoBlock), one
// contiguous CI × kCoBlock panel per CO block and transform point.
//   Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1],  Aᵀ = [1 1 1 0; 0 1 -1 -1]
//
// Why: the direct kernel (conv.cc) runs near the FMA units' peak, so only fewer multiplications make a 3 × 3 layer
// faster: 16 per 4 outputs and channel pair instead of 36. The sums over CI are the same register-blocked products
// as the direct kernel's (conv_micro.h), one per transform point; the transforms cost O(CI + CO) per tile against
// O(CI × CO) for the products. Rounding differs from the direct sum (the transforms add and subtract inputs before
// the products), within 2e-6 of the largest output as the direct sum is (tests/test_conv.py).
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
constexpr int64_t kInputBytes = 4 << 20;        // bound on a task's v (16 slices of tiles × CI; one slice ≤ 256 KiB)
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
    // Each point's slice one cache line longer than its tiles need: slices a power of two bytes apart would put the
    // 16 points of a tile in the same cache sets.
    const int64_t v_point = chunk_size * ci + 16, m_stride = group_blocks * kCoBlock;
    const int64_t m_point = chunk_size * m_stride + 16;
    v.resize(std::max<size_t>(v.size(), kPoints * v_point));
    m.resize(std::max<size_t>(m.size(), kPoints * m_point));
    // v[point][tile][c]: the input transform of each tile's patch.
    for (int64_t t = 0; t < count; ++t) {
      const int64_t tile = t_begin + t, tw = tile % tiles_w, th = (tile / tiles_w) % tiles_h;
      const int64_t b = tile / (tiles_w * tiles_h);
      const float* src = xp + ((b * hx + 2 * th) * wx + 2 * tw) * ci;
      float* dst = v.data() + t * ci;
      int64_t c = 0;
      for (; c + kVec <= ci; c += kVec)
        InputTransform<Vec>(src + c, wx * ci, ci, dst + c, v_point, [](const float* p) { return Load(p); },
                            [](float* p, Vec s) { Store(p, s); });
      for (; c < ci; ++c)
        InputTransform<float>(src + c, wx * ci, ci, dst + c, v_point, [](const float* p) { return *p; },
                              [](float* p, float s) { *p = s; });
    }
    // m[point][tile][block channel] = v[point] · u[block, point], per point and CO block of the group.
    const float* rows[kRows];
    for (int64_t point = 0; point < kPoints; ++point) {
      for (int64_t block = b_begin; block < b_end; ++block) {
        const int vectors = static_cast<int>(std::min<int64_t>(kCoBlock, co - block * kCoBlock) / kVec);
        const float* panel = up + (block * kPoints + point) * ci * kCoBlock;
        float* out = m.data() + point * m_point + (block - b_begin) * kCoBlock;
        for (int64_t t = 0; t < count; t += kRows) {
          const int n = static_cast<int>(std::min<int64_t>(kRows, count - t));
          for (int r = 0; r < n; ++r) rows[r] = v.data() + point * v_point + (t + r) * ci;
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
          const Vec m0 = Load(src + (0 * 4 + b2) * m_point);
          const Vec m1 = Load(src + (1 * 4 + b2) * m_point);
          const Vec m2 = Load(src + (2 * 4 + b2) * m_point);
          const Vec m3 = Load(src + (3 * 4 + b2) * m_point);
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

// u[block, point, c, :] = (G k[:, :, c, block's channels] Gᵀ)[point], zero past CO: the kernel transform, in the
// packed layout Forward reads. XLA computed it as two small dots and two transposes: 31 ms for a 3 × 3 × 512 × 512
// kernel, a fifth of the convolution it serves.
ffi::Error Kernel(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> u) {
  const auto kd = k.dimensions(), ud = u->dimensions();
  if (kd.size() != 4 || ud.size() != 4 || kd[0] != 3 || kd[1] != 3 || kd[3] % kVec != 0 ||
      ud[0] != (kd[3] + kCoBlock - 1) / kCoBlock || ud[1] != kPoints || ud[2] != kd[2] || ud[3] != kCoBlock) {
    return ffi::Error::InvalidArgument("conv_winograd_kernel expects k (3, 3, CI, CO) with CO a multiple of the "
                                       "vector width and a (⌈CO / block⌉, 16, CI, block) result");
  }
  const int64_t ci = kd[2], co = kd[3], blocks = ud[0];
  constexpr int64_t kChannels = 64;  // CI per task
  const int64_t ci_chunks = (ci + kChannels - 1) / kChannels;
  const float* kp = k.typed_data();
  float* up = u->typed_data();
  convnext_audio_jax::ParallelFor(pool, blocks * ci_chunks, [=](int64_t task) {
    const int64_t block = task / ci_chunks, c0 = (task % ci_chunks) * kChannels;
    const int64_t c1 = std::min<int64_t>(ci, c0 + kChannels), co0 = block * kCoBlock;
    for (int64_t c = c0; c < c1; ++c) {
      float* dst = up + (block * kPoints * ci + c) * kCoBlock;
      for (int64_t o = 0; o < kCoBlock; o += kVec) {
        if (co0 + o >= co) {  // the last block's columns past CO
          for (int64_t point = 0; point < kPoints; ++point) Store(dst + point * ci * kCoBlock + o, Vec{});
          continue;
        }
        Vec g[3][3], t[4][3];
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j) g[i][j] = Load(kp + ((i * 3 + j) * ci + c) * co + co0 + o);
        for (int j = 0; j < 3; ++j) {  // t = G g
          t[0][j] = g[0][j];
          t[1][j] = 0.5f * (g[0][j] + g[1][j] + g[2][j]);
          t[2][j] = 0.5f * (g[0][j] - g[1][j] + g[2][j]);
          t[3][j] = g[2][j];
        }
        for (int a = 0; a < 4; ++a) {  // u = t Gᵀ
          Store(dst + (a * 4 + 0) * ci * kCoBlock + o, t[a][0]);
          Store(dst + (a * 4 + 1) * ci * kCoBlock + o, 0.5f * (t[a][0] + t[a][1] + t[a][2]));
          Store(dst + (a * 4 + 2) * ci * kCoBlock + o, 0.5f * (t[a][0] - t[a][1] + t[a][2]));
          Store(dst + (a * 4 + 3) * ci * kCoBlock + o, t[a][2]);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvWinogradKernel, Kernel,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
