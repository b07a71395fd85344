// Winograd F(m x m, 3 x 3) tile transforms (channels-last), one copy per instruction set: included
// by winograd_cpu.cpp inside `#pragma GCC target` regions with WINO_NS set (see attention_kernels.cpp
// for why a region rather than target_clones). No headers here: plain loops that GCC vectorizes
// over the channel block, so nothing with another target is inlined into them.
//
// Layouts: images x / gx / y / gy are [N, H, W, C] contiguous; the Winograd domain V / gV / Mt / gM
// is [A*A, T, C] contiguous with A = m + 2 and T = N * th * tw tiles (th = ceil(H / m), tw =
// ceil(W / m)), tile t = (n * th + ty) * tw + tx. Tile (ty, tx) reads the input window of rows
// ty*m - 1 .. ty*m + m (padding 1: zeros outside the image) and writes output rows ty*m .. ty*m +
// m - 1 (cropped to the image). Coefficient matrices: WinoMats<m> in winograd_cpu.cpp.
//
// Every transform is out = L in R^T on a tile (per channel), with L and R one of B^T, A^T or their
// transposes; transform2d applies it as two one-sided passes, each kernel gathers its tile into an
// L1-resident block first and scatters the result after.

namespace WINO_NS {

// Channel block per tile step: the A*A x CB working set (float: 36 x 64 x 4 B = 9 KiB) stays in L1.
constexpr int64_t kChannelBlock = 64;

// Coefficient views: Mat::at(r, c) of a constexpr matrix (Trans: of its transpose).
template <int M>
struct BTm {
  static constexpr int rows = M + 2, cols = M + 2;
  static constexpr double at(int r, int c) { return WinoMats<M>::BT[r][c]; }
};
template <int M>
struct Bm {  // B = (B^T)^T
  static constexpr int rows = M + 2, cols = M + 2;
  static constexpr double at(int r, int c) { return WinoMats<M>::BT[c][r]; }
};
template <int M>
struct ATm {
  static constexpr int rows = M, cols = M + 2;
  static constexpr double at(int r, int c) { return WinoMats<M>::AT[r][c]; }
};
template <int M>
struct Am {  // A = (A^T)^T
  static constexpr int rows = M + 2, cols = M;
  static constexpr double at(int r, int c) { return WinoMats<M>::AT[c][r]; }
};
template <int M>
struct Gm {
  static constexpr int rows = M + 2, cols = 3;
  static constexpr double at(int r, int c) { return WinoMats<M>::G[r][c]; }
};
template <int M>
struct GTm {  // G^T
  static constexpr int rows = 3, cols = M + 2;
  static constexpr double at(int r, int c) { return WinoMats<M>::G[c][r]; }
};

// out[p][q][c] = sum_{i, j} L(p, i) L(q, j) in[i][j][c] for c < cb: rows first, then columns; the
// zero coefficients are skipped at compile time (the loops unroll over constexpr matrices).
template <typename T, typename L>
inline void transform2d(const T (&in)[L::cols][L::cols][kChannelBlock], T (&out)[L::rows][L::rows][kChannelBlock],
                        int64_t cb) {
  T mid[L::rows][L::cols][kChannelBlock];
#pragma GCC unroll 8
  for (int p = 0; p < L::rows; ++p) {
#pragma GCC unroll 8
    for (int j = 0; j < L::cols; ++j) {
      for (int64_t c = 0; c < cb; ++c) {
        T s = T(0);
#pragma GCC unroll 8
        for (int i = 0; i < L::cols; ++i)
          if (L::at(p, i) != 0) s += T(L::at(p, i)) * in[i][j][c];
        mid[p][j][c] = s;
      }
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < L::rows; ++p) {
#pragma GCC unroll 8
    for (int q = 0; q < L::rows; ++q) {
      for (int64_t c = 0; c < cb; ++c) {
        T s = T(0);
#pragma GCC unroll 8
        for (int j = 0; j < L::cols; ++j)
          if (L::at(q, j) != 0) s += T(L::at(q, j)) * mid[p][j][c];
        out[p][q][c] = s;
      }
    }
  }
}

// buf[i][j][:cb] = img[n, r0 + i, c0 + j, ch0 : ch0 + cb], zeros outside the image.
template <typename T, int S>
inline void gather_image(const T* img, int64_t H, int64_t W, int64_t C, int64_t n, int64_t r0, int64_t w0,
                         int64_t ch0, int64_t cb, T (&buf)[S][S][kChannelBlock]) {
  for (int i = 0; i < S; ++i) {
    const int64_t h = r0 + i;
    for (int j = 0; j < S; ++j) {
      const int64_t w = w0 + j;
      if (h >= 0 && h < H && w >= 0 && w < W) {
        const T* src = img + ((n * H + h) * W + w) * C + ch0;
        for (int64_t c = 0; c < cb; ++c) buf[i][j][c] = src[c];
      } else {
        for (int64_t c = 0; c < cb; ++c) buf[i][j][c] = T(0);
      }
    }
  }
}

// buf[a][b][:cb] = dom[a * S + b, t, ch0 : ch0 + cb] (dom: [S*S, ntiles, C]).
template <typename T, int S>
inline void gather_domain(const T* dom, int64_t ntiles, int64_t C, int64_t t, int64_t ch0, int64_t cb,
                          T (&buf)[S][S][kChannelBlock]) {
  for (int a = 0; a < S; ++a)
    for (int b = 0; b < S; ++b) {
      const T* src = dom + ((int64_t(a) * S + b) * ntiles + t) * C + ch0;
      for (int64_t c = 0; c < cb; ++c) buf[a][b][c] = src[c];
    }
}

// dom[a * S + b, t, ch0 : ch0 + cb] = buf[a][b][:cb].
template <typename T, int S>
inline void scatter_domain(const T (&buf)[S][S][kChannelBlock], int64_t ntiles, int64_t C, int64_t t, int64_t ch0,
                           int64_t cb, T* dom) {
  for (int a = 0; a < S; ++a)
    for (int b = 0; b < S; ++b) {
      T* dst = dom + ((int64_t(a) * S + b) * ntiles + t) * C + ch0;
      for (int64_t c = 0; c < cb; ++c) dst[c] = buf[a][b][c];
    }
}

// Tile index -> (n, ty, tx).
inline void tile_coords(int64_t t, int64_t th, int64_t tw, int64_t& n, int64_t& ty, int64_t& tx) {
  tx = t % tw;
  ty = (t / tw) % th;
  n = t / (tw * th);
}

// V[:, t, :] = B^T d B for tiles [t_begin, t_end).
template <typename T, int M>
void input_transform(const T* x, int64_t H, int64_t W, int64_t C, int64_t th, int64_t tw, int64_t ntiles,
                     int64_t t_begin, int64_t t_end, T* V) {
  constexpr int A = M + 2;
  T d[A][A][kChannelBlock], v[A][A][kChannelBlock];
  for (int64_t t = t_begin; t < t_end; ++t) {
    int64_t n, ty, tx;
    tile_coords(t, th, tw, n, ty, tx);
    for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
      const int64_t cb = C - c0 < kChannelBlock ? C - c0 : kChannelBlock;
      gather_image<T, A>(x, H, W, C, n, ty * M - 1, tx * M - 1, c0, cb, d);
      transform2d<T, BTm<M>>(d, v, cb);
      scatter_domain<T, A>(v, ntiles, C, t, c0, cb, V);
    }
  }
}

// y[tile window] = A^T Mt A (+ bias), cropped to the image, for tiles [t_begin, t_end).
template <typename T, int M>
void output_transform(const T* Mt, const T* bias, int64_t H, int64_t W, int64_t K, int64_t th, int64_t tw,
                      int64_t ntiles, int64_t t_begin, int64_t t_end, T* y) {
  constexpr int A = M + 2;
  T mt[A][A][kChannelBlock], out[M][M][kChannelBlock];
  for (int64_t t = t_begin; t < t_end; ++t) {
    int64_t n, ty, tx;
    tile_coords(t, th, tw, n, ty, tx);
    for (int64_t c0 = 0; c0 < K; c0 += kChannelBlock) {
      const int64_t cb = K - c0 < kChannelBlock ? K - c0 : kChannelBlock;
      gather_domain<T, A>(Mt, ntiles, K, t, c0, cb, mt);
      transform2d<T, ATm<M>>(mt, out, cb);
      for (int p = 0; p < M && ty * M + p < H; ++p) {
        for (int q = 0; q < M && tx * M + q < W; ++q) {
          T* dst = y + ((n * H + ty * M + p) * W + tx * M + q) * K + c0;
          if (bias != nullptr) {
            for (int64_t c = 0; c < cb; ++c) dst[c] = out[p][q][c] + bias[c0 + c];
          } else {
            for (int64_t c = 0; c < cb; ++c) dst[c] = out[p][q][c];
          }
        }
      }
    }
  }
}

// gM[:, t, :] = A g A^T (the adjoint of output_transform; g = the tile's gy window, zeros outside
// the image) for tiles [t_begin, t_end).
template <typename T, int M>
void output_transform_backward(const T* gy, int64_t H, int64_t W, int64_t K, int64_t th, int64_t tw,
                               int64_t ntiles, int64_t t_begin, int64_t t_end, T* gM) {
  constexpr int A = M + 2;
  T g[M][M][kChannelBlock], gm[A][A][kChannelBlock];
  for (int64_t t = t_begin; t < t_end; ++t) {
    int64_t n, ty, tx;
    tile_coords(t, th, tw, n, ty, tx);
    for (int64_t c0 = 0; c0 < K; c0 += kChannelBlock) {
      const int64_t cb = K - c0 < kChannelBlock ? K - c0 : kChannelBlock;
      gather_image<T, M>(gy, H, W, K, n, ty * M, tx * M, c0, cb, g);
      transform2d<T, Am<M>>(g, gm, cb);
      scatter_domain<T, A>(gm, ntiles, K, t, c0, cb, gM);
    }
  }
}

// gx[tile window] += B gV B^T (the adjoint of input_transform) for the tiles of the tile rows
// [r_begin, r_end) (r = n * th + ty) whose ty has parity `parity`: neighbouring tile rows share
// two image rows, so the caller runs the even rows, then the odd ones, and no two threads add to
// the same pixel. Tiles of one row (sharing two columns) run in order in one thread.
template <typename T, int M>
void input_transform_backward(const T* gV, int64_t H, int64_t W, int64_t C, int64_t th, int64_t tw, int64_t ntiles,
                              int64_t r_begin, int64_t r_end, int parity, T* gx) {
  constexpr int A = M + 2;
  T gv[A][A][kChannelBlock], gd[A][A][kChannelBlock];
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t ty = r % th, n = r / th;
    if ((ty & 1) != parity) continue;
    for (int64_t tx = 0; tx < tw; ++tx) {
      const int64_t t = r * tw + tx;
      for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
        const int64_t cb = C - c0 < kChannelBlock ? C - c0 : kChannelBlock;
        gather_domain<T, A>(gV, ntiles, C, t, c0, cb, gv);
        transform2d<T, Bm<M>>(gv, gd, cb);
        for (int i = 0; i < A; ++i) {
          const int64_t h = ty * M - 1 + i;
          if (h < 0 || h >= H) continue;
          for (int j = 0; j < A; ++j) {
            const int64_t w = tx * M - 1 + j;
            if (w < 0 || w >= W) continue;
            T* dst = gx + ((n * H + h) * W + w) * C + c0;
            for (int64_t c = 0; c < cb; ++c) dst[c] += gd[i][j][c];
          }
        }
      }
    }
  }
}

