// What a batched decode step does to each row around attention's two matmuls (see
// decode_kernel.py), in three calls a layer where it made some seventy small torch calls:
// - decode_rotary turns each row's new query and key to its in-cache position, as the model's
//   own rotary function (transformers' apply_rotary_pos_emb) does;
// - decode_store writes each row's new key, turned from its in-cache position to its stream
//   position, and its new value into the row's slot of the pool;
// - decode_queries scales each row's query and turns a copy into the stream's frame, laid out
//   as decode_scores reads them.
//
// Each result has the bits of the torch ops it replaces, element by element. The model's
// rotary is two products and a sum, each rounded to the model's dtype; our turns
// (positions._rotate and the products beside it) round a product to the dtype the ops run in,
// then add each rotate-half term by one fused multiply-add (torch's addcmul) and round it. So
// the kernels change no bit of a stream's output; they only make fewer calls.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "attention_inputs.h"

#include "kernel_ops.h"

namespace {

// A float32 value rounded to bfloat16's bits: to nearest even, as c10::BFloat16 rounds (a NaN
// to its quiet NaN), without a branch, so that the loops around it vectorize.
inline uint16_t bfloat16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  uint32_t rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
  return value != value ? 0x7FC0 : static_cast<uint16_t>(rounded);
}

// A float32 value rounded to T: as it is, or to bfloat16.
template <typename T>
inline T rounded_to(float value) {
  if constexpr (std::is_same_v<T, float>)
    return value;
  else
    return c10::BFloat16(bfloat16_bits(value), c10::BFloat16::from_bits());
}

// out = x * cos + rotate_half(x) * sin over the first `rotary` dims of `dims` (the rest copied),
// every operation rounded to R: float (keys, turned in float32) or the model's dtype (queries).
// `out` must not be `x`.
template <typename R, typename X, typename C>
__attribute__((target("fma"))) void rotate_half(const X* x, const C* cos, const C* sin,
                                                int64_t rotary, int64_t dims, R* out) {
  int64_t half = rotary / 2;
  for (int64_t i = 0; i < rotary; ++i)
    out[i] = rounded_to<R>(static_cast<float>(x[i]) * static_cast<float>(cos[i]));
  for (int64_t i = rotary; i < dims; ++i) out[i] = rounded_to<R>(static_cast<float>(x[i]));
  for (int64_t i = 0; i < half; ++i)
    out[i] = rounded_to<R>(std::fma(-static_cast<float>(x[half + i]), static_cast<float>(sin[i]),
                                    static_cast<float>(out[i])));
  for (int64_t i = half; i < rotary; ++i)
    out[i] = rounded_to<R>(std::fma(static_cast<float>(x[i - half]), static_cast<float>(sin[i]),
                                    static_cast<float>(out[i])));
}

// out = x * cos + rotate_half(x) * sin over all `dims`, as transformers' rotary computes it on
// tensors of T: each product rounded to T, then their sum (no fused multiply-add).
template <typename T>
void model_rotate_half(const T* x, const T* cos, const T* sin, int64_t dims, T* out) {
  std::array<float, MAX_HEAD_DIMS> made, turned;
  int64_t half = dims / 2;
  for (int64_t i = 0; i < dims; ++i)
    made[i] =
        static_cast<float>(rounded_to<T>(static_cast<float>(x[i]) * static_cast<float>(cos[i])));
  for (int64_t i = 0; i < half; ++i)
    turned[i] = static_cast<float>(
        rounded_to<T>(-static_cast<float>(x[half + i]) * static_cast<float>(sin[i])));
  for (int64_t i = half; i < dims; ++i)
    turned[i] = static_cast<float>(
        rounded_to<T>(static_cast<float>(x[i - half]) * static_cast<float>(sin[i])));
  for (int64_t i = 0; i < dims; ++i) out[i] = rounded_to<T>(made[i] + turned[i]);
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
        for (int64_t i = 0; i < dims; ++i) key_to[i] = rounded_to<T>(turned[i]);
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
        made[i] = rounded_to<T>(static_cast<float>(q[i]) * scale);
      if (turning.cos)
        rotate_half(made, turning.of<T>(turning.cos, row), turning.of<T>(turning.sin, row),
                    turning.rotary, dims, turned);
      else
        std::copy(made, made + dims, turned);
    }
  }
}

template <typename T>
void rotary_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                 at::Tensor& out) {
  int64_t rows = x.size(0), heads = x.size(1), dims = x.size(3);
  for (int64_t row = 0; row < rows; ++row) {
    const T* c = cos.data_ptr<T>() + row * dims;
    const T* s = sin.data_ptr<T>() + row * dims;
    for (int64_t head = 0; head < heads; ++head)
      model_rotate_half(x.data_ptr<T>() + row * x.stride(0) + head * x.stride(1), c, s, dims,
                        out.data_ptr<T>() + (row * heads + head) * dims);
  }
}

}  // namespace

namespace streamsink {

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

// query [rows, heads, 1, dims] and key [rows, kv heads, 1, dims] of float32 or bfloat16, as the
// model's projections made them (views, each head's dims one after another); cos and sin
// [rows, 1, dims] of their dtype, the model's rotary embedding at each row's in-cache position.
// -> both turned, contiguous, with the bits of the model's rotary function.
std::tuple<at::Tensor, at::Tensor> decode_rotary(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& cos, const at::Tensor& sin) {
  at::ScalarType dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "query must be float32 or bfloat16");
  int64_t rows = query.size(0), dims = query.size(3);
  TORCH_CHECK(dims % 2 == 0 && dims <= MAX_HEAD_DIMS, "head dims must be even, up to ",
              MAX_HEAD_DIMS);
  check_rows(query, "query", dtype, rows, query.size(1), dims);
  check_rows(key, "key", dtype, rows, key.size(1), dims);
  TORCH_CHECK(query.size(2) == 1 && key.size(2) == 1, "query and key must be of one token");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype && t->is_contiguous() &&
                    t->numel() == rows * dims && t->size(0) == rows && t->size(-1) == dims,
                "cos and sin must be contiguous [rows, 1, dims] of the query's dtype");
  at::Tensor turned_query = at::empty(query.sizes(), query.options());
  at::Tensor turned_key = at::empty(key.sizes(), key.options());
  if (dtype == at::kFloat) {
    rotary_rows<float>(query, cos, sin, turned_query);
    rotary_rows<float>(key, cos, sin, turned_key);
  } else {
    rotary_rows<at::BFloat16>(query, cos, sin, turned_query);
    rotary_rows<at::BFloat16>(key, cos, sin, turned_key);
  }
  return {turned_query, turned_key};
}

}  // namespace streamsink

TORCH_LIBRARY_FRAGMENT(streamsink, m) {
  m.def(
      "decode_store(Tensor(a!) keys, Tensor(b!) values, Tensor new_keys, Tensor new_values, "
      "Tensor slots, Tensor? cos, Tensor? sin) -> ()");
  m.def("decode_queries(Tensor query, float scale, Tensor? cos, Tensor? sin, int kv_heads) -> Tensor");
  m.def("decode_rotary(Tensor query, Tensor key, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(streamsink, CPU, m) {
  m.impl("decode_store", &streamsink::decode_store);
  m.impl("decode_queries", &streamsink::decode_queries);
  m.impl("decode_rotary", &streamsink::decode_rotary);
}
