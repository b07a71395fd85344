// CUDA kernels of content_position_attention, forward and backward (flash-style).
//
// Per (batch b, head h): out = softmax(scale * (q_c k_c^T + q_p k_p^T)) v. The content and position
// halves are read from their own tensors (any strides, including the last dim) and meet only in
// shared memory: a query tile is stored as the per-head concatenation [q_c | q_p | 0-padding] of
// width Dqk = roundup(Dc + Dp, 16), a key tile likewise; nothing is concatenated in global memory and
// no B*H*Nq*Nk buffer exists.
//
// Structure (one design for every dtype; the matrix products are block-level GEMMs on shared
// memory, everything else is plain per-thread code on shared memory):
//  * block_gemm: C (+)= A B with A, B in shared memory (row- or column-major views), C an fp32
//    (float64 for float64) shared-memory tile. float16 / bfloat16: tensor cores through WMMA
//    (m16n16k16, fp32 accumulate; HMMA in SASS); each warp owns 16x16 output tiles. float32 /
//    float64: FFMA / DFMA with 4x4 register micro-tiles per thread (IEEE fp32, no TF32).
//  * forward: a block per (b, h, query tile of BM rows); key/value tiles of BN rows are streamed
//    through shared memory; S = Q K^T (GEMM) -> online softmax in fp32 (a warp per row, exp2
//    domain; running max m and sum l per row; O rescaled in place) -> P (rounded to the input type
//    for the tensor-core product) -> O += P V (GEMM, accumulator in shared memory). The epilogue
//    writes out = O / l and logsumexp = m + log l ([B, H, Nq], fp32; fp64 for fp64 inputs).
//  * backward (FlashAttention-2): kernels that all recompute P = exp(scale * S - lse) from the saved
//    logsumexp, launched in this order:
//      [float32 / float64] delta kernel: Delta = rowsum(dO * O), a warp per row.
//      dQ kernel: a block per (b, h, query tile); loops over key tiles: S = Q K^T, dP = dO V^T,
//        dS = P (dP - Delta); dQ += dS K. [float16 / bfloat16] it first computes Delta itself:
//        Delta = sum_j P_ij dP_ij (= rowsum(dO * O) in exact arithmetic) in fp32 from S and dP in
//        a pass over all key tiles (reverse order, so that key tile 0 is still in shared memory
//        for the main loop), and writes it to a [B, H, Nq] fp32 buffer for the dK/dV kernel.
//        Reason: the saved O was rounded to the half type, so rowsum(dO * O) carries an error of
//        ~eps_half * |Delta| into every dS = P (dP - Delta), which ruins query / key gradients
//        that cancel (peaky softmax over few keys); the CPU kernel (O recomputed in fp32) and the
//        Triton kernel (the same pass) do likewise. Cost: 2 more tile GEMMs (Q K^T, dO V^T) and
//        one more K / V tile load per (query tile, key tile) pair, minus key tile 0's, in the dQ
//        kernel: 9 instead of 7 tile GEMMs per pair for the whole backward; no extra launch (the
//        delta kernel is not launched for half types) and no extra shared memory.
//      dK/dV kernel: a block per (b, h, key tile); loops over query tiles: S = Q K^T, dP = dO V^T,
//        dS = P (dP - Delta); dV += P^T dO; dK += dS^T Q (accumulators in shared memory).
//    Two kernels instead of atomics: every gradient element is written once by one block, so the
//    result is deterministic (bitwise reproducible), needs no fp32 scratch for dQ and no
//    zero-fill / conversion pass; the price is recomputing Q K^T and dO V^T once more (2 of the 7
//    tile GEMMs), which at DAB-DETR's sizes (Nq = 300, Nk ~ 1k, head dims 64 / 32) is cheaper
//    than the atomic traffic on dQ (every key tile would add into every query row).
//  * masking: padded keys (key_padding_mask True) and keys beyond Nk get a -inf bias; a row whose
//    keys are all padding keeps m = -inf, l = 0: its output is 0 and its logsumexp -inf, and the
//    backward uses p = exp2(s - (+inf)) = 0 there (so Delta = 0 in the half-type pass too), so its
//    gradients are exactly 0.
//  * the fp32 / fp64 outputs are written with plain stores; grads are contiguous.
//
// Tile sizes (BM x BN, 128 threads): float16 / bfloat16 forward 32 x 64, backward 32 x 64; float32
// forward 32 x 64, backward 32 x 32; float64 forward 16 x 32, backward 16 x 16. Head dims up to 64
// each (Dc + Dp <= 128): shared memory at most ~118 KB (bf16 dK/dV kernel at Dc = Dp = Dv = 64),
// ~60 KB at DAB-DETR's 32 / 32 / 32.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#ifndef DABDETR_CUDA_EMULATION
#include <mma.h>
#endif

#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../common/checks.h"
#include "../cpu/attention_checks.h"
#include "cuda_common.cuh"

