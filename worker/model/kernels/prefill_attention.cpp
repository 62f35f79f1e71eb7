// A prefill chunk's attention on the CPU (see prefill_kernel.py): softmax(query · keys + mask)
// · values, a kv head's query heads together, without copying its keys per head.
//
// torch's SDPA ran a chunk of 256 queries against 1024 keys at 115 to 140 GFLOP/s on a 2-core
// machine whose linear layers reach 210, and computed the half of the chunk's own block that
// its causal mask hides: a quarter of a prefill's time. Here a task is QUERIES_PER_TASK queries
// of one (row, kv head), its rows every (query, group) pair. Its scores are a matmul against
// the head's keys, packed once a call with keys in the lanes ([block of 16, dims, 16]); each
// block of 16 keys that the mask hides from all its queries is skipped; the scores of a
// row stay in the cache between its softmax and its product with the values. Keys and values
// in float32 or bfloat16 (widened exactly, once a call); every sum in float32.
//
// The order of every sum: a score sums its dims in order, one fused multiply-add each, then
// adds its mask; a row's greatest score is exact; a probability is exp_nonpositive(score -
// greatest) (prefill_heads.h); the row's sum adds them lane by lane (lane l: keys l, l + 16,
// ...) then its 16 lanes in order; an output sums probability times value over the keys in
// order, then times 1 / sum. A key whose mask is at most MASKED (transformers' masks write the
// dtype's lowest value or -inf) weighs exactly 0, computed or skipped. So neither the thread
// count, the tiles nor the instruction set changes a bit of a row.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>

#include "attention_inputs.h"
#include "vector_isa.h"

namespace {

constexpr int64_t QUERIES_PER_TASK = 16;
constexpr float MASKED = -std::numeric_limits<float>::max() / 2;
constexpr float EXP_FLOOR = -87.0f;  // e^x below it is 0: 2^-126 and less

// One task's inputs and output; its queries' mask rows, where there is a mask.
template <typename T, typename M>
struct Block {
  const T* query;  // the task's first query, the kv head's first query head
  int64_t query_stride, head_stride;
  float scale;
  int64_t queries, groups, dims;
  const float* packed;  // the head's keys, packed
  const float* values;  // the head's values [span, dims]
  int64_t span;
  const M* mask;  // the first query's mask row, or null
  int64_t mask_stride;
  float* out;  // [queries, heads, dims]: the first query's first group
  int64_t out_stride;

  const M* mask_of(int64_t query) const { return mask + query * mask_stride; }

  // Whether any of the task's queries sees a key of the block of 16 from `first`.
  bool live(int64_t first) const {
    if (mask == nullptr) return true;
    int64_t end = std::min(first + 16, span);
    for (int64_t i = 0; i < queries; ++i)
      for (int64_t key = first; key < end; ++key)
        if (static_cast<float>(mask_of(i)[key]) > MASKED) return true;
    return false;
  }
};

template <typename T, typename M>
using AttendBlock = void (*)(const Block<T, M>&);

#define ATTENTION_HEADS "prefill_heads.h"
#include "attention_isas.h"

// keys [rows, kv heads, span, dims] -> float32 [rows * kv heads, blocks of 16, dims, 16], keys
// past the span 0.
template <typename T>
at::Tensor pack_keys(const at::Tensor& keys) {
  int64_t heads = keys.size(0) * keys.size(1), span = keys.size(2), dims = keys.size(3);
  int64_t blocks = (span + 15) / 16;
  at::Tensor packed = at::empty({heads, blocks, dims, 16}, keys.options().dtype(at::kFloat));
  const T* k = keys.data_ptr<T>();
  float* p = packed.data_ptr<float>();
  at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t head = i / blocks, first = i % blocks * 16;
      const T* from = k + head / keys.size(1) * keys.stride(0) + head % keys.size(1) * keys.stride(1);
      float* to = p + i * dims * 16;
      for (int64_t l = 0; l < 16; ++l)
        for (int64_t d = 0; d < dims; ++d)
          to[d * 16 + l] = first + l < span ? static_cast<float>(from[(first + l) * dims + d]) : 0;
    }
  });
  return packed;
}

