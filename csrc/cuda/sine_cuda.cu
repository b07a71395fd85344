// CUDA kernels of sine_embed and modulated_sine_query, forward and backward.
//
// Same math and gradient formulas as csrc/cpu/sine_cpu.cpp (see that file and REFERENCE.md §1a):
// pair j of coordinate c has the angle  a = (x_c * scale) * w_c[j],  w_c[j] = T_c ** (-2 j / F),
// both products rounded in the accumulation type (float32 for float32/float16/bfloat16, float64 for
// float64), and the pair is (sin a, cos a).
//
// Forward (memory-bound, the output is C*F times larger than the input): a 2-D grid; a thread owns a
// fixed column of P consecutive (sin, cos) pairs of one output slot and walks rows (grid-stride in
// y), so its P inverse frequencies are computed once (in float64, from log2 T) and stay in registers.
// P is chosen so that a thread writes 16 bytes with one vector store (float32: 2 pairs, float16 /
// bfloat16: 4 pairs, float64: 1 pair); when F/2 is not a multiple of P it falls back to one pair per
// thread (8/4/16-byte stores). Consecutive threads own consecutive columns, so a warp's stores are
// contiguous. Inputs are read with row strides (DeviceRowIndexer): views of sequence-first tensors
// are not copied.
//
// Backward (a reduction over the F/2 pairs of each (row, slot) segment): a segment per group of G
// lanes (G = min(32, next power of two >= F/2)); lanes read the pairs of grad_out coalesced,
// accumulate in the accumulation type and reduce with warp shuffles. The inverse frequencies come
// from a per-block shared-memory table (filled once, float64 -> acc type) when it fits in 32 KB,
// else are computed on the fly.
//
// sin / cos accuracy (float32 path, also used for float16 / bfloat16): the angle is reduced to
// [-pi, pi] with a two-constant Cody-Waite step (k = rint(a / 2pi); r = a - k*2pi_hi - k*2pi_lo,
// both FMAs), then the hardware __sincosf (MUFU) is used, whose absolute error on [-pi, pi] is
// <= 2^-21.41 = 3.6e-7 (CUDA C Programming Guide, "Intrinsic Functions"); the reduction adds
// <= 1.2e-7 (half an ulp of pi) for |a| < 2^17. Total <= 5e-7 absolute, well inside the 1e-5
// tolerance relative to the output's max magnitude (DESIGN.md), and below the float32 rounding of
// the angle itself (|a| * 6e-8, which the CPU kernel and the float32 reference share). Angles with
// |a| >= 2^17 (never produced by coordinates in [0, 1]) take the accurate sincosf (Payne-Hanek
// slow path: the small "stack frame" in the ptxas report, no spills). float64 uses sincos().
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "cuda_common.cuh"

