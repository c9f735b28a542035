// "BatchNorm, then CBAM" in training for channels_last CPU input (fused_bn.py): the maths of cbam_bn_train.cpp
// (see there) with h stored (B, H, W, C), as cbam_train_cl.cpp is cbam_train.cpp's. x = bn_x(h, al[c], be[c]) is
// formed in every pass and never stored:
//   forward:  bn_pool_cl (reads h twice per sample: sums (double), max, min; then squared deviations)
//             then cbam_train_cl.cpp's maps and gate given al, be (read h; the gate writes y)
//   backward: bn_grad_s_cl (reads g, h)  bn_plane_sums_cl (reads h)  bn_grad_h_cl (reads g, h, writes dh)
// One sample per task; the backward's per-channel sums run in blocks of kBlock rows in T, then in double (as the
// channels_last CBAM kernels do; the NCHW kernels sum every term in double), their terms centred on the BN's
// mean where the BN backward's are; dL/ds sums a pixel's channels in T (cbam_train_cl.cpp's row_dot3). The BN's
// sums of h in the forward run in double throughout.
// Part of cbam_train_all.cpp's unit, after cbam_train_cl.cpp: it uses that file's headers and row helpers
// (check_cl; kBlock, affine_row, row_dot3 from train_core_nhwc.h) and cbam_bn_train.cpp's check_small.
#include "lanes.h"

namespace {

using cbam_lanes::bn_x;
using cbam_lanes::kPrefetchRows;
using cbam_lanes::prefetch_values;

// One row of C values each (pragmas cannot sit inside the dispatch macro's argument, hence these helpers).
// sum[c] += h[c] in double (the backward's BN sums subtract H*W times the mean from it: a float partial sum's
// rounding would be amplified there when |mean| >> std); running maximum and minimum as cbam_lanes' max_lanes /
// min_lanes keep them
template <typename T>
void sum_max_min_row(const T* __restrict row, int64_t C, double* __restrict sum, T* __restrict m, T* __restrict n) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const T v = row[c];
    sum[c] += double(v);
    m[c] = v > m[c] ? v : m[c];
    n[c] = v < n[c] ? v : n[c];
  }
}

// q[c] += (h[c] - mean[c])^2 in double
template <typename T>
void sq_dev_row(const T* __restrict row, const double* __restrict mean, int64_t C, double* __restrict q) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const double d = double(row[c]) - mean[c];
    q[c] += d * d;
  }
}

// part (3, C) += g*s, g*s*x, g*s*(h - mu) over U consecutive pixels (rows d, h, x; s: their spatial gates), in
// order: U rows per load and store of the accumulators (as cbam_train_cl.cpp's pool_rows)
template <typename T, int U>
void grad_s_sums_rows(const T* __restrict d, const T* __restrict h, const T* __restrict x, const T* __restrict mu,
                      const T* __restrict s, int64_t C, T* __restrict part) {
  T sv[U];
  for (int u = 0; u < U; ++u) sv[u] = s[u];
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    T a0 = part[c], a1 = part[C + c], a2 = part[2 * C + c];
    for (int u = 0; u < U; ++u) {
      const T ds = d[u * C + c] * sv[u];
      a0 += ds;
      a1 += ds * x[u * C + c];
      a2 += ds * (h[u * C + c] - mu[c]);
    }
    part[c] = a0, part[C + c] = a1, part[2 * C + c] = a2;
  }
}

// part (6, C) += at one pixel p: gm*x, gm*(h - mu); "split" (First false): hit*gr, hit*gr*x, hit*gr*(h - mu)
// (hit: x * ca is the pixel's channel max mc) and h - mu where x is its channel's H,W max m. pos: the first
// position holding that max; n ("split"): how many do. ("first": the caller adds the channel max's terms, the
// only ones in part[2..4].) One pixel per call: four per load and store of the accumulators, as grad_s_sums_rows
// takes them, ran this loop 2.3x slower (GCC left it scalar).
template <typename T, bool First>
void plane_sums_row(const T* __restrict h, const T* __restrict x, const T* __restrict k, const T* __restrict mu,
                    const T* __restrict m, T gm, T gr, T mc, int64_t C, int32_t p, int32_t none, T* __restrict part,
                    int32_t* __restrict pos, int32_t* __restrict n) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const T hm = h[c] - mu[c];
    part[c] += gm * x[c];
    part[C + c] += gm * hm;
    const bool at_max = x[c] == m[c];
    pos[c] = (at_max && pos[c] == none) ? p : pos[c];
    if (!First) {
      const bool hit = x[c] * k[c] == mc;
      n[c] += at_max ? 1 : 0;
      part[2 * C + c] += hit ? gr : T(0);
      part[3 * C + c] += hit ? gr * x[c] : T(0);
      part[4 * C + c] += hit ? gr * hm : T(0);
      part[5 * C + c] += at_max ? hm : T(0);
    }
  }
}

