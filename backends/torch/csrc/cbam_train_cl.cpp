// The training Function's full-size passes (fused.py) for channels_last CPU input, float32/float64: the same
// maths as cbam_train.cpp (see there), with x stored (B, H, W, C). One sample per task: its C-long rows are
// read in order, and every per-channel sum runs over the sample's rows with C accumulators.
//   forward:  pool_hw (reads x)  maps (reads x)  gate (reads x, writes y)
//   backward: grad_s (reads g, x)  grad_ca (reads g, x)  grad_x (reads g, x, writes dx)
// Small maps are (B, 1, H, W) and (B, C) as in the NCHW kernels; full-size outputs keep x's layout.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "lanes.h"

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;  // rows per partial sum (in T, then added in double) in pool_hw_cl, grad_ca_cl

void check_cl(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && x.device().is_cpu(),
              "cbam_train_cl: x must be channels_last CPU");
}

// One row of C values (pragmas cannot sit inside the dispatch macro's argument, hence these helpers).
// sum, max, first argmax and tie count of y = row * g; 32-bit index and count lanes (C < 2^31: the caller
// checks), as wide as the float ones (64-bit ones ran the tie loop 12-22 % slower at C = 32..64)
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
// which dominated rows of C = 32..64 (as in cbam_multi/csrc/infer_simd.h); here the lanes are reduced by
// shuffles and the tie pass is a compare mask, its count a popcount and its first hit the lowest set bit.
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
  for (c = (C - 1) / 16 * 16; c >= 0; c -= 16) {  // C >= 1 (the caller's C is a tensor dim > 0)
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

// x[c] = bn_x(h[c], al[c], be[c]): a BatchNorm's output from its input, as every pass of fused_bn forms it
template <typename T>
void affine_row(const T* __restrict h, const T* __restrict al, const T* __restrict be, int64_t C, T* __restrict x) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) x[c] = cbam_lanes::bn_x(h[c], al[c], be[c]);
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

// (B, C): mean, max, first max position (flat h*W+w) and tie count over H, W
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_hw_cl(const at::Tensor& x) {
  check_cl(x);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK(HW < std::numeric_limits<int32_t>::max(), "cbam_train_cl: H * W must be below 2^31 (32-bit positions)");
  auto avg = at::empty({B, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  auto mx = at::empty_like(avg), cnt = at::empty_like(avg);
  auto idx = at::empty({B, C}, avg.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_pool_hw_cl", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t *pa = avg.data_ptr<scalar_t>(), *pm = mx.data_ptr<scalar_t>(), *pc = cnt.data_ptr<scalar_t>();
    int64_t* pi = idx.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<double> sum(C);
      std::vector<scalar_t> m(C), part(C);
      std::vector<int32_t> first(C), n(C);
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t* xb = px + b * HW * C;
        for (int64_t c = 0; c < C; ++c) sum[c] = 0.0, m[c] = xb[c], first[c] = 0, n[c] = 0;
        for (int64_t p0 = 0; p0 < HW; p0 += kBlock) {  // blocks of rows summed in T, then added in double
          const int64_t p1 = std::min(HW, p0 + kBlock);
          std::fill(part.begin(), part.end(), scalar_t(0));
          int64_t p = p0;
          for (; p + 4 <= p1; p += 4)
            pool_rows<scalar_t, 4>(xb + p * C, C, static_cast<int32_t>(p), part.data(), m.data(), first.data(), n.data());
          for (; p < p1; ++p)
            pool_rows<scalar_t, 1>(xb + p * C, C, static_cast<int32_t>(p), part.data(), m.data(), first.data(), n.data());
          for (int64_t c = 0; c < C; ++c) sum[c] += double(part[c]);
        }
        for (int64_t c = 0; c < C; ++c) {
          pa[b * C + c] = scalar_t(sum[c] / double(HW));
          pm[b * C + c] = m[c];
          pi[b * C + c] = n[c] > 0 ? first[c] : HW - 1;  // no hit (a NaN first value): as pool_hw
          pc[b * C + c] = scalar_t(n[c]);
        }
      }
    });
  });
  return {avg, mx, idx, cnt};
}

