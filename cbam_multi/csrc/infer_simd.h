// Vector building blocks of the fused inference kernel (cbam_infer.cpp): NaN-propagating row sums and
// maxima (optionally of row * scale, or of an eval BatchNorm's affine map of the row) and matrix-vector
// products, each with an AVX-512 float32 version where the build targets it.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "lanes.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cbam_infer_simd {

using cbam_lanes::prefetch_values;

// max that propagates NaN, like torch.amax: keeps a NaN already in `a`, takes a NaN in `b`
template <typename T>
inline T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// max of row[i] * scale[i] (scale may be null: of row[i]) with NaN propagated, element by element: the slow
// path for the rare row that holds a NaN, where vectorised maxima would drop it
template <typename T>
T nan_aware_max(const T* row, const T* scale, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = nan_max(mx, scale ? row[i] * scale[i] : row[i]);
  return mx;
}

// sum and max (NaN-propagating, like torch.amax) of row[i] * scale[i] (scale may be null: of row[i]).
// `omp simd` lets the compiler reorder the float sum across vector lanes (plain -O3 may not). A vectorised
// max drops NaN, but a NaN also makes the sum NaN: then (rarely) the max is taken again, NaN-aware.
template <typename T>
void row_sum_max(const T* row, const T* scale, int64_t n, T& sum_out, T& max_out) {
  T sum = T(0), mx = -std::numeric_limits<T>::infinity();
  if (scale) {
#pragma omp simd reduction(+ : sum) reduction(max : mx)
    for (int64_t i = 0; i < n; ++i) {
      const T v = row[i] * scale[i];
      sum += v;
      mx = v > mx ? v : mx;
    }
  } else {
#pragma omp simd reduction(+ : sum) reduction(max : mx)
    for (int64_t i = 0; i < n; ++i) {
      sum += row[i];
      mx = row[i] > mx ? row[i] : mx;
    }
  }
  sum_out = sum;
  max_out = sum != sum ? nan_aware_max(row, scale, n) : mx;  // a NaN (or inf - inf) in the row
}

#if defined(__AVX512F__)
// float32 with AVX-512: the same sums, with the lanes reduced by shuffles. GCC's `omp simd` reductions
// spill the lanes and add them one by one, which dominated rows of ~50 values (7x7 maps).
inline __mmask16 tail_mask(int64_t left) { return static_cast<__mmask16>((1u << left) - 1u); }

inline void row_sum_max(const float* row, const float* scale, int64_t n, float& sum_out, float& max_out) {
  __m512 vs = _mm512_setzero_ps(), vm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_loadu_ps(row + i);
    if (scale) v = _mm512_mul_ps(v, _mm512_loadu_ps(scale + i));
    vs = _mm512_add_ps(vs, v);
    vm = _mm512_max_ps(vm, v);
  }
  if (i < n) {
    const __mmask16 k = tail_mask(n - i);
    __m512 v = _mm512_maskz_loadu_ps(k, row + i);
    if (scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, scale + i));
    vs = _mm512_add_ps(vs, v);  // masked-off lanes hold 0
    vm = _mm512_mask_max_ps(vm, k, vm, v);
  }
  const float sum = _mm512_reduce_add_ps(vs);
  sum_out = sum;
  max_out = sum != sum ? nan_aware_max(row, scale, n) : _mm512_reduce_max_ps(vm);  // vmaxps drops NaN
}

// A ResNet block's tail on one channels_last row: o = relu(((h * a + e) * cg) * s + res), res = r or r * ra + re
// (a = null: x = h; ra = null: the residual as is), in one loop. Explicit operations, so each product is rounded
// before the add (as torch rounds the block's output before the shortcut add) and nothing is contracted.
inline bool gate_residual_row(const float* h, const float* a, const float* e, const float* cg, float s, const float* r,
                              const float* ra, const float* re, int64_t n, float* o) {
  const __m512 vs = _mm512_set1_ps(s), zero = _mm512_setzero_ps();
  auto one = [&](int64_t i, __mmask16 k) {
    __m512 x = _mm512_maskz_loadu_ps(k, h + i);
    if (a) x = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, e + i));
    const __m512 y = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_maskz_loadu_ps(k, cg + i)), vs);
    __m512 v = _mm512_maskz_loadu_ps(k, r + i);
    if (ra) v = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(k, ra + i), _mm512_maskz_loadu_ps(k, re + i));
    // max(0, t) returns t where t is NaN (vmaxps returns its second operand then), as torch.relu keeps NaN
    _mm512_mask_storeu_ps(o + i, k, _mm512_max_ps(zero, _mm512_add_ps(y, v)));
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) one(i, static_cast<__mmask16>(0xFFFF));
  if (i < n) one(i, tail_mask(n - i));
  return true;
}

