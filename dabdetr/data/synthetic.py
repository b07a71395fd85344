"""A synthetic shapes detection dataset written in real COCO format (PNG images + JSON).

``generate_shapes(root, num_images, seed, split)`` writes ``root/<split>/000000.png ...`` and
``root/annotations/<split>.json``; the same ``(num_images, seed, options)`` always gives the same
files. ``ensure_shapes_dataset(root)`` writes the default train and val splits once (a
``manifest.json`` records how they were made, and a different request regenerates them).

Each image (160-320 px per side, varied aspect ratios) has a noisy or textured background and 1-6
filled shapes of three classes (category ids 1 circle, 2 rectangle, 3 triangle; logit indices
0..3, ``num_classes = 4``), sides from 5% to 50% of the image's short side, random colours (a
quarter of them low-contrast against the local background), overlaps allowed but no object more
than half hidden. Boxes are tight ``[x, y, w, h]`` in pixels.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["ShapesConfig", "CATEGORIES", "generate_shapes", "ensure_shapes_dataset", "render_image"]

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]


@dataclass
class ShapesConfig:
    min_side: int = 160  # image side range (each side drawn independently: varied aspect ratios)
    max_side: int = 320
    min_objects: int = 1
    max_objects: int = 6
    min_rel_size: float = 0.05  # object side / image short side
    max_rel_size: float = 0.50
    low_contrast_prob: float = 0.25
    max_hidden: float = 0.5  # an object's box may be covered by later objects up to this fraction


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    base = rng.uniform(30, 225, size=3)
    kind = rng.integers(0, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # plain + gaussian noise
        img = np.broadcast_to(base, (h, w, 3)).astype(np.float32).copy()
    elif kind == 1:  # linear gradient
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction) + 1e-6
        ramp = (xx * direction[0] + yy * direction[1]) / max(w, h)
        delta = rng.uniform(-60, 60, size=3)
        img = base + ramp[..., None] * delta
    else:  # stripes / waves texture
        period = rng.uniform(6, 30)
        angle = rng.uniform(0, np.pi)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        amp = rng.uniform(10, 35)
        img = base + wave[..., None] * amp
    img = img + rng.normal(0, rng.uniform(3, 18), size=(h, w, 3))
    return img


def _colour(rng: np.random.Generator, local_bg: np.ndarray, low_contrast: bool) -> Tuple[int, int, int]:
    if low_contrast:
        for _ in range(20):
            delta = rng.normal(size=3)
            delta *= rng.uniform(35, 60) / (np.linalg.norm(delta) + 1e-6)
            c = local_bg + delta
            if np.all((c >= 0) & (c <= 255)):
                return tuple(int(v) for v in c)
        return tuple(int(v) for v in np.clip(local_bg + 50 * np.sign(128 - local_bg), 0, 255))
    for _ in range(50):
        c = rng.uniform(0, 255, size=3)
        if np.linalg.norm(c - local_bg) > 90:
            break
    return tuple(int(v) for v in c)


def _overlap(a: List[float], b: List[float]) -> float:
    """Area of the intersection of xywh boxes a and b."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def render_image(rng: np.random.Generator, cfg: ShapesConfig) -> Tuple[Image.Image, List[Dict]]:
    """One image and its objects (``category_id``, ``bbox`` xywh)."""
    w = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    h = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    bg = _background(rng, w, h)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    short = min(w, h)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects: List[Dict] = []
    for _ in range(n):
        for _attempt in range(30):
            cat = int(rng.integers(1, 4))
            bw = rng.uniform(cfg.min_rel_size, cfg.max_rel_size) * short
            aspect = rng.uniform(0.6, 1.6) if cat != 1 else rng.uniform(0.75, 1.33)
            bh = float(np.clip(bw * aspect, cfg.min_rel_size * short, cfg.max_rel_size * short))
            bw, bh = max(4.0, round(bw)), max(4.0, round(bh))
            x0 = float(rng.integers(0, int(w - bw) + 1))
            y0 = float(rng.integers(0, int(h - bh) + 1))
            box = [x0, y0, bw, bh]
            if all(_overlap(o["bbox"], box) <= cfg.max_hidden * o["bbox"][2] * o["bbox"][3] for o in objects):
                break
        else:
            continue
        cx, cy = int(x0 + bw / 2), int(y0 + bh / 2)
        local = bg[min(cy, h - 1), min(cx, w - 1)]
        colour = _colour(rng, local, rng.random() < cfg.low_contrast_prob)
        x1, y1 = x0 + bw - 1, y0 + bh - 1
        if cat == 1:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif cat == 2:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            apex = x0 + rng.uniform(0, 1) * (bw - 1)
            if rng.random() < 0.5:  # apex up
                pts = [(apex, y0), (x0, y1), (x1, y1)]
            else:
                pts = [(apex, y1), (x0, y0), (x1, y0)]
            draw.polygon(pts, fill=colour)
        objects.append({"category_id": cat, "bbox": box})
    return img, objects


def generate_shapes(root: str, num_images: int, seed: int, split: str = "train",
                    config: Optional[ShapesConfig] = None) -> str:
    """Write ``num_images`` images to ``root/split/`` and their COCO JSON to
    ``root/annotations/split.json`` (returned). Deterministic in ``(num_images, seed, config)``."""
    cfg = config or ShapesConfig()
    img_dir = os.path.join(root, split)
    ann_dir = os.path.join(root, "annotations")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        img, objects = render_image(rng, cfg)
        name = f"{i:06d}.png"
        img.save(os.path.join(img_dir, name), optimize=False)
        images.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
        for o in objects:
            x, y, bw, bh = o["bbox"]
            annotations.append({"id": ann_id, "image_id": i + 1, "category_id": o["category_id"],
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
            ann_id += 1
    data = {"info": {"description": f"dabdetr synthetic shapes, split {split}, seed {seed}"},
            "images": images, "annotations": annotations, "categories": CATEGORIES}
    path = os.path.join(ann_dir, f"{split}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    return path


def ensure_shapes_dataset(root: str, num_train: int = 1000, num_val: int = 120, train_seed: int = 0,
                          val_seed: int = 1, config: Optional[ShapesConfig] = None,
                          log=print) -> Dict[str, str]:
    """Generate the train/val splits under ``root`` unless the same ones are already there.
    Returns ``{"train_images", "train_ann", "val_images", "val_ann"}`` paths."""
    cfg = config or ShapesConfig()
    manifest = {"version": 1, "num_train": num_train, "num_val": num_val, "train_seed": train_seed,
                "val_seed": val_seed, "config": asdict(cfg)}
    mpath = os.path.join(root, "manifest.json")
    paths = {"train_images": os.path.join(root, "train"), "train_ann": os.path.join(root, "annotations", "train.json"),
             "val_images": os.path.join(root, "val"), "val_ann": os.path.join(root, "annotations", "val.json")}
    try:
        with open(mpath) as f:
            same = json.load(f) == manifest
    except (OSError, ValueError):
        same = False
    if same and all(os.path.exists(p) for p in paths.values()):
        return paths
    if log:
        log(f"generating the synthetic shapes dataset in {root} ({num_train} train images, seed {train_seed}; "
            f"{num_val} val images, seed {val_seed})")
    generate_shapes(root, num_train, train_seed, "train", cfg)
    generate_shapes(root, num_val, val_seed, "val", cfg)
    with open(mpath, "w") as f:
        json.dump(manifest, f, indent=1)
    return paths