// (B, 1, H, W): channel mean, max, first argmax channel and tie count of y1 = x * ca
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> maps_cl(const at::Tensor& x, const at::Tensor& ca,
                                                                   const std::optional<at::Tensor>& al,
                                                                   const std::optional<at::Tensor>& be) {
  check_cl(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  auto cac = ca.contiguous();
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  auto mean = at::empty({B, 1, H, W}, opts), mx = at::empty({B, 1, H, W}, opts), cnt = at::empty({B, 1, H, W}, opts);
  auto idx = at::empty({B, 1, H, W}, opts.dtype(at::kLong));
  TORCH_CHECK(C < std::numeric_limits<int32_t>::max(), "cbam_train_cl: C must be below 2^31 (32-bit channel indices)");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_maps_cl", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pg = cac.data_ptr<scalar_t>();
    scalar_t *pmean = mean.data_ptr<scalar_t>(), *pmx = mx.data_ptr<scalar_t>(), *pc = cnt.data_ptr<scalar_t>();
    int64_t* pi = idx.data_ptr<int64_t>();
    const cbam_lanes::Input<scalar_t> in = cbam_lanes::input_of<scalar_t>(al, be, C);  // al, be: x = bn_x(h, al, be)
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> xrow(in.al ? C : 0);
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t* g = pg + b * C;
        for (int64_t p = 0; p < HW; ++p) {
          const scalar_t* row = px + (b * HW + p) * C;
          if (in.al) {
            affine_row(row, in.al, in.be, C, xrow.data());
            row = xrow.data();
          }
          scalar_t s, m;
          int32_t first, n;
          row_stats(row, g, static_cast<int32_t>(C), s, m, first, n);
          pmean[b * HW + p] = s / scalar_t(C);
          pmx[b * HW + p] = m;
          pi[b * HW + p] = first < C ? first : 0;
          pc[b * HW + p] = scalar_t(n);
        }
      }
    });
  });
  return {mean, mx, idx, cnt};
}

// y = (x * ca) * s
at::Tensor gate_cl(const at::Tensor& x, const at::Tensor& ca, const at::Tensor& s, const std::optional<at::Tensor>& al,
                   const std::optional<at::Tensor>& be) {
  check_cl(x);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto cac = ca.contiguous(), sc = s.contiguous();
  auto out = at::empty_like(x);  // channels_last, as x
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_gate_cl", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pg = cac.data_ptr<scalar_t>(), *ps = sc.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const cbam_lanes::Input<scalar_t> in = cbam_lanes::input_of<scalar_t>(al, be, C);
    at::parallel_for(0, B * HW, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        const scalar_t* g = pg + (q / HW) * C;
        const scalar_t sv = ps[q];
        scalar_t* o = po + q * C;
        if (in.al) {
          affine_row(px + q * C, in.al, in.be, C, o);  // x in the output row, then gated in place
          for (int64_t c = 0; c < C; ++c) o[c] = (o[c] * g[c]) * sv;
        } else {
          for (int64_t c = 0; c < C; ++c) o[c] = (px[q * C + c] * g[c]) * sv;
        }
      }
    });
  });
  return out;
}

// (B, 1, H, W): dL/ds = sum_c g * (x * ca)
at::Tensor grad_s_cl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& ca) {
  check_cl(x);
  check_cl(g);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  auto cac = ca.contiguous();
  auto gs = at::empty({B, 1, H, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_grad_s_cl", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pd = g.data_ptr<scalar_t>(), *pg = cac.data_ptr<scalar_t>();
    scalar_t* po = gs.data_ptr<scalar_t>();
    at::parallel_for(0, B * HW, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        const scalar_t* k = pg + (q / HW) * C;
        const scalar_t *row = px + q * C, *d = pd + q * C;
        po[q] = row_dot3(d, row, k, C);
      }
    });
  });
  return gs;
}