// row_sum_max (scale = the channel gate) of U consecutive channels_last rows (pixels) at once, or of their
// BatchNorm map (h * a + e) * scale where a is given, without storing it (the fused multiply-add rounds as the
// other passes' compiled h * a + e does): per row the operations and order of the one-row row_sum_max, with the
// gate's and the affine's loads shared and U independent chains in flight. A row whose sum is NaN (a NaN, or
// inf - inf) gets a meaningless max: the caller takes it again, NaN-aware. False (portable build): the caller
// takes every row itself.
template <int U>
inline bool rows_sum_max(const float* h, int64_t C, const float* a, const float* e, const float* scale,
                         float* sum_out, float* max_out) {
  __m512 vs[U], vm[U];
  for (int u = 0; u < U; ++u) vs[u] = _mm512_setzero_ps(), vm[u] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  auto step = [&](int64_t i, __mmask16 k, bool tail) {
    const __m512 g = _mm512_maskz_loadu_ps(k, scale + i);
    __m512 va = g, ve = g;
    if (a) va = _mm512_maskz_loadu_ps(k, a + i), ve = _mm512_maskz_loadu_ps(k, e + i);
    for (int u = 0; u < U; ++u) {
      __m512 x = _mm512_maskz_loadu_ps(k, h + u * C + i);
      if (a) x = _mm512_fmadd_ps(x, va, ve);
      const __m512 v = _mm512_mul_ps(x, g);
      vs[u] = _mm512_add_ps(vs[u], v);  // masked-off lanes hold 0
      vm[u] = tail ? _mm512_mask_max_ps(vm[u], k, vm[u], v) : _mm512_max_ps(vm[u], v);
    }
  };
  int64_t i = 0;
  for (; i + 16 <= C; i += 16) step(i, static_cast<__mmask16>(0xFFFF), false);
  if (i < C) step(i, tail_mask(C - i), true);
  for (int u = 0; u < U; ++u) {
    sum_out[u] = _mm512_reduce_add_ps(vs[u]);
    max_out[u] = _mm512_reduce_max_ps(vm[u]);
  }
  return true;
}
#endif

// the portable versions: the caller runs its loops
template <typename T>
bool gate_residual_row(const T*, const T*, const T*, const T*, T, const T*, const T*, const T*, int64_t, T*) {
  return false;
}

template <int U, typename T>
bool rows_sum_max(const T*, int64_t, const T*, const T*, const T*, T*, T*) {
  return false;
}

// x = h * scale[c] + shift[c]: an eval BatchNorm in front of the block, applied as each pass reads h, so its
// output is never written (scale null: x is the input itself)
template <typename T>
struct Affine {
  const T* scale;
  const T* shift;
};

// sum and max (NaN-propagating) of row[i] * a + e
template <typename T>
void row_sum_max_affine(const T* row, T a, T e, int64_t n, T& sum_out, T& max_out) {
  T sum = T(0), mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(+ : sum) reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) {
    const T v = row[i] * a + e;
    sum += v;
    mx = v > mx ? v : mx;
  }
  sum_out = sum;
  if (sum != sum) {  // a NaN: the max again, NaN-aware
    mx = -std::numeric_limits<T>::infinity();
    for (int64_t i = 0; i < n; ++i) mx = nan_max(mx, row[i] * a + e);
  }
  max_out = mx;
}

