// A CPU emulator of the CUDA execution model, for testing dabdetr's CUDA kernels without a GPU.
//
// csrc/emu/*_emu.cpp compile csrc/cuda/*.cu as C++ (g++, DABDETR_CUDA_EMULATION defined) with this
// header first: every thread of a block is a fiber on one OS thread, and the blocks of a
// grid run one after another. What it models:
//  * __syncthreads(): a barrier of the block's threads that have not exited (every call site is the
//    same barrier, as bar.sync 0 is on the hardware). When no thread can go on (e.g. some wait in
//    __syncthreads, others of the same warp in a shuffle), the launch fails with a deadlock error.
//  * warp collectives (__shfl_xor_sync, __syncwarp, the WMMA load / store / mma calls): a barrier
//    of the warp's 32 lanes (all must take part: a lane that exited makes it an error).
//  * shared memory: a per-block buffer of the launch's dynamic size, filled with 0xFF bytes (NaN in
//    every floating type) before each block, so that reading what no thread wrote shows up in the
//    results; 256 more such bytes after it, which a block must leave as they are.
//  * WMMA (nvcuda::wmma, m16n16k16, half / bfloat16 inputs, float accumulators): each lane holds
//    the whole 16x16 tile (the real per-lane layout is opaque to the API); a product is computed an
//    element per lane and shared through the warp, exact products summed in float, as tensor cores
//    do up to the order of the sums; a store writes element e from lane e % 32, so that another
//    warp, or another lane of this warp, reading it before a barrier can see old values.
//  * scheduling: between barriers the runnable threads run one at a time, in thread order, in
//    reverse order, or in a seeded random order (set_schedule); the blocks of a grid run in the
//    same kind of order. A kernel without data races gives bitwise the same results under every
//    order; a missing barrier, or a block reading what another block writes, usually does not.
//  * alignment, as on the hardware: WMMA pointers 32-byte aligned with leading dims of 16-byte
//    multiples; vector stores aligned to their size (DABDETR_CHECK_ALIGNED; under the sanitizers,
//    tests/cuda_emu.py --asan, every vector access through a misaligned pointer is reported too).
//  * device math: exp2f, log2f, __sincosf with errors within CUDA's documented bounds.
//  * launches: block size, grid limits, dynamic shared memory over 48 KB only after
//    cudaFuncSetAttribute(MaxDynamicSharedMemorySize); the device's SM count (set_num_sms).
// Not modelled: the memory model beyond barriers, blocks running at the same time (two blocks'
// unsynchronised read-modify-writes of one global element would pass), global-memory bounds
// (tests/cuda_emu.py --asan runs the kernels under AddressSanitizer for those), performance, and
// anything about the compiled device code (registers, spills, PTX): those need nvcc's reports and
// a GPU.
#pragma once

#ifndef DABDETR_CUDA_EMULATION
#error "cuda_emu.h is for the CPU emulation build only"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#define __launch_bounds__(...)
#ifndef __grid_constant__
#define __grid_constant__
#endif

// AddressSanitizer (tests/cuda_emu.py --asan): told about every switch between stacks
// (__sanitizer_start/finish_switch_fiber), so that it checks each fiber against its own stack, and
// a reused fiber stack is unpoisoned first (a fiber parked for good leaves its frames' red zones).
#if defined(__SANITIZE_ADDRESS__)
#define DABDETR_CUEMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DABDETR_CUEMU_ASAN 1
#endif
#endif
#ifdef DABDETR_CUEMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Fiber context switch. On x86-64: a few instructions (callee-saved registers and the stack
// pointer; swapcontext also saves the signal mask, a system call per switch, ~10x slower).
// Elsewhere: ucontext.
#if defined(__x86_64__)
#define DABDETR_CUEMU_ASM_SWITCH 1
// dabdetr_cuemu_switch(save, to): pushes the callee-saved registers, stores the stack pointer in
// *save, loads `to` and pops the registers saved there. A COMDAT section: every translation unit
// that includes this header has a copy; the linker keeps one.
asm(R"(
  .pushsection .text.dabdetr_cuemu_switch,"axG",@progbits,dabdetr_cuemu_switch,comdat
  .globl dabdetr_cuemu_switch
  .hidden dabdetr_cuemu_switch
  .type dabdetr_cuemu_switch, @function
dabdetr_cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dabdetr_cuemu_switch, .-dabdetr_cuemu_switch
  .popsection
)");
extern "C" __attribute__((visibility("hidden"))) void dabdetr_cuemu_switch(void** save, void* to);
#endif

