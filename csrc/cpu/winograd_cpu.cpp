// CPU transforms of Winograd F(m x m, 3 x 3) convolutions (m = 2 or 4; stride 1, padding 1,
// channels-last): the C++ ops of `dabdetr_winograd`. The convolution itself (dabdetr/models/
// winograd.py) is: V = input_transform(x), Mt[xi] = V[xi] @ U[xi] (A*A batched GEMMs, U =
// weight_transform(g) = G g G^T the transformed weights), y = output_transform(Mt); its backward
// uses the three adjoints below and the same batched GEMMs. Each transform is one pass over its
// input and output (the pure-torch formulation of the same maps takes a gather copy, a [A*A, A*A]
// (or [A*A, 9]) GEMM and a permute copy).
//
// Tile transforms run parallel over tiles (at::parallel_for; input_transform_backward adds
// overlapping tile windows into gx and runs its even tile rows, then its odd ones, see
// winograd_impl.h), the weight transforms over filters.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace dabdetr {
namespace cpu {
namespace winograd {

// Lavin & Gray's points: F(2, 3) on {0, 1, -1}, F(4, 3) on {0, 1, -1, 2, -2} (+ infinity); the same
// matrices as _MATRICES in dabdetr/models/winograd.py.
template <int M>
struct WinoMats;

template <>
struct WinoMats<2> {
  static constexpr double BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr double AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
  static constexpr double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
};

template <>
struct WinoMats<4> {
  static constexpr double BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                      {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr double AT[4][6] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
  static constexpr double G[6][3] = {{1.0 / 4, 0, 0},
                                     {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                     {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                     {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                     {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                     {0, 0, 1}};
};

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define DABDETR_WINO_X86 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define WINO_NS wino_avx512
#include "winograd_impl.h"
#undef WINO_NS
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define WINO_NS wino_avx2
#include "winograd_impl.h"
#undef WINO_NS
#pragma GCC pop_options
#else
#define DABDETR_WINO_X86 0
#endif
#define WINO_NS wino_base
#include "winograd_impl.h"
#undef WINO_NS

namespace {

// The instruction set of the kernels: the best this CPU has, or at most DABDETR_WINOGRAD_ISA
// ("sse2" / "avx2"; how the tests run the other copies on a newer CPU), read once.
int isa_level() {
#if DABDETR_WINO_X86
  static const int level = [] {
    __builtin_cpu_init();
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
    const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    const char* env = std::getenv("DABDETR_WINOGRAD_ISA");
    const int want = env == nullptr ? 3 : std::strcmp(env, "sse2") == 0 ? 1 : std::strcmp(env, "avx2") == 0 ? 2 : 3;
    return std::min(want, v4 ? 3 : v3 ? 2 : 1);
  }();
  return level;
#else
  return 1;
#endif
}

// Calls NS::FN<scalar_t, M>(args...) for the best instruction set of this CPU.
#if DABDETR_WINO_X86
#define WINO_CALL(FN, ...)                                         \
  do {                                                             \
    const int level_ = isa_level();                                \
    if (level_ == 3) wino_avx512::FN<scalar_t, M>(__VA_ARGS__);    \
    else if (level_ == 2) wino_avx2::FN<scalar_t, M>(__VA_ARGS__); \
    else wino_base::FN<scalar_t, M>(__VA_ARGS__);                  \
  } while (0)
#else
#define WINO_CALL(FN, ...) wino_base::FN<scalar_t, M>(__VA_ARGS__)
#endif

// Dispatch on m (2 or 4) and dtype (float32 / float64).
#define WINO_DISPATCH(m, dtype, NAME, ...)                                      \
  AT_DISPATCH_FLOATING_TYPES(dtype, NAME, [&] {                                 \
    if ((m) == 2) {                                                             \
      constexpr int M = 2;                                                      \
      __VA_ARGS__();                                                            \
    } else {                                                                    \
      constexpr int M = 4;                                                      \
      __VA_ARGS__();                                                            \
    }                                                                           \
  })

void check_m(int64_t m) { TORCH_CHECK(m == 2 || m == 4, "dabdetr_winograd: 'm' must be 2 or 4, got ", m); }

void check_tensor(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dabdetr_winograd: '", name, "' must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "dabdetr_winograd: '", name,
              "' must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "dabdetr_winograd: '", name, "' must be ", dim, "-D, got shape ", t.sizes());
}

struct Geometry {
  int64_t n, h, w, c, th, tw, ntiles;
};

Geometry geometry(at::IntArrayRef shape, int64_t m, const char* name) {
  TORCH_CHECK(shape.size() == 4, "dabdetr_winograd: '", name, "' must have 4 sizes [N, H, W, C], got ", shape);
  for (auto s : shape) TORCH_CHECK(s > 0, "dabdetr_winograd: '", name, "' sizes must be positive, got ", shape);
  Geometry g{shape[0], shape[1], shape[2], shape[3], (shape[1] + m - 1) / m, (shape[2] + m - 1) / m, 0};
  g.ntiles = g.n * g.th * g.tw;
  return g;
}

void check_domain(const at::Tensor& t, const Geometry& g, int64_t m, const char* name) {
  check_tensor(t, 3, name);
  TORCH_CHECK(t.size(0) == (m + 2) * (m + 2) && t.size(1) == g.ntiles && t.size(2) == g.c, "dabdetr_winograd: '",
              name, "' must have shape [", (m + 2) * (m + 2), ", ", g.ntiles, ", ", g.c, "], got ", t.sizes());
}

// Tiles per task: a tile costs ~A*A*C multiply-adds per pass.
int64_t grain(const Geometry& g) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.c)); }

at::Tensor input_transform(const at::Tensor& x_, int64_t m) {
  check_m(m);
  check_tensor(x_, 4, "x");
  const at::Tensor x = x_.contiguous();
  const Geometry g = geometry(x.sizes(), m, "x");
  at::Tensor v = at::empty({(m + 2) * (m + 2), g.ntiles, g.c}, x.options());
  WINO_DISPATCH(m, x.scalar_type(), "winograd_input_transform", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.ntiles, grain(g), [&](int64_t b, int64_t e) {
      WINO_CALL(input_transform, xp, g.h, g.w, g.c, g.th, g.tw, g.ntiles, b, e, vp);
    });
  });
  return v;
}

at::Tensor input_transform_backward(const at::Tensor& grad_v_, at::IntArrayRef x_shape, int64_t m) {
  check_m(m);
  const Geometry g = geometry(x_shape, m, "x_shape");
  check_domain(grad_v_, g, m, "grad_v");
  const at::Tensor gv = grad_v_.contiguous();
  at::Tensor gx = at::zeros({g.n, g.h, g.w, g.c}, gv.options());
  const int64_t rows = g.n * g.th;
  WINO_DISPATCH(m, gv.scalar_type(), "winograd_input_transform_backward", [&] {
    const scalar_t* gvp = gv.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    for (int parity = 0; parity < 2; ++parity) {
      at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
        WINO_CALL(input_transform_backward, gvp, g.h, g.w, g.c, g.th, g.tw, g.ntiles, b, e, parity, gxp);
      });
    }
  });
  return gx;
}

at::Tensor output_transform(const at::Tensor& mt_, const std::optional<at::Tensor>& bias_, at::IntArrayRef y_shape,
                            int64_t m) {
  check_m(m);
  const Geometry g = geometry(y_shape, m, "y_shape");
  check_domain(mt_, g, m, "mt");
  const at::Tensor mt = mt_.contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    check_tensor(*bias_, 1, "bias");
    TORCH_CHECK(bias_->scalar_type() == mt.scalar_type(), "dabdetr_winograd: 'bias' has dtype ",
                bias_->scalar_type(), " but 'mt' has dtype ", mt.scalar_type());
    TORCH_CHECK(bias_->size(0) == g.c, "dabdetr_winograd: 'bias' must have ", g.c, " values, got ", bias_->size(0));
    bias = bias_->contiguous();
  }
  at::Tensor y = at::empty({g.n, g.h, g.w, g.c}, mt.options());
  WINO_DISPATCH(m, mt.scalar_type(), "winograd_output_transform", [&] {
    const scalar_t* mp = mt.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.ntiles, grain(g), [&](int64_t b, int64_t e) {
      WINO_CALL(output_transform, mp, bp, g.h, g.w, g.c, g.th, g.tw, g.ntiles, b, e, yp);
    });
  });
  return y;
}

