// CPU kernels of sine_embed and modulated_sine_query, forward and backward.
//
// One row = the last dim of the input ([C] coordinates or one [4] anchor); rows are split across
// threads (at::parallel_for, OpenMP). Each row computes its sin/cos pairs in the accumulation type
// (float32 for float32/float16/bfloat16, float64 for float64) into a small per-thread buffer and
// writes them interleaved. Inputs may be strided views in their leading dims (RowIndexer); outputs
// and gradients are contiguous.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/sine_common.h"
#include "acc_type.h"
#include "sincos.h"

namespace dabdetr {
namespace cpu {
namespace {

// Row grain of the parallel loops: each row costs ~num_feats sincos evaluations.
int64_t grain_for(int64_t work_per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_row)); }

// out[2j] = s[j] * p[2j] * r, out[2j + 1] = c[j] * p[2j + 1] * r (p == nullptr: no p). float32 takes
// the vectorized overload of sincos.cpp.
template <typename scalar_t, typename acc_t>
inline void write_block(const acc_t* s, const acc_t* c, const scalar_t* p, acc_t r, int64_t half, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    interleave_scaled(s, c, p, r, half, out);
  } else if (p != nullptr) {
    for (int64_t j = 0; j < half; ++j) {
      out[2 * j] = static_cast<scalar_t>(s[j] * static_cast<acc_t>(p[2 * j]) * r);
      out[2 * j + 1] = static_cast<scalar_t>(c[j] * static_cast<acc_t>(p[2 * j + 1]) * r);
    }
  } else {
    for (int64_t j = 0; j < half; ++j) {
      out[2 * j] = static_cast<scalar_t>(s[j] * r);
      out[2 * j + 1] = static_cast<scalar_t>(c[j] * r);
    }
  }
}

// Backward of one block of out = E(v) * p * r (see sincos.h, block_backward).
template <typename scalar_t, typename acc_t>
inline void backward_block(const scalar_t* g, const scalar_t* p, const acc_t* s, const acc_t* c, const acc_t* w,
                           acc_t r, int64_t half, scalar_t* gp, acc_t& dr_out, acc_t& dv_out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    block_backward(g, p, s, c, w, r, half, gp, dr_out, dv_out);
  } else {
    acc_t dr = 0, dv = 0;
    for (int64_t j = 0; j < half; ++j) {
      const acc_t g0 = static_cast<acc_t>(g[2 * j]), g1 = static_cast<acc_t>(g[2 * j + 1]);
      const acc_t p0 = p != nullptr ? static_cast<acc_t>(p[2 * j]) : acc_t(1);
      const acc_t p1 = p != nullptr ? static_cast<acc_t>(p[2 * j + 1]) : acc_t(1);
      if (p != nullptr) {
        gp[2 * j] = static_cast<scalar_t>(g0 * s[j] * r);
        gp[2 * j + 1] = static_cast<scalar_t>(g1 * c[j] * r);
      }
      const acc_t e0 = g0 * p0, e1 = g1 * p1;
      dr += e0 * s[j] + e1 * c[j];
      dv += w[j] * (e0 * c[j] - e1 * s[j]);
    }
    dr_out = dr;
    dv_out = dv;
  }
}

// Writes the embedding of one coordinate value into out[0 : 2 * half] (sin, cos interleaved).
template <typename scalar_t, typename acc_t>
inline void embed_block(acc_t v, const acc_t* w, int64_t half, acc_t* s, acc_t* c, scalar_t* out) {
  sincos_scaled(v, w, half, s, c);
  write_block<scalar_t, acc_t>(s, c, nullptr, acc_t(1), half, out);
}

