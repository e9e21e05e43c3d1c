// The Dense layers' matrix product, called through XLA's FFI: y[m, n] = bias[n] + sum over k of x[m, k] * w[k, n]
// (with the attribute gelu, the exact GELU of that sum: the first Dense of a ConvNeXt block, saving XLA a pass over
// the widest activation), products and bias summed in float32.
//   Bf16Matmul: on the CPU's AMX tile unit (Intel AMX-BF16), x (M, K) and w (K, N) bfloat16, bias float32, one
//   rounding to bfloat16 at the end.
//   Bf16DotMatmul: the same operands and result on a CPU with AVX512-BF16 but no tile unit (AMD Zen 4, Intel
//   Cooper Lake): vdpbf16ps, 16 columns × one pair of k per instruction.
//   F32Matmul: float32, any CPU (vector registers of the -march=native build).
//
// Why: over ConvNeXt-Tiny's pointwise products XLA:CPU computes bfloat16 dots at ~130 GFLOP/s on a 2-core AMX
// Xeon (~260 with YNNPACK's dots), torch's oneDNN at ~650 on the AMX tile unit; these tiles reach ~640. XLA's
// float32 dot (Eigen's contraction) allocates its packing buffers per call (174 MB for ConvNeXt-Tiny's first C -> 4C
// product, batch 8: new pages every call) and leaves the GELU to another pass; the float32 kernel ran the
// whole forward's products ~5 % faster (benchmarks/matmul.py, docs/benchmarks.md). The pointwise layers are most
// of a ConvNeXt block's FLOPs.
//
// Tile kernel: w is repacked once per call into the pairs-of-rows layout the tile instruction reads. A task
// computes 32 rows of one column panel of y (the columns whose packed w fits in 1 MiB, so that consecutive tasks
// find it in cache): per 32 columns, four 16 × 16 float32 accumulator tiles and two 16-row tiles of x read in
// place. Built without AMX (another CPU, or a compiler without it) its handler reports an error and
// ConvnextAudioJaxAmxReady() returns 0; the Python side checks that before using it.
//
// float32 and AVX512-BF16 kernels: w is packed once per call into panels of 4 vectors of columns (float32 on AVX2:
// 2; the bfloat16 one in pairs of k, the layout vdpbf16ps reads); a task takes a block of rows (~256 KiB of x)
// through a group of panels (~512 KiB), a few rows × one panel in registers over all of K. On a Sapphire
// Rapids Xeon vdpbf16ps does half the multiplications per cycle of float32 FMAs, so there (AMX hidden) the bfloat16
// kernel loses to the float32 one and is not a default (native.bf16_dot_preferred); on the AVX512-BF16 EPYC of
// issue 15 torch's bfloat16 ConvNeXt-Tiny forward, on oneDNN kernels of this kind, ran 2.7x its float32 one.
//
// Each output element is one fixed-order sum in both, so results do not depend on scheduling.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "bf16.h"
#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifdef CONVNEXT_AUDIO_JAX_AMX

using namespace convnext_audio_jax::amx;

constexpr int64_t kBlockRows = 32;  // rows of y per task: two tiles of 16
constexpr int64_t kBlockCols = 32;  // columns of y per step: two tiles of 16
constexpr int64_t kPanelBytes = 1 << 20;  // packed w per column panel

