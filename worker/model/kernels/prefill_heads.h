// A task of prefill_attention.cpp, written once in Isa's vector operations (vectors_*.h) and
// compiled once per instruction set by attention_isas.h. Whatever the tiles, every result is
// summed in the order prefill_attention.cpp gives.

// e^x in float32 for x <= 0 (a score less its row's greatest), 0 below EXP_FLOOR: x = n ln 2 + r,
// n the integer nearest x / ln 2 and ln 2 in two parts, e^r by Cephes' polynomial, times 2^n.
inline Isa::Chunk exp_nonpositive(Isa::Chunk x) {
  Isa::Chunk kept = Isa::max(x, Isa::broadcast(EXP_FLOOR));  // -inf too: no NaN below
  Isa::Chunk n = Isa::round(Isa::mul(kept, Isa::broadcast(1.44269504088896341f)));
  Isa::Chunk r = Isa::fmadd(n, Isa::broadcast(-0.693359375f), kept);
  r = Isa::fmadd(n, Isa::broadcast(2.12194440e-4f), r);
  Isa::Chunk p = Isa::broadcast(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                  5.0000001201e-1f})
    p = Isa::fmadd(p, r, Isa::broadcast(c));
  Isa::Chunk e = Isa::add(Isa::fmadd(p, Isa::mul(r, r), r), Isa::broadcast(1.0f));
  return Isa::zero_below(x, EXP_FLOOR, Isa::mul(e, Isa::pow2(n)));
}

// scores[r, c * 16 + l] for ROWS rows of `queries` [rows, dims] and CHUNKS blocks of 16 keys
// packed [block, dims, 16]: the sum over the dims, in order, of one fused multiply-add each,
// plus the row's mask (masks[r], where not null) for the first `count` keys; -inf past them.
// tops[r] keeps the greatest of each lane of the row's scores.
template <int ROWS, int CHUNKS, typename M>
void score_tile(const float* queries, int64_t dims, const float* packed, const M* const* masks,
                int64_t count, float* scores, int64_t stride, Isa::Chunk* tops) {
  Isa::Chunk sums[ROWS][CHUNKS];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < CHUNKS; ++c) sums[r][c] = Isa::zero();
  for (int64_t d = 0; d < dims; ++d) {
    Isa::Chunk keys[CHUNKS];
    for (int c = 0; c < CHUNKS; ++c) keys[c] = Isa::load(packed + (c * dims + d) * 16);
    for (int r = 0; r < ROWS; ++r) {
      Isa::Chunk query = Isa::broadcast(queries[r * dims + d]);
      for (int c = 0; c < CHUNKS; ++c) sums[r][c] = Isa::fmadd(query, keys[c], sums[r][c]);
    }
  }
  const Isa::Chunk no_key = Isa::broadcast(-std::numeric_limits<float>::infinity());
  for (int c = 0; c < CHUNKS; ++c) {
    int64_t here = std::min<int64_t>(count - c * 16, 16);
    Isa::Tail lanes = Isa::tail(here);
    for (int r = 0; r < ROWS; ++r) {
      float* out = scores + r * stride + c * 16;
      Isa::Chunk score =
          Isa::add(sums[r][c], masks[r] ? Isa::load(lanes, masks[r] + c * 16) : Isa::zero());
      if (here < 16) {  // the lanes past the last key read back as -inf
        Isa::store(Isa::tail(16), out, no_key);
        Isa::store(lanes, out, score);
        score = Isa::load(out);
      } else {
        Isa::store(lanes, out, score);
      }
      tops[r] = Isa::max(tops[r], score);
    }
  }
}

