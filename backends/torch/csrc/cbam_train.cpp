// Full-size passes of the CBAM training Function (fused.py) for CPU, NCHW-contiguous float32/float64.
//
// The Function keeps the small maps (pooled vectors, gates, spatial maps) in torch autograd and hands
// every pass over the full (B, C, H, W) tensor to one of these kernels, each reading its operands once:
//   forward:  pool_hw (reads x)  maps (reads x)  gate (reads x, writes y)         = the 4-pass floor
//   backward: grad_s (reads g, x)  grad_ca (reads g, x)  grad_x (reads g, x, writes dx)
// y1 = x * ca is recomputed (rounded as torch rounds it) instead of saved. Tie rules: "first" routes a max
// pool's gradient to the recorded lowest index (torch.max / adaptive_max_pool2d), "split" divides it by
// the tie count (torch.amax's backward); the Python side passes the already-divided cotangent.
// Sums are accumulated in double, so results agree with the composed ops to float rounding.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "input_of.h"
#include "spatial_conv_core.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using namespace cbam_lanes;

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.device().is_cpu(), "cbam_train: x must be NCHW-contiguous CPU");
}

// (B, C): mean, max, first argmax (flat h*W+w) and tie count of each plane
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_hw(const at::Tensor& x) {
  check_x(x);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto avg = at::empty({B, C}, x.options());
  auto mx = at::empty({B, C}, x.options());
  auto cnt = at::empty({B, C}, x.options());
  auto idx = at::empty({B, C}, x.options().dtype(at::kLong));
  TORCH_CHECK(HW < std::numeric_limits<int32_t>::max(), "cbam_train: H * W must be below 2^31 (32-bit positions)");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_pool_hw", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t *pa = avg.data_ptr<scalar_t>(), *pm = mx.data_ptr<scalar_t>(), *pc = cnt.data_ptr<scalar_t>();
    int64_t* pi = idx.data_ptr<int64_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const scalar_t* v = px + p * HW;
        double s;
        scalar_t m;
        sum_max_lanes(v, HW, s, m);
        int64_t am, n;  // the first position holding the max (HW - 1 if none: a NaN plane) and the tie count
        first_count_eq(v, HW, m, am, n);
        pa[p] = scalar_t(s / double(HW));
        pm[p] = m;
        pi[p] = std::min<int64_t>(am, HW - 1);
        pc[p] = scalar_t(n);
      }
    });
  });
  return {avg, mx, idx, cnt};
}

// Folds channels c0 .. c0 + U - 1 of one sample (y = x * ca, in channel order, so every value and tie is as
// one channel at a time gives) into the per-position sum, max, first argmax channel and tie count. U channels
// per pass over the accumulators: at one, storing them back after every channel bounded the loop (U = 4:
// 1.05 -> 0.32 ms per 64x64x28x28 on one core, same results bit for bit).
template <typename T, int U, bool Affine>
void maps_fold_as(const T* __restrict xb, const Input<T>& in, const T* __restrict ca, int64_t c0, int64_t HW,
                  double* __restrict sum, T* __restrict n, int32_t* __restrict ai, T* __restrict m) {
  T al[U], be[U];
  for (int u = 0; u < U; ++u) al[u] = Affine ? in.al[c0 + u] : T(1), be[u] = Affine ? in.be[c0 + u] : T(0);
  const T* v = xb + c0 * HW;
  for (int64_t i = 0; i < HW; ++i) {
    T y[U];
    for (int u = 0; u < U; ++u) {
      const T xv = Affine ? bn_x(v[u * HW + i], al[u], be[u]) : v[u * HW + i];
      y[u] = xv * ca[c0 + u];
    }
    double s = sum[i];
    T mm = m[i], nn = n[i];
    int32_t a = ai[i];
    for (int u = 0; u < U; ++u) {  // branch-free, so the loop vectorises
      s += y[u];
      const bool gt = y[u] > mm, eq = y[u] == mm;
      nn = gt ? T(1) : nn + (eq ? T(1) : T(0));
      a = gt ? int32_t(c0 + u) : a;
      mm = gt ? y[u] : mm;
    }
    sum[i] = s, m[i] = mm, n[i] = nn, ai[i] = a;
  }
}

template <typename T, int U>
void maps_fold(const T* xb, const Input<T>& in, const T* ca, int64_t c0, int64_t HW, double* sum, T* n, int32_t* ai,
               T* m) {
  if (in.al)
    maps_fold_as<T, U, true>(xb, in, ca, c0, HW, sum, n, ai, m);
  else
    maps_fold_as<T, U, false>(xb, in, ca, c0, HW, sum, n, ai, m);
}

