// The attention kernels' per-task header (ATTENTION_HEADS: decode_heads.h, prefill_heads.h),
// compiled once per instruction set, each in its namespace (avx512, avx2), after that set's
// vector operations (vectors_*.h) and chunk_loads.h. Defined and included once per .cpp.

namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#include "vectors_avx512.h"
#include "chunk_loads.h"
#include ATTENTION_HEADS
#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "vectors_avx2.h"
#include "chunk_loads.h"
#include ATTENTION_HEADS
#pragma GCC pop_options
}  // namespace avx2
