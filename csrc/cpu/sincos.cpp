// float32 sin/cos for the sine-embedding kernels.
//
// Range reduction by pi/2 in three parts (Cody-Waite: the first part has 8 significant bits, so
// k * C1 is exact for |k| < 2^16), then minimax polynomials on [-pi/4, pi/4] (coefficients of the
// Cephes sinf/cosf) and a branch-free quadrant fix-up, so that the loops vectorize. Max error
// against float64 is about 1e-7 for |angle| < 1e5; larger angles (never reached by embeddings of
// coordinates in [0, 1]) take the libm path. Each loop is compiled for AVX-512, AVX2+FMA and
// baseline x86-64 and picked at load time (GCC target_clones).
#include "sincos.h"

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define DABDETR_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DABDETR_TARGET_CLONES
#endif

namespace dabdetr {
namespace cpu {
namespace {

// std::bit_cast is C++20; torch 2.11's extension build compiles with -std=c++17 (2.14's with
// c++20), so a memcpy, which GCC turns into a register move.
template <typename To, typename From>
inline To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as: sizes differ");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

constexpr float kTwoOverPi = 0.636619772367581343f;
constexpr float kPio2Hi = 1.5703125f;
constexpr float kPio2Mid = 4.838705062866211e-4f;
constexpr float kPio2Lo = -4.371138828673793e-8f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: (x + M) - M rounds to nearest
constexpr float kMaxReduced = 65536.0f;     // beyond this |angle|, use libm

inline void sincos_poly(float x, float& s, float& c) {
  const float k = (x * kTwoOverPi + kRoundMagic) - kRoundMagic;
  const int q = static_cast<int>(k);
  float r = x - k * kPio2Hi;
  r = r - k * kPio2Mid;
  r = r - k * kPio2Lo;
  const float z = r * r;
  const float ps = r + r * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
  const float pc = 1.0f - 0.5f * z + z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
  // Quadrant fix-up with integer bit operations (vectorizes as blends / xors):
  // q = 0: (s, c); 1: (c, -s); 2: (-s, -c); 3: (-c, s).
  const uint32_t swap = 0u - static_cast<uint32_t>(q & 1);
  const uint32_t bs = bits_as<uint32_t>(ps), bc = bits_as<uint32_t>(pc);
  const uint32_t sv = (bs & ~swap) | (bc & swap);
  const uint32_t cv = (bc & ~swap) | (bs & swap);
  s = bits_as<float>(sv ^ (static_cast<uint32_t>(q & 2) << 30));
  c = bits_as<float>(cv ^ (static_cast<uint32_t>((q + 1) & 2) << 30));
}

}  // namespace

DABDETR_TARGET_CLONES
void sincos_scaled(float v, const float* __restrict w, int64_t n, float* __restrict s, float* __restrict c) {
  float amax = 0.0f;
#pragma omp simd reduction(max : amax)
  for (int64_t j = 0; j < n; ++j) {
    const float x = v * w[j];
    const float ax = std::fabs(x);
    amax = ax > amax ? ax : amax;
    sincos_poly(x, s[j], c[j]);
  }
  if (!(amax < kMaxReduced)) {  // also catches inf
    for (int64_t j = 0; j < n; ++j) {
      const float x = v * w[j];
      s[j] = std::sin(x);
      c[j] = std::cos(x);
    }
  }
}

void sincos_scaled(double v, const double* w, int64_t n, double* s, double* c) {
  for (int64_t j = 0; j < n; ++j) {
    const double x = v * w[j];
    s[j] = std::sin(x);
    c[j] = std::cos(x);
  }
}

DABDETR_TARGET_CLONES
float sincos_grad_dot(float v, const float* __restrict w, int64_t n, const float* __restrict gs,
                      const float* __restrict gc) {
  float amax = 0.0f;
  float acc = 0.0f;
#pragma omp simd reduction(max : amax) reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const float x = v * w[j];
    const float ax = std::fabs(x);
    amax = ax > amax ? ax : amax;
    float s, c;
    sincos_poly(x, s, c);
    acc += w[j] * (gs[j] * c - gc[j] * s);
  }
  if (!(amax < kMaxReduced)) {
    acc = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      const float x = v * w[j];
      acc += w[j] * (gs[j] * std::cos(x) - gc[j] * std::sin(x));
    }
  }
  return acc;
}

double sincos_grad_dot(double v, const double* w, int64_t n, const double* gs, const double* gc) {
  double acc = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double x = v * w[j];
    acc += w[j] * (gs[j] * std::cos(x) - gc[j] * std::sin(x));
  }
  return acc;
}

}  // namespace cpu
}  // namespace dabdetr

namespace dabdetr {
namespace cpu {

DABDETR_TARGET_CLONES
void interleave_scaled(const float* __restrict s, const float* __restrict c, const float* __restrict p, float r,
                       int64_t n, float* __restrict out) {
  if (p != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      out[2 * j] = s[j] * p[2 * j] * r;
      out[2 * j + 1] = c[j] * p[2 * j + 1] * r;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      out[2 * j] = s[j] * r;
      out[2 * j + 1] = c[j] * r;
    }
  }
}

DABDETR_TARGET_CLONES
void block_backward(const float* __restrict g, const float* __restrict p, const float* __restrict s,
                    const float* __restrict c, const float* __restrict w, float r, int64_t n, float* __restrict gp,
                    float& dr_out, float& dv_out) {
  float dr = 0.0f, dv = 0.0f;
  if (p != nullptr) {
#pragma omp simd reduction(+ : dr, dv)
    for (int64_t j = 0; j < n; ++j) {
      const float g0 = g[2 * j], g1 = g[2 * j + 1];
      gp[2 * j] = g0 * s[j] * r;
      gp[2 * j + 1] = g1 * c[j] * r;
      const float e0 = g0 * p[2 * j], e1 = g1 * p[2 * j + 1];
      dr += e0 * s[j] + e1 * c[j];
      dv += w[j] * (e0 * c[j] - e1 * s[j]);
    }
  } else {
#pragma omp simd reduction(+ : dr, dv)
    for (int64_t j = 0; j < n; ++j) {
      const float g0 = g[2 * j], g1 = g[2 * j + 1];
      dr += g0 * s[j] + g1 * c[j];
      dv += w[j] * (g0 * c[j] - g1 * s[j]);
    }
  }
  dr_out = dr;
  dv_out = dv;
}

}  // namespace cpu
}  // namespace dabdetr