// dL/dy1 at (b, p, c) = g * s + gm + (channel-max hit ? gr : 0); gm = dL/dmean_c / C, gr routed dL/dmax_c
// ("first" adds gr at the recorded channel instead)
template <typename T>
inline T gy1_split(T g, T x, T ca, T s, T gm, T gr, T mxc) {
  const T v = g * s + gm;
  return x * ca == mxc ? v + gr : v;  // "split": every channel tied at the pixel's channel max takes gr
}

// U rows (positions q .. q + U - 1, in order) of dL/dca's sums: part[c] += dL/dy1 * x. "first": the dense
// part, then the pixel's channel max (ic: its channel; adding 0 elsewhere leaves the sum as it was); "split":
// gy1_split's expression. U rows per load and store of the accumulators, as in pool_rows.
template <typename T, int U, bool First>
void gca_rows(const T* __restrict d, const T* __restrict x, const T* __restrict k, const T* s, const T* gm,
              const T* gr, const T* mc, const int64_t* idxc, int32_t C, T* __restrict part) {
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

// (B, C): dL/dca = sum_hw dL/dy1 * x
at::Tensor grad_ca_cl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& ca, const at::Tensor& s,
                      const at::Tensor& gm, const at::Tensor& gr, const at::Tensor& mxc, const at::Tensor& idxc,
                      bool first) {
  check_cl(x);
  check_cl(g);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto cac = ca.contiguous(), sc = s.contiguous(), gmc = gm.contiguous(), grc = gr.contiguous();
  auto mcc = mxc.contiguous(), icc = idxc.contiguous();
  auto gca = at::empty({B, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  TORCH_CHECK(C < std::numeric_limits<int32_t>::max(), "cbam_train_cl: C must be below 2^31 (32-bit channel indices)");
  const int32_t C32 = static_cast<int32_t>(C);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_grad_ca_cl", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pd = g.data_ptr<scalar_t>(), *pg = cac.data_ptr<scalar_t>();
    const scalar_t *ps = sc.data_ptr<scalar_t>(), *pgm = gmc.data_ptr<scalar_t>(), *pgr = grc.data_ptr<scalar_t>();
    const scalar_t* pmc = mcc.data_ptr<scalar_t>();
    const int64_t* pic = icc.data_ptr<int64_t>();
    scalar_t* po = gca.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<double> acc(C);
      std::vector<scalar_t> part(C);
      for (int64_t b = lo; b < hi; ++b) {
        std::fill(acc.begin(), acc.end(), 0.0);
        const scalar_t* k = pg + b * C;
        for (int64_t p0 = 0; p0 < HW; p0 += kBlock) {  // blocks of rows summed in T, then added in double
          const int64_t p1 = std::min(HW, p0 + kBlock);
          std::fill(part.begin(), part.end(), scalar_t(0));
          int64_t p = p0;
          auto rows = [&](auto u_const) {
            constexpr int U = decltype(u_const)::value;
            const int64_t q = b * HW + p;
            if (first)
              gca_rows<scalar_t, U, true>(pd + q * C, px + q * C, k, ps + q, pgm + q, pgr + q, pmc + q, pic + q, C32, part.data());
            else
              gca_rows<scalar_t, U, false>(pd + q * C, px + q * C, k, ps + q, pgm + q, pgr + q, pmc + q, pic + q, C32, part.data());
            p += U;
          };
          while (p + 4 <= p1) rows(std::integral_constant<int, 4>{});
          while (p < p1) rows(std::integral_constant<int, 1>{});
          for (int64_t c = 0; c < C; ++c) acc[c] += double(part[c]);
        }
        for (int64_t c = 0; c < C; ++c) po[b * C + c] = scalar_t(acc[c]);
      }
    });
  });
  return gca;
}