namespace cuemu {

struct Context {
#ifdef DABDETR_CUEMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  // The stack this context runs on (for ASan): a fiber's own; for the launching thread's context,
  // what ASan reported when the first fiber started.
  const void* stack = nullptr;
  size_t stack_size = 0;
};

// Switches from `from` (the running context) to `to`. `from_ends`: `from` is never resumed (its
// stack is reused, or freed, later).
inline void context_switch(Context& from, Context& to, bool from_ends = false) {
#ifdef DABDETR_CUEMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(from_ends ? nullptr : &fake_stack, to.stack, to.stack_size);
#else
  (void)from_ends;
#endif
#ifdef DABDETR_CUEMU_ASM_SWITCH
  dabdetr_cuemu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
#ifdef DABDETR_CUEMU_ASAN
  // resumed: fibers are resumed by the scheduler only, the scheduler by fibers only
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

// A fiber's first instruction: the switch that started it ends here (under ASan, where the
// launching thread's stack is learned, for the fibers' switches back).
inline void context_started(Context& scheduler) {
#ifdef DABDETR_CUEMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &scheduler.stack, &scheduler.stack_size);
#else
  (void)scheduler;
#endif
}

// A context that starts `entry` (which must never return) on the given stack.
inline void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  c.stack = stack;
  c.stack_size = size;
#ifdef DABDETR_CUEMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(stack, size);  // red zones of a parked fiber's frames, if reused
#endif
#ifdef DABDETR_CUEMU_ASM_SWITCH
  // The first switch pops six zero registers and "returns" into entry with the stack pointer at
  // 8 mod 16, as after a call.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  void** slot = reinterpret_cast<void**>(top - 16);
  *slot = reinterpret_cast<void*>(entry);
  void** sp = slot - 6;
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  c.sp = sp;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#endif
}

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Fiber {
  Context ctx;
  uint3 tid;
  int warp = 0;
  Wait wait = Wait::kNone;
};

struct Schedule {
  int mode = 0;  // 0: thread order, 1: reverse, 2: random
  uint64_t seed = 0;
};

inline Schedule& schedule() {
  static Schedule s;
  return s;
}

struct Block {
  uint3 bid;
  dim3 bdim, gdim;
  std::vector<Fiber> fibers;
  Context sched;
  int current = -1;
  int live = 0;
  int block_arrived = 0;                    // threads waiting in __syncthreads
  std::vector<int> warp_size, warp_arrived;  // per warp: live lanes, lanes waiting in a collective
  std::vector<std::array<unsigned char, 32 * 16>> exch;  // 32 lanes x up to 16 bytes
  std::vector<std::array<float, 256>> mma;                // a WMMA product tile per warp
  unsigned char* smem = nullptr;
  std::function<void()> body;
  std::string error;
};

inline Block*& current_block() {
  static thread_local Block* b = nullptr;
  return b;
}
inline Block& blk() { return *current_block(); }
inline Fiber& self() {
  Block& b = blk();
  return b.fibers[b.current];
}
inline unsigned linear_tid() {
  const Fiber& f = self();
  const Block& b = blk();
  return f.tid.x + b.bdim.x * (f.tid.y + b.bdim.y * f.tid.z);
}

[[noreturn]] inline void fail(const std::string& msg) {
  Block& b = blk();
  if (b.error.empty()) b.error = msg;
  Fiber& f = self();
  f.wait = Wait::kDone;  // parked for good; the launcher reports the error
  context_switch(f.ctx, b.sched, /*from_ends=*/true);
  std::abort();  // never resumed
}

inline void yield() {
  Block& b = blk();
  Fiber& f = self();
  context_switch(f.ctx, b.sched);
}

// Releases the block barrier when every live thread has arrived.
inline void try_release_block(Block& b) {
  if (b.block_arrived > 0 && b.block_arrived == b.live) {
    for (auto& f : b.fibers)
      if (f.wait == Wait::kBlock) f.wait = Wait::kNone;
    b.block_arrived = 0;
  }
}

inline void syncthreads() {
  Block& b = blk();
  Fiber& f = self();
  f.wait = Wait::kBlock;
  ++b.block_arrived;
  try_release_block(b);
  yield();
}

inline void syncwarp() {
  Block& b = blk();
  Fiber& f = self();
  const int w = f.warp;
  if (b.warp_size[w] != 32) fail("warp collective in a warp of " + std::to_string(b.warp_size[w]) + " threads");
  f.wait = Wait::kWarp;
  if (++b.warp_arrived[w] == 32) {
    for (auto& g : b.fibers)
      if (g.warp == w && g.wait == Wait::kWarp) g.wait = Wait::kNone;
    b.warp_arrived[w] = 0;
  }
  yield();
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= 16, "shuffle of up to 16 bytes");
  if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask is not emulated");
  Block& b = blk();
  const int w = self().warp;
  const int lane = static_cast<int>(linear_tid() & 31u);
  std::memcpy(&b.exch[w][lane * 16], &v, sizeof(T));
  syncwarp();
  int src = lane ^ lane_mask;
  if ((src / width) != (lane / width)) src = lane;  // outside the lane's segment: its own value
  T r;
  std::memcpy(&r, &b.exch[w][src * 16], sizeof(T));
  syncwarp();  // every lane has read before the buffer is reused
  return r;
}

