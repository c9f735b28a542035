// The fused CBAM inference kernel (cbam_multi/csrc/infer_core.h) as the torch op cbam_multi::cbam_infer:
// argument checks, the dtype dispatch, ATen's thread pool. NCHW-contiguous or channels_last input.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "infer_core.h"

namespace {

using namespace cbam_infer_core;

const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

void check_param(const at::Tensor* t, const at::Tensor& x, const char* name, int64_t numel) {
  if (!t) return;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type() && t->is_contiguous(),
              "cbam_infer: ", name, " must be a contiguous CPU tensor of the input's dtype");
  TORCH_CHECK(t->numel() == numel, "cbam_infer: ", name, " has ", t->numel(), " values, expected ", numel);
}

template <typename T>
T scalar(const at::Tensor* t, T fallback) {
  return t ? t->const_data_ptr<T>()[0] : fallback;
}

// the parameters both ops share after x, and the same names as arguments
#define CBAM_INFER_PARAMS                                                                                           \
  const at::Tensor &fc1_w, const std::optional<at::Tensor>&fc1_b, const at::Tensor &fc2_w,                          \
      const std::optional<at::Tensor>&fc2_b, at::IntArrayRef pools, const at::Tensor &conv_w,                       \
      const std::optional<at::Tensor>&conv_b, const std::optional<at::Tensor>&bn_w,                                 \
      const std::optional<at::Tensor>&bn_b, const std::optional<at::Tensor>&bn_mean,                                \
      const std::optional<at::Tensor>&bn_var, double bn_eps, int64_t mean_channel, bool hard_sigmoid,               \
      const std::optional<at::Tensor>&in_scale, const std::optional<at::Tensor>&in_shift,                           \
      const std::optional<at::Tensor>&residual, const std::optional<at::Tensor>&res_scale,                          \
      const std::optional<at::Tensor>&res_shift
#define CBAM_INFER_ARGS                                                                                             \
  fc1_w, fc1_b, fc2_w, fc2_b, pools, conv_w, conv_b, bn_w, bn_b, bn_mean, bn_var, bn_eps, mean_channel, hard_sigmoid, \
      in_scale, in_shift, residual, res_scale, res_shift

// Checks the arguments and runs the kernel on x (NCHW-contiguous or channels_last) into out (x's shape, strides and
// dtype; may be x itself: every pass reads a position of x before the product pass writes it, and that pass
// reads nothing else of x there)
void run_into(const at::Tensor& x, const at::Tensor& out, CBAM_INFER_PARAMS) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "cbam_infer: x must be float32 or float64, got ", x.scalar_type());
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t C = x.size(1);
  TORCH_CHECK(fc1_w.dim() == 2 && fc1_w.size(1) == C, "cbam_infer: fc1 weight must be (hidden, C)");
  const int64_t hidden = fc1_w.size(0);
  TORCH_CHECK(C >= 1 && hidden >= 1, "cbam_infer: needs at least one channel and one hidden unit");
  TORCH_CHECK(mean_channel == 0 || mean_channel == 1, "cbam_infer: mean_channel must be 0 or 1");
  TORCH_CHECK(pools.size() == 1 || pools.size() == 2, "cbam_infer: expects 1 or 2 channel pools");
  for (int64_t pool : pools) TORCH_CHECK(pool == kPoolAvg || pool == kPoolMax, "cbam_infer: unknown pool ", pool);
  TORCH_CHECK(conv_w.dim() == 4 && conv_w.size(0) == 1 && conv_w.size(1) == 2 && conv_w.size(2) == conv_w.size(3) &&
                  conv_w.size(2) % 2 == 1,
              "cbam_infer: conv weight must be (1, 2, k, k) with odd k");
  const int64_t k = conv_w.size(2);
  const bool has_bn = bn_w.has_value();
  TORCH_CHECK(has_bn == bn_b.has_value() && has_bn == bn_mean.has_value() && has_bn == bn_var.has_value(),
              "cbam_infer: BatchNorm needs weight, bias, running mean and running var together");
  check_param(&fc1_w, x, "fc1 weight", hidden * C);
  check_param(opt(fc1_b), x, "fc1 bias", hidden);
  check_param(&fc2_w, x, "fc2 weight", C * hidden);
  check_param(opt(fc2_b), x, "fc2 bias", C);
  check_param(&conv_w, x, "conv weight", 2 * k * k);
  check_param(opt(conv_b), x, "conv bias", 1);
  for (const auto* t : {opt(bn_w), opt(bn_b), opt(bn_mean), opt(bn_var)}) check_param(t, x, "BatchNorm tensor", 1);
  TORCH_CHECK(in_scale.has_value() == in_shift.has_value(), "cbam_infer: in_scale and in_shift go together");
  check_param(opt(in_scale), x, "in_scale", C);
  check_param(opt(in_shift), x, "in_shift", C);
  at::Tensor res_t;  // the residual in x's memory format (a copy only if it has another)
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() && residual->device().is_cpu(),
                "cbam_infer: residual must be a CPU tensor of x's shape and dtype");
    res_t = residual->contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  }
  TORCH_CHECK(res_scale.has_value() == res_shift.has_value() && (!res_scale || residual),
              "cbam_infer: res_scale and res_shift go together, with a residual");
  check_param(opt(res_scale), x, "res_scale", C);
  check_param(opt(res_shift), x, "res_shift", C);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_infer", [&] {
    Params<scalar_t> p;
    p.w1 = fc1_w.const_data_ptr<scalar_t>();
    p.b1 = fc1_b ? fc1_b->const_data_ptr<scalar_t>() : nullptr;
    p.w2 = fc2_w.const_data_ptr<scalar_t>();
    p.b2 = fc2_b ? fc2_b->const_data_ptr<scalar_t>() : nullptr;
    p.hidden = hidden;
    p.pools.assign(pools.begin(), pools.end());
    p.conv = conv_w.const_data_ptr<scalar_t>();
    p.k = k;
    p.mean_channel = mean_channel;
    p.conv_bias = scalar<scalar_t>(opt(conv_b), scalar_t(0));
    p.z_scale = scalar_t(1);
    p.z_shift = scalar_t(0);
    if (has_bn)
      fold_eval_bn(scalar<scalar_t>(opt(bn_w), 0), scalar<scalar_t>(opt(bn_b), 0), scalar<scalar_t>(opt(bn_mean), 0),
                   scalar<scalar_t>(opt(bn_var), 0), bn_eps, p);
    p.hard = hard_sigmoid;
    p.in_scale = in_scale ? in_scale->const_data_ptr<scalar_t>() : nullptr;
    p.in_shift = in_shift ? in_shift->const_data_ptr<scalar_t>() : nullptr;
    p.res_scale = res_scale ? res_scale->const_data_ptr<scalar_t>() : nullptr;
    p.res_shift = res_shift ? res_shift->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* res = residual ? res_t.const_data_ptr<scalar_t>() : nullptr;
    const auto on_aten_threads = [](int64_t n, const auto& body) { at::parallel_for(0, n, 1, body); };
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    scalar_t* od = out.mutable_data_ptr<scalar_t>();
    const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    if (channels_last) {
      run<scalar_t, true>(xd, res, od, B, C, H, W, p, on_aten_threads);
    } else {
      run<scalar_t, false>(xd, res, od, B, C, H, W, p, on_aten_threads);
    }
  });
}

