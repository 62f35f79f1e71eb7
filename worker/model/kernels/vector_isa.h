// Which of the kernels' instruction sets this CPU runs: AVX-512 (F, BW, VL) where it has it,
// else AVX2 with FMA. Both give every result the same bits (see vectors_avx2.h).

#pragma once

enum class VectorIsa { none, avx2, avx512 };

inline VectorIsa vector_isa() {
  static const VectorIsa isa = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      return VectorIsa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return VectorIsa::avx2;
    return VectorIsa::none;
  }();
  return isa;
}
