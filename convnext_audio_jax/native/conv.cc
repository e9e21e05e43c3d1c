// Gradients of a stride-1 dense convolution on XLA:CPU, called through XLA's FFI; float32, NHWC:
//   ConvKernelGrad: dk[i, j, ci, co] = sum over (b, h, w) of xp[b, h + i, w + j, ci] * dy[b, h, w, co]
// for xp the input x (B, HX, WX, CI) zero-padded by pad_top / pad_left lines / columns before and as many after as
// dy (B, H, W, CO) and the kernel need; the padding is never written out (XLA's pad was a copy of x per call);
//   ConvKernelFlip: t[i, j, co, ci] = k[KH - 1 - i, KW - 1 - j, ci, co], the kernel of the input gradient's
// convolution. XLA wrote this transpose element by element: 0.3 s for CNN14's 3x3x2048x2048 kernel, 9 % of its
// training step; here in 32 x 32 tiles.
//
// Why: XLA:CPU computes this sum as a convolution over the batch whose output is only KH × KW pixels; Eigen then
// parallelises and blocks it poorly (15-50 GFLOP/s on the large layers of CNN14, half of its training step;
// docs/benchmarks.md). Here it is a matrix product per tap with the positions as the long inner dimension: a task
// owns a block of CI, a block of CO and a share of the positions, for all taps, keeps R × NV vector sums in
// registers and streams the positions in slices that stay in L2. Tasks write their own partial sums, added over
// the shares in a fixed order at the end, so no result depends on how the tasks were scheduled.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_micro.h"
#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using convnext_audio_jax::kRows;
using convnext_audio_jax::kVectors;
using convnext_audio_jax::kVec;
using convnext_audio_jax::Load;
using convnext_audio_jax::Store;
using convnext_audio_jax::Vec;

// The kernel gradient's register block, CI rows × CO vectors: the products' block (vec.h) with AVX-512; 3 × 4 on
// AVX2, where 6 × 2 was no faster over CNN14's layers (+15 % at 128 → 256 channels, −7 % at 512 → 512).
#if defined(__AVX512F__)
constexpr int kGradRows = kRows, kGradVectors = kVectors;
#else
constexpr int kGradRows = 3, kGradVectors = 4;
#endif
constexpr int64_t kGradCoBlock = kGradVectors * kVec;  // a CO block
constexpr int64_t kCiBlock = 64;                // a task's CI block
// Positions per pass: the packed dy (16 KiB) and one tap row's packed x (16 KiB plus KW - 1 columns per image line
// of the slice) stay in L1 where the lines are long.
constexpr int64_t kSlicePositions = 64;
constexpr int64_t kPartialBytes = 64 << 20;     // bound on the partial sums of the position shares

// x (batch, hx, wx, ci): padded for the forward (top = left = 0), unpadded for the kernel gradient; y or dy
// (batch, h, w, co); the kernel kh × kw.
struct Geometry {
  int64_t batch, hx, wx, ci, h, w, co, kh, kw, top = 0, left = 0;
};

// A slice's positions as runs along image lines: run r is positions [start, start + length) of the slice, one
// line of one image, whose packed x begins at x offset `packed` (kCiBlock floats per column, the line's padding
// columns included, so that tap column j of position k is column k + j).
struct Run {
  int64_t start, length, packed;
};

