"""Model configuration (:class:`DABDETRConfig`), training recipe (:class:`TrainRecipe`) and the
paper's variants as presets.

``get_config("r50")`` → :class:`DABDETRConfig`; ``get_recipe("r50")`` → :class:`TrainRecipe`;
``PRESETS`` lists the names. Defaults equal the original repository's defaults
(REFERENCE.md §9) with the README's 50-epoch recipe.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

__all__ = ["DABDETRConfig", "TrainRecipe", "Preset", "PRESETS", "get_config", "get_recipe", "get_preset"]


@dataclass
class DABDETRConfig:
    """Architecture, loss and matcher settings of :class:`dabdetr.models.DABDETR`."""

    # backbone
    backbone: str = "resnet50"
    dilation: bool = False  # DC5
    train_backbone: bool = True  # the original's lr_backbone > 0
    backbone_trainable_layers: Tuple[str, ...] = ("layer2", "layer3", "layer4")
    backbone_norm: str = "frozen"  # "frozen" (original) or "batch" (training from scratch)
    frozen_bn_eps: float = 1e-5
    backbone_width: int = 64  # ResNet stem width (64: torchvision's; smaller for the tiny preset)
    backbone_stages: int = 4  # 3: the ResNet up to layer3 (output stride 16, no layer4; a cheap CPU backbone)
    # fused backends on the CPU, the backbone's 3x3 stride-1 convolutions (ResNet.cpu_winograd):
    # "f2" Winograd F(2,3) from 128 channels (faster, float32 error below the direct convolution's),
    # "f4" F(4,3) from 64 channels (faster still, ~4-8x the direct float32 error), "off" direct;
    # a bool is read as True = "f4", False = "off"
    backbone_winograd: Union[bool, str] = "f2"
    # position encodings
    pe_temperature_h: float = 20.0
    pe_temperature_w: float = 20.0
    query_temperature: float = 10000.0  # anchor sine embedding (hard-coded in the original)
    # transformer
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    activation: str = "prelu"
    # queries / anchors
    num_queries: int = 300
    num_patterns: int = 0
    random_refpoints_xy: bool = False
    freeze_anchor_xy: bool = False  # a real freeze (the original's is a no-op)
    inverse_sigmoid_eps: float = 1e-3  # 1e-5 for HuggingFace weights
    # heads
    num_classes: int = 91  # COCO category ids used as logit indices (max id + 1)
    focal_prior_prob: float = 0.01
    aux_loss: bool = True
    num_select: int = 300
    # matcher / loss
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # query denoising (DN-DETR), a training-only aid: 0 = off (the original DAB-DETR); see
    # dabdetr.models.denoising. Adds the ``label_enc`` embedding to the model.
    dn_groups: int = 0
    dn_label_noise: float = 0.2
    dn_box_noise: float = 0.4
    # dense auxiliary (CenterNet-like) loss on the encoder output, a training-only aid for training
    # from scratch: 0 = off (the original); see dabdetr.models.dense_aux.
    enc_aux_coef: float = 0.0
    # training-from-scratch aid (needs enc_aux_coef > 0; changes inference too): each image's decoder
    # anchors are the boxes of the dense auxiliary head at its num_queries highest-scoring cells
    # (query selection, as DINO's two-stage anchors) instead of the learned anchors
    query_selection: bool = False
    # fused-op backend for every dabdetr.ops call (None: automatic; "torch": eager reference)
    backend: Optional[str] = None

    def replace(self, **changes: Any) -> "DABDETRConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown DABDETRConfig fields: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backbone_trainable_layers"] = list(self.backbone_trainable_layers)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DABDETRConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown DABDETRConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "backbone_trainable_layers" in d:
            d["backbone_trainable_layers"] = tuple(d["backbone_trainable_layers"])
        return cls(**d)


@dataclass
class TrainRecipe:
    """The paper's recipe (README: 8 GPUs x 2 images, 50 epochs, lr drop at 40)."""

    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    epochs: int = 50
    lr_drop: int = 40
    clip_max_norm: float = 0.1
    batch_size: int = 16  # total over all processes
    optimizer: str = "adamw"


@dataclass
class Preset:
    model: DABDETRConfig = field(default_factory=DABDETRConfig)
    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    description: str = ""


def _p(desc: str, recipe: Optional[TrainRecipe] = None, **model: Any) -> Preset:
    return Preset(DABDETRConfig(**model), recipe or TrainRecipe(), desc)


PRESETS: Dict[str, Preset] = {
    "r50": _p("DAB-DETR-R50 (42.2 AP, 94 GFLOPs, 44M)"),
    "r50_3pat": _p("DAB-DETR-R50, 3 patterns (42.6 AP)", num_patterns=3),
    "r50_dc5": _p("DAB-DETR-R50-DC5 (44.5 AP)", dilation=True),
    "r50_dc5_3pat": _p("DAB-DETR-R50-DC5, 3 patterns (45.7 AP)", dilation=True, num_patterns=3),
    "r50_dc5_fixxy": _p("DAB-DETR-R50-DC5 with random, frozen anchor x,y (44.7 AP)", dilation=True,
                        random_refpoints_xy=True, freeze_anchor_xy=True),
    "r101": _p("DAB-DETR-R101 (43.5 AP)", backbone="resnet101"),
    "r101_3pat": _p("DAB-DETR-R101, 3 patterns (44.1 AP)", backbone="resnet101", num_patterns=3),
    "r101_dc5": _p("DAB-DETR-R101-DC5 (45.8 AP)", backbone="resnet101", dilation=True),
    "r101_dc5_3pat": _p("DAB-DETR-R101-DC5, 3 patterns (46.6 AP)", backbone="resnet101", dilation=True,
                        num_patterns=3),
    # Small enough to learn on a CPU in minutes (no pretrained weights: the whole backbone trains, with
    # ordinary batch norm). num_classes is usually set from the dataset.
    "tiny": _p("ResNet-18, d=128, 2+3 layers, 50 queries: trains from scratch on a CPU",
               TrainRecipe(lr=2e-4, lr_backbone=2e-4, weight_decay=1e-4, epochs=20, lr_drop=15, clip_max_norm=0.1,
                           batch_size=8),
               backbone="resnet18", backbone_norm="batch",
               backbone_trainable_layers=("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"),
               hidden_dim=128, nheads=8, enc_layers=2, dec_layers=3, dim_feedforward=512, num_queries=50,
               num_select=100),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def get_config(name: str, **overrides: Any) -> DABDETRConfig:
    """The model config of preset ``name`` with ``overrides`` applied."""
    return get_preset(name).model.replace(**overrides)


def get_recipe(name: str) -> TrainRecipe:
    return dataclasses.replace(get_preset(name).recipe)
