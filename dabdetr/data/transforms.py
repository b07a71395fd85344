"""Detection transforms on ``(PIL image, target)`` pairs (no torchvision), with explicit randomness.

Every transform is called as ``t(image, target, rng)`` where ``rng`` is a :class:`random.Random`;
the dataset seeds it from ``(seed, epoch, index)`` so augmentations are reproducible whatever the
number of DataLoader workers or a resume mid-epoch. ``target["boxes"]`` is ``[n, 4]`` float32 xyxy
in pixels until :class:`Normalize`, which turns the image into a normalised tensor and the boxes
into ``cx, cy, w, h`` relative to the image size (REFERENCE.md §9).

The original recipe (:func:`detr_train_transforms` with the defaults): horizontal flip (0.5), then
with probability 0.5 either a random resize of the short side to one of 480..800 (step 32, long
side ≤ 1333) or a resize to 400/500/600, a random crop with sides in [384, 600] and the same
random resize. Val: resize to 800 (≤ 1333). ``scale`` multiplies every size (the synthetic demo
uses small images).
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["Compose", "RandomHorizontalFlip", "RandomResize", "RandomSizeCrop", "RandomSelect", "Normalize",
           "resize", "crop", "detr_train_transforms", "detr_val_transforms", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Target = Dict[str, Tensor]


def _image_size(image) -> Tuple[int, int]:
    """(width, height)"""
    return image.size


def crop(image: Image.Image, target: Target, region: Tuple[int, int, int, int]) -> Tuple[Image.Image, Target]:
    """Crop ``region = (top, left, height, width)``; boxes are clipped and those left with no area
    removed (with their labels and other per-box fields)."""
    top, left, h, w = region
    image = image.crop((left, top, left + w, top + h))
    target = dict(target)
    target["size"] = torch.tensor([h, w])
    if "boxes" in target and len(target["boxes"]):
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        boxes = torch.minimum(boxes.reshape(-1, 2, 2), torch.tensor([w, h], dtype=torch.float32)).clamp(min=0)
        area = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
        keep = torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)
        n = len(target["boxes"])
        target["boxes"] = boxes.reshape(-1, 4)
        target["area"] = area
        for k in list(target):
            v = target[k]
            if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n and k not in ("size", "orig_size"):
                target[k] = v[keep]
    return image, target


def hflip(image: Image.Image, target: Target) -> Tuple[Image.Image, Target]:
    w, _ = _image_size(image)
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
    target = dict(target)
    if "boxes" in target and len(target["boxes"]):
        b = target["boxes"]
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    return image, target


def _output_size(size_wh: Tuple[int, int], short: int, max_size: Optional[int]) -> Tuple[int, int]:
    """(h, w) with the short side ``short`` unless the long side would exceed ``max_size``."""
    w, h = size_wh
    if max_size is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        if hi / lo * short > max_size:
            short = int(round(max_size * lo / hi))
    if (w <= h and w == short) or (h <= w and h == short):
        return h, w
    if w < h:
        return int(short * h / w), short
    return short, int(short * w / h)


def resize(image: Image.Image, target: Target, short: int, max_size: Optional[int] = None
           ) -> Tuple[Image.Image, Target]:
    h, w = _output_size(_image_size(image), short, max_size)
    ow, oh = _image_size(image)
    image = image.resize((w, h), Image.BILINEAR)
    rw, rh = w / ow, h / oh
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([rw, rh, rw, rh], dtype=torch.float32)
    if "area" in target:
        target["area"] = target["area"] * (rw * rh)
    target["size"] = torch.tensor([h, w])
    return image, target


class Compose:
    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng: random.Random):
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target

    def plan(self, size_wh: Tuple[int, int], rng: random.Random) -> Optional[Tuple[int, int]]:
        """The ``(width, height)`` this pipeline gives an image of ``size_wh`` with this ``rng``,
        without touching pixels (the same random draws as a call); None when a transform cannot
        tell."""
        for t in self.transforms:
            if not hasattr(t, "plan"):
                return None
            size_wh = t.plan(size_wh, rng)
            if size_wh is None:
                return None
        return size_wh

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target, rng):
        if rng.random() < self.p:
            return hflip(image, target)
        return image, target

    def plan(self, size_wh, rng):
        rng.random()
        return size_wh

    def __repr__(self):
        return f"RandomHorizontalFlip({self.p})"


class RandomResize:
    """Resize the short side to a size drawn from ``sizes`` (long side ≤ ``max_size``)."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image, target, rng):
        return resize(image, target, rng.choice(self.sizes), self.max_size)

    def plan(self, size_wh, rng):
        h, w = _output_size(size_wh, rng.choice(self.sizes), self.max_size)
        return w, h

    def __repr__(self):
        return f"RandomResize({self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """A random crop with width in ``[min_size, min(W, max_size)]`` and height likewise."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def _draw(self, W: int, H: int, rng) -> Tuple[int, int, int, int]:
        """``(top, left, h, w)``: the random draws of one call (shared by ``__call__`` and ``plan``)."""
        w = rng.randint(min(self.min_size, W), min(W, self.max_size))
        h = rng.randint(min(self.min_size, H), min(H, self.max_size))
        top = rng.randint(0, H - h)
        left = rng.randint(0, W - w)
        return top, left, h, w

    def __call__(self, image, target, rng):
        return crop(image, target, self._draw(*_image_size(image), rng))

    def plan(self, size_wh, rng):
        _, _, h, w = self._draw(*size_wh, rng)
        return w, h

    def __repr__(self):
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


