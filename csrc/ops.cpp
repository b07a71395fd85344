// Operator schemas of dabdetr: each fused op and its explicit backward op.
//
// Kernels are registered per dispatch key elsewhere (csrc/cpu: CPU, csrc/cuda: CUDA). Fake (meta)
// kernels, autograd formulas and autocast rules are registered once, in Python
// (dabdetr/ops/_library.py), for every backend.
//
// `float[] temperature` is one temperature per input coordinate, in input coordinate order.
#include <Python.h>
#include <torch/library.h>

// `import dabdetr._C` loads this library (which runs the registrations below). It has no Python API.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(dabdetr, m) {
  m.def(
      "sine_embed(Tensor coords, int num_feats, float[] temperature, float scale, bool exchange_xy)"
      " -> Tensor");
  m.def(
      "sine_embed_backward(Tensor grad_out, Tensor coords, int num_feats, float[] temperature,"
      " float scale, bool exchange_xy) -> Tensor");
  // Returns [..., 2F]; temperature = (T_x, T_y).
  m.def(
      "modulated_sine_query(Tensor anchors, Tensor? ref_wh, Tensor? pos_scale, int num_feats,"
      " float[] temperature, float scale) -> Tensor");
  // Returns (grad_anchors, grad_ref_wh, grad_pos_scale); a gradient of an absent optional input is
  // an empty tensor of shape [0].
  m.def(
      "modulated_sine_query_backward(Tensor grad_out, Tensor anchors, Tensor? ref_wh,"
      " Tensor? pos_scale, int num_feats, float[] temperature, float scale)"
      " -> (Tensor, Tensor, Tensor)");
  // Returns (out [B, Nq, H, Dv] contiguous, logsumexp [B, H, Nq] in the accumulation dtype:
  // float64 for float64 inputs, else float32; -inf for rows whose keys are all padding).
  m.def(
      "content_position_attention(Tensor q_content, Tensor q_pos, Tensor k_content, Tensor k_pos,"
      " Tensor value, Tensor? key_padding_mask, float scale) -> (Tensor, Tensor)");
  // Returns (grad_q_content, grad_q_pos, grad_k_content, grad_k_pos, grad_value), contiguous.
  m.def(
      "content_position_attention_backward(Tensor grad_out, Tensor q_content, Tensor q_pos,"
      " Tensor k_content, Tensor k_pos, Tensor value, Tensor? key_padding_mask, Tensor out,"
      " Tensor logsumexp, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
