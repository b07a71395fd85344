"""COCO box evaluation with pycocotools' COCOeval: the 12 AP/AR numbers, a table and JSON.

``coco_evaluate(coco_gt, detections)`` → ``{"stats": [12 floats], "names": STAT_NAMES, ...}``;
``format_table(result)`` → the Markdown table; ``save_json(result, path)``. pycocotools is the
reference; its own printout is suppressed. With no detections every number is 0.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Dict, List, Sequence

__all__ = ["STAT_NAMES", "coco_evaluate", "format_table", "save_json"]

STAT_NAMES = [
    "AP @[IoU=0.50:0.95 | area=all | maxDets=100]",
    "AP @[IoU=0.50 | area=all | maxDets=100]",
    "AP @[IoU=0.75 | area=all | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=large | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=1]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=10]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=large | maxDets=100]",
]
SHORT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def coco_evaluate(coco_gt, detections: Sequence[Dict[str, Any]], img_ids: Sequence[int] = None) -> Dict[str, Any]:
    """Run COCOeval (bbox) of ``detections`` (COCO result dicts) against ``coco_gt``."""
    from pycocotools.cocoeval import COCOeval

    dets = list(detections)
    out: Dict[str, Any] = {"names": STAT_NAMES, "short_names": SHORT_NAMES, "detections": len(dets)}
    if not dets:
        out["stats"] = [0.0] * 12
        return out
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if img_ids is not None:
            ev.params.imgIds = list(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # pycocotools reports -1 where a category/area has no ground truth
    out["stats"] = [float(v) for v in ev.stats]
    out["pycocotools_summary"] = buf.getvalue().strip().splitlines()[-12:]
    return out


def format_table(result: Dict[str, Any], title: str = "COCO box evaluation") -> str:
    lines = [f"{title} ({result.get('detections', 0)} detections)", "", "| metric | IoU | area | maxDets | value |",
             "|---|---|---|---|---|"]
    for name, short, v in zip(STAT_NAMES, SHORT_NAMES, result["stats"]):
        kind, rest = name.split(" @[")
        iou, area, md = [p.split("=")[1] for p in rest.rstrip("]").split(" | ")]
        lines.append(f"| {kind} ({short}) | {iou} | {area} | {md} | {v:.3f} |")
    return "\n".join(lines)


def save_json(result: Dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"stats": result["stats"], "metrics": dict(zip(SHORT_NAMES, result["stats"])),
               "names": STAT_NAMES, "detections": result.get("detections", 0)}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
