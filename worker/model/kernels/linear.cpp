// Linear layers on the CPU (see linear_kernel.py): out = input @ weight.T (+ bias), in float32.
//
// The weight is packed once into panels of 48 outputs, [panels, in features, 48], so that one
// step of the sum over the inputs reads 48 consecutive weights. A tile of up to 8 input rows
// keeps its 8 x 48 sums in registers: each input value is broadcast against the panel's three
// vectors. This is the form of the BLAS kernels (bound by the FMA units from about 16 rows on,
// by memory below), and it is also what makes a row's bits its own: every output sums its
// products in one order, input feature 0 first, whatever the tile, the row count, the other
// rows or the thread that computes it (threads split the panels, never the sum).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>

namespace {

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

constexpr int LANES = 16;
constexpr int PANEL_VECTORS = 3;
constexpr int PANEL = PANEL_VECTORS * LANES;  // the outputs of one panel
constexpr int TILE_ROWS = 8;                  // the input rows one pass over a panel serves

// out[m, 0..width) for the ROWS rows of `input`: each the sum over k, in order, of input[m, k]
// times panel[k, :], then its bias.
template <int ROWS>
AVX512 void tile(const float* input, int64_t features, const float* panel, const float* bias,
                 int64_t width, float* out, int64_t out_stride) {
  __m512 sums[ROWS][PANEL_VECTORS];
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < PANEL_VECTORS; ++v) sums[m][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < features; ++k) {
    __m512 weights[PANEL_VECTORS];
    for (int v = 0; v < PANEL_VECTORS; ++v)
      weights[v] = _mm512_loadu_ps(panel + k * PANEL + v * LANES);
    for (int m = 0; m < ROWS; ++m) {
      __m512 value = _mm512_set1_ps(input[m * features + k]);
      for (int v = 0; v < PANEL_VECTORS; ++v)
        sums[m][v] = _mm512_fmadd_ps(value, weights[v], sums[m][v]);
    }
  }
  for (int v = 0; v < PANEL_VECTORS && v * LANES < width; ++v) {
    int64_t left = width - v * LANES;
    __mmask16 lanes = left >= LANES ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    __m512 shift = bias ? _mm512_maskz_loadu_ps(lanes, bias + v * LANES) : _mm512_setzero_ps();
    for (int m = 0; m < ROWS; ++m)
      _mm512_mask_storeu_ps(out + m * out_stride + v * LANES, lanes,
                            bias ? _mm512_add_ps(sums[m][v], shift) : sums[m][v]);
  }
}

using Tile = void (*)(const float*, int64_t, const float*, const float*, int64_t, float*, int64_t);

template <int... ROWS>
constexpr std::array<Tile, sizeof...(ROWS)> tiles_for(std::integer_sequence<int, ROWS...>) {
  return {&tile<ROWS + 1>...};
}

constexpr auto TILES = tiles_for(std::make_integer_sequence<int, TILE_ROWS>());

// input [..., in features] float32; panels [panels, in features, 48] float32 (the weight
// [outputs, in features] packed, zero past its last output); bias [outputs] or none
// -> float32 [..., outputs].
at::Tensor linear(const at::Tensor& input, const at::Tensor& panels, int64_t outputs,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() >= 1,
              "input must be a float32 CPU tensor [..., in features]");
  int64_t features = input.size(-1);
  TORCH_CHECK(panels.device().is_cpu() && panels.scalar_type() == at::kFloat &&
                  panels.is_contiguous() && panels.dim() == 3 && panels.size(1) == features &&
                  panels.size(2) == PANEL && outputs > (panels.size(0) - 1) * PANEL &&
                  outputs <= panels.size(0) * PANEL,
              "panels must be contiguous float32 [panels, in features, 48] holding the outputs");
  bool biased = bias.has_value() && bias->defined();
  TORCH_CHECK(!biased || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                          bias->dim() == 1 && bias->size(0) == outputs),
              "bias must be contiguous float32 [outputs]");
  at::Tensor rows = input.reshape({-1, features}).contiguous();
  int64_t count = rows.size(0);
  at::Tensor out = at::empty({count, outputs}, rows.options());
  const float* x = rows.data_ptr<float>();
  const float* w = panels.data_ptr<float>();
  const float* b = biased ? bias->data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      int64_t first = p * PANEL, width = std::min<int64_t>(PANEL, outputs - first);
      for (int64_t m = 0; m < count; m += TILE_ROWS) {
        int64_t here = std::min<int64_t>(TILE_ROWS, count - m);
        TILES[here - 1](x + m * features, features, w + p * features * PANEL,
                        b ? b + first : nullptr, width, o + m * outputs + first, outputs);
      }
    }
  });
  std::vector<int64_t> sizes = input.sizes().vec();
  sizes.back() = outputs;
  return out.view(sizes);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(streamsink, m) {
  m.def("linear(Tensor input, Tensor panels, int outputs, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(streamsink, CPU, m) { m.impl("linear", &linear); }

#else
#error "the CPU kernels are for x86-64 CPUs"
#endif
