// The CBAM training passes for NHWC (channels_last) CPU data, framework-free: the torch channels_last kernels
// (backends/torch/csrc/cbam_train_cl.cpp) and the JAX backend's XLA FFI handlers
// (backends/jax/csrc/cbam_train_ffi.cpp) wrap these loops, each with its own threads and buffers.
//
// Maths (see backends/torch/fused.py): y1 = x * ca, y = y1 * s; the forward's three passes read x
//   pool_hw: per (b, c) the H,W mean, max, first max position (flat h * W + w) and tie count
//   maps:    per pixel the channel mean, max, first max channel and tie count of y1
//   gate:    y = (x * ca) * s
// and the backward's three read the output cotangent g and x
//   grad_s:  dL/ds = sum_c g * y1
//   grad_ca: dL/dca = sum_hw dL/dy1 * x,  dL/dy1 = g * s + gm + (channel-max hit ? gr : 0)
//   grad_x:  dL/dx = dL/dy1 * ca + gavg + (H,W-max hit ? gmx : 0)
// gm is dL/dmean / C, gr the channel max's cotangent (tie rule "split": already divided by the tie count),
// gavg, gmx the H,W pools' ones. Tie rule "first" routes a maximum's cotangent to its recorded index only.
//
// Ranges: functions named *_samples take samples [lo, hi), *_pixels pixels q = b * HW + p in [lo, hi).
// I is the index type the caller stores (int64 for torch, int32 for JAX); positions are counted in 32 bits
// (the callers check H * W and C are below 2^31).
// al, be (C,), when not null: the pass reads a BatchNorm's input h and forms x = bn_x(h, al, be) per value.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "lanes.h"

namespace cbam_train_nhwc {

constexpr int64_t kBlock = 16;  // rows per partial sum (in T, then added in double) in pool_hw, grad_ca

using cbam_lanes::bn_x;
using cbam_lanes::kPrefetchRows;
using cbam_lanes::prefetch_values;

// One row of C values: sum, max, first argmax and tie count of y = row * g; 32-bit index and count lanes,
// as wide as the float ones (64-bit ones ran the tie loop 12-22 % slower at C = 32..64)
template <typename T>
void row_stats(const T* __restrict row, const T* __restrict g, int32_t C, T& sum, T& max, int32_t& first,
               int32_t& count) {
  T s = 0, m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(+ : s) reduction(max : m)
  for (int32_t c = 0; c < C; ++c) {
    const T y = row[c] * g[c];
    s += y;
    m = y > m ? y : m;
  }
  int32_t f = C, n = 0;
#pragma omp simd reduction(min : f) reduction(+ : n)
  for (int32_t c = 0; c < C; ++c) {
    const bool hit = row[c] * g[c] == m;
    f = (hit && c < f) ? c : f;
    n += hit ? 1 : 0;
  }
  sum = s, max = m, first = f, count = n;
}

#if defined(__AVX512F__)
// float32 with AVX-512: GCC's `omp simd` reductions above spill their lanes and combine them one by one,
// which dominated rows of C = 32..64 (as in infer_simd.h); here the lanes are reduced by shuffles and the
// tie pass is a compare mask, its count a popcount and its first hit the lowest set bit.
inline __mmask16 row_tail(int32_t left) { return static_cast<__mmask16>((1u << left) - 1u); }

inline void row_stats(const float* __restrict row, const float* __restrict g, int32_t C, float& sum, float& max,
                      int32_t& first, int32_t& count) {
  __m512 vs = _mm512_setzero_ps(), vm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  // max(y, vm) is `y > vm ? y : vm`, the generic loop's expression (a NaN y is passed over, as there)
  int32_t c = 0;
  for (; c <= C - 16; c += 16) {
    const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(row + c), _mm512_loadu_ps(g + c));
    vs = _mm512_add_ps(vs, y);
    vm = _mm512_max_ps(y, vm);
  }
  if (c < C) {
    const __mmask16 k = row_tail(C - c);
    const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + c), _mm512_maskz_loadu_ps(k, g + c));
    vs = _mm512_add_ps(vs, y);  // masked-off lanes hold 0
    vm = _mm512_mask_max_ps(vm, k, y, vm);
  }
  const float m = _mm512_reduce_max_ps(vm);
  const __m512 mv = _mm512_set1_ps(m);
  // hits from the last block back to the first, so the lowest one is kept without a branch
  int32_t f = C, n = 0;
  for (c = (C - 1) / 16 * 16; c >= 0; c -= 16) {  // C >= 1 (the callers' C is a dimension > 0)
    const __mmask16 k = C - c >= 16 ? __mmask16(0xFFFF) : row_tail(C - c);
    const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + c), _mm512_maskz_loadu_ps(k, g + c));
    const unsigned hit = _mm512_mask_cmp_ps_mask(k, y, mv, _CMP_EQ_OQ);
    n += __builtin_popcount(hit);
    f = hit ? c + __builtin_ctz(hit) : f;
  }
  sum = _mm512_reduce_add_ps(vs), max = m, first = f, count = n;
}
#endif