// score_tile over `here` (1 to PREFILL_CHUNKS) blocks.
template <typename M, int... HERE>
void score_blocks(int64_t here, const float* queries, int64_t dims, const float* packed,
                  const M* const* masks, int64_t count, float* scores, int64_t stride,
                  Isa::Chunk* tops, std::integer_sequence<int, HERE...>) {
  using Tile = void (*)(const float*, int64_t, const float*, const M* const*, int64_t, float*,
                        int64_t, Isa::Chunk*);
  static constexpr Tile tiles[] = {&score_tile<Isa::PREFILL_ROWS, HERE + 1, M>...};
  tiles[here - 1](queries, dims, packed, masks, count, scores, stride, tops);
}

// out[r, chunks c] += the sum over `count` keys, in order, of probabilities[r, key] times
// values[key, chunk c], for ROWS rows and CHUNKS chunks of 16 dims (the last through `last`
// where it is PARTIAL); `values` and `out` start at the chunks' first dim.
template <int ROWS, int CHUNKS, bool PARTIAL>
void mix_tile(const float* probabilities, int64_t stride, int64_t count, const float* values,
              int64_t dims, Isa::Tail last, float* out) {
  Isa::Chunk sums[ROWS][CHUNKS];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < CHUNKS; ++c) sums[r][c] = load_chunk<CHUNKS, PARTIAL>(c, out + r * dims, last);
  for (int64_t key = 0; key < count; ++key) {
    Isa::Chunk value[CHUNKS];
    for (int c = 0; c < CHUNKS; ++c) value[c] = load_chunk<CHUNKS, PARTIAL>(c, values + key * dims, last);
    for (int r = 0; r < ROWS; ++r) {
      Isa::Chunk p = Isa::broadcast(probabilities[r * stride + key]);
      for (int c = 0; c < CHUNKS; ++c) sums[r][c] = Isa::fmadd(p, value[c], sums[r][c]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < CHUNKS; ++c)
      Isa::store(PARTIAL && c == CHUNKS - 1 ? last : Isa::tail(16), out + r * dims + c * 16,
                 sums[r][c]);
}

// mix_tile over every dim, PREFILL_CHUNKS chunks at a time.
template <int... HERE>
void mix_dims(const float* probabilities, int64_t stride, int64_t count, const float* values,
              int64_t dims, float* out, std::integer_sequence<int, HERE...>) {
  constexpr int ROWS = Isa::PREFILL_ROWS;
  using Tile = void (*)(const float*, int64_t, int64_t, const float*, int64_t, Isa::Tail, float*);
  static constexpr Tile whole[] = {&mix_tile<ROWS, HERE + 1, false>...};
  static constexpr Tile partial[] = {&mix_tile<ROWS, HERE + 1, true>...};
  int64_t chunks = (dims + 15) / 16;
  for (int64_t c = 0; c < chunks; c += Isa::PREFILL_CHUNKS) {
    int64_t here = std::min<int64_t>(Isa::PREFILL_CHUNKS, chunks - c);
    bool short_last = c + here == chunks && dims % 16;
    (short_last ? partial : whole)[here - 1](probabilities, stride, count, values + c * 16, dims,
                                             Isa::tail(dims - (chunks - 1) * 16), out + c * 16);
  }
}

// A row's scores over its live blocks of 16 keys, `top` the greatest of each lane: each
// becomes exp_nonpositive(score - the row's greatest); returns 1 / their sum (lane l of 16
// summing keys l, l + 16, ... in order, then the lanes in order), or 0 where every key is masked.
inline float softmax_row(float* scores, Isa::Chunk top, const std::vector<bool>& live) {
  float lanes[16];
  Isa::store(Isa::tail(16), lanes, top);
  float greatest = *std::max_element(lanes, lanes + 16);
  if (!(greatest > MASKED)) greatest = 0;  // every key masked: every probability 0
  Isa::Chunk shift = Isa::broadcast(greatest), total = Isa::zero();
  for (size_t k = 0; k < live.size(); ++k) {
    if (!live[k]) continue;
    Isa::Chunk p = exp_nonpositive(Isa::sub(Isa::load(scores + k * 16), shift));
    Isa::store(Isa::tail(16), scores + k * 16, p);
    total = Isa::add(total, p);
  }
  Isa::store(Isa::tail(16), lanes, total);
  float sum = 0;
  for (float lane : lanes) sum += lane;
  return sum > 0 ? 1 / sum : 0;
}

// One task: softmax(queries · keys + mask) · values for its rows (query i, group g: row
// i * groups + g), written to out, a tile of rows at a time: its scores stay in the cache.
// Runs of live blocks go through the tiles PREFILL_CHUNKS blocks at a time.
template <typename T, typename M>
void attend_block(const Block<T, M>& b) {
  constexpr int ROWS = Isa::PREFILL_ROWS;
  const int64_t rows = b.queries * b.groups, padded = (rows + ROWS - 1) / ROWS * ROWS;
  const int64_t dims = b.dims, blocks = (b.span + 15) / 16, width = blocks * 16;
  thread_local std::vector<float> queries, scores, sums;  // reused task after task
  thread_local std::vector<bool> live;
  queries.assign(padded * dims, 0.0f);  // rows past the last are 0: their results go nowhere
  scores.resize(ROWS * width);
  sums.resize(ROWS * dims);
  for (int64_t r = 0; r < rows; ++r) {
    const T* query = b.query + r / b.groups * b.query_stride + r % b.groups * b.head_stride;
    for (int64_t d = 0; d < dims; ++d)
      queries[r * dims + d] = static_cast<float>(query[d]) * b.scale;
  }
  live.resize(blocks);
  for (int64_t k = 0; k < blocks; ++k) live[k] = b.live(k * 16);
  for (int64_t t = 0; t < padded; t += ROWS) {
    const M* masks[ROWS];
    Isa::Chunk tops[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      masks[r] = t + r < rows && b.mask ? b.mask_of((t + r) / b.groups) : nullptr;
      tops[r] = Isa::broadcast(-std::numeric_limits<float>::infinity());
    }
    for (int64_t k = 0; k < blocks;) {
      int64_t here = 0;
      while (here < Isa::PREFILL_CHUNKS && k + here < blocks && live[k + here]) ++here;
      if (here == 0) {
        ++k;
        continue;
      }
      const M* at[ROWS];
      for (int r = 0; r < ROWS; ++r) at[r] = masks[r] ? masks[r] + k * 16 : nullptr;
      score_blocks<M>(here, queries.data() + t * dims, dims, b.packed + k * 16 * dims, at,
                      b.span - k * 16, scores.data() + k * 16, width, tops,
                      std::make_integer_sequence<int, Isa::PREFILL_CHUNKS>());
      k += here;
    }
    float inverse[ROWS];
    for (int r = 0; r < ROWS; ++r) inverse[r] = softmax_row(scores.data() + r * width, tops[r], live);
    std::fill(sums.begin(), sums.end(), 0.0f);
    for (int64_t k = 0; k < blocks;) {  // each run of live blocks
      int64_t end = k;
      while (end < blocks && live[end]) ++end;
      if (end > k) {
        int64_t count = std::min(end * 16, b.span) - k * 16;
        mix_dims(scores.data() + k * 16, width, count, b.values + k * 16 * dims, dims, sums.data(),
                 std::make_integer_sequence<int, Isa::PREFILL_CHUNKS>());
      }
      k = end + 1;
    }
    for (int64_t r = t; r < std::min(t + ROWS, rows); ++r) {
      float* out = b.out + r / b.groups * b.out_stride + r % b.groups * dims;
      Isa::Chunk scale = Isa::broadcast(inverse[r - t]);
      for (int64_t c = 0; c < dims; c += 16) {
        Isa::Tail lanes = Isa::tail(dims - c);
        Isa::store(lanes, out + c, Isa::mul(Isa::load(lanes, sums.data() + (r - t) * dims + c), scale));
      }
    }
  }
}
