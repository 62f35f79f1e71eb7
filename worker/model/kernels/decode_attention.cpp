// The two matmuls of a batched decode step's attention (see decode_kernel.py), for the CPU.
//
// A decode step's attention reads every row's keys and values once for one query per head:
// matrix-vector work, bound by memory. MKL's batched GEMM reads them at a third of the memory's
// speed on CPUs it does not tune for, so these kernels read each (row, kv head) as one stream
// with AVX-512 and keep that head's few queries in registers. Caches in float32 or bfloat16
// (widened to float32 exactly as they are read); every sum is in float32.
//
// A row's result depends on nothing but the row: each (row, kv head) is computed whole by one
// thread, each score sums its products in one fixed order (a head dim in chunks of 16 lanes,
// then one tree across the lanes, the same for every key), and each output sums over the keys
// in slot order. So neither the batch nor the thread count changes a bit.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>

namespace {

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

constexpr int LANES = 16;
constexpr int MAX_CHUNKS = 16;  // head dims up to 256
constexpr int MIX_CHUNKS = 4;   // the output chunks one pass over the values keeps
constexpr int MIX_GROUPS = 4;   // the query heads one pass over the values serves

// The mask of a head dim's last chunk of 16 lanes.
__mmask16 tail_mask(int64_t dims) {
  int64_t rest = dims % LANES;
  return rest == 0 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rest) - 1);
}

// 16 lanes of float32 from `from`, the masked-off lanes zero: bfloat16 widened exactly.
AVX512 inline __m512 load(__mmask16 lanes, const float* from) {
  return _mm512_maskz_loadu_ps(lanes, from);
}

AVX512 inline __m512 load(__mmask16 lanes, const at::BFloat16* from) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, from));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// The 16 lane sums of sums[0..15], in one vector (key l at lane l), by one tree for every key:
// halves of 256 bits, then of 128, then pairs of lanes, then lanes.
AVX512 __m512 lane_sums(const __m512* sums) {
  __m512 halves[8];
  for (int i = 0; i < 8; ++i) {
    __m512 low = _mm512_shuffle_f32x4(sums[2 * i], sums[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0));
    __m512 high = _mm512_shuffle_f32x4(sums[2 * i], sums[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2));
    halves[i] = _mm512_add_ps(low, high);
  }
  __m512 quarters[4];
  for (int i = 0; i < 4; ++i) {
    __m512 low = _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0));
    __m512 high = _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1));
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
  const __m512i by_key = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(by_key, lanes);
}

// A query's products with a key, summed chunk by chunk into 16 lanes.
template <int CHUNKS, typename T>
AVX512 __m512 products(const __m512* query, const T* key, __mmask16 tail) {
  __m512 sum = _mm512_mul_ps(query[0], load(CHUNKS == 1 ? tail : 0xFFFF, key));
  for (int c = 1; c < CHUNKS; ++c) {
    __mmask16 lanes = c == CHUNKS - 1 ? tail : static_cast<__mmask16>(0xFFFF);
    sum = _mm512_fmadd_ps(query[c], load(lanes, key + c * LANES), sum);
  }
  return sum;
}

// One (row, kv head): scores [groups, span] of its queries [2 frames, groups, dims] against its
// keys [span, dims], each key taking the query of its frame (frame 0 where `head` is set).
template <int CHUNKS, typename T>
AVX512 void scores_of_head(const T* queries, int64_t groups, int64_t dims, const T* keys,
                           int64_t span, const bool* head, float* out) {
  const __mmask16 tail = tail_mask(dims);
  for (int64_t first = 0; first < span; first += LANES) {
    int64_t count = std::min<int64_t>(LANES, span - first);
    bool frame = head[first], mixed = false;
    for (int64_t l = 1; l < count; ++l) mixed |= head[first + l] != frame;
    const T* block = keys + first * dims;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 query[2][CHUNKS];
      for (int f = 0; f < 2; ++f)
        for (int c = 0; c < CHUNKS; ++c)
          query[f][c] = load(c == CHUNKS - 1 ? tail : 0xFFFF,
                             queries + (f * groups + g) * dims + c * LANES);
      __m512 sums[LANES];
      for (int l = 0; l < LANES; ++l) {
        int64_t key = std::min<int64_t>(l, count - 1);  // a short last block repeats its last
        int f = mixed ? (head[first + key] ? 0 : 1) : (frame ? 0 : 1);
        sums[l] = products<CHUNKS>(query[f], block + key * dims, tail);
      }
      _mm512_mask_storeu_ps(out + g * span + first, static_cast<__mmask16>((1u << count) - 1),
                            lane_sums(sums));
    }
  }
}