// U rows (positions p .. p + U - 1) of the H,W pools: part[c] += row[c]; the running maximum m[c], the first
// position holding it and its tie count, in one pass (a later strictly greater value restarts both). 32-bit
// positions and counters, as wide as a float lane, so the loop vectorises (int64 ones next to float compares
// ran it one channel at a time); one pass instead of a max pass and a tie pass (1.1 -> 0.66 ms at
// 128x32x28x28, one core); U rows per load and store of the accumulators, rows in order (same results).
template <typename T, int U>
void pool_rows(const T* __restrict rows, int64_t C, int32_t p, T* __restrict part, T* __restrict m,
               int32_t* __restrict first, int32_t* __restrict n) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    T sp = part[c], mm = m[c];
    int32_t f = first[c], nn = n[c];
    for (int u = 0; u < U; ++u) {
      const T v = rows[u * C + c];
      sp += v;
      const bool gt = v > mm, eq = v == mm;
      nn = gt ? 1 : nn + (eq ? 1 : 0);
      f = gt ? p + u : f;
      mm = gt ? v : mm;
    }
    part[c] = sp, m[c] = mm, first[c] = f, n[c] = nn;
  }
}

// x[c] = bn_x(h[c], al[c], be[c]): a BatchNorm's output from its input, as every pass forms it
template <typename T>
void affine_row(const T* __restrict h, const T* __restrict al, const T* __restrict be, int64_t C, T* __restrict x) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) x[c] = bn_x(h[c], al[c], be[c]);
}

// sum of d * (x * k)
template <typename T>
T row_dot3(const T* d, const T* x, const T* k, int64_t C) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < C; ++c) acc += d[c] * (x[c] * k[c]);
  return acc;
}

#if defined(__AVX512F__)
inline float row_dot3(const float* d, const float* x, const float* k, int64_t C) {
  __m512 acc = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= C; c += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(d + c), _mm512_mul_ps(_mm512_loadu_ps(x + c), _mm512_loadu_ps(k + c)), acc);
  if (c < C) {
    const __mmask16 m = row_tail(static_cast<int32_t>(C - c));
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, d + c),
                          _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + c), _mm512_maskz_loadu_ps(m, k + c)), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

// Channel c of one sample holds a NaN (its sum is NaN, as it is for +inf and -inf together; pool_rows passes
// NaNs over): the maximum is NaN from its first occurrence on and later NaNs are its ties, as jnp.max and
// torch.amax propagate it. A rescan, off the hot loop: a NaN check per value there halved its speed.
template <typename T>
void nan_max(const T* xb, int64_t HW, int64_t C, int64_t c, T& m, int32_t& first, int32_t& n) {
  int32_t count = 0, at = 0;
  for (int64_t p = 0; p < HW; ++p) {
    const T v = xb[p * C + c];
    if (v != v) at = count++ ? at : static_cast<int32_t>(p);
  }
  if (count) m = std::numeric_limits<T>::quiet_NaN(), first = at, n = count;
}

// (B, C) outputs of samples [lo, hi): H,W mean, max, first max position and tie count
template <typename T, typename I>
void pool_hw_samples(const T* x, int64_t lo, int64_t hi, int64_t HW, int64_t C, T* avg, T* mx, I* idx, T* cnt) {
  std::vector<double> sum(C);
  std::vector<T> m(C), part(C);
  std::vector<int32_t> first(C), n(C);
  for (int64_t b = lo; b < hi; ++b) {
    const T* xb = x + b * HW * C;
    for (int64_t c = 0; c < C; ++c) sum[c] = 0.0, m[c] = xb[c], first[c] = 0, n[c] = 0;
    for (int64_t p0 = 0; p0 < HW; p0 += kBlock) {  // blocks of rows summed in T, then added in double
      const int64_t p1 = std::min(HW, p0 + kBlock);
      std::fill(part.begin(), part.end(), T(0));
      int64_t p = p0;
      for (; p + 4 <= p1; p += 4) {
        if (p + kPrefetchRows + 4 <= HW) prefetch_values(xb + (p + kPrefetchRows) * C, 4 * C);
        pool_rows<T, 4>(xb + p * C, C, static_cast<int32_t>(p), part.data(), m.data(), first.data(), n.data());
      }
      for (; p < p1; ++p)
        pool_rows<T, 1>(xb + p * C, C, static_cast<int32_t>(p), part.data(), m.data(), first.data(), n.data());
      for (int64_t c = 0; c < C; ++c) sum[c] += double(part[c]);
    }
    for (int64_t c = 0; c < C; ++c) {
      if (std::isnan(sum[c])) nan_max(xb, HW, C, c, m[c], first[c], n[c]);
      avg[b * C + c] = T(sum[c] / double(HW));
      mx[b * C + c] = m[c];
      idx[b * C + c] = static_cast<I>(first[c]);  // n[c] >= 1: the first value is the maximum or ties it
      cnt[b * C + c] = T(n[c]);
    }
  }
}

