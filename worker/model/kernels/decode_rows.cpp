// What a batched decode step does to each row around attention's two matmuls (see
// decode_kernel.py), in two calls a layer where it made some sixty small torch calls:
// - decode_store writes each row's new key, turned from its in-cache position to its stream
//   position, and its new value into the row's slot of the pool;
// - decode_queries scales each row's query and turns a copy into the stream's frame, laid out
//   as decode_scores reads them.
//
// Each result has the bits of the torch ops it replaces (positions._rotate and the products
// beside it), element by element: a product rounded to the dtype the ops run in, then each
// rotate-half term added by one fused multiply-add (torch's addcmul) and rounded to it. So
// the kernels change no bit of a stream's output; they only make fewer calls.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

#include "attention_inputs.h"

namespace {

// out = x * cos + rotate_half(x) * sin over the first `rotary` dims of `dims` (the rest copied),
// every operation rounded to R: float (keys, turned in float32) or the model's dtype (queries).
// `out` must not be `x`.
template <typename R, typename X, typename C>
__attribute__((target("fma"))) void rotate_half(const X* x, const C* cos, const C* sin,
                                                int64_t rotary, int64_t dims, R* out) {
  int64_t half = rotary / 2;
  for (int64_t i = 0; i < rotary; ++i)
    out[i] = static_cast<R>(static_cast<float>(x[i]) * static_cast<float>(cos[i]));
  for (int64_t i = rotary; i < dims; ++i) out[i] = static_cast<R>(static_cast<float>(x[i]));
  for (int64_t i = 0; i < half; ++i)
    out[i] = static_cast<R>(std::fma(-static_cast<float>(x[half + i]),
                                     static_cast<float>(sin[i]), static_cast<float>(out[i])));
  for (int64_t i = half; i < rotary; ++i)
    out[i] = static_cast<R>(std::fma(static_cast<float>(x[i - half]),
                                     static_cast<float>(sin[i]), static_cast<float>(out[i])));
}

// cos and sin [rows, ..., rotary dims], each row's last dim one after another, or none.
struct Turning {
  const at::Tensor* cos = nullptr;
  const at::Tensor* sin = nullptr;
  int64_t rotary = 0;

  Turning(const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& s, int64_t rows,
          int64_t dims, at::ScalarType dtype) {
    TORCH_CHECK(c.has_value() == s.has_value(), "cos and sin come together");
    if (!c.has_value()) return;
    for (const at::Tensor* t : {&*c, &*s})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype && t->dim() >= 2 &&
                      t->size(0) == rows && t->stride(-1) == 1 && t->size(-1) <= dims &&
                      t->size(-1) % 2 == 0 && t->numel() == rows * t->size(-1),
                  "cos and sin must be [rows, ..., rotary dims] of ", dtype,
                  ", an even number of dims, at most the head's");
    cos = &*c;
    sin = &*s;
    rotary = c->size(-1);
  }

  template <typename C>
  const C* of(const at::Tensor* t, int64_t row) const {
    return t->data_ptr<C>() + row * t->stride(0);
  }
};

template <typename T>
void store_rows(at::Tensor& keys, at::Tensor& values, const at::Tensor& new_keys,
                const at::Tensor& new_values, const at::Tensor& slots, const Turning& turning) {
  int64_t rows = keys.size(0), heads = keys.size(1), dims = keys.size(3);
  const int64_t* slot = slots.data_ptr<int64_t>();
  std::array<float, MAX_HEAD_DIMS> turned;  // one key at a time: no allocation a call
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t head = 0; head < heads; ++head) {
      const T* key = new_keys.data_ptr<T>() + row * new_keys.stride(0) + head * new_keys.stride(1);
      const T* value =
          new_values.data_ptr<T>() + row * new_values.stride(0) + head * new_values.stride(1);
      T* key_to = keys.data_ptr<T>() + row * keys.stride(0) + head * keys.stride(1) +
                  slot[row] * keys.stride(2);
      T* value_to = values.data_ptr<T>() + row * values.stride(0) + head * values.stride(1) +
                    slot[row] * values.stride(2);
      if (turning.cos) {
        rotate_half(key, turning.of<float>(turning.cos, row), turning.of<float>(turning.sin, row),
                    turning.rotary, dims, turned.data());
        for (int64_t i = 0; i < dims; ++i) key_to[i] = static_cast<T>(turned[i]);
      } else {
        std::copy(key, key + dims, key_to);
      }
      std::copy(value, value + dims, value_to);
    }
  }
}

void check_rows(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t rows,
                int64_t heads, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 4 &&
                  t.size(0) == rows && t.size(1) == heads && t.size(3) == dims &&
                  t.stride(3) == 1,
              name, " must be [rows, heads, ..., dims] of the cache's dtype, its dims one after "
              "another");
}

