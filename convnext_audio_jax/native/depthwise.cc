// Stride-1 depthwise convolution on XLA:CPU, called through XLA's FFI; float32, NHWC, x zero outside its extent:
//   DepthwiseConv:        y[b, h, w, c] = bias[c] + sum over (i, j) of x[b, h + i - pad_top, w + j - pad_left, c] * k[i, j, c]
//   DepthwiseKernelGrad: dk[i, j, c] = sum over (b, h, w) of x[b, h + i - pad_top, w + j - pad_left, c] * dy[b, h, w, c]
// (the input gradient is DepthwiseConv of dy with the flipped kernel).
//
// Why: XLA:CPU runs its grouped convolution ~10x slower than torch, and the same sums written with XLA ops either
// re-read shifted copies from memory (the forward) or, for the kernel gradient, become a channel-batched product
// with ~9x the multiplies it needs on many small matrices (docs/benchmarks.md). Here a task takes one batch element
// and a block of channels (two vector registers: a 64-byte cache line of an NHWC pixel with AVX2) and keeps its sums
// in registers. Kernel-gradient tasks write their own partial sums, summed over the batch in a fixed order at the
// end, so no result depends on how the tasks were scheduled.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using convnext_audio_jax::kVec;
using convnext_audio_jax::Load;
using convnext_audio_jax::Store;
using convnext_audio_jax::Vec;

// A task's channels: two registers (a 64-byte cache line of an NHWC pixel with AVX/AVX2).
constexpr int64_t kBlock = 2 * kVec;

struct Geometry {
  int64_t batch, height, width, channels, out_h, out_w, kh, kw, pad_top, pad_left;
};

// Pads any image could have (either sign: a negative pad crops); the column and row arithmetic stays far from
// int64 overflow.
bool PadsFit(int64_t top, int64_t left) {
  constexpr int64_t kMaxPad = int64_t{1} << 30;
  return top > -kMaxPad && top < kMaxPad && left > -kMaxPad && left < kMaxPad;
}

// Partial sums of one batch element `b` for channels [c0, c0 + NV * kVec) into out (KH, KW, kBlock): for each
// kernel row i and output row h, the KW × NV sums over the row's output columns stay in registers.
template <int KW, int NV>
void VectorBlock(const float* x, const float* dy, const Geometry& g, int64_t b, int64_t c0, float* out) {
  const int64_t C = g.channels;
  // Output columns whose KW taps all fall inside x: no bounds checks there (a negative pad crops: from column 0).
  const int64_t w_lo = std::clamp<int64_t>(g.pad_left, 0, g.out_w);
  const int64_t w_hi = std::max<int64_t>(w_lo, std::min<int64_t>(g.out_w, g.width - KW + 1 + g.pad_left));
  for (int64_t i = 0; i < g.kh; ++i) {
    Vec total[KW][NV];
    for (int j = 0; j < KW; ++j)
      for (int v = 0; v < NV; ++v) total[j][v] = Vec{};
    for (int64_t h = 0; h < g.out_h; ++h) {
      const int64_t r = h + i - g.pad_top;
      if (r < 0 || r >= g.height) continue;
      const float* xrow = x + ((b * g.height + r) * g.width) * C + c0;
      const float* dyrow = dy + ((b * g.out_h + h) * g.out_w) * C + c0;
      Vec acc[KW][NV];
      for (int j = 0; j < KW; ++j)
        for (int v = 0; v < NV; ++v) acc[j][v] = Vec{};
      auto edge = [&](int64_t w) {
        for (int j = 0; j < KW; ++j) {
          const int64_t col = w + j - g.pad_left;
          if (col < 0 || col >= g.width) continue;
          for (int v = 0; v < NV; ++v) acc[j][v] += Load(xrow + col * C + v * kVec) * Load(dyrow + w * C + v * kVec);
        }
      };
      for (int64_t w = 0; w < w_lo; ++w) edge(w);
      for (int64_t w = w_lo; w < w_hi; ++w) {
        const float* xs = xrow + (w - g.pad_left) * C;
        Vec d[NV];
        for (int v = 0; v < NV; ++v) d[v] = Load(dyrow + w * C + v * kVec);
        for (int j = 0; j < KW; ++j)
          for (int v = 0; v < NV; ++v) acc[j][v] += Load(xs + j * C + v * kVec) * d[v];
      }
      for (int64_t w = w_hi; w < g.out_w; ++w) edge(w);
      for (int j = 0; j < KW; ++j)
        for (int v = 0; v < NV; ++v) total[j][v] += acc[j][v];
    }
    for (int j = 0; j < KW; ++j)
      for (int v = 0; v < NV; ++v) Store(out + (i * KW + j) * kBlock + v * kVec, total[j][v]);
  }
}

