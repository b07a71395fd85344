"""Command line: ``dabdetr train|eval|predict|convert|bench`` (also ``python -m dabdetr ...``).

    dabdetr train                              # synthetic shapes + the demo preset (tiny model) on the CPU
    dabdetr train --data /data/coco --preset r50 --set lr=2e-4 --amp bf16
    torchrun --nproc_per_node=8 -m dabdetr train --data /data/coco --preset r50_dc5
    dabdetr train --resume                     # continue OUT/checkpoint.pth exactly where it stopped
    dabdetr eval runs/demo/checkpoint.pth      # AP table (synthetic val split unless --data)
    dabdetr predict CKPT a.jpg b.png --out preds --attention
    dabdetr convert checkpoint.pth ours.pth    # original / HF weights → our format
    dabdetr bench --quick                      # the op benchmarks (benchmarks/bench_ops.py; also `bench ops`)
    dabdetr bench model --case 512x512:2       # the model benchmark (benchmarks/bench_model.py)

Configs: ``--preset`` names a training preset (``demo``) or a model preset (``r50``, ``tiny``...);
``--set key=value`` overrides any training field (lr, epochs, batch_size, amp, aug_scale ...) or
model field (hidden_dim, num_queries ...; ``model.`` prefix optional); explicit flags
(``--epochs``, ``--lr`` ...) win over both.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main", "resolve_data", "build_parser"]

DEFAULT_SYNTHETIC_DIR = os.path.join("data", "shapes")


# ------------------------------------------------------------------------------------ data paths
def resolve_data(args, cfg=None, need_train: bool = True) -> Dict[str, str]:
    """Dataset paths from ``--data ROOT`` (COCO 2017 layout or ours), explicit ``--train-*/--val-*``
    flags, or the synthetic dataset (generated on first use)."""
    explicit = {k: getattr(args, k, None) for k in ("train_images", "train_ann", "val_images", "val_ann")}
    if any(explicit.values()):
        return {k: v for k, v in explicit.items() if v}
    root = getattr(args, "data", None)
    if root:
        coco17 = os.path.join(root, "annotations", "instances_train2017.json")
        if os.path.exists(coco17) or os.path.exists(os.path.join(root, "annotations", "instances_val2017.json")):
            return {"train_images": os.path.join(root, "train2017"), "train_ann": coco17,
                    "val_images": os.path.join(root, "val2017"),
                    "val_ann": os.path.join(root, "annotations", "instances_val2017.json")}
        ours = os.path.join(root, "annotations", "train.json")
        if os.path.exists(ours) or os.path.exists(os.path.join(root, "annotations", "val.json")):
            return {"train_images": os.path.join(root, "train"), "train_ann": ours,
                    "val_images": os.path.join(root, "val"), "val_ann": os.path.join(root, "annotations", "val.json")}
        raise SystemExit(f"error: {root} has neither annotations/instances_{{train,val}}2017.json (COCO) nor "
                         f"annotations/{{train,val}}.json; give --train-images/--train-ann/--val-images/--val-ann")
    from .data import ensure_shapes_dataset
    from .train_presets import get_train_config

    cfg = cfg or get_train_config("demo")
    from .engine import is_main_process, init_distributed

    env = init_distributed()
    folder = getattr(args, "synthetic_dir", None) or DEFAULT_SYNTHETIC_DIR
    if env["rank"] == 0:
        paths = ensure_shapes_dataset(folder, cfg.synthetic_train, cfg.synthetic_val, cfg.synthetic_train_seed,
                                      cfg.synthetic_val_seed)
    if env["distributed"]:
        import torch.distributed as dist

        dist.barrier()
        paths = ensure_shapes_dataset(folder, cfg.synthetic_train, cfg.synthetic_val, cfg.synthetic_train_seed,
                                      cfg.synthetic_val_seed, log=None)
    return paths


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (default: the synthetic shapes dataset, generated on first use)")
    g.add_argument("--data", help="dataset root: COCO 2017 layout (train2017/, val2017/, annotations/instances_*2017.json) "
                                  "or ours (train/, val/, annotations/{train,val}.json)")
    g.add_argument("--train-images")
    g.add_argument("--train-ann")
    g.add_argument("--val-images")
    g.add_argument("--val-ann")
    g.add_argument("--synthetic-dir", default=DEFAULT_SYNTHETIC_DIR, help="where the synthetic dataset lives")
    g.add_argument("--skip-invalid", action="store_true", help="drop invalid annotations with a warning instead of failing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dabdetr", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (default: the demo on the synthetic shapes dataset)")
    _add_data_args(t)
    t.add_argument("--preset", default=None, help="training or model preset (default: demo without --data, r50 with)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training or model setting (repeatable)")
    t.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    t.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint (no value: OUT/checkpoint.pth)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--lr-backbone", type=float)
    t.add_argument("--batch-size", type=int, help="global batch size")
    t.add_argument("--accum-steps", type=int)
    t.add_argument("--amp", choices=["none", "bf16", "fp16"])
    t.add_argument("--workers", type=int)
    t.add_argument("--threads", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--checkpoint-every", type=int, help="also checkpoint every N iterations")
    t.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    t.add_argument("--vis", type=int, default=6, help="validation images drawn into OUT/predictions.png (0: none)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    e = sub.add_parser("eval", help="COCO AP of a checkpoint")
    e.add_argument("checkpoint")
    _add_data_args(e)
    e.add_argument("--out", default=None, help="write eval.json here (default: beside the checkpoint)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    e.add_argument("--device", default=None)
    e.add_argument("--no-progress", action="store_true")

    pr = sub.add_parser("predict", help="detections (JSON + PNG) for images")
    pr.add_argument("checkpoint")
    pr.add_argument("images", nargs="+")
    pr.add_argument("--out", required=True)
    pr.add_argument("--threshold", type=float, default=0.3, help="score threshold of the drawn/written boxes")
    pr.add_argument("--attention", action="store_true", help="also draw the cross-attention of the top queries")
    pr.add_argument("--top", type=int, default=3, help="queries drawn with --attention")
    pr.add_argument("--device", default=None)

    c = sub.add_parser("convert", help="original or HuggingFace checkpoint → our format")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--source", choices=["auto", "original", "hf"], default="auto")
    c.add_argument("--hf-config", default=None, help="HF config.json (when SRC is a bare state dict)")

    b = sub.add_parser("bench", help="benchmarks: `bench [ops] ARGS` → benchmarks/bench_ops.py, "
                                     "`bench model ARGS` → benchmarks/bench_model.py", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


# ------------------------------------------------------------------------------------ train
def _train_config(args):
    from .train_presets import apply_overrides, get_train_config

    name = args.preset or ("demo" if not (args.data or args.train_ann) else "r50")
    cfg = apply_overrides(get_train_config(name), args.overrides)
    flags = {"epochs": args.epochs, "lr": args.lr, "lr_backbone": args.lr_backbone, "batch_size": args.batch_size,
             "accum_steps": args.accum_steps, "amp": args.amp, "workers": args.workers, "threads": args.threads,
             "seed": args.seed, "checkpoint_every": args.checkpoint_every}
    cfg = cfg.replace(**{k: v for k, v in flags.items() if v is not None})
    return name, cfg


def cmd_train(args) -> int:
    from .data import DataError
    from .engine import NonFiniteLossError, fit

    name, cfg = _train_config(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    out = args.out or os.path.join("runs", name)
    t0 = time.time()
    try:
        paths = resolve_data(args, cfg)
        result = fit(cfg, paths, out, resume=args.resume, progress=not args.no_progress, device=args.device,
                     skip_invalid=args.skip_invalid)
    except (NonFiniteLossError, DataError) as exc:
        kind = "bad data: " if isinstance(exc, DataError) else ""
        print(f"error: {kind}{exc}", file=sys.stderr)
        from .engine import cleanup_distributed

        exc = None
        cleanup_distributed()
        return 2
    if result.get("rank", 0) == 0:
        if args.vis and result.get("model") is not None and paths.get("val_ann"):
            png = draw_validation_predictions(result["model"], cfg, paths, os.path.join(out, "predictions.png"),
                                              n=args.vis)
            print(f"predictions on {args.vis} validation images: {png}")
        print(f"checkpoint: {os.path.join(out, 'checkpoint.pth')}; total time {time.time() - t0:.0f} s")
    return 0


def _val_transform(train: Dict[str, Any]):
    from .data import detr_val_transforms

    return detr_val_transforms(scale=train.get("aug_scale", 1.0), size=train.get("val_size", 800),
                               max_size=train.get("max_size", 1333))


def draw_validation_predictions(model, cfg, paths, out_png: str, n: int = 6, threshold: float = 0.3,
                                columns: int = 3) -> str:
    """Predictions (score ≥ threshold; the top 3 where none is) of the first ``n`` validation images,
    tiled into one PNG."""
    import torch
    from PIL import Image

    from .data import CocoDetection
    from .visualize import draw_detections

    ds = CocoDetection(paths["val_images"], paths["val_ann"], _val_transform(cfg.to_dict()))
    model.eval()
    tiles = []
    device = next(model.parameters()).device
    for i in range(min(n, len(ds))):
        x, t = ds[i]
        with torch.no_grad():
            out = model(x[None].to(device))
            res = model.postprocess(out, t["orig_size"][None].to(device))[0]
        keep = res["scores"] >= threshold
        if not keep.any():  # an under-trained model: show its 3 best guesses (scores are drawn)
            keep = torch.arange(len(res["scores"])) < 3
        tiles.append(draw_detections(ds.load_image(i), res["boxes"][keep].cpu(), res["labels"][keep].cpu(),
                                     res["scores"][keep].cpu(), ds.categories))
    W = max(t.width for t in tiles)
    H = max(t.height for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (W + 4), rows * (H + 4)), (255, 255, 255))
    for k, tile in enumerate(tiles):
        canvas.paste(tile, ((k % columns) * (W + 4), (k // columns) * (H + 4)))
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    canvas.save(out_png)
    return out_png


# ------------------------------------------------------------------------------------ eval / predict
def _load_model(path: str, device: Optional[str]):
    import torch

    from .models.checkpoint import load_checkpoint, safe_load

    obj = safe_load(path)
    model = load_checkpoint(obj)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train = (obj.get("train") if isinstance(obj, dict) else None) or {}
    if dev.type == "cpu" and train.get("cpu_retain_memory", True):
        from .cpu_memory import retain_freed_memory

        retain_freed_memory()  # as training does: eval/predict make the same temporaries per batch
    return model.to(dev).eval(), train, dev


def cmd_eval(args) -> int:
    from .coco_eval import format_table, save_json
    from .data import CocoDetection, DataError, build_loader
    from .engine import evaluate
    from .train_presets import TrainConfig

    model, train, dev = _load_model(args.checkpoint, args.device)
    cfg = TrainConfig(**{k: v for k, v in train.items() if k in TrainConfig.__dataclass_fields__}) if train else None
    try:
        paths = resolve_data(args, cfg)
        if not paths.get("val_ann"):
            raise SystemExit("error: no validation annotations (--val-ann / --data)")
        ds = CocoDetection(paths["val_images"], paths["val_ann"], _val_transform(train), skip_invalid=args.skip_invalid)
    except DataError as exc:
        print(f"error: bad data: {exc}", file=sys.stderr)
        return 2
    loader = build_loader(ds, args.batch_size, shuffle=False)
    res = evaluate(model, loader, dev, amp=args.amp, progress=not args.no_progress)
    print(format_table(res, f"COCO box evaluation of {args.checkpoint} on {paths['val_ann']}"))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval.json")
    save_json(res, out)
    print(f"wrote {out}")
    return 0


def cmd_predict(args) -> int:
    import torch
    from PIL import Image, UnidentifiedImageError

    from .visualize import attention_figure, attention_maps, draw_detections

    model, train, dev = _load_model(args.checkpoint, args.device)
    tf = _val_transform(train)
    os.makedirs(args.out, exist_ok=True)
    names = train.get("category_names") or {}
    names = {int(k): v for k, v in names.items()} if names else None
    all_dets = {}
    for path in args.images:
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            print(f"error: cannot read image {path}: {exc}", file=sys.stderr)
            return 2
        w, h = image.size
        x, _ = tf(image, {"size": torch.tensor([h, w])}, random.Random(0))
        inter: Dict[str, Any] = {} if args.attention else None
        with torch.no_grad():
            out = model(x[None].to(dev), intermediates=inter)
            res = model.postprocess(out, torch.tensor([[h, w]], device=dev))[0]
        keep = res["scores"] >= args.threshold
        dets = [{"label": int(l), "name": (names or {}).get(int(l), str(int(l))), "score": float(s),
                 "box_xyxy": [round(float(v), 2) for v in b]}
                for s, l, b in zip(res["scores"][keep], res["labels"][keep], res["boxes"][keep])]
        stem = os.path.splitext(os.path.basename(path))[0]
        all_dets[path] = dets
        draw_detections(image, res["boxes"][keep].cpu(), res["labels"][keep].cpu(), res["scores"][keep].cpu(),
                        names).save(os.path.join(args.out, f"{stem}_pred.png"))
        if args.attention:
            logits = out["pred_logits"][0].float().sigmoid()
            qscore, qlabel = logits.max(-1)
            top = qscore.argsort(descending=True)[: args.top].tolist()
            inter["nheads"] = model.config.nheads
            maps = attention_maps(inter, top)
            from .models.box_ops import box_cxcywh_to_xyxy

            boxes = box_cxcywh_to_xyxy(out["pred_boxes"][0].float()) * torch.tensor([w, h, w, h], device=dev)
            for k, q in enumerate(top):
                fig = attention_figure(image, boxes[q].tolist(), int(qlabel[q]), float(qscore[q]),
                                       maps["positional"][k].cpu(), maps["full"][k].cpu(), names)
                fig.save(os.path.join(args.out, f"{stem}_attn_q{q}.png"))
        print(f"{path}: {len(dets)} detections ≥ {args.threshold}")
    with open(os.path.join(args.out, "predictions.json"), "w") as f:
        json.dump(all_dets, f, indent=1)
    print(f"wrote {os.path.join(args.out, 'predictions.json')} and PNGs in {args.out}")
    return 0


def cmd_convert(args) -> int:
    from .models.checkpoint import CheckpointError, convert_checkpoint

    try:
        model = convert_checkpoint(args.src, args.dst, source=args.source, hf_config=args.hf_config)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst} ({n / 1e6:.1f}M parameters, backbone {model.config.backbone}, "
          f"{model.config.num_queries} queries, {model.config.num_classes} classes)")
    return 0


BENCHMARKS = {"ops": "bench_ops", "model": "bench_model"}


def cmd_bench(args) -> int:
    """``bench model ARGS`` runs benchmarks/bench_model.py; ``bench ops ARGS`` and ``bench ARGS``
    run benchmarks/bench_ops.py (``--help`` goes to the script)."""
    import importlib.util

    rest = list(args.bench_args)
    name = BENCHMARKS[rest.pop(0)] if rest and rest[0] in BENCHMARKS else "bench_ops"
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(here, "benchmarks", f"{name}.py")
    if not os.path.exists(script):
        print(f"error: {script} not found (the benchmarks ship with the source tree, not the wheel)", file=sys.stderr)
        return 2
    sys.path.insert(0, here)
    spec = importlib.util.spec_from_file_location(f"benchmarks.{name}", script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"benchmarks.{name}"] = mod
    spec.loader.exec_module(mod)
    return int(mod.main(rest) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after "bench [ops|model]" (--help included) goes to the script
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    return {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "convert": cmd_convert,
            "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
