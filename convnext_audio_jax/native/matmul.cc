// bfloat16 matrix product on the CPU's AMX tile unit (Intel AMX-BF16), called through XLA's FFI:
//   Bf16Matmul: y[m, n] = bf16(bias[n] + sum over k of x[m, k] * w[k, n]),  x (M, K) and w (K, N) bfloat16,
//   bias float32, products summed in float32, one rounding to bfloat16 at the end; with the attribute gelu, the
//   exact GELU of that sum (the first Dense of a ConvNeXt block), saving XLA a pass over the widest activation.
//
// Why: over ConvNeXt-Tiny's pointwise products XLA:CPU computes bfloat16 dots at ~130 GFLOP/s on a 2-core AMX
// Xeon (~260 with YNNPACK's dots), torch's oneDNN at ~650 on the AMX tile unit; these tiles reach ~640
// (benchmarks/matmul.py, docs/benchmarks.md). The pointwise layers are most of a ConvNeXt block's FLOPs.
//
// w is repacked once per call into the pairs-of-rows layout the tile instruction reads. A task computes 32 rows of
// one column panel of y (the columns whose packed w fits in 1 MiB, so that consecutive tasks find it in cache): per
// 32 columns, four 16 × 16 float32 accumulator tiles and two 16-row tiles of x read in place. Each output element is
// one fixed-order sum, so results do not depend on scheduling.
//
// Built without AMX (another CPU, or a compiler without it) the handler reports an error and
// ConvnextAudioJaxAmxReady() returns 0; the Python side checks that before using it.

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

#ifdef CONVNEXT_AUDIO_JAX_AMX

using namespace convnext_audio_jax::amx;

constexpr int64_t kRows = 32;  // rows of y per task: two tiles of 16
constexpr int64_t kCols = 32;  // columns of y per step: two tiles of 16
constexpr int64_t kPanelBytes = 1 << 20;  // packed w per column panel