// The same for any kernel width and any number of channels (c0 .. c0 + lanes), one channel at a time.
void ScalarBlock(const float* x, const float* dy, const Geometry& g, int64_t b, int64_t c0, int64_t lanes,
                 float* out) {
  const int64_t C = g.channels;
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      for (int64_t l = 0; l < lanes; ++l) {
        float total = 0.0f;
        for (int64_t h = 0; h < g.out_h; ++h) {
          const int64_t r = h + i - g.pad_top;
          if (r < 0 || r >= g.height) continue;
          float acc = 0.0f;
          for (int64_t w = 0; w < g.out_w; ++w) {
            const int64_t col = w + j - g.pad_left;
            if (col < 0 || col >= g.width) continue;
            acc += x[((b * g.height + r) * g.width + col) * C + c0 + l] * dy[((b * g.out_h + h) * g.out_w + w) * C + c0 + l];
          }
          total += acc;
        }
        out[(i * g.kw + j) * kBlock + l] = total;
      }
    }
  }
}

template <int KW>
bool TryVector(const float* x, const float* dy, const Geometry& g, int64_t b, int64_t c0, int64_t lanes, float* out) {
  if (g.kw != KW) return false;
  if (lanes == kBlock) {
    VectorBlock<KW, 2>(x, dy, g, b, c0, out);
    return true;
  }
  if (lanes == kVec) {
    VectorBlock<KW, 1>(x, dy, g, b, c0, out);
    return true;
  }
  return false;
}

// Channel groups: blocks of kBlock channels, then one of kVec if that many are left, then the rest one by one.
std::vector<std::pair<int64_t, int64_t>> ChannelGroups(int64_t channels) {
  std::vector<std::pair<int64_t, int64_t>> groups;
  int64_t c0 = 0;
  for (; c0 + kBlock <= channels; c0 += kBlock) groups.emplace_back(c0, kBlock);
  if (c0 + kVec <= channels) groups.emplace_back(c0, kVec), c0 += kVec;
  if (c0 < channels) groups.emplace_back(c0, channels - c0);
  return groups;
}

void Task(const float* x, const float* dy, const Geometry& g, const std::vector<std::pair<int64_t, int64_t>>& groups,
          int64_t task, float* partial) {
  const int64_t count = static_cast<int64_t>(groups.size());
  const int64_t b = task / count;
  const auto [c0, lanes] = groups[task % count];
  float* out = partial + task * g.kh * g.kw * kBlock;
  if (TryVector<7>(x, dy, g, b, c0, lanes, out) || TryVector<5>(x, dy, g, b, c0, lanes, out) ||
      TryVector<3>(x, dy, g, b, c0, lanes, out)) {
    return;
  }
  ScalarBlock(x, dy, g, b, c0, lanes, out);
}

// ---- the convolution ----

// Outputs w .. w + T - 1 of output row h for channels c0 .. c0 + NV * kVec, all taps inside x along the width.
template <int KW, int NV, int T>
inline void ConvStrip(const float* x, const float* k, const float* bias, const Geometry& g, int64_t b, int64_t h,
                      int64_t i_lo, int64_t i_hi, int64_t w, int64_t c0, float* y) {
  const int64_t C = g.channels;
  Vec acc[T][NV];
  for (int v = 0; v < NV; ++v) {
    const Vec init = bias ? Load(bias + c0 + v * kVec) : Vec{};
    for (int t = 0; t < T; ++t) acc[t][v] = init;
  }
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const float* xs = x + ((b * g.height + h + i - g.pad_top) * g.width + w - g.pad_left) * C + c0;
    const float* ks = k + i * KW * C + c0;
    for (int j = 0; j < KW; ++j) {
      Vec kv[NV];
      for (int v = 0; v < NV; ++v) kv[v] = Load(ks + j * C + v * kVec);
      for (int t = 0; t < T; ++t)
        for (int v = 0; v < NV; ++v) acc[t][v] += Load(xs + (t + j) * C + v * kVec) * kv[v];
    }
  }
  float* ys = y + ((b * g.out_h + h) * g.out_w + w) * C + c0;
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < NV; ++v) Store(ys + t * C + v * kVec, acc[t][v]);
}

