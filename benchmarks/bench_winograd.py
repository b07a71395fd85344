"""Microbenchmark of the CPU backbone's Winograd convolutions (``dabdetr.models.winograd``) against
the direct convolution the fused backbone runs otherwise.

Usage (from the repository root)::

    python benchmarks/bench_winograd.py                       # R50 at 800x1333:1 and 512x512:2
    python benchmarks/bench_winograd.py --case 640x640:4 --resnet resnet101
    python benchmarks/bench_winograd.py --quick               # tiny shapes (CI smoke test)

For every distinct 3x3 stride-1 convolution of the ResNet body at the case's input size (layer1-4:
64-512 channels at 1/4-1/32 of the image; layer1 is frozen in the original's recipe, so it is timed
forward only), round-robin medians of:
    direct      what the fused backbone runs with ``cpu_winograd="off"`` (``backbone._conv2d``:
                oneDNN, channels-last activations, the weight gradient from NCHW copies from 128
                channels)
    F(2,3)      ``winograd_conv3x3(..., m=2)``
    F(4,3)      ``winograd_conv3x3(..., m=4)``
forward, and forward + backward (input and weight gradients) for the trained layers; which one the
backbone picks in its modes "f2" (the fused default) and "f4" (``backbone._winograd_tile``) and
their speedups over direct; the float32 output
error of each against a float64 ``F.conv2d`` of the same inputs (max abs error / max abs output;
ReLU'd random inputs, He-initialised weights). The total weights each shape by how many such
convolutions the body has. Markdown on stdout; JSON + .md in
``benchmarks/results/winograd_cpu_float32[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `dabdetr` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks import _common as C
from benchmarks.bench_model import parse_case
from dabdetr.models import backbone as bb
from dabdetr.models import winograd as wg

PROVIDERS = ("direct", "F(2,3)", "F(4,3)")
FROZEN_LAYERS = ("layer1",)  # the original's recipe trains layer2-4


def conv_shapes(resnet: str, h: int, w: int, batch: int, width: int = 64) -> List[Dict[str, object]]:
    """The distinct 3x3 stride-1 convolutions of the body: layer, channels, map size, count."""
    block, layers = bb.RESNET_SPECS[resnet]
    size = [h, w]
    for _ in range(2):  # stem (stride 2) and max pool (stride 2): ceil(n / 2) each
        size = [math.ceil(s / 2) for s in size]
    out = []
    for i, blocks in enumerate(layers):
        if i > 0:
            size = [math.ceil(s / 2) for s in size]
        planes = width * 2 ** i
        if block is bb.Bottleneck:  # conv2 of every block but the first of layer2-4 (stride 2 there)
            count = blocks if i == 0 else blocks - 1
        else:  # BasicBlock: conv1 and conv2, the first block's conv1 strided in layer2-4
            count = 2 * blocks if i == 0 else 2 * blocks - 1
        out.append({"layer": f"layer{i + 1}", "channels": planes, "h": size[0], "w": size[1], "batch": batch,
                    "count": count, "trains": f"layer{i + 1}" not in FROZEN_LAYERS})
    return out


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def bench_shape(s: Dict[str, object], iters: int, seed: int) -> Dict[str, object]:
    c, n, h, w = s["channels"], s["batch"], s["h"], s["w"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).relu().contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(c, c, 3, 3, generator=g) * math.sqrt(2 / (9 * c)))
    weight = conv.weight
    fns = {
        "direct": lambda xx: bb._conv2d(conv, xx, weight, None),
        "F(2,3)": lambda xx: wg.winograd_conv3x3(xx, weight, None, 2),
        "F(4,3)": lambda xx: wg.winograd_conv3x3(xx, weight, None, 4),
    }
    ref = F.conv2d(x.double(), weight.detach().double(), padding=1)
    with torch.no_grad():
        errors = {k: rel_error(f(x), ref) for k, f in fns.items()}
        fwd = C.measure({k: (lambda f=f: f(x)) for k, f in fns.items()}, "cpu", iters=iters, warmup=2)
    row = {**s, "tile": bb._winograd_tile(conv, x, "f4"), "tile_f2": bb._winograd_tile(conv, x, "f2"), "error": errors,
           "fwd_ms": {k: t.median_ms for k, t in fwd.items()}, "fwd_iqr_ms": {k: t.iqr_ms for k, t in fwd.items()}}
    if s["trains"]:
        xg = x.detach().requires_grad_()
        gy = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)

        def step(f):
            f(xg).backward(gy)
            xg.grad = weight.grad = None

        both = C.measure({k: (lambda f=f: step(f)) for k, f in fns.items()}, "cpu", iters=iters, warmup=2)
        row["fwd_bwd_ms"] = {k: t.median_ms for k, t in both.items()}
        row["fwd_bwd_iqr_ms"] = {k: t.iqr_ms for k, t in both.items()}
    key = "fwd_bwd_ms" if s["trains"] else "fwd_ms"
    names = {0: "direct", 2: "F(2,3)", 4: "F(4,3)"}
    row["chosen"], row["chosen_f2"] = names[row["tile"]], names[row["tile_f2"]]
    row["speedup"] = row[key]["direct"] / row[key][row["chosen"]]
    row["speedup_f2"] = row[key]["direct"] / row[key][row["chosen_f2"]]
    return row


def case_report(label: str, rows: List[Dict[str, object]]) -> str:
    headers = ["layer", "C", "map", "n", "timed", "direct ms", "F(2,3)", "F(4,3)", "f2 picks", "speedup",
               "f4 picks", "speedup", "err direct", "err F(2,3)", "err F(4,3)"]
    table = []
    total_direct = total_f2 = total_f4 = 0.0
    for r in rows:
        key = "fwd_bwd_ms" if r["trains"] else "fwd_ms"
        t = r[key]
        total_direct += r["count"] * t["direct"]
        total_f2 += r["count"] * t[r["chosen_f2"]]
        total_f4 += r["count"] * t[r["chosen"]]
        table.append([r["layer"], r["channels"], f"{r['h']}x{r['w']}", r["count"],
                      "fwd+bwd" if r["trains"] else "fwd", f"{t['direct']:.2f}", f"{t['F(2,3)']:.2f}",
                      f"{t['F(4,3)']:.2f}", r["chosen_f2"], C.fmt_x(r["speedup_f2"]), r["chosen"],
                      C.fmt_x(r["speedup"]), *(f"{r['error'][p]:.1e}" for p in PROVIDERS)])
    lines = [f"### {label}", "", C.markdown_table(headers, table, "lrlrlrrrlrlrrrr"), "",
             f"All {sum(r['count'] for r in rows)} such convolutions of the body (count x median, forward+backward "
             f"for trained layers): direct {total_direct:.1f} ms, mode f2 (the fused default) {total_f2:.1f} ms "
             f"(**{C.fmt_x(total_direct / total_f2)}**), mode f4 {total_f4:.1f} ms "
             f"(**{C.fmt_x(total_direct / total_f4)}**).", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", default=None, help="HxW:B (repeatable; default 800x1333:1 and 512x512:2)")
    p.add_argument("--resnet", default="resnet50", choices=sorted(bb.RESNET_SPECS))
    p.add_argument("--iters", type=int, default=7, help="round-robin samples per measurement (default 7)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--malloc", choices=C.MALLOC_CHOICES, default="retain", help=C.MALLOC_HELP)
    p.add_argument("--quick", action="store_true", help="a 64x96:1 case, 2 samples (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path ('-': none; default benchmarks/results/winograd_cpu_float32[_TAG].json)")
    p.add_argument("--tag", default="", help="suffix of the default output name")
    p.add_argument("--no-md", action="store_true", help="no .md next to the JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.case, args.iters = args.case or ["64x96:1"], 2
    args.case = args.case or ["800x1333:1", "512x512:2"]
    if args.iters < 1:
        p.error("--iters must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = C.set_threads(args.threads)
    malloc = C.apply_malloc_policy("cpu", args.malloc)
    env = C.environment("cpu")
    busy = C.busy_warning()
    cases = [parse_case(c) for c in args.case]
    results = []
    for ci, case in enumerate(cases):
        rows = []
        for si, s in enumerate(conv_shapes(args.resnet, case.H, case.W, case.B)):
            C.log(f"[bench_winograd] {case.label} {s['layer']} ({s['channels']} channels, {s['h']}x{s['w']})")
            rows.append(bench_shape(s, args.iters, args.seed + 100 * ci + si))
        results.append({"case": case.label, "rows": rows})
    head = [f"## dabdetr Winograd convolutions — {args.resnet} 3x3 stride-1, cpu ({C.cpu_label(env)}, "
            f"{threads} threads), float32, torch {torch.__version__}", "",
            f"Medians of {args.iters} round-robin samples; C++ transforms: {wg.HAS_CPP_TRANSFORMS}; CPU memory "
            f"policy: {malloc}. 'f2 picks' / 'f4 picks' = what `ResNet.cpu_winograd` runs in that mode "
            "(backbone._winograd_tile); errors = "
            "max |y - ref| / max |ref| against float64.", ""]
    if busy:
        head += [f"> warning: {busy}", ""]
    text = "\n".join(head + [case_report(r["case"].replace(":", ", batch "), r["rows"]) for r in results])
    print(text)
    payload = {"benchmark": "bench_winograd", "environment": env,
               "settings": {"resnet": args.resnet, "iters": args.iters, "threads": threads, "malloc": malloc,
                            "cpp_transforms": wg.HAS_CPP_TRANSFORMS, "quick": args.quick, "seed": args.seed},
               "cases": results}
    if args.out != "-":
        tag = f"_{args.tag}" if args.tag else ""
        out = Path(args.out) if args.out else C.RESULTS_DIR / f"winograd_cpu_float32{tag}.json"
        C.write_json(out, payload)
        if not args.no_md:
            out.with_suffix(".md").write_text(text + "\n")
        C.log(f"[bench_winograd] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
