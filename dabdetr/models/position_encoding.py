"""Image positional encoding ``PositionEmbeddingSineHW`` (REFERENCE.md §1b).

Normalised cumulative row/column counts of the valid (non-padded) cells, each divided by the count
in its column's last row / row's last column (``+1e-6``), times 2π, then the interleaved sin/cos
embedding with separate temperatures for y (``temperature_h``) and x (``temperature_w``). Output
channels: ``[E(y) | E(x)]``. The sine part is computed by :func:`dabdetr.ops.sine_embed`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops

__all__ = ["PositionEmbeddingSineHW"]


class PositionEmbeddingSineHW(nn.Module):
    def __init__(self, num_pos_feats: int = 128, temperature_h: float = 20.0, temperature_w: float = 20.0,
                 normalize: bool = True, scale: Optional[float] = None, backend: Optional[str] = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature_h = float(temperature_h)
        self.temperature_w = float(temperature_w)
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.backend = backend

    def forward(self, mask: Tensor) -> Tensor:
        """``mask [B,h,w]`` bool (True = padding) → ``pos [B, 2*num_pos_feats, h, w]`` float32."""
        not_mask = (~mask).to(torch.float32)
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        if self.normalize:
            y = y / (y[:, -1:, :] + 1e-6)
            x = x / (x[:, :, -1:] + 1e-6)
            scale = self.scale
        else:
            scale = 1.0
        coords = torch.stack([x, y], dim=-1)  # [B,h,w,2] in (x, y) order
        pos = ops.sine_embed(coords, num_feats=self.num_pos_feats,
                             temperature=(self.temperature_w, self.temperature_h), scale=scale,
                             exchange_xy=True, backend=self.backend)  # [B,h,w,2F] = [E(y) | E(x)]
        return pos.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperature_h={self.temperature_h}, "
                f"temperature_w={self.temperature_w}, normalize={self.normalize}")
