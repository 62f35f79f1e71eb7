// RMSNorm on the CPU (see norm_kernel.py), alone or after the residual add before it: each
// row of x [..., features] in one call,
//   normed = x * 1 / sqrt(mean(x * x) + eps),
//   out = normed * (weight + offset),
// normed rounded to x's dtype first where `round_between` (Llama's order: the product is then
// of two values of x's dtype), else the product rounded once, at the end (Gemma's).
//
// Plain C++, with no vector intrinsics and no fused multiply-add (built with -ffp-contract=off):
// the sum of squares runs in double, feature 0 first, and every other operation is one rounded
// float32 operation per element, so a row's bits follow the row alone, on any x86-64 CPU,
// whatever the rows beside it or the thread that computes it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "kernel_ops.h"

namespace {

constexpr int64_t ROWS_PER_TASK = 8;  // a decode step's few rows stay on one thread

template <typename T>
void norm_rows(const T* x, const T* weight, int64_t rows, int64_t features, float eps,
               float offset, bool round_between, T* out) {
  at::parallel_for(0, rows, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* in = x + row * features;
      T* to = out + row * features;
      double squares = 0;
      for (int64_t i = 0; i < features; ++i) {
        double value = static_cast<float>(in[i]);
        squares += value * value;
      }
      float mean = static_cast<float>(squares / static_cast<double>(features));
      float scale = 1.0f / std::sqrt(mean + eps);
      for (int64_t i = 0; i < features; ++i) {
        float normed = static_cast<float>(in[i]) * scale;
        if (round_between) normed = static_cast<float>(static_cast<T>(normed));
        to[i] = static_cast<T>(normed * (static_cast<float>(weight[i]) + offset));
      }
    }
  });
}

template <typename T>
void add_rows(const T* x, const T* residual, int64_t count, T* out) {
  for (int64_t i = 0; i < count; ++i)
    out[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(residual[i]));
}

}  // namespace

namespace streamsink {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, double offset,
                    bool round_between) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm is for CPU tensors");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x and weight must share a dtype, float32 or bfloat16");
  int64_t features = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == features,
              "weight must be [features], the last dim of x");
  at::Tensor input = x.contiguous();
  at::Tensor scale = weight.contiguous();
  at::Tensor out = at::empty_like(input);
  int64_t rows = features == 0 ? 0 : input.numel() / features;
  if (input.scalar_type() == at::kFloat)
    norm_rows<float>(input.data_ptr<float>(), scale.data_ptr<float>(), rows, features,
                     static_cast<float>(eps), static_cast<float>(offset), round_between,
                     out.data_ptr<float>());
  else
    norm_rows<at::BFloat16>(input.data_ptr<at::BFloat16>(), scale.data_ptr<at::BFloat16>(), rows,
                            features, static_cast<float>(eps), static_cast<float>(offset),
                            round_between, out.data_ptr<at::BFloat16>());
  return out;
}

// x + residual, each sum rounded to their dtype as torch's add rounds it, and that sum normed
// as rms_norm norms it: a decoder's residual add and the next norm in one call. -> (the sum,
// the normed sum).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps,
                                                double offset, bool round_between) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16");
  TORCH_CHECK(x.device().is_cpu() && residual.device().is_cpu() &&
                  residual.scalar_type() == x.scalar_type() && residual.sizes() == x.sizes(),
              "residual must be a CPU tensor of x's shape and dtype");
  at::Tensor input = x.contiguous();
  at::Tensor added = residual.contiguous();
  at::Tensor sum = at::empty_like(input);
  if (input.scalar_type() == at::kFloat)
    add_rows(input.data_ptr<float>(), added.data_ptr<float>(), input.numel(),
             sum.data_ptr<float>());
  else
    add_rows(input.data_ptr<at::BFloat16>(), added.data_ptr<at::BFloat16>(), input.numel(),
             sum.data_ptr<at::BFloat16>());
  return {sum, rms_norm(sum, weight, eps, offset, round_between)};
}

}  // namespace streamsink

TORCH_LIBRARY_FRAGMENT(streamsink, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset, bool round_between) -> Tensor");
  m.def(
      "add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, float offset, "
      "bool round_between) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(streamsink, CPU, m) {
  m.impl("rms_norm", &streamsink::rms_norm);
  m.impl("add_rms_norm", &streamsink::add_rms_norm);
}
