// bfloat16 stride-1 dense convolution on the CPU's AMX tile unit (Intel AMX-BF16), called through XLA's FFI:
//   Bf16ConvForward: y[b, h, w, co] = bf16(sum over (i, j, ci) of xp[b, h + i, w + j, ci] * k[i, j, ci, co]),
// xp (B, HP, WP, CI) the input already zero-padded (and HP at least H + KH - 1 plus the rows the last block
// reads, see RowsNeeded), k (KH, KW, CI, CO) bfloat16 or float32 (rounded to bfloat16 as it is packed), y
// (B, H, W, CO) with W = WP - KW + 1; products summed in float32, rounded to bfloat16 once. CI and CO multiples
// of 32.
//
// Why: XLA:CPU runs a bfloat16 convolution as a float32 one between conversions (1.9 s for CNN14's convolutions
// on 8 clips on a 2-core AMX Xeon, 1.5 s in float32); torch's oneDNN uses the tile unit, and CNN14's bfloat16
// forward ran at 0.65-0.71x torch autocast. These tiles: 0.6 s (benchmarks/conv.py, docs/benchmarks.md).
//
// Each image is read as one long row of WP-wide padded lines: output position p = h * WP + w takes input position
// p + i * WP + j for tap (i, j), so a tap is a constant offset and 16 consecutive positions are 16 rows of one
// tile read in place (stride CI). Positions with w >= W are computed and dropped (W / WP of the work is kept).
// A task computes 32 positions of one image for one column panel of y (the output channels whose packed kernel
// fits in ~1 MiB, so that consecutive tasks find it in cache), per 32 channels four 16 x 16 float32 accumulator
// tiles over all taps and input channels. Each output is one fixed-order sum: results do not depend on
// scheduling.
//
//   Bf16DotConvForward: the same convolution, operands and padding on a CPU with AVX512-BF16 but no tile unit
// (AMD Zen 4, Intel Cooper Lake), CI even and CO a multiple of 16: each instruction adds the products of 16 output
// channels with one pair of input channels (vdpbf16ps), 6 positions x 64 channels of float32 sums in registers,
// the kernel packed once per call in pairs of input channels. A task: 96 output positions of one image, one
// 64-channel block of y, panels of input channels accumulated in a float32 block, rounded once. vdpbf16ps does
// twice the multiplications of a float32 FMA but, on a Sapphire Rapids Xeon, issues at half its rate: there it ran
// at 0.56-0.87x the float32 kernel's speed (benchmarks/conv.py; the tile kernel is used there). On an AVX512-BF16
// EPYC torch's bf16 ConvNeXt-Tiny forward ran 2.7x its fp32 one; this kernel's speed there is not measured yet.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "bf16.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A bfloat16 (its bits) as float32: exact.
inline float Widen(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

constexpr int64_t kBlock = 32;  // output positions per task, and output channels per step: two tiles of 16

// Padded lines (of WP positions) an image of H output lines must have: the last 32-position block reads up to
// KH - 1 lines and KW - 1 positions past its last position.
int64_t RowsNeeded(int64_t h, int64_t kh, int64_t kw, int64_t wp) {
  if (wp < 1) return 0;  // an empty image: no lines
  const int64_t positions = ((h * wp + kBlock - 1) / kBlock) * kBlock;
  const int64_t last_read = positions - 1 + (kh - 1) * wp + (kw - 1);
  return last_read / wp + 1;
}

#ifdef CONVNEXT_AUDIO_JAX_AMX

using namespace convnext_audio_jax::amx;

constexpr int64_t kPanelBytes = 1 << 20;

struct Geometry {
  int64_t hp, wp, ci, h, w, co, taps;
  const int64_t* offsets;  // per tap, in positions
};

// Output channels [n_begin, n_end) of positions [p0, p0 + 32) of one image (x, y at the image's first position).
void Block(const uint16_t* x, const uint16_t* packed, const Geometry& g, int64_t p0, int64_t n_begin, int64_t n_end,
           uint16_t* y) {
  const int64_t ci_blocks = g.ci / kDepth, blocks = g.taps * ci_blocks;
  const int64_t stride = g.ci * 2;
  alignas(64) float acc[kBlock][kBlock];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kBlock) {
    ZeroBlock();
    const uint16_t* w0 = packed + (n0 / 16) * blocks * kPanel;
    const uint16_t* w1 = w0 + blocks * kPanel;
    for (int64_t t = 0; t < g.taps; ++t) {
      const uint16_t* xt = x + (p0 + g.offsets[t]) * g.ci;
      for (int64_t c = 0; c < ci_blocks; ++c) {
        const int64_t kb = t * ci_blocks + c;
        AccumulateBlock(xt + c * kDepth, stride, w0 + kb * kPanel, w1 + kb * kPanel);
      }
    }
    StoreBlock(acc);
    for (int64_t r = 0; r < kBlock; ++r) {
      const int64_t p = p0 + r, h = p / g.wp, w = p % g.wp;
      if (h >= g.h) break;
      if (w >= g.w) continue;  // a padding column
      const __m512 lo = _mm512_load_ps(&acc[r][0]), hi = _mm512_load_ps(&acc[r][16]);
      _mm512_storeu_si512(y + (h * g.w + w) * g.co + n0, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::AnyBuffer k, ffi::ResultBuffer<ffi::BF16> y) {
  const auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4 || xd[0] != yd[0] || kd[2] != xd[3] || kd[3] != yd[3] ||
      kd[0] < 1 || kd[1] < 1 || yd[2] != xd[2] - kd[1] + 1 || xd[3] < kDepth || xd[3] % kDepth || yd[3] % kBlock ||
      xd[1] < RowsNeeded(yd[1], kd[0], kd[1], xd[2]) ||
      (k.element_type() != ffi::DataType::BF16 && k.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("bf16_conv_forward expects a padded x (B, HP, W + KW - 1, CI) with HP lines "
                                       "for the last block's reads, k (KH, KW, CI, CO) bfloat16 or float32 and a "
                                       "(B, H, W, CO) result, CI a positive multiple of 32 and CO a multiple of 32");
  }
  if (y->element_count() == 0) return ffi::Error::Success();
  if (!RequestTiles()) return ffi::Error::Internal("bf16_conv_forward: the kernel refused the AMX tile state");
  const int64_t batch = xd[0], taps = kd[0] * kd[1], depth = taps * kd[2], cols = kd[3];
  std::vector<int64_t> offsets(taps);
  for (int64_t t = 0; t < taps; ++t) offsets[t] = (t / kd[1]) * xd[2] + t % kd[1];
  const Geometry g{xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], taps, offsets.data()};
  const auto* xp = reinterpret_cast<const uint16_t*>(x.typed_data());
  auto* yp = reinterpret_cast<uint16_t*>(y->typed_data());
  // k (KH, KW, CI, CO) is a (KH * KW * CI, CO) matrix whose 32-deep blocks each lie within one tap. A float32
  // kernel is rounded here, saving XLA a pass that writes a bfloat16 copy.
  std::unique_ptr<uint16_t[]> packed(new uint16_t[depth * cols]);
  uint16_t* pp = packed.get();
  const void* kp = k.untyped_data();
  const bool wide = k.element_type() == ffi::DataType::F32;
  convnext_audio_jax::ParallelFor(pool, cols / 16, [=](int64_t nb) {
    if (wide) {
      PackColumns(static_cast<const float*>(kp), depth, cols, nb, pp);
    } else {
      PackColumns(static_cast<const uint16_t*>(kp), depth, cols, nb, pp);
    }
  });
  const int64_t fitting = (kPanelBytes / (2 * depth)) / kBlock * kBlock;
  const int64_t panel = std::min<int64_t>(cols, std::max<int64_t>(kBlock, fitting));
  const int64_t panels = (cols + panel - 1) / panel;
  const int64_t per_image = (g.h * g.wp + kBlock - 1) / kBlock, blocks = batch * per_image;
  // Panel-major: consecutive tasks reuse one panel of the packed kernel.
  convnext_audio_jax::ParallelFor(pool, panels * blocks, [=, &g](int64_t task) {
    ConfigureTiles();
    const int64_t block = task % blocks, n_begin = (task / blocks) * panel;
    const int64_t b = block / per_image, p0 = (block % per_image) * kBlock;
    Block(xp + b * g.hp * g.wp * g.ci, pp, g, p0, n_begin, std::min<int64_t>(cols, n_begin + panel),
          yp + b * g.h * g.w * g.co);
    _tile_release();
  });
  return ffi::Error::Success();
}

#else  // no AMX in this build

ffi::Error Forward(ffi::ThreadPool, ffi::Buffer<ffi::BF16>, ffi::AnyBuffer, ffi::ResultBuffer<ffi::BF16>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "bf16_conv_forward: built for a CPU without AMX-BF16");
}

#endif

#ifdef CONVNEXT_AUDIO_JAX_BF16_DOT

constexpr int kDotRows = 6;                     // positions per register block
constexpr int64_t kDotCols = 64;                // output channels per task: 4 vectors of 16
constexpr int64_t kDotChunk = 16 * kDotRows;    // positions per task
constexpr int64_t kDotPanelPairs = 144;         // (tap, channel pair) steps per panel: 36 KiB of packed kernel

// acc[r][v] += sum over taps t and pairs q < pairs of the pair rows[r][offsets[t] + 2q, +1] · panel[t][q][v]
// (rows[r]: position r's input at tap (0, 0) and the panel's first channel; panel: taps × pairs × 64 × 2 bfloat16).
template <int R>
void DotMicro(const uint16_t* const* rows, const int64_t* offsets, int64_t taps, int64_t pairs,
              const uint16_t* panel, float* out) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_loadu_ps(out + r * kDotCols + v * 16);
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t offset = offsets[t];
    for (int64_t q = 0; q < pairs; ++q, panel += 2 * kDotCols) {
      __m512bh w[4];
      for (int v = 0; v < 4; ++v) w[v] = (__m512bh)_mm512_loadu_si512(panel + v * 32);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, rows[r] + offset + 2 * q, sizeof(pair));
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
        for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xb, w[v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(out + r * kDotCols + v * 16, acc[r][v]);
}

template <int R>
void DotMicroDispatch(int count, const uint16_t* const* rows, const int64_t* offsets, int64_t taps, int64_t pairs,
                      const uint16_t* panel, float* out) {
  if constexpr (R > 1) {
    if (count < R) return DotMicroDispatch<R - 1>(count, rows, offsets, taps, pairs, panel, out);
  }
  DotMicro<R>(rows, offsets, taps, pairs, panel, out);
}

ffi::Error DotForward(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::AnyBuffer k,
                      ffi::ResultBuffer<ffi::BF16> y) {
  const auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4 || xd[0] != yd[0] || kd[2] != xd[3] || kd[3] != yd[3] ||
      kd[0] < 1 || kd[1] < 1 || yd[2] != xd[2] - kd[1] + 1 || xd[3] < 2 || xd[3] % 2 || yd[3] % 16 ||
      xd[1] < RowsNeeded(yd[1], kd[0], kd[1], xd[2]) ||
      (k.element_type() != ffi::DataType::BF16 && k.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("bf16_dot_conv_forward expects a padded x (B, HP, W + KW - 1, CI) with HP "
                                       "lines for the last block's reads, k (KH, KW, CI, CO) bfloat16 or float32 and "
                                       "a (B, H, W, CO) result, CI even and positive and CO a multiple of 16");
  }
  if (y->element_count() == 0) return ffi::Error::Success();
  const int64_t batch = xd[0], hp = xd[1], wp = xd[2], ci = xd[3], h = yd[1], w = yd[2], co = yd[3];
  const int64_t taps = kd[0] * kd[1], pairs_all = ci / 2;
  std::vector<int64_t> offsets(taps);
  for (int64_t t = 0; t < taps; ++t) offsets[t] = ((t / kd[1]) * wp + t % kd[1]) * ci;
  const int64_t panel_pairs = std::max<int64_t>(1, std::min<int64_t>(pairs_all, kDotPanelPairs / taps));
  const int64_t panels = (pairs_all + panel_pairs - 1) / panel_pairs;
  const int64_t co_blocks = (co + kDotCols - 1) / kDotCols, per_block = taps * pairs_all * 2 * kDotCols;
  // The kernel packed once: per 64-channel block of CO and panel of pairs, taps × pairs × 64 × 2 bfloat16 (zeros
  // past CO), rounded to nearest even from float32.
  std::unique_ptr<uint16_t[]> packed(new uint16_t[co_blocks * per_block]);
  uint16_t* pk = packed.get();
  const void* kp = k.untyped_data();
  const bool wide = k.element_type() == ffi::DataType::F32;
  const auto weight = [=](int64_t at) {
    return wide ? static_cast<const float*>(kp)[at] : Widen(static_cast<const uint16_t*>(kp)[at]);
  };
  convnext_audio_jax::ParallelFor(pool, co_blocks * panels, [=](int64_t task) {
    const int64_t co0 = (task / panels) * kDotCols, q0 = (task % panels) * panel_pairs;
    const int64_t pairs = std::min<int64_t>(panel_pairs, pairs_all - q0);
    uint16_t* out = pk + (co0 / kDotCols) * per_block + q0 * taps * 2 * kDotCols;
    alignas(64) float even[kDotCols], odd[kDotCols];
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t q = 0; q < pairs; ++q, out += 2 * kDotCols) {
        const int64_t row = t * ci + 2 * (q0 + q);
        for (int64_t c = 0; c < kDotCols; ++c) {
          const bool inside = co0 + c < co;
          const int64_t at = row * co + co0 + c;
          even[c] = inside ? weight(at) : 0.0f;
          odd[c] = inside ? weight(at + co) : 0.0f;
        }
        for (int v = 0; v < 4; ++v) {
          _mm512_storeu_si512(out + 32 * v, convnext_audio_jax::bf16::Pairs(even + 16 * v, odd + 16 * v));
        }
      }
    }
  });
  const auto* xp = reinterpret_cast<const uint16_t*>(x.typed_data());
  auto* yp = reinterpret_cast<uint16_t*>(y->typed_data());
  // Only the H x W outputs are computed (each position's input found by its own pointer), none of the padding
  // columns the tile kernel computes and drops: on CNN14's last blocks (W = 2, 4) those were a third to a half.
  const int64_t valid = h * w, per_image = (valid + kDotChunk - 1) / kDotChunk;
  const int64_t* off = offsets.data();
  convnext_audio_jax::ParallelFor(pool, co_blocks * batch * per_image, [=](int64_t task) {
    const int64_t co0 = (task % co_blocks) * kDotCols, block = task / co_blocks;
    const int64_t b = block / per_image, p_begin = (block % per_image) * kDotChunk;
    const int64_t p_end = std::min<int64_t>(valid, p_begin + kDotChunk);
    const uint16_t* image = xp + b * hp * wp * ci;
    alignas(64) float acc[kDotChunk * kDotCols] = {};
    const uint16_t* rows[kDotRows];
    for (int64_t panel = 0; panel < panels; ++panel) {
      const int64_t q0 = panel * panel_pairs, pairs = std::min<int64_t>(panel_pairs, pairs_all - q0);
      const uint16_t* weights = pk + (co0 / kDotCols) * per_block + q0 * taps * 2 * kDotCols;
      for (int64_t p = p_begin; p < p_end; p += kDotRows) {
        const int count = static_cast<int>(std::min<int64_t>(kDotRows, p_end - p));
        for (int r = 0; r < count; ++r) rows[r] = image + (((p + r) / w) * wp + (p + r) % w) * ci + 2 * q0;
        DotMicroDispatch<kDotRows>(count, rows, off, taps, pairs, weights, acc + (p - p_begin) * kDotCols);
      }
    }
    const int64_t width = std::min<int64_t>(kDotCols, co - co0);
    for (int64_t p = p_begin; p < p_end; ++p) {
      uint16_t* out = yp + (b * valid + p) * co + co0;
      for (int64_t c = 0; c < width; c += 16) {
        const __m256bh v = _mm512_cvtneps_pbh(_mm512_load_ps(acc + (p - p_begin) * kDotCols + c));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), (__m256i)v);
      }
    }
  });
  return ffi::Error::Success();
}

#else  // no AVX512-BF16 in this build

ffi::Error DotForward(ffi::ThreadPool, ffi::Buffer<ffi::BF16>, ffi::AnyBuffer, ffi::ResultBuffer<ffi::BF16>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "bf16_dot_conv_forward: built for a CPU without AVX512-BF16");
}

#endif

}  // namespace

// 1 where this build has the AVX512-BF16 convolution, else 0.
extern "C" int ConvnextAudioJaxBf16DotReady() {
#ifdef CONVNEXT_AUDIO_JAX_BF16_DOT
  return 1;
#else
  return 0;
#endif
}

// The padded lines an image needs for Bf16ConvForward and Bf16DotConvForward (the Python side pads to this).
extern "C" int64_t ConvnextAudioJaxBf16ConvRows(int64_t h, int64_t kh, int64_t kw, int64_t wp) {
  return RowsNeeded(h, kh, kw, wp);
}

// Both kernels take the same operands: x bfloat16, k bfloat16 or float32, y bfloat16.
static auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::BF16>>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::Buffer<ffi::BF16>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16ConvForward, convnext_audio_jax::Guarded<Forward>::Call, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16DotConvForward, convnext_audio_jax::Guarded<DotForward>::Call, ConvBinding());
