// The fused CBAM inference kernel (cbam_multi/csrc/infer_core.h) as an XLA FFI handler for CPU, NHWC:
// relu?(cbam(h * in_scale + in_shift) (+ residual)), one pass over each sample on XLA's intra-op threads.
//
// Operands (canonical layouts transposed to the core's on the Python side, cpu_kernel.py):
//   x (B, H, W, C); fc1_w (hidden, C); fc1_b (hidden,) or (0,); fc2_w (C, hidden); fc2_b (C,) or (0,);
//   conv_w (2, k, k); conv_b (1,) or (0,); bn (4,) = weight, bias, running mean, running var, or (0,);
//   in_scale, in_shift (C,) or (0,); residual x's shape or (0,).
// An absent optional is an empty array, so one handler serves every preset without a rebuild.
// Attributes: pools (1 or 2 codes, 0 = avg, 1 = max, spec order), mean_channel, hard_sigmoid, eps.
#include <algorithm>
#include <cstdint>
#include <string>

#include "infer_core.h"
#include "xla_threads.h"

namespace ffi = xla::ffi;

namespace {

using namespace cbam_infer_core;
using cbam_xla::data_or_null;
using cbam_xla::on_xla_threads;

template <typename T>
void compute(ffi::ThreadPool& pool, const ffi::AnyBuffer& x, const ffi::AnyBuffer& fc1_w, const ffi::AnyBuffer& fc1_b,
             const ffi::AnyBuffer& fc2_w, const ffi::AnyBuffer& fc2_b, const ffi::AnyBuffer& conv_w,
             const ffi::AnyBuffer& conv_b, const ffi::AnyBuffer& bn, const ffi::AnyBuffer& in_scale,
             const ffi::AnyBuffer& in_shift, const ffi::AnyBuffer& residual, ffi::Span<const int64_t> pools,
             int64_t mean_channel, bool hard_sigmoid, double eps, ffi::Result<ffi::AnyBuffer>& out) {
  const auto dims = x.dimensions();
  const int64_t B = dims[0], H = dims[1], W = dims[2], C = dims[3];
  Params<T> p;
  p.w1 = data_or_null<T>(fc1_w);
  p.b1 = data_or_null<T>(fc1_b);
  p.w2 = data_or_null<T>(fc2_w);
  p.b2 = data_or_null<T>(fc2_b);
  p.hidden = fc1_w.dimensions()[0];
  p.pools.assign(pools.begin(), pools.end());
  p.conv = data_or_null<T>(conv_w);
  p.k = conv_w.dimensions()[1];
  p.mean_channel = mean_channel;
  p.conv_bias = conv_b.element_count() ? data_or_null<T>(conv_b)[0] : T(0);
  p.z_scale = T(1);
  p.z_shift = T(0);
  if (const T* b = data_or_null<T>(bn)) fold_eval_bn(b[0], b[1], b[2], b[3], eps, p);
  p.hard = hard_sigmoid;
  p.in_scale = data_or_null<T>(in_scale);
  p.in_shift = data_or_null<T>(in_shift);
  run<T, true>(static_cast<const T*>(x.untyped_data()), data_or_null<T>(residual), static_cast<T*>(out->untyped_data()),
               B, C, H, W, p, [&](int64_t n, const auto& f) { on_xla_threads(pool, n, f); });
}

ffi::Error check(const ffi::AnyBuffer& x, const ffi::AnyBuffer& fc1_w, const ffi::AnyBuffer& fc1_b,
                 const ffi::AnyBuffer& fc2_w, const ffi::AnyBuffer& fc2_b, const ffi::AnyBuffer& conv_w,
                 const ffi::AnyBuffer& conv_b, const ffi::AnyBuffer& bn, const ffi::AnyBuffer& in_scale,
                 const ffi::AnyBuffer& in_shift, const ffi::AnyBuffer& residual, const ffi::AnyBuffer& out,
                 ffi::Span<const int64_t> pools, int64_t mean_channel) {
  auto bad = [](const std::string& what) { return ffi::Error::InvalidArgument("cbam_infer: " + what); };
  auto empty_or = [](const ffi::AnyBuffer& b, int64_t n) { return b.element_count() == 0 || b.element_count() == n; };
  if (x.dimensions().size() != 4) return bad("x must be (B, H, W, C)");
  const int64_t C = x.dimensions()[3];
  if (C < 1) return bad("x must have at least one channel");
  if (fc1_w.dimensions().size() != 2 || fc1_w.dimensions()[1] != C || fc1_w.dimensions()[0] < 1)
    return bad("fc1 weight must be (hidden, C), hidden >= 1");
  const int64_t hidden = fc1_w.dimensions()[0];
  if (fc2_w.dimensions().size() != 2 || fc2_w.dimensions()[0] != C || fc2_w.dimensions()[1] != hidden)
    return bad("fc2 weight must be (C, hidden)");
  if (!empty_or(fc1_b, hidden) || !empty_or(fc2_b, C) || !empty_or(conv_b, 1))
    return bad("biases must be (hidden,), (C,) and (1,), or empty");
  const auto k = conv_w.dimensions();
  if (k.size() != 3 || k[0] != 2 || k[1] != k[2] || k[1] % 2 != 1) return bad("conv weight must be (2, k, k), k odd");
  if (!empty_or(bn, 4)) return bad("bn must hold weight, bias, mean, var");
  if (in_scale.element_count() != in_shift.element_count() || !empty_or(in_scale, C))
    return bad("in_scale and in_shift must both be (C,) or both empty");
  if (residual.element_count() && !(residual.dimensions() == x.dimensions())) return bad("residual must be x's shape");
  if (pools.size() < 1 || pools.size() > 2) return bad("expects 1 or 2 channel pools");
  for (int64_t pool : pools)
    if (pool != kPoolAvg && pool != kPoolMax) return bad("unknown pool code");
  if (mean_channel != 0 && mean_channel != 1) return bad("mean_channel must be 0 or 1");
  for (const ffi::AnyBuffer* b : {&fc1_w, &fc1_b, &fc2_w, &fc2_b, &conv_w, &conv_b, &bn, &in_scale, &in_shift, &residual})
    if (b->element_count() && b->element_type() != x.element_type()) return bad("every operand must have x's dtype");
  if (out.element_type() != x.element_type() || !(out.dimensions() == x.dimensions()))
    return bad("the result must have x's shape and dtype");
  return ffi::Error::Success();
}

ffi::Error cbam_infer_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer fc1_w, ffi::AnyBuffer fc1_b,
                           ffi::AnyBuffer fc2_w, ffi::AnyBuffer fc2_b, ffi::AnyBuffer conv_w, ffi::AnyBuffer conv_b,
                           ffi::AnyBuffer bn, ffi::AnyBuffer in_scale, ffi::AnyBuffer in_shift, ffi::AnyBuffer residual,
                           ffi::Result<ffi::AnyBuffer> out, ffi::Span<const int64_t> pools, int64_t mean_channel,
                           bool hard_sigmoid, double eps) {
  ffi::Error e = check(x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, conv_b, bn, in_scale, in_shift, residual, *out, pools,
                       mean_channel);
  if (e.failure()) return e;
  switch (x.element_type()) {
    case ffi::DataType::F32:
      compute<float>(pool, x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, conv_b, bn, in_scale, in_shift, residual, pools,
                     mean_channel, hard_sigmoid, eps, out);
      return ffi::Error::Success();
    case ffi::DataType::F64:
      compute<double>(pool, x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, conv_b, bn, in_scale, in_shift, residual, pools,
                      mean_channel, hard_sigmoid, eps, out);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("cbam_infer: x must be float32 or float64");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbamInferNHWC, cbam_infer_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // fc1_w
                                  .Arg<ffi::AnyBuffer>()  // fc1_b
                                  .Arg<ffi::AnyBuffer>()  // fc2_w
                                  .Arg<ffi::AnyBuffer>()  // fc2_b
                                  .Arg<ffi::AnyBuffer>()  // conv_w
                                  .Arg<ffi::AnyBuffer>()  // conv_b
                                  .Arg<ffi::AnyBuffer>()  // bn
                                  .Arg<ffi::AnyBuffer>()  // in_scale
                                  .Arg<ffi::AnyBuffer>()  // in_shift
                                  .Arg<ffi::AnyBuffer>()  // residual
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("pools")
                                  .Attr<int64_t>("mean_channel")
                                  .Attr<bool>("hard_sigmoid")
                                  .Attr<double>("eps"));
