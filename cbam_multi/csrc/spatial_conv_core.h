// The spatial gate's k x k 'same' cross-correlation, Ci (1 or 2) maps -> 1 channel, and its backward, per
// sample, framework-free: the torch backend's spatial conv op (backends/torch/csrc/cbam_train.cpp) and the JAX
// backend's FFI handlers (backends/jax/csrc/cbam_train_ffi.cpp) run these loops on their own threads.
//
// General convolutions are slow at this shape: oneDNN's setup and layout conversions dominate (64x2x28x28,
// k=7: ~20 ms forward+backward on one core), XLA:CPU's convolution and its gradients likewise. Here each
// sample's maps are copied into a zero-padded buffer of row pitch Wp = W + 2p, so every weight tap is one
// contiguous loop over H * Wp positions (the Wp - W extra columns per row are computed and dropped): loops of a
// plane's length instead of one per row (28 or 14 long at MNIST's sizes, where loop overhead dominated).
//
// Layouts: maps (B, Ci, H, W), weight (Ci, k, k), output and its gradient (B, H, W).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lanes.h"

namespace cbam_spatial_conv {

struct Shape {
  int64_t Ci, H, W, k;
  int64_t taps() const { return Ci * k * k; }
};

struct Padded {
  int64_t H, W, p, Wp, rows;  // rows: H + 2p, plus one so the last row's extra columns stay inside
  explicit Padded(const Shape& s) : H(s.H), W(s.W), p(s.k / 2), Wp(s.W + 2 * (s.k / 2)), rows(s.H + 2 * (s.k / 2) + 1) {}
  int64_t size() const { return rows * Wp; }
  // src (H, W) into dst (size()), zero around: src[y][x] at dst[(y + p) * Wp + x + p]
  template <typename T>
  void fill(const T* src, T* dst) const {
    std::fill(dst, dst + size(), T(0));
    for (int64_t y = 0; y < H; ++y) std::copy(src + y * W, src + (y + 1) * W, dst + (y + p) * Wp + p);
  }
  // acc (H, Wp) -> dst (H, W)
  template <typename T>
  void crop(const T* acc, T* dst) const {
    for (int64_t y = 0; y < H; ++y) std::copy(acc + y * Wp, acc + y * Wp + W, dst + y * W);
  }
};

// acc[i] += w * src[i] for i < n (one weight tap over a padded plane)
template <typename T>
inline void axpy(T w, const T* src, int64_t n, T* acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * src[i];
}

// out (B, H, W) for samples [lo, hi)
template <typename T>
void forward_samples(const T* in, const T* w, const Shape& s, int64_t lo, int64_t hi, T* out) {
  const Padded pad(s);
  const int64_t n = s.H * pad.Wp, k = s.k;
  std::vector<T> maps(s.Ci * pad.size()), acc(n);
  for (int64_t b = lo; b < hi; ++b) {
    for (int64_t c = 0; c < s.Ci; ++c) pad.fill(in + (b * s.Ci + c) * s.H * s.W, maps.data() + c * pad.size());
    std::fill(acc.begin(), acc.end(), T(0));
    // taps in (c, dy, dx) order: each output sums its terms in that order, as a row-by-row loop would
    for (int64_t c = 0; c < s.Ci; ++c)
      for (int64_t dy = 0; dy < k; ++dy)
        for (int64_t dx = 0; dx < k; ++dx)
          axpy(w[(c * k + dy) * k + dx], maps.data() + c * pad.size() + dy * pad.Wp + dx, n, acc.data());
    pad.crop(acc.data(), out + b * s.H * s.W);
  }
}

// For samples [lo, hi): the maps' gradient g_in (B, Ci, H, W) and each sample's weight gradient
// part (B, taps) in double, which the caller sums over the batch.
template <typename T>
void backward_samples(const T* g, const T* in, const T* w, const Shape& s, int64_t lo, int64_t hi, T* g_in,
                      double* part) {
  const Padded pad(s);
  const int64_t n = s.H * pad.Wp, k = s.k, p = pad.p, K = s.taps();
  std::vector<T> maps(s.Ci * pad.size()), gpad(pad.size()), acc(n);
  for (int64_t b = lo; b < hi; ++b) {
    for (int64_t c = 0; c < s.Ci; ++c) pad.fill(in + (b * s.Ci + c) * s.H * s.W, maps.data() + c * pad.size());
    pad.fill(g + b * s.H * s.W, gpad.data());
    // g with zero extra columns, at the maps' pitch: g[y][x] at gz[y * Wp + x]
    const T* gz = gpad.data() + p * pad.Wp + p;
    for (int64_t c = 0; c < s.Ci; ++c) {
      const T* mc = maps.data() + c * pad.size();
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t dy = 0; dy < k; ++dy)
        for (int64_t dx = 0; dx < k; ++dx) {
          const int64_t j = (c * k + dy) * k + dx;
          // d maps[y + dy - p][x + dx - p] = w * g[y][x]: gather form, g read at (u + 2p - dy, v + 2p - dx)
          axpy(w[j], gpad.data() + (2 * p - dy) * pad.Wp + (2 * p - dx), n, acc.data());
          const T* src = mc + dy * pad.Wp + dx;
          part[b * K + j] = cbam_lanes::sum_lanes_f(n, [&](int64_t i) { return gz[i] * src[i]; });
        }
      pad.crop(acc.data(), g_in + (b * s.Ci + c) * s.H * s.W);
    }
  }
}

}  // namespace cbam_spatial_conv