// (B, H * W) outputs of samples [lo, hi): channel mean, max, first max channel and tie count of y1 = x * ca
template <typename T, typename I>
void maps_samples(const T* x, const T* ca, const T* al, const T* be, int64_t lo, int64_t hi, int64_t HW, int64_t C,
                  T* mean, T* mx, I* idx, T* cnt) {
  std::vector<T> xrow(al ? C : 0);
  for (int64_t b = lo; b < hi; ++b) {
    const T* g = ca + b * C;
    for (int64_t p = 0; p < HW; ++p) {
      const T* row = x + (b * HW + p) * C;
      if (al) {
        affine_row(row, al, be, C, xrow.data());
        row = xrow.data();
      }
      T s, m;
      int32_t first, n;
      row_stats(row, g, static_cast<int32_t>(C), s, m, first, n);
      mean[b * HW + p] = s / T(C);
      mx[b * HW + p] = m;
      idx[b * HW + p] = static_cast<I>(first < C ? first : 0);
      cnt[b * HW + p] = T(n);
    }
  }
}

// y = (x * ca) * s for pixels [lo, hi)
template <typename T>
void gate_pixels(const T* x, const T* ca, const T* s, const T* al, const T* be, int64_t lo, int64_t hi, int64_t HW,
                 int64_t C, T* out) {
  for (int64_t q = lo; q < hi; ++q) {
    const T* g = ca + (q / HW) * C;
    const T sv = s[q];
    T* o = out + q * C;
    if (al) {
      affine_row(x + q * C, al, be, C, o);  // x in the output row, then gated in place
      for (int64_t c = 0; c < C; ++c) o[c] = (o[c] * g[c]) * sv;
    } else {
      for (int64_t c = 0; c < C; ++c) o[c] = (x[q * C + c] * g[c]) * sv;
    }
  }
}

// dL/ds = sum_c g * (x * ca) for pixels [lo, hi)
template <typename T>
void grad_s_pixels(const T* g, const T* x, const T* ca, int64_t lo, int64_t hi, int64_t HW, int64_t C, T* out) {
  for (int64_t q = lo; q < hi; ++q) out[q] = row_dot3(g + q * C, x + q * C, ca + (q / HW) * C, C);
}

// What the backward passes read besides g and x: the gates, the channel maps' cotangents and, for grad_x, the
// H,W pools' (null in grad_ca)
template <typename T, typename I>
struct Saved {
  const T* ca;    // (B, C)
  const T* s;     // (B, HW)
  const T* gm;    // (B, HW) dL/dmean_c / C
  const T* gr;    // (B, HW) the channel max's cotangent
  const T* mxc;   // (B, HW) channel max
  const I* idxc;  // (B, HW) its first channel
  const T* gavg;  // (B, C) dL/davg_hw / HW
  const T* gmx;   // (B, C) the H,W max's cotangent
  const T* mx;    // (B, C) H,W max
  const I* idx;   // (B, C) its first position
  bool first;     // tie rule "first"
};

// dL/dy1 at one value under tie rule "split": every channel tied at the pixel's channel max takes gr
template <typename T>
inline T gy1_split(T g, T x, T ca, T s, T gm, T gr, T mxc) {
  const T v = g * s + gm;
  return x * ca == mxc ? v + gr : v;
}