// (B, 1, H, W): channel mean, max, first argmax channel and tie count of y1 = x * ca
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> maps(const at::Tensor& x, const at::Tensor& ca,
                                                                const std::optional<at::Tensor>& al,
                                                                const std::optional<at::Tensor>& be) {
  check_x(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  auto cac = ca.contiguous();
  auto mean = at::empty({B, 1, H, W}, x.options());
  auto mx = at::empty({B, 1, H, W}, x.options());
  auto cnt = at::empty({B, 1, H, W}, x.options());
  auto idx = at::empty({B, 1, H, W}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_maps", [&] {
    const Input<scalar_t> in = input_of<scalar_t>(al, be, C);
    const scalar_t *px = x.data_ptr<scalar_t>(), *pg = cac.data_ptr<scalar_t>();
    scalar_t *pmean = mean.data_ptr<scalar_t>(), *pmx = mx.data_ptr<scalar_t>(), *pc = cnt.data_ptr<scalar_t>();
    int64_t* pi = idx.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<double> sum(HW);
      std::vector<scalar_t> n(HW);
      std::vector<int32_t> ai(HW);
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t* xb = px + b * C * HW;
        scalar_t* m = pmx + b * HW;
        in.plane(0, [&](auto xv) {
          for (int64_t i = 0; i < HW; ++i) {
            const scalar_t y = xv(xb[i]) * pg[b * C];
            sum[i] = y; m[i] = y; ai[i] = 0; n[i] = 1;
          }
        });
        int64_t c = 1;
        for (; c + 4 <= C; c += 4) maps_fold<scalar_t, 4>(xb, in, pg + b * C, c, HW, sum.data(), n.data(), ai.data(), m);
        for (; c < C; ++c) maps_fold<scalar_t, 1>(xb, in, pg + b * C, c, HW, sum.data(), n.data(), ai.data(), m);
        for (int64_t i = 0; i < HW; ++i) {
          pmean[b * HW + i] = scalar_t(sum[i] / double(C));
          pc[b * HW + i] = n[i];
          pi[b * HW + i] = ai[i];
        }
      }
    });
  });
  return {mean, mx, idx, cnt};
}

// y = (x * ca) * s
at::Tensor gate(const at::Tensor& x, const at::Tensor& ca, const at::Tensor& s, const std::optional<at::Tensor>& al,
                const std::optional<at::Tensor>& be) {
  check_x(x);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto cac = ca.contiguous(), sc = s.contiguous();
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_gate", [&] {
    const Input<scalar_t> in = input_of<scalar_t>(al, be, C);
    const scalar_t *px = x.data_ptr<scalar_t>(), *pg = cac.data_ptr<scalar_t>(), *ps = sc.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const scalar_t g = pg[p];
        const scalar_t* sb = ps + (p / C) * HW;
        const scalar_t* v = px + p * HW;
        scalar_t* o = po + p * HW;
        in.plane(p % C, [&](auto xv) {
          for (int64_t i = 0; i < HW; ++i) o[i] = (xv(v[i]) * g) * sb[i];
        });
      }
    });
  });
  return out;
}

// (B, 1, H, W): dL/ds = sum_c g * (x * ca)
at::Tensor grad_s(const at::Tensor& g, const at::Tensor& x, const at::Tensor& ca) {
  check_x(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  auto cac = ca.contiguous();
  auto gs = at::empty({B, 1, H, W}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_grad_s", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pgr = g.data_ptr<scalar_t>(), *pg = cac.data_ptr<scalar_t>();
    scalar_t* po = gs.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<double> acc(HW);
      for (int64_t b = lo; b < hi; ++b) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* v = px + (b * C + c) * HW;
          const scalar_t* d = pgr + (b * C + c) * HW;
          const scalar_t k = pg[b * C + c];
          for (int64_t i = 0; i < HW; ++i) acc[i] += double(d[i] * (v[i] * k));
        }
        for (int64_t i = 0; i < HW; ++i) po[b * HW + i] = scalar_t(acc[i]);
      }
    });
  });
  return gs;
}

// dL/dy1 on one plane (b, c): g * s + gm + (channel-max hit ? gr : 0), gm = dL/dmean_c / C, gr = routed
// dL/dmax_c (split: already / tie count). Pointers set once per plane so the inner loop vectorises.
template <typename T>
struct Plane {
  const T *g, *x, *s, *gm, *gr, *mxc;
  const int64_t* idxc;
  T ca;
  int64_t c;
  bool first;
  inline T gy1(int64_t i) const {
    T v = g[i] * s[i] + gm[i];
    const bool hit = first ? (idxc[i] == c) : (x[i] * ca == mxc[i]);
    return hit ? v + gr[i] : v;
  }
};

