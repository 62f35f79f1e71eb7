// Linear layers on the CPU (see linear_kernel.py): out = input @ weight.T (+ bias), with float32
// or bfloat16 weights, inputs and outputs. Every sum is in float32; bfloat16 outputs are
// rounded once, at the end.
//
// The weight is packed once into panels of 48 outputs, [panels, in features, 48], so that one
// step of the sum over the inputs reads 48 consecutive weights. A tile of a few input rows (8
// with AVX-512, 2 with AVX2's 16 registers) keeps its sums of the panel's 48 outputs in
// registers: each input value is broadcast against the panel's vectors. This is the form of
// the BLAS kernels (bound by the FMA units from about 16 rows on, by memory below), and it is
// also what makes a row's bits its own: every output sums its products in one order, input
// feature 0 first, whatever the tile, the row count, the other rows, the thread that computes
// it (threads split the panels, never the sum) or the instruction set (linear_tiles.h).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>

#include "kernel_ops.h"
#include "vector_isa.h"

namespace {

constexpr int PANEL = 48;  // the outputs of one panel
constexpr int CHUNKS = PANEL / 16;  // its chunks of 16 lanes

template <typename T>
using Tile = void (*)(const T*, int64_t, const T*, const float*, int64_t, float*, int64_t);

namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#include "vectors_avx512.h"
#include "linear_tiles.h"

// bfloat16: over pairs of features (`features` even; panel [features / 2, 48, 2]), through the
// CPU's bfloat16 dot product: each pair's two products are exact in float32 and added to the
// sum one after the other, the pair's second first.
template <int ROWS>
__attribute__((target("avx512bf16"))) void bfloat16_tile(
    const at::BFloat16* input, int64_t features, const at::BFloat16* panel, const float* bias,
    int64_t width, float* out, int64_t out_stride) {
  __m512 sums[ROWS][CHUNKS];
  for (int m = 0; m < ROWS; ++m)
    for (int c = 0; c < CHUNKS; ++c) sums[m][c] = _mm512_setzero_ps();
  const int32_t* pairs = reinterpret_cast<const int32_t*>(input);
  for (int64_t k = 0; k < features / 2; ++k) {
    __m512bh weights[CHUNKS];
    for (int c = 0; c < CHUNKS; ++c)
      weights[c] = (__m512bh)_mm512_loadu_si512(panel + 2 * (k * PANEL + c * 16));
    for (int m = 0; m < ROWS; ++m) {
      __m512bh value = (__m512bh)_mm512_set1_epi32(pairs[m * features / 2 + k]);
      for (int c = 0; c < CHUNKS; ++c)
        sums[m][c] = _mm512_dpbf16_ps(sums[m][c], value, weights[c]);
    }
  }
  store<ROWS>(sums, bias, width, out, out_stride);
}

template <int... ROWS>
constexpr std::array<Tile<at::BFloat16>, sizeof...(ROWS)> bfloat16_tiles_for(
    std::integer_sequence<int, ROWS...>) {
  return {&bfloat16_tile<ROWS + 1>...};
}

constexpr auto bfloat16_tiles =
    bfloat16_tiles_for(std::make_integer_sequence<int, Isa::LINEAR_TILE_ROWS>());
#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "vectors_avx2.h"
#include "linear_tiles.h"
#pragma GCC pop_options
}  // namespace avx2

// The tiles of 1 to `rows` rows.
template <typename T>
struct Tiles {
  const Tile<T>* of_rows;
  int rows;
};

Tiles<float> float_tiles() {
  if (vector_isa() == VectorIsa::avx512)
    return {avx512::float_tiles.data(), avx512::Isa::LINEAR_TILE_ROWS};
  return {avx2::float_tiles.data(), avx2::Isa::LINEAR_TILE_ROWS};
}

