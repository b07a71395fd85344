// Layout copies between NCHW and channels-last (NHWC memory) for 4-D CPU tensors: the op
// `dabdetr_layout::relayout(x, channels_last)`.
//
// Why: torch's `x.contiguous(memory_format)` between these two layouts walks the destination in
// order and reads the source with a stride of C (or H*W) elements, so each element costs a cache
// line; on the 2-core EPYC of CI it moves 2-4 GB/s (a [1, 128, 200, 334] float32 map: 31 ms). The
// backbone's NCHW weight gradient (dabdetr/models/backbone.py, _ConvNCHWWeightGrad) needs such a
// copy of each strided 3x3 convolution's input and output gradient every step. Here the copy is
// a batched 2-D transpose ([N, R, S] -> [N, S, R]) done in square tiles that fit in L1, read and
// written along cache lines.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

namespace dabdetr {
namespace cpu {
namespace layout {
namespace {

constexpr int64_t kRows = 64;  // rows of one task (one image)

// dst[s * rows + r] = src[r * cols + s] for r in [r0, r1), s in [s0, s1): plain loops (edges,
// float64, CPUs without AVX2).
template <typename T>
void transpose_block(const T* __restrict__ src, T* __restrict__ dst, int64_t rows, int64_t cols, int64_t r0,
                     int64_t r1, int64_t s0, int64_t s1) {
  for (int64_t s = s0; s < s1; ++s) {
    T* d = dst + s * rows;
    const T* p = src + s;
    for (int64_t r = r0; r < r1; ++r) d[r] = p[r * cols];
  }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DABDETR_LAYOUT_X86 1
// 8 x 8 float32 transpose in AVX registers: 8 rows of 8 read, 8 rows of 8 written.
__attribute__((target("avx2"))) inline void transpose8x8(const float* s, int64_t ls, float* d, int64_t ld) {
  const __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ls), r2 = _mm256_loadu_ps(s + 2 * ls),
               r3 = _mm256_loadu_ps(s + 3 * ls), r4 = _mm256_loadu_ps(s + 4 * ls), r5 = _mm256_loadu_ps(s + 5 * ls),
               r6 = _mm256_loadu_ps(s + 6 * ls), r7 = _mm256_loadu_ps(s + 7 * ls);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(d + ld, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(d + 2 * ld, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(d + 3 * ld, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(d + 4 * ld, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(d + 5 * ld, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(d + 6 * ld, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(d + 7 * ld, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// Rows [r0, r1) of one image in 16 x 16 blocks (four 8 x 8 transposes): every source and
// destination access is a whole 64-byte line, so power-of-two strides (C = 128, H W = 16384) do not
// thrash the cache's sets. Edges: plain loops.
__attribute__((target("avx2"))) void transpose_rows_avx2(const float* __restrict__ src, float* __restrict__ dst,
                                                          int64_t rows, int64_t cols, int64_t r0, int64_t r1) {
  const int64_t r16 = r0 + (r1 - r0) / 16 * 16, s16 = cols / 16 * 16;
  for (int64_t r = r0; r < r16; r += 16) {
    for (int64_t s = 0; s < s16; s += 16) {
      const float* p = src + r * cols + s;
      float* q = dst + s * rows + r;
      // each destination line is completed by two consecutive transposes (its halves)
      transpose8x8(p, cols, q, rows);
      transpose8x8(p + 8 * cols, cols, q + 8, rows);
      transpose8x8(p + 8, cols, q + 8 * rows, rows);
      transpose8x8(p + 8 * cols + 8, cols, q + 8 * rows + 8, rows);
    }
  }
  if (r16 < r1) transpose_block(src, dst, rows, cols, r16, r1, int64_t(0), cols);
  if (s16 < cols) transpose_block(src, dst, rows, cols, r0, r16, s16, cols);
}

bool has_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return yes;
}
#else
#define DABDETR_LAYOUT_X86 0
#endif

template <typename T>
void transpose_rows(const T* src, T* dst, int64_t rows, int64_t cols, int64_t r0, int64_t r1) {
#if DABDETR_LAYOUT_X86
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx2()) return transpose_rows_avx2(src, dst, rows, cols, r0, r1);
  }
#endif
  transpose_block(src, dst, rows, cols, r0, r1, int64_t(0), cols);
}

// [B, R, S] contiguous -> [B, S, R] contiguous, in parallel over (image, blocks of kRows rows).
template <typename T>
void batched_transpose(const T* src, T* dst, int64_t batch, int64_t rows, int64_t cols) {
  const int64_t row_blocks = (rows + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kRows * cols));
  at::parallel_for(0, batch * row_blocks, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / row_blocks, rb = (t % row_blocks) * kRows;
      transpose_rows(src + n * rows * cols, dst + n * rows * cols, rows, cols, rb, std::min(rb + kRows, rows));
    }
  });
}

bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace

// x [N, C, H, W] (any layout) -> the same values, NCHW-contiguous (channels_last = false) or
// channels-last, always a new tensor. The tiled copy when x is in the other of the two layouts and
// float32/float64, otherwise torch's copy (the Python wrapper skips the op when x has the layout).
at::Tensor relayout(const at::Tensor& x, bool channels_last) {
  TORCH_CHECK(x.dim() == 4, "dabdetr_layout.relayout: 'x' must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "dabdetr_layout.relayout: 'x' must be a CPU tensor, got ", x.device());
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (x.is_contiguous(fmt)) return x.clone(fmt);  // a new tensor always (the schema: no alias)
  const bool from_other = channels_last ? x.is_contiguous() : is_channels_last(x);
  if (!from_other || x.numel() == 0 || (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble)) {
    return x.contiguous(fmt);
  }
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dabdetr_layout_relayout", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = y.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      batched_transpose(src, dst, n, c, hw);  // [N, C, HW] -> [N, HW, C]
    } else {
      batched_transpose(src, dst, n, hw, c);  // [N, HW, C] -> [N, C, HW]
    }
  });
  return y;
}

}  // namespace layout
}  // namespace cpu
}  // namespace dabdetr

TORCH_LIBRARY(dabdetr_layout, m) {
  // x [N, C, H, W] -> the same values in NCHW-contiguous (channels_last=False) or channels-last memory
  m.def("relayout(Tensor x, bool channels_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(dabdetr_layout, CPU, m) {
  m.impl("relayout", &dabdetr::cpu::layout::relayout);
}