class RandomSelect:
    """``t1`` with probability ``p``, else ``t2``."""

    def __init__(self, t1, t2, p: float = 0.5):
        self.t1, self.t2, self.p = t1, t2, p

    def __call__(self, image, target, rng):
        return self.t1(image, target, rng) if rng.random() < self.p else self.t2(image, target, rng)

    def plan(self, size_wh, rng):
        t = self.t1 if rng.random() < self.p else self.t2
        return t.plan(size_wh, rng) if hasattr(t, "plan") else None

    def __repr__(self):
        return f"RandomSelect({self.t1!r}, {self.t2!r}, p={self.p})"


class Normalize:
    """PIL → float tensor ``[3,H,W]`` normalised by mean/std; boxes → normalised cxcywh."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def plan(self, size_wh, rng=None):
        return size_wh

    def __call__(self, image, target, rng=None):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        x = (x - self.mean) / self.std
        h, w = x.shape[-2:]
        target = dict(target)
        if "boxes" in target:
            b = target["boxes"]
            if len(b):
                cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                                      b[:, 3] - b[:, 1]], dim=1)
                target["boxes"] = cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)
            else:
                target["boxes"] = b.reshape(0, 4)
        return x, target

    def __repr__(self):
        return "Normalize()"


def _scaled(values: Sequence[int], scale: float) -> List[int]:
    return sorted({max(8, int(round(v * scale))) for v in values})


def detr_train_transforms(scale: float = 1.0, flip: bool = True, max_size: int = 1333,
                          scales: Optional[Sequence[int]] = None, crop_resize: Sequence[int] = (400, 500, 600),
                          crop_range: Tuple[int, int] = (384, 600), crop_prob: float = 0.5) -> Compose:
    """The original training augmentation (REFERENCE.md §9), every size multiplied by ``scale``."""
    scales = list(scales) if scales is not None else list(range(480, 801, 32))
    scales, ms = _scaled(scales, scale), int(round(max_size * scale))
    pre = _scaled(crop_resize, scale)
    lo, hi = int(round(crop_range[0] * scale)), int(round(crop_range[1] * scale))
    ts = [RandomHorizontalFlip(0.5)] if flip else []
    ts.append(RandomSelect(RandomResize(scales, ms),
                           Compose([RandomResize(pre), RandomSizeCrop(lo, hi), RandomResize(scales, ms)]),
                           p=1.0 - crop_prob))
    ts.append(Normalize())
    return Compose(ts)


def detr_val_transforms(scale: float = 1.0, size: int = 800, max_size: int = 1333) -> Compose:
    return Compose([RandomResize([int(round(size * scale))], int(round(max_size * scale))), Normalize()])