// out[r][v] (row r at out + r * out_stride, vector v) += sum over the runs' positions of x[k][r] * ds[k][v]: xs is
// the slice's packed x for one tap (runs at their `packed` offsets), ds its packed dy (kGradCoBlock floats per
// position).
template <int R, int NV>
void Micro(const float* xs, const Run* runs, int run_count, const float* ds, float* out, int64_t out_stride) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Load(out + r * out_stride + v * kVec);
  for (int run = 0; run < run_count; ++run) {
    const float* x = xs + runs[run].packed;
    const float* d = ds + runs[run].start * kGradCoBlock;
    for (int64_t k = 0; k < runs[run].length; ++k, x += kCiBlock, d += kGradCoBlock) {
      Vec dv[NV];
      for (int v = 0; v < NV; ++v) dv[v] = Load(d + v * kVec);
      for (int r = 0; r < R; ++r) {
        const Vec xv = x[r] - Vec{};  // a broadcast: s - 0 folds to s, s + 0 would not (-0)
        for (int v = 0; v < NV; ++v) acc[r][v] += xv * dv[v];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) Store(out + r * out_stride + v * kVec, acc[r][v]);
}

struct KernelGradBlock {
  template <int R, int NV, typename... Args>
  static void Run(Args... args) { Micro<R, NV>(args...); }
};

// Packs positions [p0, p1) (row-major (b, h, w)) of dy, channels [c0, c1), contiguously (kGradCoBlock floats per
// position), and splits them into runs along image lines.
int PackDy(const float* dy, const Geometry& g, int64_t c0, int64_t c1, int64_t p0, int64_t p1, float* out,
           Run* runs) {
  int count = 0;
  int64_t packed = 0;
  for (int64_t p = p0; p < p1; ++count) {
    const int64_t length = std::min<int64_t>(p1 - p, g.w - p % g.w);
    runs[count] = {p - p0, length, packed};
    packed += (length + g.kw - 1) * kCiBlock;
    for (int64_t k = 0; k < length; ++k) std::memcpy(out + (p - p0 + k) * kGradCoBlock, dy + (p + k) * g.co + c0,
                                                     (c1 - c0) * sizeof(float));
    p += length;
  }
  return count;
}

// Packs, for tap row i, each run's padded input line (its length + KW - 1 columns, channels [c0, c1), zeros where
// the line or column lies in the padding) at the run's `packed` offset: the KW taps of the row read it at column
// offsets 0 .. KW - 1. Contiguous, so that wide layers, whose columns are a power-of-two number of bytes apart, do
// not all fall into the same cache sets; once per tap row instead of once per tap.
void PackX(const float* x, const Geometry& g, int64_t i, int64_t c0, int64_t c1, int64_t p0, const Run* runs,
           int run_count, float* out) {
  const int64_t bytes = (c1 - c0) * sizeof(float);
  for (int run = 0; run < run_count; ++run) {
    const int64_t p = p0 + runs[run].start, row = p / g.w;
    const int64_t b = row / g.h, line = row % g.h + i - g.top, first = p % g.w - g.left;
    const bool inside = line >= 0 && line < g.hx;
    const float* src = inside ? x + ((b * g.hx + line) * g.wx) * g.ci + c0 : nullptr;
    float* dst = out + runs[run].packed;
    for (int64_t col = first; col < first + runs[run].length + g.kw - 1; ++col, dst += kCiBlock) {
      if (inside && col >= 0 && col < g.wx) {
        std::memcpy(dst, src + col * g.ci, bytes);
      } else {
        std::memset(dst, 0, bytes);
      }
    }
  }
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t top, int64_t left) {
  const auto xd = x.dimensions(), dyd = dy.dimensions(), dkd = dk->dimensions();
  if (xd.size() != 4 || dyd.size() != 4 || dkd.size() != 4 || xd[0] != dyd[0] || dkd[2] != xd[3] ||
      dkd[3] != dyd[3] || dyd[3] % kVec != 0 || top < 0 || left < 0 || top > dkd[0] - 1 || left > dkd[1] - 1 ||
      dyd[1] + dkd[0] - 1 - top < xd[1] || dyd[2] + dkd[1] - 1 - left < xd[2]) {
    return ffi::Error::InvalidArgument("conv_kernel_grad expects x (B, HX, WX, CI), dy (B, H, W, CO) with CO a "
                                       "multiple of the vector width, a (KH, KW, CI, CO) result and padding within "
                                       "the kernel that covers x");
  }
  if (dk->element_count() == 0) return ffi::Error::Success();  // no CI or CO: nothing to sum (and no blocks)
  const Geometry g{xd[0], xd[1], xd[2], xd[3], dyd[1], dyd[2], dyd[3], dkd[0], dkd[1], top, left};
  const int64_t taps = g.kh * g.kw, out_size = taps * g.ci * g.co;
  const int64_t positions = g.batch * g.h * g.w;
  const int64_t ci_blocks = (g.ci + kCiBlock - 1) / kCiBlock, co_blocks = (g.co + kGradCoBlock - 1) / kGradCoBlock;
  // Shares of the positions: enough tasks for every thread, each share long enough to pay for its partial sums.
  const int64_t blocks = ci_blocks * co_blocks;
  const int64_t wanted = 8 * (pool.num_threads() + 1);
  int64_t shares = std::max<int64_t>(1, (wanted + blocks - 1) / blocks);
  shares = std::min<int64_t>({shares, std::max<int64_t>(1, positions / (4 * kSlicePositions)),
                              std::max<int64_t>(1, kPartialBytes / (out_size * int64_t(sizeof(float))))});
  const int64_t per_share = (positions + shares - 1) / shares;
  float* result = dk->typed_data();
  std::vector<float> partial(shares > 1 ? shares * out_size : 0);
  float* sums = shares > 1 ? partial.data() : result;
  std::fill(sums, sums + shares * out_size, 0.0f);
  const float* xp = x.typed_data();  // unpadded: PackX writes the padding's zeros
  const float* dyp = dy.typed_data();
  // A task: one share of the positions, one CI block and one CO block, all taps: each slice of dy is packed once
  // and x once per tap row (the row's taps read the same padded lines), not once per tap.
  convnext_audio_jax::ParallelFor(pool, shares * blocks, [=, &g](int64_t task) {
    const int64_t block = task % blocks, share = task / blocks;
    const int64_t co_block = block % co_blocks, ci_block = block / co_blocks;
    const int64_t ci0 = ci_block * kCiBlock, ci1 = std::min<int64_t>(g.ci, ci0 + kCiBlock);
    const int64_t co0 = co_block * kGradCoBlock;
    const int vectors = static_cast<int>(std::min<int64_t>(kGradCoBlock, g.co - co0) / kVec);
    const int64_t p_begin = share * per_share, p_end = std::min<int64_t>(positions, p_begin + per_share);
    // A slice has at most kSlicePositions runs (lines of one position), each packed with KW - 1 extra columns.
    std::vector<float> xs((kSlicePositions * g.kw) * kCiBlock);
    alignas(64) float ds[kSlicePositions * kGradCoBlock];
    Run runs[kSlicePositions];
    for (int64_t p0 = p_begin; p0 < p_end; p0 += kSlicePositions) {
      const int64_t p1 = std::min<int64_t>(p_end, p0 + kSlicePositions);
      const int run_count = PackDy(dyp, g, co0, co0 + vectors * kVec, p0, p1, ds, runs);
      for (int64_t i = 0; i < g.kh; ++i) {
        PackX(xp, g, i, ci0, ci1, p0, runs, run_count, xs.data());
        for (int64_t j = 0; j < g.kw; ++j) {
          float* out = sums + share * out_size + ((i * g.kw + j) * g.ci) * g.co;
          for (int64_t c = ci0; c < ci1; c += kGradRows) {
            const int rows = static_cast<int>(std::min<int64_t>(kGradRows, ci1 - c));
            convnext_audio_jax::Dispatch<KernelGradBlock, kGradRows, kGradVectors>(
                rows, vectors, xs.data() + j * kCiBlock + (c - ci0), runs, run_count, ds, out + c * g.co + co0, g.co);
          }
        }
      }
    }
  });
  if (shares > 1) {  // the sum over shares, in share order
    convnext_audio_jax::ParallelFor(pool, (out_size + 4095) / 4096, [=](int64_t task) {
      const int64_t begin = task * 4096, end = std::min<int64_t>(out_size, begin + 4096);
      for (int64_t n = begin; n < end; ++n) {
        float sum = sums[n];
        for (int64_t s = 1; s < shares; ++s) sum += sums[s * out_size + n];
        result[n] = sum;
      }
    });
  }
  return ffi::Error::Success();
}

// ---- the convolution ----

using convnext_audio_jax::ConvBlock;
using convnext_audio_jax::kCoBlock;

// Positions per task of the convolution.
constexpr int64_t kConvChunk = 32 * kRows;
constexpr int64_t kMaxConvChunk = 170 * kRows;  // AVX-512: its float32 output block ≤ 256 KiB (64 channels), in L2
// Weights per panel: taps × channels × kCoBlock floats, ~144 KiB with AVX-512 (64 channels of a 3 × 3 kernel; L2),
// ~36 KiB with AVX2. With AVX-512, panels of ~36 KiB (L1) took a 64-channel layer through its output in four passes:
// CNN14's float32 forward ran ~8 % slower (A/B in alternating processes).
constexpr int64_t kPanelSteps = 576;

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4 || xd[0] != yd[0] || kd[2] != xd[3] || kd[3] != yd[3] ||
      kd[0] < 1 || kd[1] < 1 || yd[1] != xd[1] - kd[0] + 1 || yd[2] != xd[2] - kd[1] + 1 || yd[3] % kVec != 0) {
    return ffi::Error::InvalidArgument("conv_forward expects a padded x (B, H + KH - 1, W + KW - 1, CI), k (KH, KW, "
                                       "CI, CO) with KH, KW >= 1 and CO a multiple of the vector width and a "
                                       "(B, H, W, CO) result");
  }
  if (y->element_count() == 0) return ffi::Error::Success();
  if (xd[3] == 0) {  // no input channels: every sum is empty
    std::fill(y->typed_data(), y->typed_data() + y->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  const Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], kd[0], kd[1]};
  const int64_t taps = g.kh * g.kw, positions = g.batch * g.h * g.w;
  // A panel holds at most kPanelSteps (tap, channel) steps: kernels of more taps (1 x 601) go through their taps in
  // blocks of kPanelSteps, one channel at a time, the sums accumulated in y.
  const int64_t tap_block = std::min<int64_t>(taps, kPanelSteps);
  const int64_t cb_max = std::max<int64_t>(1, std::min<int64_t>(g.ci, kPanelSteps / tap_block));
  const int64_t co_blocks = (g.co + kCoBlock - 1) / kCoBlock;
  // Positions per task: kConvChunk, or, where many CO blocks already make enough tasks (CNN14's last blocks: few
  // positions, large kernels), up to kMaxConvChunk, so that fewer tasks each pack their block of the kernel.
  const int64_t wanted = 8 * (pool.num_threads() + 1), chunks_wanted = (wanted + co_blocks - 1) / co_blocks;
  const int64_t even = ((positions + chunks_wanted - 1) / chunks_wanted + kRows - 1) / kRows * kRows;
  const int64_t chunk_size = std::clamp<int64_t>(even, kConvChunk, kMaxConvChunk);
  const int64_t chunks = (positions + chunk_size - 1) / chunk_size;
  std::vector<int64_t> offsets(taps);
  for (int64_t t = 0; t < taps; ++t) offsets[t] = ((t / g.kw) * g.wx + t % g.kw) * g.ci;
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* yp = y->typed_data();
  const int64_t* off = offsets.data();
  convnext_audio_jax::ParallelFor(pool, co_blocks * chunks, [=, &g](int64_t task) {
    const int64_t co0 = (task % co_blocks) * kCoBlock, chunk = task / co_blocks;
    const int vectors = static_cast<int>(std::min<int64_t>(kCoBlock, g.co - co0) / kVec);
    const int64_t p_begin = chunk * chunk_size, p_end = std::min<int64_t>(positions, p_begin + chunk_size);
    alignas(64) float panel[kPanelSteps * kCoBlock];
    const float* rows[kRows];
    for (int64_t c0 = 0; c0 < g.ci; c0 += cb_max) {
      const int64_t cb = std::min<int64_t>(cb_max, g.ci - c0);
      for (int64_t t0 = 0; t0 < taps; t0 += tap_block) {
        const int64_t nt = std::min<int64_t>(tap_block, taps - t0);
        // Pack the weights of channels [c0, c0 + cb), taps [t0, t0 + nt), this CO block: contiguous, reused by
        // every group.
        for (int64_t t = 0; t < nt; ++t)
          for (int64_t c = 0; c < cb; ++c)
            std::memcpy(panel + (t * cb + c) * kCoBlock, kp + ((t0 + t) * g.ci + c0 + c) * g.co + co0,
                        vectors * kVec * sizeof(float));
        for (int64_t p = p_begin; p < p_end; p += kRows) {
          const int count = static_cast<int>(std::min<int64_t>(kRows, p_end - p));
          for (int r = 0; r < count; ++r) {
            const int64_t q = p + r, row = q / g.w, col = q % g.w, b = row / g.h, h = row % g.h;
            rows[r] = xp + ((b * g.hx + h) * g.wx + col) * g.ci + c0;
          }
          convnext_audio_jax::Dispatch<ConvBlock, kRows, kVectors>(count, vectors, rows, off + t0, nt, cb, panel,
                                                                  c0 > 0 || t0 > 0, yp + p * g.co + co0, g.co);
        }
      }
    }
  });
  return ffi::Error::Success();
}