// GROUPS query heads' outputs over CHUNKS chunks of dims from `offset`: the sum over the keys,
// in slot order, of each key's probability times its value.
template <int GROUPS, int CHUNKS, typename T>
AVX512 void mix_block(const float* probabilities, int64_t span, const T* values,
                      int64_t dims, int64_t offset, __mmask16 last, float* out) {
  __m512 sums[GROUPS][CHUNKS];
  for (int g = 0; g < GROUPS; ++g)
    for (int c = 0; c < CHUNKS; ++c) sums[g][c] = _mm512_setzero_ps();
  for (int64_t key = 0; key < span; ++key) {
    const T* value = values + key * dims + offset;
    __m512 chunk[CHUNKS];
    for (int c = 0; c < CHUNKS; ++c)
      chunk[c] = load(c == CHUNKS - 1 ? last : 0xFFFF, value + c * LANES);
    for (int g = 0; g < GROUPS; ++g) {
      __m512 p = _mm512_set1_ps(probabilities[g * span + key]);
      for (int c = 0; c < CHUNKS; ++c) sums[g][c] = _mm512_fmadd_ps(p, chunk[c], sums[g][c]);
    }
  }
  for (int g = 0; g < GROUPS; ++g)
    for (int c = 0; c < CHUNKS; ++c)
      _mm512_mask_storeu_ps(out + g * dims + offset + c * LANES,
                            c == CHUNKS - 1 ? last : static_cast<__mmask16>(0xFFFF), sums[g][c]);
}

template <int GROUPS, typename T>
AVX512 void mix_groups(const float* probabilities, int64_t span, const T* values,
                       int64_t dims, float* out) {
  int64_t chunks = (dims + LANES - 1) / LANES;
  for (int64_t c = 0; c < chunks; c += MIX_CHUNKS) {
    int64_t offset = c * LANES;
    int64_t here = std::min<int64_t>(MIX_CHUNKS, chunks - c);
    __mmask16 last = c + here == chunks ? tail_mask(dims) : static_cast<__mmask16>(0xFFFF);
    switch (here) {
      case 1: mix_block<GROUPS, 1>(probabilities, span, values, dims, offset, last, out); break;
      case 2: mix_block<GROUPS, 2>(probabilities, span, values, dims, offset, last, out); break;
      case 3: mix_block<GROUPS, 3>(probabilities, span, values, dims, offset, last, out); break;
      default: mix_block<GROUPS, 4>(probabilities, span, values, dims, offset, last, out);
    }
  }
}

// One (row, kv head): outputs [groups, dims] from probabilities [groups, span] and values
// [span, dims].
template <typename T>
AVX512 void mix_of_head(const float* probabilities, int64_t groups, const T* values,
                        int64_t span, int64_t dims, float* out) {
  int64_t g = 0;
  for (; g + MIX_GROUPS <= groups; g += MIX_GROUPS)
    mix_groups<MIX_GROUPS>(probabilities + g * span, span, values, dims, out + g * dims);
  const float* rest = probabilities + g * span;
  switch (groups - g) {
    case 3: mix_groups<3>(rest, span, values, dims, out + g * dims); break;
    case 2: mix_groups<2>(rest, span, values, dims, out + g * dims); break;
    case 1: mix_groups<1>(rest, span, values, dims, out + g * dims); break;
    default: break;
  }
}

template <typename T>
using ScoresOfHead = void (*)(const T*, int64_t, int64_t, const T*, int64_t, const bool*, float*);

template <typename T, int... CHUNKS>
ScoresOfHead<T> scores_for(int64_t chunks, std::integer_sequence<int, CHUNKS...>) {
  ScoresOfHead<T> table[] = {&scores_of_head<CHUNKS + 1, T>...};
  return table[chunks - 1];
}

void check_kv(const at::Tensor& kv, const char* name) {
  TORCH_CHECK(kv.device().is_cpu() && kv.dim() == 4 &&
                  (kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kBFloat16),
              name, " must be a float32 or bfloat16 CPU tensor [rows, kv heads, keys, dims]");
  TORCH_CHECK(kv.stride(3) == 1 && kv.stride(2) == kv.size(3),
              name, ": each head's keys must lie one after another");
  TORCH_CHECK(kv.size(3) <= MAX_CHUNKS * LANES, name, ": head dims up to 256");
}