// one pixel's dh = A * gx + Bc * (h - mu) + Cc
template <typename T>
struct GradHRow {
  const T *A, *Bc, *Cc, *mu, *al, *be;
  // "first": the dense part of gx, (g * s + gm) * ca + gavg
  void dense(const T* __restrict d, const T* __restrict h, const T* __restrict k, const T* __restrict av, T s, T gm,
             int64_t C, T* __restrict o) const {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = A[c] * ((d[c] * s + gm) * k[c] + av[c]) + Bc[c] * (h[c] - mu[c]) + Cc[c];
  }
  // "split": both max pools' shares where x ties their maxima (mc: the pixel's channel max; m, r: each channel's
  // H,W max and its cotangent)
  void split(const T* __restrict d, const T* __restrict h, const T* __restrict k, const T* __restrict av,
             const T* __restrict r, const T* __restrict m, T s, T gm, T gr, T mc, int64_t C, T* __restrict o) const {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T xv = bn_x(h[c], al[c], be[c]);
      const T gy1 = d[c] * s + gm + (xv * k[c] == mc ? gr : T(0));
      const T gx = gy1 * k[c] + av[c] + (xv == m[c] ? r[c] : T(0));
      o[c] = A[c] * gx + Bc[c] * (h[c] - mu[c]) + Cc[c];
    }
  }
};

// per (b, c) over H, W: sum of h, sum of squared deviations from that mean (double), max and min of h
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_pool_cl(const at::Tensor& h) {
  check_cl(h);
  const int64_t B = h.size(0), C = h.size(1), HW = h.size(2) * h.size(3);
  auto dbl = h.options().dtype(at::kDouble).memory_format(at::MemoryFormat::Contiguous);
  auto small = h.options().memory_format(at::MemoryFormat::Contiguous);
  auto sum = at::empty({B, C}, dbl), m2 = at::empty({B, C}, dbl);
  auto mx = at::empty({B, C}, small), mn = at::empty({B, C}, small);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cbam_bn_pool_cl", [&] {
    const scalar_t* ph = h.data_ptr<scalar_t>();
    double *ps = sum.data_ptr<double>(), *pm2 = m2.data_ptr<double>();
    scalar_t *pmx = mx.data_ptr<scalar_t>(), *pmn = mn.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<double> mean(C);
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t* hb = ph + b * HW * C;
        double* s = ps + b * C;
        double* q = pm2 + b * C;
        scalar_t *m = pmx + b * C, *n = pmn + b * C;
        for (int64_t c = 0; c < C; ++c) s[c] = 0.0, q[c] = 0.0, m[c] = hb[c], n[c] = hb[c];
        for (int64_t p = 0; p < HW; ++p) {
          if (p + kPrefetchRows < HW) prefetch_values(hb + (p + kPrefetchRows) * C, C);
          sum_max_min_row(hb + p * C, C, s, m, n);
        }
        for (int64_t c = 0; c < C; ++c) mean[c] = s[c] / double(HW);
        for (int64_t p = 0; p < HW; ++p) {
          if (p + kPrefetchRows < HW) prefetch_values(hb + (p + kPrefetchRows) * C, C);
          sq_dev_row(hb + p * C, mean.data(), C, q);
        }
      }
    });
  });
  return {sum, m2, mx, mn};
}

