// The CBAM training passes (cbam_multi/csrc/train_core_nhwc.h) as XLA FFI handlers for CPU, NHWC, float32 or
// float64, one sample per task on XLA's intra-op threads. backends/jax/fused.py calls them: the forward's
// three passes over x, and the backward's three over the output cotangent g and x, with the small maps (the
// channel MLP, the spatial conv, BN and gates) and their derivatives left to XLA in between.
//
// Shapes: x, g, y, dx (B, H, W, C); per-channel maps (B, C); per-pixel maps (B, H, W); indices int32.
//   CbamTrainPoolHW  x                      -> avg, max, first max position (h * W + w), tie count   (B, C)
//   CbamTrainMaps    x, ca                  -> channel mean, max, first max channel, tie count of x * ca (B, H, W)
//   CbamTrainGate    x, ca, s               -> y = (x * ca) * s
//   CbamTrainGradS   g, x, ca               -> dL/ds = sum_c g * x * ca                                (B, H, W)
//   CbamTrainGradCa  g, x, ca, s, gm, gr, mxc, idxc                  -> dL/dca = sum_hw dL/dy1 * x     (B, C)
//   CbamTrainGradX   g, x, ca, s, gm, gr, mxc, idxc, gavg, gmx, mx, idx -> dL/dx
// Attribute `first` (the last two): tie rule "first" (cotangents to the recorded index) or "split" (gr, gmx
// already divided by the tie counts; every tied element takes them).
// The spatial gate's conv (cbam_multi/csrc/spatial_conv_core.h), maps (B, Ci, H, W), weight (Ci, k, k):
//   CbamTrainConv      maps, w     -> z (B, H, W)
//   CbamTrainConvGrad  g, maps, w  -> dL/dmaps (B, Ci, H, W), each sample's dL/dw (B, Ci * k * k) (summed in
//                                     double, rounded once; the caller adds the samples, so a split batch works)
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "spatial_conv_core.h"
#include "train_core_nhwc.h"
#include "xla_threads.h"

namespace ffi = xla::ffi;

