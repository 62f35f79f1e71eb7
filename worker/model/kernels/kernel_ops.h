// The kernels' entry points, each also an op of the streamsink library (see its file), for the
// ops that chain them in one call (decode_layers.cpp) without a trip through Python.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

namespace streamsink {

// linear.cpp
at::Tensor linear(const at::Tensor& input, const at::Tensor& panels, int64_t outputs,
                  const c10::optional<at::Tensor>& bias);

// rms_norm.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, double offset,
                    bool round_between);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps,
                                                double offset, bool round_between);

// decode_rows.cpp
void decode_store(at::Tensor keys, at::Tensor values, const at::Tensor& new_keys,
                  const at::Tensor& new_values, const at::Tensor& slots,
                  const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin);
at::Tensor decode_queries(const at::Tensor& query, double scale,
                          const c10::optional<at::Tensor>& cos,
                          const c10::optional<at::Tensor>& sin, int64_t kv_heads);
std::tuple<at::Tensor, at::Tensor> decode_rotary(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& cos, const at::Tensor& sin);

// decode_attention.cpp
at::Tensor decode_scores(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& head,
                         const c10::optional<at::Tensor>& mask);
at::Tensor decode_mix(const at::Tensor& probabilities, const at::Tensor& values);

}  // namespace streamsink