// dL/ds (B, 1, H, W) = sum_c g * (x * ca), and per (b, c) (B, C, 3): sums of g*s, g*s*x, g*s*(h - mu)
std::tuple<at::Tensor, at::Tensor> bn_grad_s_cl(const at::Tensor& g, const at::Tensor& h, const at::Tensor& al,
                                                const at::Tensor& be, const at::Tensor& ca, const at::Tensor& s,
                                                const at::Tensor& mu) {
  check_cl(h);
  check_cl(g);
  check_small({&al, &be, &ca, &s, &mu});
  const int64_t B = h.size(0), C = h.size(1), H = h.size(2), W = h.size(3), HW = H * W;
  auto gs = at::empty({B, 1, H, W}, h.options().memory_format(at::MemoryFormat::Contiguous));
  auto sums = at::empty({B, C, 3}, h.options().dtype(at::kDouble).memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cbam_bn_grad_s_cl", [&] {
    const scalar_t *ph = h.data_ptr<scalar_t>(), *pd = g.data_ptr<scalar_t>(), *pg = ca.data_ptr<scalar_t>();
    const scalar_t *pa = al.data_ptr<scalar_t>(), *pb = be.data_ptr<scalar_t>(), *ps = s.data_ptr<scalar_t>();
    const scalar_t* pmu = mu.data_ptr<scalar_t>();
    scalar_t* po = gs.data_ptr<scalar_t>();
    double* pq = sums.data_ptr<double>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> part(3 * C), xrows(4 * C);
      std::vector<double> acc(3 * C);
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t* k = pg + b * C;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t p0 = 0; p0 < HW; p0 += kBlock) {
          const int64_t p1 = std::min(HW, p0 + kBlock);
          std::fill(part.begin(), part.end(), scalar_t(0));
          for (int64_t p = p0; p < p1;) {
            const int64_t q = b * HW + p, u_n = p + 4 <= p1 ? 4 : 1;
            if (p + kPrefetchRows + u_n <= HW) {
              prefetch_values(pd + (q + kPrefetchRows) * C, u_n * C);
              prefetch_values(ph + (q + kPrefetchRows) * C, u_n * C);
            }
            for (int64_t u = 0; u < u_n; ++u) {
              scalar_t* x = xrows.data() + u * C;
              affine_row(ph + (q + u) * C, pa, pb, C, x);
              po[q + u] = row_dot3(pd + (q + u) * C, x, k, C);
            }
            if (u_n == 4)
              grad_s_sums_rows<scalar_t, 4>(pd + q * C, ph + q * C, xrows.data(), pmu, ps + q, C, part.data());
            else
              grad_s_sums_rows<scalar_t, 1>(pd + q * C, ph + q * C, xrows.data(), pmu, ps + q, C, part.data());
            p += u_n;
          }
          for (int64_t i = 0; i < 3 * C; ++i) acc[i] += double(part[i]);
        }
        double* out = pq + b * C * 3;
        for (int64_t c = 0; c < C; ++c)
          for (int j = 0; j < 3; ++j) out[c * 3 + j] = acc[j * C + c];
      }
    });
  });
  return {gs, sums};
}

