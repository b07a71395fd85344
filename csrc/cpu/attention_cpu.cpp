// CPU kernels of content_position_attention, forward and backward (flash-attention style).
//
// Per (batch b, head h): out = softmax(scale * (q_c k_c^T + q_p k_p^T)) v over the unmasked keys.
//
// Keys: the unmasked keys of each batch element are listed once (compaction), so padded keys cost
// nothing and no tile needs a mask. A batch element with no unmasked key gives zero output,
// logsumexp -inf and zero gradients.
//
// Packing (in the accumulation type T: float32 for float32/float16/bfloat16, float64 for float64;
// half types are converted here): Q rows are packed once per work item as scale * [q_c | q_p]
// (the two dot products become one dot product over Dc + Dp and the scale is folded in); keys are
// packed one tile at a time as K^T panels of NR = 2 vectors of keys ([D][NR] per panel) plus V rows
// (forward) or K rows and V^T panels (backward). Inputs are read through their strides: a
// sequence-first view x.view(N, B, H, d).transpose(0, 1) is read without a copy (only a last dim
// with stride != 1 is made contiguous).
//
// Forward: work item = (b, h, query chunk); the chunk count per (b, h) is 1 unless B * H is too
// small to feed every thread. Loop: key tiles of kFwdKeyTile keys (outer) x strips of MR query rows
// (inner); per strip: logits tile (MR x tile) by the panel micro-kernel (MR x 2 vectors of
// accumulators, loop over Dc + Dp), online softmax in T (running max m, running sum l, output
// rescaled by exp(m_old - m_new)), then O += P V by the broadcast micro-kernel (MR x up to 3
// vectors). Memory: per thread O(query chunk * D + tile * D); never B*H*Nq*Nk.
//
// Backward (FlashAttention-2): work item = (b, h, key chunk); the chunk count is 1 unless B * H is
// too small to feed every thread. The item owns the dK/dV rows of its keys, so dK/dV need no
// atomics or reduction: they are accumulated in T in a per-thread buffer for one key tile at a time
// and written once. dQ of the item's queries is accumulated in a per-thread [Nq, D] buffer in T
// and written at the end (when a (b, h) is split into several key chunks, each chunk writes a
// partial dQ and a second pass sums them). Per (key tile x query block of kBwdQueryBlock rows):
// recompute S = Qs K^T, P = exp(S - lse), dP = dO V^T, dS = P (dP - delta) with
// delta = rowsum(dO * O); then dV += P^T dO, dK += dS^T Qs, dQ += dS K (dQ scaled at the end).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <tuple>
#include <type_traits>
#include <vector>

#include "acc_type.h"
#include "attention_checks.h"
#include "attention_kernels.h"