// rows [count, features] and panels of T; threads split the panels, never a sum. The sums go
// to `out` (float32); where `rounded` is given (bfloat16 rows), each panel's are rounded into
// it by the thread that made them, to nearest even, as a conversion by torch rounds them.
template <typename T>
void linear_of_rows(const at::Tensor& rows, const at::Tensor& panels, int64_t outputs,
                    const float* bias, at::Tensor& out, Tiles<T> tiles,
                    at::BFloat16* rounded = nullptr) {
  int64_t count = rows.size(0), features = rows.size(1);
  int64_t panel_size = panels.numel() / panels.size(0);
  const T* x = rows.data_ptr<T>();
  const T* w = panels.data_ptr<T>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      int64_t first = p * PANEL, width = std::min<int64_t>(PANEL, outputs - first);
      for (int64_t m = 0; m < count; m += tiles.rows) {
        int64_t here = std::min<int64_t>(tiles.rows, count - m);
        tiles.of_rows[here - 1](x + m * features, features, w + p * panel_size,
                                bias ? bias + first : nullptr, width, o + m * outputs + first,
                                outputs);
      }
      if (!rounded) continue;
      for (int64_t m = 0; m < count; ++m)
        for (int64_t j = first; j < first + width; ++j)
          rounded[m * outputs + j] = static_cast<at::BFloat16>(o[m * outputs + j]);
    }
  });
}

bool has_bfloat16_dot() {
  return vector_isa() == VectorIsa::avx512 && __builtin_cpu_supports("avx512bf16");
}

std::string instruction_set() {
  switch (vector_isa()) {
    case VectorIsa::avx512: return "AVX-512";
    case VectorIsa::avx2: return "AVX2";
    default: return "";
  }
}

}  // namespace

namespace streamsink {

// input [..., in features]; panels (the weight [outputs, in features] packed, zero past its
// last output): float32 [panels, in features, 48], bfloat16 [panels, in features / 2 rounded
// up, 48, 2]; bias [outputs] or none; all of one dtype -> [..., outputs] of that dtype.
at::Tensor linear(const at::Tensor& input, const at::Tensor& panels, int64_t outputs,
                  const c10::optional<at::Tensor>& bias) {
  at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK(input.device().is_cpu() && (dtype == at::kFloat || dtype == at::kBFloat16) &&
                  input.dim() >= 1,
              "input must be a float32 or bfloat16 CPU tensor [..., in features]");
  int64_t features = input.size(-1);
  bool pairs = dtype == at::kBFloat16;
  TORCH_CHECK(!pairs || has_bfloat16_dot(), "bfloat16 needs a CPU with AVX512-BF16");
  int64_t steps = pairs ? (features + 1) / 2 : features;
  TORCH_CHECK(panels.device().is_cpu() && panels.scalar_type() == dtype &&
                  panels.is_contiguous() && panels.dim() == (pairs ? 4 : 3) &&
                  panels.size(1) == steps && panels.size(2) == PANEL &&
                  (!pairs || panels.size(3) == 2) && outputs > (panels.size(0) - 1) * PANEL &&
                  outputs <= panels.size(0) * PANEL,
              "panels must be contiguous, of the input's dtype, holding the outputs: float32 "
              "[panels, in features, 48], bfloat16 [panels, in features / 2, 48, 2]");
  bool biased = bias.has_value() && bias->defined();
  TORCH_CHECK(!biased || (bias->scalar_type() == dtype && bias->dim() == 1 &&
                          bias->size(0) == outputs),
              "bias must be [outputs] of the input's dtype");
  at::Tensor rows = input.reshape({-1, features}).contiguous();
  if (pairs && features % 2 == 1) rows = at::constant_pad_nd(rows, {0, 1});
  at::Tensor widened = biased ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({rows.size(0), outputs}, rows.options().dtype(at::kFloat));
  const float* b = biased ? widened.data_ptr<float>() : nullptr;
  std::vector<int64_t> sizes = input.sizes().vec();
  sizes.back() = outputs;
  if (dtype == at::kFloat) {
    linear_of_rows(rows, panels, outputs, b, out, float_tiles());
    return out.view(sizes);
  }
  at::Tensor rounded = at::empty({rows.size(0), outputs}, rows.options());
  linear_of_rows(rows, panels, outputs, b, out,
                 Tiles<at::BFloat16>{avx512::bfloat16_tiles.data(), avx512::Isa::LINEAR_TILE_ROWS},
                 rounded.data_ptr<at::BFloat16>());
  return rounded.view(sizes);
}

}  // namespace streamsink

TORCH_LIBRARY_FRAGMENT(streamsink, m) {
  m.def("linear(Tensor input, Tensor panels, int outputs, Tensor? bias) -> Tensor");
  m.def("has_bfloat16_dot() -> bool", &has_bfloat16_dot);
  m.def("instruction_set() -> str", &instruction_set);
}

TORCH_LIBRARY_IMPL(streamsink, CPU, m) { m.impl("linear", &streamsink::linear); }

#else
#error "the CPU kernels are for x86-64 CPUs"
#endif
