// The two matmuls of a batched decode step's attention (see decode_kernel.py), for the CPU.
//
// A decode step's attention reads every row's keys and values once for one query per head:
// matrix-vector work, bound by memory. MKL's batched GEMM reads them at a third of the memory's
// speed on CPUs it does not tune for, so these kernels read each (row, kv head) as one stream
// with AVX-512 or AVX2 and keep that head's few queries in registers. Caches in float32 or bfloat16
// (widened to float32 exactly as they are read); every sum is in float32.
//
// A row's result depends on nothing but the row: each score is computed whole by one thread
// (a task is a block of one (row, kv head)'s keys, so one row's few heads still fill the
// threads) and sums its products in one fixed order (a head dim in chunks of 16 lanes, then one
// tree across the lanes, the same for every key); each (row, kv head)'s outputs are computed
// whole by one thread, summing over the keys in slot order. So neither the batch, the thread
// count nor the instruction set changes a bit.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>

#include "attention_inputs.h"
#include "kernel_ops.h"
#include "vector_isa.h"

namespace {

constexpr int MAX_CHUNKS = MAX_HEAD_DIMS / 16;  // head dims in chunks of 16

template <typename T>
using ScoresOfHead =
    void (*)(const T*, int64_t, int64_t, const T*, int64_t, const bool*, float*, int64_t);

template <typename T>
using MixOfHead = void (*)(const float*, int64_t, const T*, int64_t, int64_t, float*);

#define ATTENTION_HEADS "decode_heads.h"
#include "attention_isas.h"

// This CPU's kernel of one (row, kv head)'s scores over head dims `dims`.
template <typename T>
ScoresOfHead<T> scores_kernel(int64_t dims) {
  auto all = std::make_integer_sequence<int, MAX_CHUNKS>();
  return vector_isa() == VectorIsa::avx512 ? avx512::scores_for<T>(dims, all)
                                           : avx2::scores_for<T>(dims, all);
}

template <typename T>
MixOfHead<T> mix_kernel() {
  return vector_isa() == VectorIsa::avx512 ? static_cast<MixOfHead<T>>(&avx512::mix_of_head<T>)
                                           : static_cast<MixOfHead<T>>(&avx2::mix_of_head<T>);
}

// fn(i, row, kv head) for the i-th (row, kv head) of `kv` [rows, kv heads, ...], each on one of
// torch's threads from start to end: what makes a row's bits its own.
template <typename F>
void for_each_head(const at::Tensor& kv, const F& fn) {
  int64_t heads = kv.size(1);
  at::parallel_for(0, kv.size(0) * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i, i / heads, i % heads);
  });
}

// scores [groups, count] (each group's `stride` apart) += mask [count], widened from the
// mask's dtype M.
template <typename M>
void add_mask(const M* mask, int64_t groups, int64_t count, int64_t stride, float* scores) {
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t s = 0; s < count; ++s) scores[g * stride + s] += static_cast<float>(mask[s]);
}

// A task of the scores: a block of this many keys of one (row, kv head), so that a few rows'
// heads still keep every thread busy. A multiple of the kernel's blocks of 16 keys.
constexpr int64_t KEYS_PER_TASK = 256;

template <typename T>
void scores_of_rows(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& head,
                    const c10::optional<at::Tensor>& mask, at::Tensor& out) {
  int64_t span = keys.size(2), dims = keys.size(3), groups = queries.size(3);
  int64_t heads = keys.size(1), blocks = (span + KEYS_PER_TASK - 1) / KEYS_PER_TASK;
  ScoresOfHead<T> kernel = scores_kernel<T>(dims);
  const T* q = queries.data_ptr<T>();
  const T* k = keys.data_ptr<T>();
  const bool* h = head.data_ptr<bool>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, keys.size(0) * heads * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      int64_t i = task / blocks, row = i / heads, kv_head = i % heads;
      int64_t first = task % blocks * KEYS_PER_TASK;
      int64_t count = std::min(KEYS_PER_TASK, span - first);
      float* scores = o + i * groups * span + first;
      kernel(q + i * 2 * groups * dims, groups, dims,
             k + row * keys.stride(0) + kv_head * keys.stride(1) + first * dims, count,
             h + row * head.stride(0) + first, scores, span);
      if (!mask.has_value()) continue;
      int64_t from = row * mask->stride(0) + first;
      if (mask->scalar_type() == at::kFloat)
        add_mask(mask->data_ptr<float>() + from, groups, count, span, scores);
      else
        add_mask(mask->data_ptr<at::BFloat16>() + from, groups, count, span, scores);
    }
  });
}