namespace dabdetr {
namespace cpu {
namespace {

// Keys per forward tile and backward tile, queries per backward block (rounded up to the kernel
// set's panel width / row block).
constexpr int64_t kFwdKeyTile = 256;
constexpr int64_t kBwdKeyTile = 128;
constexpr int64_t kBwdQueryBlock = 64;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// A 64-byte aligned per-thread scratch buffer.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : p_(static_cast<T*>(::operator new(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T),
                                          std::align_val_t(64)))) {}
  ~Scratch() { ::operator delete(p_, std::align_val_t(64)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() const { return p_; }

 private:
  T* p_;
};

template <typename T>
struct Kernels;
template <>
struct Kernels<float> {
  static int width(const attn::KernelSet& k) { return k.width_f; }
  static void fwd(const attn::KernelSet& k, const attn::FwdTileArgs<float>& a) { k.fwd_f(a); }
  static void bwd(const attn::KernelSet& k, const attn::BwdTileArgs<float>& a) { k.bwd_f(a); }
};
template <>
struct Kernels<double> {
  static int width(const attn::KernelSet& k) { return k.width_d; }
  static void fwd(const attn::KernelSet& k, const attn::FwdTileArgs<double>& a) { k.fwd_d(a); }
  static void bwd(const attn::KernelSet& k, const attn::BwdTileArgs<double>& a) { k.bwd_d(a); }
};

// A [B, N, H, d] tensor with a contiguous last dim, read through its strides.
template <typename scalar_t>
struct View4 {
  const scalar_t* p;
  int64_t s0, s1, s2;
  explicit View4(const at::Tensor& t) : p(t.const_data_ptr<scalar_t>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  const scalar_t* row(int64_t b, int64_t n, int64_t h) const { return p + b * s0 + n * s1 + h * s2; }
};

at::Tensor last_dim_contiguous(const at::Tensor& t) { return (t.size(3) <= 1 || t.stride(3) == 1) ? t : t.contiguous(); }

// The unmasked keys of each batch element.
struct KeyList {
  bool all = true;             // no mask: key j of every batch element is j
  int64_t nk = 0;
  std::vector<int64_t> idx;    // [B, nk]: compacted key indices
  std::vector<int64_t> count;  // [B]
  int64_t size(int64_t b) const { return all ? nk : count[b]; }
  int64_t key(int64_t b, int64_t j) const { return all ? j : idx[b * nk + j]; }
};

KeyList make_key_list(const c10::optional<at::Tensor>& mask, int64_t B, int64_t Nk) {
  KeyList keys;
  keys.nk = Nk;
  if (!mask.has_value() || !mask->defined()) return keys;
  keys.all = false;
  const at::Tensor m = mask->contiguous();
  const bool* mp = m.const_data_ptr<bool>();
  keys.idx.resize(static_cast<size_t>(B * Nk));
  keys.count.assign(static_cast<size_t>(B), 0);
  for (int64_t b = 0; b < B; ++b) {
    int64_t c = 0;
    for (int64_t j = 0; j < Nk; ++j) {
      if (!mp[b * Nk + j]) keys.idx[b * Nk + c++] = j;
    }
    keys.count[b] = c;
  }
  return keys;
}

// How many chunks to split each (b, h) into so that every thread gets work.
int64_t chunks_per_head(int64_t bh, int64_t extent, int64_t min_chunk) {
  const int64_t nthreads = at::get_num_threads();
  if (bh >= 2 * nthreads || extent <= min_chunk) return 1;
  return std::max<int64_t>(1, std::min(ceil_div(2 * nthreads, bh), extent / min_chunk));
}

// Prefetches the `n` elements at p (the input rows are strided, often sequence-first: the
// hardware prefetcher does not follow them, and packing would wait on every row).
template <typename scalar_t>
inline void prefetch_row(const scalar_t* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(scalar_t)); off += 64) __builtin_prefetch(c + off);
}

constexpr int64_t kPrefetchRows = 8;

// Packs rows [n0, n0 + count) of x_c and x_p (one (b, h)) as dst[r][0:ld] = mul * [x_c | x_p],
// zero-padded to `rows` rows and `ld` columns.
template <typename scalar_t, typename T>
void pack_rows2(const View4<scalar_t>& xc, int64_t dc, const View4<scalar_t>* xp, int64_t dp, int64_t b, int64_t h,
                int64_t n0, int64_t count, int64_t rows, int64_t ld, T mul, T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    T* d = dst + r * ld;
    int64_t i = 0;
    if (r < count) {
      if (r + kPrefetchRows < count) {
        prefetch_row(xc.row(b, n0 + r + kPrefetchRows, h), dc);
        if (xp != nullptr) prefetch_row(xp->row(b, n0 + r + kPrefetchRows, h), dp);
      }
      const scalar_t* a = xc.row(b, n0 + r, h);
      for (int64_t k = 0; k < dc; ++k) d[i++] = static_cast<T>(a[k]) * mul;
      if (xp != nullptr) {
        const scalar_t* c = xp->row(b, n0 + r, h);
        for (int64_t k = 0; k < dp; ++k) d[i++] = static_cast<T>(c[k]) * mul;
      }
    }
    for (; i < ld; ++i) d[i] = T(0);
  }
}

