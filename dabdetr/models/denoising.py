"""Query denoising (DN-DETR, Li et al., CVPR 2022), an optional training aid for DAB-DETR.

DN-DETR is built on DAB-DETR: during training only, ``G`` groups of noised copies of the ground
truth are fed to the decoder next to the learned anchors, and each is trained to reconstruct its
box and class — a supervision that needs no Hungarian matching and so makes the early phase of
training, when matching is unstable, far more sample-efficient. Inference is unchanged (no
denoising queries), so a model trained with it is an ordinary DAB-DETR.

Construction (``config.dn_groups = G > 0``):

* every ground-truth box ``(cx, cy, w, h)`` is copied ``G`` times and noised: the centre moves by
  ``u·λ·w/2`` (``u·λ·h/2``), the sides scale by ``1 + u·λ`` with ``u ~ U(-1, 1)`` and
  ``λ = dn_box_noise`` (0.4); the noised box (clamped to [0, 1]) is the query's anchor;
* its class is replaced by a uniformly random one with probability ``dn_label_noise`` (0.2), and
  the query's content is ``label_enc(class)``, a learned embedding (the matching queries keep the
  DAB-DETR content: zeros, or the pattern embeddings);
* queries are laid out ``[group 0 (P slots) | ... | group G-1 | matching queries]`` with ``P`` the
  largest number of boxes in an image of the batch; slots past an image's own boxes are padding;
* decoder self-attention mask: matching queries see only matching queries; a denoising query sees
  its own group and the matching queries; padding slots are seen by nobody.

The loss (:meth:`dabdetr.models.SetCriterion.forward`) compares every real denoising query with the
box it was made from: focal classification with the true class, L1 and GIoU, on every decoder layer
(keys ``loss_ce_dn``, ``loss_bbox_dn``, ``loss_giou_dn`` and ``_dn_<i>`` for the aux layers, with the
matching losses' weights), normalised by ``num_boxes · G``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .box_ops import inverse_sigmoid

__all__ = ["DenoisingQueries", "make_denoising_queries"]


@dataclass
class DenoisingQueries:
    content: Tensor  # [B, G*P, d]
    anchors: Tensor  # [B, G*P, 4] anchor logits (inverse sigmoid of the noised boxes)
    self_attn_mask: Tensor  # [B, 1, G*P + Q, G*P + Q] bool, True = may attend
    valid: Tensor  # [B, G*P] bool: a real (not padding) denoising query
    target_index: Tensor  # [B, G*P] int64: index of the source box in its image's targets (0 for padding)
    groups: int
    pad: int

    @property
    def num_queries(self) -> int:
        return self.groups * self.pad


def make_denoising_queries(targets: Sequence[Dict[str, Tensor]], num_matching: int, label_embedding: torch.nn.Embedding,
                           groups: int, label_noise: float, box_noise: float, inverse_sigmoid_eps: float = 1e-3,
                           generator: Optional[torch.Generator] = None) -> Optional[DenoisingQueries]:
    """The denoising queries of one batch (see the module doc); None when no image has a box."""
    if groups < 1:
        raise ValueError(f"dn_groups must be >= 1 to build denoising queries, got {groups}")
    B = len(targets)
    device = label_embedding.weight.device
    num_classes = label_embedding.num_embeddings
    sizes = [int(t["labels"].shape[0]) for t in targets]
    P = max(sizes) if sizes else 0
    if P == 0:
        return None
    G = groups
    labels = torch.zeros(B, P, dtype=torch.int64, device=device)
    boxes = torch.zeros(B, P, 4, dtype=torch.float32, device=device)
    valid1 = torch.zeros(B, P, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = sizes[i]
        if n:
            labels[i, :n] = t["labels"].to(device)
            boxes[i, :n] = t["boxes"].to(device=device, dtype=torch.float32)
            valid1[i, :n] = True
    labels = labels.repeat(1, G)  # [B, G*P], group-major
    boxes = boxes.repeat(1, G, 1)
    valid = valid1.repeat(1, G)
    target_index = torch.arange(P, device=device).repeat(G)[None].expand(B, -1).clone()

    def rand(*shape):
        return torch.rand(*shape, device=device, generator=generator)

    if label_noise > 0:
        flip = rand(B, G * P) < label_noise
        random_labels = (rand(B, G * P) * num_classes).long().clamp_(max=num_classes - 1)
        labels = torch.where(flip, random_labels, labels)
    if box_noise > 0:
        u = rand(B, G * P, 4) * 2 - 1
        wh = boxes[..., 2:]
        centre = boxes[..., :2] + u[..., :2] * wh / 2 * box_noise
        sides = wh * (1 + u[..., 2:] * box_noise)
        boxes = torch.cat([centre, sides], -1).clamp(0.0, 1.0)
    anchors = inverse_sigmoid(boxes, inverse_sigmoid_eps)
    content = label_embedding(labels)

    # self-attention mask over [denoising (G*P) | matching (Q)]
    Q = num_matching
    N = G * P + Q
    group_of = torch.arange(G, device=device).repeat_interleave(P)
    allowed = torch.zeros(N, N, dtype=torch.bool, device=device)
    allowed[:G * P, :G * P] = group_of[:, None] == group_of[None, :]
    allowed[:G * P, G * P:] = True
    allowed[G * P:, G * P:] = True
    column_ok = torch.cat([valid, torch.ones(B, Q, dtype=torch.bool, device=device)], 1)  # [B, N]
    mask = allowed[None] & column_ok[:, None, :]
    return DenoisingQueries(content, anchors, mask[:, None], valid, target_index, G, P)
