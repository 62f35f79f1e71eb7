// The float32 tiles of linear.cpp, written once in Isa's vector operations (vectors_*.h) and
// included once per instruction set, inside its namespace.
//
// A tile computes ROWS input rows against one panel ([in features, 48]), its ROWS x 3 chunks of
// sums in registers. Every output sums its products in one order, input feature 0 first, one
// fused multiply-add each, then adds its bias: the same bits whatever the tile's rows or the
// chunk's registers.

// out[m, 0..width) = sums[m] + bias, for the ROWS rows of a tile.
template <int ROWS>
inline void store(const Isa::Chunk (&sums)[ROWS][CHUNKS], const float* bias, int64_t width,
                  float* out, int64_t out_stride) {
  for (int c = 0; c < CHUNKS && c * 16 < width; ++c) {
    Isa::Tail lanes = Isa::tail(width - c * 16);
    Isa::Chunk shift = bias ? Isa::load(lanes, bias + c * 16) : Isa::zero();
    for (int m = 0; m < ROWS; ++m)
      Isa::store(lanes, out + m * out_stride + c * 16,
                 bias ? Isa::add(sums[m][c], shift) : sums[m][c]);
  }
}

// out[m, 0..width) for the ROWS rows of `input` [ROWS, features]: the sum over k, in order, of
// input[m, k] times panel[k, 0..width), then the bias.
template <int ROWS>
void tile(const float* input, int64_t features, const float* panel, const float* bias,
          int64_t width, float* out, int64_t out_stride) {
  Isa::Chunk sums[ROWS][CHUNKS];
  for (int m = 0; m < ROWS; ++m)
    for (int c = 0; c < CHUNKS; ++c) sums[m][c] = Isa::zero();
  for (int64_t k = 0; k < features; ++k) {
    if constexpr (Isa::LINEAR_INPUTS_FIRST) {  // the inputs in registers, a weight at a time
      Isa::Chunk values[ROWS];
      for (int m = 0; m < ROWS; ++m) values[m] = Isa::broadcast(input[m * features + k]);
      for (int c = 0; c < CHUNKS; ++c) {
        Isa::Chunk weight = Isa::load(panel + k * PANEL + c * 16);
        for (int m = 0; m < ROWS; ++m) sums[m][c] = Isa::fmadd(values[m], weight, sums[m][c]);
      }
    } else {  // the weights in registers, an input at a time
      Isa::Chunk weights[CHUNKS];
      for (int c = 0; c < CHUNKS; ++c) weights[c] = Isa::load(panel + k * PANEL + c * 16);
      for (int m = 0; m < ROWS; ++m) {
        Isa::Chunk value = Isa::broadcast(input[m * features + k]);
        for (int c = 0; c < CHUNKS; ++c) sums[m][c] = Isa::fmadd(value, weights[c], sums[m][c]);
      }
    }
  }
  store<ROWS>(sums, bias, width, out, out_stride);
}

template <int... ROWS>
constexpr std::array<Tile<float>, sizeof...(ROWS)> tiles_for(std::integer_sequence<int, ROWS...>) {
  return {&tile<ROWS + 1>...};
}

// The tiles of 1 to LINEAR_TILE_ROWS rows.
constexpr auto float_tiles =
    tiles_for(std::make_integer_sequence<int, Isa::LINEAR_TILE_ROWS>());