// Packs keys j < kpad of a tile (keys.key(b, k0 + j) for j < kn, zero beyond) of x_c (and x_p) as
// K^T panels [kpad / nr][dc + dp][nr] and, when rows != nullptr, also as rows [kpad][ld].
template <typename scalar_t, typename T>
void pack_panels(const View4<scalar_t>& xc, int64_t dc, const View4<scalar_t>* xp, int64_t dp, const KeyList& keys,
                 int64_t b, int64_t h, int64_t k0, int64_t kn, int64_t kpad, int64_t nr, T* dst, T* rows = nullptr,
                 int64_t ld = 0) {
  const int64_t d = dc + dp;
  for (int64_t j = 0; j < kpad; ++j) {
    T* pc = dst + (j / nr) * d * nr + (j % nr);
    T* row = rows != nullptr ? rows + j * ld : nullptr;
    if (j < kn) {
      if (j + kPrefetchRows < kn) {
        const int64_t next = keys.key(b, k0 + j + kPrefetchRows);
        prefetch_row(xc.row(b, next, h), dc);
        if (xp != nullptr) prefetch_row(xp->row(b, next, h), dp);
      }
      const int64_t key = keys.key(b, k0 + j);
      const scalar_t* a = xc.row(b, key, h);
      for (int64_t k = 0; k < dc; ++k) pc[k * nr] = static_cast<T>(a[k]);
      if (xp != nullptr) {
        const scalar_t* c = xp->row(b, key, h);
        for (int64_t k = 0; k < dp; ++k) pc[(dc + k) * nr] = static_cast<T>(c[k]);
      }
      if (row != nullptr) {
        for (int64_t k = 0; k < d; ++k) row[k] = pc[k * nr];
        for (int64_t k = d; k < ld; ++k) row[k] = T(0);
      }
    } else {
      for (int64_t k = 0; k < d; ++k) pc[k * nr] = T(0);
      if (row != nullptr) {
        for (int64_t k = 0; k < ld; ++k) row[k] = T(0);
      }
    }
  }
}

// Packs keys of a tile as rows dst[j][0:ld] = [x_c | x_p], zero-padded to kpad rows.
template <typename scalar_t, typename T>
void pack_key_rows(const View4<scalar_t>& xc, int64_t dc, const View4<scalar_t>* xp, int64_t dp, const KeyList& keys,
                   int64_t b, int64_t h, int64_t k0, int64_t kn, int64_t kpad, int64_t ld, T* dst) {
  for (int64_t j = 0; j < kpad; ++j) {
    T* d = dst + j * ld;
    int64_t i = 0;
    if (j < kn) {
      if (j + kPrefetchRows < kn) {
        const int64_t next = keys.key(b, k0 + j + kPrefetchRows);
        prefetch_row(xc.row(b, next, h), dc);
        if (xp != nullptr) prefetch_row(xp->row(b, next, h), dp);
      }
      const int64_t key = keys.key(b, k0 + j);
      const scalar_t* a = xc.row(b, key, h);
      for (int64_t k = 0; k < dc; ++k) d[i++] = static_cast<T>(a[k]);
      if (xp != nullptr) {
        const scalar_t* c = xp->row(b, key, h);
        for (int64_t k = 0; k < dp; ++k) d[i++] = static_cast<T>(c[k]);
      }
    }
    for (; i < ld; ++i) d[i] = T(0);
  }
}

// Flash-attention forward of `rows` packed query rows (scale folded in) of head (b, h) over all of
// b's unmasked keys: leaves the unnormalized output in o [rows][ldv], the running max in m and the
// running sum in l (o, m, l are initialized here).
template <typename scalar_t, typename T>
void attend_rows(const attn::KernelSet& ks, const T* q, int64_t ldq, int64_t rows, int64_t D,
                 const View4<scalar_t>& kc, int64_t Dc, const View4<scalar_t>& kp, int64_t Dp,
                 const View4<scalar_t>& vv, int64_t Dv, int64_t ldv, const KeyList& keys, int64_t b, int64_t h,
                 int64_t KB, int64_t NR, T* kpan, T* vrows, T* sbuf, T* o, T* m, T* l) {
  std::fill(o, o + rows * ldv, T(0));
  std::fill(m, m + rows, -std::numeric_limits<T>::infinity());
  std::fill(l, l + rows, T(0));
  const int64_t nk = keys.size(b);
  for (int64_t k0 = 0; k0 < nk; k0 += KB) {
    const int64_t kn = std::min(KB, nk - k0), kpad = round_up(kn, NR);
    pack_panels<scalar_t, T>(kc, Dc, &kp, Dp, keys, b, h, k0, kn, kpad, NR, kpan);
    pack_key_rows<scalar_t, T>(vv, Dv, nullptr, 0, keys, b, h, k0, kn, kpad, ldv, vrows);
    attn::FwdTileArgs<T> a{q, ldq, rows, D, kpan, vrows, ldv, kn, kpad, o, m, l, sbuf};
    Kernels<T>::fwd(ks, a);
  }
}