// Per (b, c), once gm = dL/dmean_c / C and gr (routed dL/dmax_c; split: / tie count) are known: (B, C, 6) double
// sums of gm*x, gm*(h - mu), hit*gr, hit*gr*x, hit*gr*(h - mu) (hit: this channel holds the pixel's channel
// max) and of h - mu over the H,W-max positions ("first": the first one only); the first H,W-max position
// (B, C) and the tie count (B, C), as cbam_bn_train.cpp's bn_plane_sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_plane_sums_cl(
    const at::Tensor& h, const at::Tensor& al, const at::Tensor& be, const at::Tensor& ca, const at::Tensor& gm,
    const at::Tensor& gr, const at::Tensor& mxc, const at::Tensor& idxc, const at::Tensor& mx, const at::Tensor& mu,
    bool first) {
  check_cl(h);
  check_small({&al, &be, &ca, &gm, &gr, &mxc, &idxc, &mx, &mu});
  const int64_t B = h.size(0), C = h.size(1), HW = h.size(2) * h.size(3);
  TORCH_CHECK(HW < std::numeric_limits<int32_t>::max(), "cbam_bn_train_cl: H * W must be below 2^31");
  auto small = h.options().memory_format(at::MemoryFormat::Contiguous);
  auto sums = at::empty({B, C, 6}, small.dtype(at::kDouble));
  auto idx = at::empty({B, C}, small.dtype(at::kLong));
  auto cnt = at::empty({B, C}, small);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cbam_bn_plane_sums_cl", [&] {
    const scalar_t *ph = h.data_ptr<scalar_t>(), *pg = ca.data_ptr<scalar_t>(), *pgm = gm.data_ptr<scalar_t>();
    const scalar_t *pgr = gr.data_ptr<scalar_t>(), *pmc = mxc.data_ptr<scalar_t>(), *pmx = mx.data_ptr<scalar_t>();
    const scalar_t *pa = al.data_ptr<scalar_t>(), *pb = be.data_ptr<scalar_t>(), *pmu = mu.data_ptr<scalar_t>();
    const int64_t* pic = idxc.data_ptr<int64_t>();
    double* pq = sums.data_ptr<double>();
    int64_t* pi = idx.data_ptr<int64_t>();
    scalar_t* pc = cnt.data_ptr<scalar_t>();
    const int32_t none = static_cast<int32_t>(HW);
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> part(6 * C), xrow(C);
      std::vector<double> acc(6 * C);
      std::vector<int32_t> pos(C), n(C);
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t *k = pg + b * C, *m = pmx + b * C;
        std::fill(acc.begin(), acc.end(), 0.0);
        std::fill(pos.begin(), pos.end(), none);
        std::fill(n.begin(), n.end(), 0);
        for (int64_t p0 = 0; p0 < HW; p0 += kBlock) {
          const int64_t p1 = std::min(HW, p0 + kBlock);
          std::fill(part.begin(), part.end(), scalar_t(0));
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t q = b * HW + p;
            const scalar_t* hr = ph + q * C;
            if (p + kPrefetchRows < HW) prefetch_values(hr + kPrefetchRows * C, C);
            affine_row(hr, pa, pb, C, xrow.data());
            const int32_t p32 = static_cast<int32_t>(p);
            if (first) {
              plane_sums_row<scalar_t, true>(hr, xrow.data(), k, pmu, m, pgm[q], pgr[q], pmc[q], C, p32, none,
                                             part.data(), pos.data(), n.data());
              const int64_t c = pic[q];  // the pixel's channel max sits in one channel
              part[2 * C + c] += pgr[q];
              part[3 * C + c] += pgr[q] * xrow[c];
              part[4 * C + c] += pgr[q] * (hr[c] - pmu[c]);
            } else {
              plane_sums_row<scalar_t, false>(hr, xrow.data(), k, pmu, m, pgm[q], pgr[q], pmc[q], C, p32, none,
                                              part.data(), pos.data(), n.data());
            }
          }
          for (int64_t i = 0; i < 6 * C; ++i) acc[i] += double(part[i]);
        }
        for (int64_t c = 0; c < C; ++c) {
          const int64_t am = pos[c] < none ? pos[c] : HW - 1;
          double* out = pq + (b * C + c) * 6;
          for (int j = 0; j < 5; ++j) out[j] = acc[j * C + c];
          out[5] = first ? double(ph[(b * HW + am) * C + c] - pmu[c]) : acc[5 * C + c];
          pi[b * C + c] = am;
          pc[b * C + c] = first ? scalar_t(1) : scalar_t(n[c]);
        }
      }
    });
  });
  return {sums, idx, cnt};
}

