"""A dense auxiliary loss on the encoder output, an optional training aid for DAB-DETR trained
from scratch (no pretrained backbone).

DETR-style set losses reach the backbone only through the decoder's few matched queries, which
makes learning image features from random initialisation very slow; with an ImageNet backbone
(the paper's setting) this does not matter. ``config.enc_aux_coef > 0`` adds a small head on the
encoder memory, used in training only, with a one-to-many, per-location (CenterNet-like)
supervision, in the spirit of the auxiliary heads of Co-DETR (Zong et al., ICCV 2023):

* a class heatmap ``[B, K, h, w]``: target ``exp(-dx²/2σx² - dy²/2σy²)`` around every box centre
  (``σ = side / 6`` in feature cells, at least 0.5; the maximum over the boxes of the same class;
  the centre's own cell is exactly 1), penalty-reduced focal loss (CenterNet: ``α = 2, β = 4``),
  padding cells excluded, normalised by the number of boxes;
* a box ``[B, 4, h, w]`` (sigmoid, normalised cxcywh of the whole image) read at every box's centre
  cell, L1 loss normalised by the number of boxes.

With ``config.query_selection`` the head is also used at inference: :func:`select_anchors` turns
its outputs into each image's decoder anchors (in place of the learned ones).

The two losses are returned as ``loss_enc_heatmap`` and ``loss_enc_bbox`` and weighted by
``enc_aux_coef`` (the box term additionally by ``bbox_loss_coef``). The head is not used at
inference: a model trained with it is an ordinary DAB-DETR (its state dict has the extra
``enc_aux_head.*`` entries, ignored by the detector).
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import at_least_float32, inverse_sigmoid

__all__ = ["DenseAuxHead", "dense_aux_losses", "center_heatmap_targets", "select_anchors"]


class DenseAuxHead(nn.Module):
    def __init__(self, d_model: int, num_classes: int, prior_prob: float = 0.01):
        super().__init__()
        self.conv = nn.Conv2d(d_model, d_model, 3, padding=1)
        self.cls = nn.Conv2d(d_model, num_classes, 1)
        self.box = nn.Conv2d(d_model, 4, 1)
        nn.init.constant_(self.cls.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.box.weight)
        nn.init.zeros_(self.box.bias)

    def forward(self, memory: Tensor, hw) -> Dict[str, Tensor]:
        """``memory [B, HW, d]`` → ``heatmap_logits [B, K, h, w]``, ``boxes [B, 4, h, w]`` (sigmoid)."""
        B, _, d = memory.shape
        h, w = hw
        x = F.relu(self.conv(memory.transpose(1, 2).reshape(B, d, h, w)))
        return {"heatmap_logits": self.cls(x), "boxes": at_least_float32(self.box(x)).sigmoid()}


@torch.no_grad()
def center_heatmap_targets(targets: Sequence[Dict[str, Tensor]], mask: Tensor, num_classes: int):
    """Heatmaps ``[B, K, h, w]`` and, per image, the centre cells ``(ys, xs)`` of its boxes, from
    normalised cxcywh boxes; ``mask [B, h, w]`` (True = padding) gives each image's valid extent."""
    B, h, w = mask.shape
    device = mask.device
    heat = torch.zeros(B, num_classes, h, w, device=device)
    ys_grid = torch.arange(h, device=device, dtype=torch.float32)[:, None]
    xs_grid = torch.arange(w, device=device, dtype=torch.float32)[None, :]
    centres = []
    for b, t in enumerate(targets):
        vh = float((~mask[b, :, 0]).sum().clamp(min=1))
        vw = float((~mask[b, 0, :]).sum().clamp(min=1))
        boxes = t["boxes"].to(device).float()
        labels = t["labels"].to(device)
        cx, cy = boxes[:, 0] * vw - 0.5, boxes[:, 1] * vh - 0.5  # cell centres at integer coordinates
        sx = (boxes[:, 2] * vw / 6).clamp(min=0.5)
        sy = (boxes[:, 3] * vh / 6).clamp(min=0.5)
        ix = (boxes[:, 0] * vw).floor().clamp(0, vw - 1).long()  # the cell that holds the centre
        iy = (boxes[:, 1] * vh).floor().clamp(0, vh - 1).long()
        for k in range(boxes.shape[0]):
            g = torch.exp(-((xs_grid - cx[k]) ** 2) / (2 * sx[k] ** 2) - ((ys_grid - cy[k]) ** 2) / (2 * sy[k] ** 2))
            heat[b, labels[k]] = torch.maximum(heat[b, labels[k]], g)
            heat[b, labels[k], iy[k], ix[k]] = 1.0
        centres.append((iy, ix))
    heat = heat.masked_fill(mask[:, None], 0.0)
    return heat, centres