// Columns [n_begin, n_end) of y rows [m0, m0 + kBlockRows), from x rows read with stride `depth` (x and y point at
// row m0), `valid` rows written.
void RowBlock(const uint16_t* x, const uint16_t* packed, const float* bias, int64_t depth, int64_t cols,
              int64_t n_begin, int64_t n_end, int64_t valid, bool gelu, uint16_t* y) {
  const int64_t blocks = depth / kDepth;
  alignas(64) float acc[kBlockRows][kBlockCols];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kBlockCols) {
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
        lo = convnext_audio_jax::Gelu(lo);
        hi = convnext_audio_jax::Gelu(hi);
      }
      _mm512_storeu_si512(y + r * cols + n0, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // round to nearest even
    }
  }
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                  ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::BF16> y, bool gelu) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || bias.dimensions().size() != 1 || xd[1] != wd[0] ||
      yd[0] != xd[0] || yd[1] != wd[1] || bias.dimensions()[0] != wd[1] || wd[0] < kDepth || wd[0] % kDepth ||
      wd[1] % kBlockCols) {
    return ffi::Error::InvalidArgument("bf16_matmul expects x (M, K), w (K, N), bias (N,) and an (M, N) result "
                                       "with K a positive multiple of 32 and N a multiple of 32");
  }
  if (y->element_count() == 0) return ffi::Error::Success();
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
  const int64_t panel = std::min<int64_t>(cols, std::max<int64_t>(kBlockCols, (kPanelBytes / (2 * depth)) / kBlockCols * kBlockCols));
  const int64_t panels = (cols + panel - 1) / panel;
  const int64_t full = rows / kBlockRows, tail = rows % kBlockRows, blocks = full + (tail ? 1 : 0);
  convnext_audio_jax::ParallelFor(pool, panels * blocks, [=](int64_t task) {
    ConfigureTiles();
    const int64_t block = task % blocks, n_begin = (task / blocks) * panel;
    const int64_t n_end = std::min<int64_t>(cols, n_begin + panel), m0 = block * kBlockRows;
    if (block < full) {
      RowBlock(xp + m0 * depth, pp, bp, depth, cols, n_begin, n_end, kBlockRows, gelu, yp + m0 * cols);
    } else {  // the last rows, read from a zero-padded copy
      std::vector<uint16_t> rest(kBlockRows * depth, 0);
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

// ---- the register-blocked kernels (float32, AVX512-BF16) ----

constexpr int64_t kGroupBytes = 512 << 10;  // packed w of the panels a task cycles through (L2)
constexpr int64_t kTaskBytes = 256 << 10;   // x rows of a task (L2)

// How the register-blocked kernels split y into tasks: blocks of task_rows rows (a multiple of the micro kernel's
// rows, x ~kTaskBytes) times groups of `group` panels (packed w ~kGroupBytes), at least ~8 tasks per thread.
struct Tiling {
  int64_t group, groups, task_rows, blocks;
};

Tiling Tile(int64_t rows, int64_t panels, int64_t row_bytes, int64_t panel_bytes, int64_t micro_rows, int64_t threads) {
  const int64_t group = std::max<int64_t>(1, kGroupBytes / panel_bytes);
  const int64_t groups = (panels + group - 1) / group;
  const int64_t wanted = 8 * (threads + 1), blocks_wanted = (wanted + groups - 1) / groups;
  const int64_t fit = std::clamp<int64_t>(kTaskBytes / row_bytes / micro_rows * micro_rows, micro_rows,
                                          32 * micro_rows);
  const int64_t even = ((rows + blocks_wanted - 1) / blocks_wanted + micro_rows - 1) / micro_rows * micro_rows;
  const int64_t task_rows = std::clamp<int64_t>(even, micro_rows, fit);
  return {group, groups, task_rows, (rows + task_rows - 1) / task_rows};
}

#ifdef CONVNEXT_AUDIO_JAX_BF16_DOT

constexpr int kDotRows = 6;          // rows of a register block: 6 × 4 accumulators of 32 vector registers
constexpr int64_t kDotCols = 64;     // columns of a panel: 4 vectors of 16

// y rows [0, R) × one panel's NV vectors of columns = bias + x rows · panel (then GELU), rounded to bfloat16 once:
// x rows `depth` apart (bfloat16), panel depth / 2 pairs × kDotCols × 2, y rows `cols` apart.
template <int R, int NV>
void DotMicro(const uint16_t* x, int64_t depth, const uint16_t* panel, const float* bias, bool gelu, uint16_t* y,
              int64_t cols) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; k += 2, panel += 2 * kDotCols) {
    __m512bh w[NV];
    for (int v = 0; v < NV; ++v) w[v] = (__m512bh)_mm512_loadu_si512(panel + v * 32);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * depth + k, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xb, w[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const __m512 b = _mm512_loadu_ps(bias + v * 16);
    for (int r = 0; r < R; ++r) {
      __m512 sum = _mm512_add_ps(acc[r][v], b);
      if (gelu) sum = convnext_audio_jax::Gelu(sum);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * cols + v * 16), (__m256i)_mm512_cvtneps_pbh(sum));
    }
  }
}

struct DotBlock {
  template <int R, int NV, typename... Args>
  static void Run(Args... args) { DotMicro<R, NV>(args...); }
};