at::Tensor sine_embed_cpu(const at::Tensor& coords, int64_t num_feats, c10::ArrayRef<double> temperature,
                          double scale, bool exchange_xy) {
  check_sine_embed_args(coords, num_feats, temperature, exchange_xy, "sine_embed");
  const int64_t C = coords.size(-1);
  RowIndexer idx;
  const at::Tensor in = make_row_indexer(coords, idx);
  std::vector<int64_t> out_sizes(coords.sizes().begin(), coords.sizes().end());
  out_sizes.back() = C * num_feats;
  at::Tensor out = at::empty(out_sizes, coords.options());
  const int64_t rows = coords.numel() / std::max<int64_t>(C, 1);
  if (out.numel() == 0) return out;
  const int64_t half = num_feats / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coords.scalar_type(), "dabdetr_sine_embed_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const std::vector<acc_t> w = inverse_frequencies<acc_t>(num_feats, temperature);
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t in_stride = in.stride(-1);
    at::parallel_for(0, rows, grain_for(C * num_feats), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(2 * half);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* x = src + idx.offset(r);
        scalar_t* o = dst + r * C * num_feats;
        for (int64_t i = 0; i < C; ++i) {
          // Output slot i holds input coordinate src_i (first two swapped when exchange_xy).
          const int64_t src_i = (exchange_xy && i < 2) ? 1 - i : i;
          const acc_t v = static_cast<acc_t>(x[src_i * in_stride]) * static_cast<acc_t>(scale);
          embed_block<scalar_t, acc_t>(v, w.data() + src_i * half, half, buf.data(), buf.data() + half,
                                       o + i * num_feats);
        }
      }
    });
  });
  return out;
}

at::Tensor sine_embed_backward_cpu(const at::Tensor& grad_out, const at::Tensor& coords, int64_t num_feats,
                                   c10::ArrayRef<double> temperature, double scale, bool exchange_xy) {
  check_sine_embed_args(coords, num_feats, temperature, exchange_xy, "sine_embed_backward");
  const int64_t C = coords.size(-1);
  check_grad_out(grad_out, coords, "coords", C * num_feats);
  RowIndexer idx, gidx;
  const at::Tensor in = make_row_indexer(coords, idx);
  const at::Tensor g = make_row_indexer(grad_out, gidx);
  at::Tensor grad = at::empty(coords.sizes(), coords.options());
  if (grad.numel() == 0) return grad;
  const int64_t rows = coords.numel() / C;
  const int64_t half = num_feats / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coords.scalar_type(), "dabdetr_sine_embed_bwd_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const std::vector<acc_t> w = inverse_frequencies<acc_t>(num_feats, temperature);
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    const scalar_t* gsrc = g.const_data_ptr<scalar_t>();
    scalar_t* dst = grad.mutable_data_ptr<scalar_t>();
    const int64_t in_stride = in.stride(-1);
    at::parallel_for(0, rows, grain_for(C * num_feats), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(2 * half);
      acc_t* gs = buf.data();
      acc_t* gc = buf.data() + half;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* x = src + idx.offset(r);
        const scalar_t* go = gsrc + gidx.offset(r);
        scalar_t* d = dst + r * C;
        for (int64_t i = 0; i < C; ++i) {
          const int64_t src_i = (exchange_xy && i < 2) ? 1 - i : i;
          const acc_t v = static_cast<acc_t>(x[src_i * in_stride]) * static_cast<acc_t>(scale);
          const scalar_t* gi = go + i * num_feats;
          for (int64_t j = 0; j < half; ++j) {
            gs[j] = static_cast<acc_t>(gi[2 * j]);
            gc[j] = static_cast<acc_t>(gi[2 * j + 1]);
          }
          d[src_i] = static_cast<scalar_t>(sincos_grad_dot(v, w.data() + src_i * half, half, gs, gc) *
                                           static_cast<acc_t>(scale));
        }
      }
    });
  });
  return grad;
}