bool kernel_layout(const at::Tensor& x) {
  return x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "cbam_infer: x must be a 4-D CPU tensor");
}

at::Tensor cbam_infer(const at::Tensor& x_in, CBAM_INFER_PARAMS) {
  check_input(x_in);
  // NCHW or channels_last as given; any other strides (torch.compile may pass any layout: the op is tagged
  // flexible_layout) are copied to NCHW first
  const at::Tensor x = kernel_layout(x_in) ? x_in : x_in.contiguous();
  at::Tensor out = at::empty_like(x);  // keeps x's memory format
  run_into(x, out, CBAM_INFER_ARGS);
  return out;
}

// The same with the output written over x: a ResNet block's tail where x (its last conv's output) is read by
// nothing else. No output buffer to fault in and no read-for-ownership of one: each output line is one the
// product pass has just read.
void cbam_infer_(const at::Tensor& x, CBAM_INFER_PARAMS) {
  check_input(x);
  if (residual && residual->is_alias_of(x)) {  // the product pass would read residual values it has overwritten
    const std::optional<at::Tensor> res_copy = residual->clone();
    cbam_infer_(x, fc1_w, fc1_b, fc2_w, fc2_b, pools, conv_w, conv_b, bn_w, bn_b, bn_mean, bn_var, bn_eps,
                mean_channel, hard_sigmoid, in_scale, in_shift, res_copy, res_scale, res_shift);
    return;
  }
  if (kernel_layout(x)) {
    run_into(x, x, CBAM_INFER_ARGS);
  } else {
    const at::Tensor xc = x.contiguous();
    run_into(xc, xc, CBAM_INFER_ARGS);
    x.copy_(xc);
  }
}

}  // namespace

TORCH_LIBRARY(cbam_multi, m) {
#define CBAM_INFER_SCHEMA_TAIL                                                                                     \
  "Tensor fc1_w, Tensor? fc1_b, Tensor fc2_w, Tensor? fc2_b, int[] pools, Tensor conv_w, Tensor? conv_b, "        \
  "Tensor? bn_w, Tensor? bn_b, Tensor? bn_mean, Tensor? bn_var, float bn_eps, int mean_channel, bool hard_sigmoid, " \
  "Tensor? in_scale=None, Tensor? in_shift=None, Tensor? residual=None, Tensor? res_scale=None, "                  \
  "Tensor? res_shift=None)"
  // inductor may hand the ops their buffers in whatever layout it chose (channels_last after its layout
  // optimisation): the kernel reads NCHW and channels_last alike, and its output takes x's layout
  m.def("cbam_infer(Tensor x, " CBAM_INFER_SCHEMA_TAIL " -> Tensor", {at::Tag::flexible_layout});
  // functionalised under torch.compile; inductor writes in place where x is not read afterwards
  m.def("cbam_infer_(Tensor(a!) x, " CBAM_INFER_SCHEMA_TAIL " -> ()", {at::Tag::flexible_layout});
}

TORCH_LIBRARY_IMPL(cbam_multi, CPU, m) {
  m.impl("cbam_infer", &cbam_infer);
  m.impl("cbam_infer_", &cbam_infer_);
}