// Exact (erf) GELU, 0.5·v·(1 + erf(v/√2)), in float32: erf(z) = z·P(z²)/Q(z²) on z clamped to [-4, 4] (the
// rational approximation Eigen uses for float; |error| < 5e-7, far below a bfloat16 step).
inline __m512 Gelu(__m512 v) {
  const __m512 z = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.7071067811865476f)),
                                               _mm512_set1_ps(-4.0f)), _mm512_set1_ps(4.0f));
  const __m512 z2 = _mm512_mul_ps(z, z);
  __m512 p = _mm512_set1_ps(-2.72614225801306e-10f);
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(2.77068142495902e-08f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(-2.10102402082508e-06f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(-5.69250639462346e-05f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(-7.34990630326855e-04f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(-2.95459980854025e-03f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(-1.60960333262415e-02f));
  __m512 q = _mm512_set1_ps(-1.45660718464996e-05f);
  q = _mm512_fmadd_ps(q, z2, _mm512_set1_ps(-2.13374055278905e-04f));
  q = _mm512_fmadd_ps(q, z2, _mm512_set1_ps(-1.68282697438203e-03f));
  q = _mm512_fmadd_ps(q, z2, _mm512_set1_ps(-7.37332916720468e-03f));
  q = _mm512_fmadd_ps(q, z2, _mm512_set1_ps(-1.42647390514189e-02f));
  const __m512 erf = _mm512_div_ps(_mm512_mul_ps(z, p), q);
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(_mm512_set1_ps(1.0f), erf));
}

// Columns [n_begin, n_end) of y rows [m0, m0 + kRows), from x rows read with stride `depth` (x and y point at
// row m0), `valid` rows written.
void RowBlock(const uint16_t* x, const uint16_t* packed, const float* bias, int64_t depth, int64_t cols,
              int64_t n_begin, int64_t n_end, int64_t valid, bool gelu, uint16_t* y) {
  const int64_t blocks = depth / kDepth;
  alignas(64) float acc[kRows][kCols];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kCols) {
    ZeroBlock();
    const uint16_t* w0 = packed + (n0 / 16) * blocks * kPanel;
    const uint16_t* w1 = w0 + blocks * kPanel;
    for (int64_t kb = 0; kb < blocks; ++kb) {
      AccumulateBlock(x + kb * kDepth, depth * 2, w0 + kb * kPanel, w1 + kb * kPanel);
    }
    StoreBlock(acc);
    const __m512 b_lo = _mm512_loadu_ps(bias + n0), b_hi = _mm512_loadu_ps(bias + n0 + 16);
    for (int64_t r = 0; r < valid; ++r) {
      __m512 lo = _mm512_add_ps(_mm512_load_ps(&acc[r][0]), b_lo);
      __m512 hi = _mm512_add_ps(_mm512_load_ps(&acc[r][16]), b_hi);
      if (gelu) {
        lo = Gelu(lo);
        hi = Gelu(hi);
      }
      _mm512_storeu_si512(y + r * cols + n0, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // round to nearest even
    }
  }
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                  ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::BF16> y, bool gelu) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || bias.dimensions().size() != 1 || xd[1] != wd[0] ||
      yd[0] != xd[0] || yd[1] != wd[1] || bias.dimensions()[0] != wd[1] || wd[0] % kDepth || wd[1] % kCols) {
    return ffi::Error::InvalidArgument("bf16_matmul expects x (M, K), w (K, N), bias (N,) and an (M, N) result "
                                       "with K and N multiples of 32");
  }
  if (!RequestTiles()) return ffi::Error::Internal("bf16_matmul: the kernel refused the AMX tile state");
  const int64_t rows = xd[0], depth = wd[0], cols = wd[1];
  const auto* xp = reinterpret_cast<const uint16_t*>(x.typed_data());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  const float* bp = bias.typed_data();
  auto* yp = reinterpret_cast<uint16_t*>(y->typed_data());
  std::unique_ptr<uint16_t[]> packed(new uint16_t[depth * cols]);
  uint16_t* pp = packed.get();
  convnext_audio_jax::ParallelFor(pool, cols / 16, [=](int64_t nb) { PackColumns(wp, depth, cols, nb, pp); });
  // Tasks go through y panel by panel (columns whose packed w fits in ~1 MiB, a core's L2), row blocks within a
  // panel: consecutive tasks reuse the panel from cache instead of each streaming all of w.
  const int64_t panel = std::min<int64_t>(cols, std::max<int64_t>(kCols, (kPanelBytes / (2 * depth)) / kCols * kCols));
  const int64_t panels = (cols + panel - 1) / panel;
  const int64_t full = rows / kRows, tail = rows % kRows, blocks = full + (tail ? 1 : 0);
  convnext_audio_jax::ParallelFor(pool, panels * blocks, [=](int64_t task) {
    ConfigureTiles();
    const int64_t block = task % blocks, n_begin = (task / blocks) * panel;
    const int64_t n_end = std::min<int64_t>(cols, n_begin + panel), m0 = block * kRows;
    if (block < full) {
      RowBlock(xp + m0 * depth, pp, bp, depth, cols, n_begin, n_end, kRows, gelu, yp + m0 * cols);
    } else {  // the last rows, read from a zero-padded copy
      std::vector<uint16_t> rest(kRows * depth, 0);
      std::memcpy(rest.data(), xp + m0 * depth, tail * depth * sizeof(uint16_t));
      RowBlock(rest.data(), pp, bp, depth, cols, n_begin, n_end, tail, gelu, yp + m0 * cols);
    }
    _tile_release();
  });
  return ffi::Error::Success();
}

#else  // no AMX in this build

ffi::Error Matmul(ffi::ThreadPool, ffi::Buffer<ffi::BF16>, ffi::Buffer<ffi::BF16>, ffi::Buffer<ffi::F32>,
                  ffi::ResultBuffer<ffi::BF16>, bool) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "bf16_matmul: built for a CPU without AMX-BF16");
}

#endif

}  // namespace

// 1 where this build has the AMX kernel and the kernel granted the tile state, else 0.
extern "C" int ConvnextAudioJaxAmxReady() {
#ifdef CONVNEXT_AUDIO_JAX_AMX
  return convnext_audio_jax::amx::RequestTiles() ? 1 : 0;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16Matmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<bool>("gelu"));