// U[a * A + b, kc] = (G g_kc G^T)[a][b] for the filters kc in [k_begin, k_end) of w = [K*C, 3, 3]
// (a [K, C, 3, 3] weight; U: [A*A, K*C]). A filter's 9 values are contiguous, U's rows are not:
// the block of filters is transposed into the L1 buffer first (a GEMM with a 9-column operand runs
// far below the memory rate in oneDNN/MKL).
template <typename T, int M>
void weight_transform(const T* w, int64_t KC, int64_t k_begin, int64_t k_end, T* U) {
  constexpr int A = M + 2;
  T g[3][3][kChannelBlock], u[A][A][kChannelBlock];
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kChannelBlock) {
    const int64_t cb = k_end - k0 < kChannelBlock ? k_end - k0 : kChannelBlock;
    for (int64_t c = 0; c < cb; ++c)
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) g[i][j][c] = w[(k0 + c) * 9 + i * 3 + j];
    transform2d<T, Gm<M>>(g, u, cb);
    for (int a = 0; a < A; ++a)
      for (int b = 0; b < A; ++b) {
        T* dst = U + (int64_t(a) * A + b) * KC + k0;
        for (int64_t c = 0; c < cb; ++c) dst[c] = u[a][b][c];
      }
  }
}

// gw[kc] = G^T gU_kc G (the adjoint of weight_transform) for the filters kc in [k_begin, k_end).
template <typename T, int M>
void weight_transform_backward(const T* gU, int64_t KC, int64_t k_begin, int64_t k_end, T* gw) {
  constexpr int A = M + 2;
  T gu[A][A][kChannelBlock], g[3][3][kChannelBlock];
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kChannelBlock) {
    const int64_t cb = k_end - k0 < kChannelBlock ? k_end - k0 : kChannelBlock;
    for (int a = 0; a < A; ++a)
      for (int b = 0; b < A; ++b) {
        const T* src = gU + (int64_t(a) * A + b) * KC + k0;
        for (int64_t c = 0; c < cb; ++c) gu[a][b][c] = src[c];
      }
    transform2d<T, GTm<M>>(gu, g, cb);
    for (int64_t c = 0; c < cb; ++c)
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) gw[(k0 + c) * 9 + i * 3 + j] = g[i][j][c];
  }
}

}  // namespace WINO_NS
