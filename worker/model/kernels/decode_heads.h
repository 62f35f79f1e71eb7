// The per-(row, kv head) work of decode_attention.cpp, written once in Isa's vector operations
// (vectors_*.h) and compiled once per instruction set by attention_isas.h.

// A query's products with a key, summed chunk by chunk of 16 dims into 16 lanes.
template <int CHUNKS, bool PARTIAL, typename T>
inline Isa::Chunk products(const Isa::Chunk* query, const T* key, Isa::Tail tail) {
  Isa::Chunk sum = Isa::mul(query[0], load_chunk<CHUNKS, PARTIAL>(0, key, tail));
  for (int c = 1; c < CHUNKS; ++c)
    sum = Isa::fmadd(query[c], load_chunk<CHUNKS, PARTIAL>(c, key, tail), sum);
  return sum;
}

// One (row, kv head), or a block of its keys: scores [groups, span] (each group's `out_stride`
// apart) of its queries [2 frames, groups, dims] against its keys [span, dims], each key taking
// the query of its frame (frame 0 where `head` is set); PARTIAL where dims is not a multiple of
// 16. A key's score does not depend on the others: a block starting at a multiple of 16 gives
// its keys the bits the whole gives them.
template <int CHUNKS, bool PARTIAL, typename T>
void scores_of_head(const T* queries, int64_t groups, int64_t dims, const T* keys, int64_t span,
                    const bool* head, float* out, int64_t out_stride) {
  const Isa::Tail tail = Isa::tail(dims - (CHUNKS - 1) * 16);
  for (int64_t first = 0; first < span; first += 16) {
    int64_t count = std::min<int64_t>(16, span - first);
    bool frame = head[first], mixed = false;
    for (int64_t l = 1; l < count; ++l) mixed |= head[first + l] != frame;
    const T* block = keys + first * dims;
    for (int64_t g = 0; g < groups; ++g) {
      Isa::Chunk query[2][CHUNKS];
      for (int f = 0; f < 2; ++f)
        for (int c = 0; c < CHUNKS; ++c)
          query[f][c] =
              load_chunk<CHUNKS, PARTIAL>(c, queries + (f * groups + g) * dims, tail);
      typename Isa::KeySums sums;
#pragma GCC unroll 16
      for (int l = 0; l < 16; ++l) {
        int64_t key = std::min<int64_t>(l, count - 1);  // a short last block repeats its last
        int f = mixed ? (head[first + key] ? 0 : 1) : (frame ? 0 : 1);
        sums.add(l, products<CHUNKS, PARTIAL>(query[f], block + key * dims, tail));
      }
      sums.store(count, out + g * out_stride + first);
    }
  }
}

// The kernel for head dims `dims`.
template <typename T, int... CHUNKS>
ScoresOfHead<T> scores_for(int64_t dims, std::integer_sequence<int, CHUNKS...>) {
  ScoresOfHead<T> whole[] = {&scores_of_head<CHUNKS + 1, false, T>...};
  ScoresOfHead<T> partial[] = {&scores_of_head<CHUNKS + 1, true, T>...};
  return (dims % 16 ? partial : whole)[(dims + 15) / 16 - 1];
}

// GROUPS query heads' outputs over CHUNKS chunks of 16 dims from `offset`: the sum over the
// keys, in slot order, of each key's probability times its value.
template <int GROUPS, int CHUNKS, bool PARTIAL, typename T>
void mix_block(const float* probabilities, int64_t span, const T* values, int64_t dims,
               int64_t offset, Isa::Tail last, float* out) {
  Isa::Chunk sums[GROUPS][CHUNKS];
  for (int g = 0; g < GROUPS; ++g)
    for (int c = 0; c < CHUNKS; ++c) sums[g][c] = Isa::zero();
  for (int64_t key = 0; key < span; ++key) {
    const T* value = values + key * dims + offset;
    Isa::Chunk chunk[CHUNKS];
    for (int c = 0; c < CHUNKS; ++c)
      chunk[c] = load_chunk<CHUNKS, PARTIAL>(c, value, last);
    for (int g = 0; g < GROUPS; ++g) {
      Isa::Chunk p = Isa::broadcast(probabilities[g * span + key]);
      for (int c = 0; c < CHUNKS; ++c) sums[g][c] = Isa::fmadd(p, chunk[c], sums[g][c]);
    }
  }
  for (int g = 0; g < GROUPS; ++g)
    for (int c = 0; c < CHUNKS; ++c)
      Isa::store(c == CHUNKS - 1 ? last : Isa::tail(16), out + g * dims + offset + c * 16,
                 sums[g][c]);
}

template <int GROUPS, typename T, int... CHUNKS>
void mix_chunks(int64_t here, int64_t last_lanes, const float* probabilities, int64_t span,
                const T* values, int64_t dims, int64_t offset, float* out,
                std::integer_sequence<int, CHUNKS...>) {
  using Block = void (*)(const float*, int64_t, const T*, int64_t, int64_t, Isa::Tail, float*);
  Block whole[] = {&mix_block<GROUPS, CHUNKS + 1, false, T>...};
  Block partial[] = {&mix_block<GROUPS, CHUNKS + 1, true, T>...};
  (last_lanes < 16 ? partial : whole)[here - 1](probabilities, span, values, dims, offset,
                                                Isa::tail(last_lanes), out);
}

template <int GROUPS, typename T>
void mix_groups(const float* probabilities, int64_t span, const T* values, int64_t dims,
                float* out) {
  int64_t chunks = (dims + 15) / 16;
  for (int64_t c = 0; c < chunks; c += Isa::MIX_CHUNKS) {
    int64_t here = std::min<int64_t>(Isa::MIX_CHUNKS, chunks - c);
    int64_t last_lanes = c + here == chunks ? dims - (chunks - 1) * 16 : 16;
    mix_chunks<GROUPS>(here, last_lanes, probabilities, span, values, dims, c * 16, out,
                       std::make_integer_sequence<int, Isa::MIX_CHUNKS>());
  }
}

// One (row, kv head): outputs [groups, dims] from probabilities [groups, span] and values
// [span, dims].
template <typename T, int... GROUPS>
void mix_of_head(const float* probabilities, int64_t groups, const T* values, int64_t span,
                 int64_t dims, float* out, std::integer_sequence<int, GROUPS...>) {
  using Groups = void (*)(const float*, int64_t, const T*, int64_t, float*);
  Groups table[] = {&mix_groups<GROUPS + 1, T>...};
  for (int64_t g = 0; g < groups; g += Isa::MIX_GROUPS) {
    int64_t here = std::min<int64_t>(Isa::MIX_GROUPS, groups - g);
    table[here - 1](probabilities + g * span, span, values, dims, out + g * dims);
  }
}

template <typename T>
void mix_of_head(const float* probabilities, int64_t groups, const T* values, int64_t span,
                 int64_t dims, float* out) {
  mix_of_head(probabilities, groups, values, span, dims, out,
              std::make_integer_sequence<int, Isa::MIX_GROUPS>());
}