namespace dabdetr {
namespace cuda {
namespace {

constexpr int kMaxParamCoords = 64;

// log2 of the temperature of each input coordinate: in the kernel parameters for up to
// kMaxParamCoords coordinates, else in a device array.
struct Temps {
  double log2T[kMaxParamCoords];
  const double* ext;
};

__device__ __forceinline__ double log2_temp(const Temps& t, int c) { return t.ext != nullptr ? t.ext[c] : t.log2T[c]; }

// T ** (-2 j / F) = 2 ** (-(2 j / F) log2 T), in float64.
__device__ __forceinline__ double inv_freq(double log2T, int j, int F) {
  return exp2(-(2.0 * static_cast<double>(j) / static_cast<double>(F)) * log2T);
}

__device__ __forceinline__ void sincos_acc(float a, float* s, float* c) {
  if (fabsf(a) < 131072.0f) {
    const float k = rintf(a * 0.159154943091895336f);     // a / 2pi
    float r = fmaf(-k, 6.28318548202514648f, a);          // 2pi_hi = float(2pi)
    r = fmaf(-k, -1.74845553146951720e-07f, r);           // 2pi_lo = 2pi - float(2pi)
    __sincosf(r, s, c);
  } else {
    sincosf(a, s, c);
  }
}

__device__ __forceinline__ void sincos_acc(double a, double* s, double* c) { sincos(a, s, c); }

// Stores N elements of T (N * sizeof(T) in {4, 8, 16} bytes, dst aligned to that) with one store.
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* dst, const T (&v)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "vector store of 4, 8 or 16 bytes");
  DABDETR_CHECK_ALIGNED(dst, kBytes);
  if constexpr (kBytes == 16) {
    uint4 u;
    memcpy(&u, v, 16);
    *reinterpret_cast<uint4*>(dst) = u;
  } else if constexpr (kBytes == 8) {
    uint2 u;
    memcpy(&u, v, 8);
    *reinterpret_cast<uint2*>(dst) = u;
  } else {
    uint32_t u;
    memcpy(&u, v, 4);
    *reinterpret_cast<uint32_t*>(dst) = u;
  }
}

// ------------------------------------------------------------------------------------------------
// forward

struct FwdArgs {
  DeviceRowIndexer xi;  // coords / anchors rows
  DeviceRowIndexer ri;  // ref_wh rows (modulated)
  DeviceRowIndexer pi;  // pos_scale rows (modulated)
  int64_t rows;
  int C;  // output slots (sine_embed: C; modulated: 2)
  int F;
  double scale;
  bool exchange_xy;
};

// kMod = false: sine_embed, slot i reads coordinate src(i) (first two swapped when exchange_xy).
// kMod = true: modulated_sine_query, slot 0 = y (coordinate 1), slot 1 = x (coordinate 0), times
// ref / size and pos_scale.
template <typename T, int P, bool kMod>
__global__ void __launch_bounds__(256) sine_fwd_kernel(const T* __restrict__ x, const T* __restrict__ ref,
                                                       const T* __restrict__ ps, T* __restrict__ out,
                                                       const FwdArgs args, const __grid_constant__ Temps temps) {
  using acc_t = typename Acc<T>::type;
  const int F = args.F;
  const int groups = (F / 2) / P;  // column groups per slot
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= args.C * groups) return;
  const int slot = col / groups;
  const int j0 = (col - slot * groups) * P;
  const int src = kMod ? 1 - slot : ((args.exchange_xy && slot < 2) ? 1 - slot : slot);
  const double l2t = log2_temp(temps, src);
  acc_t w[P];
#pragma unroll
  for (int p = 0; p < P; ++p) w[p] = static_cast<acc_t>(inv_freq(l2t, j0 + p, F));
  const acc_t sc = static_cast<acc_t>(args.scale);
  const int64_t out_row = static_cast<int64_t>(args.C) * F;
  const int64_t out_col = static_cast<int64_t>(slot) * F + 2 * j0;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < args.rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const T* xr = x + args.xi.offset(r);
    const acc_t v = to_acc(xr[src]) * sc;
    T vals[2 * P];
    if constexpr (kMod) {
      acc_t rt = acc_t(1);
      if (ref != nullptr) rt = to_acc(ref[args.ri.offset(r) + src]) / to_acc(xr[2 + src]);
      const T* pr = ps != nullptr ? ps + args.pi.offset(r) + out_col : nullptr;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        acc_t s, c;
        sincos_acc(v * w[p], &s, &c);
        if (pr != nullptr) {
          s = s * to_acc(pr[2 * p]) * rt;
          c = c * to_acc(pr[2 * p + 1]) * rt;
        } else {
          s = s * rt;
          c = c * rt;
        }
        vals[2 * p] = from_acc<T>(s);
        vals[2 * p + 1] = from_acc<T>(c);
      }
    } else {
#pragma unroll
      for (int p = 0; p < P; ++p) {
        acc_t s, c;
        sincos_acc(v * w[p], &s, &c);
        vals[2 * p] = from_acc<T>(s);
        vals[2 * p + 1] = from_acc<T>(c);
      }
    }
    store_vec<T, 2 * P>(out + r * out_row + out_col, vals);
  }
}