template <typename T>
struct Gy1 {
  const T *g, *x, *ca, *s, *gm, *gr, *mxc;
  const int64_t* idxc;
  int64_t C, HW;
  bool first;
  Plane<T> plane(int64_t p) const {
    const int64_t b = p / C, q = b * HW;
    return Plane<T>{g + p * HW, x + p * HW, s + q, gm + q, gr + q, mxc + q, idxc + q, ca[p], p % C, first};
  }
};

template <typename T>
Gy1<T> make_gy1(const at::Tensor& g, const at::Tensor& x, const at::Tensor& ca, const at::Tensor& s,
                const at::Tensor& gm, const at::Tensor& gr, const at::Tensor& mxc, const at::Tensor& idxc, bool first) {
  TORCH_CHECK(g.is_contiguous() && ca.is_contiguous() && s.is_contiguous() && gm.is_contiguous() &&
                  gr.is_contiguous() && mxc.is_contiguous() && idxc.is_contiguous(),
              "cbam_train: contiguous operands expected");
  return Gy1<T>{g.data_ptr<T>(), x.data_ptr<T>(), ca.data_ptr<T>(), s.data_ptr<T>(), gm.data_ptr<T>(),
                gr.data_ptr<T>(), mxc.data_ptr<T>(), idxc.data_ptr<int64_t>(), x.size(1), x.size(2) * x.size(3),
                first};
}

// (B, C): dL/dca = sum_hw dL/dy1 * x. gm = dL/dmean_c / C, gr = routed dL/dmax_c (split: / tie count)
at::Tensor grad_ca(const at::Tensor& g, const at::Tensor& x, const at::Tensor& ca, const at::Tensor& s,
                   const at::Tensor& gm, const at::Tensor& gr, const at::Tensor& mxc, const at::Tensor& idxc,
                   bool first) {
  check_x(x);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto gca = at::empty({B, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_grad_ca", [&] {
    auto f = make_gy1<scalar_t>(g, x, ca, s, gm, gr, mxc, idxc, first);
    scalar_t* po = gca.data_ptr<scalar_t>();
    const scalar_t* px = x.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const auto pl = f.plane(p);
        const scalar_t* v = px + p * HW;
        if (first) {  // dense part; the channel-max hits are added per pixel below
          po[p] = scalar_t(sum_lanes_f(HW, [&](int64_t i) { return (pl.g[i] * pl.s[i] + pl.gm[i]) * v[i]; }));
        } else {
          po[p] = scalar_t(sum_lanes_f(HW, [&](int64_t i) { return pl.gy1(i) * v[i]; }));
        }
      }
    });
    if (first) {  // each pixel's channel max sits in one channel (sample by sample: no two threads share a row)
      const scalar_t *pgr = gr.data_ptr<scalar_t>();
      const int64_t* pic = idxc.data_ptr<int64_t>();
      at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          std::vector<double> add(C, 0.0);
          for (int64_t i = 0; i < HW; ++i) {
            const int64_t c = pic[b * HW + i];
            add[c] += double(pgr[b * HW + i] * px[(b * C + c) * HW + i]);
          }
          for (int64_t c = 0; c < C; ++c) po[b * C + c] = scalar_t(double(po[b * C + c]) + add[c]);
        }
      });
    }
  });
  return gca;
}

// dL/dx = dL/dy1 * ca + gavg (already / HW) + routed HW-max cotangent gmx (split: / tie count)
at::Tensor grad_x(const at::Tensor& g, const at::Tensor& x, const at::Tensor& ca, const at::Tensor& s,
                  const at::Tensor& gm, const at::Tensor& gr, const at::Tensor& mxc, const at::Tensor& idxc,
                  const at::Tensor& gavg, const at::Tensor& gmx, const at::Tensor& mx, const at::Tensor& idx,
                  bool first) {
  check_x(x);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto gavgc = gavg.contiguous(), gmxc = gmx.contiguous(), mxcc = mx.contiguous(), idxcc = idx.contiguous();
  auto gx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_grad_x", [&] {
    auto f = make_gy1<scalar_t>(g, x, ca, s, gm, gr, mxc, idxc, first);
    const scalar_t *px = x.data_ptr<scalar_t>(), *pca = ca.data_ptr<scalar_t>(), *pav = gavgc.data_ptr<scalar_t>(),
                   *pgm = gmxc.data_ptr<scalar_t>(), *pm = mxcc.data_ptr<scalar_t>();
    const int64_t* pi = idxcc.data_ptr<int64_t>();
    scalar_t* po = gx.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const scalar_t k = pca[p], a = pav[p], r = pgm[p], m = pm[p];
        scalar_t* o = po + p * HW;
        const scalar_t* v = px + p * HW;
        const auto pl = f.plane(p);
        if (first) {  // dense part; the two max-pool routings are added per position below
          for (int64_t i = 0; i < HW; ++i) o[i] = (pl.g[i] * pl.s[i] + pl.gm[i]) * k + a;
          continue;
        }
        for (int64_t i = 0; i < HW; ++i) {
          const scalar_t d = pl.gy1(i) * k + a;
          o[i] = v[i] == m ? d + r : d;
        }
      }
    });
    if (first) {  // the channel max's and the H,W max's recorded positions, sample by sample
      const scalar_t* pgr = gr.data_ptr<scalar_t>();
      const int64_t* pic = idxc.data_ptr<int64_t>();
      at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          for (int64_t i = 0; i < HW; ++i) {
            const int64_t p = b * C + pic[b * HW + i];
            po[p * HW + i] += pgr[b * HW + i] * pca[p];
          }
          for (int64_t c = 0; c < C; ++c) {
            const int64_t p = b * C + c;
            po[p * HW + pi[p]] += pgm[p];
          }
        }
      });
    }
  });
  return gx;
}

