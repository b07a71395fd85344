"""Microbenchmarks of dabdetr's fused ops: eager vs torch.compile vs every fused backend.

Usage (from the repository root)::

    python benchmarks/bench_ops.py                          # all ops, fwd/bwd/fwd+bwd, default device
    python benchmarks/bench_ops.py --quick                  # tiny shapes, few samples (CI smoke test)
    python benchmarks/bench_ops.py --device cuda --dtype bfloat16
    python benchmarks/bench_ops.py --ops sine_embed,attention --modes fwd+bwd
    python benchmarks/bench_ops.py --memory-only            # O(N)-memory demonstration of the attention

Providers (per op, per device):
    eager    the reference (``backend="torch"``: the original implementation's math, REFERENCE.md
             §1a and §4 — per-head concat + bmm + masked softmax + bmm; not SDPA).
    compile  ``torch.compile`` (default mode, ``dynamic=False``) of the reference function; compiled
             and warmed up (forward and backward graphs) outside the timed region, once per
             (op, shape) and reused by every mode. ``compile_s`` in the JSON is the warm-up time.
    <fused>  every backend of ``dabdetr.ops.available_backends(device, op)`` except ``torch``
             (today ``cpu`` on the CPU; ``cuda`` and ``triton`` on a GPU machine). New backends
             appear here automatically.

Modes (inputs are leaves with ``requires_grad=True``, as in training):
    fwd      the forward call, autograd recording on (what a training step runs; the graph is
             dropped right away). ``--modes infer`` adds a forward under ``torch.no_grad()``.
    bwd      backward only: each call runs the forward outside the timed region (a fresh graph),
             then times ``torch.autograd.grad(out, inputs, grad_out)`` alone (per-call timers, see
             ``_common.SetupAndRun``). This times exactly the backward kernels + autograd engine
             (including the freeing of saved tensors), without the subtraction noise of
             "(fwd+bwd) - fwd"; replaying one graph with ``retain_graph=True`` is not an option
             (torch.compile's backward donates its saved buffers and refuses it).
    fwd+bwd  forward + ``torch.autograd.grad`` (no retain), rebuilt every call.
    Gradients are taken with respect to every differentiable input (modulated_sine_query: anchors,
    ref_wh and pos_scale — DAB-DETR's layer 0, where the anchors are learnable; attention: all five).

Inputs are made the way the model makes them: sequence-first ``[N, B, C]`` tensors. The query ops
take ``[Nq, B, 4]`` anchors (rows = B·Nq) in (0, 1); the attention takes ``x.view(N, B, H, d)
.transpose(0, 1)`` views of ``[N, B, H·d]`` leaves (no copy) for every provider, a key padding mask
padding the bottom/right of image 1's feature map, and scale 1/8 (1/sqrt(Dc + Dp)).

Timing: see ``benchmarks/_common.py`` (median of round-robin samples after warm-up; CUDA events on
GPU, perf_counter on CPU). Before timing, each provider's forward output and gradients are compared
with eager's (``max_rel_err`` in the JSON; a warning is printed above the tolerance). On the CPU the
process keeps freed memory for reuse (``--malloc retain``, default; ``--malloc default`` for glibc's
policy, under which the eager references' large temporaries are page-faulted in afresh every call).

Output: a Markdown table on stdout (progress on stderr) and a JSON file (rows + environment:
host, CPU, cores, versions, GPU, git sha/dirty, date, command line), by default
``benchmarks/results/ops_<device>_<dtype>_<hostname or gpu name>.json``.

Memory (``--memory`` / ``--memory-only``): the fused attention forward+backward at a size where one
``B·H·Nq·Nk`` float32 buffer needs > 4 GB, with its time and peak memory, against the eager
requirement. See :func:`memory_demo`.

Roofline (default; ``--no-roofline`` skips it): :func:`op_cost` gives the compulsory bytes moved and
the useful flops of each (op, shape, mode); the JSON rows carry the achieved GB/s and GFLOP/s. Once per
run, ``_common.device_peaks`` measures this device's copy bandwidth (a large tensor copy) and matmul
rate (a large ``torch.mm`` in the benchmark dtype); the table shows, per row, the achieved bandwidth
(sine ops: bytes the fused kernel must read + write) or flop rate (attention: ``flops.attention_flops``)
and its percentage of that measured peak (``pct_of_peak`` in the JSON; ``peaks`` at the top level).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `dabdetr` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor

from benchmarks import _common as C

import dabdetr.ops as ops
from dabdetr.models.flops import attention_flops
from dabdetr.ops import reference

TWO_PI = 2 * math.pi
NUM_FEATS = 128  # DAB-DETR: hidden_dim // 2
TEMPERATURE = 10000.0

# CLI name -> dispatch name (for available_backends)
OPS = {
    "sine_embed": "sine_embed",  # 4-D anchors
    "sine_embed_2d": "sine_embed",
    "modulated_sine_query": "modulated_sine_query",
    "content_position_attention": "content_position_attention",
}
ALIASES = {
    "sine": "sine_embed", "sine4d": "sine_embed", "sine_embed_4d": "sine_embed",
    "sine2d": "sine_embed_2d",
    "msq": "modulated_sine_query", "modulated": "modulated_sine_query",
    "attention": "content_position_attention", "attn": "content_position_attention",
    "cpa": "content_position_attention",
}
MODES = ("fwd", "bwd", "fwd+bwd", "infer")
DEFAULT_MODES = ("fwd", "bwd", "fwd+bwd")

# (B, Nq) of the query-side ops; attention (B, Nq, H, D, Nk, (h, w) feature map)
QUERY_SHAPES = [(2, 300), (2, 900), (8, 300), (8, 900)]
ATTN_SHAPES = [
    (2, 300, 8, 32, 1050, (25, 42)),  # R50, 800x1333: stride 32
    (2, 300, 8, 32, 4200, (50, 84)),  # DC5: stride 16
]
QUICK_QUERY_SHAPES = [(2, 50)]
QUICK_ATTN_SHAPES = [(2, 20, 8, 32, 60, (6, 10))]


# ---------------------------------------------------------------------------------------------
# cases: inputs and the functions each provider calls


@dataclass
class Inputs:
    leaves: List[Tensor]  # requires_grad leaves; gradients are taken w.r.t. these
    make_args: Callable[[], tuple]  # the op's positional tensor arguments, built from the leaves
    dims: Dict[str, int] = field(default_factory=dict)


@dataclass
class Case:
    op: str  # CLI name
    shape: str  # label
    dims: Dict[str, int]
    build: Callable[[str, torch.dtype], Inputs]
    public: Callable[..., Tensor]  # public(*args, backend=...)
    ref: Callable[..., Tensor]  # reference(*args), what torch.compile compiles

    @property
    def kernel(self) -> str:
        return OPS[self.op]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _anchors(rows_shape, device, dtype, g) -> Tensor:
    # sigmoid'd anchors (cx, cy, w, h) in (0, 1), as the decoder's reference points
    return torch.randn(*rows_shape, 4, generator=g).sigmoid().to(device=device, dtype=dtype)


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(True)


def padding_mask(B: int, Nk: int, hw: Optional[Tuple[int, int]] = None) -> Tensor:
    """Key padding mask ``[B, Nk]`` as DETR makes it for a batch of differently sized images: image
    1 (if any) is smaller than the padded batch, so the bottom rows and right columns of its
    ``h x w`` feature map are padding (True)."""
    if hw is None:
        w = max(1, round(math.sqrt(Nk * 1333 / 800)))
        hw = (math.ceil(Nk / w), w)
    h, w = hw
    m = torch.zeros(B, h, w, dtype=torch.bool)
    if B > 1:
        m[1, int(math.ceil(h * 0.85)):, :] = True
        m[1, :, int(math.ceil(w * 0.7)):] = True
    return m.flatten(1)[:, :Nk].contiguous()


def sine_case(B: int, Nq: int, C_: int) -> Case:
    op = "sine_embed" if C_ == 4 else "sine_embed_2d"
    temps = (TEMPERATURE,) * C_

    def build(device, dtype):
        coords = _leaf(_anchors((Nq, B), device, dtype, _gen(1))[..., :C_])
        return Inputs([coords], lambda: (coords,))

    def public(coords, backend):
        return ops.sine_embed(coords, NUM_FEATS, TEMPERATURE, TWO_PI, True, backend=backend)

    def ref(coords):
        return reference.sine_embed(coords, NUM_FEATS, temps, TWO_PI, True)

    return Case(op, f"B={B} Nq={Nq}", {"B": B, "Nq": Nq, "C": C_, "F": NUM_FEATS}, build, public, ref)


def msq_case(B: int, Nq: int) -> Case:
    F = NUM_FEATS

    def build(device, dtype):
        g = _gen(2)
        anchors = _leaf(_anchors((Nq, B), device, dtype, g))
        ref_wh = _leaf(torch.randn(Nq, B, 2, generator=g).sigmoid().to(device=device, dtype=dtype))
        pos_scale = _leaf(torch.randn(Nq, B, 2 * F, generator=g).to(device=device, dtype=dtype))
        return Inputs([anchors, ref_wh, pos_scale], lambda: (anchors, ref_wh, pos_scale))

    def public(anchors, ref_wh, pos_scale, backend):
        return ops.modulated_sine_query(anchors, ref_wh, pos_scale, F, TEMPERATURE, TWO_PI, backend=backend)

    def ref(anchors, ref_wh, pos_scale):
        return reference.modulated_sine_query(anchors, ref_wh, pos_scale, F, (TEMPERATURE, TEMPERATURE), TWO_PI)

    return Case("modulated_sine_query", f"B={B} Nq={Nq}", {"B": B, "Nq": Nq, "F": F}, build, public, ref)


def attention_inputs(B, Nq, H, D, Nk, hw, device, dtype, seed=3) -> Inputs:
    """Sequence-first ``[N, B, H*D]`` leaves viewed batch-first ``[B, N, H, D]`` (no copy)."""
    g = _gen(seed)

    def seq(N):
        return _leaf(torch.randn(N, B, H * D, generator=g).to(device=device, dtype=dtype))

    qc, qp, kc, kp, v = seq(Nq), seq(Nq), seq(Nk), seq(Nk), seq(Nk)
    mask = padding_mask(B, Nk, hw).to(device)

    def make_args():
        def bf(x, N):
            return x.view(N, B, H, D).transpose(0, 1)

        return (bf(qc, Nq), bf(qp, Nq), bf(kc, Nk), bf(kp, Nk), bf(v, Nk), mask)

    return Inputs([qc, qp, kc, kp, v], make_args)


def attention_case(B, Nq, H, D, Nk, hw) -> Case:
    scale = (2 * D) ** -0.5  # DAB-DETR: 1/sqrt(64) = 1/8

    def build(device, dtype):
        return attention_inputs(B, Nq, H, D, Nk, hw, device, dtype)

    def public(qc, qp, kc, kp, v, mask, backend):
        return ops.content_position_attention(qc, qp, kc, kp, v, mask, scale, backend=backend)

    def ref(qc, qp, kc, kp, v, mask):
        return reference.content_position_attention(qc, qp, kc, kp, v, mask, scale)[0]

    dims = {"B": B, "Nq": Nq, "H": H, "Dc": D, "Dp": D, "Dv": D, "Nk": Nk}
    return Case("content_position_attention", f"B={B} Nq={Nq} Nk={Nk} H={H} D={D}", dims, build, public, ref)


def make_cases(op_names: Sequence[str], quick: bool) -> List[Case]:
    qs = QUICK_QUERY_SHAPES if quick else QUERY_SHAPES
    ats = QUICK_ATTN_SHAPES if quick else ATTN_SHAPES
    cases: List[Case] = []
    for op in op_names:
        if op == "sine_embed":
            cases += [sine_case(B, Nq, 4) for B, Nq in qs]
        elif op == "sine_embed_2d":
            cases += [sine_case(B, Nq, 2) for B, Nq in qs]
        elif op == "modulated_sine_query":
            cases += [msq_case(B, Nq) for B, Nq in qs]
        elif op == "content_position_attention":
            cases += [attention_case(*s) for s in ats]
    return cases


# ---------------------------------------------------------------------------------------------
# roofline: compulsory bytes moved and useful flops per call (against measured peaks: add_roofline)


def op_cost(op: str, dims: Dict[str, int], mode: str, elem: int) -> Dict[str, float]:
    """Compulsory traffic (each input read once, each output written once) and useful flops.

    Attention flops are :func:`dabdetr.models.flops.attention_flops` (2 per multiply-add, the mask
    ignored): fwd ``2·B·H·Nq·Nk·(Dc+Dp+Dv)``; bwd ``2·B·H·Nq·Nk·(3·(Dc+Dp) + 2·Dv)`` (the
    recomputed ``q·kᵀ``, then dV, dP, dQ, dK).
    Sine-op flops are reported as 0 (they are bound by memory and transcendental throughput).
    """
    if op in ("sine_embed", "sine_embed_2d"):
        rows, c, f = dims["B"] * dims["Nq"], dims["C"], dims["F"]
        fwd = rows * (c + c * f) * elem
        bwd = rows * (c * f + 2 * c) * elem
        flops_f = flops_b = 0.0
    elif op == "modulated_sine_query":
        rows, f = dims["B"] * dims["Nq"], dims["F"]
        fwd = rows * (4 + 2 + 2 * f + 2 * f) * elem
        bwd = rows * ((2 * f) + (4 + 2 + 2 * f) + (4 + 2 + 2 * f)) * elem  # grad_out, inputs, grads
        flops_f = flops_b = 0.0
    else:
        B, Nq, Nk, H = dims["B"], dims["Nq"], dims["Nk"], dims["H"]
        dqk, dv = dims["Dc"] + dims["Dp"], dims["Dv"]
        q_bytes = B * Nq * H * dqk * elem
        kv_bytes = B * Nk * H * (dqk + dv) * elem
        o_bytes = B * Nq * H * dv * elem
        lse = B * H * Nq * 4
        fwd = q_bytes + kv_bytes + o_bytes + lse + B * Nk
        bwd = 2 * (q_bytes + kv_bytes) + 2 * o_bytes + lse + B * Nk  # inputs, out, grad_out -> grads
        qc, qp, v = (B, Nq, H, dims["Dc"]), (B, Nq, H, dims["Dp"]), (B, Nk, H, dv)
        flops_f = float(attention_flops(qc, qp, v, Nk))
        flops_b = float(attention_flops(qc, qp, v, Nk, backward=True))
    if mode in ("fwd", "infer"):
        return {"bytes": float(fwd), "flops": flops_f}
    if mode == "bwd":
        return {"bytes": float(bwd), "flops": flops_b}
    return {"bytes": float(fwd + bwd), "flops": flops_f + flops_b}


# ---------------------------------------------------------------------------------------------
# providers and modes


def provider_fns(case: Case, backends: Sequence[str], use_compile: bool) -> Dict[str, Callable]:
    """name -> f(*args) for eager, compile and each fused backend."""
    fns: Dict[str, Callable] = {"eager": lambda *a: case.public(*a, backend="torch")}
    if use_compile:
        fns["compile"] = torch.compile(case.ref, dynamic=False)
    for b in backends:
        fns[b] = (lambda bk: (lambda *a: case.public(*a, backend=bk)))(b)
    return fns


def mode_callable(fn: Callable, inp: Inputs, grad_out: Tensor, mode: str) -> Callable[[], object]:
    leaves, make_args = inp.leaves, inp.make_args
    if mode == "fwd":
        return lambda: fn(*make_args())
    if mode == "infer":
        def infer():
            with torch.no_grad():
                return fn(*make_args())
        return infer
    if mode == "bwd":
        # a fresh graph per call, built outside the timed region (C.SetupAndRun); only the
        # backward is timed. (Replaying one graph with retain_graph=True is not possible for
        # torch.compile's donated-buffer backward, and would skip the freeing of saved tensors.)
        return C.SetupAndRun(
            setup=lambda: fn(*make_args()),
            run=lambda out: torch.autograd.grad(out, leaves, grad_out),
        )
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(*make_args()), leaves, grad_out)
    raise ValueError(mode)


def _max_rel_err(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    err = 0.0
    for a, b in zip(got, want):
        denom = b.detach().abs().max().float().item() or 1.0
        err = max(err, (a.detach().float() - b.detach().float()).abs().max().item() / denom)
    return err


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


# ---------------------------------------------------------------------------------------------
# the op benchmark


def add_roofline(row: dict, peaks: Optional[dict]) -> None:
    """``pct_of_peak`` (and which peak) of a timed row: the attention against the measured matmul
    rate, the sine ops against the measured copy bandwidth."""
    if not peaks or "median_ms" not in row:
        return
    if row.get("achieved_gflops"):
        row["pct_of_peak"] = 100.0 * row["achieved_gflops"] / peaks["matmul_gflops"]
        row["peak_kind"] = "matmul"
    else:
        row["pct_of_peak"] = 100.0 * row["achieved_gbps"] / peaks["copy_gbps"]
        row["peak_kind"] = "copy"


def run_ops(args, device: str, dtype: torch.dtype, timing_kw: dict, peaks: Optional[dict] = None,
            on_case=None) -> List[dict]:
    """The rows of every case; ``on_case(rows)`` after each case (the JSON is rewritten there, so a
    run stopped by a time limit keeps the cases it finished)."""
    rows: List[dict] = []
    elem = torch.empty((), dtype=dtype).element_size()
    for case in make_cases(args.ops, args.quick):
        fused = [b for b in ops.available_backends(device, case.kernel) if b != "torch"]
        if args.providers:
            fused = [b for b in fused if b in args.providers]
        use_compile = args.compile and (not args.providers or "compile" in args.providers)
        if use_compile:
            torch._dynamo.reset()
        C.log(f"[bench_ops] {case.op} {case.shape}: providers eager"
              f"{', compile' if use_compile else ''}{''.join(', ' + b for b in fused)}")
        inp = case.build(device, dtype)
        fns = provider_fns(case, fused, use_compile)

        # warm-up (compiles the compile provider's forward and backward graphs) + parity check
        ref_out = fns["eager"](*inp.make_args())
        grad_out = torch.randn(ref_out.shape, generator=_gen(7)).to(device=device, dtype=dtype)
        ref_grads = torch.autograd.grad(ref_out, inp.leaves, grad_out)
        info: Dict[str, dict] = {}
        for name, fn in list(fns.items()):
            try:
                start = time.perf_counter()
                out = fn(*inp.make_args())
                grads = torch.autograd.grad(out, inp.leaves, grad_out)
                C.synchronize(device)
                warm_s = time.perf_counter() - start
                err = _max_rel_err([out, *grads], [ref_out, *ref_grads])
                info[name] = {"max_rel_err": err}
                if name == "compile":
                    info[name]["compile_s"] = round(warm_s, 3)
                if err > _tolerance(dtype):
                    C.log(f"  WARNING: {name} differs from eager: max rel err {err:.3g}")
            except Exception as exc:  # a failing provider must not kill the benchmark
                C.log(f"  {name}: failed during warm-up: {type(exc).__name__}: {exc}")
                info[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
                del fns[name]
        del ref_out, ref_grads

        for mode in args.modes:
            callables = {}
            for name, fn in fns.items():
                try:
                    callables[name] = mode_callable(fn, inp, grad_out, mode)
                except Exception as exc:
                    info[name] = {**info.get(name, {}), "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            try:
                timings = C.measure(callables, device, **timing_kw)
            except Exception as exc:
                C.log(f"  {mode}: timing failed: {type(exc).__name__}: {exc}")
                timings = {}
            callables.clear()
            cost = op_cost(case.op, case.dims, mode, elem)
            eager = timings.get("eager")
            comp = timings.get("compile")
            names = ["eager"] + (["compile"] if use_compile else []) + fused
            for name in names:
                t = timings.get(name)
                row = {
                    "op": case.op, "shape": case.shape, "mode": mode, "provider": name,
                    "device": device, "dtype": str(dtype).replace("torch.", ""), "dims": case.dims,
                }
                if t is None:
                    row["error"] = info.get(name, {}).get("error", "not timed")
                    rows.append(row)
                    continue
                row.update(t.as_dict())
                row["speedup_vs_eager"] = eager.median_ms / t.median_ms if eager else None
                row["speedup_vs_compile"] = (
                    comp.median_ms / t.median_ms if comp and name not in ("eager", "compile") else None
                )
                row.update({k: v for k, v in info.get(name, {}).items()})
                row["bytes"] = cost["bytes"]
                row["flops"] = cost["flops"]
                s = t.median_ms / 1e3
                row["achieved_gbps"] = cost["bytes"] / s / 1e9
                row["achieved_gflops"] = cost["flops"] / s / 1e9 if cost["flops"] else None
                add_roofline(row, peaks)
                rows.append(row)
                C.log(f"  {mode:8s} {name:8s} {t.median_ms:9.4f} ms"
                      + (f"  x{row['speedup_vs_eager']:.2f} vs eager" if row["speedup_vs_eager"] else ""))
        del inp, fns
        if on_case is not None:
            on_case(rows)
    return rows


def _rate(r: dict) -> str:
    """The row's achieved rate in the unit that matters for it: GB/s for the sine ops, GFLOP/s
    (TFLOP/s from 1000 GFLOP/s up) for the attention."""
    g = r.get("achieved_gflops")
    if g:
        return f"{g / 1e3:.2f} TFLOP/s" if g >= 1e3 else f"{g:.1f} GFLOP/s"
    return f"{r['achieved_gbps']:.1f} GB/s"


def ops_table(rows: List[dict], roofline: bool) -> str:
    headers = ["op", "shape", "mode", "provider", "median ms", "IQR ms", "vs eager", "vs compile"]
    align = "lllrrrrr"
    if roofline:
        headers += ["achieved", "% of peak"]
        align += "rr"
    out = []
    for r in rows:
        if "median_ms" not in r:
            cells = [r["op"], r["shape"], r["mode"], r["provider"], "error", "", "", ""]
            if roofline:
                cells += ["", ""]
            out.append(cells)
            continue
        cells = [
            r["op"], r["shape"], r["mode"], r["provider"], f"{r['median_ms']:.4f}", f"{r['iqr_ms']:.4f}",
            C.fmt_x(r.get("speedup_vs_eager")), C.fmt_x(r.get("speedup_vs_compile")),
        ]
        if roofline:
            pct = r.get("pct_of_peak")
            cells += [_rate(r), f"{pct:.0f}% {r['peak_kind']}" if pct is not None else "—"]
        out.append(cells)
    return C.markdown_table(headers, out, align)


def peaks_table(peaks: dict, device: str, name: str) -> str:
    """The measured per-device peak table the '% of peak' column refers to."""
    mm = peaks["matmul_gflops"]
    rows = [
        [name, "copy bandwidth", f"{peaks['copy_gbps']:.1f} GB/s",
         f"y.copy_(x), {C.fmt_bytes(peaks['copy_bytes'])} float32, read + write"],
        [name, f"matmul rate ({peaks['matmul_dtype']})", f"{mm / 1e3:.2f} TFLOP/s" if mm >= 1e3 else f"{mm:.1f} GFLOP/s",
         f"torch.mm {peaks['matmul_n']}x{peaks['matmul_n']}, 2n³ flops"],
    ]
    return (f"Peaks measured on this {device} (torch threads: {peaks['threads']}) for '% of peak': 'copy' for the sine "
            "ops (compulsory bytes), 'matmul' for the attention (flops.attention_flops):\n\n"
            + C.markdown_table(["device", "peak", "measured", "how"], rows, "llrl"))


# ---------------------------------------------------------------------------------------------
# memory demonstration


def _run_attention_fwd_bwd(fn: Callable, inp: Inputs, device: str) -> Dict[str, float]:
    """One forward + backward of ``fn`` with timing and peak memory; returns seconds and bytes."""
    with C.PeakMemory(device) as pm:
        C.synchronize(device)
        t0 = time.perf_counter()
        out = fn(*inp.make_args())
        C.synchronize(device)
        t1 = time.perf_counter()
        grads = torch.autograd.grad(out, inp.leaves, torch.ones_like(out))
        C.synchronize(device)
        t2 = time.perf_counter()
        del out, grads
    return {"fwd_s": t1 - t0, "bwd_s": t2 - t1, "peak_bytes": pm.peak, "peak_method": pm.method}


def _inputs_bytes(B, H, Nq, D, Nk, elem) -> int:
    return 2 * Nq * B * H * D * elem + 3 * Nk * B * H * D * elem + B * Nk


def eager_attention_worker(spec: dict) -> dict:
    """Runs in a subprocess (``--_worker JSON``): the eager attention forward+backward once, with
    optional ``RLIMIT_AS`` budget (bytes on top of the address space in use after setup)."""
    import resource

    C.set_threads(spec.get("threads"))
    device, dtype = spec["device"], C.DTYPES[spec["dtype"]]
    B, H, Nq, D, Nk = (spec[k] for k in ("B", "H", "Nq", "D", "Nk"))
    fn = attention_case(B, Nq, H, D, Nk, None).public
    eager = lambda *a: fn(*a, backend="torch")  # noqa: E731
    small = attention_inputs(B, 4, H, D, 8, None, device, dtype)
    o = eager(*small.make_args())
    torch.autograd.grad(o, small.leaves, torch.ones_like(o))  # load kernels, start the thread pool
    inp = attention_inputs(B, Nq, H, D, Nk, None, device, dtype)
    res = {"status": "ok", "Nk": Nk}
    if spec.get("budget_bytes"):
        base = C.vm_size_bytes() or 0
        limit = base + int(spec["budget_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        res["rlimit_as_bytes"] = limit
    try:
        res.update(_run_attention_fwd_bwd(eager, inp, device))
    except (RuntimeError, MemoryError) as exc:
        msg = str(exc)
        m = re.search(r"(DefaultCPUAllocator: can't allocate memory).*?allocate (\d+) bytes", msg)
        if m:
            msg = f"{m.group(1)} ({C.fmt_bytes(int(m.group(2)))} requested)"
        elif "out of memory" in msg.lower():
            msg = msg.splitlines()[0][:200]
        else:
            raise
        res = {**res, "status": "oom", "error": f"{type(exc).__name__}: {msg}"}
    return res


def _worker_subprocess(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout:.0f} s"}
    for line in reversed(r.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    if r.returncode < 0:
        sig = signal.Signals(-r.returncode).name
        why = " (the kernel's OOM killer)" if sig == "SIGKILL" else ""
        return {"status": "killed", "error": f"killed by {sig}{why}"}
    return {"status": "error", "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}


def eager_memory_model(device, dtype, B, H, Nq, D, threads) -> dict:
    """Peak memory of eager forward+backward above its inputs, as ``a + b·Nk``, fitted from two
    runs at small Nk (CPU: fresh subprocesses, RSS high-water mark; CUDA: max_memory_allocated)."""
    elem = torch.empty((), dtype=dtype).element_size()
    nk1 = max(64, int(round(250e6 / (B * H * Nq * elem), -1)))
    nk2 = 2 * nk1
    peaks = []
    for nk in (nk1, nk2):
        spec = {"device": device, "dtype": str(dtype).replace("torch.", ""), "B": B, "H": H, "Nq": Nq,
                "D": D, "Nk": nk, "threads": threads}
        if torch.device(device).type == "cuda":
            r = eager_attention_worker(spec)
            torch.cuda.empty_cache()
        else:
            r = _worker_subprocess(spec, timeout=600)
        if r.get("status") != "ok":
            raise RuntimeError(f"eager memory probe at Nk={nk} failed: {r}")
        peaks.append(r["peak_bytes"])
    b = (peaks[1] - peaks[0]) / (nk2 - nk1)
    a = peaks[0] - b * nk1
    per_buffer = B * H * Nq * elem
    return {"a_bytes": a, "b_bytes_per_key": b, "probe_nk": [nk1, nk2], "probe_peak_bytes": peaks,
            "buffers": b / per_buffer, "method": r.get("peak_method")}


def memory_demo(args, device: str, dtype: torch.dtype) -> dict:
    """The fused attention's O(N) memory, shown where the eager O(B·H·Nq·Nk) cannot run.

    1. Eager's peak (above its inputs) is measured at two small Nk and fitted as ``a + b·Nk``
       (``b / (B·H·Nq·elem)`` = the number of B·H·Nq·Nk buffers it keeps alive at its peak).
    2. Nk (unless ``--memory-nk``): the smallest multiple of 1000, ≥ 20000, at which eager's
       requirement (inputs + peak) exceeds 1.1 x the machine's memory (CPU: MemTotal or the
       cgroup limit; CUDA: the GPU's total memory). One float32 B·H·Nq·Nk buffer is then > 4 GB.
    3. Each fused backend runs forward + backward there, in this process: time and peak memory.
    4. Eager (CPU) is not run by default (on a shared machine, touching tens of GB hurts others): the
       report says "needs X GB > Y GB available, not run". ``--memory-run-eager`` runs it in a
       subprocess; when it needs more than MemAvailable, the subprocess's address space is capped at
       MemAvailable (``RLIMIT_AS`` on top of what it has mapped after setup) so that it fails with
       an allocation error — reported as "oom" — instead of waking the OOM killer. CUDA: eager is
       attempted in process; an out-of-memory error is caught and reported.
    ``--memory-budget-gb`` replaces the machine's memory figures (to rehearse on a big machine).
    Peak memory: see ``_common.PeakMemory`` (CPU: RSS high-water mark above the level after the
    inputs were made, so it includes the gradients; CUDA: max_memory_allocated).
    """
    B, H, Nq, D = args.memory_shape
    elem = torch.empty((), dtype=dtype).element_size()
    cuda = torch.device(device).type == "cuda"
    threads = torch.get_num_threads()
    C.log(f"[memory] measuring eager's memory at small Nk (B={B} H={H} Nq={Nq} D={D}, {dtype})")
    model = eager_memory_model(device, dtype, B, H, Nq, D, threads)

    def eager_need(nk):
        return _inputs_bytes(B, H, Nq, D, nk, elem) + model["a_bytes"] + model["b_bytes_per_key"] * nk

    if cuda:
        free, total = torch.cuda.mem_get_info()
        budget = {"gpu_total": total, "gpu_free": free}
        budget_total, available = total, free
    else:
        budget = C.host_memory_budget()
        budget_total, available = budget["budget_total"], budget["mem_available"]
    if args.memory_budget_gb:
        budget["override_bytes"] = int(args.memory_budget_gb * 1e9)
        budget_total = available = budget["override_bytes"]
    if args.memory_nk:
        Nk = args.memory_nk
    else:
        Nk = 20000
        while budget_total and eager_need(Nk) <= 1.1 * budget_total and Nk < 10_000_000:
            Nk += 1000
    per_buffer_f32 = B * H * Nq * Nk * 4
    need = eager_need(Nk)
    res = {
        "shape": {"B": B, "H": H, "Nq": Nq, "Dc": D, "Dp": D, "Dv": D, "Nk": Nk},
        "dtype": str(dtype).replace("torch.", ""), "device": device,
        "bhqk_buffer_bytes_float32": per_buffer_f32, "bhqk_buffer_bytes": B * H * Nq * Nk * elem,
        "inputs_bytes": _inputs_bytes(B, H, Nq, D, Nk, elem),
        "memory": budget, "eager_model": model, "eager_need_bytes": need, "providers": {},
    }
    label = f"B={B} H={H} Nq={Nq} Nk={Nk} D={D}"
    C.log(f"[memory] {label}: one B·H·Nq·Nk float32 buffer = {C.fmt_bytes(per_buffer_f32)}; "
          f"eager needs ≈ {C.fmt_bytes(need)} ({model['buffers']:.2f} such buffers at its peak)")

    fused = [b for b in ops.available_backends(device, "content_position_attention") if b != "torch"]
    case = attention_case(B, Nq, H, D, Nk, None)
    for b in fused:
        fn = (lambda bk: (lambda *a: case.public(*a, backend=bk)))(b)
        small = attention_inputs(B, 4, H, D, 8, None, device, dtype)
        o = fn(*small.make_args())
        torch.autograd.grad(o, small.leaves, torch.ones_like(o))
        del o, small
        C.log(f"[memory] fused '{b}' forward+backward at {label} ...")
        inp = attention_inputs(B, Nq, H, D, Nk, None, device, dtype)
        try:
            r = _run_attention_fwd_bwd(fn, inp, device)
            r["status"] = "ok"
        except (RuntimeError, MemoryError) as exc:
            r = {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        del inp
        if cuda:
            torch.cuda.empty_cache()
        res["providers"][b] = r
    if not fused:
        C.log("[memory] no fused backend for content_position_attention on this device: nothing to run")

    spec = {"device": device, "dtype": res["dtype"], "B": B, "H": H, "Nq": Nq, "D": D, "Nk": Nk,
            "threads": threads}
    fits = bool(available) and need < 0.9 * available
    if cuda:
        C.log("[memory] eager: attempting in process (a CUDA out-of-memory error is caught) ...")
        r = eager_attention_worker(spec)
        torch.cuda.empty_cache()
    elif args.memory_run_eager and available:
        if not fits:
            spec["budget_bytes"] = int(available)
        C.log("[memory] eager: running in a subprocess"
              + ("" if fits else f" with its address space capped at {C.fmt_bytes(available)} (RLIMIT_AS)") + " ...")
        r = _worker_subprocess(spec, timeout=3600)
        if not fits and r.get("status") == "oom":
            r["reason"] = (f"out of memory under a {C.fmt_bytes(available)} cap (needs ≈ {C.fmt_bytes(need)}): "
                           + r.get("error", ""))
    elif fits:
        r = {"status": "not run",
             "reason": f"would fit (needs ≈ {C.fmt_bytes(need)} of {C.fmt_bytes(available)} available); "
                       "--memory-run-eager runs it"}
    else:
        r = {"status": "not run",
             "reason": f"needs ≈ {C.fmt_bytes(need)} > {C.fmt_bytes(available)} available "
                       f"(machine total {C.fmt_bytes(budget_total)})"}
    res["providers"]["eager"] = r
    return res


def memory_table(res: dict) -> str:
    s = res["shape"]
    lines = [
        f"### Memory: content_position_attention forward+backward, {res['device']}, {res['dtype']}",
        "",
        f"Shape B={s['B']} H={s['H']} Nq={s['Nq']} Nk={s['Nk']} Dc=Dp=Dv={s['Dc']}: one B·H·Nq·Nk float32 "
        f"buffer = {C.fmt_bytes(res['bhqk_buffer_bytes_float32'])}; inputs = {C.fmt_bytes(res['inputs_bytes'])}. "
        f"Eager keeps ≈ {res['eager_model']['buffers']:.2f} B·H·Nq·Nk buffers alive at its peak "
        f"(measured at Nk={res['eager_model']['probe_nk']}, extrapolated): needs ≈ "
        f"{C.fmt_bytes(res['eager_need_bytes'])} in all.",
    ]
    mem = res["memory"]
    if mem.get("override_bytes"):
        lines.append(f"Memory budget set by --memory-budget-gb: {C.fmt_bytes(mem['override_bytes'])}.")
    if "gpu_total" in mem:
        lines.append(f"GPU memory: {C.fmt_bytes(mem['gpu_total'])} total, {C.fmt_bytes(mem['gpu_free'])} free.")
    else:
        lines.append(
            f"Host memory: MemTotal {C.fmt_bytes(mem['mem_total'])}, MemAvailable {C.fmt_bytes(mem['mem_available'])}"
            + (f", cgroup limit {C.fmt_bytes(mem['cgroup_limit'])}" if mem.get("cgroup_limit") else "") + "."
        )
    lines.append("")
    rows = []
    for name, r in res["providers"].items():
        if r.get("status") == "ok":
            total = r["peak_bytes"] + res["inputs_bytes"]
            rows.append([name, "ok", f"{r['fwd_s']:.2f}", f"{r['bwd_s']:.2f}", f"{r['fwd_s'] + r['bwd_s']:.2f}",
                         C.fmt_bytes(r["peak_bytes"]), C.fmt_bytes(total)])
        else:
            why = r.get("reason") or r.get("error") or ""
            rows.append([name, f"{r.get('status')}: {why}", "—", "—", "—", "—", "—"])
    if not any(n != "eager" for n in res["providers"]):
        rows.insert(0, ["fused", "no fused backend available on this device", "—", "—", "—", "—", "—"])
    lines.append(C.markdown_table(
        ["provider", "status", "fwd s", "bwd s", "fwd+bwd s", "peak above inputs", "peak incl. inputs"],
        rows, "llrrrrr"))
    methods = {r.get("peak_method") for r in res["providers"].values() if r.get("peak_method")}
    if methods:
        lines += ["", "Peak memory measured as: " + "; ".join(sorted(methods)) + "."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--ops", default="all",
                   help=f"comma-separated subset of {', '.join(OPS)} (aliases: sine, sine2d, msq, attention), "
                        "'all' or 'none'")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of providers to run besides eager (compile, cpu, cuda, triton)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few samples (CI smoke test)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile provider")
    p.add_argument("--iters", type=int, default=None, help="samples per measurement (overrides --min-time)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of samples per provider and measurement (default 1.0; --quick 0.02)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls before timing (default 3; --quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--malloc", choices=C.MALLOC_CHOICES, default="retain", help=C.MALLOC_HELP)
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/ops_<device>_<dtype>_<host or gpu>.json); "
                        "'-' for none")
    p.add_argument("--csv", default=None, help="also write the rows as CSV here")
    p.add_argument("--roofline", dest="roofline", action="store_true", default=True,
                   help="achieved GB/s or GFLOP/s columns and %% of the measured device peaks (default)")
    p.add_argument("--no-roofline", dest="roofline", action="store_false",
                   help="skip the peak measurement and the roofline columns")
    p.add_argument("--memory", action="store_true",
                   help="also run the memory demonstration (fused attention at a > 4 GB-per-buffer size)")
    p.add_argument("--memory-only", action="store_true", help="run only the memory demonstration")
    p.add_argument("--memory-shape", default="8,8,900,32", help="B,H,Nq,D of the memory demonstration")
    p.add_argument("--memory-nk", type=int, default=None,
                   help="Nk of the memory demonstration (default: smallest >= 20000 that eager cannot fit)")
    p.add_argument("--memory-run-eager", action="store_true",
                   help="CPU: also run eager (subprocess). If it needs more than MemAvailable, its address "
                        "space is capped there (RLIMIT_AS) so it fails with an allocation error, reported; "
                        "this touches up to MemAvailable of memory first: use a quiet machine")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="treat this many GB as the machine's memory (total and available) instead of /proc/meminfo")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker is None:
        args.device = args.device or C.default_device()
        if args.device == "cuda" and not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device")
        args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
        names = [s.strip() for s in args.ops.split(",") if s.strip()]
        if args.memory_only or names == ["none"]:
            names = []
        elif names == ["all"]:
            names = list(OPS)
        resolved = []
        for n in names:
            n = ALIASES.get(n, n)
            if n not in OPS:
                p.error(f"--ops: unknown op {n!r}; expected some of {', '.join(OPS)}")
            if n not in resolved:
                resolved.append(n)
        args.ops = resolved
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        for m in args.modes:
            if m not in MODES:
                p.error(f"--modes: unknown mode {m!r}; expected some of {', '.join(MODES)}")
        args.providers = [s.strip() for s in args.providers.split(",")] if args.providers else None
        try:
            args.memory_shape = tuple(int(x) for x in args.memory_shape.split(","))
            assert len(args.memory_shape) == 4
        except (ValueError, AssertionError):
            p.error("--memory-shape: expected B,H,Nq,D")
        args.memory = args.memory or args.memory_only
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker is not None:
        print(json.dumps(eager_attention_worker(json.loads(args._worker))), flush=True)
        return 0

    threads = C.set_threads(args.threads)
    device, dtype = args.device, C.DTYPES[args.dtype]
    malloc = C.apply_malloc_policy(device, args.malloc)
    if args.quick:
        timing_kw = dict(min_time=0.02, min_samples=3, max_samples=5, warmup=1)
    else:
        timing_kw = dict(min_time=1.0, min_samples=7, max_samples=200, warmup=3)
    if args.min_time is not None:
        timing_kw["min_time"] = args.min_time
    if args.warmup is not None:
        timing_kw["warmup"] = args.warmup
    if args.iters is not None:
        timing_kw["iters"] = args.iters

    backends = {op: ops.available_backends(device, k) for op, k in OPS.items()}
    env = C.environment(device, {"available_backends": backends})
    C.log(f"[bench_ops] {device} {args.dtype}, {threads} threads, torch {torch.__version__}, "
          f"git {env['git']['sha'] and env['git']['sha'][:10]}{' (dirty)' if env['git']['dirty'] else ''}")

    busy = C.busy_warning()
    if busy:
        C.log(f"[bench_ops] WARNING: {busy}")
        env["busy_warning"] = busy
    peaks = None
    if args.roofline and args.ops:
        C.log("[bench_ops] measuring this device's copy bandwidth and matmul rate (roofline peaks) ...")
        peaks = C.device_peaks(device, dtype, quick=args.quick)
    out = None
    if args.out != "-":
        out = Path(args.out) if args.out else (
            C.RESULTS_DIR / f"ops_{device}_{args.dtype}_{C.machine_tag(device)}.json")

    def payload(rows, mem, complete):
        return {
            "benchmark": "bench_ops",
            "complete": complete,  # False: written after a case, the run did not finish (yet)
            "environment": env,
            "settings": {"device": device, "dtype": args.dtype, "quick": args.quick, "modes": args.modes,
                         "ops": args.ops, "compile": args.compile, "timing": timing_kw, "malloc": malloc},
            "peaks": peaks,
            "rows": rows,
            "memory": mem,
        }

    def save_partial(rows):
        if out is not None:
            C.write_json(out, payload(rows, None, False))

    rows = run_ops(args, device, dtype, timing_kw, peaks, on_case=save_partial) if args.ops else []
    mem = memory_demo(args, device, dtype) if args.memory else None

    title = (f"## dabdetr op benchmarks — {device}, {args.dtype}, "
             f"{env.get('gpu', {}).get('name') or C.cpu_label(env)} ({threads} threads), torch {torch.__version__}")
    print(title + "\n")
    if rows:
        print(ops_table(rows, peaks is not None))
        print("\nmedian of round-robin samples; 'vs eager' = eager median / provider median; "
              "'vs compile' likewise for the fused backends. fwd = forward with autograd recording; "
              "bwd = backward only (forward untimed, fresh graph per call); fwd+bwd = both."
              + (f" CPU memory policy (`--malloc`): {malloc}." if torch.device(device).type == "cpu" else ""))
        if peaks:
            name = env.get("gpu", {}).get("name") or C.cpu_label(env) or device
            print("\n" + peaks_table(peaks, device, name))
    if mem:
        print("\n" + memory_table(mem))

    env["load_average_end"] = C.load_average()
    if out is not None:
        C.write_json(out, payload(rows, mem, True))
        C.log(f"[bench_ops] wrote {out}")
    if args.csv:
        C.write_csv(Path(args.csv), rows)
        C.log(f"[bench_ops] wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