// The hardware's alignment rules for vector and matrix accesses (a violation is a "misaligned
// address" fault or undefined results on a GPU).
inline void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    fail(std::string(what) + ": address not aligned to " + std::to_string(bytes) + " bytes");
}

inline void fiber_entry() {
  Block& b = blk();
  context_started(b.sched);
  b.body();
  Fiber& f = self();
  f.wait = Wait::kDone;
  --b.live;
  const int w = f.warp;
  --b.warp_size[w];
  if (b.warp_arrived[w] > 0) fail("a thread exited while its warp waited in a warp collective");
  try_release_block(b);
  context_switch(f.ctx, b.sched, /*from_ends=*/true);  // a fiber's entry must not return
  std::abort();
}

// Fiber stacks, kept for the next launches (allocating them anew each launch costs more than most
// test kernels).
inline std::vector<std::unique_ptr<char[]>>& stack_pool() {
  static thread_local std::vector<std::unique_ptr<char[]>> pool;
  return pool;
}

inline std::vector<unsigned char>& smem_buffer() {
  static thread_local std::vector<unsigned char> buf;
  return buf;
}

inline unsigned char* dynamic_smem() { return blk().smem; }

constexpr size_t kStackBytes = 256 * 1024;
// After the dynamic shared memory: 0xFF bytes too (a read past the end gives NaN), checked after
// each block (a write past the end is an error unless it wrote all-ones bytes).
constexpr size_t kGuardBytes = 256;
constexpr size_t kSmemAlign = 128;
constexpr unsigned char kGuardByte = 0xFF;