// The spatial gate's conv and its backward: the loops of cbam_multi/csrc/spatial_conv_core.h (which says why)
at::Tensor conv_fwd(const at::Tensor& in, const at::Tensor& w) {
  TORCH_CHECK(in.is_contiguous() && w.is_contiguous() && in.dim() == 4, "cbam_train.conv_fwd: contiguous NCHW");
  const cbam_spatial_conv::Shape sh{in.size(1), in.size(2), in.size(3), w.size(-1)};
  auto out = at::empty({in.size(0), 1, sh.H, sh.W}, in.options());
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "cbam_conv_fwd", [&] {
    const scalar_t *pi = in.data_ptr<scalar_t>(), *pw = w.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, in.size(0), 1, [&](int64_t lo, int64_t hi) {
      cbam_spatial_conv::forward_samples(pi, pw, sh, lo, hi, po);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> conv_bwd(const at::Tensor& g, const at::Tensor& in, const at::Tensor& w) {
  TORCH_CHECK(g.is_contiguous() && in.is_contiguous() && w.is_contiguous(), "cbam_train.conv_bwd: contiguous");
  const cbam_spatial_conv::Shape sh{in.size(1), in.size(2), in.size(3), w.size(-1)};
  auto gin = at::empty_like(in);
  auto part = at::empty({in.size(0), sh.taps()}, in.options().dtype(at::kDouble));  // per-sample weight gradients
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "cbam_conv_bwd", [&] {
    const scalar_t *pi = in.data_ptr<scalar_t>(), *pw = w.data_ptr<scalar_t>(), *pg = g.data_ptr<scalar_t>();
    scalar_t* pgi = gin.data_ptr<scalar_t>();
    double* pp = part.data_ptr<double>();
    at::parallel_for(0, in.size(0), 1, [&](int64_t lo, int64_t hi) {
      cbam_spatial_conv::backward_samples(pg, pi, pw, sh, lo, hi, pgi, pp);
    });
  });
  return {gin, part.sum(0).to(in.scalar_type()).view(w.sizes())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cbam_multi, m) {
  m.def("train_pool_hw(Tensor x) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("train_maps(Tensor x, Tensor ca, Tensor? al=None, Tensor? be=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("spatial_conv_fwd(Tensor maps, Tensor weight) -> Tensor");
  m.def("spatial_conv_bwd(Tensor grad, Tensor maps, Tensor weight) -> (Tensor, Tensor)");
  m.def("train_gate(Tensor x, Tensor ca, Tensor s, Tensor? al=None, Tensor? be=None) -> Tensor");
  m.def("train_grad_s(Tensor g, Tensor x, Tensor ca) -> Tensor");
  m.def("train_grad_ca(Tensor g, Tensor x, Tensor ca, Tensor s, Tensor gm, Tensor gr, Tensor mxc, Tensor idxc, "
        "bool first) -> Tensor");
  m.def("train_grad_x(Tensor g, Tensor x, Tensor ca, Tensor s, Tensor gm, Tensor gr, Tensor mxc, Tensor idxc, "
        "Tensor gavg, Tensor gmx, Tensor mx, Tensor idx, bool first) -> Tensor");
}

TORCH_LIBRARY_IMPL(cbam_multi, CPU, m) {
  m.impl("train_pool_hw", &pool_hw);
  m.impl("train_maps", &maps);
  m.impl("train_gate", &gate);
  m.impl("spatial_conv_fwd", &conv_fwd);
  m.impl("spatial_conv_bwd", &conv_bwd);
  m.impl("train_grad_s", &grad_s);
  m.impl("train_grad_ca", &grad_ca);
  m.impl("train_grad_x", &grad_x);
}
