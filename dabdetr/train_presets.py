"""Training configurations: a model preset (:mod:`dabdetr.models.presets`) plus the data,
augmentation and trainer settings, with ``key=value`` overrides.

``TrainConfig`` fields that are not model fields: the recipe (lr, lr_backbone, weight_decay,
epochs, lr_drop, clip_max_norm, batch_size = global batch, optimizer), ``accum_steps``, ``amp``,
``seed``, ``workers``, the augmentation sizes, the synthetic-data sizes, checkpointing and
evaluation periods. ``model`` holds overrides of the preset's :class:`DABDETRConfig`.

``TRAIN_PRESETS["demo"]`` is the embedded demo: the ``tiny`` model on the synthetic shapes, tuned
to learn on a 2-core CPU within the README's time budget. Every model preset name is also a
training preset (its paper recipe, full-size augmentation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["TrainConfig", "TRAIN_PRESETS", "get_train_config", "apply_overrides", "parse_value"]


@dataclass
class TrainConfig:
    preset: str = "r50"  # model preset
    model: Dict[str, Any] = field(default_factory=dict)  # DABDETRConfig overrides
    # recipe
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    epochs: int = 50
    lr_drop: int = 40
    lr_gamma: float = 0.1
    # "step": the original's StepLR (x lr_gamma every lr_drop epochs); "cosine": half a cosine from lr
    # to lr * lr_min_ratio over the epochs; both stepped per optimizer step, after warmup_iters of
    # linear warm-up
    lr_schedule: str = "step"
    lr_min_ratio: float = 0.0
    warmup_iters: int = 0
    # > 0: a training time budget in minutes: after each epoch the number of epochs (at most
    # `epochs`) is lowered so that the rest fits, from the mean epoch time so far (lr_drop and the
    # cosine scale with it); the plan is saved in the checkpoint, so resume keeps it
    time_budget_min: float = 0.0
    channels_last: bool = False  # channels-last model and images (faster convolutions with oneDNN)
    clip_max_norm: float = 0.1
    batch_size: int = 16  # global (all processes, before accumulation)
    optimizer: str = "adamw"
    accum_steps: int = 1
    amp: str = "none"  # none | bf16 | fp16
    seed: int = 42
    workers: int = 2
    # batches of similar image shapes (EpochSampler): sort pools of this many global batches by
    # the images' planned shapes, then shuffle the batches (0: off, the original's plain batches)
    group_batches: int = 0
    threads: int = 0  # torch threads (0: torch's default)
    # CPU training: glibc keeps freed memory for reuse instead of returning it to the kernel
    # (dabdetr.cpu_memory.retain_freed_memory: ~13-40% off an R50 train step on the 2-core VMs,
    # where page faults are slow), at the cost of holding the peak heap
    cpu_retain_memory: bool = True
    # augmentation: the original recipe with every size times aug_scale
    aug_scale: float = 1.0
    train_scales: Optional[List[int]] = None  # short sides before scaling (default 480..800 step 32)
    crop_prob: float = 0.5  # probability of the resize-crop-resize branch (original: 0.5)
    flip: bool = True
    val_size: int = 800
    max_size: int = 1333
    # synthetic data (used when no dataset is given)
    synthetic_train: int = 1000
    synthetic_val: int = 120
    synthetic_train_seed: int = 0
    synthetic_val_seed: int = 1
    # bookkeeping
    checkpoint_every: int = 0  # also checkpoint every N iterations (0: only at epoch ends)
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    log_every: int = 20
    eval_batch_size: int = 8

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _demo() -> TrainConfig:
    # The tiny model made cheap and quick to train from scratch on a 2-core CPU (see the README's
    # "Training from scratch"): a half-width ResNet-18 up to layer3 (stride 16), 20 queries, and
    # three training aids: query denoising (5 groups), the dense auxiliary loss on the encoder and
    # query selection from it (dabdetr.models.denoising / dense_aux). Rates 3e-4 (1e-3 for the
    # from-scratch backbone), the step schedule (x0.1 for the last ~15% of the epochs), batch 4
    # (at the same wall time, batch 8 gave fewer, not better, updates). The number of epochs fits a
    # 15-minute training budget (at most 40; 16 at ~55 s per epoch of 800 images on a 2-core AVX2
    # EPYC), so the main command stays under 20 minutes with setup on slower machines too.
    return TrainConfig(
        preset="tiny",
        model=dict(num_queries=20, num_select=100, backbone_width=32, backbone_stages=3, dilation=False, dn_groups=5,
                   enc_aux_coef=1.0, query_selection=True),
        lr=3e-4, lr_backbone=1e-3, weight_decay=1e-4, epochs=40, lr_drop=34, clip_max_norm=0.1, batch_size=4,
        lr_schedule="step", warmup_iters=50, time_budget_min=15.0, channels_last=True,
        aug_scale=0.2, crop_prob=0.0, val_size=800, max_size=1333, workers=0, group_batches=1000,
        synthetic_train=800, synthetic_val=120, eval_every=100, checkpoint_every=0, log_every=20,
    )


def _from_model_preset(name: str) -> TrainConfig:
    from .models.presets import get_preset

    r = get_preset(name).recipe
    return TrainConfig(preset=name, lr=r.lr, lr_backbone=r.lr_backbone, weight_decay=r.weight_decay, epochs=r.epochs,
                       lr_drop=r.lr_drop, clip_max_norm=r.clip_max_norm, batch_size=r.batch_size, optimizer=r.optimizer)


TRAIN_PRESETS = {"demo": _demo}


def get_train_config(name: str) -> TrainConfig:
    if name in TRAIN_PRESETS:
        return TRAIN_PRESETS[name]()
    from .models.presets import PRESETS

    if name in PRESETS:
        cfg = _from_model_preset(name)
        if name == "tiny":  # the tiny model on the demo's data settings
            demo = _demo()
            cfg = demo.replace(model={})
        return cfg
    raise KeyError(f"unknown preset {name!r}; training presets: {sorted(TRAIN_PRESETS)}, model presets: "
                   f"{sorted(PRESETS)}")


def parse_value(text: str) -> Any:
    """``"2e-4"`` → 2e-4, ``"true"`` → True, ``"none"`` → None, ``"[1,2]"`` → [1, 2], else the string."""
    import json

    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "," in text:
        return [parse_value(t) for t in text.split(",")]
    return text


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply ``key=value`` strings: a TrainConfig field, or a model field (``hidden_dim=64`` or
    ``model.hidden_dim=64``)."""
    from .models.presets import DABDETRConfig

    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)} 
    model_fields = {f.name for f in dataclasses.fields(DABDETRConfig)}
    changes: Dict[str, Any] = {}
    model = dict(cfg.model)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        value = parse_value(raw)
        if key.startswith("model."):
            key = key[len("model."):]
            if key not in model_fields:
                raise ValueError(f"unknown model field {key!r}")
            model[key] = value
        elif key in train_fields and key != "model":
            ftype = train_fields[key].type
            if ftype in ("float",) and isinstance(value, int):
                value = float(value)
            changes[key] = value
        elif key in model_fields:
            model[key] = value
        else:
            raise ValueError(f"unknown setting {key!r}: not a training field ({sorted(train_fields)}) nor a model "
                             f"field ({sorted(model_fields)})")
    if "backbone_trainable_layers" in model and isinstance(model["backbone_trainable_layers"], list):
        model["backbone_trainable_layers"] = tuple(model["backbone_trainable_layers"])
    return cfg.replace(model=model, **changes)
