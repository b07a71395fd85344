"""DAB-DETR model, set-prediction loss, presets and checkpoint loading.

Public names: :class:`DABDETR`, :func:`load_original_checkpoint`, :func:`load_hf_checkpoint`,
:func:`load_checkpoint`, :func:`convert_checkpoint`, :class:`DABDETRConfig`, :func:`get_config`,
:class:`HungarianMatcher`, :class:`SetCriterion`, :func:`build_criterion`, :func:`postprocess`.
"""

from .backbone import Backbone, FrozenBatchNorm2d, Joiner, ResNet, resnet
from .checkpoint import (
    CheckpointError,
    convert_checkpoint,
    load_checkpoint,
    load_hf_checkpoint,
    load_original_checkpoint,
    save_checkpoint,
)
from .criterion import SetCriterion, build_criterion, sigmoid_focal_loss
from .dab_detr import DABDETR, AnchorEmbedding, nested_pad, postprocess
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSineHW
from .presets import PRESETS, DABDETRConfig, TrainRecipe, get_config, get_preset, get_recipe

__all__ = [
    "DABDETR", "DABDETRConfig", "TrainRecipe", "PRESETS", "get_config", "get_preset", "get_recipe",
    "load_original_checkpoint", "load_hf_checkpoint", "load_checkpoint", "save_checkpoint", "convert_checkpoint",
    "CheckpointError", "HungarianMatcher", "SetCriterion", "build_criterion", "sigmoid_focal_loss", "postprocess",
    "nested_pad", "AnchorEmbedding", "Backbone", "Joiner", "ResNet", "resnet", "FrozenBatchNorm2d",
    "PositionEmbeddingSineHW",
]