// One output (b, h, w) for channels c0 .. c0 + NV * kVec, with the width checked tap by tap (the image's edges).
template <int NV>
void ConvEdge(const float* x, const float* k, const float* bias, const Geometry& g, int64_t b, int64_t h,
              int64_t i_lo, int64_t i_hi, int64_t w, int64_t c0, float* y) {
  const int64_t C = g.channels;
  Vec acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = bias ? Load(bias + c0 + v * kVec) : Vec{};
  for (int64_t i = i_lo; i < i_hi; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t col = w + j - g.pad_left;
      if (col < 0 || col >= g.width) continue;
      const float* xs = x + ((b * g.height + h + i - g.pad_top) * g.width + col) * C + c0;
      for (int v = 0; v < NV; ++v) acc[v] += Load(xs + v * kVec) * Load(k + (i * g.kw + j) * C + c0 + v * kVec);
    }
  }
  for (int v = 0; v < NV; ++v) Store(y + ((b * g.out_h + h) * g.out_w + w) * C + c0 + v * kVec, acc[v]);
}

template <int KW, int NV>
void ConvRows(const float* x, const float* k, const float* bias, const Geometry& g, int64_t b, int64_t h0,
              int64_t h1, int64_t c0, float* y) {
  constexpr int T = 4;
  // Output columns whose taps all fall inside x (a negative pad crops: from column 0).
  const int64_t w_lo = std::clamp<int64_t>(g.pad_left, 0, g.out_w);
  const int64_t w_hi = std::max<int64_t>(w_lo, std::min<int64_t>(g.out_w, g.width - KW + 1 + g.pad_left));
  for (int64_t h = h0; h < h1; ++h) {
    const int64_t i_lo = std::max<int64_t>(0, g.pad_top - h), i_hi = std::min<int64_t>(g.kh, g.height + g.pad_top - h);
    int64_t w = 0;
    for (; w < w_lo; ++w) ConvEdge<NV>(x, k, bias, g, b, h, i_lo, i_hi, w, c0, y);
    for (; w + T <= w_hi; w += T) ConvStrip<KW, NV, T>(x, k, bias, g, b, h, i_lo, i_hi, w, c0, y);
    for (; w < w_hi; ++w) ConvStrip<KW, NV, 1>(x, k, bias, g, b, h, i_lo, i_hi, w, c0, y);
    for (; w < g.out_w; ++w) ConvEdge<NV>(x, k, bias, g, b, h, i_lo, i_hi, w, c0, y);
  }
}

// Any kernel width and channel count, one channel at a time.
void ConvRowsScalar(const float* x, const float* k, const float* bias, const Geometry& g, int64_t b, int64_t h0,
                    int64_t h1, int64_t c0, int64_t lanes, float* y) {
  const int64_t C = g.channels;
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = 0; w < g.out_w; ++w) {
      for (int64_t l = 0; l < lanes; ++l) {
        const int64_t c = c0 + l;
        float acc = bias ? bias[c] : 0.0f;
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t r = h + i - g.pad_top;
          if (r < 0 || r >= g.height) continue;
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t col = w + j - g.pad_left;
            if (col < 0 || col >= g.width) continue;
            acc += x[((b * g.height + r) * g.width + col) * C + c] * k[(i * g.kw + j) * C + c];
          }
        }
        y[((b * g.out_h + h) * g.out_w + w) * C + c] = acc;
      }
    }
  }
}

template <int KW>
bool TryConv(const float* x, const float* k, const float* bias, const Geometry& g, int64_t b, int64_t h0, int64_t h1,
             int64_t c0, int64_t lanes, float* y) {
  if (g.kw != KW) return false;
  if (lanes == kBlock) {
    ConvRows<KW, 2>(x, k, bias, g, b, h0, h1, c0, y);
    return true;
  }
  if (lanes == kVec) {
    ConvRows<KW, 1>(x, k, bias, g, b, h0, h1, c0, y);
    return true;
  }
  return false;
}

