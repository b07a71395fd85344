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
