// Lane-parallel reductions and the BatchNorm-input map shared by the training kernels, framework-free: the
// torch backend's (backends/torch/csrc: cbam_train.cpp, cbam_train_cl.cpp, cbam_bn_train.cpp,
// cbam_bn_train_cl.cpp) and the cores they share with the JAX backend (train_core_nhwc.h, spatial_conv_core.h);
// and the prefetch helper of the channels_last passes (those and the inference core's).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace cbam_lanes {

// Asks for the cache lines of n consecutive values ahead of their use. The channels_last passes walk rows of
// C values (one position each) in order, yet prefetching kPrefetchRows rows ahead by hand made the inference
// passes 5-14 % faster on every ResNet-50 stage shape, the training core's H,W pools and dL/dca sums 12-40 % and
// the channels_last BN + CBAM kernels' statistics and sums up to 37 % (benchmarks/RESULTS.md): the hardware
// prefetcher alone leaves the next rows late. The training core's per-pixel passes (maps, gate, dL/ds, dL/dx)
// ran no faster or slower with it and do without.
constexpr int64_t kPrefetchRows = 8;

template <typename T>
inline void prefetch_values(const T* p, int64_t n) {
  const char* b = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(b + o, 0, 3);
}

// Reductions written with independent lanes, so -O3 vectorises them without -ffast-math (a single
// accumulator is a serial dependency chain the compiler may not reorder).
constexpr int kLanes = 16;
// Compares (max, min, tie search) get 32 lanes of 32-bit indices: at 16 lanes, or with 64-bit indices next
// to float compares, GCC (-march=znver4) left these loops 2-6x slower (a 784-float plane: max 0.44 -> 0.16,
// tie search 0.74-1.39 -> 0.23 ms per 4096 planes on one core). Short planes (ResNet's 7x7) keep 16 lanes,
// so fewer values fall to the scalar tail (`cmp_lanes`).
constexpr int kCmpLanes = 32;
constexpr int64_t kShortPlane = 128;

// f(std::integral_constant<int, L>) with L = kCmpLanes, or 16 for a plane of fewer than kShortPlane values
template <typename F>
inline auto cmp_lanes(int64_t n, F&& f) {
  return n < kShortPlane ? f(std::integral_constant<int, 16>{}) : f(std::integral_constant<int, kCmpLanes>{});
}

template <typename T>
inline double sum_lanes(const T* v, int64_t n) {
  double acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += double(v[i + j]);
  double s = 0;
  for (; i < n; ++i) s += double(v[i]);
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// the extreme of v[0..n) under `better` (a strict order: > for the maximum, < for the minimum)
template <int L, typename T, typename Better>
inline T best_lanes_n(const T* v, int64_t n, Better better) {
  T acc[L];
  for (int j = 0; j < L; ++j) acc[j] = v[0];
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int j = 0; j < L; ++j) acc[j] = better(v[i + j], acc[j]) ? v[i + j] : acc[j];
  T m = v[0];
  for (; i < n; ++i) m = better(v[i], m) ? v[i] : m;
  for (int j = 0; j < L; ++j) m = better(acc[j], m) ? acc[j] : m;
  return m;
}

template <typename T, typename Better>
inline T best_lanes(const T* v, int64_t n, Better better) {
  return cmp_lanes(n, [&](auto lanes) { return best_lanes_n<decltype(lanes)::value>(v, n, better); });
}

// sum (in double) and maximum of v[0..n) in one pass; the maximum as max_lanes finds it
template <int L, typename T>
inline void sum_max_lanes_n(const T* v, int64_t n, double& sum, T& max) {
  double acc[L] = {0};
  T m[L];
  for (int j = 0; j < L; ++j) m[j] = v[0];
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int j = 0; j < L; ++j) {
      acc[j] += double(v[i + j]);
      m[j] = v[i + j] > m[j] ? v[i + j] : m[j];
    }
  double s = 0;
  T mm = v[0];
  for (; i < n; ++i) {
    s += double(v[i]);
    mm = v[i] > mm ? v[i] : mm;
  }
  for (int j = 0; j < L; ++j) {
    s += acc[j];
    mm = m[j] > mm ? m[j] : mm;
  }
  sum = s;
  max = mm;
}