// dL/dx = dL/dy1 * ca + gavg + routed H,W-max cotangent gmx (split: already / tie count)
at::Tensor grad_x_cl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& ca, const at::Tensor& s,
                     const at::Tensor& gm, const at::Tensor& gr, const at::Tensor& mxc, const at::Tensor& idxc,
                     const at::Tensor& gavg, const at::Tensor& gmx, const at::Tensor& mx, const at::Tensor& idx,
                     bool first) {
  check_cl(x);
  check_cl(g);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto cac = ca.contiguous(), sc = s.contiguous(), gmc = gm.contiguous(), grc = gr.contiguous();
  auto mcc = mxc.contiguous(), icc = idxc.contiguous(), avc = gavg.contiguous(), gxc = gmx.contiguous();
  auto mxx = mx.contiguous(), ixx = idx.contiguous();
  auto gx = at::empty_like(x);  // channels_last, as x
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_grad_x_cl", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pd = g.data_ptr<scalar_t>(), *pg = cac.data_ptr<scalar_t>();
    const scalar_t *ps = sc.data_ptr<scalar_t>(), *pgm = gmc.data_ptr<scalar_t>(), *pgr = grc.data_ptr<scalar_t>();
    const scalar_t *pmc = mcc.data_ptr<scalar_t>(), *pav = avc.data_ptr<scalar_t>(), *pgx = gxc.data_ptr<scalar_t>();
    const scalar_t* pm = mxx.data_ptr<scalar_t>();
    const int64_t *pic = icc.data_ptr<int64_t>(), *pi = ixx.data_ptr<int64_t>();
    scalar_t* po = gx.data_ptr<scalar_t>();
    at::parallel_for(0, B * HW, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        const int64_t b = q / HW;
        const scalar_t *row = px + q * C, *d = pd + q * C, *k = pg + b * C, *av = pav + b * C, *r = pgx + b * C;
        const scalar_t *m = pm + b * C;
        const scalar_t sv = ps[q], gmv = pgm[q], grv = pgr[q], mcv = pmc[q];
        scalar_t* o = po + q * C;
        if (first) {  // dense part and the pixel's channel max; the H,W maxima after the pass
          for (int64_t c = 0; c < C; ++c) o[c] = (d[c] * sv + gmv) * k[c] + av[c];
          const int64_t c = pic[q];
          o[c] += grv * k[c];
        } else {
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t dv = gy1_split(d[c], row[c], k[c], sv, gmv, grv, mcv) * k[c] + av[c];
            o[c] = row[c] == m[c] ? dv + r[c] : dv;
          }
        }
      }
    });
    // "first": each channel's H,W maximum takes its cotangent at the one recorded position, added once per
    // (b, c) after the dense pass (per pixel, a compare over all C channels cost as much as the pass itself)
    if (first) {
      at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b)
          for (int64_t c = 0; c < C; ++c) po[(b * HW + pi[b * C + c]) * C + c] += pgx[b * C + c];
      });
    }
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbam_multi, m) {
  m.def("train_pool_hw_cl(Tensor x) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("train_maps_cl(Tensor x, Tensor ca, Tensor? al=None, Tensor? be=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("train_gate_cl(Tensor x, Tensor ca, Tensor s, Tensor? al=None, Tensor? be=None) -> Tensor");
  m.def("train_grad_s_cl(Tensor g, Tensor x, Tensor ca) -> Tensor");
  m.def("train_grad_ca_cl(Tensor g, Tensor x, Tensor ca, Tensor s, Tensor gm, Tensor gr, Tensor mxc, Tensor idxc, "
        "bool first) -> Tensor");
  m.def("train_grad_x_cl(Tensor g, Tensor x, Tensor ca, Tensor s, Tensor gm, Tensor gr, Tensor mxc, Tensor idxc, "
        "Tensor gavg, Tensor gmx, Tensor mx, Tensor idx, bool first) -> Tensor");
}

TORCH_LIBRARY_IMPL(cbam_multi, CPU, m) {
  m.impl("train_pool_hw_cl", &pool_hw_cl);
  m.impl("train_maps_cl", &maps_cl);
  m.impl("train_gate_cl", &gate_cl);
  m.impl("train_grad_s_cl", &grad_s_cl);
  m.impl("train_grad_ca_cl", &grad_ca_cl);
  m.impl("train_grad_x_cl", &grad_x_cl);
}