// dh = A * gx + Bc * (h - mu) + Cc per channel (coef (C, 4): A, Bc, Cc, mu), with
// gx = dL/dx = (g * s + gm + hit_c * gr) * ca + gavg + hit_hw * gmx (cbam_bn_train.cpp's bn_grad_h)
at::Tensor bn_grad_h_cl(const at::Tensor& g, const at::Tensor& h, const at::Tensor& al, const at::Tensor& be,
                        const at::Tensor& ca, const at::Tensor& s, const at::Tensor& gm, const at::Tensor& gr,
                        const at::Tensor& mxc, const at::Tensor& idxc, const at::Tensor& gavg, const at::Tensor& gmx,
                        const at::Tensor& mx, const at::Tensor& idx, const at::Tensor& coef, bool first) {
  check_cl(h);
  check_cl(g);
  check_small({&al, &be, &ca, &s, &gm, &gr, &mxc, &idxc, &gavg, &gmx, &mx, &idx, &coef});
  const int64_t B = h.size(0), C = h.size(1), HW = h.size(2) * h.size(3);
  auto dh = at::empty_like(h);  // channels_last, as h
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cbam_bn_grad_h_cl", [&] {
    const scalar_t *ph = h.data_ptr<scalar_t>(), *pd = g.data_ptr<scalar_t>(), *pg = ca.data_ptr<scalar_t>();
    const scalar_t *pa = al.data_ptr<scalar_t>(), *pb = be.data_ptr<scalar_t>(), *ps = s.data_ptr<scalar_t>();
    const scalar_t *pgm = gm.data_ptr<scalar_t>(), *pgr = gr.data_ptr<scalar_t>(), *pmc = mxc.data_ptr<scalar_t>();
    const scalar_t *pav = gavg.data_ptr<scalar_t>(), *pgx = gmx.data_ptr<scalar_t>(), *pmx = mx.data_ptr<scalar_t>();
    const scalar_t* pk = coef.data_ptr<scalar_t>();  // (C, 4): A, Bc, Cc, mu
    const int64_t *pic = idxc.data_ptr<int64_t>(), *pi = idx.data_ptr<int64_t>();
    scalar_t* po = dh.data_ptr<scalar_t>();
    std::vector<scalar_t> A(C), Bc(C), Cc(C), mu(C);
    for (int64_t c = 0; c < C; ++c) A[c] = pk[c * 4], Bc[c] = pk[c * 4 + 1], Cc[c] = pk[c * 4 + 2], mu[c] = pk[c * 4 + 3];
    const GradHRow<scalar_t> row{A.data(), Bc.data(), Cc.data(), mu.data(), pa, pb};
    at::parallel_for(0, B * HW, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        const int64_t b = q / HW;
        const scalar_t *k = pg + b * C, *av = pav + b * C;
        scalar_t* o = po + q * C;
        if (first) {  // dense part and the pixel's channel max; the H,W maxima after the pass
          row.dense(pd + q * C, ph + q * C, k, av, ps[q], pgm[q], C, o);
          const int64_t c = pic[q];
          o[c] += A[c] * (pgr[q] * k[c]);
        } else {
          row.split(pd + q * C, ph + q * C, k, av, pgx + b * C, pmx + b * C, ps[q], pgm[q], pgr[q], pmc[q], C, o);
        }
      }
    });
    if (first) {  // each channel's H,W maximum: its recorded position, once per (b, c)
      at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b)
          for (int64_t c = 0; c < C; ++c) po[(b * HW + pi[b * C + c]) * C + c] += A[c] * pgx[b * C + c];
      });
    }
  });
  return dh;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbam_multi, m) {
  m.def("bn_pool_cl(Tensor h) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_grad_s_cl(Tensor g, Tensor h, Tensor al, Tensor be, Tensor ca, Tensor s, Tensor mu) -> (Tensor, Tensor)");
  m.def("bn_plane_sums_cl(Tensor h, Tensor al, Tensor be, Tensor ca, Tensor gm, Tensor gr, Tensor mxc, Tensor idxc, "
        "Tensor mx, Tensor mu, bool first) -> (Tensor, Tensor, Tensor)");
  m.def("bn_grad_h_cl(Tensor g, Tensor h, Tensor al, Tensor be, Tensor ca, Tensor s, Tensor gm, Tensor gr, "
        "Tensor mxc, Tensor idxc, Tensor gavg, Tensor gmx, Tensor mx, Tensor idx, Tensor coef, bool first) -> Tensor");
}

TORCH_LIBRARY_IMPL(cbam_multi, CPU, m) {
  m.impl("bn_pool_cl", &bn_pool_cl);
  m.impl("bn_grad_s_cl", &bn_grad_s_cl);
  m.impl("bn_plane_sums_cl", &bn_plane_sums_cl);
  m.impl("bn_grad_h_cl", &bn_grad_h_cl);
}