template <typename T, int P, bool kMod>
void launch_fwd(const T* x, const T* ref, const T* ps, T* out, const FwdArgs& args, const Temps& temps,
                int device, cudaStream_t stream) {
  const int cols = args.C * ((args.F / 2) / P);
  int bx = 1;
  while (bx < cols && bx < 256) bx *= 2;
  const int by = 256 / bx;
  const int64_t gx = ceil_div(cols, bx);
  TORCH_CHECK(gx <= 2147483647LL, "dabdetr: sine embedding too wide for the CUDA kernel (", cols, " columns)");
  // Enough blocks to fill the GPU a few times over; threads walk the remaining rows.
  const int64_t want_y = std::max<int64_t>(1, (static_cast<int64_t>(num_sms(device)) * 32 + gx - 1) / gx);
  const int64_t gy = std::min<int64_t>({ceil_div(args.rows, by), want_y, 65535});
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(std::max<int64_t>(gy, 1)));
  const dim3 block(bx, by);
  launch_kernel(&sine_fwd_kernel<T, P, kMod>, grid, block, 0, stream, x, ref, ps, out, args, temps);
}

// Pairs per thread for 16-byte stores.
template <typename T>
constexpr int kVecPairs = 16 / (2 * static_cast<int>(sizeof(T)));

template <typename T, bool kMod>
void dispatch_fwd(const T* x, const T* ref, const T* ps, T* out, const FwdArgs& args, const Temps& temps,
                  int device, cudaStream_t stream) {
  constexpr int P = kVecPairs<T>;
  if (P > 1 && (args.F / 2) % P == 0) {
    launch_fwd<T, P, kMod>(x, ref, ps, out, args, temps, device, stream);
  } else {
    launch_fwd<T, 1, kMod>(x, ref, ps, out, args, temps, device, stream);
  }
}

// ------------------------------------------------------------------------------------------------
// backward

