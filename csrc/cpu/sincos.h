// Vectorizable sin/cos kernels for the CPU (float32 via a branch-free polynomial, float64 via libm).
#pragma once

#include <cstdint>

namespace dabdetr {
namespace cpu {

// s[j] = sin(v * w[j]), c[j] = cos(v * w[j]) for j < n.
void sincos_scaled(float v, const float* w, int64_t n, float* s, float* c);
void sincos_scaled(double v, const double* w, int64_t n, double* s, double* c);

// sum_j w[j] * (gs[j] * cos(v * w[j]) - gc[j] * sin(v * w[j])): the derivative with respect to v of
// sum_j gs[j] * sin(v * w[j]) + gc[j] * cos(v * w[j]).
float sincos_grad_dot(float v, const float* w, int64_t n, const float* gs, const float* gc);
double sincos_grad_dot(double v, const double* w, int64_t n, const double* gs, const double* gc);

}  // namespace cpu
}  // namespace dabdetr

namespace dabdetr {
namespace cpu {

// One block of the modulated query, forward: out[2j] = s[j] * p[2j] * r, out[2j+1] = c[j] * p[2j+1] * r
// (p == nullptr: no element-wise scale).
void interleave_scaled(const float* s, const float* c, const float* p, float r, int64_t n, float* out);

// One block of the modulated query, backward, for out = E(v) * p * r with E = (sin, cos)(v * w):
// gp[k] = g[k] * E[k] * r (skipped when p == nullptr), and returns through `dr` = sum_k g[k] E[k] p[k]
// (d loss / d r) and `dv` = sum_j w[j] (g[2j] p[2j] c[j] - g[2j+1] p[2j+1] s[j]) (d loss / d v, without r).
void block_backward(const float* g, const float* p, const float* s, const float* c, const float* w, float r,
                    int64_t n, float* gp, float& dr, float& dv);

}  // namespace cpu
}  // namespace dabdetr
