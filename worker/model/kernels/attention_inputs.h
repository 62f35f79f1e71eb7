// What the attention kernels (decode_attention.cpp, prefill_attention.cpp) ask of the keys and
// values they read.

#pragma once

#include <ATen/core/Tensor.h>

constexpr int64_t MAX_HEAD_DIMS = 256;  // decode_kernel.MAX_DIMS

inline void check_kv(const at::Tensor& kv, const char* name) {
  TORCH_CHECK(kv.device().is_cpu() && kv.dim() == 4 &&
                  (kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kBFloat16),
              name, " must be a float32 or bfloat16 CPU tensor [rows, kv heads, keys, dims]");
  TORCH_CHECK(kv.stride(3) == 1 && kv.stride(2) == kv.size(3),
              name, ": each head's keys must lie one after another");
  TORCH_CHECK(kv.size(3) <= MAX_HEAD_DIMS, name, ": head dims up to ", MAX_HEAD_DIMS);
}