struct BwdArgs {
  DeviceRowIndexer xi;  // coords / anchors
  DeviceRowIndexer gi;  // grad_out
  DeviceRowIndexer ri;  // ref_wh (modulated)
  DeviceRowIndexer pi;  // pos_scale (modulated)
  int64_t rows;
  int C;       // slots per row (sine_embed: C; modulated: 2)
  int ncoord;  // coordinates with a temperature (sine_embed: C; modulated: 2)
  int F;
  int G;  // lanes per segment: a power of two <= 32
  bool use_table;
  double scale;
  bool exchange_xy;
};

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int G) {
  for (int off = G / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// kMod = false: grad_coords[r, src(i)] = scale * sum_j w_j (g_sin_j cos a_j - g_cos_j sin a_j).
// kMod = true: the modulated_sine_query backward of csrc/cpu/sine_cpu.cpp, one segment per
// (row, block); block 0 (y) writes the y entries, block 1 (x) the x entries.
template <typename T, bool kMod>
__global__ void __launch_bounds__(256) sine_bwd_kernel(const T* __restrict__ x, const T* __restrict__ go,
                                                       const T* __restrict__ ref, const T* __restrict__ ps,
                                                       T* __restrict__ gx, T* __restrict__ gref,
                                                       T* __restrict__ gps, const BwdArgs args,
                                                       const __grid_constant__ Temps temps) {
  using acc_t = typename Acc<T>::type;
  DABDETR_DYNAMIC_SMEM(smem_raw, 16);
  acc_t* wtab = reinterpret_cast<acc_t*>(smem_raw);
  const int F = args.F;
  const int half = F / 2;
  if (args.use_table) {
    for (int e = threadIdx.x; e < args.ncoord * half; e += blockDim.x) {
      const int c = e / half;
      wtab[e] = static_cast<acc_t>(inv_freq(log2_temp(temps, c), e - c * half, F));
    }
    __syncthreads();
  }
  const int G = args.G;
  const int lane = threadIdx.x & 31;
  const int sub = lane / G;
  const int lg = lane - sub * G;
  const int segs_per_warp = 32 / G;
  const int64_t nseg = args.rows * args.C;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const acc_t sc = static_cast<acc_t>(args.scale);
  // Every lane of a warp runs the same number of iterations (the shuffles need the full warp).
  for (int64_t s0 = warp * segs_per_warp; s0 < nseg; s0 += nwarps * segs_per_warp) {
    const int64_t seg = s0 + sub;
    const bool active = seg < nseg;
    acc_t dv = acc_t(0), dr = acc_t(0);
    int64_t r = 0;
    int slot = 0, src = 0;
    acc_t rt = acc_t(1), size = acc_t(1), refv = acc_t(1);
    if (active) {
      r = seg / args.C;
      slot = static_cast<int>(seg - r * args.C);
      src = kMod ? 1 - slot : ((args.exchange_xy && slot < 2) ? 1 - slot : slot);
      const T* xr = x + args.xi.offset(r);
      const acc_t v = to_acc(xr[src]) * sc;
      const T* gr = go + args.gi.offset(r) + static_cast<int64_t>(slot) * F;
      const double l2t = args.use_table ? 0.0 : log2_temp(temps, src);
      if constexpr (kMod) {
        size = to_acc(xr[2 + src]);
        if (ref != nullptr) {
          refv = to_acc(ref[args.ri.offset(r) + src]);
          rt = refv / size;
        }
      }
      const T* pr = (kMod && ps != nullptr) ? ps + args.pi.offset(r) + static_cast<int64_t>(slot) * F : nullptr;
      T* gpr = (kMod && ps != nullptr) ? gps + r * 2 * F + static_cast<int64_t>(slot) * F : nullptr;
      for (int j = lg; j < half; j += G) {
        const acc_t w = args.use_table ? wtab[src * half + j] : static_cast<acc_t>(inv_freq(l2t, j, F));
        acc_t s, c;
        sincos_acc(v * w, &s, &c);
        const acc_t g0 = to_acc(gr[2 * j]), g1 = to_acc(gr[2 * j + 1]);
        if constexpr (kMod) {
          if (pr != nullptr) {
            const acc_t p0 = to_acc(pr[2 * j]), p1 = to_acc(pr[2 * j + 1]);
            gpr[2 * j] = from_acc<T>(g0 * s * rt);
            gpr[2 * j + 1] = from_acc<T>(g1 * c * rt);
            const acc_t e0 = g0 * p0, e1 = g1 * p1;
            dr += e0 * s + e1 * c;
            dv += w * (e0 * c - e1 * s);
          } else {
            dr += g0 * s + g1 * c;
            dv += w * (g0 * c - g1 * s);
          }
        } else {
          dv += w * (g0 * c - g1 * s);
        }
      }
    }
    dv = group_sum(dv, G);
    if constexpr (kMod) dr = group_sum(dr, G);
    if (active && lg == 0) {
      if constexpr (kMod) {
        T* ga = gx + r * 4;
        ga[src] = from_acc<T>(dv * rt * sc);
        if (ref != nullptr) {
          // ratio = ref / size: d ratio / d ref = 1 / size, d ratio / d size = -ref / size^2.
          ga[2 + src] = from_acc<T>(-dr * refv / (size * size));
          gref[r * 2 + src] = from_acc<T>(dr / size);
        } else {
          ga[2 + src] = zero_value<T>();
        }
      } else {
        gx[r * args.C + src] = from_acc<T>(dv * sc);
      }
    }
  }
}

template <typename T, bool kMod>
void launch_bwd(const T* x, const T* go, const T* ref, const T* ps, T* gx, T* gref, T* gps, BwdArgs args,
                const Temps& temps, int device, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const int half = args.F / 2;
  int G = 1;
  while (G < half && G < 32) G *= 2;
  args.G = G;
  const int64_t table_bytes = static_cast<int64_t>(args.ncoord) * half * static_cast<int64_t>(sizeof(acc_t));
  args.use_table = table_bytes <= 32 * 1024;
  const int64_t nseg = args.rows * args.C;
  const int64_t warps_needed = ceil_div(nseg, 32 / G);
  const int64_t blocks = std::min<int64_t>(ceil_div(warps_needed, 8), static_cast<int64_t>(num_sms(device)) * 16);
  launch_kernel(&sine_bwd_kernel<T, kMod>, dim3(static_cast<unsigned>(std::max<int64_t>(blocks, 1))), dim3(256),
                args.use_table ? static_cast<size_t>(table_bytes) : 0, stream, x, go, ref, ps, gx, gref, gps, args,
                temps);
}

// ------------------------------------------------------------------------------------------------
// host

// Temperatures as log2 in the kernel parameters (or a device array for many coordinates; `keep`
// holds it alive until the kernel is enqueued; the stream-ordered allocator keeps it valid).
Temps make_temps(c10::ArrayRef<double> temperature, const at::Tensor& like, at::Tensor& keep) {
  Temps t{};
  t.ext = nullptr;
  const int64_t n = static_cast<int64_t>(temperature.size());
  if (n <= kMaxParamCoords) {
    for (int64_t c = 0; c < n; ++c) t.log2T[c] = std::log2(temperature[c]);
  } else {
    at::Tensor host = at::empty({n}, like.options().device(at::kCPU).dtype(at::kDouble));
    double* h = host.mutable_data_ptr<double>();
    for (int64_t c = 0; c < n; ++c) h[c] = std::log2(temperature[c]);
    keep = host.to(like.device());
    t.ext = keep.const_data_ptr<double>();
  }
  return t;
}

const char* kSine = "sine_embed";
const char* kMsq = "modulated_sine_query";

at::Tensor sine_embed_cuda(const at::Tensor& coords, int64_t num_feats, c10::ArrayRef<double> temperature,
                           double scale, bool exchange_xy) {
  check_sine_embed_args(coords, num_feats, temperature, exchange_xy, "sine_embed");
  check_cuda_tensor(coords, kSine, "coords");
  const int64_t C = coords.size(-1);
  TORCH_CHECK(C * num_feats <= 2147483647LL, "dabdetr.sine_embed: C * num_feats = ", C * num_feats,
              " is too large for the CUDA kernel");
  const DeviceGuard guard(coords.device());
  DeviceRowIndexer xi;
  const at::Tensor in = make_device_indexer(coords, xi);
  std::vector<int64_t> out_sizes(coords.sizes().begin(), coords.sizes().end());
  out_sizes.back() = C * num_feats;
  at::Tensor out = at::empty(out_sizes, coords.options().memory_format(at::MemoryFormat::Contiguous));
  poison_output(out);
  if (out.numel() == 0) return out;
  at::Tensor keep;
  const Temps temps = make_temps(temperature, coords, keep);
  FwdArgs args{};
  args.xi = xi;
  args.rows = coords.numel() / C;
  args.C = static_cast<int>(C);
  args.F = static_cast<int>(num_feats);
  args.scale = scale;
  args.exchange_xy = exchange_xy;
  const cudaStream_t stream = current_stream();
  const int device = coords.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coords.scalar_type(), "dabdetr_sine_embed_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    dispatch_fwd<T, false>(native_ptr<scalar_t>(in), nullptr, nullptr, native_mutable_ptr<scalar_t>(out), args,
                           temps, device, stream);
  });
  return out;
}

