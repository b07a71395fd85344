// The CUDA kernels of content_position_attention (csrc/cuda/attention_cuda.cu), compiled for the
// CPU emulator (csrc/emu/cuda_emu.h) and registered as dabdetr_cuda_emu:: CPU ops; tests only
// (tests/cuda_emu.py builds it). Also the emulator's schedule and SM-count switches.
#define DABDETR_CUDA_EMULATION 1
#include "../cuda/attention_cuda.cu"

namespace {
void set_schedule(int64_t mode, int64_t seed) { ::cuemu::set_schedule(static_cast<int>(mode), static_cast<uint64_t>(seed)); }
void set_num_sms(int64_t n) { ::cuemu::set_num_sms(static_cast<int>(n)); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(dabdetr_cuda_emu, m) {
  m.def("set_schedule", &set_schedule);
  m.def("set_num_sms", &set_num_sms);
}
