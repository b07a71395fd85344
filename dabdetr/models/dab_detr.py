"""The DAB-DETR detector (REFERENCE.md §0, §3 heads, §5 init, §8 post-processing).

>>> model = DABDETR(get_config("r50"), backend="torch")          # doctest: +SKIP
>>> out = model(images, mask)      # images [B,3,H,W] padded, mask [B,H,W] True = padding
>>> out = model([img0, img1])      # or a list of [3,H_i,W_i] images (padded here)
>>> results = model.postprocess(out, target_sizes)   # per image: scores, labels, boxes (xyxy px)
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .backbone import Backbone, Joiner
from .box_ops import at_least_float32, box_cxcywh_to_xyxy, inverse_sigmoid
from .denoising import make_denoising_queries
from .dense_aux import DenseAuxHead, select_anchors
from .position_encoding import PositionEmbeddingSineHW
from .presets import DABDETRConfig
from .transformer import MLP, Transformer

__all__ = ["DABDETR", "AnchorEmbedding", "nested_pad", "postprocess"]


class AnchorEmbedding(nn.Module):
    """The learnable anchors ``[num_queries, 4]`` as logits (x, y, w, h), the original's
    ``refpoint_embed`` (state-dict key ``refpoint_embed.weight`` in every mode).

    ``freeze_xy=True`` keeps the x, y columns in a buffer and only w, h in a parameter, so no
    optimiser (weight decay included) can change x, y: a real freeze, unlike the original's no-op.
    """

    def __init__(self, num_queries: int, dim: int = 4, freeze_xy: bool = False):
        super().__init__()
        self.num_queries, self.dim, self.freeze_xy = num_queries, dim, freeze_xy
        init = torch.randn(num_queries, dim)  # nn.Embedding's default N(0, 1)
        if freeze_xy:
            self.register_buffer("weight_xy", init[:, :2].clone())
            self.weight_wh = nn.Parameter(init[:, 2:].clone())
        else:
            self.weight = nn.Parameter(init)

    def __getattr__(self, name: str):
        if name == "weight" and self.__dict__.get("freeze_xy", False):
            return self.forward()
        return super().__getattr__(name)

    def forward(self) -> Tensor:
        """The anchor logits ``[num_queries, 4]``."""
        if self.freeze_xy:
            return torch.cat([self.weight_xy, self.weight_wh], dim=1)
        return self.weight

    @torch.no_grad()
    def set_weight(self, value: Tensor) -> None:
        if self.freeze_xy:
            self.weight_xy.copy_(value[:, :2])
            self.weight_wh.copy_(value[:, 2:])
        else:
            self.weight.copy_(value)

    # The state dict always holds one ``weight`` tensor, whatever the freeze mode.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.freeze_xy:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        w = self.forward()
        destination[prefix + "weight"] = w if keep_vars else w.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if not self.freeze_xy:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        value = state_dict[key]
        if tuple(value.shape) != (self.num_queries, self.dim):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                              f"checkpoint, the shape in current model is {(self.num_queries, self.dim)}.")
            return
        self.set_weight(value.to(self.weight_wh.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_queries}, {self.dim}, freeze_xy={self.freeze_xy}"


def nested_pad(images: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Zero-pad ``[3,H_i,W_i]`` images at the bottom/right to ``[B,3,maxH,maxW]``; mask True = padding."""
    if len(images) == 0:
        raise ValueError("empty image list")
    C = images[0].shape[0]
    H = max(int(im.shape[1]) for im in images)
    W = max(int(im.shape[2]) for im in images)
    batch = images[0].new_zeros(len(images), C, H, W)
    mask = torch.ones(len(images), H, W, dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        if im.dim() != 3 or im.shape[0] != C:
            raise ValueError(f"image {i} has shape {tuple(im.shape)}; expected [{C}, H, W]")
        batch[i, :, : im.shape[1], : im.shape[2]].copy_(im)
        mask[i, : im.shape[1], : im.shape[2]] = False
    return batch, mask


@torch.no_grad()
def postprocess(outputs: Dict[str, Tensor], target_sizes: Union[Tensor, Sequence[Sequence[int]]],
                num_select: int = 300) -> List[Dict[str, Tensor]]:
    """Top-``num_select`` (query, class) pairs per image by sigmoid score (no threshold, no NMS).

    ``target_sizes [B, 2]`` = (H, W) of each unpadded image. Returns per image ``scores``
    (descending), ``labels`` (class indices = category ids) and ``boxes`` (xyxy, pixels).
    """
    logits = outputs["pred_logits"].float()
    boxes = outputs["pred_boxes"].float()
    B, Q, K = logits.shape
    target_sizes = torch.as_tensor(target_sizes, device=logits.device)
    if target_sizes.shape != (B, 2):
        raise ValueError(f"target_sizes must be [B, 2] = {[B, 2]}, got {list(target_sizes.shape)}")
    prob = logits.sigmoid().view(B, -1)
    k = min(num_select, Q * K)
    scores, index = torch.topk(prob, k, dim=1)
    query = torch.div(index, K, rounding_mode="floor")
    labels = index % K
    xyxy = box_cxcywh_to_xyxy(boxes)
    xyxy = torch.gather(xyxy, 1, query[..., None].expand(-1, -1, 4))
    h, w = target_sizes.to(xyxy.dtype).unbind(1)
    xyxy = xyxy * torch.stack([w, h, w, h], dim=1)[:, None, :]
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]


