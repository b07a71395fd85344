// Instantiates the attention tile kernels (attention_kernels_impl.h) once per instruction set and
// picks one at run time.
//
// Why not target_clones (used by the sine kernels): the attention micro-kernels are register
// blocked (8 rows x 2-3 vectors of accumulators) and need the vector width and the FMA/broadcast
// intrinsics of their ISA at compile time, so each ISA gets its own copy of the whole tile code,
// compiled inside a `#pragma GCC target` region (same mechanism as target_clones, one level up).
#include "attention_kernels.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DABDETR_ATTN_X86 1
#include <immintrin.h>
#else
#define DABDETR_ATTN_X86 0
#endif

#define ATTN_INLINE inline __attribute__((always_inline))

namespace dabdetr {
namespace cpu {

#if DABDETR_ATTN_X86 && !defined(__clang__)

// ---- x86-64-v4: AVX-512 (32 vector registers): 8 x 2 logits tile, 8 x 3 broadcast tile.
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define ATTN_NS attn_avx512
#define ATTN_VBYTES 64
#define ATTN_VF __m512
#define ATTN_VD __m512d
#define ATTN_SET1_PS(x) _mm512_set1_ps(x)
#define ATTN_SET1_PD(x) _mm512_set1_pd(x)
#define ATTN_FMA_PS(a, b, c) _mm512_fmadd_ps(a, b, c)
#define ATTN_FMA_PD(a, b, c) _mm512_fmadd_pd(a, b, c)
#define ATTN_MR 8
#define ATTN_NVMAX 3
#include "attention_kernels_impl.h"
#undef ATTN_NS
#undef ATTN_VBYTES
#undef ATTN_VF
#undef ATTN_VD
#undef ATTN_SET1_PS
#undef ATTN_SET1_PD
#undef ATTN_FMA_PS
#undef ATTN_FMA_PD
#undef ATTN_MR
#undef ATTN_NVMAX
#pragma GCC pop_options

// ---- x86-64-v3: AVX2 + FMA (16 vector registers): 4 x 2 and 4 x 3 tiles.
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define ATTN_NS attn_avx2
#define ATTN_VBYTES 32
#define ATTN_VF __m256
#define ATTN_VD __m256d
#define ATTN_SET1_PS(x) _mm256_set1_ps(x)
#define ATTN_SET1_PD(x) _mm256_set1_pd(x)
#define ATTN_FMA_PS(a, b, c) _mm256_fmadd_ps(a, b, c)
#define ATTN_FMA_PD(a, b, c) _mm256_fmadd_pd(a, b, c)
#define ATTN_MR 4
#define ATTN_NVMAX 3
#include "attention_kernels_impl.h"
#undef ATTN_NS
#undef ATTN_VBYTES
#undef ATTN_VF
#undef ATTN_VD
#undef ATTN_SET1_PS
#undef ATTN_SET1_PD
#undef ATTN_FMA_PS
#undef ATTN_FMA_PD
#undef ATTN_MR
#undef ATTN_NVMAX
#pragma GCC pop_options

// ---- baseline x86-64: SSE2, no FMA.
#define ATTN_NS attn_sse2
#define ATTN_VBYTES 16
#define ATTN_VF __m128
#define ATTN_VD __m128d
#define ATTN_SET1_PS(x) _mm_set1_ps(x)
#define ATTN_SET1_PD(x) _mm_set1_pd(x)
#define ATTN_FMA_PS(a, b, c) ((a) * (b) + (c))
#define ATTN_FMA_PD(a, b, c) ((a) * (b) + (c))
#define ATTN_MR 4
#define ATTN_NVMAX 3
#include "attention_kernels_impl.h"
#undef ATTN_NS
#undef ATTN_VBYTES
#undef ATTN_VF
#undef ATTN_VD
#undef ATTN_SET1_PS
#undef ATTN_SET1_PD
#undef ATTN_FMA_PS
#undef ATTN_FMA_PD
#undef ATTN_MR
#undef ATTN_NVMAX

#else  // other compilers / architectures: GCC generic 16-byte vectors.

typedef float attn_generic_vf __attribute__((vector_size(16)));
typedef double attn_generic_vd __attribute__((vector_size(16)));
#define ATTN_NS attn_generic
#define ATTN_VBYTES 16
#define ATTN_VF attn_generic_vf
#define ATTN_VD attn_generic_vd
#define ATTN_SET1_PS(x) (attn_generic_vf{} + (x))
#define ATTN_SET1_PD(x) (attn_generic_vd{} + (x))
#define ATTN_FMA_PS(a, b, c) ((a) * (b) + (c))
#define ATTN_FMA_PD(a, b, c) ((a) * (b) + (c))
#define ATTN_MR 4
#define ATTN_NVMAX 3
#include "attention_kernels_impl.h"

#endif

namespace attn {

namespace {

KernelSet select_kernel_set() {
#if DABDETR_ATTN_X86 && !defined(__clang__)
  const char* env = std::getenv("DABDETR_ATTENTION_ISA");
  const int want = env == nullptr ? 3 : std::strcmp(env, "sse2") == 0 ? 1 : std::strcmp(env, "avx2") == 0 ? 2 : 3;
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (want >= 3 && v4) return attn_avx512::make_kernel_set("avx512");
  if (want >= 2 && v3) return attn_avx2::make_kernel_set("avx2");
  return attn_sse2::make_kernel_set("sse2");
#else
  return attn_generic::make_kernel_set("generic");
#endif
}

}  // namespace

const KernelSet& kernel_set() {
  static const KernelSet ks = select_kernel_set();
  return ks;
}

}  // namespace attn
}  // namespace cpu
}  // namespace dabdetr