// Runs one block to completion; throws std::runtime_error on an emulation error.
inline void run_block(Block& b, std::mt19937_64& rng) {
  const int n = static_cast<int>(b.bdim.x * b.bdim.y * b.bdim.z);
  const int warps = (n + 31) / 32;
  b.fibers.assign(n, Fiber{});
  auto& stacks = stack_pool();
  while (static_cast<int>(stacks.size()) < n) stacks.emplace_back(new char[kStackBytes]);
  b.warp_size.assign(warps, 0);
  b.warp_arrived.assign(warps, 0);
  b.exch.assign(warps, {});
  b.mma.assign(warps, {});
  b.live = n;
  b.block_arrived = 0;
  b.error.clear();
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.tid = make_uint3(i % b.bdim.x, (i / b.bdim.x) % b.bdim.y, i / (b.bdim.x * b.bdim.y));
    f.warp = i / 32;
    ++b.warp_size[f.warp];
    context_init(f.ctx, stacks[i].get(), kStackBytes, fiber_entry);
  }
  std::vector<int> order(n);
  const int mode = schedule().mode;
  for (;;) {
    // one round: every runnable fiber runs until its next barrier (or exit)
    order.clear();
    for (int i = 0; i < n; ++i)
      if (b.fibers[i].wait == Wait::kNone) order.push_back(i);
    if (order.empty()) break;
    if (mode == 1) std::reverse(order.begin(), order.end());
    if (mode == 2) std::shuffle(order.begin(), order.end(), rng);
    for (int i : order) {
      if (b.fibers[i].wait != Wait::kNone) continue;
      b.current = i;
      context_switch(b.sched, b.fibers[i].ctx);
      if (!b.error.empty()) break;
    }
    if (!b.error.empty()) break;
  }
  b.current = -1;
  if (!b.error.empty()) throw std::runtime_error("CUDA emulation: " + b.error);
  if (b.live > 0) {
    int at_block = 0, at_warp = 0;
    for (auto& f : b.fibers) {
      at_block += f.wait == Wait::kBlock;
      at_warp += f.wait == Wait::kWarp;
    }
    throw std::runtime_error("CUDA emulation: deadlock in block (" + std::to_string(b.bid.x) + ", " +
                             std::to_string(b.bid.y) + "): " + std::to_string(at_block) +
                             " threads wait in __syncthreads, " + std::to_string(at_warp) +
                             " in warp collectives, " + std::to_string(b.live) + " live");
  }
}

// Dynamic shared memory per kernel: 48 KB unless cudaFuncSetAttribute(kernel,
// cudaFuncAttributeMaxDynamicSharedMemorySize, n) raised it (up to the device's opt-in maximum), as
// on the hardware, where a larger launch fails.
constexpr int kDefaultDynamicSmem = 48 * 1024;
constexpr int kMaxDynamicSmemOptin = 227 * 1024;  // sm_90
inline std::unordered_map<const void*, int>& smem_optin() {
  static std::unordered_map<const void*, int> m;
  return m;
}

// kernel<<<grid, block, smem>>>(args...): the blocks of the grid one after another, in the order of
// the schedule (thread order: x fastest; reverse; random).
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  if (block.x * block.y * block.z == 0 || block.x * block.y * block.z > 1024)
    throw std::runtime_error("CUDA emulation: invalid block size");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("CUDA emulation: grid.y / grid.z over 65535");
  const auto it = smem_optin().find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = static_cast<size_t>(it != smem_optin().end() ? it->second : kDefaultDynamicSmem);
  if (smem_bytes > allowed)
    throw std::runtime_error("CUDA emulation: the launch asks for " + std::to_string(smem_bytes) +
                             " bytes of dynamic shared memory, the kernel allows " + std::to_string(allowed) +
                             " (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, n) "
                             "raises it)");
  std::tuple<std::decay_t<KArgs>...> params(static_cast<std::decay_t<KArgs>>(args)...);  // by value, as CUDA
  Block b;
  b.bdim = block;
  b.gdim = grid;
  b.body = [&] { std::apply(kernel, params); };
  std::vector<unsigned char>& buf = smem_buffer();
  std::mt19937_64 rng(schedule().seed);
  Block* saved = current_block();
  current_block() = &b;
  // The blocks' order follows the schedule too (the hardware promises none): a kernel whose blocks
  // depend on each other's global-memory writes gives different results.
  std::vector<uint3> blocks;
  blocks.reserve(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(make_uint3(x, y, z));
  if (schedule().mode == 1) std::reverse(blocks.begin(), blocks.end());
  if (schedule().mode == 2) std::shuffle(blocks.begin(), blocks.end(), rng);
  try {
    for (const uint3& bid : blocks) {
      // poison: NaN in every floating type; the base 128-byte aligned (as __align__(128) asks)
      buf.assign(smem_bytes + kGuardBytes + kSmemAlign, kGuardByte);
      const size_t shift = (kSmemAlign - reinterpret_cast<uintptr_t>(buf.data()) % kSmemAlign) % kSmemAlign;
      b.smem = buf.data() + shift;
      b.bid = bid;
      run_block(b, rng);
      for (size_t i = smem_bytes; i < smem_bytes + kGuardBytes; ++i)
        if (b.smem[i] != kGuardByte)
          throw std::runtime_error("CUDA emulation: block (" + std::to_string(bid.x) + ", " + std::to_string(bid.y) +
                                   ", " + std::to_string(bid.z) + ") wrote past the end of its " +
                                   std::to_string(smem_bytes) + " bytes of dynamic shared memory");
    }
  } catch (...) {
    current_block() = saved;
    throw;
  }
  current_block() = saved;
}