#if defined(__AVX512F__)
inline void row_sum_max_affine(const float* row, float a, float e, int64_t n, float& sum_out, float& max_out) {
  const __m512 va = _mm512_set1_ps(a), ve = _mm512_set1_ps(e);
  __m512 vs = _mm512_setzero_ps(), vm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(row + i), va), ve);
    vs = _mm512_add_ps(vs, v);
    vm = _mm512_max_ps(vm, v);
  }
  if (i < n) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 v = _mm512_maskz_add_ps(k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + i), va), ve);
    vs = _mm512_add_ps(vs, v);  // masked-off lanes hold 0
    vm = _mm512_mask_max_ps(vm, k, vm, v);
  }
  const float sum = _mm512_reduce_add_ps(vs);
  sum_out = sum;
  if (sum != sum) {  // a NaN: the max again, NaN-aware
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) mx = nan_max(mx, row[j] * a + e);
    max_out = mx;
  } else {
    max_out = _mm512_reduce_max_ps(vm);
  }
}
#endif

// a . b over n values (vectorised: the sum may be reordered)
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// out0 = W v0 and, if v1 is given, out1 = W v1 (W row-major, rows x cols). Each weight row is read once
// for both vectors, and four rows run side by side: eight independent multiply-add chains per column
// sweep instead of one latency-bound chain per dot product.
template <typename T>
void matvec2(const T* W, int64_t rows, int64_t cols, const T* v0, const T* v1, T* out0, T* out1) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const T* w0 = W + r * cols;
    const T *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
    T a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
    if (v1) {
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
      for (int64_t i = 0; i < cols; ++i) {
        const T x = v0[i], y = v1[i];
        a0 += w0[i] * x, a1 += w1[i] * x, a2 += w2[i] * x, a3 += w3[i] * x;
        b0 += w0[i] * y, b1 += w1[i] * y, b2 += w2[i] * y, b3 += w3[i] * y;
      }
      out1[r] = b0, out1[r + 1] = b1, out1[r + 2] = b2, out1[r + 3] = b3;
    } else {
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t i = 0; i < cols; ++i) {
        const T x = v0[i];
        a0 += w0[i] * x, a1 += w1[i] * x, a2 += w2[i] * x, a3 += w3[i] * x;
      }
    }
    out0[r] = a0, out0[r + 1] = a1, out0[r + 2] = a2, out0[r + 3] = a3;
  }
  for (; r < rows; ++r) {
    out0[r] = dot(W + r * cols, v0, cols);
    if (v1) out1[r] = dot(W + r * cols, v1, cols);
  }
}

#if defined(__AVX512F__)
inline void matvec2(const float* W, int64_t rows, int64_t cols, const float* v0, const float* v1, float* out0,
                    float* out1) {
  const int64_t full = cols / 16 * 16;
  const __mmask16 k = tail_mask(cols - full);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {  // four rows side by side, both vectors: eight independent chains
    const float* w[4] = {W + r * cols, W + (r + 1) * cols, W + (r + 2) * cols, W + (r + 3) * cols};
    __m512 a[4], b[4];
    for (int j = 0; j < 4; ++j) a[j] = b[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i <= full; i += 16) {
      const bool tail = i == full;
      if (tail && k == 0) break;
      const __m512 x = tail ? _mm512_maskz_loadu_ps(k, v0 + i) : _mm512_loadu_ps(v0 + i);
      const __m512 y = v1 ? (tail ? _mm512_maskz_loadu_ps(k, v1 + i) : _mm512_loadu_ps(v1 + i)) : x;
      for (int j = 0; j < 4; ++j) {
        const __m512 wj = tail ? _mm512_maskz_loadu_ps(k, w[j] + i) : _mm512_loadu_ps(w[j] + i);
        a[j] = _mm512_fmadd_ps(wj, x, a[j]);
        if (v1) b[j] = _mm512_fmadd_ps(wj, y, b[j]);
      }
    }
    for (int j = 0; j < 4; ++j) {
      out0[r + j] = _mm512_reduce_add_ps(a[j]);
      if (v1) out1[r + j] = _mm512_reduce_add_ps(b[j]);
    }
  }
  for (; r < rows; ++r) {
    out0[r] = dot(W + r * cols, v0, cols);
    if (v1) out1[r] = dot(W + r * cols, v1, cols);
  }
}
#endif

}  // namespace cbam_infer_simd
