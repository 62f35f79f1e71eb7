// The vector operations the kernels are written in (linear_tiles.h, *_heads.h), for
// AVX-512: a chunk of 16 float32 lanes is one register. Included inside a namespace compiled for
// AVX-512 (see linear.cpp); vectors_avx2.h gives the same operations the same bits.

struct Isa {
  using Chunk = __m512;  // 16 float32 lanes
  using Tail = __mmask16;  // the lanes of a chunk that are read or written

  static constexpr int LINEAR_TILE_ROWS = 8;  // the input rows one pass over a panel serves
  static constexpr bool LINEAR_INPUTS_FIRST = false;  // a tile keeps the panel in registers
  static constexpr int MIX_CHUNKS = 4;        // the output chunks one pass over the values keeps
  static constexpr int MIX_GROUPS = 4;        // the query heads one pass over the values serves
  static constexpr int PREFILL_ROWS = 6;      // the query rows a prefill tile keeps in registers
  static constexpr int PREFILL_CHUNKS = 4;    // and the chunks of keys (or of value dims) of each

  static Tail tail(int64_t lanes) {
    return lanes >= 16 ? static_cast<Tail>(0xFFFF) : static_cast<Tail>((1u << lanes) - 1);
  }
  static Chunk zero() { return _mm512_setzero_ps(); }
  static Chunk broadcast(float value) { return _mm512_set1_ps(value); }
  static Chunk load(const float* from) { return _mm512_loadu_ps(from); }
  static Chunk load(Tail lanes, const float* from) { return _mm512_maskz_loadu_ps(lanes, from); }
  // bfloat16 widened exactly; the lanes not read are zero.
  static Chunk load(Tail lanes, const at::BFloat16* from) {
    return widen(_mm256_maskz_loadu_epi16(lanes, from));
  }
  // A whole chunk is read without a mask: on Zen 4 a masked load of 16-bit lanes took most of a
  // decode step's bfloat16 attention (16 rows of 1024 slots, a layer's outputs: 246 against 102
  // us).
  static Chunk load(const at::BFloat16* from) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from)));
  }
  static Chunk widen(__m256i bfloat16s) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bfloat16s), 16));
  }
  static void store(Tail lanes, float* to, Chunk chunk) { _mm512_mask_storeu_ps(to, lanes, chunk); }
  static Chunk add(Chunk a, Chunk b) { return _mm512_add_ps(a, b); }
  static Chunk mul(Chunk a, Chunk b) { return _mm512_mul_ps(a, b); }
  static Chunk fmadd(Chunk a, Chunk b, Chunk c) { return _mm512_fmadd_ps(a, b, c); }
  static Chunk sub(Chunk a, Chunk b) { return _mm512_sub_ps(a, b); }
  static Chunk max(Chunk a, Chunk b) { return _mm512_max_ps(a, b); }
  // to the nearest integer, ties to even
  static Chunk round(Chunk a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // 2^n for integers n in [-126, 127]
  static Chunk pow2(Chunk n) {
    __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
  }
  // y where x >= floor, else 0 (NaN too)
  static Chunk zero_below(Chunk x, float floor, Chunk y) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, broadcast(floor), _CMP_GE_OQ), y);
  }

  // The scores of a block of 16 keys: each key's 16 lanes of products come in (`add`), and
  // `store` writes out[l] = the sum of key l's lanes, for the keys l < count, each by one tree:
  // lane j and j + 8 first, then j and j + 4 of those, then 0 + 2 and 1 + 3, then the two. A
  // chunk is one register: the block keeps all 16 and sums them at the end.
  struct KeySums {
    Chunk sums[16];

    void add(int key, Chunk sum) { sums[key] = sum; }

    void store(int64_t count, float* out) const {
      __m512 halves[8];
      for (int i = 0; i < 8; ++i) {
        __m512 low = _mm512_shuffle_f32x4(sums[2 * i], sums[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0));
        __m512 high = _mm512_shuffle_f32x4(sums[2 * i], sums[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2));
        halves[i] = _mm512_add_ps(low, high);
      }
      __m512 quarters[4];
      for (int i = 0; i < 4; ++i) {
        __m512 low =
            _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0));
        __m512 high =
            _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1));
        quarters[i] = _mm512_add_ps(low, high);
      }
      __m512 pairs0 = _mm512_add_ps(_mm512_unpacklo_ps(quarters[0], quarters[1]),
                                    _mm512_unpackhi_ps(quarters[0], quarters[1]));
      __m512 pairs1 = _mm512_add_ps(_mm512_unpacklo_ps(quarters[2], quarters[3]),
                                    _mm512_unpackhi_ps(quarters[2], quarters[3]));
      __m512d wide0 = _mm512_castps_pd(pairs0), wide1 = _mm512_castps_pd(pairs1);
      __m512 lanes = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(wide0, wide1)),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(wide0, wide1)));
      // Lane 4q + e now holds key 4e + q.
      const __m512i by_key =
          _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
      Isa::store(tail(count), out, _mm512_permutexvar_ps(by_key, lanes));
    }
  };
};
