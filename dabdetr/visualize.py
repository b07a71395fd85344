"""Pictures of predictions and of DAB-DETR's cross-attention (PIL only, no matplotlib).

* :func:`draw_detections`: the image with boxes, class names and scores.
* :func:`attention_maps`: for chosen queries of the last decoder layer, the head-averaged
  cross-attention over the image — the positional part alone (``softmax(q_pos·k_pos·s)``, the
  modulated Gaussian-like prior of the anchor box) and the full map (content + position), as in the
  paper's figures. Built from the model's ``intermediates`` (``dec_ca_q_pos``, ``dec_ca_k_pos``,
  ``dec_cross_attn_weights``, ``feat_mask``).
* :func:`attention_figure`: image with the query's box | positional map | full map, side by side.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["PALETTE", "draw_detections", "attention_maps", "heatmap", "attention_figure"]

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_detections(image: Image.Image, boxes, labels, scores=None, names: Optional[Dict[int, str]] = None,
                    threshold: float = 0.0, width: int = 2) -> Image.Image:
    """A copy of ``image`` with xyxy pixel ``boxes``, ``labels`` (category ids) and ``scores``
    (those below ``threshold`` omitted)."""
    img = image.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    font = _font()
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).tolist()
    labels = torch.as_tensor(labels).reshape(-1).tolist()
    scores = torch.as_tensor(scores).reshape(-1).tolist() if scores is not None else [None] * len(boxes)
    for b, l, s in sorted(zip(boxes, labels, scores), key=lambda t: -(t[2] or 0))[::-1]:
        if s is not None and s < threshold:
            continue
        colour = PALETTE[int(l) % len(PALETTE)]
        draw.rectangle(b, outline=colour, width=width)
        text = (names or {}).get(int(l), str(int(l))) + (f" {s:.2f}" if s is not None else "")
        tb = draw.textbbox((b[0], b[1]), text, font=font)
        th = tb[3] - tb[1]
        y = b[1] - th - 2 if b[1] - th - 2 >= 0 else b[1]
        tb = draw.textbbox((b[0], y), text, font=font)
        draw.rectangle([tb[0] - 1, tb[1] - 1, tb[2] + 1, tb[3] + 1], fill=colour)
        draw.text((b[0], y), text, fill=(0, 0, 0) if sum(colour) > 400 else (255, 255, 255), font=font)
    return img


@torch.no_grad()
def attention_maps(intermediates: Dict[str, Tensor], queries: Sequence[int], batch_index: int = 0,
                   layer: int = -1) -> Dict[str, Tensor]:
    """``{"positional": [n,h,w], "full": [n,h,w]}`` head-averaged attention of ``queries`` in decoder
    ``layer`` over the (unpadded) feature map of image ``batch_index``."""
    mask = intermediates["feat_mask"][batch_index]  # [h, w] True = padding
    h, w = mask.shape
    qp = intermediates["dec_ca_q_pos"][layer][batch_index]  # [Q, d]
    kp = intermediates["dec_ca_k_pos"][layer][batch_index]  # [HW, d]
    full = intermediates["dec_cross_attn_weights"][layer][batch_index]  # [Q, HW]
    H = int(intermediates.get("nheads", 0)) or _guess_heads(qp.shape[-1])
    dh = qp.shape[-1] // H
    q = qp.float().view(-1, H, dh)[list(queries)]  # [n, H, dh]
    k = kp.float().view(-1, H, dh)  # [HW, H, dh]
    logits = torch.einsum("nhd,khd->nhk", q, k) * (2 * dh) ** -0.5
    logits = logits.masked_fill(mask.reshape(1, 1, -1), float("-inf"))
    pos = logits.softmax(-1).mean(1)
    vh, vw = int((~mask).any(1).sum()), int((~mask).any(0).sum())
    pos = pos.view(-1, h, w)[:, :vh, :vw]
    full = full.float()[list(queries)].view(-1, h, w)[:, :vh, :vw]
    return {"positional": pos, "full": full}


def _guess_heads(d: int) -> int:
    return 8 if d % 8 == 0 else 1


def heatmap(values: Tensor, size: Tuple[int, int]) -> Image.Image:
    """A ``[h,w]`` map → an RGB heat map (black-red-yellow-white) resized to ``size`` (w, h)."""
    v = values.float()
    v = (v - v.min()) / (v.max() - v.min() + 1e-12)
    a = v.numpy()
    rgb = np.stack([np.clip(3 * a, 0, 1), np.clip(3 * a - 1, 0, 1), np.clip(3 * a - 2, 0, 1)], -1)
    img = Image.fromarray((rgb * 255).astype(np.uint8))
    return img.resize(size, Image.BILINEAR)


def attention_figure(image: Image.Image, box, label: int, score: float, positional: Tensor, full: Tensor,
                     names: Optional[Dict[int, str]] = None, alpha: float = 0.6) -> Image.Image:
    """Image with the query's box | positional attention | full attention (each over the image)."""
    base = draw_detections(image, [box], [label], [score], names)
    size = image.size
    panels = [base]
    for m, title in ((positional, "positional"), (full, "full")):
        overlay = Image.blend(image.convert("RGB"), heatmap(m, size), alpha)
        d = ImageDraw.Draw(overlay)
        d.rectangle(box, outline=(0, 255, 255), width=1)
        d.text((3, 3), title, fill=(255, 255, 255), font=_font())
        panels.append(overlay)
    W, H = size
    out = Image.new("RGB", (3 * W + 8, H), (255, 255, 255))
    for i, p in enumerate(panels):
        out.paste(p, (i * (W + 4), 0))
    return out