at::Tensor sine_embed_backward_cuda(const at::Tensor& grad_out, const at::Tensor& coords, int64_t num_feats,
                                    c10::ArrayRef<double> temperature, double scale, bool exchange_xy) {
  check_sine_embed_args(coords, num_feats, temperature, exchange_xy, "sine_embed_backward");
  check_cuda_tensor(coords, kSine, "coords");
  const int64_t C = coords.size(-1);
  check_grad_out(grad_out, coords, "coords", C * num_feats);
  const DeviceGuard guard(coords.device());
  DeviceRowIndexer xi, gi;
  const at::Tensor in = make_device_indexer(coords, xi);
  const at::Tensor g = make_device_indexer(grad_out, gi);
  at::Tensor grad = at::empty(coords.sizes(), coords.options().memory_format(at::MemoryFormat::Contiguous));
  poison_output(grad);
  if (grad.numel() == 0) return grad;
  at::Tensor keep;
  const Temps temps = make_temps(temperature, coords, keep);
  BwdArgs args{};
  args.xi = xi;
  args.gi = gi;
  args.rows = coords.numel() / C;
  args.C = static_cast<int>(C);
  args.ncoord = static_cast<int>(C);
  args.F = static_cast<int>(num_feats);
  args.scale = scale;
  args.exchange_xy = exchange_xy;
  const cudaStream_t stream = current_stream();
  const int device = coords.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coords.scalar_type(), "dabdetr_sine_embed_bwd_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    launch_bwd<T, false>(native_ptr<scalar_t>(in), native_ptr<scalar_t>(g), nullptr, nullptr,
                         native_mutable_ptr<scalar_t>(grad), nullptr, nullptr, args, temps, device, stream);
  });
  return grad;
}

