// A batched decode step's decoder layers for the Llama family (see decode_layers.py), in one
// call: the kernels a layer runs (kernel_ops.h), chained here in the order decode_forward.py
// calls them from Python, with torch's own softmax, SiLU and product between them.
//
// A one-stream step of SmolLM2 made some twenty calls a layer from Python, each a few
// microseconds of Python and dispatch around a few microseconds of work: 600 calls, a third of
// the step. Here each is a C++ call. Every kernel and torch op gets the tensors, views and
// strides that the Python loop gives it, so every bit is the same.

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/softmax.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "kernel_ops.h"

namespace {

constexpr int64_t WEIGHTS = 6;  // a layer's: qkv, o, gate_up and down panels, its two norms
constexpr int64_t BIASES = 4;   // a layer's: of qkv, o, gate_up and down
constexpr int64_t RUN = 4;      // a run's: first row, rows, first slot of its chunk, span

// What every layer shares.
struct Shared {
  int64_t heads, kv_heads, dims, intermediate;
  double scale, eps, offset;
  bool round_between;
};

// One run of a step: rows first_row.. of the batch, whose caches hold slots first_slot.. of
// the chunks `keys` and `values` of a layer, attending over their first `span` slots.
struct Run {
  int64_t first_row, count, first_slot, span;

  at::Tensor rows(const at::Tensor& t, bool whole) const {
    return whole ? t : t.narrow(0, first_row, count);
  }
  c10::optional<at::Tensor> rows(const c10::optional<at::Tensor>& t, bool whole) const {
    if (!t.has_value()) return t;
    return rows(*t, whole);
  }
  at::Tensor slots(const at::Tensor& chunk) const { return chunk.narrow(0, first_slot, count); }
};

// The rows' [rows, heads, 1, dims] views of `count` heads from head `first` of a layer's
// fused projections [rows, 1, outputs], as decode_forward.py's split and view make them.
at::Tensor heads_of(const at::Tensor& projected, int64_t first, int64_t count, int64_t dims) {
  return projected.narrow(-1, first * dims, count * dims)
      .view({projected.size(0), 1, count, dims})
      .transpose(1, 2);
}

// What a step gives every layer's attention: each row's turns, head slots, mask and new slot,
// and the runs its rows make.
struct Step {
  const c10::optional<at::Tensor>& storing_cos;
  const c10::optional<at::Tensor>& storing_sin;
  const c10::optional<at::Tensor>& turning_cos;
  const c10::optional<at::Tensor>& turning_sin;
  const at::Tensor& head_slots;
  const c10::optional<at::Tensor>& mask;
  const at::Tensor& slots;
  std::vector<Run> runs;
  bool whole;  // one run of every row: nothing to slice

  // A layer's new keys and values into each run's slots of its chunks `keys` and `values` (one
  // a run), then its attention: [rows, kv heads, groups, dims], float32.
  at::Tensor attend(const Shared& s, const at::Tensor& query, const at::Tensor& key,
                    const at::Tensor& value, const at::Tensor* keys,
                    const at::Tensor* values) const {
    for (size_t r = 0; r < runs.size(); ++r) {
      const Run& run = runs[r];
      streamsink::decode_store(run.slots(keys[r]), run.slots(values[r]), run.rows(key, whole),
                               run.rows(value, whole), run.rows(slots, whole),
                               run.rows(storing_cos, whole), run.rows(storing_sin, whole));
    }
    at::Tensor queries =
        streamsink::decode_queries(query, s.scale, turning_cos, turning_sin, s.kv_heads);
    std::vector<at::Tensor> outs;
    for (size_t r = 0; r < runs.size(); ++r) {
      const Run& run = runs[r];
      at::Tensor scores = streamsink::decode_scores(
          run.rows(queries, whole), run.slots(keys[r]).narrow(2, 0, run.span),
          run.rows(head_slots, whole), run.rows(mask, whole));
      outs.push_back(streamsink::decode_mix(at::softmax(scores, -1, at::kFloat),
                                            run.slots(values[r]).narrow(2, 0, run.span)));
    }
    return whole ? outs[0] : at::cat(outs);
  }
};

}  // namespace