// fn(i, row, kv head) for the i-th (row, kv head) of `kv` [rows, kv heads, ...], each on one of
// torch's threads from start to end: what makes a row's bits its own.
template <typename F>
void for_each_head(const at::Tensor& kv, const F& fn) {
  int64_t heads = kv.size(1);
  at::parallel_for(0, kv.size(0) * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i, i / heads, i % heads);
  });
}

template <typename T>
void scores_of_rows(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& head,
                    at::Tensor& out) {
  int64_t span = keys.size(2), dims = keys.size(3), groups = queries.size(3);
  ScoresOfHead<T> kernel =
      scores_for<T>((dims + LANES - 1) / LANES, std::make_integer_sequence<int, MAX_CHUNKS>());
  const T* q = queries.data_ptr<T>();
  const T* k = keys.data_ptr<T>();
  const bool* h = head.data_ptr<bool>();
  float* o = out.data_ptr<float>();
  for_each_head(keys, [&](int64_t i, int64_t row, int64_t kv_head) {
    kernel(q + i * 2 * groups * dims, groups, dims,
           k + row * keys.stride(0) + kv_head * keys.stride(1), span, h + row * head.stride(0),
           o + i * groups * span);
  });
}

// queries [rows, kv heads, 2 frames, groups, dims] and keys [rows, kv heads, span, dims] of one
// dtype; head [rows, span], bool: the slots whose keys take frame 0. -> float32 scores [rows,
// kv heads, groups, span].
at::Tensor decode_scores(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& head) {
  check_kv(keys, "keys");
  int64_t rows = keys.size(0), kv = keys.size(1), span = keys.size(2), dims = keys.size(3);
  TORCH_CHECK(queries.is_contiguous() && queries.scalar_type() == keys.scalar_type() &&
                  queries.dim() == 5 && queries.size(0) == rows && queries.size(1) == kv &&
                  queries.size(2) == 2 && queries.size(4) == dims,
              "queries must be contiguous [rows, kv heads, 2, groups, dims], of the keys' dtype");
  TORCH_CHECK(head.scalar_type() == at::kBool && head.dim() == 2 && head.size(0) == rows &&
                  head.size(1) >= span && head.stride(1) == 1,
              "head must be bool [rows, span or more], its slots one after another");
  at::Tensor out = at::empty({rows, kv, queries.size(3), span}, queries.options().dtype(at::kFloat));
  if (keys.scalar_type() == at::kFloat)
    scores_of_rows<float>(queries, keys, head, out);
  else
    scores_of_rows<at::BFloat16>(queries, keys, head, out);
  return out;
}

template <typename T>
void mix_of_rows(const at::Tensor& probabilities, const at::Tensor& values, at::Tensor& out) {
  int64_t span = values.size(2), dims = values.size(3), groups = probabilities.size(2);
  const float* p = probabilities.data_ptr<float>();
  const T* v = values.data_ptr<T>();
  float* o = out.data_ptr<float>();
  for_each_head(values, [&](int64_t i, int64_t row, int64_t kv_head) {
    mix_of_head(p + i * groups * span, groups,
                v + row * values.stride(0) + kv_head * values.stride(1), span, dims,
                o + i * groups * dims);
  });
}

// float32 probabilities [rows, kv heads, groups, span]; values [rows, kv heads, span, dims]
// -> float32 outputs [rows, kv heads, groups, dims].
at::Tensor decode_mix(const at::Tensor& probabilities, const at::Tensor& values) {
  check_kv(values, "values");
  int64_t rows = values.size(0), kv = values.size(1), span = values.size(2), dims = values.size(3);
  TORCH_CHECK(probabilities.is_contiguous() && probabilities.scalar_type() == at::kFloat &&
                  probabilities.dim() == 4 && probabilities.size(0) == rows &&
                  probabilities.size(1) == kv && probabilities.size(3) == span,
              "probabilities must be contiguous float32 [rows, kv heads, groups, span]");
  at::Tensor out = at::empty({rows, kv, probabilities.size(2), dims}, probabilities.options());
  if (values.scalar_type() == at::kFloat)
    mix_of_rows<float>(probabilities, values, out);
  else
    mix_of_rows<at::BFloat16>(probabilities, values, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(streamsink, m) {
  m.def("decode_scores(Tensor queries, Tensor keys, Tensor head) -> Tensor");
  m.def("decode_mix(Tensor probabilities, Tensor values) -> Tensor");
}

TORCH_LIBRARY_IMPL(streamsink, CPU, m) {
  m.impl("decode_scores", &decode_scores);
  m.impl("decode_mix", &decode_mix);
}

#else
#error "the decode attention kernels are for x86-64 CPUs"
#endif