ffi::Error DotProduct(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                      ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::BF16> y, bool gelu) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || bias.dimensions().size() != 1 || xd[1] != wd[0] ||
      yd[0] != xd[0] || yd[1] != wd[1] || bias.dimensions()[0] != wd[1] || wd[0] < 2 || wd[0] % 2 || wd[1] % 16) {
    return ffi::Error::InvalidArgument("bf16_dot_matmul expects x (M, K), w (K, N), bias (N,) and an (M, N) result "
                                       "with K even and positive and N a multiple of 16");
  }
  if (y->element_count() == 0) return ffi::Error::Success();
  const int64_t rows = xd[0], depth = wd[0], cols = wd[1];
  const int64_t panels = (cols + kDotCols - 1) / kDotCols, panel_size = depth * kDotCols;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.typed_data());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  const float* bp = bias.typed_data();
  auto* yp = reinterpret_cast<uint16_t*>(y->typed_data());
  // w packed once per call: panel p holds, per pair of k, its kDotCols columns' (w[k], w[k + 1]) pairs (zeros past
  // N, never read into y).
  std::unique_ptr<uint16_t[]> packed(new uint16_t[panels * panel_size]);
  uint16_t* pp = packed.get();
  convnext_audio_jax::ParallelFor(pool, panels, [=](int64_t p) {
    const int64_t n0 = p * kDotCols, width = std::min<int64_t>(kDotCols, cols - n0);
    alignas(64) uint16_t even[kDotCols] = {}, odd[kDotCols] = {};
    for (int64_t k = 0; k < depth; k += 2) {
      std::memcpy(even, wp + k * cols + n0, width * sizeof(uint16_t));
      std::memcpy(odd, wp + (k + 1) * cols + n0, width * sizeof(uint16_t));
      uint16_t* out = pp + p * panel_size + k * kDotCols;
      for (int v = 0; v < 4; ++v) {
        _mm512_storeu_si512(out + 32 * v, convnext_audio_jax::bf16::Pairs(even + 16 * v, odd + 16 * v));
      }
    }
  });
  const Tiling t = Tile(rows, panels, depth * 2, panel_size * 2, kDotRows, pool.num_threads());
  convnext_audio_jax::ParallelFor(pool, t.groups * t.blocks, [=](int64_t task) {
    const int64_t p0 = (task / t.blocks) * t.group, p1 = std::min<int64_t>(panels, p0 + t.group);
    const int64_t m0 = (task % t.blocks) * t.task_rows, m1 = std::min<int64_t>(rows, m0 + t.task_rows);
    for (int64_t m = m0; m < m1; m += kDotRows) {
      const int count = static_cast<int>(std::min<int64_t>(kDotRows, m1 - m));
      for (int64_t p = p0; p < p1; ++p) {
        const int vectors = static_cast<int>(std::min<int64_t>(kDotCols, cols - p * kDotCols) / 16);
        convnext_audio_jax::Dispatch<DotBlock, kDotRows, kDotCols / 16>(count, vectors, xp + m * depth, depth,
                                                            pp + p * panel_size, bp + p * kDotCols, gelu,
                                                            yp + m * cols + p * kDotCols, cols);
      }
    }
  });
  return ffi::Error::Success();
}

#else  // no AVX512-BF16 in this build

ffi::Error DotProduct(ffi::ThreadPool, ffi::Buffer<ffi::BF16>, ffi::Buffer<ffi::BF16>, ffi::Buffer<ffi::F32>,
                      ffi::ResultBuffer<ffi::BF16>, bool) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "bf16_dot_matmul: built for a CPU without AVX512-BF16");
}

#endif

// ---- float32 ----

using convnext_audio_jax::Gelu;
using convnext_audio_jax::kRows;
using convnext_audio_jax::kVec;
using convnext_audio_jax::kVectors;
using convnext_audio_jax::Load;
using convnext_audio_jax::Store;
using convnext_audio_jax::Vec;

constexpr int64_t kPanelCols = kVectors * kVec;  // a column panel: the register block's vectors