void check_modulated_args_cuda(const at::Tensor& anchors, const c10::optional<at::Tensor>& ref_wh,
                               const c10::optional<at::Tensor>& pos_scale, int64_t num_feats,
                               c10::ArrayRef<double> temperature) {
  check_modulated_args(anchors, ref_wh, pos_scale, num_feats, temperature);
  check_cuda_tensor(anchors, kMsq, "anchors");
  TORCH_CHECK(num_feats <= 1073741823LL, "dabdetr.modulated_sine_query: 'num_feats' = ", num_feats,
              " is too large for the CUDA kernel");
}

at::Tensor modulated_sine_query_cuda(const at::Tensor& anchors, const c10::optional<at::Tensor>& ref_wh,
                                     const c10::optional<at::Tensor>& pos_scale, int64_t num_feats,
                                     c10::ArrayRef<double> temperature, double scale) {
  check_modulated_args_cuda(anchors, ref_wh, pos_scale, num_feats, temperature);
  const DeviceGuard guard(anchors.device());
  const bool has_ref = ref_wh.has_value();
  const bool has_ps = pos_scale.has_value();
  FwdArgs args{};
  const at::Tensor a = make_device_indexer(anchors, args.xi);
  const at::Tensor rw = has_ref ? make_device_indexer(*ref_wh, args.ri) : at::Tensor();
  const at::Tensor ps = has_ps ? make_device_indexer(*pos_scale, args.pi) : at::Tensor();
  std::vector<int64_t> out_sizes(anchors.sizes().begin(), anchors.sizes().end());
  out_sizes.back() = 2 * num_feats;
  at::Tensor out = at::empty(out_sizes, anchors.options().memory_format(at::MemoryFormat::Contiguous));
  poison_output(out);
  if (out.numel() == 0) return out;
  at::Tensor keep;
  const Temps temps = make_temps(temperature, anchors, keep);  // (T_x, T_y)
  args.rows = anchors.numel() / 4;
  args.C = 2;
  args.F = static_cast<int>(num_feats);
  args.scale = scale;
  args.exchange_xy = true;
  const cudaStream_t stream = current_stream();
  const int device = anchors.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anchors.scalar_type(), "dabdetr_msq_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    dispatch_fwd<T, true>(native_ptr<scalar_t>(a), has_ref ? native_ptr<scalar_t>(rw) : nullptr,
                          has_ps ? native_ptr<scalar_t>(ps) : nullptr, native_mutable_ptr<scalar_t>(out), args,
                          temps, device, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_sine_query_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& anchors, const c10::optional<at::Tensor>& ref_wh,
    const c10::optional<at::Tensor>& pos_scale, int64_t num_feats, c10::ArrayRef<double> temperature,
    double scale) {
  check_modulated_args_cuda(anchors, ref_wh, pos_scale, num_feats, temperature);
  check_grad_out(grad_out, anchors, "anchors", 2 * num_feats);
  const DeviceGuard guard(anchors.device());
  const bool has_ref = ref_wh.has_value();
  const bool has_ps = pos_scale.has_value();
  BwdArgs args{};
  const at::Tensor a = make_device_indexer(anchors, args.xi);
  const at::Tensor g = make_device_indexer(grad_out, args.gi);
  const at::Tensor rw = has_ref ? make_device_indexer(*ref_wh, args.ri) : at::Tensor();
  const at::Tensor ps = has_ps ? make_device_indexer(*pos_scale, args.pi) : at::Tensor();
  const auto opts = anchors.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor g_anchors = at::empty(anchors.sizes(), opts);
  at::Tensor g_ref = has_ref ? at::empty(ref_wh->sizes(), opts) : at::empty({0}, opts);
  at::Tensor g_ps = has_ps ? at::empty(pos_scale->sizes(), opts) : at::empty({0}, opts);
  for (at::Tensor* t : {&g_anchors, &g_ref, &g_ps}) poison_output(*t);
  const int64_t rows = anchors.numel() / 4;
  if (rows == 0) return {g_anchors, g_ref, g_ps};
  at::Tensor keep;
  const Temps temps = make_temps(temperature, anchors, keep);
  args.rows = rows;
  args.C = 2;
  args.ncoord = 2;
  args.F = static_cast<int>(num_feats);
  args.scale = scale;
  args.exchange_xy = true;
  const cudaStream_t stream = current_stream();
  const int device = anchors.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anchors.scalar_type(), "dabdetr_msq_bwd_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    launch_bwd<T, true>(native_ptr<scalar_t>(a), native_ptr<scalar_t>(g),
                        has_ref ? native_ptr<scalar_t>(rw) : nullptr, has_ps ? native_ptr<scalar_t>(ps) : nullptr,
                        native_mutable_ptr<scalar_t>(g_anchors), has_ref ? native_mutable_ptr<scalar_t>(g_ref) : nullptr,
                        has_ps ? native_mutable_ptr<scalar_t>(g_ps) : nullptr, args, temps, device, stream);
  });
  return {g_anchors, g_ref, g_ps};
}

}  // namespace

