// The register-blocked float32 micro kernel of the dense convolutions (conv.cc's direct one, winograd.cc's
// products per transform point): kRows positions × kVectors vectors of one CO block in registers.
#ifndef CONVNEXT_AUDIO_JAX_NATIVE_CONV_MICRO_H_
#define CONVNEXT_AUDIO_JAX_NATIVE_CONV_MICRO_H_

#include <cstdint>

#include "vec.h"

namespace convnext_audio_jax {

constexpr int64_t kCoBlock = kVectors * kVec;  // a CO block: the register block's vectors

// y[p][v] (positions p of a group, vector v of a CO block) += sum over taps t and the panel's channels c of
// x_p[offset[t] + c] * panel[t][c][v]: rows[r] points at position r's input pixel (tap (0, 0), first channel of
// the CI block); panel is the packed weights (taps × cb × kCoBlock). Without `accumulate` the sums start at zero.
template <int R, int NV>
void ConvMicro(const float* const* rows, const int64_t* offsets, int64_t taps, int64_t cb, const float* panel,
               bool accumulate, float* y, int64_t y_stride) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? Load(y + r * y_stride + v * kVec) : Vec{};
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t offset = offsets[t];
    for (int64_t c = 0; c < cb; ++c, panel += kCoBlock) {
      Vec wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = Load(panel + v * kVec);
      for (int r = 0; r < R; ++r) {
        const Vec xv = rows[r][offset + c] - Vec{};  // a broadcast: s - 0 folds to s, s + 0 would not (-0)
        for (int v = 0; v < NV; ++v) acc[r][v] += xv * wv[v];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) Store(y + r * y_stride + v * kVec, acc[r][v]);
}

struct ConvBlock {
  template <int R, int NV, typename... Args>
  static void Run(Args... args) { ConvMicro<R, NV>(args...); }
};

}  // namespace convnext_audio_jax

#endif  // CONVNEXT_AUDIO_JAX_NATIVE_CONV_MICRO_H_