namespace {

using namespace cbam_train_nhwc;
using cbam_xla::on_xla_threads;

struct Dims {
  int64_t B, HW, C;
};

ffi::Error bad(const std::string& what) { return ffi::Error::InvalidArgument("cbam_train: " + what); }

// x's dimensions, or an error naming what is wrong with x
ffi::Error dims_of(const ffi::AnyBuffer& x, Dims& d) {
  const auto s = x.dimensions();
  if (s.size() != 4) return bad("x must be (B, H, W, C)");
  if (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::F64)
    return bad("x must be float32 or float64");
  d = {s[0], s[1] * s[2], s[3]};
  if (d.HW >= std::numeric_limits<int32_t>::max() || d.C >= std::numeric_limits<int32_t>::max())
    return bad("H * W and C must be below 2^31 (32-bit indices)");
  return ffi::Error::Success();
}

// every buffer holds n elements of type t
ffi::Error expect(std::initializer_list<const ffi::AnyBuffer*> bufs, int64_t n, ffi::DataType t, const char* what) {
  for (const ffi::AnyBuffer* b : bufs)
    if (b->element_count() != static_cast<size_t>(n) || b->element_type() != t) return bad(std::string(what) + " has the wrong shape or dtype");
  return ffi::Error::Success();
}

template <typename T>
const T* in(const ffi::AnyBuffer& b) {
  return static_cast<const T*>(b.untyped_data());
}

template <typename T>
T* out(ffi::Result<ffi::AnyBuffer>& b) {
  return static_cast<T*>(b->untyped_data());
}

// f(T{}) for x's float type
template <typename F>
void by_dtype(const ffi::AnyBuffer& x, F&& f) {
  if (x.element_type() == ffi::DataType::F32)
    f(float{});
  else
    f(double{});
}

#define CBAM_TRY(e)                     \
  do {                                  \
    ffi::Error err_ = (e);              \
    if (err_.failure()) return err_;    \
  } while (0)

ffi::Error pool_hw(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> avg, ffi::Result<ffi::AnyBuffer> mx,
                   ffi::Result<ffi::AnyBuffer> idx, ffi::Result<ffi::AnyBuffer> cnt) {
  Dims d;
  CBAM_TRY(dims_of(x, d));
  CBAM_TRY(expect({&*avg, &*mx, &*cnt}, d.B * d.C, x.element_type(), "a (B, C) result"));
  CBAM_TRY(expect({&*idx}, d.B * d.C, ffi::DataType::S32, "the (B, C) index"));
  by_dtype(x, [&](auto t) {
    using T = decltype(t);
    on_xla_threads(pool, d.B, [&](int64_t lo, int64_t hi) {
      pool_hw_samples(in<T>(x), lo, hi, d.HW, d.C, out<T>(avg), out<T>(mx), out<int32_t>(idx), out<T>(cnt));
    });
  });
  return ffi::Error::Success();
}

ffi::Error maps(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer ca, ffi::Result<ffi::AnyBuffer> mean,
                ffi::Result<ffi::AnyBuffer> mx, ffi::Result<ffi::AnyBuffer> idx, ffi::Result<ffi::AnyBuffer> cnt) {
  Dims d;
  CBAM_TRY(dims_of(x, d));
  CBAM_TRY(expect({&ca}, d.B * d.C, x.element_type(), "ca"));
  CBAM_TRY(expect({&*mean, &*mx, &*cnt}, d.B * d.HW, x.element_type(), "a (B, H, W) result"));
  CBAM_TRY(expect({&*idx}, d.B * d.HW, ffi::DataType::S32, "the (B, H, W) index"));
  by_dtype(x, [&](auto t) {
    using T = decltype(t);
    on_xla_threads(pool, d.B, [&](int64_t lo, int64_t hi) {
      maps_samples<T, int32_t>(in<T>(x), in<T>(ca), nullptr, nullptr, lo, hi, d.HW, d.C, out<T>(mean), out<T>(mx),
                               out<int32_t>(idx), out<T>(cnt));
    });
  });
  return ffi::Error::Success();
}

ffi::Error gate(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer ca, ffi::AnyBuffer s, ffi::Result<ffi::AnyBuffer> y) {
  Dims d;
  CBAM_TRY(dims_of(x, d));
  CBAM_TRY(expect({&ca}, d.B * d.C, x.element_type(), "ca"));
  CBAM_TRY(expect({&s}, d.B * d.HW, x.element_type(), "s"));
  CBAM_TRY(expect({&*y}, d.B * d.HW * d.C, x.element_type(), "the result"));
  by_dtype(x, [&](auto t) {
    using T = decltype(t);
    on_xla_threads(pool, d.B, [&](int64_t lo, int64_t hi) {
      gate_pixels<T>(in<T>(x), in<T>(ca), in<T>(s), nullptr, nullptr, lo * d.HW, hi * d.HW, d.HW, d.C, out<T>(y));
    });
  });
  return ffi::Error::Success();
}

ffi::Error grad_s(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer ca,
                  ffi::Result<ffi::AnyBuffer> gs) {
  Dims d;
  CBAM_TRY(dims_of(x, d));
  CBAM_TRY(expect({&g}, d.B * d.HW * d.C, x.element_type(), "g"));
  CBAM_TRY(expect({&ca}, d.B * d.C, x.element_type(), "ca"));
  CBAM_TRY(expect({&*gs}, d.B * d.HW, x.element_type(), "the result"));
  by_dtype(x, [&](auto t) {
    using T = decltype(t);
    on_xla_threads(pool, d.B, [&](int64_t lo, int64_t hi) {
      grad_s_pixels(in<T>(g), in<T>(x), in<T>(ca), lo * d.HW, hi * d.HW, d.HW, d.C, out<T>(gs));
    });
  });
  return ffi::Error::Success();
}

// The saved maps both gradient passes read (the H,W pools' only in grad_x)
ffi::Error check_saved(const Dims& d, ffi::DataType t, const ffi::AnyBuffer& g, const ffi::AnyBuffer& ca,
                       const ffi::AnyBuffer& s, const ffi::AnyBuffer& gm, const ffi::AnyBuffer& gr,
                       const ffi::AnyBuffer& mxc, const ffi::AnyBuffer& idxc) {
  CBAM_TRY(expect({&g}, d.B * d.HW * d.C, t, "g"));
  CBAM_TRY(expect({&ca}, d.B * d.C, t, "ca"));
  CBAM_TRY(expect({&s, &gm, &gr, &mxc}, d.B * d.HW, t, "a (B, H, W) map"));
  return expect({&idxc}, d.B * d.HW, ffi::DataType::S32, "the channel-max index");
}

template <typename T>
Saved<T, int32_t> saved(const ffi::AnyBuffer& ca, const ffi::AnyBuffer& s, const ffi::AnyBuffer& gm,
                        const ffi::AnyBuffer& gr, const ffi::AnyBuffer& mxc, const ffi::AnyBuffer& idxc,
                        const T* gavg, const T* gmx, const T* mx, const int32_t* idx, bool first) {
  return {in<T>(ca), in<T>(s), in<T>(gm), in<T>(gr), in<T>(mxc), in<int32_t>(idxc), gavg, gmx, mx, idx, first};
}

ffi::Error grad_ca(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer ca, ffi::AnyBuffer s,
                   ffi::AnyBuffer gm, ffi::AnyBuffer gr, ffi::AnyBuffer mxc, ffi::AnyBuffer idxc,
                   ffi::Result<ffi::AnyBuffer> gca, bool first) {
  Dims d;
  CBAM_TRY(dims_of(x, d));
  CBAM_TRY(check_saved(d, x.element_type(), g, ca, s, gm, gr, mxc, idxc));
  CBAM_TRY(expect({&*gca}, d.B * d.C, x.element_type(), "the result"));
  by_dtype(x, [&](auto t) {
    using T = decltype(t);
    const auto sv = saved<T>(ca, s, gm, gr, mxc, idxc, nullptr, nullptr, nullptr, nullptr, first);
    on_xla_threads(pool, d.B, [&](int64_t lo, int64_t hi) {
      grad_ca_samples(in<T>(g), in<T>(x), sv, lo, hi, d.HW, d.C, out<T>(gca));
    });
  });
  return ffi::Error::Success();
}

ffi::Error grad_x(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer ca, ffi::AnyBuffer s,
                  ffi::AnyBuffer gm, ffi::AnyBuffer gr, ffi::AnyBuffer mxc, ffi::AnyBuffer idxc, ffi::AnyBuffer gavg,
                  ffi::AnyBuffer gmx, ffi::AnyBuffer mx, ffi::AnyBuffer idx, ffi::Result<ffi::AnyBuffer> gx, bool first) {
  Dims d;
  CBAM_TRY(dims_of(x, d));
  CBAM_TRY(check_saved(d, x.element_type(), g, ca, s, gm, gr, mxc, idxc));
  CBAM_TRY(expect({&gavg, &gmx, &mx}, d.B * d.C, x.element_type(), "a (B, C) map"));
  CBAM_TRY(expect({&idx}, d.B * d.C, ffi::DataType::S32, "the H,W-max index"));
  CBAM_TRY(expect({&*gx}, d.B * d.HW * d.C, x.element_type(), "the result"));
  by_dtype(x, [&](auto t) {
    using T = decltype(t);
    const auto sv = saved<T>(ca, s, gm, gr, mxc, idxc, in<T>(gavg), in<T>(gmx), in<T>(mx), in<int32_t>(idx), first);
    on_xla_threads(pool, d.B, [&](int64_t lo, int64_t hi) {
      grad_x_pixels(in<T>(g), in<T>(x), sv, lo * d.HW, hi * d.HW, d.HW, d.C, out<T>(gx));
      if (first) grad_x_route_first(sv, lo, hi, d.HW, d.C, out<T>(gx));  // the same sample's rows, just written
    });
  });
  return ffi::Error::Success();
}

// maps' and weight's shapes, or an error
ffi::Error conv_shape(const ffi::AnyBuffer& maps, const ffi::AnyBuffer& w, cbam_spatial_conv::Shape& sh) {
  const auto m = maps.dimensions(), k = w.dimensions();
  if (m.size() != 4 || k.size() != 3 || k[0] != m[1] || k[1] != k[2] || k[1] % 2 != 1)
    return bad("conv: maps must be (B, Ci, H, W) and the weight (Ci, k, k), k odd");
  if (maps.element_type() != ffi::DataType::F32 && maps.element_type() != ffi::DataType::F64)
    return bad("conv: maps must be float32 or float64");
  if (w.element_type() != maps.element_type()) return bad("conv: the weight must have the maps' dtype");
  sh = {m[1], m[2], m[3], k[1]};
  return ffi::Error::Success();
}

ffi::Error conv(ffi::ThreadPool pool, ffi::AnyBuffer maps, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> z) {
  cbam_spatial_conv::Shape sh;
  CBAM_TRY(conv_shape(maps, w, sh));
  const int64_t B = maps.dimensions()[0];
  CBAM_TRY(expect({&*z}, B * sh.H * sh.W, maps.element_type(), "the conv's result"));
  by_dtype(maps, [&](auto t) {
    using T = decltype(t);
    on_xla_threads(pool, B, [&](int64_t lo, int64_t hi) {
      cbam_spatial_conv::forward_samples(in<T>(maps), in<T>(w), sh, lo, hi, out<T>(z));
    });
  });
  return ffi::Error::Success();
}

ffi::Error conv_grad(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer maps, ffi::AnyBuffer w,
                     ffi::Result<ffi::AnyBuffer> g_maps, ffi::Result<ffi::AnyBuffer> g_w) {
  cbam_spatial_conv::Shape sh;
  CBAM_TRY(conv_shape(maps, w, sh));
  const int64_t B = maps.dimensions()[0], K = sh.taps();
  CBAM_TRY(expect({&g}, B * sh.H * sh.W, maps.element_type(), "the conv's cotangent"));
  CBAM_TRY(expect({&*g_maps}, B * sh.Ci * sh.H * sh.W, maps.element_type(), "the maps' gradient"));
  CBAM_TRY(expect({&*g_w}, B * K, maps.element_type(), "the weight's per-sample gradients"));
  std::vector<double> part(B * K);
  by_dtype(maps, [&](auto t) {
    using T = decltype(t);
    on_xla_threads(pool, B, [&](int64_t lo, int64_t hi) {
      cbam_spatial_conv::backward_samples(in<T>(g), in<T>(maps), in<T>(w), sh, lo, hi, out<T>(g_maps), part.data());
    });
    std::transform(part.begin(), part.end(), out<T>(g_w), [](double v) { return T(v); });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamTrainPoolHW, pool_hw,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamTrainMaps, maps,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamTrainGate, gate,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamTrainGradS, grad_s,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamTrainGradCa, grad_ca,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("first"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamTrainGradX, grad_x,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("first"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamTrainConv, conv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamTrainConvGrad, conv_grad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
