// The vector operations the kernels are written in (linear_tiles.h, *_heads.h), for AVX2
// with FMA: a chunk of 16 float32 lanes is two registers of 8. Every lane sees the operations it
// sees in vectors_avx512.h, and KeySums adds by the same tree, so each result has the same bits
// on either CPU. Included inside a
// namespace compiled for AVX2 and FMA (see linear.cpp).

struct Isa {
  struct Chunk {
    __m256 low, high;  // lanes 0-7, 8-15
  };
  struct Tail {
    __m256i low, high;  // all ones in a lane read or written
  };

  // A pass reads whole panels and whole value rows: read in strides (part of each row a pass),
  // memory comes at its latency, not its bandwidth. Of the 16 registers, a tile keeps 12 sums,
  // its 2 inputs and the weight it multiplies.
  static constexpr int LINEAR_TILE_ROWS = 2;
  static constexpr bool LINEAR_INPUTS_FIRST = true;
  static constexpr int MIX_CHUNKS = 4;
  static constexpr int MIX_GROUPS = 1;
  static constexpr int PREFILL_ROWS = 2;
  static constexpr int PREFILL_CHUNKS = 2;

  static Tail tail(int64_t lanes) {
    const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i count = _mm256_set1_epi32(static_cast<int>(lanes));
    return {_mm256_cmpgt_epi32(count, index),
            _mm256_cmpgt_epi32(count, _mm256_add_epi32(index, _mm256_set1_epi32(8)))};
  }
  static Chunk zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static Chunk broadcast(float value) { return {_mm256_set1_ps(value), _mm256_set1_ps(value)}; }
  static Chunk load(const float* from) { return {_mm256_loadu_ps(from), _mm256_loadu_ps(from + 8)}; }
  static Chunk load(Tail lanes, const float* from) {
    return {_mm256_maskload_ps(from, lanes.low), _mm256_maskload_ps(from + 8, lanes.high)};
  }
  // bfloat16 widened exactly.
  static __m256 widen(__m128i halves) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
  }
  static Chunk load(const at::BFloat16* from) {
    __m256i both = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from));
    return {widen(_mm256_castsi256_si128(both)), widen(_mm256_extracti128_si256(both, 1))};
  }
  // AVX2 has no masked load of 16-bit lanes: the lanes read are copied out first; the lanes not
  // read are zero.
  static Chunk load(Tail lanes, const at::BFloat16* from) {
    alignas(32) int32_t read[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(read), lanes.low);
    _mm256_store_si256(reinterpret_cast<__m256i*>(read + 8), lanes.high);
    alignas(32) at::BFloat16 copy[16] = {};
    for (int l = 0; l < 16 && read[l]; ++l) copy[l] = from[l];
    return load(copy);
  }
  static void store(Tail lanes, float* to, Chunk chunk) {
    _mm256_maskstore_ps(to, lanes.low, chunk.low);
    _mm256_maskstore_ps(to + 8, lanes.high, chunk.high);
  }
  static Chunk add(Chunk a, Chunk b) {
    return {_mm256_add_ps(a.low, b.low), _mm256_add_ps(a.high, b.high)};
  }
  static Chunk mul(Chunk a, Chunk b) {
    return {_mm256_mul_ps(a.low, b.low), _mm256_mul_ps(a.high, b.high)};
  }
  static Chunk fmadd(Chunk a, Chunk b, Chunk c) {
    return {_mm256_fmadd_ps(a.low, b.low, c.low), _mm256_fmadd_ps(a.high, b.high, c.high)};
  }
  static Chunk sub(Chunk a, Chunk b) {
    return {_mm256_sub_ps(a.low, b.low), _mm256_sub_ps(a.high, b.high)};
  }
  static Chunk max(Chunk a, Chunk b) {
    return {_mm256_max_ps(a.low, b.low), _mm256_max_ps(a.high, b.high)};
  }
  static Chunk round(Chunk a) {
    constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return {_mm256_round_ps(a.low, nearest), _mm256_round_ps(a.high, nearest)};
  }
  static __m256 pow2(__m256 n) {
    __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  }
  static Chunk pow2(Chunk n) { return {pow2(n.low), pow2(n.high)}; }
  static Chunk zero_below(Chunk x, float floor, Chunk y) {
    __m256 at = _mm256_set1_ps(floor);
    return {_mm256_and_ps(_mm256_cmp_ps(x.low, at, _CMP_GE_OQ), y.low),
            _mm256_and_ps(_mm256_cmp_ps(x.high, at, _CMP_GE_OQ), y.high)};
  }

  // vectors_avx512.h's KeySums, by the same tree: lane j + lane j + 8, then j + j + 4 of those
  // (T0..T3), then T0 + T2 and T1 + T3, then the two; here eight keys to a register at each
  // level. A chunk is two of the 16 registers, so the block cannot keep 16 keys' lanes: each
  // key goes into the tree as it comes (`add`, given its key as a constant), and each level
  // keeps one register waiting for its partner.
  struct KeySums {
    __m256 eighths, quarters, pairs;  // the waiting halves of each level
    __m256 keys[2];                   // keys 0-7 and 8-15, done

    void add(int key, Chunk sum) {
      __m256 eighth = _mm256_add_ps(sum.low, sum.high);  // lane j + lane j + 8
      if (key % 2 == 0) {
        eighths = eighth;
        return;
      }
      // keys key - 1 (lanes 0-3) and key (4-7): T0..T3
      __m256 quarter = _mm256_add_ps(_mm256_permute2f128_ps(eighths, eighth, 0x20),
                                     _mm256_permute2f128_ps(eighths, eighth, 0x31));
      if (key % 4 == 1) {
        quarters = quarter;
        return;
      }
      // T0 + T2, T1 + T3 of keys key - 3, key - 1 (lanes 0-3), key - 2, key (4-7)
      __m256 pair = _mm256_add_ps(_mm256_unpacklo_ps(quarters, quarter),
                                  _mm256_unpackhi_ps(quarters, quarter));
      if (key % 8 == 3) {
        pairs = pair;
        return;
      }
      __m256d a = _mm256_castps_pd(pairs), b = _mm256_castps_pd(pair);
      __m256 total = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
                                   _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
      // Lane 4h + e of total holds key 8 (key / 8) + 2e + h.
      const __m256i by_key = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      keys[key / 8] = _mm256_permutevar8x32_ps(total, by_key);
    }

    void store(int64_t count, float* out) const { Isa::store(tail(count), out, {keys[0], keys[1]}); }
  };
};
