"""Python-side registrations of the C++ operators (schemas in csrc/ops.cpp).

Done once at import, only when the extension loaded: a fake (meta) kernel for every op (shape
propagation for torch.compile / FakeTensor), an autograd formula for every forward op (the same
for all dispatch keys: the backward op runs on whatever backend serves the tensors), and an
autocast rule that casts floating inputs to the autocast dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext

_NS = "dabdetr"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_grad(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# ---------------------------------------------------------------------------------------------
# fake kernels


def _fake_sine_embed(coords, num_feats, temperature, scale, exchange_xy):
    return coords.new_empty((*coords.shape[:-1], coords.shape[-1] * num_feats))


def _fake_sine_embed_backward(grad_out, coords, num_feats, temperature, scale, exchange_xy):
    return coords.new_empty(coords.shape)


def _fake_msq(anchors, ref_wh, pos_scale, num_feats, temperature, scale):
    return anchors.new_empty((*anchors.shape[:-1], 2 * num_feats))


def _fake_msq_backward(grad_out, anchors, ref_wh, pos_scale, num_feats, temperature, scale):
    return (
        anchors.new_empty(anchors.shape),
        anchors.new_empty(ref_wh.shape) if ref_wh is not None else _empty_grad(anchors),
        anchors.new_empty(pos_scale.shape) if pos_scale is not None else _empty_grad(anchors),
    )


def _fake_cpa(q_content, q_pos, k_content, k_pos, value, key_padding_mask, scale):
    B, Nq, H, _ = q_content.shape
    out = value.new_empty((B, Nq, H, value.shape[-1]))
    lse = q_content.new_empty((B, H, Nq), dtype=_acc_dtype(q_content.dtype))
    return out, lse


def _fake_cpa_backward(grad_out, q_content, q_pos, k_content, k_pos, value, key_padding_mask, out, lse, scale):
    return tuple(t.new_empty(t.shape) for t in (q_content, q_pos, k_content, k_pos, value))


# ---------------------------------------------------------------------------------------------
# autograd


def _setup_sine_embed(ctx, inputs, output):
    coords, num_feats, temperature, scale, exchange_xy = inputs
    ctx.save_for_backward(coords)
    ctx.args = (num_feats, temperature, scale, exchange_xy)


def backward_sine_embed(backward_op: str):
    """The autograd backward of a sine_embed op whose backward op is ``dabdetr::<backward_op>``
    (one formula for every backend: the C++ ops and the Triton ops share it)."""

    def backward(ctx, grad):
        (coords,) = ctx.saved_tensors
        g = getattr(torch.ops.dabdetr, backward_op)(grad, coords, *ctx.args)
        return g, None, None, None, None

    return backward


def _setup_msq(ctx, inputs, output):
    anchors, ref_wh, pos_scale, num_feats, temperature, scale = inputs
    ctx.save_for_backward(anchors, ref_wh, pos_scale)
    ctx.args = (num_feats, temperature, scale)


def backward_msq(backward_op: str):
    """The autograd backward of a modulated_sine_query op (see :func:`backward_sine_embed`)."""

    def backward(ctx, grad):
        anchors, ref_wh, pos_scale = ctx.saved_tensors
        ga, gr, gp = getattr(torch.ops.dabdetr, backward_op)(grad, anchors, ref_wh, pos_scale, *ctx.args)
        return (
            ga if ctx.needs_input_grad[0] else None,
            gr if ref_wh is not None and ctx.needs_input_grad[1] else None,
            gp if pos_scale is not None and ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
        )

    return backward


def _setup_cpa(ctx, inputs, output):
    q_content, q_pos, k_content, k_pos, value, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q_content, q_pos, k_content, k_pos, value, key_padding_mask, out, lse)
    ctx.scale = scale


def backward_cpa(backward_op: str):
    """The autograd backward of a content_position_attention op (see :func:`backward_sine_embed`).
    The logsumexp output is an auxiliary result for the backward; it is not differentiable (the
    public function does not return it)."""

    def backward(ctx, grad_out, grad_lse):
        q_content, q_pos, k_content, k_pos, value, mask, out, lse = ctx.saved_tensors
        grads = getattr(torch.ops.dabdetr, backward_op)(
            grad_out, q_content, q_pos, k_content, k_pos, value, mask, out, lse, ctx.scale
        )
        grads = tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5]))
        return (*grads, None, None)

    return backward


# ---------------------------------------------------------------------------------------------
# autocast


def _register_autocast(lib: torch.library.Library, op_name: str, device_type: str) -> None:
    """Under autocast, run ``op_name`` with its floating inputs cast to the autocast dtype."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    op = getattr(torch.ops.dabdetr, op_name).default

    def cast(x, dtype):
        if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != dtype:
            return x.to(dtype)
        return x

    def kernel(keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(cast(a, dtype) for a in args))

    lib.impl(op_name, kernel, key_name, with_keyset=True)


_LIB = None


def register() -> bool:
    """Registers fake kernels, autograd and autocast for the C++ ops (idempotent)."""
    global _LIB
    if _LIB is not None or not _ext.LOADED:
        return _LIB is not None
    fakes = {
        "sine_embed": _fake_sine_embed,
        "sine_embed_backward": _fake_sine_embed_backward,
        "modulated_sine_query": _fake_msq,
        "modulated_sine_query_backward": _fake_msq_backward,
        "content_position_attention": _fake_cpa,
        "content_position_attention_backward": _fake_cpa_backward,
    }
    for name, fn in fakes.items():
        torch.library.register_fake(f"{_NS}::{name}", fn)
    torch.library.register_autograd(
        f"{_NS}::sine_embed", backward_sine_embed("sine_embed_backward"), setup_context=_setup_sine_embed
    )
    torch.library.register_autograd(
        f"{_NS}::modulated_sine_query", backward_msq("modulated_sine_query_backward"), setup_context=_setup_msq
    )
    torch.library.register_autograd(
        f"{_NS}::content_position_attention",
        backward_cpa("content_position_attention_backward"),
        setup_context=_setup_cpa,
    )
    _LIB = torch.library.Library(_NS, "IMPL")
    for device_type in ("cpu", "cuda"):
        for name in _ext.FORWARD_OPS:
            _register_autocast(_LIB, name, device_type)
    return True


register()
