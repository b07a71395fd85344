"""Registration of the Triton kernels as PyTorch operators in the ``dabdetr`` namespace.

Ops (each forward op has an explicit backward op, like the C++ schemas in csrc/ops.cpp, with the
same arguments and results; only the names differ, since the CUDA dispatch key of the C++ names
belongs to the CUDA C++ kernels):

    dabdetr::sine_embed_triton, dabdetr::sine_embed_backward_triton
    dabdetr::modulated_sine_query_triton, dabdetr::modulated_sine_query_backward_triton
    dabdetr::content_position_attention_triton -> (out, logsumexp),
    dabdetr::content_position_attention_backward_triton

Path (``_common.USE_TRITON_OP``):
  * GPU (no ``TRITON_INTERPRET``): ``torch.library.triton_op``. The op body (tensor code +
    ``wrap_triton`` launches) doubles as its fake kernel, and torch.compile/Inductor traces into the
    kernels (no graph break, no opaque call).
  * Interpreter (``TRITON_INTERPRET=1``, CI): ``torch.library.custom_op`` with the fake kernels of
    ``dabdetr.ops._library`` (triton_op's higher-order op cannot wrap interpreted kernels, so opcheck
    and torch.compile fail there, while the custom_op wrapper passes both).

Both paths then get the same autograd formula (``setup_context`` shared with the C++ ops in
``_library``; the backward calls the Triton backward op) and the same autocast rule as the C++ ops
(floating inputs cast to the autocast dtype), and the public ``dabdetr.ops`` functions reach them
through ``_dispatch.register_python_backend("triton", ...)``.
"""

import torch

from dabdetr.ops import _dispatch, _library

from . import attention, sine
from ._common import USE_TRITON_OP, check_dtype

NS = "dabdetr"

# op name -> (body, fake used on the custom_op path)
_OPS = {
    "sine_embed_triton": (sine.sine_embed_fwd, _library._fake_sine_embed),
    "sine_embed_backward_triton": (sine.sine_embed_bwd, _library._fake_sine_embed_backward),
    "modulated_sine_query_triton": (sine.msq_fwd, _library._fake_msq),
    "modulated_sine_query_backward_triton": (sine.msq_bwd, _library._fake_msq_backward),
    "content_position_attention_triton": (attention.attention_fwd, _library._fake_cpa),
    "content_position_attention_backward_triton": (attention.attention_bwd, _library._fake_cpa_backward),
}
FORWARD_OPS = ("sine_embed_triton", "modulated_sine_query_triton", "content_position_attention_triton")
OPS = tuple(_OPS)
REGISTRATION = "triton_op" if USE_TRITON_OP else "custom_op"


def _define(name: str):
    fn, fake = _OPS[name]
    qualname = f"{NS}::{name}"
    if USE_TRITON_OP:
        return torch.library.triton_op(qualname, fn, mutates_args=())
    op = torch.library.custom_op(qualname, fn, mutates_args=())
    op.register_fake(fake)
    return op


# ---------------------------------------------------------------------------------------------
# autograd: the setup_context functions and backward formulas of the C++ ops (same inputs, same
# saved tensors), the backward calling the Triton backward ops (same results as the C++ ones).


_AUTOGRAD = {
    "sine_embed_triton": (_library.backward_sine_embed("sine_embed_backward_triton"), _library._setup_sine_embed),
    "modulated_sine_query_triton": (
        _library.backward_msq("modulated_sine_query_backward_triton"),
        _library._setup_msq,
    ),
    "content_position_attention_triton": (
        _library.backward_cpa("content_position_attention_backward_triton"),
        _library._setup_cpa,
    ),
}

# ---------------------------------------------------------------------------------------------
# what the public functions call (same positional arguments as the C++ ops)


def sine_embed(coords, num_feats, temperature, scale, exchange_xy):
    check_dtype("sine_embed", coords)
    return torch.ops.dabdetr.sine_embed_triton(coords, num_feats, temperature, scale, exchange_xy)


def modulated_sine_query(anchors, ref_wh, pos_scale, num_feats, temperature, scale):
    check_dtype("modulated_sine_query", anchors)
    return torch.ops.dabdetr.modulated_sine_query_triton(anchors, ref_wh, pos_scale, num_feats, temperature, scale)


def content_position_attention(q_content, q_pos, k_content, k_pos, value, key_padding_mask, scale):
    """Returns ``(out, logsumexp)`` like ``torch.ops.dabdetr.content_position_attention``."""
    check_dtype("content_position_attention", q_content)
    return torch.ops.dabdetr.content_position_attention_triton(
        q_content, q_pos, k_content, k_pos, value, key_padding_mask, scale
    )


_LIB = None
CUSTOM_OPS = {}


def register() -> None:
    """Defines the ops, their autograd and autocast rules, and registers the backend (once)."""
    global _LIB
    if _LIB is not None:
        return
    for name in _OPS:
        CUSTOM_OPS[name] = _define(name)
    for name, (backward, setup) in _AUTOGRAD.items():
        CUSTOM_OPS[name].register_autograd(backward, setup_context=setup)
    _LIB = torch.library.Library(NS, "IMPL")
    for device_type in ("cpu", "cuda"):
        for name in FORWARD_OPS:
            _library._register_autocast(_LIB, name, device_type)
    _dispatch.register_python_backend("triton", "sine_embed", sine_embed)
    _dispatch.register_python_backend("triton", "modulated_sine_query", modulated_sine_query)
    _dispatch.register_python_backend("triton", "content_position_attention", content_position_attention)