template <typename T>
void mix_of_rows(const at::Tensor& probabilities, const at::Tensor& values, at::Tensor& out) {
  int64_t span = values.size(2), dims = values.size(3), groups = probabilities.size(2);
  const float* p = probabilities.data_ptr<float>();
  const T* v = values.data_ptr<T>();
  float* o = out.data_ptr<float>();
  MixOfHead<T> kernel = mix_kernel<T>();
  for_each_head(values, [&](int64_t i, int64_t row, int64_t kv_head) {
    kernel(p + i * groups * span, groups,
                v + row * values.stride(0) + kv_head * values.stride(1), span, dims,
                o + i * groups * dims);
  });
}

}  // namespace

namespace streamsink {

// queries [rows, kv heads, 2 frames, groups, dims] and keys [rows, kv heads, span, dims] of one
// dtype; head [rows, span], bool: the slots whose keys take frame 0; mask [rows, ..., span or
// more] of float32 or bfloat16, or none: what each row adds to its scores of a slot (as
// attention's masks add, in float32). -> float32 scores [rows, kv heads, groups, span].
at::Tensor decode_scores(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& head,
                         const c10::optional<at::Tensor>& mask) {
  check_kv(keys, "keys");
  int64_t rows = keys.size(0), kv = keys.size(1), span = keys.size(2), dims = keys.size(3);
  TORCH_CHECK(queries.is_contiguous() && queries.scalar_type() == keys.scalar_type() &&
                  queries.dim() == 5 && queries.size(0) == rows && queries.size(1) == kv &&
                  queries.size(2) == 2 && queries.size(4) == dims,
              "queries must be contiguous [rows, kv heads, 2, groups, dims], of the keys' dtype");
  TORCH_CHECK(head.scalar_type() == at::kBool && head.dim() == 2 && head.size(0) == rows &&
                  head.size(1) >= span && head.stride(1) == 1,
              "head must be bool [rows, span or more], its slots one after another");
  TORCH_CHECK(!mask.has_value() ||
                  (mask->device().is_cpu() &&
                   (mask->scalar_type() == at::kFloat || mask->scalar_type() == at::kBFloat16) &&
                   mask->dim() >= 2 && mask->size(0) == rows && mask->size(-1) >= span &&
                   mask->stride(-1) == 1 && mask->numel() == rows * mask->size(-1)),
              "mask must be float32 or bfloat16 [rows, ..., span or more], its slots one after "
              "another");
  at::Tensor out = at::empty({rows, kv, queries.size(3), span}, queries.options().dtype(at::kFloat));
  if (keys.scalar_type() == at::kFloat)
    scores_of_rows<float>(queries, keys, head, mask, out);
  else
    scores_of_rows<at::BFloat16>(queries, keys, head, mask, out);
  return out;
}

// float32 probabilities [rows, kv heads, groups, span]; values [rows, kv heads, span, dims]
// -> float32 outputs [rows, kv heads, groups, dims].
at::Tensor decode_mix(const at::Tensor& probabilities, const at::Tensor& values) {
  check_kv(values, "values");
  int64_t rows = values.size(0), kv = values.size(1), span = values.size(2), dims = values.size(3);
  TORCH_CHECK(probabilities.is_contiguous() && probabilities.scalar_type() == at::kFloat &&
                  probabilities.dim() == 4 && probabilities.size(0) == rows &&
                  probabilities.size(1) == kv && probabilities.size(3) == span,
              "probabilities must be contiguous float32 [rows, kv heads, groups, span]");
  at::Tensor out = at::empty({rows, kv, probabilities.size(2), dims}, probabilities.options());
  if (values.scalar_type() == at::kFloat)
    mix_of_rows<float>(probabilities, values, out);
  else
    mix_of_rows<at::BFloat16>(probabilities, values, out);
  return out;
}

}  // namespace streamsink

TORCH_LIBRARY_FRAGMENT(streamsink, m) {
  m.def("decode_scores(Tensor queries, Tensor keys, Tensor head, Tensor? mask=None) -> Tensor");
  m.def("decode_mix(Tensor probabilities, Tensor values) -> Tensor");
}

TORCH_LIBRARY_IMPL(streamsink, CPU, m) {
  m.impl("decode_scores", &streamsink::decode_scores);
  m.impl("decode_mix", &streamsink::decode_mix);
}

#else
#error "the decode attention kernels are for x86-64 CPUs"
#endif
