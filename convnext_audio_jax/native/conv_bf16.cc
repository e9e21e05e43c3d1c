// bfloat16 stride-1 dense convolution on the CPU's AMX tile unit (Intel AMX-BF16), called through XLA's FFI:
//   Bf16ConvForward: y[b, h, w, co] = bf16(sum over (i, j, ci) of xp[b, h + i, w + j, ci] * k[i, j, ci, co]),
// xp (B, HP, WP, CI) the input already zero-padded (and HP at least H + KH - 1 plus the rows the last block
// reads, see RowsNeeded), k (KH, KW, CI, CO) bfloat16 or float32 (rounded to bfloat16 as it is packed), y (B, H, W, CO) with W = WP - KW + 1; products summed in float32,
// rounded to bfloat16 once. CI and CO multiples of 32.
//
// Why: XLA:CPU runs a bfloat16 convolution as a float32 one between conversions, slower than its float32
// convolution; torch's oneDNN uses the tile unit, and CNN14's bfloat16 forward ran at 0.65-0.71x torch autocast
// (docs/benchmarks.md).
//
// Each image is read as one long row of WP-wide padded lines: output position p = h * WP + w takes input position
// p + i * WP + j for tap (i, j), so a tap is a constant offset and 16 consecutive positions are 16 rows of one
// tile read in place (stride CI). Positions with w >= W are computed and dropped (W / WP of the work is kept).
// A task computes 32 positions of one image for one column panel of y (the output channels whose packed kernel
// fits in ~1 MiB, so that consecutive tasks find it in cache), per 32 channels four 16 x 16 float32 accumulator
// tiles over all taps and input channels. Each output is one fixed-order sum: results do not depend on
// scheduling.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "amx.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;  // output positions per task, and output channels per step: two tiles of 16

// Padded lines (of WP positions) an image of H output lines must have: the last 32-position block reads up to
// KH - 1 lines and KW - 1 positions past its last position.
int64_t RowsNeeded(int64_t h, int64_t kh, int64_t kw, int64_t wp) {
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
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint16_t* w0 = packed + (n0 / 16) * blocks * kPanel;
    const uint16_t* w1 = w0 + blocks * kPanel;
    for (int64_t t = 0; t < g.taps; ++t) {
      const uint16_t* xt = x + (p0 + g.offsets[t]) * g.ci;
      for (int64_t c = 0; c < ci_blocks; ++c) {
        const int64_t kb = t * ci_blocks + c;
        _tile_loadd(4, xt + c * kDepth, stride);
        _tile_loadd(5, xt + 16 * g.ci + c * kDepth, stride);
        _tile_loadd(6, w0 + kb * kPanel, 64);
        _tile_loadd(7, w1 + kb * kPanel, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, &acc[0][0], kBlock * 4);
    _tile_stored(1, &acc[0][16], kBlock * 4);
    _tile_stored(2, &acc[16][0], kBlock * 4);
    _tile_stored(3, &acc[16][16], kBlock * 4);
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
      yd[2] != xd[2] - kd[1] + 1 || xd[3] % kDepth || yd[3] % kBlock ||
      xd[1] < RowsNeeded(yd[1], kd[0], kd[1], xd[2]) ||
      (k.element_type() != ffi::DataType::BF16 && k.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("bf16_conv_forward expects a padded x (B, HP, W + KW - 1, CI) with HP lines "
                                       "for the last block's reads, k (KH, KW, CI, CO) bfloat16 or float32 and a "
                                       "(B, H, W, CO) result, CI and CO multiples of 32");
  }
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
  const int64_t panel = std::min<int64_t>(cols, std::max<int64_t>(kBlock, (kPanelBytes / (2 * depth)) / kBlock * kBlock));
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

}  // namespace

// The padded lines an image needs for Bf16ConvForward (the Python side pads to this).
extern "C" int64_t ConvnextAudioJaxBf16ConvRows(int64_t h, int64_t kh, int64_t kw, int64_t wp) {
  return RowsNeeded(h, kh, kw, wp);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16ConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
