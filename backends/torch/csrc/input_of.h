// The torch kernels' optional BatchNorm affine inputs (al, be tensors) as the framework-free passes read them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "lanes.h"

namespace cbam_lanes {

// al, be (C,) given: the pass reads a BatchNorm's input h and forms x = bn_x(h, al, be) (fused_bn.py)
template <typename T>
Input<T> input_of(const std::optional<at::Tensor>& al, const std::optional<at::Tensor>& be, int64_t C) {
  TORCH_CHECK(al.has_value() == be.has_value(), "cbam_train: al and be go together");
  if (!al.has_value()) return Input<T>{nullptr, nullptr};
  TORCH_CHECK(al->is_contiguous() && be->is_contiguous() && al->numel() == C && be->numel() == C,
              "cbam_train: al and be must be contiguous (C,)");
  return Input<T>{al->data_ptr<T>(), be->data_ptr<T>()};
}

}  // namespace cbam_lanes
