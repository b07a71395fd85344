// Argument checks of content_position_attention (host code; shared by any backend that wants them).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <array>

#include "../common/checks.h"

namespace dabdetr {

// Sizes of one content_position_attention call.
struct AttentionSizes {
  int64_t B, Nq, Nk, H, Dc, Dp, Dv;
};

inline void check_rank4(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == 4, "dabdetr.content_position_attention: '", name, "' must be 4-D ", layout,
              ", got shape ", t.sizes());
}

inline void check_dim_eq(const at::Tensor& t, int64_t dim, int64_t expected, const char* name, const char* what,
                         const char* ref_name) {
  TORCH_CHECK(t.size(dim) == expected, "dabdetr.content_position_attention: '", name, "' has ", what, " ",
              t.size(dim), " but '", ref_name, "' has ", expected, " (shape of '", name, "': ", t.sizes(), ")");
}

// Checks the forward inputs (also used by the backward) and returns the sizes.
inline AttentionSizes check_attention_args(const at::Tensor& q_content, const at::Tensor& q_pos,
                                           const at::Tensor& k_content, const at::Tensor& k_pos,
                                           const at::Tensor& value,
                                           const c10::optional<at::Tensor>& key_padding_mask) {
  check_floating(q_content, "q_content");
  check_floating(q_pos, "q_pos");
  check_floating(k_content, "k_content");
  check_floating(k_pos, "k_pos");
  check_floating(value, "value");
  check_like(q_pos, q_content, "q_pos", "q_content");
  check_like(k_content, q_content, "k_content", "q_content");
  check_like(k_pos, q_content, "k_pos", "q_content");
  check_like(value, q_content, "value", "q_content");
  check_rank4(q_content, "q_content", "[B, Nq, H, Dc]");
  check_rank4(q_pos, "q_pos", "[B, Nq, H, Dp]");
  check_rank4(k_content, "k_content", "[B, Nk, H, Dc]");
  check_rank4(k_pos, "k_pos", "[B, Nk, H, Dp]");
  check_rank4(value, "value", "[B, Nk, H, Dv]");
  AttentionSizes s{q_content.size(0), q_content.size(1), k_content.size(1), q_content.size(2),
                   q_content.size(3), q_pos.size(3),     value.size(3)};
  check_dim_eq(q_pos, 0, s.B, "q_pos", "batch size", "q_content");
  check_dim_eq(q_pos, 1, s.Nq, "q_pos", "query count", "q_content");
  check_dim_eq(q_pos, 2, s.H, "q_pos", "head count", "q_content");
  check_dim_eq(k_content, 0, s.B, "k_content", "batch size", "q_content");
  check_dim_eq(k_content, 2, s.H, "k_content", "head count", "q_content");
  check_dim_eq(k_content, 3, s.Dc, "k_content", "head dim", "q_content");
  check_dim_eq(k_pos, 0, s.B, "k_pos", "batch size", "q_content");
  check_dim_eq(k_pos, 1, s.Nk, "k_pos", "key count", "k_content");
  check_dim_eq(k_pos, 2, s.H, "k_pos", "head count", "q_content");
  check_dim_eq(k_pos, 3, s.Dp, "k_pos", "head dim", "q_pos");
  check_dim_eq(value, 0, s.B, "value", "batch size", "q_content");
  check_dim_eq(value, 1, s.Nk, "value", "key count", "k_content");
  check_dim_eq(value, 2, s.H, "value", "head count", "q_content");
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "dabdetr.content_position_attention: 'key_padding_mask' must be a bool ",
                "tensor (True = padding), got ", m.scalar_type());
    TORCH_CHECK(m.device() == q_content.device(), "dabdetr.content_position_attention: 'key_padding_mask' is on ",
                m.device(), " but 'q_content' is on ", q_content.device());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == s.B && m.size(1) == s.Nk,
                "dabdetr.content_position_attention: 'key_padding_mask' must have shape [B, Nk] = [", s.B, ", ",
                s.Nk, "], got ", m.sizes());
  }
  return s;
}

// Checks the extra arguments of the backward.
inline void check_attention_backward_args(const AttentionSizes& s, const at::Tensor& grad_out, const at::Tensor& out,
                                          const at::Tensor& logsumexp, const at::Tensor& q_content) {
  check_floating(grad_out, "grad_out");
  check_like(grad_out, q_content, "grad_out", "q_content");
  check_like(out, q_content, "out", "q_content");
  const std::array<int64_t, 4> expected_sizes{s.B, s.Nq, s.H, s.Dv};
  const c10::IntArrayRef expected(expected_sizes);
  TORCH_CHECK(grad_out.sizes().equals(expected), "dabdetr.content_position_attention_backward: 'grad_out' must have ",
              "shape [B, Nq, H, Dv] = ", expected, ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes().equals(expected), "dabdetr.content_position_attention_backward: 'out' must have ",
              "shape [B, Nq, H, Dv] = ", expected, ", got ", out.sizes());
  const auto acc = q_content.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(logsumexp.scalar_type() == acc, "dabdetr.content_position_attention_backward: 'logsumexp' must have ",
              "dtype ", acc, " for ", q_content.scalar_type(), " inputs, got ", logsumexp.scalar_type());
  TORCH_CHECK(logsumexp.device() == q_content.device(), "dabdetr.content_position_attention_backward: 'logsumexp' ",
              "is on ", logsumexp.device(), " but 'q_content' is on ", q_content.device());
  const std::array<int64_t, 3> lse_sizes{s.B, s.H, s.Nq};
  const c10::IntArrayRef lse_expected(lse_sizes);
  TORCH_CHECK(logsumexp.sizes().equals(lse_expected), "dabdetr.content_position_attention_backward: 'logsumexp' ",
              "must have shape [B, H, Nq] = ", lse_expected, ", got ", logsumexp.sizes());
}

}  // namespace dabdetr