namespace dabdetr {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeadDim = 64;

template <typename T>
struct Tiles;
// Query tiles of 32 rows: DAB-DETR's Nq = 300 gives 10 tiles per (b, h), i.e. >= 160 blocks at
// B * H = 16, enough to fill an H100's 132 SMs.
template <>
struct Tiles<__half> {
  static constexpr int kFwdM = 32, kFwdN = 64, kBwdM = 32, kBwdN = 64;
};
template <>
struct Tiles<__nv_bfloat16> {
  static constexpr int kFwdM = 32, kFwdN = 64, kBwdM = 32, kBwdN = 64;
};
template <>
struct Tiles<float> {
  static constexpr int kFwdM = 32, kFwdN = 64, kBwdM = 32, kBwdN = 32;
};
template <>
struct Tiles<double> {
  static constexpr int kFwdM = 16, kFwdN = 32, kBwdM = 16, kBwdN = 16;
};

// Row padding of shared-memory tiles (elements): the WMMA path needs leading dims that are multiples
// of 16 bytes (8 halves / 4 floats) and 32-byte aligned tile pointers; the scalar path uses odd
// leading dims so that column-wise walks hit distinct banks.
template <typename T>
constexpr int kPadT = kIsHalfLike<T> ? 8 : 1;
template <typename T>
constexpr int kPadA = kIsHalfLike<T> ? 4 : 1;

__host__ __device__ __forceinline__ int round16(int x) { return (x + 15) & ~15; }
__host__ __device__ __forceinline__ uint32_t align128(uint32_t x) { return (x + 127u) & ~127u; }

__device__ __forceinline__ float ex2(float x) { return exp2f(x); }
__device__ __forceinline__ double ex2(double x) { return exp2(x); }
__device__ __forceinline__ float lg2(float x) { return log2f(x); }
__device__ __forceinline__ double lg2(double x) { return log2(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename acc_t>
constexpr acc_t kLog2e = acc_t(1.4426950408889634073599246810018921);
template <typename acc_t>
constexpr acc_t kLn2 = acc_t(0.6931471805599453094172321214581766);

// ------------------------------------------------------------------------------------------------
// block-level GEMM on shared memory: C[M x N] (+)= A[M x K] B[K x N]
//   A(m, k) = ARow ? A[m * lda + k] : A[k * lda + m]
//   B(k, n) = BRow ? B[k * ldb + n] : B[n * ldb + k]
// M, N, K multiples of 16. All threads of the block call it; no barrier inside.

template <typename T, bool ARow, bool BRow, bool kAccum>
__device__ __forceinline__ void gemm_wmma(int M, int N, int K, const T* A, int lda, const T* B, int ldb, float* C,
                                          int ldc) {
  using namespace nvcuda;
  using LA = std::conditional_t<ARow, wmma::row_major, wmma::col_major>;
  using LB = std::conditional_t<BRow, wmma::row_major, wmma::col_major>;
  const int warp = threadIdx.x >> 5;
  const int tiles_n = N >> 4;
  const int tiles = (M >> 4) * tiles_n;
  for (int t = warp; t < tiles; t += kWarps) {
    const int tm = t / tiles_n;
    const int tn = t - tm * tiles_n;
    float* cp = C + tm * 16 * ldc + tn * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    if constexpr (kAccum) {
      wmma::load_matrix_sync(c, cp, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(c, 0.0f);
    }
    for (int k = 0; k < K; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
      const T* ap = ARow ? A + tm * 16 * lda + k : A + k * lda + tm * 16;
      const T* bp = BRow ? B + k * ldb + tn * 16 : B + tn * 16 * ldb + k;
      wmma::load_matrix_sync(a, ap, lda);
      wmma::load_matrix_sync(b, bp, ldb);
      wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(cp, c, ldc, wmma::mem_row_major);
  }
}

// FFMA / DFMA path: each thread owns a 4 x 4 micro-tile with rows tm + i * M/4 and columns
// tn + j * N/4 (strided, so that a warp's B / C accesses are consecutive).
template <typename T, bool ARow, bool BRow, bool kAccum>
__device__ __forceinline__ void gemm_scalar(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C,
                                            int ldc) {
  const int m4 = M >> 2;
  const int n4 = N >> 2;
  for (int t = threadIdx.x; t < m4 * n4; t += kThreads) {
    const int tm = t / n4;
    const int tn = t - tm * n4;
    T c[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) c[i][j] = kAccum ? C[(tm + i * m4) * ldc + tn + j * n4] : T(0);
    }
#pragma unroll 2
    for (int k = 0; k < K; ++k) {
      T a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = ARow ? A[(tm + i * m4) * lda + k] : A[k * lda + tm + i * m4];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = BRow ? B[k * ldb + tn + j * n4] : B[(tn + j * n4) * ldb + k];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) c[i][j] = fma(a[i], b[j], c[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) C[(tm + i * m4) * ldc + tn + j * n4] = c[i][j];
    }
  }
}

template <typename T, bool ARow, bool BRow, bool kAccum>
__device__ __forceinline__ void block_gemm(int M, int N, int K, const T* A, int lda, const T* B, int ldb,
                                           typename Acc<T>::type* C, int ldc) {
  if constexpr (kIsHalfLike<T>) {
    gemm_wmma<T, ARow, BRow, kAccum>(M, N, K, A, lda, B, ldb, C, ldc);
  } else {
    gemm_scalar<T, ARow, BRow, kAccum>(M, N, K, A, lda, B, ldb, C, ldc);
  }
}

// ------------------------------------------------------------------------------------------------
// parameters and shared-memory layouts

template <typename T>
struct Params {
  using acc_t = typename Acc<T>::type;
  const T* qc;
  const T* qp;
  const T* kc;
  const T* kp;
  const T* v;
  int64_t s_qc[4], s_qp[4], s_kc[4], s_kp[4], s_v[4];  // strides of dims (B, N, H, D)
  const bool* mask;                                     // [B, Nk] or nullptr
  int64_t s_mask[2];
  int B, H, Nq, Nk, Dc, Dp, Dv;
  int Dqk16, Dv16;  // round16(Dc + Dp), round16(Dv)
  acc_t scale;      // logit scale
  acc_t scale_log2;  // scale * log2(e)
  // forward
  T* out;      // [B, Nq, H, Dv] contiguous
  acc_t* lse;  // [B, H, Nq] contiguous
  // backward
  const T* go;  // grad_out [B, Nq, H, Dv], strided
  int64_t s_go[4];
  const T* o;  // out [B, Nq, H, Dv], strided (read by the float32 / float64 delta kernel only)
  int64_t s_o[4];
  const acc_t* lse_in;  // [B, H, Nq] contiguous
  acc_t* delta;         // [B, H, Nq] contiguous scratch (delta kernel or dQ kernel -> dK/dV kernel)
  T* gqc;               // contiguous grads
  T* gqp;
  T* gkc;
  T* gkp;
  T* gv;
};

template <typename T>
struct FwdLayout {
  using acc_t = typename Acc<T>::type;
  static constexpr int BM = Tiles<T>::kFwdM, BN = Tiles<T>::kFwdN;
  int ldq, ldv, lds, ldp, ldo;
  uint32_t q, k, v, s, p, o, m, l, kb, total;
  __host__ __device__ FwdLayout(int dqk16, int dv16) {
    ldq = dqk16 + kPadT<T>;
    ldv = dv16 + kPadT<T>;
    lds = BN + kPadA<T>;
    ldp = BN + kPadT<T>;
    ldo = dv16 + kPadA<T>;
    constexpr uint32_t ts = sizeof(T), as = sizeof(acc_t);
    q = 0;
    k = align128(q + BM * ldq * ts);
    v = align128(k + BN * ldq * ts);
    s = align128(v + BN * ldv * ts);
    p = align128(s + BM * lds * as);
    o = align128(p + BM * ldp * ts);
    m = align128(o + BM * ldo * as);
    l = align128(m + BM * as);
    kb = align128(l + BM * as);
    total = align128(kb + BN * as);
  }
};

// dK/dV kernel (KV: the block's key tile) and dQ kernel share one layout.
template <typename T>
struct BwdLayout {
  using acc_t = typename Acc<T>::type;
  static constexpr int BM = Tiles<T>::kBwdM, BN = Tiles<T>::kBwdN;
  int ldq, ldv, lds, ldp, ldg, ldgv;
  uint32_t q, go, k, v, s, dp, p, ds, gk, gv, lse, delta, kb, total;
  // kv_grads: accumulators dK [BN x Dqk] and dV [BN x Dv] (dK/dV kernel), else dQ [BM x Dqk].
  __host__ __device__ BwdLayout(int dqk16, int dv16, bool kv_grads) {
    ldq = dqk16 + kPadT<T>;
    ldv = dv16 + kPadT<T>;
    lds = BN + kPadA<T>;
    ldp = BN + kPadT<T>;
    ldg = dqk16 + kPadA<T>;
    ldgv = dv16 + kPadA<T>;
    constexpr uint32_t ts = sizeof(T), as = sizeof(acc_t);
    q = 0;
    go = align128(q + BM * ldq * ts);
    k = align128(go + BM * ldv * ts);
    v = align128(k + BN * ldq * ts);
    s = align128(v + BN * ldv * ts);
    dp = align128(s + BM * lds * as);
    p = align128(dp + BM * lds * as);
    ds = align128(p + BM * ldp * ts);
    gk = align128(ds + BM * ldp * ts);
    gv = align128(gk + (kv_grads ? BN : BM) * ldg * as);
    lse = align128(gv + (kv_grads ? BN * ldgv * as : 0u));
    delta = align128(lse + BM * as);
    kb = align128(delta + BM * as);
    total = align128(kb + BN * as);
  }
};

// ------------------------------------------------------------------------------------------------
// tile loads (global -> shared), zero-filled beyond the valid rows / columns

// rows [r0, r0 + R) of [x1 | x2 | 0] (widths d1, d2, padded to width `w`) of batch b, head h.
// With a key padding mask, masked rows load as zeros too: like the CPU kernel (which skips them),
// the result then does not depend on what padded keys hold (an inf or NaN there would otherwise
// reach the row through S + (-inf) or through 0 * K in dQ = dS K).
template <typename T>
__device__ __forceinline__ void load_concat(T* dst, int ld, int R, int r0, int n_valid, int w, const T* x1,
                                            const int64_t* s1, int d1, const T* x2, const int64_t* s2, int d2,
                                            int b, int h, const bool* mask = nullptr,
                                            const int64_t* s_mask = nullptr) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = warp; r < R; r += kWarps) {
    const int i = r0 + r;
    bool ok = i < n_valid;
    if (ok && mask != nullptr) ok = !mask[b * s_mask[0] + static_cast<int64_t>(i) * s_mask[1]];
    const T* p1 = x1 + b * s1[0] + static_cast<int64_t>(i) * s1[1] + h * s1[2];
    const T* p2 = x2 != nullptr ? x2 + b * s2[0] + static_cast<int64_t>(i) * s2[1] + h * s2[2] : nullptr;
    for (int d = lane; d < w; d += 32) {
      T val = zero_value<T>();
      if (ok) {
        if (d < d1) {
          val = p1[d * s1[3]];
        } else if (d < d1 + d2) {
          val = p2[(d - d1) * s2[3]];
        }
      }
      dst[r * ld + d] = val;
    }
  }
}

// Key bias for keys [k0, k0 + BN): 0, or -inf for padding / out of range.
template <typename T, int BN>
__device__ __forceinline__ void load_key_bias(typename Acc<T>::type* kb, const Params<T>& p, int b, int k0) {
  using acc_t = typename Acc<T>::type;
  for (int n = threadIdx.x; n < BN; n += kThreads) {
    const int j = k0 + n;
    bool valid = j < p.Nk;
    if (valid && p.mask != nullptr) valid = !p.mask[b * p.s_mask[0] + static_cast<int64_t>(j) * p.s_mask[1]];
    kb[n] = valid ? acc_t(0) : -std::numeric_limits<acc_t>::infinity();
  }
}

template <typename acc_t>
__device__ __forceinline__ void fill_zero(acc_t* x, int n) {
  for (int e = threadIdx.x; e < n; e += kThreads) x[e] = acc_t(0);
}

// Decodes blockIdx.x = (b * H + h) * tiles + tile.
__device__ __forceinline__ void block_coords(int tiles, int H, int& b, int& h, int& tile) {
  const int64_t bid = blockIdx.x;
  tile = static_cast<int>(bid % tiles);
  const int64_t bh = bid / tiles;
  h = static_cast<int>(bh % H);
  b = static_cast<int>(bh / H);
}

// ------------------------------------------------------------------------------------------------
// forward

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) attn_fwd_kernel(const __grid_constant__ Params<T> p) {
  using acc_t = typename Acc<T>::type;
  using L = FwdLayout<T>;
  constexpr int BM = L::BM, BN = L::BN;
  static_assert(BN % 32 == 0, "forward key tile must be a multiple of 32");
  DABDETR_DYNAMIC_SMEM(smem, 128);
  const L lay(p.Dqk16, p.Dv16);
  T* Qs = reinterpret_cast<T*>(smem + lay.q);
  T* Ks = reinterpret_cast<T*>(smem + lay.k);
  T* Vs = reinterpret_cast<T*>(smem + lay.v);
  acc_t* Ss = reinterpret_cast<acc_t*>(smem + lay.s);
  T* Ps = reinterpret_cast<T*>(smem + lay.p);
  acc_t* Os = reinterpret_cast<acc_t*>(smem + lay.o);
  acc_t* row_m = reinterpret_cast<acc_t*>(smem + lay.m);
  acc_t* row_l = reinterpret_cast<acc_t*>(smem + lay.l);
  acc_t* kbias = reinterpret_cast<acc_t*>(smem + lay.kb);

  int b, h, qt;
  block_coords((p.Nq + BM - 1) / BM, p.H, b, h, qt);
  const int q0 = qt * BM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  load_concat<T>(Qs, lay.ldq, BM, q0, p.Nq, p.Dqk16, p.qc, p.s_qc, p.Dc, p.qp, p.s_qp, p.Dp, b, h);
  fill_zero(Os, BM * lay.ldo);
  for (int m = threadIdx.x; m < BM; m += kThreads) {
    row_m[m] = kNegInf;
    row_l[m] = acc_t(0);
  }

  for (int k0 = 0; k0 < p.Nk; k0 += BN) {
    __syncthreads();  // the previous tile's readers of Ks / Vs / Ps are done
    load_concat<T>(Ks, lay.ldq, BN, k0, p.Nk, p.Dqk16, p.kc, p.s_kc, p.Dc, p.kp, p.s_kp, p.Dp, b, h, p.mask, p.s_mask);
    load_concat<T>(Vs, lay.ldv, BN, k0, p.Nk, p.Dv16, p.v, p.s_v, p.Dv, nullptr, nullptr, 0, b, h, p.mask, p.s_mask);
    load_key_bias<T, BN>(kbias, p, b, k0);
    __syncthreads();
    block_gemm<T, true, false, false>(BM, BN, p.Dqk16, Qs, lay.ldq, Ks, lay.ldq, Ss, lay.lds);  // S = Q K^T
    __syncthreads();
    // Online softmax, a warp per row, in the exp2 domain: s = S * scale * log2(e) + bias.
    for (int m = warp; m < BM; m += kWarps) {
      const acc_t m_old = row_m[m];
      const acc_t l_old = row_l[m];
      acc_t sv[BN / 32];
      acc_t mx = kNegInf;
#pragma unroll
      for (int t = 0; t < BN / 32; ++t) {
        const int n = lane + 32 * t;
        sv[t] = Ss[m * lay.lds + n] * p.scale_log2 + kbias[n];
        mx = fmax(mx, sv[t]);
      }
      mx = warp_max(mx);
      const acc_t m_new = fmax(m_old, mx);
      const acc_t m_ref = m_new == kNegInf ? acc_t(0) : m_new;  // no (-inf) - (-inf)
      const acc_t alpha = ex2(m_old - m_ref);                    // 0 while the row has seen no key
      acc_t sum = acc_t(0);
#pragma unroll
      for (int t = 0; t < BN / 32; ++t) {
        const acc_t pv = ex2(sv[t] - m_ref);
        sum += pv;
        Ps[m * lay.ldp + lane + 32 * t] = from_acc<T>(pv);
      }
      sum = warp_sum(sum);
      for (int d = lane; d < p.Dv16; d += 32) Os[m * lay.ldo + d] *= alpha;
      if (lane == 0) {
        row_m[m] = m_new;
        row_l[m] = l_old * alpha + sum;
      }
    }
    __syncthreads();
    block_gemm<T, true, true, true>(BM, p.Dv16, BN, Ps, lay.ldp, Vs, lay.ldv, Os, lay.ldo);  // O += P V
  }
  __syncthreads();

  for (int m = warp; m < BM; m += kWarps) {
    const int i = q0 + m;
    if (i >= p.Nq) break;
    const acc_t l = row_l[m];
    const acc_t inv = l > acc_t(0) ? acc_t(1) / l : acc_t(0);
    T* orow = p.out + ((static_cast<int64_t>(b) * p.Nq + i) * p.H + h) * p.Dv;
    for (int d = lane; d < p.Dv; d += 32) orow[d] = from_acc<T>(Os[m * lay.ldo + d] * inv);
    if (lane == 0) {
      p.lse[(static_cast<int64_t>(b) * p.H + h) * p.Nq + i] =
          l > acc_t(0) ? (row_m[m] + lg2(l)) * kLn2<acc_t> : kNegInf;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// backward

// float32 / float64: delta[b, h, i] = sum_d grad_out[b, i, h, d] * out[b, i, h, d]; a warp per row.
// (float16 / bfloat16 compute delta = sum_j P_ij dP_ij in the dQ kernel instead, see accumulate_delta.)
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_bwd_delta_kernel(const __grid_constant__ Params<T> p) {
  using acc_t = typename Acc<T>::type;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Nq * p.H;
  if (row >= rows) return;  // whole warps exit together
  const int h = static_cast<int>(row % p.H);
  const int64_t bi = row / p.H;
  const int i = static_cast<int>(bi % p.Nq);
  const int b = static_cast<int>(bi / p.Nq);
  const T* g = p.go + b * p.s_go[0] + static_cast<int64_t>(i) * p.s_go[1] + h * p.s_go[2];
  const T* o = p.o + b * p.s_o[0] + static_cast<int64_t>(i) * p.s_o[1] + h * p.s_o[2];
  acc_t acc = acc_t(0);
  for (int d = lane; d < p.Dv; d += 32) acc += to_acc(g[d * p.s_go[3]]) * to_acc(o[d * p.s_o[3]]);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[(static_cast<int64_t>(b) * p.H + h) * p.Nq + i] = acc;
}

// Per-row backward constants of query rows [q0, q0 + BM): lse2 = lse * log2(e) (+inf for rows
// without keys and rows beyond Nq, so that p = 0 there) and delta (0 beyond Nq; 0 everywhere
// without kLoadDelta, the start of the dQ kernel's own delta pass).
template <typename T, int BM, bool kLoadDelta>
__device__ __forceinline__ void load_row_stats(typename Acc<T>::type* lse2, typename Acc<T>::type* delta,
                                               const Params<T>& p, int b, int h, int q0) {
  using acc_t = typename Acc<T>::type;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  for (int m = threadIdx.x; m < BM; m += kThreads) {
    const int i = q0 + m;
    acc_t l2 = kInf, dl = acc_t(0);
    if (i < p.Nq) {
      const int64_t r = (static_cast<int64_t>(b) * p.H + h) * p.Nq + i;
      const acc_t lse = p.lse_in[r];
      l2 = lse == -kInf ? kInf : lse * kLog2e<acc_t>;
      if constexpr (kLoadDelta) dl = p.delta[r];
    }
    lse2[m] = l2;
    delta[m] = dl;
  }
}

// P = exp2(S * scale * log2(e) + bias - lse2), dS = P (dP - delta); writes P (if Ps) and dS in T.
template <typename T, int BM, int BN>
__device__ __forceinline__ void probs_and_dscores(const typename Acc<T>::type* Ss, const typename Acc<T>::type* dPs,
                                                  int lds, T* Ps, T* dSs, int ldp,
                                                  const typename Acc<T>::type* lse2,
                                                  const typename Acc<T>::type* delta,
                                                  const typename Acc<T>::type* kbias,
                                                  typename Acc<T>::type scale_log2) {
  using acc_t = typename Acc<T>::type;
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int m = e / BN;
    const int n = e - m * BN;
    const acc_t pv = ex2(Ss[m * lds + n] * scale_log2 + kbias[n] - lse2[m]);
    const acc_t ds = pv * (dPs[m * lds + n] - delta[m]);
    if (Ps != nullptr) Ps[m * ldp + n] = from_acc<T>(pv);
    dSs[m * ldp + n] = from_acc<T>(ds);
  }
}

// float16 / bfloat16 delta pass, one key tile: delta[m] += sum_n P[m, n] dP[m, n] in fp32, with P
// recomputed as in probs_and_dscores (fp32, not rounded) and dP = dO V^T from the tensor-core GEMM
// (fp32 accumulation of exact products of the inputs). In exact arithmetic this is rowsum(dO * O);
// unlike rowsum(dO * O) with the saved O (rounded to the input type) it carries no eps_half * |delta|
// error into dS = P (dP - delta). A warp per row; row m belongs to the same warp (lane 0) in every
// tile, so the running sum needs no barrier between tiles.
template <typename T, int BM, int BN>
__device__ __forceinline__ void accumulate_delta(const typename Acc<T>::type* Ss, const typename Acc<T>::type* dPs,
                                                 int lds, const typename Acc<T>::type* lse2,
                                                 const typename Acc<T>::type* kbias,
                                                 typename Acc<T>::type scale_log2, typename Acc<T>::type* delta) {
  using acc_t = typename Acc<T>::type;
  static_assert(BN % 32 == 0, "delta pass: key tile must be a multiple of 32");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int m = warp; m < BM; m += kWarps) {
    acc_t acc = acc_t(0);
#pragma unroll
    for (int t = 0; t < BN / 32; ++t) {
      const int n = lane + 32 * t;
      const acc_t pv = ex2(Ss[m * lds + n] * scale_log2 + kbias[n] - lse2[m]);
      acc = fma(pv, dPs[m * lds + n], acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) delta[m] += acc;
  }
}

// Writes rows [r0, r0 + R) of scale * acc ([R x (d1 + d2)], split into the contiguous [.., N, H, d1]
// and [.., N, H, d2] outputs of batch b, head h).
template <typename T>
__device__ __forceinline__ void store_split(const typename Acc<T>::type* acc, int ld, int R, int r0, int n_valid,
                                            int N, int H, int b, int h, T* y1, int d1, T* y2, int d2,
                                            typename Acc<T>::type mult) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = warp; r < R; r += kWarps) {
    const int i = r0 + r;
    if (i >= n_valid) break;
    const int64_t row = (static_cast<int64_t>(b) * N + i) * H + h;
    for (int d = lane; d < d1 + d2; d += 32) {
      const T val = from_acc<T>(acc[r * ld + d] * mult);
      if (d < d1) {
        y1[row * d1 + d] = val;
      } else {
        y2[row * d2 + (d - d1)] = val;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dkdv_kernel(const __grid_constant__ Params<T> p) {
  using acc_t = typename Acc<T>::type;
  using L = BwdLayout<T>;
  constexpr int BM = L::BM, BN = L::BN;
  DABDETR_DYNAMIC_SMEM(smem, 128);
  const L lay(p.Dqk16, p.Dv16, true);
  T* Qs = reinterpret_cast<T*>(smem + lay.q);
  T* dOs = reinterpret_cast<T*>(smem + lay.go);
  T* Ks = reinterpret_cast<T*>(smem + lay.k);
  T* Vs = reinterpret_cast<T*>(smem + lay.v);
  acc_t* Ss = reinterpret_cast<acc_t*>(smem + lay.s);
  acc_t* dPs = reinterpret_cast<acc_t*>(smem + lay.dp);
  T* Ps = reinterpret_cast<T*>(smem + lay.p);
  T* dSs = reinterpret_cast<T*>(smem + lay.ds);
  acc_t* dK = reinterpret_cast<acc_t*>(smem + lay.gk);
  acc_t* dV = reinterpret_cast<acc_t*>(smem + lay.gv);
  acc_t* lse2 = reinterpret_cast<acc_t*>(smem + lay.lse);
  acc_t* delta = reinterpret_cast<acc_t*>(smem + lay.delta);
  acc_t* kbias = reinterpret_cast<acc_t*>(smem + lay.kb);

  int b, h, kt;
  block_coords((p.Nk + BN - 1) / BN, p.H, b, h, kt);
  const int k0 = kt * BN;
  load_concat<T>(Ks, lay.ldq, BN, k0, p.Nk, p.Dqk16, p.kc, p.s_kc, p.Dc, p.kp, p.s_kp, p.Dp, b, h, p.mask, p.s_mask);
  load_concat<T>(Vs, lay.ldv, BN, k0, p.Nk, p.Dv16, p.v, p.s_v, p.Dv, nullptr, nullptr, 0, b, h, p.mask, p.s_mask);
  load_key_bias<T, BN>(kbias, p, b, k0);
  fill_zero(dK, BN * lay.ldg);
  fill_zero(dV, BN * lay.ldgv);

  for (int q0 = 0; q0 < p.Nq; q0 += BM) {
    __syncthreads();  // previous readers of Qs / dOs / Ps / dSs are done
    load_concat<T>(Qs, lay.ldq, BM, q0, p.Nq, p.Dqk16, p.qc, p.s_qc, p.Dc, p.qp, p.s_qp, p.Dp, b, h);
    load_concat<T>(dOs, lay.ldv, BM, q0, p.Nq, p.Dv16, p.go, p.s_go, p.Dv, nullptr, nullptr, 0, b, h);
    load_row_stats<T, BM, true>(lse2, delta, p, b, h, q0);
    __syncthreads();
    block_gemm<T, true, false, false>(BM, BN, p.Dqk16, Qs, lay.ldq, Ks, lay.ldq, Ss, lay.lds);   // S = Q K^T
    block_gemm<T, true, false, false>(BM, BN, p.Dv16, dOs, lay.ldv, Vs, lay.ldv, dPs, lay.lds);  // dP = dO V^T
    __syncthreads();
    probs_and_dscores<T, BM, BN>(Ss, dPs, lay.lds, Ps, dSs, lay.ldp, lse2, delta, kbias, p.scale_log2);
    __syncthreads();
    block_gemm<T, false, true, true>(BN, p.Dv16, BM, Ps, lay.ldp, dOs, lay.ldv, dV, lay.ldgv);  // dV += P^T dO
    block_gemm<T, false, true, true>(BN, p.Dqk16, BM, dSs, lay.ldp, Qs, lay.ldq, dK, lay.ldg);  // dK += dS^T Q
  }
  __syncthreads();
  store_split<T>(dK, lay.ldg, BN, k0, p.Nk, p.Nk, p.H, b, h, p.gkc, p.Dc, p.gkp, p.Dp, p.scale);
  store_split<T>(dV, lay.ldgv, BN, k0, p.Nk, p.Nk, p.H, b, h, p.gv, p.Dv, nullptr, 0, acc_t(1));
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) attn_bwd_dq_kernel(const __grid_constant__ Params<T> p) {
  using acc_t = typename Acc<T>::type;
  using L = BwdLayout<T>;
  constexpr int BM = L::BM, BN = L::BN;
  DABDETR_DYNAMIC_SMEM(smem, 128);
  const L lay(p.Dqk16, p.Dv16, false);
  T* Qs = reinterpret_cast<T*>(smem + lay.q);
  T* dOs = reinterpret_cast<T*>(smem + lay.go);
  T* Ks = reinterpret_cast<T*>(smem + lay.k);
  T* Vs = reinterpret_cast<T*>(smem + lay.v);
  acc_t* Ss = reinterpret_cast<acc_t*>(smem + lay.s);
  acc_t* dPs = reinterpret_cast<acc_t*>(smem + lay.dp);
  T* dSs = reinterpret_cast<T*>(smem + lay.ds);
  acc_t* dQ = reinterpret_cast<acc_t*>(smem + lay.gk);
  acc_t* lse2 = reinterpret_cast<acc_t*>(smem + lay.lse);
  acc_t* delta = reinterpret_cast<acc_t*>(smem + lay.delta);
  acc_t* kbias = reinterpret_cast<acc_t*>(smem + lay.kb);

  int b, h, qt;
  block_coords((p.Nq + BM - 1) / BM, p.H, b, h, qt);
  const int q0 = qt * BM;
  load_concat<T>(Qs, lay.ldq, BM, q0, p.Nq, p.Dqk16, p.qc, p.s_qc, p.Dc, p.qp, p.s_qp, p.Dp, b, h);
  load_concat<T>(dOs, lay.ldv, BM, q0, p.Nq, p.Dv16, p.go, p.s_go, p.Dv, nullptr, nullptr, 0, b, h);
  // float16 / bfloat16: delta = sum_j P_ij dP_ij, computed here (fp32) and written for the dK/dV
  // kernel, which runs after this one; float32 / float64: delta = rowsum(dO * O) from the delta kernel.
  constexpr bool kOwnDelta = kIsHalfLike<T>;
  load_row_stats<T, BM, !kOwnDelta>(lse2, delta, p, b, h, q0);
  fill_zero(dQ, BM * lay.ldg);

  if constexpr (kOwnDelta) {
    // Delta pass over the key tiles in reverse order: it ends on key tile 0, whose K, V, key bias, S and
    // dP the main loop below then reuses from shared memory.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int kt = (p.Nk + BN - 1) / BN - 1; kt >= 0; --kt) {
      const int k0 = kt * BN;
      __syncthreads();  // previous readers of Ks / Vs / Ss / dPs are done
      load_concat<T>(Ks, lay.ldq, BN, k0, p.Nk, p.Dqk16, p.kc, p.s_kc, p.Dc, p.kp, p.s_kp, p.Dp, b, h, p.mask, p.s_mask);
      load_concat<T>(Vs, lay.ldv, BN, k0, p.Nk, p.Dv16, p.v, p.s_v, p.Dv, nullptr, nullptr, 0, b, h, p.mask, p.s_mask);
      load_key_bias<T, BN>(kbias, p, b, k0);
      __syncthreads();
      block_gemm<T, true, false, false>(BM, BN, p.Dqk16, Qs, lay.ldq, Ks, lay.ldq, Ss, lay.lds);   // S = Q K^T
      block_gemm<T, true, false, false>(BM, BN, p.Dv16, dOs, lay.ldv, Vs, lay.ldv, dPs, lay.lds);  // dP = dO V^T
      __syncthreads();
      accumulate_delta<T, BM, BN>(Ss, dPs, lay.lds, lse2, kbias, p.scale_log2, delta);
    }
    // The owner (lane 0) of row m's sum writes it (without keys there is no dK/dV block to read it).
    if (p.Nk > 0) {
      for (int m = warp; m < BM; m += kWarps) {
        const int i = q0 + m;
        if (lane == 0 && i < p.Nq) p.delta[(static_cast<int64_t>(b) * p.H + h) * p.Nq + i] = delta[m];
      }
    }
  }

  for (int k0 = 0; k0 < p.Nk; k0 += BN) {
    if (!kOwnDelta || k0 > 0) {  // with kOwnDelta, key tile 0 is still in shared memory
      __syncthreads();           // previous readers of Ks / Vs / dSs are done
      load_concat<T>(Ks, lay.ldq, BN, k0, p.Nk, p.Dqk16, p.kc, p.s_kc, p.Dc, p.kp, p.s_kp, p.Dp, b, h, p.mask, p.s_mask);
      load_concat<T>(Vs, lay.ldv, BN, k0, p.Nk, p.Dv16, p.v, p.s_v, p.Dv, nullptr, nullptr, 0, b, h, p.mask, p.s_mask);
      load_key_bias<T, BN>(kbias, p, b, k0);
      __syncthreads();
      block_gemm<T, true, false, false>(BM, BN, p.Dqk16, Qs, lay.ldq, Ks, lay.ldq, Ss, lay.lds);   // S = Q K^T
      block_gemm<T, true, false, false>(BM, BN, p.Dv16, dOs, lay.ldv, Vs, lay.ldv, dPs, lay.lds);  // dP = dO V^T
    }
    __syncthreads();  // kOwnDelta, k0 = 0: also publishes delta (written by lane 0 of each row's warp)
    probs_and_dscores<T, BM, BN>(Ss, dPs, lay.lds, nullptr, dSs, lay.ldp, lse2, delta, kbias, p.scale_log2);
    __syncthreads();
    block_gemm<T, true, true, true>(BM, p.Dqk16, BN, dSs, lay.ldp, Ks, lay.ldq, dQ, lay.ldg);  // dQ += dS K
  }
  __syncthreads();
  store_split<T>(dQ, lay.ldg, BM, q0, p.Nq, p.Nq, p.H, b, h, p.gqc, p.Dc, p.gqp, p.Dp, p.scale);
}

// ------------------------------------------------------------------------------------------------
// host

const char* kOp = "content_position_attention";

void strides4(const at::Tensor& t, int64_t* s) {
  for (int d = 0; d < 4; ++d) s[d] = t.stride(d);
}

void check_head_dims(const AttentionSizes& s) {
  TORCH_CHECK(s.Dc <= kMaxHeadDim, "dabdetr.content_position_attention: the CUDA kernel takes head dims up to ",
              kMaxHeadDim, "; 'q_content' / 'k_content' have Dc = ", s.Dc,
              " (use backend='torch' or the CPU kernel for larger heads)");
  TORCH_CHECK(s.Dp <= kMaxHeadDim, "dabdetr.content_position_attention: the CUDA kernel takes head dims up to ",
              kMaxHeadDim, "; 'q_pos' / 'k_pos' have Dp = ", s.Dp,
              " (use backend='torch' or the CPU kernel for larger heads)");
  TORCH_CHECK(s.Dv <= kMaxHeadDim, "dabdetr.content_position_attention: the CUDA kernel takes head dims up to ",
              kMaxHeadDim, "; 'value' has Dv = ", s.Dv, " (use backend='torch' or the CPU kernel for larger heads)");
  TORCH_CHECK(s.Nq <= 2147483647LL && s.Nk <= 2147483647LL && s.B <= 2147483647LL && s.H <= 2147483647LL,
              "dabdetr.content_position_attention: sizes too large for the CUDA kernel");
}

template <typename T>
Params<T> make_params(const at::Tensor& qc, const at::Tensor& qp, const at::Tensor& kc, const at::Tensor& kp,
                      const at::Tensor& v, const c10::optional<at::Tensor>& mask, const AttentionSizes& s,
                      double scale) {
  using acc_t = typename Acc<T>::type;
  Params<T> p{};
  p.qc = reinterpret_cast<const T*>(qc.const_data_ptr());
  p.qp = reinterpret_cast<const T*>(qp.const_data_ptr());
  p.kc = reinterpret_cast<const T*>(kc.const_data_ptr());
  p.kp = reinterpret_cast<const T*>(kp.const_data_ptr());
  p.v = reinterpret_cast<const T*>(v.const_data_ptr());
  strides4(qc, p.s_qc);
  strides4(qp, p.s_qp);
  strides4(kc, p.s_kc);
  strides4(kp, p.s_kp);
  strides4(v, p.s_v);
  if (mask.has_value() && mask->defined()) {
    p.mask = mask->const_data_ptr<bool>();
    p.s_mask[0] = mask->stride(0);
    p.s_mask[1] = mask->stride(1);
  }
  p.B = static_cast<int>(s.B);
  p.H = static_cast<int>(s.H);
  p.Nq = static_cast<int>(s.Nq);
  p.Nk = static_cast<int>(s.Nk);
  p.Dc = static_cast<int>(s.Dc);
  p.Dp = static_cast<int>(s.Dp);
  p.Dv = static_cast<int>(s.Dv);
  p.Dqk16 = round16(p.Dc + p.Dp);
  p.Dv16 = round16(p.Dv);
  p.scale = static_cast<acc_t>(scale);
  p.scale_log2 = static_cast<acc_t>(scale * 1.4426950408889634073599246810018921);
  return p;
}

template <typename T, typename Kernel>
void launch(Kernel kernel, int64_t blocks, uint32_t smem, int device, cudaStream_t stream, const char* what,
            const Params<T>& p) {
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= 2147483647LL, "dabdetr.content_position_attention: too many blocks (", blocks, ") for the ",
              what, " kernel");
  TORCH_CHECK(static_cast<int64_t>(smem) <= max_smem_optin(device),
              "dabdetr.content_position_attention: the ", what, " kernel needs ", smem,
              " bytes of shared memory, the device allows ", max_smem_optin(device));
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  launch_kernel(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem, stream, p);
}

// The backward kernels in stream order. dQ before dK/dV: the latter reads delta, which the dQ kernel
// writes for float16 / bfloat16 (float32 / float64: the delta kernel, first). Nq == 0: the dK/dV
// kernel writes zeros; Nk == 0: the dQ kernel writes zeros.
template <typename T>
void launch_backward(const Params<T>& p, const AttentionSizes& s, int device, cudaStream_t stream) {
  if constexpr (!kIsHalfLike<T>) {  // a template: the half types never instantiate the delta kernel
    const int64_t rows = s.B * s.Nq * s.H;
    launch<T>(attn_bwd_delta_kernel<T>, ceil_div(rows, kWarps), 0, device, stream, "backward (delta)", p);
  }
  const BwdLayout<T> q(p.Dqk16, p.Dv16, false);
  launch<T>(attn_bwd_dq_kernel<T>, ceil_div(s.Nq, BwdLayout<T>::BM) * s.B * s.H, q.total, device, stream,
            "backward (dQ)", p);
  const BwdLayout<T> kv(p.Dqk16, p.Dv16, true);
  launch<T>(attn_bwd_dkdv_kernel<T>, ceil_div(s.Nk, BwdLayout<T>::BN) * s.B * s.H, kv.total, device, stream,
            "backward (dK, dV)", p);
}

std::tuple<at::Tensor, at::Tensor> content_position_attention_cuda(
    const at::Tensor& q_content, const at::Tensor& q_pos, const at::Tensor& k_content, const at::Tensor& k_pos,
    const at::Tensor& value, const c10::optional<at::Tensor>& key_padding_mask, double scale) {
  const AttentionSizes s = check_attention_args(q_content, q_pos, k_content, k_pos, value, key_padding_mask);
  check_cuda_tensor(q_content, kOp, "q_content");
  check_head_dims(s);
  const DeviceGuard guard(q_content.device());
  const auto acc = q_content.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({s.B, s.Nq, s.H, s.Dv}, q_content.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, q_content.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous));
  poison_output(out);
  poison_output(lse);
  if (s.B == 0 || s.H == 0 || s.Nq == 0) return {out, lse};
  const cudaStream_t stream = current_stream();
  const int device = q_content.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_content.scalar_type(), "dabdetr_cpa_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    using acc_t = typename Acc<T>::type;
    Params<T> p = make_params<T>(q_content, q_pos, k_content, k_pos, value, key_padding_mask, s, scale);
    p.out = native_mutable_ptr<scalar_t>(out);
    p.lse = lse.mutable_data_ptr<acc_t>();
    const FwdLayout<T> lay(p.Dqk16, p.Dv16);
    const int64_t blocks = ceil_div(s.Nq, FwdLayout<T>::BM) * s.B * s.H;
    launch<T>(attn_fwd_kernel<T>, blocks, lay.total, device, stream, "forward", p);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> content_position_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_content, const at::Tensor& q_pos, const at::Tensor& k_content,
    const at::Tensor& k_pos, const at::Tensor& value, const c10::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& out, const at::Tensor& logsumexp, double scale) {
  const AttentionSizes s = check_attention_args(q_content, q_pos, k_content, k_pos, value, key_padding_mask);
  check_attention_backward_args(s, grad_out, out, logsumexp, q_content);
  check_cuda_tensor(q_content, kOp, "q_content");
  check_head_dims(s);
  const DeviceGuard guard(q_content.device());
  const auto opts = q_content.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor gqc = at::empty(q_content.sizes(), opts);
  at::Tensor gqp = at::empty(q_pos.sizes(), opts);
  at::Tensor gkc = at::empty(k_content.sizes(), opts);
  at::Tensor gkp = at::empty(k_pos.sizes(), opts);
  at::Tensor gv = at::empty(value.sizes(), opts);
  for (at::Tensor* t : {&gqc, &gqp, &gkc, &gkp, &gv}) poison_output(*t);
  if (s.B == 0 || s.H == 0) return {gqc, gqp, gkc, gkp, gv};
  const at::Tensor lse = logsumexp.contiguous();
  const auto acc = q_content.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor delta = at::empty({s.B, s.H, s.Nq}, q_content.options().dtype(acc));
  poison_output(delta);
  const cudaStream_t stream = current_stream();
  const int device = q_content.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_content.scalar_type(), "dabdetr_cpa_bwd_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    using acc_t = typename Acc<T>::type;
    Params<T> p = make_params<T>(q_content, q_pos, k_content, k_pos, value, key_padding_mask, s, scale);
    p.go = reinterpret_cast<const T*>(grad_out.const_data_ptr());
    strides4(grad_out, p.s_go);
    p.o = reinterpret_cast<const T*>(out.const_data_ptr());
    strides4(out, p.s_o);
    p.lse_in = lse.const_data_ptr<acc_t>();
    p.delta = delta.mutable_data_ptr<acc_t>();
    p.gqc = native_mutable_ptr<scalar_t>(gqc);
    p.gqp = native_mutable_ptr<scalar_t>(gqp);
    p.gkc = native_mutable_ptr<scalar_t>(gkc);
    p.gkp = native_mutable_ptr<scalar_t>(gkp);
    p.gv = native_mutable_ptr<scalar_t>(gv);
    launch_backward<T>(p, s, device, stream);
  });
  return {gqc, gqp, gkc, gkp, gv};
}

}  // namespace

DABDETR_CUDA_LIBRARY(m) {
  DABDETR_CUDA_KERNEL(m, "content_position_attention", &content_position_attention_cuda);
  DABDETR_CUDA_KERNEL(m, "content_position_attention_backward", &content_position_attention_backward_cuda);
}

}  // namespace cuda
}  // namespace dabdetr