template <typename scalar_t>
void forward_impl(const at::Tensor& q_content, const at::Tensor& q_pos, const at::Tensor& k_content,
                  const at::Tensor& k_pos, const at::Tensor& value, const KeyList& keys, const AttentionSizes& s,
                  double scale, at::Tensor& out, at::Tensor& lse) {
  using T = typename AccType<scalar_t>::type;
  const attn::KernelSet& ks = attn::kernel_set();
  const int64_t W = Kernels<T>::width(ks), NR = 2 * W, MR = ks.mr;
  const int64_t B = s.B, Nq = s.Nq, H = s.H, Dc = s.Dc, Dp = s.Dp, Dv = s.Dv, D = Dc + Dp;
  const int64_t ldq = round_up(D, W), ldv = round_up(Dv, W);
  const int64_t KB = round_up(kFwdKeyTile, NR);
  const View4<scalar_t> qc(q_content), qp(q_pos), kc(k_content), kp(k_pos), vv(value);
  scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
  T* lse_p = lse.mutable_data_ptr<T>();
  const T sc = static_cast<T>(scale);
  const int64_t BH = B * H;
  int64_t nqc = chunks_per_head(BH, Nq, 4 * MR);
  const int64_t qchunk = round_up(ceil_div(Nq, nqc), MR);
  nqc = ceil_div(Nq, qchunk);
  const T ninf = -std::numeric_limits<T>::infinity();

  at::parallel_for(0, BH * nqc, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> qbuf(qchunk * ldq), obuf(qchunk * ldv), mbuf(qchunk), lbuf(qchunk);
    Scratch<T> kpan(KB * D), vrows(KB * ldv), sbuf(MR * KB);
    for (int64_t it = begin; it < end; ++it) {
      // Batch fastest, so that a thread's contiguous range mixes batch elements (mask balance).
      const int64_t b = it % B, h = (it / B) % H, c = it / BH;
      const int64_t q0 = c * qchunk, qn = std::min(qchunk, Nq - q0), rows = round_up(qn, MR);
      const int64_t nk = keys.size(b);
      if (nk == 0) {
        for (int64_t r = 0; r < qn; ++r) {
          scalar_t* o = out_p + ((b * Nq + q0 + r) * H + h) * Dv;
          for (int64_t d = 0; d < Dv; ++d) o[d] = scalar_t(0);
          lse_p[(b * H + h) * Nq + q0 + r] = ninf;
        }
        continue;
      }
      pack_rows2<scalar_t, T>(qc, Dc, &qp, Dp, b, h, q0, qn, rows, ldq, sc, qbuf.data());
      attend_rows<scalar_t, T>(ks, qbuf.data(), ldq, rows, D, kc, Dc, kp, Dp, vv, Dv, ldv, keys, b, h, KB, NR,
                               kpan.data(), vrows.data(), sbuf.data(), obuf.data(), mbuf.data(), lbuf.data());
      for (int64_t r = 0; r < qn; ++r) {
        const T l = lbuf.data()[r];
        const T inv = T(1) / l;
        const T* o = obuf.data() + r * ldv;
        scalar_t* dst = out_p + ((b * Nq + q0 + r) * H + h) * Dv;
        for (int64_t d = 0; d < Dv; ++d) dst[d] = static_cast<scalar_t>(o[d] * inv);
        lse_p[(b * H + h) * Nq + q0 + r] = mbuf.data()[r] + std::log(l);
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& q_content, const at::Tensor& q_pos,
                   const at::Tensor& k_content, const at::Tensor& k_pos, const at::Tensor& value,
                   const at::Tensor& out, const at::Tensor& lse, const KeyList& keys, const AttentionSizes& s,
                   double scale, at::Tensor& gqc, at::Tensor& gqp, at::Tensor& gkc, at::Tensor& gkp, at::Tensor& gv) {
  using T = typename AccType<scalar_t>::type;
  const attn::KernelSet& ks = attn::kernel_set();
  const int64_t W = Kernels<T>::width(ks), NR = 2 * W, MR = ks.mr;
  const int64_t B = s.B, Nq = s.Nq, Nk = s.Nk, H = s.H, Dc = s.Dc, Dp = s.Dp, Dv = s.Dv, D = Dc + Dp;
  const int64_t ldq = round_up(D, W), ldv = round_up(Dv, W);
  const int64_t KB = round_up(kBwdKeyTile, NR), QB = round_up(kBwdQueryBlock, MR);
  const int64_t Nqp = round_up(Nq, MR);
  const View4<scalar_t> qc(q_content), qp(q_pos), kc(k_content), kp(k_pos), vv(value), go(grad_out), oo(out);
  const T* lse_p = lse.const_data_ptr<T>();
  scalar_t* gqc_p = gqc.mutable_data_ptr<scalar_t>();
  scalar_t* gqp_p = gqp.mutable_data_ptr<scalar_t>();
  scalar_t* gkc_p = gkc.mutable_data_ptr<scalar_t>();
  scalar_t* gkp_p = gkp.mutable_data_ptr<scalar_t>();
  scalar_t* gv_p = gv.mutable_data_ptr<scalar_t>();
  const T sc = static_cast<T>(scale);
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t BH = B * H;
  const int64_t nkc = chunks_per_head(BH, Nk, KB);
  // Partial dQ of each key chunk (only when a (b, h) is split).
  std::vector<T> dq_part(nkc > 1 ? static_cast<size_t>(BH * nkc * Nq * D) : 0);

  at::parallel_for(0, BH * nkc, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> qbuf(Nqp * ldq), dobuf(Nqp * ldv), lbuf(Nqp), delta(Nqp), dqacc(Nqp * ldq);
    Scratch<T> kpan(KB * D), krows(KB * ldq), vpan(KB * Dv), dkacc(KB * ldq), dvacc(KB * ldv);
    Scratch<T> pbuf(QB * KB), dsbuf(QB * KB);
    // Float32 recomputation of the output (half types only, see delta below).
    constexpr bool kRecomputeOut = !std::is_same_v<scalar_t, T>;
    const int64_t KF = round_up(kFwdKeyTile, NR);
    Scratch<T> ofull(kRecomputeOut ? Nqp * ldv : 0), mfull(kRecomputeOut ? Nqp : 0), lfull(kRecomputeOut ? Nqp : 0);
    Scratch<T> fpan(kRecomputeOut ? KF * D : 0), frows(kRecomputeOut ? KF * ldv : 0), fscr(kRecomputeOut ? MR * KF : 0);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it % B, h = (it / B) % H, c = it / BH;
      const int64_t nk = keys.size(b);
      const int64_t per = ceil_div(nk, nkc);
      const int64_t ka = std::min(nk, c * per), kb = std::min(nk, ka + per);
      T* dq = dqacc.data();
      std::fill(dq, dq + Nqp * ldq, T(0));
      if (ka < kb) {
        pack_rows2<scalar_t, T>(qc, Dc, &qp, Dp, b, h, 0, Nq, Nqp, ldq, sc, qbuf.data());
        pack_rows2<scalar_t, T>(go, Dv, nullptr, 0, b, h, 0, Nq, Nqp, ldv, T(1), dobuf.data());
        // delta = rowsum(dO * O). For float16/bfloat16 the saved output was rounded to the input
        // dtype, which would put an error of eps_half * |delta| into every dS = P (dP - delta) and
        // ruin gradients that cancel; so O is recomputed in float32 (one forward pass) instead.
        const T* o_acc = nullptr;
        if constexpr (!std::is_same_v<scalar_t, T>) {
          attend_rows<scalar_t, T>(ks, qbuf.data(), ldq, Nqp, D, kc, Dc, kp, Dp, vv, Dv, ldv, keys, b, h, KF, NR,
                                   fpan.data(), frows.data(), fscr.data(), ofull.data(), mfull.data(), lfull.data());
          for (int64_t r = 0; r < Nqp; ++r) {
            const T inv = lfull.data()[r] > T(0) ? T(1) / lfull.data()[r] : T(0);
            T* o = ofull.data() + r * ldv;
            for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
          }
          o_acc = ofull.data();
        }
        for (int64_t r = 0; r < Nqp; ++r) {
          if (r < Nq) {
            const T l = lse_p[(b * H + h) * Nq + r];
            // A row without keys (lse = -inf) has zero probabilities: p = exp(s - (+inf)) = 0.
            lbuf.data()[r] = l == -inf ? inf : l;
            const T* g = dobuf.data() + r * ldv;
            T acc = 0;
            if (o_acc != nullptr) {
              const T* o = o_acc + r * ldv;
              for (int64_t d = 0; d < Dv; ++d) acc += g[d] * o[d];
            } else {
              const scalar_t* o = oo.row(b, r, h);
              for (int64_t d = 0; d < Dv; ++d) acc += g[d] * static_cast<T>(o[d]);
            }
            delta.data()[r] = acc;
          } else {
            lbuf.data()[r] = inf;
            delta.data()[r] = T(0);
          }
        }
        for (int64_t k0 = ka; k0 < kb; k0 += KB) {
          const int64_t kn = std::min(KB, kb - k0), kpad = round_up(kn, NR);
          pack_panels<scalar_t, T>(kc, Dc, &kp, Dp, keys, b, h, k0, kn, kpad, NR, kpan.data(), krows.data(), ldq);
          pack_panels<scalar_t, T>(vv, Dv, nullptr, 0, keys, b, h, k0, kn, kpad, NR, vpan.data());
          std::fill(dkacc.data(), dkacc.data() + kpad * ldq, T(0));
          std::fill(dvacc.data(), dvacc.data() + kpad * ldv, T(0));
          for (int64_t q0 = 0; q0 < Nqp; q0 += QB) {
            const int64_t rows = std::min(QB, Nqp - q0);
            attn::BwdTileArgs<T> a{qbuf.data() + q0 * ldq, ldq,         dobuf.data() + q0 * ldv,
                                   ldv,                    lbuf.data() + q0, delta.data() + q0,
                                   rows,                   D,           Dv,
                                   kpan.data(),            krows.data(), vpan.data(),
                                   kn,                     kpad,        dq + q0 * ldq,
                                   dkacc.data(),           dvacc.data(), pbuf.data(),
                                   dsbuf.data()};
            Kernels<T>::bwd(ks, a);
          }
          for (int64_t j = 0; j < kn; ++j) {
            const int64_t key = keys.key(b, k0 + j);
            const int64_t row = (b * Nk + key) * H + h;
            const T* dk = dkacc.data() + j * ldq;
            const T* dvr = dvacc.data() + j * ldv;
            for (int64_t d = 0; d < Dc; ++d) gkc_p[row * Dc + d] = static_cast<scalar_t>(dk[d]);
            for (int64_t d = 0; d < Dp; ++d) gkp_p[row * Dp + d] = static_cast<scalar_t>(dk[Dc + d]);
            for (int64_t d = 0; d < Dv; ++d) gv_p[row * Dv + d] = static_cast<scalar_t>(dvr[d]);
          }
        }
      }
      if (nkc == 1) {
        for (int64_t r = 0; r < Nq; ++r) {
          const int64_t row = (b * Nq + r) * H + h;
          const T* g = dq + r * ldq;
          for (int64_t d = 0; d < Dc; ++d) gqc_p[row * Dc + d] = static_cast<scalar_t>(g[d] * sc);
          for (int64_t d = 0; d < Dp; ++d) gqp_p[row * Dp + d] = static_cast<scalar_t>(g[Dc + d] * sc);
        }
      } else {
        T* part = dq_part.data() + ((b * H + h) * nkc + c) * Nq * D;
        for (int64_t r = 0; r < Nq; ++r) {
          for (int64_t d = 0; d < D; ++d) part[r * D + d] = dq[r * ldq + d] * sc;
        }
      }
    }
  });

  if (nkc > 1) {
    at::parallel_for(0, BH * Nq, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bh = i / Nq, r = i % Nq, b = bh / H, h = bh % H;
        const int64_t row = (b * Nq + r) * H + h;
        for (int64_t d = 0; d < D; ++d) {
          T acc = 0;
          for (int64_t c = 0; c < nkc; ++c) acc += dq_part[((bh * nkc + c) * Nq + r) * D + d];
          if (d < Dc) {
            gqc_p[row * Dc + d] = static_cast<scalar_t>(acc);
          } else {
            gqp_p[row * Dp + d - Dc] = static_cast<scalar_t>(acc);
          }
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> content_position_attention_cpu(const at::Tensor& q_content,
                                                                  const at::Tensor& q_pos,
                                                                  const at::Tensor& k_content,
                                                                  const at::Tensor& k_pos, const at::Tensor& value,
                                                                  const c10::optional<at::Tensor>& key_padding_mask,
                                                                  double scale) {
  const AttentionSizes s = check_attention_args(q_content, q_pos, k_content, k_pos, value, key_padding_mask);
  const auto acc = q_content.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({s.B, s.Nq, s.H, s.Dv}, q_content.options());
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, q_content.options().dtype(acc));
  if (s.B == 0 || s.H == 0 || s.Nq == 0) return {out, lse};
  if (s.Nk == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  const KeyList keys = make_key_list(key_padding_mask, s.B, s.Nk);
  const at::Tensor qc = last_dim_contiguous(q_content), qp = last_dim_contiguous(q_pos);
  const at::Tensor kc = last_dim_contiguous(k_content), kp = last_dim_contiguous(k_pos);
  const at::Tensor v = last_dim_contiguous(value);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_content.scalar_type(), "dabdetr_cpa_cpu", [&] {
    forward_impl<scalar_t>(qc, qp, kc, kp, v, keys, s, scale, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> content_position_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_content, const at::Tensor& q_pos, const at::Tensor& k_content,
    const at::Tensor& k_pos, const at::Tensor& value, const c10::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& out, const at::Tensor& logsumexp, double scale) {
  const AttentionSizes s = check_attention_args(q_content, q_pos, k_content, k_pos, value, key_padding_mask);
  check_attention_backward_args(s, grad_out, out, logsumexp, q_content);
  const auto opts = q_content.options();
  const bool masked = key_padding_mask.has_value() && key_padding_mask->defined();
  const bool empty = s.B == 0 || s.H == 0 || s.Nq == 0 || s.Nk == 0;
  // Masked keys get no update: their gradient rows must start at zero.
  auto alloc_k = [&](int64_t d) {
    return (masked || empty) ? at::zeros({s.B, s.Nk, s.H, d}, opts) : at::empty({s.B, s.Nk, s.H, d}, opts);
  };
  at::Tensor gqc = empty ? at::zeros({s.B, s.Nq, s.H, s.Dc}, opts) : at::empty({s.B, s.Nq, s.H, s.Dc}, opts);
  at::Tensor gqp = empty ? at::zeros({s.B, s.Nq, s.H, s.Dp}, opts) : at::empty({s.B, s.Nq, s.H, s.Dp}, opts);
  at::Tensor gkc = alloc_k(s.Dc), gkp = alloc_k(s.Dp), gv = alloc_k(s.Dv);
  if (empty) return {gqc, gqp, gkc, gkp, gv};
  const KeyList keys = make_key_list(key_padding_mask, s.B, s.Nk);
  const at::Tensor qc = last_dim_contiguous(q_content), qp = last_dim_contiguous(q_pos);
  const at::Tensor kc = last_dim_contiguous(k_content), kp = last_dim_contiguous(k_pos);
  const at::Tensor v = last_dim_contiguous(value), go = last_dim_contiguous(grad_out);
  const at::Tensor o = last_dim_contiguous(out), lse = logsumexp.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_content.scalar_type(), "dabdetr_cpa_backward_cpu", [&] {
    backward_impl<scalar_t>(go, qc, qp, kc, kp, v, o, lse, keys, s, scale, gqc, gqp, gkc, gkp, gv);
  });
  return {gqc, gqp, gkc, gkp, gv};
}

}  // namespace
}  // namespace cpu
}  // namespace dabdetr

TORCH_LIBRARY_IMPL(dabdetr, CPU, m) {
  m.impl("content_position_attention", &dabdetr::cpu::content_position_attention_cpu);
  m.impl("content_position_attention_backward", &dabdetr::cpu::content_position_attention_backward_cpu);
}
