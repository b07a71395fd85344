// Host-side helpers shared by the sine-embedding kernels of every backend.
#pragma once

#include <cmath>
#include <vector>

#include <c10/util/ArrayRef.h>

namespace dabdetr {

// Inverse frequencies of the original code's dim_t = T ** (2 * floor(i / 2) / F), one per (sin, cos)
// pair: w[c * (F / 2) + j] = T_c ** (-2 j / F), computed in float64. The angle of pair j of
// coordinate c is v_c * w[c][j], with v_c = coords[c] * scale.
template <typename acc_t>
std::vector<acc_t> inverse_frequencies(int64_t num_feats, c10::ArrayRef<double> temperature) {
  const int64_t half = num_feats / 2;
  std::vector<acc_t> w(temperature.size() * half);
  for (size_t c = 0; c < temperature.size(); ++c) {
    for (int64_t j = 0; j < half; ++j) {
      w[c * half + j] = static_cast<acc_t>(std::pow(temperature[c], -2.0 * static_cast<double>(j) / num_feats));
    }
  }
  return w;
}

}  // namespace dabdetr
