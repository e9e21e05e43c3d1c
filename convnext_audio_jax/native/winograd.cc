// The float32 forward of a stride-1 3 × 3 or 5 × 5 convolution by Winograd's minimal filtering F(2 × 2, 3 × 3) or
// F(2 × 2, 5 × 5) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016), through XLA's FFI:
//   y[tile] = Aᵀ [ sum over ci of (Bᵀ d[tile, ci] B) ⊙ u[ci] ] A
// for each 2 × 2 tile of outputs, d its α × α input patch (x padded; α = 4 for 3 × 3 kernels, 6 for 5 × 5), u = G k Gᵀ
// the transformed kernel (ConvWinogradKernel, a call of its own) in the packed layout read here:
// (⌈CO / kCoBlock⌉, α², CI, kCoBlock), one contiguous CI × kCoBlock panel per CO block and transform point.
// The matrices (Winograd<α> below) are those of the interpolation points 0, 1, -1 (α = 4) and 0, 1, -1, 2, -2
// (α = 6), and ∞.
//
// Why: the direct kernel (conv.cc) runs near the FMA units' peak, so only fewer multiplications make these layers
// faster: α² per 4 outputs and channel pair instead of 4 · k² (16 instead of 36; 36 instead of 100). The sums over CI
// are the same register-blocked products as the direct kernel's (conv_micro.h), one per transform point; the
// transforms cost O(CI + CO) per tile against O(CI × CO) for the products. Rounding differs from the direct sum's:
// for 3 × 3 kernels the results are closer to float64 (sums of CI products per point instead of 9 · CI), for 5 × 5
// ~3× further (the transforms scale by up to 5 and 1/24; benchmarks/conv.py); tests/test_conv.py bounds both.
//
// A task owns a chunk of tiles and a group of CO: it transforms its tiles' input patches (all CI) into v
// (α² × tiles × CI), then per transform point and CO block one product v[point] (tiles × CI) · u[block, point]
// (CI × kCoBlock) into m, then transforms m's α × α sums of each tile into its 2 × 2 outputs. Each output is one
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

constexpr int64_t kGroupChannels = 64;          // CO per task: the input transform is shared by its CO blocks
constexpr int64_t kMaxChunk = 16 * kRows;       // tiles per task
constexpr int64_t kInputBytes = 4 << 20;        // bound on a task's v (α² slices of tiles × CI)
constexpr int64_t kNoOffset[1] = {0};           // the products' one "tap"