// The emulated device's multiprocessor count (what cudaDevAttrMultiProcessorCount reports; the
// kernels size grid-stride grids by it): 2 by default, a small GPU, so that the loops take several
// turns at test sizes; 132 is an H100's / H200's.
inline int& emulated_sms() {
  static int n = 2;
  return n;
}

inline void set_num_sms(int n) {
  if (n < 1 || n > 1024) throw std::invalid_argument("CUDA emulation: the SM count is 1 to 1024");
  emulated_sms() = n;
}

inline void set_schedule(int mode, uint64_t seed) {
  if (mode < 0 || mode > 2) throw std::invalid_argument("CUDA emulation: schedule mode is 0, 1 or 2");
  schedule().mode = mode;
  schedule().seed = seed;
}

// ------------------------------------------------------------------------------------------------
// WMMA: m16n16k16, half / bfloat16 inputs, float accumulators

inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

}  // namespace cuemu

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has m16n16k16 only");
  static constexpr int num_elements = 256;  // whole tile (the real per-lane count is 8)
  T x[256];                                 // row-major [row][col] of the logical tile
};

namespace detail {
// WMMA's rules: a 256-bit aligned pointer, a leading dimension of a multiple of 16 bytes.
template <typename T>
inline void check(const T* p, unsigned ldm, const char* what) {
  ::cuemu::check_aligned(p, 32, what);
  if ((ldm * sizeof(T)) % 16 != 0) ::cuemu::fail(std::string(what) + ": ldm is not a multiple of 16 bytes");
}

// A warp-collective load of a row- or column-major 16 x 16 tile into a fragment's row-major copy.
template <typename T>
inline void load(T* x, const T* p, unsigned ldm, bool row_major) {
  check(p, ldm, "wmma::load_matrix_sync");
  ::cuemu::syncwarp();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) x[r * 16 + c] = row_major ? p[r * ldm + c] : p[c * ldm + r];
}
}  // namespace detail

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulators load with a layout_t");
  detail::load(f.x, p, ldm, std::is_same_v<Layout, row_major>);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  detail::load(f.x, p, ldm, layout == mem_row_major);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check(p, ldm, "wmma::store_matrix_sync");
  ::cuemu::syncwarp();
  const unsigned lane = ::cuemu::linear_tid() & 31u;
  for (unsigned e = lane; e < 256; e += 32) {
    const unsigned r = e / 16, c = e % 16;
    if (layout == mem_row_major)
      p[r * ldm + c] = f.x[e];
    else
      p[c * ldm + r] = f.x[e];
  }
}

