// What the attention kernels' headers (decode_heads.h, prefill_heads.h) share, written in
// Isa's vector operations and included after vectors_*.h, inside each instruction set's namespace.

// Chunk c of CHUNKS from `from`: the last one through `tail` where it is PARTIAL.
template <int CHUNKS, bool PARTIAL, typename T>
inline Isa::Chunk load_chunk(int c, const T* from, Isa::Tail tail) {
  return PARTIAL && c == CHUNKS - 1 ? Isa::load(tail, from + c * 16) : Isa::load(from + c * 16);
}
