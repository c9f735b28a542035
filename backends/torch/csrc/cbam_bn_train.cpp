// Full-size passes of "BatchNorm, then CBAM" in training (fused_bn.py), CPU, NCHW-contiguous float32/float64.
//
// The BN's output x is never stored: every pass reads the BN's input h and forms x = fma(h, al, be) with the
// per-channel al = weight * invstd, be = bias - mean * al, the same expression in every kernel, so every
// pass sees the same x bit for bit (max-pool masks and ties included). Passes over h (and the cotangent g):
//   forward:  bn_pool (reads h: BN statistics and the H,W pools), then cbam_train.cpp's maps and gate given
//             al, be (read h; the gate writes y)
//   backward: bn_grad_s (reads g, h)  bn_plane_sums (reads h)  bn_grad_h (reads g, h, writes dh)
// against BN + CBAM's forward 2 + 3 and backward 2 + 3 passes without CBAM's own; the BN's backward sums
// come from per-plane sums of these passes (the BN gradient is linear in g). Sums run in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "lanes.h"

namespace {

using namespace cbam_lanes;

void check_h(const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 4 && h.is_contiguous() && h.device().is_cpu(), "cbam_bn_train: h must be NCHW-contiguous CPU");
}

void check_small(std::initializer_list<const at::Tensor*> ts) {
  for (auto* t : ts) TORCH_CHECK(t->is_contiguous(), "cbam_bn_train: contiguous small operands expected");
}

// per plane (B, C): sum of h, sum of squared deviations from the plane's mean (double), max and min of h
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_pool(const at::Tensor& h) {
  check_h(h);
  const int64_t B = h.size(0), C = h.size(1), HW = h.size(2) * h.size(3);
  auto dbl = h.options().dtype(at::kDouble);
  auto sum = at::empty({B, C}, dbl), m2 = at::empty({B, C}, dbl);
  auto mx = at::empty({B, C}, h.options()), mn = at::empty({B, C}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cbam_bn_pool", [&] {
    const scalar_t* ph = h.data_ptr<scalar_t>();
    double *ps = sum.data_ptr<double>(), *pm2 = m2.data_ptr<double>();
    scalar_t *pmx = mx.data_ptr<scalar_t>(), *pmn = mn.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const scalar_t* v = ph + p * HW;
        const double s = sum_lanes(v, HW);
        const double mean = s / double(HW);
        ps[p] = s;  // the plane is in cache for the second scan: squared deviations, not sum of squares
        pm2[p] = sum_lanes_f(HW, [&](int64_t i) { const double d = double(v[i]) - mean; return d * d; });
        pmx[p] = max_lanes(v, HW);
        pmn[p] = min_lanes(v, HW);
      }
    });
  });
  return {sum, m2, mx, mn};
}

// (B, C) pooled x: mean over H, W (from the sums) and max (x is monotone in h: the max or min of h, mapped)
std::tuple<at::Tensor, at::Tensor> bn_pool_finish(const at::Tensor& sum, const at::Tensor& hmax, const at::Tensor& hmin,
                                                  const at::Tensor& al, const at::Tensor& be, int64_t hw) {
  check_small({&sum, &hmax, &hmin, &al, &be});
  const int64_t B = hmax.size(0), C = hmax.size(1);
  auto avg = at::empty_like(hmax), mx = at::empty_like(hmax);
  AT_DISPATCH_FLOATING_TYPES(hmax.scalar_type(), "cbam_bn_pool_finish", [&] {
    const double* ps = sum.data_ptr<double>();
    const scalar_t *pmx = hmax.data_ptr<scalar_t>(), *pmn = hmin.data_ptr<scalar_t>();
    const scalar_t *pa = al.data_ptr<scalar_t>(), *pb = be.data_ptr<scalar_t>();
    scalar_t *pavg = avg.data_ptr<scalar_t>(), *pm = mx.data_ptr<scalar_t>();
    for (int64_t p = 0; p < B * C; ++p) {
      const scalar_t a = pa[p % C], b = pb[p % C];
      pavg[p] = scalar_t(double(a) * (ps[p] / double(hw)) + double(b));
      pm[p] = bn_x(a >= scalar_t(0) ? pmx[p] : pmn[p], a, b);
    }
  });
  return {avg, mx};
}