template <typename T>
inline void sum_max_lanes(const T* v, int64_t n, double& sum, T& max) {
  cmp_lanes(n, [&](auto lanes) { sum_max_lanes_n<decltype(lanes)::value>(v, n, sum, max); });
}

template <typename T>
inline T max_lanes(const T* v, int64_t n) {
  return best_lanes(v, n, [](T a, T b) { return a > b; });
}

template <typename T>
inline T min_lanes(const T* v, int64_t n) {
  return best_lanes(v, n, [](T a, T b) { return a < b; });
}

// sum of double(f(i)) over i < n, with independent lanes (f: an inlined lambda over one element)
template <typename F>
inline double sum_lanes_f(int64_t n, F f) {
  double acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += double(f(i + j));
  double s = 0;
  for (; i < n; ++i) s += double(f(i));
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// the first i with v[i] == m (n if none) and how many there are, in one pass; n < 2^31 (the caller checks)
template <int L, typename T>
inline void first_count_eq_n(const T* v, int64_t n, T m, int64_t& first, int64_t& count) {
  const int32_t n32 = static_cast<int32_t>(n);
  int32_t best[L], cnt[L];
  for (int j = 0; j < L; ++j) best[j] = n32, cnt[j] = 0;
  int32_t i = 0;
  for (; i <= n32 - L; i += L)  // not i + L <= n32: that overflows for n32 near 2^31
    for (int j = 0; j < L; ++j) {
      const bool hit = v[i + j] == m;
      const int32_t cand = hit ? i + j : n32;
      best[j] = cand < best[j] ? cand : best[j];
      cnt[j] += hit ? 1 : 0;
    }
  int32_t b = n32, c = 0;
  for (; i < n32; ++i) {
    const bool hit = v[i] == m;
    b = (hit && i < b) ? i : b;
    c += hit ? 1 : 0;
  }
  for (int j = 0; j < L; ++j) {
    b = best[j] < b ? best[j] : b;
    c += cnt[j];
  }
  first = b;
  count = c;
}

template <typename T>
inline void first_count_eq(const T* v, int64_t n, T m, int64_t& first, int64_t& count) {
  cmp_lanes(n, [&](auto lanes) { first_count_eq_n<decltype(lanes)::value>(v, n, m, first, count); });
}

// the first i < n with pred(i), n if none: per-lane minimum of candidate indices, so the loop vectorises
// (a scalar search for the first maximum costs ~HW/2 serial steps per plane)
template <typename P>
inline int64_t first_lanes(int64_t n, P pred) {
  int64_t best[kLanes];
  for (int j = 0; j < kLanes; ++j) best[j] = n;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const int64_t cand = pred(i + j) ? i + j : n;
      best[j] = cand < best[j] ? cand : best[j];
    }
  int64_t b = n;
  for (; i < n; ++i)
    if (pred(i)) { b = i; break; }
  for (int j = 0; j < kLanes; ++j) b = best[j] < b ? best[j] : b;
  return b;
}

// x = h * al + be (a BatchNorm's output from its input h) with one rounding: the same expression in every
// pass, so every pass sees the same x bit for bit (max-pool masks and ties included)
template <typename T>
inline T bn_x(T h, T al, T be) {
  return std::fma(h, al, be);
}

// What a pass reads: x itself (al null) or a BatchNorm's input h, with x = bn_x(h, al[c], be[c]) formed as
// the pass reads channel c. plane(c, f) calls f with that channel's element -> x map.
template <typename T>
struct Input {
  const T* al;
  const T* be;
  template <typename F>
  inline void plane(int64_t c, F f) const {
    if (al) {
      const T a = al[c], e = be[c];
      f([a, e](T v) { return bn_x(v, a, e); });
    } else {
      f([](T v) { return v; });
    }
  }
};

}  // namespace cbam_lanes
