"""``modulated_sine_query``: DAB-DETR's width/height-modulated positional query, in one pass."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _amp, _checks, _dispatch, reference

_OP = "dabdetr.ops.modulated_sine_query"


def modulated_sine_query(
    anchors: Tensor,
    ref_wh: Optional[Tensor] = None,
    pos_scale: Optional[Tensor] = None,
    num_feats: int = 128,
    temperature: Union[float, Sequence[float]] = 10000.0,
    scale: float = 2 * math.pi,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """The cross-attention positional query of DAB-DETR before ``ca_qpos_sine_proj``::

        out [..., 2F] = [E(cy) * h_ref / h | E(cx) * w_ref / w] ⊙ pos_scale

    with ``E`` the sine embedding of :func:`sine_embed` (``F = num_feats`` features per
    coordinate). This fuses the decoder's ``gen_sineembed_for_position(anchors)[..., :d]``,
    the conditional ``* query_scale(output)`` and the ``ref_anchor_head`` w/h modulation.

    Args:
        anchors: ``[..., 4]`` (cx, cy, w, h), normally in (0, 1).
        ref_wh: ``[..., 2]`` (w_ref, h_ref), already through the sigmoid; ``None`` = no w/h
            modulation (both ratios 1).
        pos_scale: ``[..., 2F]`` element-wise scale; ``None`` = none (DAB-DETR's layer 0).
        num_feats: ``F``, positive and even (DAB-DETR: ``hidden_dim // 2`` = 128).
        temperature: a number or ``(T_x, T_y)``.
        scale: multiplies the coordinates (2π).
        backend: see :func:`sine_embed`.

    Differentiable with respect to ``anchors`` (all four), ``ref_wh`` and ``pos_scale``. All
    tensors share dtype, device and leading shape (no broadcasting).
    """
    _checks.tensor(_OP, "anchors", anchors)
    _checks.last_dim(_OP, "anchors", anchors, 4, " (cx, cy, w, h)")
    num_feats = _checks.num_feats(_OP, num_feats)
    if ref_wh is not None:
        _checks.tensor(_OP, "ref_wh", ref_wh)
        _checks.last_dim(_OP, "ref_wh", ref_wh, 2, " (w_ref, h_ref)")
        _checks.leading_like(_OP, "ref_wh", ref_wh, "anchors", anchors)
    if pos_scale is not None:
        _checks.tensor(_OP, "pos_scale", pos_scale)
        _checks.last_dim(_OP, "pos_scale", pos_scale, 2 * num_feats, " (2 * num_feats)")
        _checks.leading_like(_OP, "pos_scale", pos_scale, "anchors", anchors)
    # Under autocast every floating input runs in the autocast dtype (mixed inputs are fine).
    dtype = _amp.autocast_dtype(anchors.device.type)
    anchors, ref_wh, pos_scale = (_amp.cast(t, dtype) for t in (anchors, ref_wh, pos_scale))
    _checks.same_dtype_device(_OP, [("anchors", anchors), ("ref_wh", ref_wh), ("pos_scale", pos_scale)])
    temps = _checks.temperatures(_OP, temperature, 2)
    scale = _checks.real(_OP, "scale", scale)
    chosen = _dispatch.resolve("modulated_sine_query", anchors.device, backend, None, anchors.dtype)
    if chosen == "torch":
        return reference.modulated_sine_query(anchors, ref_wh, pos_scale, num_feats, temps, scale)
    if chosen == "triton":
        fn = _dispatch.python_impl("triton", "modulated_sine_query")
        return fn(anchors, ref_wh, pos_scale, num_feats, list(temps), scale)
    return torch.ops.dabdetr.modulated_sine_query(anchors, ref_wh, pos_scale, num_feats, list(temps), scale)
