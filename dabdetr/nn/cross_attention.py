"""``ContentPositionCrossAttention``: DAB-DETR's decoder cross-attention as a drop-in module.

It owns the projections of the original decoder layer's cross-attention (REFERENCE.md §4) and
calls the fused op :func:`dabdetr.ops.content_position_attention`, so any DETR variant with
Conditional-DETR-style decoupled content/position queries can use the fused kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops


class ContentPositionCrossAttention(nn.Module):
    """Cross-attention over per-head ``[content | position]`` queries and keys.

    Per head ``h``: ``softmax((q_c^h·k_c^h + q_s^h·k_p^h) * scale) @ v^h``, with
    ``q_c = ca_qcontent_proj(tgt)``, ``q_s = ca_qpos_sine_proj(query_sine_embed)``,
    ``k_c = ca_kcontent_proj(memory)``, ``k_p = ca_kpos_proj(pos)``, ``v = ca_v_proj(memory)``;
    when ``add_pos_to_content`` (DAB-DETR's first decoder layer), ``q_c += ca_qpos_proj(query_pos)``
    and ``k_c += k_p``. The output goes through ``out_proj``. ``scale`` defaults to
    ``(2 * d_model / nhead) ** -0.5``: the original's 1/sqrt(64) for d_model 256, 8 heads.

    Args:
        d_model: width of queries, memory and output.
        nhead: number of heads (``d_model % nhead == 0``).
        query_pos_proj: create ``ca_qpos_proj`` (DAB-DETR: layer 0 only, or every layer with
            ``keep_query_pos``).
        batch_first: inputs and output are ``[B, N, C]``; default sequence-first ``[N, B, C]``
            as in DETR. Either way the fused kernel reads the projections as strided views, with
            no layout copy.
        backend: passed to the fused op (None: automatic / ``DABDETR_BACKEND``).
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        *,
        query_pos_proj: bool = True,
        batch_first: bool = False,
        scale: Optional[float] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.d_model = d_model
        self.nhead = nhead
        self.batch_first = batch_first
        self.backend = backend
        self.scale = scale if scale is not None else (2 * d_model // nhead) ** -0.5
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if query_pos_proj else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        """[N, B, C] or [B, N, C] → a [B, N, H, C/H] view (no copy)."""
        if self.batch_first:
            B, N, _ = x.shape
            return x.view(B, N, self.nhead, -1)
        N, B, _ = x.shape
        return x.view(N, B, self.nhead, -1).transpose(0, 1)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor,
        query_sine_embed: Tensor,
        query_pos: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        add_pos_to_content: bool = False,
        need_weights: bool = False,
    ):
        """Returns the attended output (same layout as ``tgt``), and the head-averaged attention
        weights ``[B, Nq, Nk]`` when ``need_weights``."""
        q_c = self.ca_qcontent_proj(tgt)
        k_c = self.ca_kcontent_proj(memory)
        v = self.ca_v_proj(memory)
        k_p = self.ca_kpos_proj(pos)
        if add_pos_to_content:
            if self.ca_qpos_proj is None or query_pos is None:
                raise ValueError(
                    "add_pos_to_content=True needs query_pos and a module built with query_pos_proj=True"
                )
            q_c = q_c + self.ca_qpos_proj(query_pos)
            k_c = k_c + k_p
        q_s = self.ca_qpos_sine_proj(query_sine_embed)
        res = ops.content_position_attention(
            self._heads(q_c),
            self._heads(q_s),
            self._heads(k_c),
            self._heads(k_p),
            self._heads(v),
            memory_key_padding_mask,
            scale=self.scale,
            need_weights=need_weights,
            backend=self.backend,
        )
        out, weights = res if need_weights else (res, None)
        B, Nq = out.shape[:2]
        out = self.out_proj(out.view(B, Nq, self.d_model))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out, weights) if need_weights else out
