"""Hungarian matcher of DAB-DETR (REFERENCE.md §6).

Cost per (query, target) = ``cost_bbox·L1(cxcywh) + cost_class·(pos − neg)[label]
+ cost_giou·(−GIoU)``, focal costs ``neg = (1−α)·p^γ·(−log(1−p+1e-8))``,
``pos = α·(1−p)^γ·(−log(p+1e-8))``; minimum-cost assignment per image with SciPy's
``linear_sum_assignment``. All cost math runs in float32 with autocast off. Non-finite costs (e.g.
from NaN boxes) are replaced by large finite values so that the solver never fails.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "matching_cost"]

_BIG = 1e8


def matching_cost(pred_logits: Tensor, pred_boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor,
                  cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                  focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> Tensor:
    """Cost matrix ``[N, M]`` between ``N`` predictions (``pred_logits [N,K]``, ``pred_boxes [N,4]``
    cxcywh) and ``M`` targets (``tgt_labels [M]``, ``tgt_boxes [M,4]`` cxcywh), float32."""
    prob = pred_logits.float().sigmoid()
    out_bbox = pred_boxes.float()
    tgt_bbox = tgt_boxes.float()
    neg = (1 - focal_alpha) * (prob ** focal_gamma) * (-(1 - prob + 1e-8).log())
    pos = focal_alpha * ((1 - prob) ** focal_gamma) * (-(prob + 1e-8).log())
    c_class = pos[:, tgt_labels] - neg[:, tgt_labels]
    c_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
    return cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """``outputs``: ``pred_logits [B,Q,K]``, ``pred_boxes [B,Q,4]``; ``targets``: B dicts with
        ``labels [n_b]`` int64 and ``boxes [n_b,4]`` cxcywh. Returns per image ``(query_idx, target_idx)``
        int64 tensors (query indices ascending) of length ``min(Q, n_b)``."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        B, Q, _ = logits.shape
        if len(targets) != B:
            raise ValueError(f"got {len(targets)} targets for a batch of {B}")
        sizes = [int(t["boxes"].shape[0]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(B)]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            tgt_ids = torch.cat([t["labels"] for t in targets]).to(logits.device)
            tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(logits.device)
            C = matching_cost(logits.flatten(0, 1), boxes.flatten(0, 1), tgt_ids, tgt_bbox, self.cost_class,
                              self.cost_bbox, self.cost_giou, self.focal_alpha, self.focal_gamma)
        C = C.view(B, Q, -1).cpu()
        C = torch.nan_to_num(C, nan=_BIG, posinf=_BIG, neginf=-_BIG)
        indices = []
        for i, c in enumerate(C.split(sizes, -1)):
            if sizes[i] == 0:
                indices.append((empty, empty))
                continue
            r, col = linear_sum_assignment(c[i].numpy())
            indices.append((torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(col, dtype=torch.int64)))
        return indices