// A thread's v and m, kept across tasks and calls (one pair for both kernel sizes): fresh blocks of this size
// (~1 MiB) were mapped and zeroed per task (page faults, memset: ~10 % of the time).
struct Scratch {
  std::vector<float> v, m;
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// The one-dimensional transforms of F(2, α - 1): v = Bᵀ d (α → α), y = Aᵀ m (α → 2), u = G g (α - 1 → α).
template <int Alpha>
struct Winograd;

template <>
struct Winograd<4> {  // points 0, 1, -1, ∞
  template <typename V>
  static void B(const V* d, V* v) {
    v[0] = d[0] - d[2];
    v[1] = d[1] + d[2];
    v[2] = d[2] - d[1];
    v[3] = d[1] - d[3];
  }
  template <typename V>
  static void A(const V* m, V* y) {
    y[0] = m[0] + m[1] + m[2];
    y[1] = m[1] - m[2] - m[3];
  }
  template <typename V>
  static void G(const V* g, V* u) {
    u[0] = g[0];
    u[1] = 0.5f * (g[0] + g[1] + g[2]);
    u[2] = 0.5f * (g[0] - g[1] + g[2]);
    u[3] = g[2];
  }
};

template <>
struct Winograd<6> {  // points 0, 1, -1, 2, -2, ∞
  template <typename V>
  static void B(const V* d, V* v) {
    v[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    v[1] = d[3] + d[4] - 4.0f * (d[1] + d[2]);
    v[2] = d[4] - d[3] + 4.0f * (d[1] - d[2]);
    v[3] = d[4] - d[2] + 2.0f * (d[3] - d[1]);
    v[4] = d[4] - d[2] + 2.0f * (d[1] - d[3]);
    v[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
  }
  template <typename V>
  static void A(const V* m, V* y) {
    y[0] = m[0] + m[1] + m[2] + m[3] + m[4];
    y[1] = m[1] - m[2] + 2.0f * (m[3] - m[4]) + m[5];
  }
  template <typename V>
  static void G(const V* g, V* u) {
    u[0] = 0.25f * g[0];
    u[1] = (-1.0f / 6) * (g[0] + g[1] + g[2] + g[3] + g[4]);
    u[2] = (-1.0f / 6) * (g[0] - g[1] + g[2] - g[3] + g[4]);
    u[3] = (1.0f / 24) * (g[0] + 2.0f * g[1] + 4.0f * g[2] + 8.0f * g[3] + 16.0f * g[4]);
    u[4] = (1.0f / 24) * (g[0] - 2.0f * g[1] + 4.0f * g[2] - 8.0f * g[3] + 16.0f * g[4]);
    u[5] = g[4];
  }
};

// Bᵀ d B for one tile and one vector (or, for a CI tail, one float) of channels: d[a][b] at src + a * line + b * pixel,
// point (a, b) stored at dst + (a * α + b) * point_stride.
template <int Alpha, typename V, typename LoadFn, typename StoreFn>
inline void InputTransform(const float* src, int64_t line, int64_t pixel, float* dst, int64_t point_stride,
                           LoadFn load, StoreFn store) {
  V d[Alpha][Alpha], t[Alpha][Alpha], column[Alpha], out[Alpha];
  for (int a = 0; a < Alpha; ++a)
    for (int b = 0; b < Alpha; ++b) d[a][b] = load(src + a * line + b * pixel);
  for (int b = 0; b < Alpha; ++b) {  // t = Bᵀ d, column by column
    for (int a = 0; a < Alpha; ++a) column[a] = d[a][b];
    Winograd<Alpha>::B(column, out);
    for (int a = 0; a < Alpha; ++a) t[a][b] = out[a];
  }
  for (int a = 0; a < Alpha; ++a) {  // v = t B, row by row
    Winograd<Alpha>::B(t[a], out);
    for (int b = 0; b < Alpha; ++b) store(dst + (a * Alpha + b) * point_stride, out[b]);
  }
}

template <int Alpha>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                   ffi::ResultBuffer<ffi::F32> y) {
  constexpr int64_t kPoints = Alpha * Alpha;
  const auto xd = x.dimensions(), yd = y->dimensions();
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
    // Each point's slice one cache line longer than its tiles need: slices a power of two bytes apart would put the
    // points of a tile in the same cache sets.
    std::vector<float>& v = ThreadScratch().v;
    std::vector<float>& m = ThreadScratch().m;
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
        InputTransform<Alpha, Vec>(src + c, wx * ci, ci, dst + c, v_point, [](const float* p) { return Load(p); },
                                   [](float* p, Vec s) { Store(p, s); });
      for (; c < ci; ++c)
        InputTransform<Alpha, float>(src + c, wx * ci, ci, dst + c, v_point, [](const float* p) { return *p; },
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
        Vec s[2][Alpha], column[Alpha], out[2];
        for (int b2 = 0; b2 < Alpha; ++b2) {  // s = Aᵀ m, column by column
          for (int a = 0; a < Alpha; ++a) column[a] = Load(src + (a * Alpha + b2) * m_point);
          Winograd<Alpha>::A(column, out);
          s[0][b2] = out[0];
          s[1][b2] = out[1];
        }
        for (int64_t a = 0; a < rows_out; ++a) {  // y = s A
          Winograd<Alpha>::A(s[a], out);
          Store(dst + (a * w + 0) * co + c, out[0]);
          if (cols_out > 1) Store(dst + (a * w + 1) * co + c, out[1]);
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error ForwardAny(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), ud = u.dimensions(), yd = y->dimensions();
  const int64_t alpha = ud.size() == 4 && ud[1] == 36 ? 6 : 4;
  if (xd.size() != 4 || ud.size() != 4 || yd.size() != 4 || xd[0] != yd[0] || (ud[1] != 16 && ud[1] != 36) ||
      ud[2] != xd[3] || ud[3] != kCoBlock || ud[0] * kCoBlock < yd[3] || yd[3] % kVec != 0 ||
      xd[1] < (yd[1] + 1) / 2 * 2 + alpha - 2 || xd[2] < (yd[2] + 1) / 2 * 2 + alpha - 2) {
    return ffi::Error::InvalidArgument("conv_winograd expects x (B, HX, WX, CI) padded to cover 2 × 2 tiles of the "
                                       "(B, H, W, CO) result (HX ≥ 2⌈H/2⌉ + k - 1, WX ≥ 2⌈W/2⌉ + k - 1 for a k × k "
                                       "kernel), u (⌈CO / block⌉, (k + 1)², CI, block) with k 3 or 5 and CO a "
                                       "multiple of the vector width");
  }
  if (y->element_count() == 0) return ffi::Error::Success();
  if (xd[3] == 0) {  // no input channels: every sum is empty (and the tiling divides by CI)
    std::fill(y->typed_data(), y->typed_data() + y->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  return alpha == 6 ? Forward<6>(pool, x, u, y) : Forward<4>(pool, x, u, y);
}

// u[block, point, c, :] = (G k[:, :, c, block's channels] Gᵀ)[point], zero past CO: the kernel transform, in the
// packed layout Forward reads. XLA computed it as two small dots and two transposes: 31 ms for a 3 × 3 × 512 × 512
// kernel, a fifth of the convolution it serves.
template <int Alpha>
void KernelTransform(ffi::ThreadPool& pool, const float* kp, int64_t ci, int64_t co, int64_t blocks, float* up) {
  constexpr int kTaps = Alpha - 1, kPoints = Alpha * Alpha;
  constexpr int64_t kChannels = 64;  // CI per task
  const int64_t ci_chunks = (ci + kChannels - 1) / kChannels;
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
        Vec g[kTaps][kTaps], t[Alpha][kTaps], column[kTaps], out[Alpha];
        for (int i = 0; i < kTaps; ++i)
          for (int j = 0; j < kTaps; ++j) g[i][j] = Load(kp + ((i * kTaps + j) * ci + c) * co + co0 + o);
        for (int j = 0; j < kTaps; ++j) {  // t = G g, column by column
          for (int i = 0; i < kTaps; ++i) column[i] = g[i][j];
          Winograd<Alpha>::G(column, out);
          for (int a = 0; a < Alpha; ++a) t[a][j] = out[a];
        }
        for (int a = 0; a < Alpha; ++a) {  // u = t Gᵀ, row by row
          Winograd<Alpha>::G(t[a], out);
          for (int b = 0; b < Alpha; ++b) Store(dst + (a * Alpha + b) * ci * kCoBlock + o, out[b]);
        }
      }
    }
  });
}

ffi::Error Kernel(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> u) {
  const auto kd = k.dimensions(), ud = u->dimensions();
  if (kd.size() != 4 || ud.size() != 4 || kd[0] != kd[1] || (kd[0] != 3 && kd[0] != 5) || kd[3] % kVec != 0 ||
      ud[0] != (kd[3] + kCoBlock - 1) / kCoBlock || ud[1] != (kd[0] + 1) * (kd[0] + 1) || ud[2] != kd[2] ||
      ud[3] != kCoBlock) {
    return ffi::Error::InvalidArgument("conv_winograd_kernel expects k (k, k, CI, CO) with k 3 or 5 and CO a "
                                       "multiple of the vector width, and a (⌈CO / block⌉, (k + 1)², CI, block) "
                                       "result");
  }
  if (kd[0] == 5) {
    KernelTransform<6>(pool, k.typed_data(), kd[2], kd[3], ud[0], u->typed_data());
  } else {
    KernelTransform<4>(pool, k.typed_data(), kd[2], kd[3], ud[0], u->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

// The CO block of u's packed layout (the register block's width: 64 with AVX-512, 16 with AVX2).
extern "C" int64_t ConvnextAudioJaxWinogradCoBlock() { return kCoBlock; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvWinogradForward, convnext_audio_jax::Guarded<ForwardAny>::Call,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvWinogradKernel, convnext_audio_jax::Guarded<Kernel>::Call,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