at::Tensor output_transform_backward(const at::Tensor& grad_y_, int64_t m) {
  check_m(m);
  check_tensor(grad_y_, 4, "grad_y");
  const at::Tensor gy = grad_y_.contiguous();
  const Geometry g = geometry(gy.sizes(), m, "grad_y");
  at::Tensor gm = at::empty({(m + 2) * (m + 2), g.ntiles, g.c}, gy.options());
  WINO_DISPATCH(m, gy.scalar_type(), "winograd_output_transform_backward", [&] {
    const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
    scalar_t* gmp = gm.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.ntiles, grain(g), [&](int64_t b, int64_t e) {
      WINO_CALL(output_transform_backward, gyp, g.h, g.w, g.c, g.th, g.tw, g.ntiles, b, e, gmp);
    });
  });
  return gm;
}

// Filters per task: a filter costs ~A*A*3 multiply-adds and A*A + 9 values moved per pass.
constexpr int64_t kFilterGrain = 1024;

at::Tensor weight_transform(const at::Tensor& weight_, int64_t m) {
  check_m(m);
  check_tensor(weight_, 4, "weight");
  TORCH_CHECK(weight_.size(2) == 3 && weight_.size(3) == 3, "dabdetr_winograd: 'weight' must be [K, C, 3, 3], got ",
              weight_.sizes());
  const at::Tensor w = weight_.contiguous();
  const int64_t K = w.size(0), C = w.size(1), KC = K * C;
  at::Tensor u = at::empty({(m + 2) * (m + 2), K, C}, w.options());
  WINO_DISPATCH(m, w.scalar_type(), "winograd_weight_transform", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* up = u.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, KC, kFilterGrain, [&](int64_t b, int64_t e) {
      WINO_CALL(weight_transform, wp, KC, b, e, up);
    });
  });
  return u;
}