namespace streamsink {

// hidden and normed [rows, 1, hidden size], the residual stream and its input norm for layer
// 0; cos and sin [rows, 1, dims], the model's rotary at each row's in-cache position.
// weights: per layer, its fused query-key-value, output, fused gate-up and down panels, its
// post-attention norm's weight and the next norm's (the next layer's input norm, else the
// final one); biases: per layer, its four projections' or none. shape: heads, kv heads, head
// dims, intermediate size. storing and turning: each row's turns, as decode_store and
// decode_queries take them; head_slots and mask as decode_scores takes them. keys and values:
// per layer, per run, the pool chunk the run's rows lie in; runs: per run, its first row, its
// rows, its first slot in its chunk and its span; slots [rows]: each row's new slot.
// -> (hidden, normed) after the last layer, normed by the final norm.
std::tuple<at::Tensor, at::Tensor> decode_layers(
    at::Tensor hidden, at::Tensor normed, const at::Tensor& cos, const at::Tensor& sin,
    at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& biases,
    at::IntArrayRef shape, double scale, double eps, double offset, bool round_between,
    const c10::optional<at::Tensor>& storing_cos, const c10::optional<at::Tensor>& storing_sin,
    const c10::optional<at::Tensor>& turning_cos, const c10::optional<at::Tensor>& turning_sin,
    const at::Tensor& head_slots, const c10::optional<at::Tensor>& mask, at::TensorList keys,
    at::TensorList values, const at::Tensor& slots, at::IntArrayRef runs) {
  TORCH_CHECK(shape.size() == 4, "shape must be heads, kv heads, head dims, intermediate size");
  Shared s{shape[0], shape[1], shape[2], shape[3], scale, eps, offset, round_between};
  int64_t layers = static_cast<int64_t>(weights.size()) / WEIGHTS;
  int64_t run_count = static_cast<int64_t>(runs.size()) / RUN;
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(weights.size()) == layers * WEIGHTS &&
                  static_cast<int64_t>(biases.size()) == layers * BIASES,
              "weights must be six a layer, biases four");
  TORCH_CHECK(run_count > 0 && static_cast<int64_t>(runs.size()) == run_count * RUN &&
                  static_cast<int64_t>(keys.size()) == layers * run_count &&
                  static_cast<int64_t>(values.size()) == layers * run_count,
              "runs must be four numbers each, keys and values one chunk a layer and run");
  Step step{storing_cos, storing_sin, turning_cos, turning_sin, head_slots, mask, slots, {},
            run_count == 1};
  int64_t rows = hidden.size(0), covered = 0;
  for (int64_t r = 0; r < run_count; ++r) {
    Run run{runs[r * RUN], runs[r * RUN + 1], runs[r * RUN + 2], runs[r * RUN + 3]};
    TORCH_CHECK(run.first_row == covered && run.count > 0, "runs must cover the rows in order");
    covered += run.count;
    step.runs.push_back(run);
  }
  TORCH_CHECK(covered == rows, "runs must cover every row once");
  int64_t hidden_size = hidden.size(-1), q = s.heads * s.dims, kv = s.kv_heads * s.dims;
  for (int64_t layer = 0; layer < layers; ++layer) {
    const at::Tensor* w = &weights[layer * WEIGHTS];
    auto bias = [&](int64_t i) { return biases.get(layer * BIASES + i); };
    at::Tensor qkv = linear(normed, w[0], q + 2 * kv, bias(0));
    auto [query, key] = decode_rotary(heads_of(qkv, 0, s.heads, s.dims),
                                      heads_of(qkv, s.heads, s.kv_heads, s.dims), cos, sin);
    at::Tensor value = heads_of(qkv, s.heads + s.kv_heads, s.kv_heads, s.dims);
    at::Tensor attended = step.attend(s, query, key, value, &keys[layer * run_count],
                                      &values[layer * run_count]);
    attended = attended.to(hidden.scalar_type()).view({rows, 1, q});
    at::Tensor out = linear(attended, w[1], hidden_size, bias(1));
    std::tie(hidden, normed) = add_rms_norm(hidden, out, w[4], s.eps, s.offset, s.round_between);
    at::Tensor gate_up = linear(normed, w[2], 2 * s.intermediate, bias(2));
    at::Tensor act = at::mul(at::silu(gate_up.narrow(-1, 0, s.intermediate)),
                             gate_up.narrow(-1, s.intermediate, s.intermediate));
    at::Tensor down = linear(act, w[3], hidden_size, bias(3));
    std::tie(hidden, normed) = add_rms_norm(hidden, down, w[5], s.eps, s.offset, s.round_between);
  }
  return {hidden, normed};
}

}  // namespace streamsink

TORCH_LIBRARY_FRAGMENT(streamsink, m) {
  m.def(
      "decode_layers(Tensor hidden, Tensor normed, Tensor cos, Tensor sin, Tensor[] weights, "
      "Tensor?[] biases, int[] shape, float scale, float eps, float offset, bool round_between, "
      "Tensor? storing_cos, Tensor? storing_sin, Tensor? turning_cos, Tensor? turning_sin, "
      "Tensor head_slots, Tensor? mask, Tensor[] keys, Tensor[] values, Tensor slots, "
      "int[] runs) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(streamsink, CPU, m) { m.impl("decode_layers", &streamsink::decode_layers); }
