// Accumulation type of the CPU kernels: float32 for float32/float16/bfloat16 inputs, float64 for
// float64 inputs.
#pragma once

namespace dabdetr {
namespace cpu {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

}  // namespace cpu
}  // namespace dabdetr