DABDETR_CUDA_LIBRARY(m) {
  DABDETR_CUDA_KERNEL(m, "sine_embed", &sine_embed_cuda);
  DABDETR_CUDA_KERNEL(m, "sine_embed_backward", &sine_embed_backward_cuda);
  DABDETR_CUDA_KERNEL(m, "modulated_sine_query", &modulated_sine_query_cuda);
  DABDETR_CUDA_KERNEL(m, "modulated_sine_query_backward", &modulated_sine_query_backward_cuda);
}

}  // namespace cuda
}  // namespace dabdetr

#ifndef DABDETR_CUDA_EMULATION
// Build marker: the CUDA architectures this library was compiled for (nvcc's __CUDA_ARCH_LIST__,
// e.g. "800,900"). tests/test_cuda.py reads it through ctypes to know that the build included the
// CUDA kernels, independently of the kernel registrations it then checks.
#define DABDETR_STR2(...) #__VA_ARGS__
#define DABDETR_STR(...) DABDETR_STR2(__VA_ARGS__)
extern "C" __attribute__((visibility("default"))) const char* dabdetr_cuda_build_info() {
#ifdef __CUDA_ARCH_LIST__
  return "cuda " DABDETR_STR(__CUDACC_VER_MAJOR__) "." DABDETR_STR(__CUDACC_VER_MINOR__) " archs " DABDETR_STR(
      __CUDA_ARCH_LIST__);
#else
  return "cuda " DABDETR_STR(__CUDACC_VER_MAJOR__) "." DABDETR_STR(__CUDACC_VER_MINOR__);
#endif
}
#endif  // DABDETR_CUDA_EMULATION
