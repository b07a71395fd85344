"""``content_position_attention``: the decoupled content + position cross-attention of
Conditional-DETR / DAB-DETR, without materialising the per-head concatenation."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _amp, _checks, _dispatch, reference

_OP = "dabdetr.ops.content_position_attention"

# Largest head dims the fused GPU kernels take (the C++ CPU kernel takes any).
MAX_GPU_HEAD_DIM = 64


def _unsupported(device: torch.device, dims, dropout_p: float, need_weights: bool) -> Optional[str]:
    if need_weights:
        return "need_weights=True is served by the reference path (the weights are for pictures)"
    if dropout_p > 0.0:
        return f"dropout_p={dropout_p} > 0 is not supported by the fused kernels (DAB-DETR uses 0.0)"
    if device.type == "cuda" and max(dims) > MAX_GPU_HEAD_DIM:
        return f"head dims {dims} exceed {MAX_GPU_HEAD_DIM}, the largest the fused GPU kernels support"
    return None


def content_position_attention(
    q_content: Tensor,
    q_pos: Tensor,
    k_content: Tensor,
    k_pos: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    *,
    backend: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per head, ``softmax(scale * (q_c·k_cᵀ + q_p·k_pᵀ)) @ v``.

    This is attention over the per-head concatenation ``[content | position]`` of queries and keys
    (DAB-DETR's cross-attention, REFERENCE §4), computed from the two halves directly.

    Args:
        q_content: ``[B, Nq, H, Dc]``; q_pos: ``[B, Nq, H, Dp]``.
        k_content: ``[B, Nk, H, Dc]``; k_pos: ``[B, Nk, H, Dp]``; value: ``[B, Nk, H, Dv]``.
            Any strides in the first three dims (e.g. ``x.view(N, B, H, d).transpose(0, 1)`` of a
            sequence-first tensor, read without a copy by the fused kernels).
        key_padding_mask: ``[B, Nk]`` bool, True = padding (ignored key), DETR's convention.
        scale: logit scale, default ``(Dc + Dp) ** -0.5`` (DAB-DETR: 1/8).
        dropout_p: dropout on the attention probabilities (reference path only).
        need_weights: also return the head-averaged probabilities ``[B, Nq, Nk]`` (reference path).
        backend: ``None`` (``DABDETR_BACKEND`` or automatic), ``"torch"``, ``"cpu"``, ``"cuda"``
            or ``"triton"``. ``dropout_p > 0`` or ``need_weights`` make the automatic choice the
            reference; a fused backend asked for explicitly then raises.

    Returns:
        ``out [B, Nq, H, Dv]`` (contiguous), or ``(out, weights)`` when ``need_weights``.
        A query whose keys are all padding gets a zero output and zero gradients (the original
        implementation returns NaN there).
    """
    names = ("q_content", "q_pos", "k_content", "k_pos", "value")
    tensors = (q_content, q_pos, k_content, k_pos, value)
    for n, t in zip(names, tensors):
        _checks.tensor(_OP, n, t)
        _checks.rank(_OP, n, t, 4, "[B, N, H, D]")
    B, Nq, H, Dc = q_content.shape
    Dp = q_pos.shape[-1]
    Nk = k_content.shape[1]
    for n, t in zip(names[1:], tensors[1:]):
        _checks.dim_match(_OP, "the batch size (dim 0)", n, t.shape[0], "q_content", B)
        _checks.dim_match(_OP, "the number of heads (dim 2)", n, t.shape[2], "q_content", H)
    _checks.dim_match(_OP, "the number of queries (dim 1)", "q_pos", q_pos.shape[1], "q_content", Nq)
    _checks.dim_match(_OP, "the number of keys (dim 1)", "k_pos", k_pos.shape[1], "k_content", Nk)
    _checks.dim_match(_OP, "the number of keys (dim 1)", "value", value.shape[1], "k_content", Nk)
    _checks.dim_match(_OP, "the content head dim (dim 3)", "k_content", k_content.shape[3], "q_content", Dc)
    _checks.dim_match(_OP, "the position head dim (dim 3)", "k_pos", k_pos.shape[3], "q_pos", Dp)
    # Under autocast every floating input runs in the autocast dtype (mixed inputs are fine).
    dtype = _amp.autocast_dtype(q_content.device.type)
    tensors = tuple(_amp.cast(t, dtype) for t in tensors)
    q_content, q_pos, k_content, k_pos, value = tensors
    _checks.same_dtype_device(_OP, list(zip(names, tensors)))
    if key_padding_mask is not None:
        _checks.tensor(_OP, "key_padding_mask", key_padding_mask, floating=False)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"{_OP}: 'key_padding_mask' must be a bool tensor (True = padding), got dtype {key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(
                f"{_OP}: 'key_padding_mask' must have shape [B, Nk] = [{B}, {Nk}], got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q_content.device:
            raise ValueError(
                f"{_OP}: 'key_padding_mask' is on {key_padding_mask.device} but 'q_content' is on {q_content.device}"
            )
    if scale is None:
        scale = (Dc + Dp) ** -0.5
    scale = _checks.real(_OP, "scale", scale)
    dropout_p = _checks.real(_OP, "dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_OP}: 'dropout_p' must be in [0, 1), got {dropout_p}")
    need_weights = bool(need_weights)

    why = _unsupported(q_content.device, (Dc, Dp, value.shape[-1]), dropout_p, need_weights)
    chosen = _dispatch.resolve("content_position_attention", q_content.device, backend, why, q_content.dtype)
    if chosen == "torch":
        out, weights = reference.content_position_attention(
            q_content, q_pos, k_content, k_pos, value, key_padding_mask, scale, dropout_p, need_weights
        )
        return (out, weights) if need_weights else out
    if chosen == "triton":
        fn = _dispatch.python_impl("triton", "content_position_attention")
        out, _ = fn(q_content, q_pos, k_content, k_pos, value, key_padding_mask, scale)
        return out
    out, _ = torch.ops.dabdetr.content_position_attention(
        q_content, q_pos, k_content, k_pos, value, key_padding_mask, scale
    )
    return out