template <typename T, typename M>
void attend_rows(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                 const c10::optional<at::Tensor>& mask, float scale, at::Tensor& out) {
  int64_t rows = keys.size(0), kv = keys.size(1), span = keys.size(2), dims = keys.size(3);
  int64_t heads = query.size(1), groups = heads / kv, length = query.size(2);
  int64_t blocks = (length + QUERIES_PER_TASK - 1) / QUERIES_PER_TASK;
  at::Tensor packed = pack_keys<T>(keys);
  int64_t packed_stride = packed.stride(0);
  // Widened once, bfloat16 values are read at float32's speed, many times a call; float32
  // ones are read in place.
  at::Tensor wide = values.scalar_type() == at::kFloat ? values : values.to(at::kFloat);
  AttendBlock<T, M> kernel = vector_isa() == VectorIsa::avx512 ? &avx512::attend_block<T, M>
                                                               : &avx2::attend_block<T, M>;
  at::parallel_for(0, rows * kv * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      // Blocks of queries alternate from either end: a causal mask makes the later ones
      // longer, and each thread's run of tasks takes a mix.
      int64_t i = task / blocks, turn = task % blocks;
      int64_t block = turn % 2 == 0 ? turn / 2 : blocks - 1 - turn / 2;
      int64_t row = i / kv, head = i % kv, first = block * QUERIES_PER_TASK;
      const M* mask_rows = nullptr;
      int64_t mask_stride = 0;
      if (mask.has_value()) {
        mask_stride = mask->stride(2);
        mask_rows = mask->data_ptr<M>() + (mask->size(0) == 1 ? 0 : row * mask->stride(0)) +
                    first * mask_stride;
      }
      Block<T, M> b{query.data_ptr<T>() + row * query.stride(0) +
                        head * groups * query.stride(1) + first * query.stride(2),
                    query.stride(2),
                    query.stride(1),
                    scale,
                    std::min(QUERIES_PER_TASK, length - first),
                    groups,
                    dims,
                    packed.data_ptr<float>() + i * packed_stride,
                    wide.data_ptr<float>() + row * wide.stride(0) + head * wide.stride(1),
                    span,
                    mask_rows,
                    mask_stride,
                    out.data_ptr<float>() + (row * length + first) * heads * dims +
                        head * groups * dims,
                    heads * dims};
      kernel(b);
    }
  });
}

template <typename T>
void attend_masked(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                   const c10::optional<at::Tensor>& mask, float scale, at::Tensor& out) {
  if (mask.has_value() && mask->scalar_type() == at::kBFloat16)
    attend_rows<T, at::BFloat16>(query, keys, values, mask, scale, out);
  else
    attend_rows<T, float>(query, keys, values, mask, scale, out);
}

// query [rows, heads, queries, dims] (each head's dims one after another) and keys and values
// [rows, kv heads, span, dims] of one dtype, float32 or bfloat16; mask [rows or 1, 1, queries,
// span or more] of float32 or bfloat16, what each query adds to its scores, or none -> float32
// [rows, queries, heads, dims]: softmax(query · keys * scale + mask) · values.
at::Tensor prefill_attention(const at::Tensor& query, const at::Tensor& keys,
                             const at::Tensor& values, const c10::optional<at::Tensor>& mask,
                             double scale) {
  check_kv(keys, "keys");
  check_kv(values, "values");
  TORCH_CHECK(values.sizes() == keys.sizes() && values.scalar_type() == keys.scalar_type(),
              "values must match the keys");
  int64_t rows = keys.size(0), kv = keys.size(1), span = keys.size(2), dims = keys.size(3);
  TORCH_CHECK(query.device().is_cpu() && query.scalar_type() == keys.scalar_type() &&
                  query.dim() == 4 && query.size(0) == rows && query.size(1) % kv == 0 &&
                  query.size(3) == dims && query.stride(3) == 1,
              "query must be [rows, heads (a multiple of the kv heads), queries, dims] of the "
              "keys' dtype, each head's dims one after another");
  int64_t length = query.size(2);
  TORCH_CHECK(!mask.has_value() ||
                  (mask->device().is_cpu() &&
                   (mask->scalar_type() == at::kFloat || mask->scalar_type() == at::kBFloat16) &&
                   mask->dim() == 4 && (mask->size(0) == 1 || mask->size(0) == rows) &&
                   mask->size(1) == 1 &&
                   mask->size(2) == length && mask->size(3) >= span && mask->stride(3) == 1),
              "mask must be float32 or bfloat16 [rows or 1, 1, queries, span or more], its keys "
              "one after another");
  TORCH_CHECK(vector_isa() != VectorIsa::none, "this CPU has neither AVX-512 nor AVX2 with FMA");
  at::Tensor out = at::empty({rows, length, query.size(1), dims}, query.options().dtype(at::kFloat));
  if (keys.scalar_type() == at::kFloat)
    attend_masked<float>(query, keys, values, mask, static_cast<float>(scale), out);
  else
    attend_masked<at::BFloat16>(query, keys, values, mask, static_cast<float>(scale), out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(streamsink, m) {
  m.def("prefill_attention(Tensor query, Tensor keys, Tensor values, Tensor? mask, float scale) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(streamsink, CPU, m) { m.impl("prefill_attention", &prefill_attention); }

#else
#error "the prefill attention kernel is for x86-64 CPUs"
#endif