class DABDETR(nn.Module):
    """DAB-DETR (plain, non-deformable), faithful to the original implementation.

    Args:
        config: a :class:`DABDETRConfig` (default: the R50 preset's).
        backend: fused-op backend for every ``dabdetr.ops`` call; overrides ``config.backend``.
        **overrides: config fields to change.

    ``forward(images, mask=None, intermediates=None)`` returns ``pred_logits [B,Q,K]``,
    ``pred_boxes [B,Q,4]`` (cx, cy, w, h normalised, float32) and ``aux_outputs`` (layers 0..L-2)
    when ``config.aux_loss``. Pass a dict as ``intermediates`` to get the internal tensors (see
    :meth:`forward`).
    """

    def __init__(self, config: Optional[DABDETRConfig] = None, backend: Optional[str] = None, **overrides: Any):
        super().__init__()
        config = DABDETRConfig() if config is None else config
        if overrides:
            config = config.replace(**overrides)
        if backend is not None:
            config = config.replace(backend=backend)
        self.config = config
        c = config
        if c.hidden_dim % 2 or (c.hidden_dim // 2) % 2:
            raise ValueError(f"hidden_dim must be a multiple of 4, got {c.hidden_dim}")
        d = c.hidden_dim
        self.num_queries = c.num_queries
        self.num_classes = c.num_classes
        self.aux_loss = c.aux_loss
        body = Backbone(c.backbone, c.dilation, c.train_backbone, c.backbone_trainable_layers, c.backbone_norm,
                        c.frozen_bn_eps, c.backbone_width, c.backbone_stages)
        body.body.cpu_winograd = c.backbone_winograd
        pe = PositionEmbeddingSineHW(d // 2, c.pe_temperature_h, c.pe_temperature_w, normalize=True,
                                     backend=c.backend)
        self.backbone = Joiner(body, pe)
        self.input_proj = nn.Conv2d(body.num_channels, d, kernel_size=1)
        if c.query_selection and c.enc_aux_coef <= 0:
            raise ValueError("query_selection needs the dense auxiliary head (enc_aux_coef > 0)")
        # the learned anchors; none with query selection (each image's anchors come from its encoder output)
        self.refpoint_embed = (None if c.query_selection
                               else AnchorEmbedding(c.num_queries, 4, freeze_xy=c.freeze_anchor_xy))
        self.transformer = Transformer(d, c.nheads, c.enc_layers, c.dec_layers, c.dim_feedforward, c.dropout,
                                       c.activation, c.num_patterns, c.query_temperature, c.inverse_sigmoid_eps,
                                       c.backend)
        self.class_embed = nn.Linear(d, c.num_classes)
        self.bbox_embed = MLP(d, d, 4, 3)
        if c.dn_groups < 0:
            raise ValueError(f"dn_groups must be >= 0, got {c.dn_groups}")
        # query denoising (training only): the content of a denoising query is its (noised) class's embedding
        self.label_enc = nn.Embedding(c.num_classes, d) if c.dn_groups > 0 else None
        # dense auxiliary loss on the encoder output (training from scratch only)
        if c.enc_aux_coef < 0:
            raise ValueError(f"enc_aux_coef must be >= 0, got {c.enc_aux_coef}")
        if c.enc_aux_coef > 0:
            self.enc_aux_head = DenseAuxHead(d, c.num_classes, c.focal_prior_prob)
        else:
            self.enc_aux_head = None
        self._init_heads()
        self.set_backend(c.backend)  # every module with a ``backend`` attribute (fused ops, self-attention, frozen-BN folding)

    def _init_heads(self) -> None:
        c = self.config
        bias = -math.log((1 - c.focal_prior_prob) / c.focal_prior_prob)
        nn.init.constant_(self.class_embed.bias, bias)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        if c.random_refpoints_xy and self.refpoint_embed is not None:
            with torch.no_grad():
                w = self.refpoint_embed().clone()
                w[:, :2] = inverse_sigmoid(torch.rand(w.shape[0], 2), c.inverse_sigmoid_eps)
                self.refpoint_embed.set_weight(w)

    @property
    def backend(self) -> Optional[str]:
        return self.config.backend

    def set_backend(self, backend: Optional[str]) -> None:
        """Switch every fused op of this model to ``backend`` (None = automatic)."""
        self.config = self.config.replace(backend=backend)
        for m in self.modules():
            if hasattr(m, "backend") and not isinstance(m, DABDETR):
                m.backend = backend

    def forward(self, images: Union[Tensor, Sequence[Tensor]], mask: Optional[Tensor] = None,
                intermediates: Optional[Dict[str, Any]] = None,
                targets: Optional[Sequence[Dict[str, Tensor]]] = None) -> Dict[str, Any]:
        """``images [B,3,H,W]`` + ``mask [B,H,W]`` (True = padding; None = no padding), or a list of
        ``[3,H_i,W_i]`` images.

        ``targets`` (training with ``config.dn_groups > 0`` only; ignored otherwise): the batch's
        targets, from which the query-denoising groups are built; their predictions are returned
        under ``"dn"`` (``{"layers": [{"pred_logits", "pred_boxes"} per decoder layer], "valid",
        "target_index", "groups"}``) for the criterion. The matching queries' outputs do not depend
        on them (the self-attention mask hides the denoising queries).

        ``intermediates``: a dict filled (batch-first) with ``backbone_feat, feat_mask, pos_embed,
        src_proj`` ``[B,C,h,w]``; ``enc_pos_scales, enc_layer_out [Le,B,HW,d]``, ``memory [B,HW,d]``;
        per decoder layer (stacked ``[L,B,...]``): ``dec_query_sine_embed_raw, dec_query_pos,
        dec_ref_anchor_head_out, dec_query_sine_embed, dec_layer_in, dec_self_attn_out, dec_ca_q_content,
        dec_ca_q_pos, dec_ca_k_content, dec_ca_k_pos, dec_ca_v, dec_ca_key_padding_mask,
        dec_ca_out_before_proj, dec_cross_attn_weights, dec_cross_attn_out, dec_layer_out,
        dec_bbox_embed_in_loop_out``, ``dec_query_scale_out [L-1,...]``; ``hs, references,
        head_bbox_embed_out [L,B,Q,.]``.
        """
        if not isinstance(images, Tensor):
            images, mask = nested_pad(list(images))
        if images.dim() != 4:
            raise ValueError(f"images must be [B,3,H,W] or a list of [3,H,W], got shape {tuple(images.shape)}")
        if mask is None:
            mask = torch.zeros(images.shape[0], images.shape[2], images.shape[3], dtype=torch.bool,
                               device=images.device)
        rec: Optional[Dict[str, list]] = {} if intermediates is not None else None
        feat, mask_f, pos = self.backbone(images, mask)
        src = self.input_proj(feat)
        dn = None
        if self.label_enc is not None and self.training and targets is not None:
            c = self.config
            dn = make_denoising_queries(targets, self.num_queries * max(1, c.num_patterns), self.label_enc,
                                        c.dn_groups, c.dn_label_noise, c.dn_box_noise, c.inverse_sigmoid_eps)
        want_aux = self.enc_aux_head is not None and self.training
        selected: Dict[str, Tensor] = {}
        if self.refpoint_embed is None:
            def anchors(memory: Tensor) -> Tensor:
                selected.update(self.enc_aux_head(memory, src.shape[-2:]))
                return select_anchors(selected["heatmap_logits"], selected["boxes"], mask_f, self.num_queries,
                                      self.config.inverse_sigmoid_eps)
        else:
            anchors = self.refpoint_embed()
        res = self.transformer(src, mask_f, anchors, pos, self.bbox_embed, rec, dn,
                               return_memory=want_aux and self.refpoint_embed is not None)
        hs, references = res[0], res[1]
        head_delta = at_least_float32(self.bbox_embed(hs))
        boxes = (head_delta + inverse_sigmoid(references, self.config.inverse_sigmoid_eps)).sigmoid()
        logits = self.class_embed(hs)
        dn_out = None
        if dn is not None:
            n = dn.num_queries
            dn_out = {"layers": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:, :, :n], boxes[:, :, :n])],
                      "valid": dn.valid, "target_index": dn.target_index, "groups": dn.groups}
            logits, boxes, hs, references = logits[:, :, n:], boxes[:, :, n:], hs[:, :, n:], references[:, :, n:]
        elif self.label_enc is not None and self.training:
            # no box in the batch: keep the embedding in the graph (DDP expects a gradient for it)
            logits = logits + 0.0 * self.label_enc.weight.sum()
        out: Dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if dn_out is not None:
            out["dn"] = dn_out
        if want_aux:
            aux = dict(selected) if selected else self.enc_aux_head(res[2], src.shape[-2:])
            aux["mask"] = mask_f
            out["enc_aux"] = aux
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if intermediates is not None:
            intermediates.update(backbone_feat=feat.detach(), feat_mask=mask_f, pos_embed=pos.detach(),
                                 src_proj=src.detach())
            for k, v in rec.items():
                intermediates[k] = v[0] if k == "memory" else torch.stack(v)
            intermediates.update(hs=hs.detach(), references=references.detach(),
                                 head_bbox_embed_out=head_delta.detach())
        return out

    def postprocess(self, outputs: Dict[str, Tensor], target_sizes, num_select: Optional[int] = None):
        """See :func:`postprocess`; ``num_select`` defaults to ``config.num_select`` (300)."""
        return postprocess(outputs, target_sizes, self.config.num_select if num_select is None else num_select)

    def build_criterion(self):
        """The set criterion (matcher + losses) configured from this model's config."""
        from .criterion import build_criterion

        return build_criterion(self.config)

    def param_groups(self, lr: float, lr_backbone: float, weight_decay: float) -> List[Dict[str, Any]]:
        """AdamW parameter groups of the original (backbone parameters get ``lr_backbone``)."""
        bb = [p for n, p in self.named_parameters() if n.startswith("backbone.") and p.requires_grad]
        rest = [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        return [{"params": rest, "lr": lr, "weight_decay": weight_decay},
                {"params": bb, "lr": lr_backbone, "weight_decay": weight_decay}]
