// One vector register of floats for the CPU the library is compiled for (-march=native), shared by the float32
// kernels of this folder, and the exact GELU on it. Wider generic vectors than the register make GCC split them
// through memory.
#ifndef CONVNEXT_AUDIO_JAX_NATIVE_VEC_H_
#define CONVNEXT_AUDIO_JAX_NATIVE_VEC_H_

#include <cstdint>
#include <cstring>

namespace convnext_audio_jax {

// The register block of the float32 Dense product and convolution: kRows rows (or positions) × kVectors vectors of
// sums. AVX-512 (32 registers): 6 × 4. AVX2 (16): 6 × 2, a step's weights in two registers; 3 × 4, which read one
// of them from memory per row, ran the Dense products ~6 % and CNN14's convolutions ~15 % slower (docs/benchmarks.md).
#if defined(__AVX512F__)
constexpr int64_t kVec = 16;
constexpr int kVectors = 4;
#elif defined(__AVX__)
constexpr int64_t kVec = 8;
constexpr int kVectors = 2;
#else
constexpr int64_t kVec = 4;
constexpr int kVectors = 2;
#endif
constexpr int kRows = 6;
typedef float Vec __attribute__((vector_size(kVec * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

// Block::Run<R, NV>(args...) with R = rows (1..KR) and NV = vectors (1..KNV) as compile-time constants: how the
// register-blocked kernels take their tails of rows and of column vectors (each size its own unrolled code).
template <typename Block, int KR, int KNV, typename... Args>
inline void Dispatch(int rows, int vectors, Args... args) {
  if constexpr (KR > 1) {
    if (rows < KR) return Dispatch<Block, KR - 1, KNV>(rows, vectors, args...);
  }
  if constexpr (KNV > 1) {
    if (vectors < KNV) return Dispatch<Block, KR, KNV - 1>(rows, vectors, args...);
  }
  Block::template Run<KR, KNV>(args...);
}

// Exact (erf) GELU, 0.5·v·(1 + erf(v/√2)), in float32: erf(z) = z·P(z²)/Q(z²) on z clamped to [-4, 4] (the
// rational approximation Eigen and XLA use for float; |error| < 5e-7). The products and sums contract to FMAs.
template <typename V>
inline V Gelu(V v) {
  V z = v * 0.7071067811865476f;
  z = z < -4.0f ? V{} - 4.0f : z;
  z = z > 4.0f ? V{} + 4.0f : z;
  const V z2 = z * z;
  V p = V{} - 2.72614225801306e-10f;
  p = p * z2 + 2.77068142495902e-08f;
  p = p * z2 - 2.10102402082508e-06f;
  p = p * z2 - 5.69250639462346e-05f;
  p = p * z2 - 7.34990630326855e-04f;
  p = p * z2 - 2.95459980854025e-03f;
  p = p * z2 - 1.60960333262415e-02f;
  V q = V{} - 1.45660718464996e-05f;
  q = q * z2 - 2.13374055278905e-04f;
  q = q * z2 - 1.68282697438203e-03f;
  q = q * z2 - 7.37332916720468e-03f;
  q = q * z2 - 1.42647390514189e-02f;
  const V erf = (z * p) / q;
  return (0.5f * v) * (1.0f + erf);
}

}  // namespace convnext_audio_jax

#endif  // CONVNEXT_AUDIO_JAX_NATIVE_VEC_H_
