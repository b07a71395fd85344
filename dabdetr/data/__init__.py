"""Data: COCO-format datasets, the DETR augmentations, batching, and the synthetic shapes set."""

from .coco import CocoDetection, DataError, EpochSampler, build_loader, collate_fn, load_coco_json
from .synthetic import CATEGORIES, ShapesConfig, ensure_shapes_dataset, generate_shapes
from .transforms import detr_train_transforms, detr_val_transforms

__all__ = ["CocoDetection", "DataError", "EpochSampler", "build_loader", "collate_fn", "load_coco_json",
           "CATEGORIES", "ShapesConfig", "ensure_shapes_dataset", "generate_shapes", "detr_train_transforms",
           "detr_val_transforms"]