// y rows [0, R) × one panel's NV vectors of columns = bias + x rows · panel (then GELU): x rows `depth` apart,
// panel depth × kPanelCols, y rows `cols` apart. Sums start at zero and the bias is added last, as XLA's dot + add.
template <int R, int NV>
void F32Micro(const float* x, int64_t depth, const float* panel, const float* bias, bool gelu, float* y, int64_t cols) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec{};
  for (int64_t k = 0; k < depth; ++k, panel += kPanelCols) {
    Vec wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = Load(panel + v * kVec);
    for (int r = 0; r < R; ++r) {
      const Vec xv = x[r * depth + k] - Vec{};  // a broadcast: s - 0 folds to s, s + 0 would not (-0)
      for (int v = 0; v < NV; ++v) acc[r][v] += xv * wv[v];
    }
  }
  for (int v = 0; v < NV; ++v) {
    const Vec b = Load(bias + v * kVec);
    for (int r = 0; r < R; ++r) Store(y + r * cols + v * kVec, gelu ? Gelu(acc[r][v] + b) : acc[r][v] + b);
  }
}

struct F32Block {
  template <int R, int NV, typename... Args>
  static void Run(Args... args) { F32Micro<R, NV>(args...); }
};

ffi::Error F32Product(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, bool gelu) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || bias.dimensions().size() != 1 || xd[1] != wd[0] ||
      yd[0] != xd[0] || yd[1] != wd[1] || bias.dimensions()[0] != wd[1] || wd[0] < 1 || wd[1] % kVec) {
    return ffi::Error::InvalidArgument("f32_matmul expects x (M, K), w (K, N), bias (N,) and an (M, N) result "
                                       "with K positive and N a multiple of the vector width");
  }
  if (y->element_count() == 0) return ffi::Error::Success();  // the tiling divides by the panels
  const int64_t rows = xd[0], depth = wd[0], cols = wd[1];
  const int64_t panels = (cols + kPanelCols - 1) / kPanelCols;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const float* bp = bias.typed_data();
  float* yp = y->typed_data();
  // w packed once per call: panel p is depth rows of its kPanelCols columns, contiguous.
  std::unique_ptr<float[]> packed(new float[panels * depth * kPanelCols]);
  float* pp = packed.get();
  convnext_audio_jax::ParallelFor(pool, panels, [=](int64_t p) {
    const int64_t width = std::min<int64_t>(kPanelCols, cols - p * kPanelCols);
    for (int64_t k = 0; k < depth; ++k)
      std::memcpy(pp + (p * depth + k) * kPanelCols, wp + k * cols + p * kPanelCols, width * sizeof(float));
  });
  // A task: a block of rows (its x in L2) times a group of panels (their packed w in L2); within it, kRows rows at
  // a time through every panel of the group, so that each task writes whole stretches of rows.
  const Tiling t = Tile(rows, panels, depth * int64_t(sizeof(float)), depth * kPanelCols * int64_t(sizeof(float)),
                        kRows, pool.num_threads());
  convnext_audio_jax::ParallelFor(pool, t.groups * t.blocks, [=](int64_t task) {
    const int64_t p0 = (task / t.blocks) * t.group, p1 = std::min<int64_t>(panels, p0 + t.group);
    const int64_t m0 = (task % t.blocks) * t.task_rows, m1 = std::min<int64_t>(rows, m0 + t.task_rows);
    for (int64_t m = m0; m < m1; m += kRows) {
      const int count = static_cast<int>(std::min<int64_t>(kRows, m1 - m));
      for (int64_t p = p0; p < p1; ++p) {
        const int vectors = static_cast<int>(std::min<int64_t>(kPanelCols, cols - p * kPanelCols) / kVec);
        convnext_audio_jax::Dispatch<F32Block, kRows, kVectors>(count, vectors, xp + m * depth, depth,
                                                                pp + p * depth * kPanelCols, bp + p * kPanelCols,
                                                                gelu, yp + m * cols + p * kPanelCols, cols);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// 1 where this build has the AMX kernel and the kernel granted the tile state, else 0.
extern "C" int ConvnextAudioJaxAmxReady() {
#ifdef CONVNEXT_AUDIO_JAX_AMX
  return convnext_audio_jax::amx::RequestTiles() ? 1 : 0;
#else
  return 0;
#endif
}

// The three products' operands: x and w of one type, the bias float32, a result of x's type, the GELU flag.
template <ffi::DataType T>
auto MatmulBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()  // the binding's type depends on T from here on
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<T>>()
      .template Attr<bool>("gelu");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16Matmul, convnext_audio_jax::Guarded<Matmul>::Call, MatmulBinding<ffi::DataType::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16DotMatmul, convnext_audio_jax::Guarded<DotProduct>::Call, MatmulBinding<ffi::DataType::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(F32Matmul, convnext_audio_jax::Guarded<F32Product>::Call, MatmulBinding<ffi::DataType::F32>());