// dL/ds (B, 1, H, W) = sum_c g * (x * ca), and per plane (B, C, 3): sums of g*s, g*s*x, g*s*(h - mu) (mu: the
// BN's mean per channel; centred, as the BN backward's sum of dy * (h - mean), so no cancellation)
std::tuple<at::Tensor, at::Tensor> bn_grad_s(const at::Tensor& g, const at::Tensor& h, const at::Tensor& al,
                                             const at::Tensor& be, const at::Tensor& ca, const at::Tensor& s,
                                             const at::Tensor& mu) {
  check_h(h);
  check_small({&g, &al, &be, &ca, &s, &mu});
  const int64_t B = h.size(0), C = h.size(1), H = h.size(2), W = h.size(3), HW = H * W;
  auto gs = at::empty({B, 1, H, W}, h.options());
  auto sums = at::empty({B, C, 3}, h.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cbam_bn_grad_s", [&] {
    const scalar_t *ph = h.data_ptr<scalar_t>(), *pgr = g.data_ptr<scalar_t>(), *pg = ca.data_ptr<scalar_t>();
    const scalar_t *pa = al.data_ptr<scalar_t>(), *pb = be.data_ptr<scalar_t>(), *ps = s.data_ptr<scalar_t>();
    const scalar_t* pmu = mu.data_ptr<scalar_t>();
    scalar_t* po = gs.data_ptr<scalar_t>();
    double* pq = sums.data_ptr<double>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<double> acc(HW);
      for (int64_t b = lo; b < hi; ++b) {
        std::fill(acc.begin(), acc.end(), 0.0);
        const scalar_t* sb = ps + b * HW;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* v = ph + (b * C + c) * HW;
          const scalar_t* d = pgr + (b * C + c) * HW;
          const scalar_t k = pg[b * C + c], a = pa[c], e = pb[c], m = pmu[c];
          for (int64_t i = 0; i < HW; ++i) acc[i] += double(d[i] * (bn_x(v[i], a, e) * k));
          double* q = pq + (b * C + c) * 3;
          q[0] = sum_lanes_f(HW, [&](int64_t i) { return d[i] * sb[i]; });
          q[1] = sum_lanes_f(HW, [&](int64_t i) { return (d[i] * sb[i]) * bn_x(v[i], a, e); });
          q[2] = sum_lanes_f(HW, [&](int64_t i) { return (d[i] * sb[i]) * (v[i] - m); });
        }
        for (int64_t i = 0; i < HW; ++i) po[b * HW + i] = scalar_t(acc[i]);
      }
    });
  });
  return {gs, sums};
}

