// Device-side helpers shared by dabdetr's CUDA kernels: native element types and conversions, a
// strided row indexer usable on the device, launch helpers.
//
// Only ATen / c10 headers (not torch/extension.h): they compile ~3x faster under nvcc.
#pragma once

// Built two ways: by nvcc for the GPU, and by the host compiler with DABDETR_CUDA_EMULATION defined
// for csrc/emu (the same kernels run on the CPU by an emulator of the CUDA execution model, for the
// tests: tests/test_cuda_emulated.py). The few places where they differ are the helpers below
// (dynamic shared memory, kernel launch and error checks, device guard / stream, device attributes,
// registration, output poisoning, alignment checks).
#ifdef DABDETR_CUDA_EMULATION
#include "../emu/cuda_emu.h"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>
#ifndef DABDETR_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "../common/checks.h"

namespace dabdetr {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// element types: at::Half / at::BFloat16 are layout-compatible with __half / __nv_bfloat16

template <typename scalar_t>
struct Native {
  using type = scalar_t;
};
template <>
struct Native<at::Half> {
  using type = __half;
};
template <>
struct Native<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Accumulation type: float64 for float64, float32 for everything else.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
constexpr bool kIsHalfLike = false;
template <>
constexpr bool kIsHalfLike<__half> = true;
template <>
constexpr bool kIsHalfLike<__nv_bfloat16> = true;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T>
__device__ __forceinline__ T from_acc(double x);
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }

template <typename T>
__device__ __forceinline__ T zero_value() {
  return from_acc<T>(typename Acc<T>::type(0));
}

template <typename scalar_t>
inline const typename Native<scalar_t>::type* native_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename Native<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
inline typename Native<scalar_t>::type* native_mutable_ptr(at::Tensor& t) {
  return reinterpret_cast<typename Native<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

// ------------------------------------------------------------------------------------------------
// strided rows

// Element offset of flat row `row` of a [..., C] tensor whose leading dims have arbitrary strides
// (device copy of dabdetr::RowIndexer, with adjacent contiguous dims merged on the host so that the
// common cases cost one multiply).
struct DeviceRowIndexer {
  int ndim = 0;
  int64_t sizes[kMaxRowDims];
  int64_t strides[kMaxRowDims];

  __host__ __device__ __forceinline__ int64_t offset(int64_t row) const {
    if (ndim == 1) return row * strides[0];
    int64_t off = 0;
#pragma unroll 1
    for (int d = ndim - 1; d >= 1; --d) {
      const int64_t i = row % sizes[d];
      row /= sizes[d];
      off += i * strides[d];
    }
    return ndim > 0 ? off + row * strides[0] : off;
  }
};

// Fills `out` from a host RowIndexer, merging dims (d, d+1) when stride[d] == stride[d+1] * size[d+1]
// and dropping size-1 dims.
inline DeviceRowIndexer to_device_indexer(const RowIndexer& idx) {
  DeviceRowIndexer out;
  int n = 0;
  for (int d = 0; d < idx.ndim; ++d) {
    if (idx.sizes[d] == 1) continue;
    if (n > 0 && out.strides[n - 1] == idx.strides[d] * idx.sizes[d]) {
      out.sizes[n - 1] *= idx.sizes[d];
      out.strides[n - 1] = idx.strides[d];
    } else {
      out.sizes[n] = idx.sizes[d];
      out.strides[n] = idx.strides[d];
      ++n;
    }
  }
  if (n == 0) {  // a single row (or all size-1 leading dims)
    out.sizes[0] = 1;
    out.strides[0] = 0;
    n = 1;
  }
  out.ndim = n;
  return out;
}

// Tensor with a contiguous last dim and leading dims a DeviceRowIndexer can take (copy only when
// needed); fills `idx`.
inline at::Tensor make_device_indexer(const at::Tensor& t, DeviceRowIndexer& idx) {
  RowIndexer host;
  at::Tensor u = make_row_indexer(t, host);
  idx = to_device_indexer(host);
  return u;
}

// ------------------------------------------------------------------------------------------------
// launch helpers

#ifdef DABDETR_CUDA_EMULATION
// The kernels' dynamic shared memory: the emulator's per-block buffer.
#define DABDETR_DYNAMIC_SMEM(name, align) unsigned char* name = ::cuemu::dynamic_smem()
// A vector access of `bytes` bytes at `ptr` must be aligned to them (the emulator checks).
#define DABDETR_CHECK_ALIGNED(ptr, bytes) ::cuemu::check_aligned(ptr, bytes, "vector access")
#define C10_CUDA_CHECK(expr)                                                             \
  do {                                                                                   \
    const cudaError_t dabdetr_emu_err = (expr);                                          \
    TORCH_CHECK(dabdetr_emu_err == cudaSuccess, "CUDA emulation: ", #expr, " failed"); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
// The emulated ops are registered as CPU ops of their own namespace (schemas inferred from the
// functions), never as the CUDA kernels of dabdetr::.
#define DABDETR_CUDA_LIBRARY(m) TORCH_LIBRARY_FRAGMENT(dabdetr_cuda_emu, m)
#define DABDETR_CUDA_KERNEL(m, name, fn) m.def(name, fn)
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
#else
#define DABDETR_DYNAMIC_SMEM(name, align) extern __shared__ __align__(align) unsigned char name[]
#define DABDETR_CHECK_ALIGNED(ptr, bytes) ((void)0)
#define DABDETR_CUDA_LIBRARY(m) TORCH_LIBRARY_IMPL(dabdetr, CUDA, m)
#define DABDETR_CUDA_KERNEL(m, name, fn) m.impl(name, fn)
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#endif

// kernel<<<grid, block, smem, stream>>>(args...) and the launch error check.
template <typename... KArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
#ifdef DABDETR_CUDA_EMULATION
  (void)stream;
  ::cuemu::launch(kernel, grid, block, smem, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Emulation: outputs start as NaN (what the kernels do not write shows up); on the GPU a no-op.
inline void poison_output(at::Tensor& t) {
#ifdef DABDETR_CUDA_EMULATION
  if (t.is_floating_point() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
#else
  (void)t;
#endif
}

inline int num_sms(int device) {
#ifdef DABDETR_CUDA_EMULATION
  (void)device;
  return ::cuemu::emulated_sms();  // 2 unless a test sets it (cuemu::set_num_sms)
#else
  static int cached[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cached[device] = v > 0 ? v : 1;
  }
  return cached[device];
#endif
}

inline int max_smem_optin(int device) {
#ifdef DABDETR_CUDA_EMULATION
  (void)device;
  return ::cuemu::kMaxDynamicSmemOptin;  // the emulated device's (sm_90's) opt-in maximum
#else
  static int cached[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cached[device] = v > 0 ? v : 48 * 1024;
  }
  return cached[device];
#endif
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void check_cuda_tensor(const at::Tensor& t, const char* op, const char* name) {
#ifdef DABDETR_CUDA_EMULATION
  TORCH_CHECK(t.is_cpu(), "dabdetr.", op, ": '", name, "' must be a CPU tensor for the emulated CUDA kernel, got ",
              t.device());
#else
  TORCH_CHECK(t.is_cuda(), "dabdetr.", op, ": '", name, "' must be a CUDA tensor for the CUDA kernel, got ",
              t.device());
#endif
}

}  // namespace cuda
}  // namespace dabdetr
