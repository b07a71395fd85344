"""Set-prediction loss of DAB-DETR (REFERENCE.md §7): focal classification loss, L1 and GIoU box
losses with the original's weights (1, 5, 2), aux losses re-matched per decoder layer, ``num_boxes``
normalisation (averaged over processes when torch.distributed is initialised). Loss math runs in
float32 with autocast off.

``criterion(outputs, targets)`` → dict of every loss and logged metric (the original's keys:
``loss_ce, class_error, loss_bbox, loss_giou, loss_xy, loss_hw, cardinality_error`` and the ``_i``
copies of the aux layers); ``criterion.total(losses)`` → the weighted sum to back-propagate.

With query denoising (``outputs["dn"]``, see :mod:`dabdetr.models.denoising`) the denoising
queries add ``loss_ce_dn, loss_bbox_dn, loss_giou_dn`` (and ``_dn_<i>`` per aux layer): each real
denoising query against the box it was made from (no matching), normalised by ``num_boxes · G``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import at_least_float32, box_cxcywh_to_xyxy, generalized_box_iou_pairwise
from .dense_aux import dense_aux_losses
from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "sigmoid_focal_loss", "build_criterion"]

Indices = List[Tuple[Tensor, Tensor]]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """``Σ α_t · BCE(logit, y) · (1 − p_t)^γ / num_boxes`` over every query and class (the
    original's ``loss.mean(1).sum() / num_boxes * num_queries``)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_boxes


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float],
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 losses: Sequence[str] = ("labels", "boxes", "cardinality")):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        unknown = set(losses) - {"labels", "boxes", "cardinality"}
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}")
        self.losses = tuple(losses)

    # ---------------------------------------------------------------- individual losses
    @staticmethod
    def _src_idx(indices: Indices, device) -> Tuple[Tensor, Tensor]:
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        src = torch.cat([src for src, _ in indices]).to(device)
        return batch, src

    def loss_labels(self, outputs, targets, indices: Indices, num_boxes: float, log: bool = True) -> Dict[str, Tensor]:
        logits = at_least_float32(outputs["pred_logits"])
        B, Q, K = logits.shape
        b, q = self._src_idx(indices, logits.device)
        labels_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        if labels_o.numel() and (labels_o.min() < 0 or labels_o.max() >= K):
            raise ValueError(f"target labels must lie in [0, {K}) (num_classes = {K}); got "
                             f"[{int(labels_o.min())}, {int(labels_o.max())}]")
        onehot = torch.zeros_like(logits)
        onehot[b, q, labels_o] = 1.0
        out = {"loss_ce": sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma)}
        if log:
            with torch.no_grad():
                if labels_o.numel() == 0:
                    acc = torch.zeros((), device=logits.device)
                else:
                    acc = (logits[b, q].argmax(-1) == labels_o).float().mean() * 100
                out["class_error"] = 100 - acc
        return out

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices: Indices, num_boxes: float) -> Dict[str, Tensor]:
        """Logged only: mean over images of |#{q: argmax ≠ K−1} − n_b| (the original's metric)."""
        logits = outputs["pred_logits"]
        lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device, dtype=torch.float32)
        card = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        return {"cardinality_error": F.l1_loss(card, lengths)}

    def loss_boxes(self, outputs, targets, indices: Indices, num_boxes: float) -> Dict[str, Tensor]:
        boxes = at_least_float32(outputs["pred_boxes"])
        b, q = self._src_idx(indices, boxes.device)
        src = boxes[b, q]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(boxes.device, boxes.dtype)
        l1 = (src - tgt).abs()
        giou = generalized_box_iou_pairwise(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        return {"loss_bbox": l1.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes,
                "loss_xy": l1[:, :2].sum() / num_boxes, "loss_hw": l1[:, 2:].sum() / num_boxes}

    # ---------------------------------------------------------------- driver
    def num_boxes(self, targets, device) -> float:
        n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], dtype=torch.float32, device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            world = dist.get_world_size()
        return max(n.item() / world, 1.0)

    def _layer_losses(self, outputs, targets, indices, num_boxes, suffix: str, log: bool) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for name in self.losses:
            if name == "labels":
                part = self.loss_labels(outputs, targets, indices, num_boxes, log=log)
            elif name == "boxes":
                part = self.loss_boxes(outputs, targets, indices, num_boxes)
            else:
                part = self.loss_cardinality(outputs, targets, indices, num_boxes)
            out.update({k + suffix: v for k, v in part.items()})
        return out

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]],
                indices: Optional[List[Indices]] = None, return_indices: bool = False):
        """Losses of the final layer and of every aux layer (``_i`` suffix), each layer matched on
        its own. ``indices`` (optional) gives the matching per layer in the order aux 0..L-2, final;
        ``return_indices=True`` returns ``(losses, indices)`` in that order."""
        with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
            aux = outputs.get("aux_outputs", []) or []
            layers = list(aux) + [outputs]
            nb = self.num_boxes(targets, outputs["pred_logits"].device)
            all_indices: List[Indices] = []
            losses: Dict[str, Tensor] = {}
            for i, layer_out in enumerate(layers):
                idx = indices[i] if indices is not None else self.matcher(layer_out, targets)
                all_indices.append(idx)
                final = i == len(layers) - 1
                losses.update(self._layer_losses(layer_out, targets, idx, nb, "" if final else f"_{i}", log=final))
            if outputs.get("dn") is not None:
                losses.update(self.denoising_losses(outputs["dn"], targets, nb))
            if outputs.get("enc_aux") is not None:
                losses.update(dense_aux_losses(outputs["enc_aux"], targets, nb))
        # the original's key order: final layer first, then the aux layers
        order = [k for k in losses if not k.rsplit("_", 1)[-1].isdigit()] + \
                [k for k in losses if k.rsplit("_", 1)[-1].isdigit()]
        losses = {k: losses[k] for k in order}
        return (losses, all_indices) if return_indices else losses

    def denoising_losses(self, dn: Dict, targets: Sequence[Dict[str, Tensor]], num_boxes: float) -> Dict[str, Tensor]:
        """Losses of the denoising queries on every decoder layer (keys ``loss_*_dn`` for the last,
        ``loss_*_dn_<i>`` for the others). Padding slots take no part (neither as positives nor as
        negatives): the real queries of the whole batch are gathered into one row, each matched to
        the box it was made from."""
        b, q = dn["valid"].nonzero(as_tuple=True)
        j = dn["target_index"][b, q]
        device = dn["valid"].device
        labels = torch.cat([t["labels"].to(device) for t in targets])
        boxes = torch.cat([t["boxes"].to(device).float() for t in targets])
        offsets = torch.tensor([0] + [len(t["labels"]) for t in targets], device=device).cumsum(0)
        flat = offsets[b] + j
        source = [{"labels": labels[flat], "boxes": boxes[flat]}]
        n = int(flat.numel())
        indices = [(torch.arange(n), torch.arange(n))]
        nb = num_boxes * dn["groups"]
        layers = dn["layers"]
        out: Dict[str, Tensor] = {}
        for i, layer_out in enumerate(layers):
            suffix = "_dn" if i == len(layers) - 1 else f"_dn_{i}"
            rows = {"pred_logits": layer_out["pred_logits"][b, q][None], "pred_boxes": layer_out["pred_boxes"][b, q][None]}
            part = self.loss_labels(rows, source, indices, nb, log=False)
            part.update(self.loss_boxes(rows, source, indices, nb))
            out.update({k + suffix: v for k, v in part.items() if k in ("loss_ce", "loss_bbox", "loss_giou")})
        return out

    def total(self, losses: Dict[str, Tensor]) -> Tensor:
        """``Σ weight_dict[k] · losses[k]`` over the weighted keys."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)


def build_criterion(config) -> SetCriterion:
    """Matcher + criterion from a :class:`DABDETRConfig` (the original's weights by default)."""
    matcher = HungarianMatcher(config.set_cost_class, config.set_cost_bbox, config.set_cost_giou,
                               config.focal_alpha, config.focal_gamma)
    weight_dict = {"loss_ce": config.cls_loss_coef, "loss_bbox": config.bbox_loss_coef,
                   "loss_giou": config.giou_loss_coef}
    if getattr(config, "dn_groups", 0) > 0:
        weight_dict.update({f"{k}_dn": v for k, v in list(weight_dict.items())})
    if config.aux_loss:
        base = {k: v for k, v in weight_dict.items()}
        for i in range(config.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    if getattr(config, "enc_aux_coef", 0.0) > 0:
        weight_dict["loss_enc_heatmap"] = config.enc_aux_coef
        weight_dict["loss_enc_bbox"] = config.enc_aux_coef * config.bbox_loss_coef
    return SetCriterion(config.num_classes, matcher, weight_dict, config.focal_alpha, config.focal_gamma)
