// Vectorized tile kernels of the CPU content_position_attention (see attention_cpu.cpp for the
// algorithm). The kernels work on packed float32/float64 tiles only; packing, dtype conversion and
// the loops over (batch, head, tile) live in attention_cpu.cpp.
//
// attention_kernels.cpp compiles the kernels once per x86 instruction set (x86-64-v4 / AVX-512,
// x86-64-v3 / AVX2+FMA, baseline SSE2; other architectures: GCC generic vectors) and kernel_set()
// picks the best one the CPU supports, once, at first use.
#pragma once

#include <cstdint>

namespace dabdetr {
namespace cpu {
namespace attn {

// Layouts (T = float or double; W = vector width of the chosen kernel set for T; NR = 2 * W keys
// per panel; MR = rows of a micro-tile, a divisor of NR):
//   Q rows      [rows][ldq]    scale * [q_content | q_pos], zero-padded to ldq = D rounded up to W
//   dO rows     [rows][lddo]   zero-padded to lddo = Dv rounded up to W
//   K^T panels  [kpad / NR][D][NR]   panel p holds keys p*NR .. p*NR+NR-1, column-major per key
//   V^T panels  [kpad / NR][Dv][NR]
//   K rows      [kpad][ldq],  V rows [kpad][lddo]
// Keys beyond kn (up to kpad, a multiple of NR) are zero in every packed key buffer.

// Forward: one key tile against `rows` query rows, flash-style online softmax.
template <typename T>
struct FwdTileArgs {
  const T* q;        // Q rows [rows][ldq]
  int64_t ldq;
  int64_t rows;      // multiple of MR
  int64_t d;         // Dc + Dp
  const T* kpanel;   // K^T panels of the tile
  const T* v;        // V rows [kpad][ldv]
  int64_t ldv;
  int64_t kn, kpad;  // valid and padded keys of the tile (1 <= kn <= kpad)
  T* o;              // [rows][ldv] unnormalized output accumulators
  T* m;              // [rows] running max of the scaled logits
  T* l;              // [rows] running sum of exp(logit - m)
  T* s;              // scratch [MR][kpad]
};

// Backward: one (query block x key tile) tile, flash-attention-2 style.
template <typename T>
struct BwdTileArgs {
  const T* q;        // Q rows of the block [rows][ldq]
  int64_t ldq;
  const T* dout;     // dO rows of the block [rows][lddo]
  int64_t lddo;
  const T* lse;      // [rows] logsumexp (+inf for padding rows: p = 0)
  const T* delta;    // [rows] rowsum(dO * O)
  int64_t rows;      // multiple of MR
  int64_t d, dv;     // Dc + Dp, Dv
  const T* kpanel;   // K^T panels of the tile
  const T* krows;    // K rows [kpad][ldq]
  const T* vpanel;   // V^T panels of the tile
  int64_t kn, kpad;
  T* dq;             // [rows][ldq] accumulators (unscaled: the caller multiplies by scale)
  T* dk;             // [kpad][ldq] accumulators of the tile's keys
  T* dv_acc;         // [kpad][lddo] accumulators of the tile's keys
  T* p;              // scratch [rows][kpad]
  T* ds;             // scratch [rows][kpad]
};

struct KernelSet {
  const char* name;  // "avx512", "avx2", "sse2" or "generic"
  int width_f;       // vector width in floats
  int width_d;       // vector width in doubles
  int mr;            // rows of a micro-tile (divides 2 * width_d and 2 * width_f)
  void (*fwd_f)(const FwdTileArgs<float>&);
  void (*fwd_d)(const FwdTileArgs<double>&);
  void (*bwd_f)(const BwdTileArgs<float>&);
  void (*bwd_d)(const BwdTileArgs<double>&);
};

// The kernels for this CPU. DABDETR_ATTENTION_ISA=avx512|avx2|sse2 (read once) forces a lower
// instruction set, for tests; an unsupported request falls back to the best available.
const KernelSet& kernel_set();

}  // namespace attn
}  // namespace cpu
}  // namespace dabdetr