def dense_aux_losses(aux: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]], num_boxes: float,
                     alpha: float = 2.0, beta: float = 4.0) -> Dict[str, Tensor]:
    """``loss_enc_heatmap`` (penalty-reduced focal) and ``loss_enc_bbox`` (L1 at the centre cells)."""
    logits = aux["heatmap_logits"].float()
    mask = aux["mask"]
    heat, centres = center_heatmap_targets(targets, mask, logits.shape[1])
    valid = (~mask)[:, None].expand_as(logits)
    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1.0)
    pos_loss = -F.logsigmoid(logits) * (1 - p) ** alpha
    neg_loss = -F.logsigmoid(-logits) * p ** alpha * (1 - heat) ** beta
    heat_loss = torch.where(pos, pos_loss, neg_loss)[valid].sum() / num_boxes
    boxes = aux["boxes"]
    l1 = boxes.new_zeros(())
    for b, (t, (iy, ix)) in enumerate(zip(targets, centres)):
        if iy.numel():
            pred = boxes[b, :, iy, ix].t()
            l1 = l1 + (pred - t["boxes"].to(pred.device).float()).abs().sum()
    return {"loss_enc_heatmap": heat_loss, "loss_enc_bbox": l1 / num_boxes}


@torch.no_grad()
def select_anchors(heatmap_logits: Tensor, boxes: Tensor, mask: Tensor, k: int, eps: float = 1e-3) -> Tensor:
    """Query selection: anchors ``[B, k, 4]`` (inverse-sigmoid cxcywh, no gradient) at each image's
    ``k`` best cells of the dense head. A cell's score is its highest class probability; cells that
    are 3x3 local maxima come first (one anchor per heatmap peak before a second one near the same
    object), padding cells never. The anchor's centre is the cell's centre (the heatmap peaks at
    box centres; at initialisation the box head predicts the same box everywhere), its size is the
    box head's ``w, h`` at that cell."""
    B, _, h, w = heatmap_logits.shape
    score = heatmap_logits.float().sigmoid().amax(1)  # [B, h, w]
    peak = score == F.max_pool2d(score[:, None], 3, stride=1, padding=1)[:, 0]
    score = torch.where(peak, score, score - 1.0).masked_fill(mask, -3.0).flatten(1)
    n = min(k, h * w)
    idx = score.topk(n, dim=1).indices  # [B, n]
    if n < k:  # fewer cells than queries: repeat the best ones
        idx = idx.repeat(1, -(-k // n))[:, :k]
    valid = ~mask
    vh = valid[:, :, 0].sum(1).clamp(min=1).float()[:, None]
    vw = valid[:, 0, :].sum(1).clamp(min=1).float()[:, None]
    cx = ((idx % w).float() + 0.5) / vw
    cy = (torch.div(idx, w, rounding_mode="floor").float() + 0.5) / vh
    wh = torch.stack([boxes[:, 2].float().flatten(1).gather(1, idx), boxes[:, 3].float().flatten(1).gather(1, idx)], -1)
    anchors = torch.cat([torch.stack([cx, cy], -1).clamp(0.0, 1.0), wh], -1)
    return inverse_sigmoid(anchors, eps)