// Per plane, once the spatial gate's gradients gm = dL/dmean_c / C and gr (routed dL/dmax_c; split: / tie
// count) are known: (B, C, 6) double sums of gm*x, gm*(h - mu), hit*gr, hit*gr*x, hit*gr*(h - mu) (hit: this
// channel holds the pixel's channel max) and of h - mu over the plane's H,W-max positions ("first": the first
// one only); the first H,W-max position (B, C) and the tie count (B, C). mu: the BN's mean per channel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_plane_sums(
    const at::Tensor& h, const at::Tensor& al, const at::Tensor& be, const at::Tensor& ca, const at::Tensor& gm,
    const at::Tensor& gr, const at::Tensor& mxc, const at::Tensor& idxc, const at::Tensor& mx, const at::Tensor& mu,
    bool first) {
  check_h(h);
  check_small({&al, &be, &ca, &gm, &gr, &mxc, &idxc, &mx, &mu});
  const int64_t B = h.size(0), C = h.size(1), HW = h.size(2) * h.size(3);
  auto sums = at::empty({B, C, 6}, h.options().dtype(at::kDouble));
  auto idx = at::empty({B, C}, h.options().dtype(at::kLong));
  auto cnt = at::empty({B, C}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cbam_bn_plane_sums", [&] {
    const scalar_t *ph = h.data_ptr<scalar_t>(), *pg = ca.data_ptr<scalar_t>(), *pgm = gm.data_ptr<scalar_t>();
    const scalar_t *pgr = gr.data_ptr<scalar_t>(), *pmc = mxc.data_ptr<scalar_t>(), *pmx = mx.data_ptr<scalar_t>();
    const scalar_t *pa = al.data_ptr<scalar_t>(), *pb = be.data_ptr<scalar_t>(), *pmu = mu.data_ptr<scalar_t>();
    const int64_t* pic = idxc.data_ptr<int64_t>();
    double* pq = sums.data_ptr<double>();
    int64_t* pi = idx.data_ptr<int64_t>();
    scalar_t* pc = cnt.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t b = p / C, c = p % C;
        const scalar_t a = pa[c], e = pb[c], k = pg[p], m = pmx[p], mu_c = pmu[c];
        const scalar_t* v = ph + p * HW;
        const scalar_t *gmb = pgm + b * HW, *grb = pgr + b * HW, *mcb = pmc + b * HW;
        const int64_t* icb = pic + b * HW;
        double* q = pq + p * 6;
        // dense sums (v is read from memory once, here; the later scans find the plane in cache)
        q[0] = sum_lanes_f(HW, [&](int64_t i) { return gmb[i] * bn_x(v[i], a, e); });
        q[1] = sum_lanes_f(HW, [&](int64_t i) { return gmb[i] * (v[i] - mu_c); });
        q[2] = q[3] = q[4] = 0;  // "first": the channel-max hits are added per pixel below
        if (!first) {
          auto hit = [&](int64_t i) { return bn_x(v[i], a, e) * k == mcb[i]; };
          q[2] = sum_lanes_f(HW, [&](int64_t i) { return hit(i) ? grb[i] : scalar_t(0); });
          q[3] = sum_lanes_f(HW, [&](int64_t i) { return hit(i) ? grb[i] * bn_x(v[i], a, e) : scalar_t(0); });
          q[4] = sum_lanes_f(HW, [&](int64_t i) { return hit(i) ? grb[i] * (v[i] - mu_c) : scalar_t(0); });
        }
        // the H,W maximum's positions
        const int64_t am = std::min<int64_t>(first_lanes(HW, [&](int64_t i) { return bn_x(v[i], a, e) == m; }), HW - 1);
        int64_t n = 1;
        double hsum = 0;
        if (!first) {
          n = int64_t(sum_lanes_f(HW, [&](int64_t i) { return bn_x(v[i], a, e) == m ? 1.0 : 0.0; }));
          hsum = sum_lanes_f(HW, [&](int64_t i) { return bn_x(v[i], a, e) == m ? double(v[i] - mu_c) : 0.0; });
        }
        q[5] = first ? double(v[am] - mu_c) : hsum;
        pi[p] = am;
        pc[p] = scalar_t(n);
      }
    });
    if (first) {  // each pixel's channel max sits in one channel: add its terms there (sample by sample)
      at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b)
          for (int64_t i = 0; i < HW; ++i) {
            const int64_t c = pic[b * HW + i], p = b * C + c;
            const scalar_t hv = ph[p * HW + i], grv = pgr[b * HW + i];
            double* q = pq + p * 6;
            q[2] += double(grv);
            q[3] += double(grv * bn_x(hv, pa[c], pb[c]));
            q[4] += double(grv * (hv - pmu[c]));
          }
      });
    }
  });
  return {sums, idx, cnt};
}

