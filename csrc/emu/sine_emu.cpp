// The CUDA kernels of sine_embed and modulated_sine_query (csrc/cuda/sine_cuda.cu), compiled for the
// CPU emulator (csrc/emu/cuda_emu.h) and registered as dabdetr_cuda_emu:: CPU ops; tests only.
#define DABDETR_CUDA_EMULATION 1
#include "../cuda/sine_cuda.cu"
