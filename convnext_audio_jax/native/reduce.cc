// Per-channel sums over the rows of an (N, C) float32 array, called through XLA's FFI:
//   ChannelSums: s1[c] = sum over n of a[n, c], s2[c] = sum over n of (a[n, c] - ma[c]) * (b[n, c] - mb[c]).
// One pass gives a bias gradient (s1), BatchNorm's centred sum of squares (a = b = x, ma = mb = mean) and its
// backward sums (a = dy, b = x, ma = 0, mb = mean: dbias and dscale / inv) without writing a product out.
//
// Why: XLA:CPU inside the training step rewrites a reduction over the rows into windowed reductions (~60 ms for
// one sum over CNN6's first activation, 131 MB), and its product with a vector of ones, which the models used
// instead, ran at ~5 GB/s (~26 ms for the same sum, and a product (x - mean)^2 written out first): half of
// BatchNorm's cost. Here the rows are cut into blocks, each block summed in float32 vectors and the blocks'
// sums added in double in block order, so the result does not depend on scheduling.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockBytes = 256 << 10;  // rows per block: ~256 KiB of a, at least one row
constexpr int kGroup = 8;                    // vectors of channels summed in registers per pass over a block

using convnext_audio_jax::kVec;
using convnext_audio_jax::Load;
using convnext_audio_jax::Store;
using convnext_audio_jax::Vec;

// sum[v] += a[n][v], cross[v] += (a[n][v] - ma[v]) * (b[n][v] - mb[v]) for NV vectors of channels (at a, b, ma, mb,
// rows `stride` floats apart) over `rows` rows, the sums in registers.
template <int NV>
void SumVectors(const float* a, const float* b, const float* ma, const float* mb, int64_t rows, int64_t stride,
                float* sum, float* cross) {
  Vec s[NV], x2[NV], mav[NV], mbv[NV];
  for (int v = 0; v < NV; ++v) {
    s[v] = x2[v] = Vec{};
    mav[v] = Load(ma + v * kVec);
    mbv[v] = Load(mb + v * kVec);
  }
  for (int64_t n = 0; n < rows; ++n, a += stride, b += stride) {
    for (int v = 0; v < NV; ++v) {
      const Vec x = Load(a + v * kVec);
      s[v] += x;
      x2[v] += (x - mav[v]) * (Load(b + v * kVec) - mbv[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    Store(sum + v * kVec, s[v]);
    Store(cross + v * kVec, x2[v]);
  }
}

template <int NV>
void SumGroup(int vectors, const float* a, const float* b, const float* ma, const float* mb, int64_t rows,
              int64_t stride, float* sum, float* cross) {
  if constexpr (NV > 1) {
    if (vectors < NV) return SumGroup<NV - 1>(vectors, a, b, ma, mb, rows, stride, sum, cross);
  }
  SumVectors<NV>(a, b, ma, mb, rows, stride, sum, cross);
}

ffi::Error Sums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::Buffer<ffi::F32> ma, ffi::Buffer<ffi::F32> mb, ffi::ResultBuffer<ffi::F32> s1,
                       ffi::ResultBuffer<ffi::F32> s2) {
  const auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || ad[0] != bd[0] || ad[1] != bd[1] || ma.element_count() != ad[1] ||
      mb.element_count() != ad[1] || s1->element_count() != ad[1] || s2->element_count() != ad[1]) {
    return ffi::Error::InvalidArgument("channel_sums expects a and b (N, C), means and results (C,)");
  }
  if (ad[1] == 0) return ffi::Error::Success();  // no channels: nothing to sum (and the blocking divides by C)
  const int64_t rows = ad[0], channels = ad[1];
  const int64_t per_block = std::max<int64_t>(1, kBlockBytes / (channels * int64_t(sizeof(float))));
  const int64_t blocks = (rows + per_block - 1) / per_block;
  std::vector<float> partial(blocks * 2 * channels);
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  const float* map = ma.typed_data();
  const float* mbp = mb.typed_data();
  float* parts = partial.data();
  convnext_audio_jax::ParallelFor(pool, blocks, [=](int64_t block) {
    float* sum = parts + block * 2 * channels;
    float* cross = sum + channels;
    const int64_t first = block * per_block, count = std::min(rows, first + per_block) - first;
    const float* x = ap + first * channels;
    const float* y = bp + first * channels;
    const int64_t whole = channels / kVec * kVec;
    // Groups of up to kGroup vectors of channels, each a pass over the block's rows (the block stays in L2).
    for (int64_t c = 0; c < whole; c += kGroup * kVec) {
      const int vectors = static_cast<int>(std::min<int64_t>(kGroup, (whole - c) / kVec));
      SumGroup<kGroup>(vectors, x + c, y + c, map + c, mbp + c, count, channels, sum + c, cross + c);
    }
    for (int64_t c = whole; c < channels; ++c) {  // channels past the last whole vector
      float total = 0, product = 0;
      for (int64_t n = 0; n < count; ++n) {
        total += x[n * channels + c];
        product += (x[n * channels + c] - map[c]) * (y[n * channels + c] - mbp[c]);
      }
      sum[c] = total;
      cross[c] = product;
    }
  });
  float* out1 = s1->typed_data();
  float* out2 = s2->typed_data();
  convnext_audio_jax::ParallelFor(pool, (channels + 255) / 256, [=](int64_t task) {
    for (int64_t c = task * 256; c < std::min(channels, task * 256 + 256); ++c) {
      double total1 = 0, total2 = 0;
      for (int64_t block = 0; block < blocks; ++block) {
        total1 += parts[block * 2 * channels + c];
        total2 += parts[block * 2 * channels + channels + c];
      }
      out1[c] = static_cast<float>(total1);
      out2[c] = static_cast<float>(total2);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ChannelSums, convnext_audio_jax::Guarded<Sums>::Call,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
