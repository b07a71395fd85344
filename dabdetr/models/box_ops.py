"""Box utilities: format conversions, (generalised) IoU and the inverse sigmoid.

Boxes are ``(cx, cy, w, h)`` ("cxcywh") or ``(x0, y0, x1, y1)`` ("xyxy") in the last dim. The IoU
functions follow the original DAB-DETR code (``util/box_ops.py``): ``+1e-6`` in the IoU and in the
enclosing-area denominators. Unlike the original they do not assert that boxes are well formed, so a
degenerate prediction (zero width, or a NaN) never crashes the matcher; the matcher sanitises the
resulting cost instead.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = [
    "at_least_float32",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "generalized_box_iou_pairwise",
    "inverse_sigmoid",
]

_EPS = 1e-6


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or kept in float64: the anchor, box and loss math runs in float32 under
    mixed precision (half-precision inputs are upcast) and in float64 for a float64 model."""
    return x if x.dtype == torch.float64 else x.float()


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes ``[..., 4]`` (negative for inverted boxes, as torchvision's)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    """IoU matrix ``[N, M]`` and union ``[N, M]`` of xyxy boxes ``[N, 4]`` and ``[M, 4]``."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / (union + _EPS), union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU matrix ``[N, M]`` of xyxy boxes ``[N, 4]`` and ``[M, 4]``."""
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / (area + _EPS)


def generalized_box_iou_pairwise(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of matching pairs: xyxy boxes ``[..., 4]`` and ``[..., 4]`` → ``[...]``.

    Equals ``diag(generalized_box_iou(boxes1, boxes2))`` without the ``N x N`` matrix."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    iou = inter / (union + _EPS)
    lt = torch.min(boxes1[..., :2], boxes2[..., :2])
    rb = torch.max(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / (area + _EPS)


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """``log(x / (1 - x))`` with both terms clamped at ``eps`` (the original's 1e-3 by default;
    HuggingFace's port uses 1e-5). Saturates at about ``±log(1/eps)``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
