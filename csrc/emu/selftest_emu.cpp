// Kernels with known defects, to show that the CUDA emulator (cuda_emu.h) catches what the tests of
// the real kernels rely on it to catch: a missing __syncthreads (results change with the schedule),
// a barrier half a warp skips for a shuffle (deadlock error), a warp collective after lanes exited
// (error), a write past the dynamic shared memory (error), reads of shared memory nobody wrote (NaN),
// misaligned WMMA / vector accesses and over 48 KB of dynamic shared memory without opting in
// (errors), blocks that depend on the order they run in (results change with the schedule). Tests
// only.
#define DABDETR_CUDA_EMULATION 1
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../cuda/cuda_common.cuh"

namespace {

using dabdetr::cuda::launch_kernel;

// Each thread writes s[t] = t + 1, then reads its neighbour's slot; with_barrier: a barrier between.
__global__ void neighbour_kernel(float* out, bool with_barrier) {
  DABDETR_DYNAMIC_SMEM(smem, 16);
  float* s = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = static_cast<float>(t + 1);
  if (with_barrier) __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 1) % n];
}

// Half of each warp waits in __syncthreads while the other half waits in a shuffle that needs the
// whole warp: a deadlock (on a GPU, a hang).
__global__ void divergent_barrier_kernel(float* out) {
  float v = 1.0f;
  if ((threadIdx.x & 31) < 16) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// The upper half of the block exits; the lower half's warp then shuffles with lanes that exited.
__global__ void exited_lanes_shuffle_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Writes one float past the end of `smem_bytes` of dynamic shared memory.
__global__ void smem_overflow_kernel(float* out, int smem_floats) {
  DABDETR_DYNAMIC_SMEM(smem, 16);
  float* s = reinterpret_cast<float*>(smem);
  if (threadIdx.x == 0) s[smem_floats] = 1.0f;
  out[threadIdx.x] = 0.0f;
}

// Reads a shared-memory slot no thread wrote.
__global__ void unwritten_smem_kernel(float* out) {
  DABDETR_DYNAMIC_SMEM(smem, 16);
  const float* s = reinterpret_cast<const float*>(smem);
  out[threadIdx.x] = s[threadIdx.x];
}

// A WMMA load from shared memory 16 bytes past a 32-byte boundary (WMMA needs 256-bit alignment).
__global__ void misaligned_wmma_kernel(float* out) {
  DABDETR_DYNAMIC_SMEM(smem, 128);
  const __half* tile = reinterpret_cast<const __half*>(smem + 16);
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, tile, 16);
  out[threadIdx.x] = 0.0f;
}

// A 16-byte vector store to a 4-byte aligned address.
__global__ void misaligned_vector_kernel(float* out) {
  if (threadIdx.x == 0) {
    DABDETR_CHECK_ALIGNED(out + 1, 16);
  }
  out[threadIdx.x] = 0.0f;
}

// Block b's thread 0 adds one to what block b - 1 wrote: it assumes the blocks run in order, which
// CUDA does not promise.
__global__ void chained_blocks_kernel(float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = (blockIdx.x == 0 ? 0.0f : out[blockIdx.x - 1]) + 1.0f;
}

// Uses 64 KB of dynamic shared memory (more than a kernel gets without opting in).
__global__ void big_smem_kernel(float* out) {
  DABDETR_DYNAMIC_SMEM(smem, 16);
  float* s = reinterpret_cast<float*>(smem);
  s[16383 - threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = s[16383 - threadIdx.x];
}

// kind: 0 neighbour without barrier, 1 neighbour with barrier, 2 divergent barrier, 3 shuffle after
// exited lanes, 4 shared-memory overflow, 5 unwritten shared memory, 6 misaligned WMMA load, 7
// misaligned vector store, 8 64 KB of dynamic shared memory without opting in, 9 the same after
// cudaFuncSetAttribute, 10 blocks chained through global memory (out starts as zeros). Returns the
// kernel's output.
at::Tensor selftest(int64_t kind, int64_t threads, int64_t blocks) {
  at::Tensor out = at::zeros({blocks * threads}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(threads));
  const size_t smem = static_cast<size_t>(threads) * sizeof(float);
  if (kind == 8 || kind == 9) {  // 64 KB of dynamic shared memory; 9: after raising the kernel's limit
    if (kind == 9)
      C10_CUDA_CHECK(cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
    launch_kernel(big_smem_kernel, grid, block, 64 * 1024, nullptr, o);
  } else if (kind == 0 || kind == 1) {
    launch_kernel(neighbour_kernel, grid, block, smem, nullptr, o, kind == 1);
  } else if (kind == 4) {
    launch_kernel(smem_overflow_kernel, grid, block, smem, nullptr, o, static_cast<int>(threads));
  } else {
    // kernels taking only the output: {kind, kernel, dynamic shared memory}
    struct Simple {
      int64_t kind;
      void (*kernel)(float*);
      size_t smem;
    };
    const Simple simple[] = {{2, divergent_barrier_kernel, 0}, {3, exited_lanes_shuffle_kernel, 0},
                             {5, unwritten_smem_kernel, smem}, {6, misaligned_wmma_kernel, 1024},
                             {7, misaligned_vector_kernel, 0}, {10, chained_blocks_kernel, 0}};
    const Simple* hit = nullptr;
    for (const Simple& e : simple)
      if (e.kind == kind) hit = &e;
    TORCH_CHECK(hit != nullptr, "selftest: unknown kind ", kind);
    launch_kernel(hit->kernel, grid, block, hit->smem, nullptr, o);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dabdetr_cuda_emu, m) { m.def("selftest", &selftest); }