// keys and values [rows, kv heads, capacity, dims] (a run of pool slots, written in place);
// new_keys and new_values [rows, kv heads, 1, dims], the keys at in-cache positions; slots
// [rows], int64: each row's slot; cos and sin float32 [rows, ..., rotary dims], each row's turn
// to its stream positions (none: the keys are stored as they are).
void decode_store(at::Tensor keys, at::Tensor values, const at::Tensor& new_keys,
                  const at::Tensor& new_values, const at::Tensor& slots,
                  const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin) {
  at::ScalarType dtype = keys.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "keys must be float32 or bfloat16");
  int64_t rows = keys.size(0), heads = keys.size(1), dims = keys.size(3);
  TORCH_CHECK(dims <= MAX_HEAD_DIMS, "head dims up to ", MAX_HEAD_DIMS);
  check_rows(keys, "keys", dtype, rows, heads, dims);
  check_rows(values, "values", dtype, rows, heads, dims);
  check_rows(new_keys, "new keys", dtype, rows, heads, dims);
  check_rows(new_values, "new values", dtype, rows, heads, dims);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.dim() == 1 &&
                  slots.size(0) == rows,
              "slots must be int64 [rows]");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t row = 0; row < rows; ++row)
    TORCH_CHECK(slot[row] >= 0 && slot[row] < keys.size(2), "slot ", slot[row], " out of range");
  Turning turning(cos, sin, rows, dims, at::kFloat);
  if (dtype == at::kFloat)
    store_rows<float>(keys, values, new_keys, new_values, slots, turning);
  else
    store_rows<at::BFloat16>(keys, values, new_keys, new_values, slots, turning);
}

template <typename T>
void queries_of_rows(const at::Tensor& query, float scale, const Turning& turning,
                     int64_t groups, at::Tensor& out) {
  int64_t rows = query.size(0), heads = query.size(1), dims = query.size(3);
  T* o = out.data_ptr<T>();
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t head = 0; head < heads; ++head) {
      const T* q = query.data_ptr<T>() + row * query.stride(0) + head * query.stride(1);
      // [rows, kv heads, 2 frames, groups, dims]
      T* made = o + ((row * (heads / groups) + head / groups) * 2 * groups + head % groups) * dims;
      T* turned = made + groups * dims;
      for (int64_t i = 0; i < dims; ++i)
        made[i] = static_cast<T>(static_cast<float>(q[i]) * scale);
      if (turning.cos)
        rotate_half(made, turning.of<T>(turning.cos, row), turning.of<T>(turning.sin, row),
                    turning.rotary, dims, turned);
      else
        std::copy(made, made + dims, turned);
    }
  }
}

// query [rows, heads, 1, dims] of float32 or bfloat16, as the model made it; cos and sin
// [rows, ..., rotary dims] of its dtype: each row's turn into the stream's frame (none: the
// frames are one). -> [rows, kv heads, 2 frames, groups, dims] of its dtype: frame 0 the query
// times `scale`, frame 1 that turned, each rounded as torch's ops round them.
at::Tensor decode_queries(const at::Tensor& query, double scale,
                          const c10::optional<at::Tensor>& cos,
                          const c10::optional<at::Tensor>& sin, int64_t kv_heads) {
  at::ScalarType dtype = query.scalar_type();
  TORCH_CHECK(query.device().is_cpu() && (dtype == at::kFloat || dtype == at::kBFloat16) &&
                  query.dim() == 4 && query.size(2) == 1 && query.stride(3) == 1,
              "query must be a float32 or bfloat16 CPU tensor [rows, heads, 1, dims], its dims "
              "one after another");
  int64_t rows = query.size(0), heads = query.size(1), dims = query.size(3);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads must be a multiple of kv heads");
  Turning turning(cos, sin, rows, dims, dtype);
  int64_t groups = heads / kv_heads;
  at::Tensor out = at::empty({rows, kv_heads, 2, groups, dims}, query.options());
  if (dtype == at::kFloat)
    queries_of_rows<float>(query, static_cast<float>(scale), turning, groups, out);
  else
    queries_of_rows<at::BFloat16>(query, static_cast<float>(scale), turning, groups, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(streamsink, m) {
  m.def(
      "decode_store(Tensor(a!) keys, Tensor(b!) values, Tensor new_keys, Tensor new_values, "
      "Tensor slots, Tensor? cos, Tensor? sin) -> ()");
  m.def("decode_queries(Tensor query, float scale, Tensor? cos, Tensor? sin, int kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(streamsink, CPU, m) {
  m.impl("decode_store", &decode_store);
  m.impl("decode_queries", &decode_queries);
}