at::Tensor weight_transform_backward(const at::Tensor& grad_u_, int64_t m) {
  check_m(m);
  check_tensor(grad_u_, 3, "grad_u");
  TORCH_CHECK(grad_u_.size(0) == (m + 2) * (m + 2), "dabdetr_winograd: 'grad_u' must be [", (m + 2) * (m + 2),
              ", K, C], got ", grad_u_.sizes());
  const at::Tensor gu = grad_u_.contiguous();
  const int64_t K = gu.size(1), C = gu.size(2), KC = K * C;
  at::Tensor gw = at::empty({K, C, 3, 3}, gu.options());
  WINO_DISPATCH(m, gu.scalar_type(), "winograd_weight_transform_backward", [&] {
    const scalar_t* gup = gu.const_data_ptr<scalar_t>();
    scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, KC, kFilterGrain, [&](int64_t b, int64_t e) {
      WINO_CALL(weight_transform_backward, gup, KC, b, e, gwp);
    });
  });
  return gw;
}

}  // namespace
}  // namespace winograd
}  // namespace cpu
}  // namespace dabdetr

// Schemas and CPU kernels together: these ops exist for the CPU backbone only (no CUDA kernels:
// cuDNN picks its own algorithms on the GPU). Fake kernels: dabdetr/models/winograd.py.
TORCH_LIBRARY(dabdetr_winograd, m) {
  // x [N, H, W, C] -> [A*A, T, C]
  m.def("input_transform(Tensor x, int m) -> Tensor");
  // grad_v [A*A, T, C] -> grad_x [N, H, W, C] with x_shape = [N, H, W, C]
  m.def("input_transform_backward(Tensor grad_v, int[] x_shape, int m) -> Tensor");
  // mt [A*A, T, K] (+ bias [K]) -> y [N, H, W, K] with y_shape = [N, H, W, K]
  m.def("output_transform(Tensor mt, Tensor? bias, int[] y_shape, int m) -> Tensor");
  // grad_y [N, H, W, K] -> grad_mt [A*A, T, K]
  m.def("output_transform_backward(Tensor grad_y, int m) -> Tensor");
  // weight [K, C, 3, 3] -> U [A*A, K, C] (U[xi] = G g G^T per filter)
  m.def("weight_transform(Tensor weight, int m) -> Tensor");
  // grad_u [A*A, K, C] -> grad_weight [K, C, 3, 3]
  m.def("weight_transform_backward(Tensor grad_u, int m) -> Tensor");
}

TORCH_LIBRARY_IMPL(dabdetr_winograd, CPU, m) {
  using namespace dabdetr::cpu::winograd;
  m.impl("input_transform", &input_transform);
  m.impl("input_transform_backward", &input_transform_backward);
  m.impl("output_transform", &output_transform);
  m.impl("output_transform_backward", &output_transform_backward);
  m.impl("weight_transform", &weight_transform);
  m.impl("weight_transform_backward", &weight_transform_backward);
}