template <typename T, typename V>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, V v) {
  for (auto& e : f.x) e = static_cast<T>(v);
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  // Each lane computes the elements e = lane (mod 32) from its own fragments into the warp's tile,
  // then every lane takes the whole tile (the work of one tensor-core product, spread over the warp).
  ::cuemu::syncwarp();
  float* tile = ::cuemu::blk().mma[::cuemu::self().warp].data();
  const unsigned lane = ::cuemu::linear_tid() & 31u;
  for (unsigned e = lane; e < 256; e += 32) {
    const unsigned i = e / 16, j = e % 16;
    float s = c.x[e];
    for (int k = 0; k < 16; ++k) s += ::cuemu::to_float(a.x[i * 16 + k]) * ::cuemu::to_float(b.x[k * 16 + j]);
    tile[e] = s;
  }
  ::cuemu::syncwarp();
  std::memcpy(d.x, tile, sizeof(d.x));
}
}  // namespace wmma
}  // namespace nvcuda

// ------------------------------------------------------------------------------------------------
// built-in variables and device functions

#define threadIdx (::cuemu::self().tid)
#define blockIdx (::cuemu::blk().bid)
#define blockDim (::cuemu::blk().bdim)
#define gridDim (::cuemu::blk().gdim)

// Host API: the one attribute the kernels' host code sets (a better match than the runtime's
// const void* overload, which would need libcudart).
template <typename... A>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(A...), cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > ::cuemu::kMaxDynamicSmemOptin) return cudaErrorInvalidValue;
    ::cuemu::smem_optin()[reinterpret_cast<const void*>(kernel)] = value;
  }
  return cudaSuccess;
}

inline void __syncthreads() { ::cuemu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::cuemu::fail("__syncwarp with a partial mask is not emulated");
  ::cuemu::syncwarp();
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::cuemu::shfl_xor(mask, v, lane_mask, width);
}
// The device math functions the kernels use, with the errors CUDA documents for them (CUDA C
// Programming Guide, "Mathematical Functions") rather than the host's: each result is moved by a
// pseudo-random amount within the documented bound (a function of the input's bits, so results stay
// deterministic), so that the tests' tolerances are checked against the hardware's error budget.
// Exact cases stay exact (0, +-inf, NaN results; exp2f(0) = 1, log2f(1) = 0).
namespace cuemu {
inline uint32_t mix(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u ^= u >> 16;
  u *= 0x7feb352dU;
  u ^= u >> 15;
  u *= 0x846ca68bU;
  return u ^ (u >> 16);
}
// r moved by k ulps, k in [-max_ulps, max_ulps] chosen by x
inline float ulp_jitter(float r, float x, int max_ulps) {
  if (r == 0.0f || !std::isfinite(r)) return r;
  const int k = static_cast<int>(mix(x) % static_cast<uint32_t>(2 * max_ulps + 1)) - max_ulps;
  const float toward = k > 0 ? INFINITY : -INFINITY;
  for (int i = 0; i < (k > 0 ? k : -k); ++i) r = std::nextafter(r, toward);
  return r;
}
inline float dev_exp2f(float x) { return x == 0.0f ? 1.0f : ulp_jitter(::exp2f(x), x, 2); }  // 2 ulp
inline float dev_log2f(float x) { return x == 1.0f ? 0.0f : ulp_jitter(::log2f(x), x, 1); }  // 1 ulp
// __sincosf (MUFU): absolute error up to 2^-21.41 for x in [-pi, pi] (the kernels reduce to it)
inline void dev_fast_sincosf(float a, float* s, float* c) {
  const double bound = 1.0 / 2786876.0;  // 2^-21.41
  const uint32_t h = mix(a);
  const double es = bound * (static_cast<double>(h & 0xffffu) / 32767.5 - 1.0);
  const double ec = bound * (static_cast<double>(h >> 16) / 32767.5 - 1.0);
  *s = static_cast<float>(std::sin(static_cast<double>(a)) + es);
  *c = static_cast<float>(std::cos(static_cast<double>(a)) + ec);
}
}  // namespace cuemu

inline void __sincosf(float a, float* s, float* c) { ::cuemu::dev_fast_sincosf(a, s, c); }
inline float __expf(float x) { return ::expf(x); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// After every header: the kernels' exp2f / log2f calls take the device error model above.
#define exp2f(x) ::cuemu::dev_exp2f(x)
#define log2f(x) ::cuemu::dev_log2f(x)