ffi::Error Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> bias,
                ffi::ResultBuffer<ffi::F32> y, int64_t pad_top, int64_t pad_left, bool use_bias) {
  const auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 3 || yd.size() != 4 || xd[0] != yd[0] || xd[3] != yd[3] || kd[2] != xd[3] ||
      (use_bias && (bias.dimensions().size() != 1 || bias.dimensions()[0] != xd[3])) || !PadsFit(pad_top, pad_left)) {
    return ffi::Error::InvalidArgument("depthwise_conv expects x (B, H, W, C), k (KH, KW, C), bias (C,), a "
                                       "(B, OH, OW, C) result and pads of magnitude below 2^30");
  }
  const Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], kd[0], kd[1], pad_top, pad_left};
  const auto groups = ChannelGroups(g.channels);
  const int64_t count = static_cast<int64_t>(groups.size());
  // Rows in chunks, so that a small batch still gives every thread work.
  const int64_t wanted = 4 * std::max<int64_t>(1, pool.num_threads() + 1);
  const int64_t chunks = std::min<int64_t>(g.out_h, std::max<int64_t>(1, wanted / std::max<int64_t>(1, g.batch * count)));
  const int64_t rows = (g.out_h + chunks - 1) / std::max<int64_t>(1, chunks);
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  const float* bp = use_bias ? bias.typed_data() : nullptr;
  float* yp = y->typed_data();
  convnext_audio_jax::ParallelFor(pool, g.batch * count * chunks, [=, &g, &groups](int64_t task) {
    const int64_t chunk = task % chunks, group = (task / chunks) % count, b = task / (chunks * count);
    const auto [c0, lanes] = groups[group];
    const int64_t h0 = chunk * rows, h1 = std::min<int64_t>(g.out_h, h0 + rows);
    if (h0 >= h1) return;
    if (TryConv<7>(xp, kp, bp, g, b, h0, h1, c0, lanes, yp) || TryConv<5>(xp, kp, bp, g, b, h0, h1, c0, lanes, yp) ||
        TryConv<3>(xp, kp, bp, g, b, h0, h1, c0, lanes, yp)) {
      return;
    }
    ConvRowsScalar(xp, kp, bp, g, b, h0, h1, c0, lanes, yp);
  });
  return ffi::Error::Success();
}

// ---- the kernel gradient ----

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t pad_top, int64_t pad_left) {
  const auto xd = x.dimensions(), dyd = dy.dimensions(), dkd = dk->dimensions();
  if (xd.size() != 4 || dyd.size() != 4 || dkd.size() != 3 || xd[0] != dyd[0] || xd[3] != dyd[3] || dkd[2] != xd[3] ||
      !PadsFit(pad_top, pad_left)) {
    return ffi::Error::InvalidArgument("depthwise_kernel_grad expects x (B, H, W, C), dy (B, OH, OW, C), a (KH, KW, C) "
                                       "result and pads of magnitude below 2^30");
  }
  const Geometry g{xd[0], xd[1], xd[2], xd[3], dyd[1], dyd[2], dkd[0], dkd[1], pad_top, pad_left};
  const auto groups = ChannelGroups(g.channels);
  const int64_t count = static_cast<int64_t>(groups.size());
  const int64_t tasks = g.batch * count;
  const int64_t taps = g.kh * g.kw;
  float* result = dk->typed_data();
  std::vector<float> partial(tasks * taps * kBlock);
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  float* pp = partial.data();
  convnext_audio_jax::ParallelFor(pool, tasks, [=, &g, &groups](int64_t task) { Task(xp, dyp, g, groups, task, pp); });
  // The batch sum, in batch order.
  for (int64_t tap = 0; tap < taps; ++tap) {
    for (int64_t group = 0; group < count; ++group) {
      const auto [c0, lanes] = groups[group];
      for (int64_t l = 0; l < lanes; ++l) {
        float sum = 0.0f;
        for (int64_t b = 0; b < g.batch; ++b) sum += partial[((b * count + group) * taps + tap) * kBlock + l];
        result[tap * g.channels + c0 + l] = sum;
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseConv, convnext_audio_jax::Guarded<Conv>::Call,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<bool>("use_bias"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseKernelGrad, convnext_audio_jax::Guarded<KernelGrad>::Call,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
