// Lane-parallel reductions and the BatchNorm-input map shared by the training kernels (cbam_train.cpp,
// cbam_bn_train.cpp).
#pragma once

#include <cmath>
#include <cstdint>

namespace cbam_lanes {

// Reductions written with independent lanes, so -O3 vectorises them without -ffast-math (a single
// accumulator is a serial dependency chain the compiler may not reorder).
constexpr int kLanes = 16;

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
template <typename T, typename Better>
inline T best_lanes(const T* v, int64_t n, Better better) {
  T acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = v[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = better(v[i + j], acc[j]) ? v[i + j] : acc[j];
  T m = v[0];
  for (; i < n; ++i) m = better(v[i], m) ? v[i] : m;
  for (int j = 0; j < kLanes; ++j) m = better(acc[j], m) ? acc[j] : m;
  return m;
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

// the first i with v[i] == m (n if none) and how many there are, in one pass
template <typename T>
inline void first_count_eq(const T* v, int64_t n, T m, int64_t& first, int64_t& count) {
  int64_t best[kLanes], cnt[kLanes];
  for (int j = 0; j < kLanes; ++j) best[j] = n, cnt[j] = 0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const bool hit = v[i + j] == m;
      const int64_t cand = hit ? i + j : n;
      best[j] = cand < best[j] ? cand : best[j];
      cnt[j] += hit ? 1 : 0;
    }
  int64_t b = n, c = 0;
  for (; i < n; ++i) {
    const bool hit = v[i] == m;
    b = (hit && i < b) ? i : b;
    c += hit ? 1 : 0;
  }
  for (int j = 0; j < kLanes; ++j) {
    b = best[j] < b ? best[j] : b;
    c += cnt[j];
  }
  first = b;
  count = c;
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