// U rows (positions q .. q + U - 1, in order) of dL/dca's sums: part[c] += dL/dy1 * x. "first": the dense
// part, then the pixel's channel max (ic: its channel; adding 0 elsewhere leaves the sum as it was); "split":
// gy1_split's expression. U rows per load and store of the accumulators, as in pool_rows.
template <typename T, typename I, int U, bool First>
void gca_rows(const T* __restrict d, const T* __restrict x, const T* __restrict k, const T* s, const T* gm,
              const T* gr, const T* mc, const I* idxc, int32_t C, T* __restrict part) {
  int32_t ic[U];
  T sv[U], gmv[U], grv[U], mcv[U];
  for (int u = 0; u < U; ++u) {
    ic[u] = First ? static_cast<int32_t>(idxc[u]) : 0;
    sv[u] = s[u], gmv[u] = gm[u], grv[u] = gr[u], mcv[u] = First ? T(0) : mc[u];
  }
#pragma omp simd
  for (int32_t c = 0; c < C; ++c) {
    T sp = part[c];
    for (int u = 0; u < U; ++u) {
      const T dv = d[u * C + c], xv = x[u * C + c], v = dv * sv[u] + gmv[u];
      if (First) {
        sp += v * xv;
        sp += c == ic[u] ? grv[u] * xv : T(0);
      } else {
        sp += (xv * k[c] == mcv[u] ? v + grv[u] : v) * xv;
      }
    }
    part[c] = sp;
  }
}

// dL/dca = sum_hw dL/dy1 * x, (B, C), for samples [lo, hi)
template <typename T, typename I>
void grad_ca_samples(const T* g, const T* x, const Saved<T, I>& sv, int64_t lo, int64_t hi, int64_t HW, int64_t C,
                     T* out) {
  std::vector<double> acc(C);
  std::vector<T> part(C);
  const int32_t C32 = static_cast<int32_t>(C);
  for (int64_t b = lo; b < hi; ++b) {
    std::fill(acc.begin(), acc.end(), 0.0);
    const T* k = sv.ca + b * C;
    for (int64_t p0 = 0; p0 < HW; p0 += kBlock) {  // blocks of rows summed in T, then added in double
      const int64_t p1 = std::min(HW, p0 + kBlock);
      std::fill(part.begin(), part.end(), T(0));
      int64_t p = p0;
      auto rows = [&](auto u_const) {
        constexpr int U = decltype(u_const)::value;
        const int64_t q = b * HW + p;
        if (p + kPrefetchRows + U <= HW) {
          prefetch_values(g + (q + kPrefetchRows) * C, U * C);
          prefetch_values(x + (q + kPrefetchRows) * C, U * C);
        }
        if (sv.first)
          gca_rows<T, I, U, true>(g + q * C, x + q * C, k, sv.s + q, sv.gm + q, sv.gr + q, sv.mxc + q, sv.idxc + q,
                                  C32, part.data());
        else
          gca_rows<T, I, U, false>(g + q * C, x + q * C, k, sv.s + q, sv.gm + q, sv.gr + q, sv.mxc + q, sv.idxc + q,
                                   C32, part.data());
        p += U;
      };
      while (p + 4 <= p1) rows(std::integral_constant<int, 4>{});
      while (p < p1) rows(std::integral_constant<int, 1>{});
      for (int64_t c = 0; c < C; ++c) acc[c] += double(part[c]);
    }
    for (int64_t c = 0; c < C; ++c) out[b * C + c] = T(acc[c]);
  }
}

// dL/dx for pixels [lo, hi). Tie rule "first" leaves the H,W maxima's cotangents to grad_x_route_first.
template <typename T, typename I>
void grad_x_pixels(const T* g, const T* x, const Saved<T, I>& sv, int64_t lo, int64_t hi, int64_t HW, int64_t C,
                   T* out) {
  for (int64_t q = lo; q < hi; ++q) {
    const int64_t b = q / HW;
    const T *row = x + q * C, *d = g + q * C, *k = sv.ca + b * C, *av = sv.gavg + b * C, *r = sv.gmx + b * C;
    const T* m = sv.mx + b * C;
    const T s = sv.s[q], gmv = sv.gm[q], grv = sv.gr[q], mcv = sv.mxc[q];
    T* o = out + q * C;
    if (sv.first) {  // dense part and the pixel's channel max
      for (int64_t c = 0; c < C; ++c) o[c] = (d[c] * s + gmv) * k[c] + av[c];
      const int64_t c = sv.idxc[q];
      o[c] += grv * k[c];
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const T dv = gy1_split(d[c], row[c], k[c], s, gmv, grv, mcv) * k[c] + av[c];
        o[c] = row[c] == m[c] ? dv + r[c] : dv;
      }
    }
  }
}

// "first": each channel's H,W maximum takes its cotangent at the one recorded position, added once per (b, c)
// after the dense pass (per pixel, a compare over all C channels cost as much as the pass itself)
template <typename T, typename I>
void grad_x_route_first(const Saved<T, I>& sv, int64_t lo, int64_t hi, int64_t HW, int64_t C, T* out) {
  for (int64_t b = lo; b < hi; ++b)
    for (int64_t c = 0; c < C; ++c) out[(b * HW + sv.idx[b * C + c]) * C + c] += sv.gmx[b * C + c];
}

}  // namespace cbam_train_nhwc