// dh = A * gx + Bc * (h - mu) + Cc per channel (coef (C, 4): A, Bc, Cc, mu), with
// gx = dL/dx = (g * s + gm + hit_c * gr) * ca + gavg + hit_hw * gmx
at::Tensor bn_grad_h(const at::Tensor& g, const at::Tensor& h, const at::Tensor& al, const at::Tensor& be,
                     const at::Tensor& ca, const at::Tensor& s, const at::Tensor& gm, const at::Tensor& gr,
                     const at::Tensor& mxc, const at::Tensor& idxc, const at::Tensor& gavg, const at::Tensor& gmx,
                     const at::Tensor& mx, const at::Tensor& idx, const at::Tensor& coef, bool first) {
  check_h(h);
  check_small({&g, &al, &be, &ca, &s, &gm, &gr, &mxc, &idxc, &gavg, &gmx, &mx, &idx, &coef});
  const int64_t B = h.size(0), C = h.size(1), HW = h.size(2) * h.size(3);
  auto dh = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cbam_bn_grad_h", [&] {
    const scalar_t *ph = h.data_ptr<scalar_t>(), *pgr = g.data_ptr<scalar_t>(), *pg = ca.data_ptr<scalar_t>();
    const scalar_t *pa = al.data_ptr<scalar_t>(), *pb = be.data_ptr<scalar_t>(), *ps = s.data_ptr<scalar_t>();
    const scalar_t *pgm = gm.data_ptr<scalar_t>(), *pgrr = gr.data_ptr<scalar_t>(), *pmc = mxc.data_ptr<scalar_t>();
    const scalar_t *pav = gavg.data_ptr<scalar_t>(), *pgx = gmx.data_ptr<scalar_t>(), *pmx = mx.data_ptr<scalar_t>();
    const scalar_t* pk = coef.data_ptr<scalar_t>();  // (C, 4): A, Bc, Cc, mu
    const int64_t *pic = idxc.data_ptr<int64_t>(), *pi = idx.data_ptr<int64_t>();
    scalar_t* po = dh.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t b = p / C, c = p % C;
        const scalar_t a = pa[c], e = pb[c], k = pg[p], m = pmx[p], av = pav[p], r = pgx[p];
        const scalar_t A = pk[c * 4], Bc = pk[c * 4 + 1], Cc = pk[c * 4 + 2], mu = pk[c * 4 + 3];
        const scalar_t *v = ph + p * HW, *d = pgr + p * HW;
        const scalar_t *sb = ps + b * HW, *gmb = pgm + b * HW, *grb = pgrr + b * HW, *mcb = pmc + b * HW;
        scalar_t* o = po + p * HW;
        if (first) {  // dense part; the two max-pool routings are added per position below
          for (int64_t i = 0; i < HW; ++i)
            o[i] = A * ((d[i] * sb[i] + gmb[i]) * k + av) + Bc * (v[i] - mu) + Cc;
          continue;
        }
        for (int64_t i = 0; i < HW; ++i) {
          const scalar_t xv = bn_x(v[i], a, e);
          const scalar_t gy1 = d[i] * sb[i] + gmb[i] + (xv * k == mcb[i] ? grb[i] : scalar_t(0));
          const scalar_t gx = gy1 * k + av + (xv == m ? r : scalar_t(0));
          o[i] = A * gx + Bc * (v[i] - mu) + Cc;
        }
      }
    });
    if (first) {  // the channel max's and the H,W max's recorded positions, sample by sample
      at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          for (int64_t i = 0; i < HW; ++i) {
            const int64_t c = pic[b * HW + i], p = b * C + c;
            po[p * HW + i] += pk[c * 4] * (pgrr[b * HW + i] * pg[p]);
          }
          for (int64_t c = 0; c < C; ++c) {
            const int64_t p = b * C + c;
            po[p * HW + pi[p]] += pk[c * 4] * pgx[p];
          }
        }
      });
    }
  });
  return dh;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbam_multi, m) {
  m.def("bn_pool(Tensor h) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_pool_finish(Tensor sum, Tensor hmax, Tensor hmin, Tensor al, Tensor be, int hw) -> (Tensor, Tensor)");
  m.def("bn_grad_s(Tensor g, Tensor h, Tensor al, Tensor be, Tensor ca, Tensor s, Tensor mu) -> (Tensor, Tensor)");
  m.def("bn_plane_sums(Tensor h, Tensor al, Tensor be, Tensor ca, Tensor gm, Tensor gr, Tensor mxc, Tensor idxc, "
        "Tensor mx, Tensor mu, bool first) -> (Tensor, Tensor, Tensor)");
  m.def("bn_grad_h(Tensor g, Tensor h, Tensor al, Tensor be, Tensor ca, Tensor s, Tensor gm, Tensor gr, Tensor mxc, "
        "Tensor idxc, Tensor gavg, Tensor gmx, Tensor mx, Tensor idx, Tensor coef, bool first) -> Tensor");
}

TORCH_LIBRARY_IMPL(cbam_multi, CPU, m) {
  m.impl("bn_pool", &bn_pool);
  m.impl("bn_pool_finish", &bn_pool_finish);
  m.impl("bn_grad_s", &bn_grad_s);
  m.impl("bn_plane_sums", &bn_plane_sums);
  m.impl("bn_grad_h", &bn_grad_h);
}