// ---- the input gradient's kernel ----

ffi::Error KernelFlip(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> t) {
  const auto kd = k.dimensions(), td = t->dimensions();
  if (kd.size() != 4 || td.size() != 4 || td[0] != kd[0] || td[1] != kd[1] || td[2] != kd[3] || td[3] != kd[2]) {
    return ffi::Error::InvalidArgument("conv_kernel_flip expects k (KH, KW, CI, CO) and a (KH, KW, CO, CI) result");
  }
  constexpr int64_t kTile = 32;
  const int64_t taps = kd[0] * kd[1], ci = kd[2], co = kd[3];
  const int64_t ci_tiles = (ci + kTile - 1) / kTile, co_tiles = (co + kTile - 1) / kTile;
  const float* src = k.typed_data();
  float* dst = t->typed_data();
  convnext_audio_jax::ParallelFor(pool, taps * ci_tiles, [=](int64_t task) {
    const int64_t tap = task / ci_tiles, c0 = (task % ci_tiles) * kTile, c1 = std::min<int64_t>(ci, c0 + kTile);
    const float* in = src + (taps - 1 - tap) * ci * co;  // the kernel turned by 180 degrees
    float* out = dst + tap * co * ci;
    for (int64_t o0 = 0; o0 < co_tiles * kTile; o0 += kTile) {
      const int64_t o1 = std::min<int64_t>(co, o0 + kTile);
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t c = c0; c < c1; ++c) out[o * ci + c] = in[c * co + o];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvForward, convnext_audio_jax::Guarded<Forward>::Call,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvKernelFlip, convnext_audio_jax::Guarded<KernelFlip>::Call,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvKernelGrad, convnext_audio_jax::Guarded<KernelGrad>::Call,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
