// Argument checks shared by the CPU and CUDA kernels (host code only). The public Python functions
// check first, with friendlier messages; these guard direct calls of torch.ops.dabdetr.*.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/util/ArrayRef.h>

namespace dabdetr {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "dabdetr: '", name, "' is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "dabdetr: '", name,
              "' must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "dabdetr: '", name, "' has dtype ", t.scalar_type(),
              " but '", ref_name, "' has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "dabdetr: '", name, "' is on ", t.device(), " but '", ref_name,
              "' is on ", ref.device());
}

inline void check_last_dim(const at::Tensor& t, int64_t size, const char* name) {
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == size, "dabdetr: '", name, "' must have last dimension ", size,
              ", got shape ", t.sizes());
}

inline void check_same_leading(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.dim() == ref.dim() && t.sizes().slice(0, t.dim() - 1).equals(ref.sizes().slice(0, ref.dim() - 1)),
              "dabdetr: '", name, "' must have the leading shape of '", ref_name, "' ",
              ref.sizes().slice(0, ref.dim() - 1), ", got shape ", t.sizes());
}

inline void check_sine_args(int64_t num_feats, c10::ArrayRef<double> temperature, int64_t n_coords) {
  TORCH_CHECK(num_feats > 0 && num_feats % 2 == 0, "dabdetr: 'num_feats' must be a positive even number, got ",
              num_feats);
  TORCH_CHECK(static_cast<int64_t>(temperature.size()) == n_coords, "dabdetr: 'temperature' must have ", n_coords,
              " values (one per coordinate), got ", temperature.size());
  for (double t : temperature) {
    TORCH_CHECK(t > 0, "dabdetr: 'temperature' values must be positive, got ", t);
  }
}

// sine_embed's arguments: coords [..., C] with C >= 2 when exchange_xy (else C >= 1).
inline void check_sine_embed_args(const at::Tensor& coords, int64_t num_feats, c10::ArrayRef<double> temperature,
                                  bool exchange_xy, const char* op) {
  check_floating(coords, "coords");
  TORCH_CHECK(coords.dim() >= 1, "dabdetr.", op, ": 'coords' must have at least 1 dimension");
  const int64_t C = coords.size(-1);
  TORCH_CHECK(C >= (exchange_xy ? 2 : 1), "dabdetr.", op, ": 'coords' must have at least ", (exchange_xy ? 2 : 1),
              " coordinates in its last dimension, got ", C);
  check_sine_args(num_feats, temperature, C);
}

// A backward op's 'grad_out': the dtype and device of `ref`, its leading shape, last dim `last`.
inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& ref, const char* ref_name, int64_t last) {
  check_like(grad_out, ref, "grad_out", ref_name);
  check_last_dim(grad_out, last, "grad_out");
  check_same_leading(grad_out, ref, "grad_out", ref_name);
}

// modulated_sine_query's arguments: anchors [..., 4]; ref_wh [..., 2] and pos_scale [..., 2F] (both
// optional) with the leading shape, dtype and device of anchors.
inline void check_modulated_args(const at::Tensor& anchors, const c10::optional<at::Tensor>& ref_wh,
                                 const c10::optional<at::Tensor>& pos_scale, int64_t num_feats,
                                 c10::ArrayRef<double> temperature) {
  check_floating(anchors, "anchors");
  check_last_dim(anchors, 4, "anchors");
  check_sine_args(num_feats, temperature, 2);
  if (ref_wh.has_value()) {
    check_like(*ref_wh, anchors, "ref_wh", "anchors");
    check_last_dim(*ref_wh, 2, "ref_wh");
    check_same_leading(*ref_wh, anchors, "ref_wh", "anchors");
  }
  if (pos_scale.has_value()) {
    check_like(*pos_scale, anchors, "pos_scale", "anchors");
    check_last_dim(*pos_scale, 2 * num_feats, "pos_scale");
    check_same_leading(*pos_scale, anchors, "pos_scale", "anchors");
  }
}

// Up to this many leading dims are indexed with strides; more are reshaped.
constexpr int kMaxRowDims = 6;

// Maps a flat row index over the leading dims of a [..., C] tensor to an element offset, so that
// views such as x.transpose(0, 1) of a sequence-first [N, B, C] tensor are read without a copy.
struct RowIndexer {
  int ndim = 0;
  int64_t sizes[kMaxRowDims];
  int64_t strides[kMaxRowDims];
  int64_t offset(int64_t row) const {
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t i = row % sizes[d];
      row /= sizes[d];
      off += i * strides[d];
    }
    return off;
  }
};

// Returns a tensor equal to `t` whose last dim is contiguous (a copy only when it is not), and fills
// `idx` with its leading dims, merged where they are contiguous with each other (a contiguous tensor
// has a single leading dim); more than kMaxRowDims unmergeable dims also cost a copy.
inline at::Tensor make_row_indexer(const at::Tensor& t, RowIndexer& idx) {
  at::Tensor u = t;
  if (u.dim() == 0 || (u.size(-1) != 1 && u.stride(-1) != 1)) {
    u = u.contiguous();
  }
  for (int attempt = 0; attempt < 2; ++attempt) {
    int64_t sizes[64];
    int64_t strides[64];
    int n = 0;
    for (int64_t d = 0; d + 1 < u.dim(); ++d) {
      if (u.size(d) == 1) continue;  // size-1 dims never move the offset
      if (n > 0 && strides[n - 1] == u.stride(d) * u.size(d)) {
        sizes[n - 1] *= u.size(d);  // merge with the previous dim
        strides[n - 1] = u.stride(d);
      } else {
        sizes[n] = u.size(d);
        strides[n] = u.stride(d);
        ++n;
      }
      if (n > kMaxRowDims) break;
    }
    if (n <= kMaxRowDims) {
      idx.ndim = n;
      for (int d = 0; d < n; ++d) {
        idx.sizes[d] = sizes[d];
        idx.strides[d] = strides[d];
      }
      return u;
    }
    u = u.contiguous();
  }
  TORCH_CHECK(false, "dabdetr: internal error: could not index the rows of a tensor of shape ", t.sizes());
}

}  // namespace dabdetr
