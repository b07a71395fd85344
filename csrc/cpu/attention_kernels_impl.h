// Tile kernels of the CPU content_position_attention, written once for any vector width.
//
// NO include guard: attention_kernels.cpp includes this file once per instruction set, each time
// inside a `#pragma GCC target(...)` region and with these macros defined:
//   ATTN_NS        namespace of this instantiation (e.g. avx512)
//   ATTN_VBYTES    vector size in bytes (64, 32, 16)
//   ATTN_VF        float vector type (__m512, __m256, __m128, or a GCC generic vector)
//   ATTN_VD        double vector type
//   ATTN_SET1_PS / ATTN_SET1_PD           broadcast a scalar
//   ATTN_FMA_PS / ATTN_FMA_PD(a, b, c)    a * b + c (fused where the ISA has FMA)
//   ATTN_MR        rows of a micro-tile (divides 2 * vector width for float and double)
//   ATTN_NVMAX     most output vectors per row in the broadcast micro-kernel (MR * NVMAX
//                  accumulators must fit the register file)
// Vectors are the ISA's own types used through GCC vector extensions (operators, lane access,
// comparisons); FMA and broadcast go through intrinsics because the extension is compiled with
// -std=c++20, where GCC does not contract a * b + c.

namespace ATTN_NS {

using vf = ATTN_VF;
using vd = ATTN_VD;
typedef int vi __attribute__((vector_size(ATTN_VBYTES)));

constexpr int MR = ATTN_MR;
constexpr int NVMAX = ATTN_NVMAX;

template <typename T>
struct VT;
template <>
struct VT<float> {
  using V = vf;
  static constexpr int W = ATTN_VBYTES / 4;
};
template <>
struct VT<double> {
  using V = vd;
  static constexpr int W = ATTN_VBYTES / 8;
};

static ATTN_INLINE vf fmadd(vf a, vf b, vf c) { return ATTN_FMA_PS(a, b, c); }
static ATTN_INLINE vd fmadd(vd a, vd b, vd c) { return ATTN_FMA_PD(a, b, c); }
static ATTN_INLINE vf set1(float x) { return ATTN_SET1_PS(x); }
static ATTN_INLINE vd set1(double x) { return ATTN_SET1_PD(x); }

template <typename V, typename T>
static ATTN_INLINE V loadu(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
static ATTN_INLINE void storeu(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// exp(x) for a float vector: Cephes-style range reduction x = n ln2 + r, |r| <= ln2 / 2, degree-6
// polynomial for e^r, 2^n built in the exponent bits. Max error ~1 ulp over the normal range;
// x < -87.34 (result below FLT_MIN, including -inf) gives exactly 0; x > 88.38 saturates (the
// attention kernels only evaluate x <= ~0). NaN propagates.
static ATTN_INLINE vf exp_ps(vf x) {
  const vf hi = set1(88.3762626647949f);
  const vf lo = set1(-87.3365447505531f);
  const auto tiny = x < lo;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const vf magic = set1(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = fmadd(x, set1(1.44269504088896341f), magic);
  const vi n = (vi)t - 0x4B400000;
  const vf fn = t - magic;
  vf r = fmadd(fn, set1(-0.693359375f), x);  // ln2 split: hi part exact for |n| <= 256
  r = fmadd(fn, set1(2.12194440e-4f), r);
  vf y = set1(1.9875691500e-4f);
  y = fmadd(y, r, set1(1.3981999507e-3f));
  y = fmadd(y, r, set1(8.3334519073e-3f));
  y = fmadd(y, r, set1(4.1665795894e-2f));
  y = fmadd(y, r, set1(1.6666665459e-1f));
  y = fmadd(y, r, set1(5.0000001201e-1f));
  y = fmadd(y, r * r, r + set1(1.0f));
  const vf pow2n = (vf)((n + 127) << 23);
  const vf res = y * pow2n;
  return tiny ? set1(0.0f) : res;
}

template <typename T>
static ATTN_INLINE T hmax(typename VT<T>::V v) {
  T m = v[0];
  for (int i = 1; i < VT<T>::W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
template <typename T>
static ATTN_INLINE T hsum(typename VT<T>::V v) {
  T s = v[0];
  for (int i = 1; i < VT<T>::W; ++i) s += v[i];
  return s;
}

// C[MR][NR] = A[MR][kdim] * Bp[kdim][NR], NR = 2W: the logits micro-kernel (A = scaled Q rows or
// dO rows, broadcast; Bp = one K^T or V^T panel). MR x 2 accumulators.
template <typename T>
static void panel_tile(const T* __restrict a, int64_t lda, const T* __restrict bp, int64_t kdim, T* __restrict c,
                       int64_t ldc) {
  using V = typename VT<T>::V;
  constexpr int W = VT<T>::W;
  V acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    acc0[r] = set1(T(0));
    acc1[r] = set1(T(0));
  }
  for (int64_t k = 0; k < kdim; ++k) {
    const V b0 = loadu<V>(bp + k * 2 * W);
    const V b1 = loadu<V>(bp + k * 2 * W + W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V x = set1(a[r * lda + k]);
      acc0[r] = fmadd(x, b0, acc0[r]);
      acc1[r] = fmadd(x, b1, acc1[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    storeu(c + r * ldc, acc0[r]);
    storeu(c + r * ldc + W, acc1[r]);
  }
}

// C[m][0 : NV*W] += sum_k A(m, k) * B[k][0 : NV*W] for m < MR, A(m, k) = a[m * am + k * ak]
// (broadcast). Covers P @ V, dS @ K (A row-major), and P^T @ dO, dS^T @ Q (A transposed).
template <typename T, int NV>
static void bcast_tile(const T* __restrict a, int64_t am, int64_t ak, int64_t kdim, const T* __restrict b,
                       int64_t ldb, T* __restrict c, int64_t ldc) {
  using V = typename VT<T>::V;
  constexpr int W = VT<T>::W;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = loadu<V>(c + r * ldc + j * W);
  }
  for (int64_t k = 0; k < kdim; ++k) {
    V bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = loadu<V>(b + k * ldb + j * W);
    const T* ak_ptr = a + k * ak;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V x = set1(ak_ptr[r * am]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = fmadd(x, bv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) storeu(c + r * ldc + j * W, acc[r][j]);
  }
}

// C[m][0:ncols] += sum_{k < kdim} A(m, k) B[k][0:ncols] for m < mrows (a multiple of MR), ncols a
// multiple of W. Columns are split into chunks of at most NVMAX vectors, as even as possible.
template <typename T>
static void bcast_gemm(const T* a, int64_t am, int64_t ak, int64_t mrows, int64_t kdim, const T* b, int64_t ldb,
                       int64_t ncols, T* c, int64_t ldc) {
  constexpr int W = VT<T>::W;
  const int64_t nvec = ncols / W;
  if (nvec == 0 || kdim == 0) return;
  const int64_t nchunks = (nvec + NVMAX - 1) / NVMAX;
  int64_t v0 = 0;
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const int64_t nv = (nvec - v0) / (nchunks - ch);
    const T* bc = b + v0 * W;
    for (int64_t r0 = 0; r0 < mrows; r0 += MR) {
      const T* ar = a + r0 * am;
      T* cr = c + r0 * ldc + v0 * W;
      switch (nv) {
        case 1:
          bcast_tile<T, 1>(ar, am, ak, kdim, bc, ldb, cr, ldc);
          break;
#if ATTN_NVMAX >= 2
        case 2:
          bcast_tile<T, 2>(ar, am, ak, kdim, bc, ldb, cr, ldc);
          break;
#endif
#if ATTN_NVMAX >= 3
        case 3:
          bcast_tile<T, 3>(ar, am, ak, kdim, bc, ldb, cr, ldc);
          break;
#endif
        default:
          break;
      }
    }
    v0 += nv;
  }
}

// Online-softmax step of one row of logits s[0:n] (n a multiple of W; entries past the valid keys
// are -inf): s <- exp(s - m_new), returns the row sum.
template <typename T>
static T exp_shift_sum(T* s, int64_t n, T mnew) {
  using V = typename VT<T>::V;
  constexpr int W = VT<T>::W;
  if constexpr (std::is_same_v<T, float>) {
    const V mv = set1(mnew);
    V acc = set1(0.0f);
    for (int64_t j = 0; j < n; j += W) {
      const V e = exp_ps(loadu<V>(s + j) - mv);
      storeu(s + j, e);
      acc += e;
    }
    return hsum<T>(acc);
  } else {
    T acc = 0;
    for (int64_t j = 0; j < n; ++j) {
      const T e = std::exp(s[j] - mnew);
      s[j] = e;
      acc += e;
    }
    return acc;
  }
}

template <typename T>
static T row_max(const T* s, int64_t n) {
  using V = typename VT<T>::V;
  constexpr int W = VT<T>::W;
  V mx = loadu<V>(s);
  for (int64_t j = W; j < n; j += W) {
    const V x = loadu<V>(s + j);
    mx = x > mx ? x : mx;
  }
  return hmax<T>(mx);
}

template <typename T>
static void fwd_tile(const attn::FwdTileArgs<T>& t) {
  using V = typename VT<T>::V;
  constexpr int W = VT<T>::W;
  constexpr int NR = 2 * W;
  const int64_t np = t.kpad / NR;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t r0 = 0; r0 < t.rows; r0 += MR) {
    const T* qs = t.q + r0 * t.ldq;
    for (int64_t p = 0; p < np; ++p) {
      panel_tile<T>(qs, t.ldq, t.kpanel + p * t.d * NR, t.d, t.s + p * NR, t.kpad);
    }
    for (int r = 0; r < MR; ++r) {
      T* s = t.s + r * t.kpad;
      for (int64_t j = t.kn; j < t.kpad; ++j) s[j] = ninf;
      const T mold = t.m[r0 + r];
      const T mx = row_max<T>(s, t.kpad);
      const T mnew = mx > mold ? mx : mold;
      const T alpha = std::exp(mold - mnew);  // 0 on the first tile (mold = -inf)
      const T sum = exp_shift_sum<T>(s, t.kpad, mnew);
      t.l[r0 + r] = t.l[r0 + r] * alpha + sum;
      t.m[r0 + r] = mnew;
      if (alpha != T(1)) {
        T* o = t.o + (r0 + r) * t.ldv;
        const V av = set1(alpha);
        for (int64_t j = 0; j < t.ldv; j += W) storeu(o + j, loadu<V>(o + j) * av);
      }
    }
    bcast_gemm<T>(t.s, t.kpad, 1, MR, t.kn, t.v, t.ldv, t.ldv, t.o + r0 * t.ldv, t.ldv);
  }
}

template <typename T>
static void bwd_tile(const attn::BwdTileArgs<T>& t) {
  using V = typename VT<T>::V;
  constexpr int W = VT<T>::W;
  constexpr int NR = 2 * W;
  const int64_t np = t.kpad / NR;
  for (int64_t r0 = 0; r0 < t.rows; r0 += MR) {
    const T* qs = t.q + r0 * t.ldq;
    const T* dos = t.dout + r0 * t.lddo;
    T* prow = t.p + r0 * t.kpad;
    T* dsrow = t.ds + r0 * t.kpad;
    for (int64_t p = 0; p < np; ++p) {
      panel_tile<T>(qs, t.ldq, t.kpanel + p * t.d * NR, t.d, prow + p * NR, t.kpad);
      panel_tile<T>(dos, t.lddo, t.vpanel + p * t.dv * NR, t.dv, dsrow + p * NR, t.kpad);
    }
    for (int r = 0; r < MR; ++r) {
      T* pr = prow + r * t.kpad;
      T* dr = dsrow + r * t.kpad;
      const T lse = t.lse[r0 + r];
      const T delta = t.delta[r0 + r];
      if constexpr (std::is_same_v<T, float>) {
        const V lv = set1(lse), dl = set1(delta);
        for (int64_t j = 0; j < t.kpad; j += W) {
          const V pv = exp_ps(loadu<V>(pr + j) - lv);
          storeu(pr + j, pv);
          storeu(dr + j, pv * (loadu<V>(dr + j) - dl));
        }
      } else {
        for (int64_t j = 0; j < t.kpad; ++j) {
          const T pv = std::exp(pr[j] - lse);
          pr[j] = pv;
          dr[j] = pv * (dr[j] - delta);
        }
      }
      for (int64_t j = t.kn; j < t.kpad; ++j) {
        pr[j] = T(0);
        dr[j] = T(0);
      }
    }
  }
  // Keys of the tile as output rows (the key count rounded up to MR).
  const int64_t krows = (t.kn + MR - 1) / MR * MR;
  bcast_gemm<T>(t.p, 1, t.kpad, krows, t.rows, t.dout, t.lddo, t.lddo, t.dv_acc, t.lddo);  // dV += P^T dO
  bcast_gemm<T>(t.ds, 1, t.kpad, krows, t.rows, t.q, t.ldq, t.ldq, t.dk, t.ldq);           // dK += dS^T Qs
  bcast_gemm<T>(t.ds, t.kpad, 1, t.rows, t.kn, t.krows, t.ldq, t.ldq, t.dq, t.ldq);        // dQ += dS K
}

static void fwd_f(const attn::FwdTileArgs<float>& t) { fwd_tile<float>(t); }
static void fwd_d(const attn::FwdTileArgs<double>& t) { fwd_tile<double>(t); }
static void bwd_f(const attn::BwdTileArgs<float>& t) { bwd_tile<float>(t); }
static void bwd_d(const attn::BwdTileArgs<double>& t) { bwd_tile<double>(t); }

static attn::KernelSet make_kernel_set(const char* name) {
  return attn::KernelSet{name, VT<float>::W, VT<double>::W, MR, &fwd_f, &fwd_d, &bwd_f, &bwd_d};
}

}  // namespace ATTN_NS
