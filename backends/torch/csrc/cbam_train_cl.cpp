// The training Function's full-size passes (fused.py) for channels_last CPU input, float32/float64: the same
// maths as cbam_train.cpp (see there), with x stored (B, H, W, C). One sample per task: its C-long rows are
// read in order, and every per-channel sum runs over the sample's rows with C accumulators.
//   forward:  pool_hw (reads x)  maps (reads x)  gate (reads x, writes y)
//   backward: grad_s (reads g, x)  grad_ca (reads g, x)  grad_x (reads g, x, writes dx)
// Small maps are (B, 1, H, W) and (B, C) as in the NCHW kernels; full-size outputs keep x's layout. The loops
// are cbam_multi/csrc/train_core_nhwc.h's (the JAX backend's training handlers run them too); this file gives
// them torch's tensors and threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "input_of.h"
#include "train_core_nhwc.h"

#include <limits>
#include <optional>
#include <tuple>

namespace {

using namespace cbam_train_nhwc;

void check_cl(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && x.device().is_cpu(),
              "cbam_train_cl: x must be channels_last CPU");
}

void check_c32(int64_t C) {
  TORCH_CHECK(C < std::numeric_limits<int32_t>::max(), "cbam_train_cl: C must be below 2^31 (32-bit channel indices)");
}

// The backward's saved inputs as the core reads them (grad_ca passes no H,W pool tensors)
template <typename T>
Saved<T, int64_t> saved_of(const at::Tensor& ca, const at::Tensor& s, const at::Tensor& gm, const at::Tensor& gr,
                           const at::Tensor& mxc, const at::Tensor& idxc, const at::Tensor* gavg, const at::Tensor* gmx,
                           const at::Tensor* mx, const at::Tensor* idx, bool first) {
  return {ca.data_ptr<T>(), s.data_ptr<T>(), gm.data_ptr<T>(), gr.data_ptr<T>(), mxc.data_ptr<T>(),
          idxc.data_ptr<int64_t>(), gavg ? gavg->data_ptr<T>() : nullptr, gmx ? gmx->data_ptr<T>() : nullptr,
          mx ? mx->data_ptr<T>() : nullptr, idx ? idx->data_ptr<int64_t>() : nullptr, first};
}

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
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) { pool_hw_samples(px, lo, hi, HW, C, pa, pm, pi, pc); });
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
  check_c32(C);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_maps_cl", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pg = cac.data_ptr<scalar_t>();
    scalar_t *pmean = mean.data_ptr<scalar_t>(), *pmx = mx.data_ptr<scalar_t>(), *pc = cnt.data_ptr<scalar_t>();
    int64_t* pi = idx.data_ptr<int64_t>();
    const cbam_lanes::Input<scalar_t> in = cbam_lanes::input_of<scalar_t>(al, be, C);  // al, be: x = bn_x(h, al, be)
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      maps_samples(px, pg, in.al, in.be, lo, hi, HW, C, pmean, pmx, pi, pc);
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
      gate_pixels(px, pg, ps, in.al, in.be, lo, hi, HW, C, po);
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
    at::parallel_for(0, B * HW, 256, [&](int64_t lo, int64_t hi) { grad_s_pixels(pd, px, pg, lo, hi, HW, C, po); });
  });
  return gs;
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
  check_c32(C);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_grad_ca_cl", [&] {
    const auto sv = saved_of<scalar_t>(cac, sc, gmc, grc, mcc, icc, nullptr, nullptr, nullptr, nullptr, first);
    const scalar_t *px = x.data_ptr<scalar_t>(), *pd = g.data_ptr<scalar_t>();
    scalar_t* po = gca.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) { grad_ca_samples(pd, px, sv, lo, hi, HW, C, po); });
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
    const auto sv = saved_of<scalar_t>(cac, sc, gmc, grc, mcc, icc, &avc, &gxc, &mxx, &ixx, first);
    const scalar_t *px = x.data_ptr<scalar_t>(), *pd = g.data_ptr<scalar_t>();
    scalar_t* po = gx.data_ptr<scalar_t>();
    at::parallel_for(0, B * HW, 256, [&](int64_t lo, int64_t hi) { grad_x_pixels(pd, px, sv, lo, hi, HW, C, po); });
    if (first)
      at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) { grad_x_route_first(sv, lo, hi, HW, C, po); });
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
