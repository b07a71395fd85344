"""Plain-PyTorch reference implementations of dabdetr's fused ops: the spec.

These functions define the exact semantics of every fused kernel (see DESIGN.md, "The three fused
ops"). They are the float64 oracle of the tests, the eager baseline of the benchmarks (they follow
the original DAB-DETR implementation's math: per-coordinate sine/cosine embedding, and per-head
[content | position] concatenation + bmm + masked softmax + bmm) and the fallback path when no
compiled backend is available. They do no argument checking: the public functions in
``dabdetr.ops`` validate before dispatching here.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "sine_embed",
    "modulated_sine_query",
    "content_position_attention",
    "frequencies",
]


def frequencies(num_feats: int, temperature: float, dtype=torch.float64, device=None) -> Tensor:
    """``dim_t`` of the original code: ``T ** (2 * (i // 2) / F)`` for i in [0, F)."""
    i = torch.arange(num_feats, dtype=torch.float64, device=device)
    return (float(temperature) ** (2.0 * torch.div(i, 2, rounding_mode="floor") / num_feats)).to(dtype)


def sine_embed(
    coords: Tensor,
    num_feats: int = 128,
    temperature: Sequence[float] = (10000.0,),
    scale: float = 2 * math.pi,
    exchange_xy: bool = True,
) -> Tensor:
    """Reference of ``dabdetr.ops.sine_embed``; ``temperature`` is a sequence of C floats in input
    coordinate order."""
    C = coords.shape[-1]
    dim_t = torch.stack(
        [frequencies(num_feats, t, coords.dtype, coords.device) for t in temperature]
    )  # [C, F]
    if exchange_xy:
        perm = [1, 0] + list(range(2, C))
        coords = coords[..., perm]
        dim_t = dim_t[perm]
    pos = (coords * scale)[..., None] / dim_t  # [..., C, F]
    out = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1)  # [..., C, F/2, 2]
    return out.flatten(-3)


def modulated_sine_query(
    anchors: Tensor,
    ref_wh: Optional[Tensor] = None,
    pos_scale: Optional[Tensor] = None,
    num_feats: int = 128,
    temperature: Sequence[float] = (10000.0, 10000.0),
    scale: float = 2 * math.pi,
) -> Tensor:
    """Reference of ``dabdetr.ops.modulated_sine_query``, in the original's order of operations:
    ``qse = sine(y, x) * pos_scale`` then ``qse[x half] *= w_ref / w``, ``qse[y half] *= h_ref / h``.
    ``temperature`` is (T_x, T_y)."""
    F = num_feats
    e = sine_embed(anchors[..., :2], num_feats, temperature, scale, exchange_xy=True)  # [E(y)|E(x)]
    if pos_scale is not None:
        e = e * pos_scale
    if ref_wh is not None:
        ry = (ref_wh[..., 1] / anchors[..., 3])[..., None]
        rx = (ref_wh[..., 0] / anchors[..., 2])[..., None]
        e = torch.cat([e[..., :F] * ry, e[..., F:] * rx], dim=-1)
    return e


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
) -> Tuple[Tensor, Optional[Tensor]]:
    """Reference of ``dabdetr.ops.content_position_attention``: the original DAB-DETR math
    (per-head concatenation of the content and position halves, bmm, masked softmax, bmm).

    Returns ``(out [B, Nq, H, Dv] contiguous, weights [B, Nq, Nk] head-averaged or None)``.
    Rows whose keys are all padding give zero output and zero gradients (the original gives NaN).
    """
    B, Nq, H, Dc = q_content.shape
    Dp = q_pos.shape[-1]
    Nk = k_content.shape[1]
    Dv = value.shape[-1]
    if scale is None:
        scale = (Dc + Dp) ** -0.5
    D = Dc + Dp
    q = torch.cat([q_content, q_pos], dim=-1).transpose(1, 2).reshape(B * H, Nq, D) * scale
    k = torch.cat([k_content, k_pos], dim=-1).transpose(1, 2).reshape(B * H, Nk, D)
    v = value.transpose(1, 2).reshape(B * H, Nk, Dv)
    attn = torch.bmm(q, k.transpose(1, 2))  # [B*H, Nq, Nk]
    keep = None
    if key_padding_mask is not None:
        # A batch element whose keys are all padding: its rows would be NaN (softmax over -inf
        # only). Un-mask them for the softmax and zero their probabilities afterwards, so that the
        # output and every gradient are exactly zero there.
        full = key_padding_mask.all(dim=-1)  # [B]
        mask = key_padding_mask & ~full[:, None]
        attn = attn.view(B, H, Nq, Nk).masked_fill(mask[:, None, None, :], float("-inf"))
        attn = attn.view(B * H, Nq, Nk)
        keep = (~full).to(attn.dtype)
    attn = torch.softmax(attn, dim=-1)
    if keep is not None:
        attn = (attn.view(B, H, Nq, Nk) * keep[:, None, None, None]).view(B * H, Nq, Nk)
    if dropout_p > 0.0:
        attn = torch.nn.functional.dropout(attn, p=dropout_p, training=True)
    out = torch.bmm(attn, v).view(B, H, Nq, Dv).transpose(1, 2).contiguous()
    weights = attn.view(B, H, Nq, Nk).mean(dim=1) if need_weights else None
    return out, weights


def attention_logsumexp(
    q_content: Tensor,
    q_pos: Tensor,
    k_content: Tensor,
    k_pos: Tensor,
    key_padding_mask: Optional[Tensor],
    scale: float,
) -> Tensor:
    """The logsumexp ``[B, H, Nq]`` the fused attention kernels save for their backward (-inf for
    rows whose keys are all padding). Used by tests and by the reference fake/forward contract."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q_content, k_content) + torch.einsum(
        "bqhd,bkhd->bhqk", q_pos, k_pos
    )
    logits = logits * scale
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return torch.logsumexp(logits, dim=-1)