at::Tensor modulated_sine_query_cpu(const at::Tensor& anchors, const c10::optional<at::Tensor>& ref_wh,
                                    const c10::optional<at::Tensor>& pos_scale, int64_t num_feats,
                                    c10::ArrayRef<double> temperature, double scale) {
  check_modulated_args(anchors, ref_wh, pos_scale, num_feats, temperature);
  RowIndexer aidx, ridx, pidx;
  const at::Tensor a = make_row_indexer(anchors, aidx);
  const bool has_ref = ref_wh.has_value();
  const bool has_ps = pos_scale.has_value();
  const at::Tensor rw = has_ref ? make_row_indexer(*ref_wh, ridx) : at::Tensor();
  const at::Tensor ps = has_ps ? make_row_indexer(*pos_scale, pidx) : at::Tensor();
  std::vector<int64_t> out_sizes(anchors.sizes().begin(), anchors.sizes().end());
  out_sizes.back() = 2 * num_feats;
  at::Tensor out = at::empty(out_sizes, anchors.options());
  if (out.numel() == 0) return out;
  const int64_t rows = anchors.numel() / 4;
  const int64_t F = num_feats;
  const int64_t half = F / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anchors.scalar_type(), "dabdetr_msq_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const std::vector<acc_t> w = inverse_frequencies<acc_t>(num_feats, temperature);  // [x | y]
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* rp = has_ref ? rw.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pp = has_ps ? ps.const_data_ptr<scalar_t>() : nullptr;
    const int64_t as = a.stride(-1);
    const int64_t rs = has_ref ? rw.stride(-1) : 0;
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(2 * F), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(2 * half);
      acc_t* s = buf.data();
      acc_t* c = buf.data() + half;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* an = ap + aidx.offset(r);
        const acc_t sc = static_cast<acc_t>(scale);
        // Block 0: y (ratio h_ref / h, temperature T_y); block 1: x (ratio w_ref / w, T_x).
        acc_t ratio[2] = {acc_t(1), acc_t(1)};
        if (has_ref) {
          const scalar_t* rr = rp + ridx.offset(r);
          ratio[0] = static_cast<acc_t>(rr[rs]) / static_cast<acc_t>(an[3 * as]);
          ratio[1] = static_cast<acc_t>(rr[0]) / static_cast<acc_t>(an[2 * as]);
        }
        const scalar_t* prow = has_ps ? pp + pidx.offset(r) : nullptr;
        scalar_t* o = dst + r * 2 * F;
        for (int blk = 0; blk < 2; ++blk) {
          const int coord = 1 - blk;  // y first, then x
          const acc_t v = static_cast<acc_t>(an[coord * as]) * sc;
          sincos_scaled(v, w.data() + coord * half, half, s, c);
          scalar_t* ob = o + blk * F;
          const acc_t rt = ratio[blk];
          write_block<scalar_t, acc_t>(s, c, prow != nullptr ? prow + blk * F : nullptr, rt, half, ob);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_sine_query_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& anchors, const c10::optional<at::Tensor>& ref_wh,
    const c10::optional<at::Tensor>& pos_scale, int64_t num_feats, c10::ArrayRef<double> temperature,
    double scale) {
  check_modulated_args(anchors, ref_wh, pos_scale, num_feats, temperature);
  check_grad_out(grad_out, anchors, "anchors", 2 * num_feats);
  RowIndexer aidx, ridx, pidx, gidx;
  const at::Tensor a = make_row_indexer(anchors, aidx);
  const at::Tensor g = make_row_indexer(grad_out, gidx);
  const bool has_ref = ref_wh.has_value();
  const bool has_ps = pos_scale.has_value();
  const at::Tensor rw = has_ref ? make_row_indexer(*ref_wh, ridx) : at::Tensor();
  const at::Tensor ps = has_ps ? make_row_indexer(*pos_scale, pidx) : at::Tensor();
  at::Tensor g_anchors = at::empty(anchors.sizes(), anchors.options());
  at::Tensor g_ref = has_ref ? at::empty(ref_wh->sizes(), anchors.options()) : at::empty({0}, anchors.options());
  at::Tensor g_ps = has_ps ? at::empty(pos_scale->sizes(), anchors.options()) : at::empty({0}, anchors.options());
  const int64_t rows = anchors.numel() / 4;
  if (rows == 0) return {g_anchors, g_ref, g_ps};
  const int64_t F = num_feats;
  const int64_t half = F / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anchors.scalar_type(), "dabdetr_msq_bwd_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const std::vector<acc_t> w = inverse_frequencies<acc_t>(num_feats, temperature);
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* rp = has_ref ? rw.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pp = has_ps ? ps.const_data_ptr<scalar_t>() : nullptr;
    const int64_t as = a.stride(-1);
    const int64_t rs = has_ref ? rw.stride(-1) : 0;
    scalar_t* ga = g_anchors.mutable_data_ptr<scalar_t>();
    scalar_t* gr = has_ref ? g_ref.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gps = has_ps ? g_ps.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, grain_for(4 * F), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(2 * half);
      acc_t* s = buf.data();
      acc_t* c = s + half;
      const acc_t sc = static_cast<acc_t>(scale);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* an = ap + aidx.offset(r);
        const scalar_t* go = gp + gidx.offset(r);
        const scalar_t* prow = has_ps ? pp + pidx.offset(r) : nullptr;
        acc_t wh[2] = {static_cast<acc_t>(an[2 * as]), static_cast<acc_t>(an[3 * as])};
        acc_t ref[2] = {acc_t(1), acc_t(1)};  // (w_ref, h_ref)
        if (has_ref) {
          const scalar_t* rr = rp + ridx.offset(r);
          ref[0] = static_cast<acc_t>(rr[0]);
          ref[1] = static_cast<acc_t>(rr[rs]);
        }
        acc_t g_coord[2] = {acc_t(0), acc_t(0)};  // (x, y)
        acc_t g_ratio[2] = {acc_t(0), acc_t(0)};  // (x, y)
        for (int blk = 0; blk < 2; ++blk) {
          const int coord = 1 - blk;  // block 0 = y, block 1 = x
          const acc_t rt = has_ref ? ref[coord] / wh[coord] : acc_t(1);
          const acc_t v = static_cast<acc_t>(an[coord * as]) * sc;
          sincos_scaled(v, w.data() + coord * half, half, s, c);
          const scalar_t* gb = go + blk * F;
          // d out / d v of pair j: (cos, -sin) * w[j]; sin/cos are reused from the forward formula.
          const acc_t* wj = w.data() + coord * half;
          acc_t dr = 0, dv = 0;
          backward_block<scalar_t, acc_t>(gb, prow != nullptr ? prow + blk * F : nullptr, s, c, wj, rt, half,
                                          prow != nullptr ? gps + r * 2 * F + blk * F : nullptr, dr, dv);
          g_ratio[coord] = dr;
          g_coord[coord] = dv * rt * sc;
        }
        scalar_t* gar = ga + r * 4;
        gar[0] = static_cast<scalar_t>(g_coord[0]);
        gar[1] = static_cast<scalar_t>(g_coord[1]);
        if (has_ref) {
          // ratio = ref / size: d ratio / d ref = 1 / size, d ratio / d size = -ref / size^2.
          gar[2] = static_cast<scalar_t>(-g_ratio[0] * ref[0] / (wh[0] * wh[0]));
          gar[3] = static_cast<scalar_t>(-g_ratio[1] * ref[1] / (wh[1] * wh[1]));
          gr[r * 2] = static_cast<scalar_t>(g_ratio[0] / wh[0]);
          gr[r * 2 + 1] = static_cast<scalar_t>(g_ratio[1] / wh[1]);
        } else {
          gar[2] = scalar_t(0);
          gar[3] = scalar_t(0);
        }
      }
    });
  });
  return {g_anchors, g_ref, g_ps};
}

}  // namespace

TORCH_LIBRARY_IMPL(dabdetr, CPU, m) {
  m.impl("sine_embed", &sine_embed_cpu);
  m.impl("sine_embed_backward", &sine_embed_backward_cpu);
  m.impl("modulated_sine_query", &modulated_sine_query_cpu);
  m.impl("modulated_sine_query_backward", &modulated_sine_query_backward_cpu);
}

}  // namespace cpu
}  // namespace dabdetr
