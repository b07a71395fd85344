"""Model-level benchmark of DAB-DETR: train step, inference, memory, FLOPs and where the time goes.

Usage (from the repository root; also ``dabdetr bench model ...``)::

    python benchmarks/bench_model.py                                  # r50, 800x1333, batch 1
    python benchmarks/bench_model.py --case 800x1333:1 --case 512x512:2
    python benchmarks/bench_model.py --device cuda --case 800x1333:2  # + bf16 providers on CUDA
    python benchmarks/bench_model.py --quick                          # tiny preset (CI smoke test)

Providers (``--providers``, comma-separated; ``eager`` is always run, it is the baseline). A provider
is a base and ``+`` options:
    eager           ``backend="torch"``: the original implementation's formulation — every fused op
                    runs its reference, frozen BN is the original's ``x * s + b`` after each
                    convolution, the self-attentions as ``nn.MultiheadAttention`` computes them
                    (materialised probabilities) from one GEMM per projection, torch's default
                    AdamW (a per-parameter loop on the CPU).
    fused           ``backend=None``, the library's default settings (what ``dabdetr train`` runs):
                    the best fused backend for the device (``cpu``, ``cuda`` ...), frozen BN folded
                    into the convolutions (``backbone.conv_norm``), on the CPU (frozen stem)
                    channels-last backbone activations, 3x3 weight gradients from NCHW copies
                    (``backbone._ConvNCHWWeightGrad``), the 3x3 stride-1 convolutions of >= 128
                    channels as Winograd F(2, 3) (mode "f2": less float32 error than the direct
                    ones, fewer multiply-adds), the first decoder layer's self-attention over zero
                    content as its constant, SDPA for the self-attentions (on the CPU
                    the content/position attention kernel, ``transformer._attention``),
                    projections that share an input in one GEMM (the decoder's key side for all
                    layers, the encoder's q|k, the decoder self-attention's), on the CPU the
                    FFNs' PReLU backward from vectorised kernels (``transformer.PReLU``), torch's
                    fused AdamW (``engine.build_optimizer``).
    +compile        ``torch.compile`` of the model (``dynamic=False``; the fused ops are opaque
                    custom ops in the graph). Compiled and warmed up outside the timed region
                    (``setup_s`` in the JSON).
    +bf16           ``torch.autocast(dtype=bfloat16)`` around the forward (the loss in float32, as
                    the trainer does).
    +cl             channels_last model weights and images (``fused`` on the CPU already runs
                    channels-last activations; this also changes ``eager``).
    +fusedopt       ``AdamW(fused=True)`` (already the default of ``fused``; changes ``eager``).
    +winograd       (fused only) on the CPU, the backbone's 3x3 stride-1 convolutions of >= 64
                    channels on maps with enough tiles as Winograd F(4, 3) / F(2, 3) (the backbone
                    mode "f4", ``ResNet.cpu_winograd``, ``models/winograd.py``): fewer
                    multiply-adds than the default "f2" (F(2, 3) from 128 channels), ~4-8x the
                    direct convolution's float32 error (not under autocast).
    +direct         (fused only) the backbone's direct convolutions (mode "off": no Winograd
                    F(2, 3) either; the fused default before it).
Default: eager, fused, fused+compile (on the CPU also fused+winograd and fused+compile+winograd),
and with ``--bf16`` (default on CUDA, off on the CPU) each of them but the +winograd ones +bf16. Every provider starts from the same weights (one model is built, each provider gets a
copy, and its weights are reset from that state dict before each measurement).

Measured per case (``--case HxW:B``, repeatable; default ``--size 800x1333 --batch 1``), on synthetic
data: random images, the bottom/right of images 1, 3, ... padded (mask), 2-6 random boxes per image
with random labels in ``[0, num_classes)``.
    train step      forward (train mode) + criterion (Hungarian matcher + losses, ``build_criterion``)
                    + backward + ``clip_grad_norm_`` (the recipe's 0.1) + AdamW step (the recipe's
                    two parameter groups) + ``zero_grad(set_to_none=True)``: the trainer's step.
    inference       eval mode, ``torch.no_grad()``: forward + top-k post-processing; images/s.
    decoder fwd+bwd the transformer decoder alone (6 layers + anchor updates) on fixed inputs of the
                    case's shapes: random ``memory [B, HW, d]`` (a leaf with grad), the model's image
                    position embedding and downsampled mask, the learnt anchors, zero content
                    queries; forward, then backward of a fixed random projection of (hs, references)
                    into every decoder parameter, the anchors and ``memory``.
    memory          peak of one train step and of one inference call above the level before it
                    (weights, gradients-free, optimizer states already allocated). CUDA:
                    ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the start.
                    CPU: tensor bytes from the allocator events of ``torch.profiler``
                    (``profile_memory=True``): the running sum of every CPU allocation and free in
                    the step, its maximum (the CPU analogue of max_memory_allocated; not the RSS).
    breakdown       one train step cut into phases by timestamps (synchronized on CUDA), median of
                    ``--breakdown-iters`` steps: forward hooks on the backbone (ResNet + position
                    embedding), the encoder and the decoder; tensor gradient hooks on their outputs
                    and inputs for the backward (decoder backward ends when the gradient of the
                    encoder output is complete, etc.); loss+matcher = the criterion's forward and
                    the backward down to the decoder outputs (heads); other = input_proj and heads'
                    forward, input_proj's backward; optimizer = clip + step + zero_grad. Compiled
                    providers are one graph: forward / loss+matcher / backward / optimizer only.
    top ops         ``torch.profiler`` table of one train step per provider (``--top-ops N``).
    FLOPs           :func:`dabdetr.models.flops.count` of the forward (``torch.utils.flop_counter``:
                    2 FLOPs per multiply-add; the fused ops have flop formulas) and MACs (= FLOPs/2,
                    the paper's unit), next to the paper's number (``flops.PAPER_GFLOPS``); achieved
                    GFLOP/s of inference (forward FLOPs / time) and of the train step (≈ 3x forward).

Process setting, the same for every provider: on the CPU the process keeps freed memory for reuse
(``--malloc retain``, the default, as ``dabdetr train`` does: :mod:`dabdetr.cpu_memory`); with
glibc's default (``--malloc default``) every activation-sized temporary is faulted in afresh, which
on this project's VMs costs the eager provider, with its larger temporaries, far more than the
fused ones (R50 800x1333:1 round-robin: eager 1.2 M faults per step).

Timing: ``--warmup`` untimed calls per provider (the first compiles), then ``--iters`` samples taken
round-robin over the providers (a shared machine's drift hits all alike); median and IQR;
``torch.cuda.synchronize`` / CUDA events on GPU (``_common.measure``).

Output: a Markdown report on stdout (progress on stderr): per case, the providers' times with the
ratios vs eager measured in this run, the breakdown, issue 7's acceptance ratios, the top ops; JSON
(rewritten after every case) and the same Markdown in ``benchmarks/results/model_<device>_<dtype>[_<tag>]``
``.json`` / ``.md`` (dtype: bfloat16 when bf16 providers run, else float32); a PNG bar chart of the
breakdown and the speedups when matplotlib is importable (skipped with a message otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `dabdetr` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks import _common as C

from dabdetr.engine import _to_float  # the trainer's cast of the model outputs before the loss
from dabdetr.models import DABDETR, flops, get_preset
from dabdetr.train_presets import parse_value

DEFAULT_PROVIDERS = ("eager", "fused", "fused+compile")
DEFAULT_PROVIDERS_CPU = DEFAULT_PROVIDERS + ("fused+winograd", "fused+compile+winograd")
OPTIONS = ("compile", "bf16", "cl", "fusedopt", "winograd", "direct")
PHASES_FULL = ("backbone fwd", "encoder fwd", "decoder fwd", "other fwd", "loss+matcher", "heads+loss bwd",
               "decoder bwd", "encoder bwd", "other bwd", "backbone bwd", "optimizer")
PHASES_COMPILED = ("forward", "loss+matcher", "backward", "optimizer")
CATEGORIES = {  # chart / summary groups of the phases
    "backbone": ("backbone fwd", "backbone bwd"),
    "encoder": ("encoder fwd", "encoder bwd"),
    "decoder": ("decoder fwd", "decoder bwd"),
    "loss+matcher": ("loss+matcher", "heads+loss bwd"),
    "other": ("other fwd", "other bwd"),
    "optimizer": ("optimizer",),
    "forward (one graph)": ("forward",),
    "backward (one graph)": ("backward",),
}
TARGETS = {"decoder": 1.5, "train": 1.1, "best": 1.3}  # issue 7's acceptance ratios vs eager


# ---------------------------------------------------------------------------------------------
# providers and cases


@dataclass(frozen=True)
class Provider:
    name: str
    backend: Optional[str]  # "torch" (eager) or None (automatic fused backend)
    compile: bool = False
    bf16: bool = False
    channels_last: bool = False
    fused_optimizer: bool = False
    winograd: bool = False  # the backbone's "f4" Winograd mode
    direct: bool = False  # the backbone's Winograd mode "off"

    @property
    def baseline(self) -> str:
        """The eager provider of the same precision (what 'vs eager' compares with)."""
        return "eager+bf16" if self.bf16 else "eager"


def parse_provider(name: str) -> Provider:
    parts = [p.strip() for p in name.strip().split("+")]
    base, opts = parts[0], parts[1:]
    if base not in ("eager", "fused"):
        raise ValueError(f"provider {name!r}: must start with 'eager' or 'fused'")
    unknown = [o for o in opts if o not in OPTIONS]
    if unknown:
        raise ValueError(f"provider {name!r}: unknown option(s) {unknown}; expected some of {', '.join(OPTIONS)}")
    canon = "+".join([base] + [o for o in OPTIONS if o in opts])  # fixed option order
    for opt in ("winograd", "direct"):
        if opt in opts and base == "eager":
            raise ValueError(f"provider {name!r}: +{opt} is an option of the fused backends (eager keeps the "
                             "original's convolutions)")
    if "winograd" in opts and "direct" in opts:
        raise ValueError(f"provider {name!r}: +winograd and +direct are two backbone modes; pick one")
    return Provider(canon, "torch" if base == "eager" else None, "compile" in opts, "bf16" in opts, "cl" in opts,
                    "fusedopt" in opts, "winograd" in opts, "direct" in opts)


def provider_list(names: Optional[Sequence[str]], bf16: bool, cpu: bool = False) -> List[Provider]:
    names = list(names) if names else list(DEFAULT_PROVIDERS_CPU if cpu else DEFAULT_PROVIDERS)
    if not names or parse_provider(names[0]).name != "eager":
        names = ["eager"] + [n for n in names if parse_provider(n).name != "eager"]
    provs = [parse_provider(n) for n in names]
    if bf16 and not any(p.bf16 for p in provs):
        # no +winograd+bf16: under autocast the backbone keeps the direct convolutions
        provs += [parse_provider(p.name + "+bf16") for p in provs if not p.winograd]
    if any(p.bf16 for p in provs) and not any(p.name == "eager+bf16" for p in provs):
        provs.insert(1, parse_provider("eager+bf16"))
    out: Dict[str, Provider] = {}
    for p in provs:
        out.setdefault(p.name, p)
    return list(out.values())


@dataclass(frozen=True)
class Case:
    H: int
    W: int
    B: int

    @property
    def label(self) -> str:
        return f"{self.H}x{self.W}:{self.B}"


def parse_case(text: str, default_batch: int = 1) -> Case:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*(?::\s*(\d+))?\s*", text)
    if not m:
        raise ValueError(f"bad case {text!r}: expected HxW or HxW:B, e.g. 800x1333:1")
    H, W = int(m.group(1)), int(m.group(2))
    B = int(m.group(3)) if m.group(3) else default_batch
    if min(H, W, B) < 1:
        raise ValueError(f"bad case {text!r}: sizes and batch must be >= 1")
    return Case(H, W, B)


def feature_size(n: int, stride: int) -> int:
    """Output size of the ResNet (every stride-2 stage rounds up) for an input of size ``n``."""
    for _ in range(int(round(math.log2(stride)))):
        n = (n + 1) // 2
    return n


def synthetic_batch(case: Case, num_classes: int, device: str, seed: int = 0):
    """Images ``[B,3,H,W]`` (zeros in the padding), mask ``[B,H,W]`` (True = padding: images 1, 3 ...
    are 85% x 70% of the padded size, as a batch of differently sized images) and targets."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(case.B, 3, case.H, case.W, generator=g)
    mask = torch.zeros(case.B, case.H, case.W, dtype=torch.bool)
    for i in range(1, case.B, 2):
        mask[i, math.ceil(case.H * 0.85):, :] = True
        mask[i, :, math.ceil(case.W * 0.7):] = True
    images.masked_fill_(mask[:, None], 0.0)
    targets = []
    for _ in range(case.B):
        n = int(torch.randint(2, 7, (1,), generator=g))
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.35 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=g).to(device),
                        "boxes": torch.cat([cxcy, wh], 1).to(device)})
    return images.to(device), mask.to(device), targets


# ---------------------------------------------------------------------------------------------
# phase timer (breakdown)


class PhaseTimer:
    """Timestamps (synchronized on CUDA) by name; the first mark of a name wins."""

    def __init__(self, device: str):
        self.device = device
        self.marks: Dict[str, float] = {}

    def mark(self, name: str) -> None:
        if name not in self.marks:
            C.synchronize(self.device)
            self.marks[name] = time.perf_counter()

    def span(self, a: str, b: str) -> Optional[float]:
        if a in self.marks and b in self.marks:
            return (self.marks[b] - self.marks[a]) * 1e3
        return None


def _grad_mark(t: Any, timer: PhaseTimer, name: str) -> None:
    if isinstance(t, Tensor) and t.requires_grad:
        t.register_hook(lambda g: timer.mark(name))


def install_breakdown_hooks(model: DABDETR, timer: PhaseTimer) -> List[Any]:
    """Forward hooks on backbone / encoder / decoder marking their forward spans, and gradient hooks
    on their outputs / inputs marking the backward spans. Returns the handles (remove them after)."""
    tr = model.transformer

    def pre(name):
        return lambda mod, args: timer.mark(f"{name}_fwd_start")

    def bb_post(mod, args, out):
        timer.mark("backbone_fwd_end")
        _grad_mark(out[0], timer, "backbone_bwd_start")

    def enc_pre(mod, args):
        timer.mark("encoder_fwd_start")
        _grad_mark(args[0], timer, "encoder_bwd_end")

    def enc_post(mod, args, out):
        timer.mark("encoder_fwd_end")
        _grad_mark(out, timer, "decoder_bwd_end")

    def dec_post(mod, args, out):
        timer.mark("decoder_fwd_end")
        for t in out:
            _grad_mark(t, timer, "decoder_bwd_start")

    return [
        model.backbone.register_forward_pre_hook(pre("backbone")),
        model.backbone.register_forward_hook(bb_post),
        tr.encoder.register_forward_pre_hook(enc_pre),
        tr.encoder.register_forward_hook(enc_post),
        tr.decoder.register_forward_pre_hook(pre("decoder")),
        tr.decoder.register_forward_hook(dec_post),
    ]


def phases_from_marks(t: PhaseTimer, compiled: bool) -> Dict[str, Optional[float]]:
    s = t.span
    if compiled:
        return {"forward": s("step_start", "fwd_end"), "loss+matcher": s("fwd_end", "loss_end"),
                "backward": s("loss_end", "bwd_end"), "optimizer": s("bwd_end", "step_end")}
    ph = {
        "backbone fwd": s("backbone_fwd_start", "backbone_fwd_end"),
        "encoder fwd": s("encoder_fwd_start", "encoder_fwd_end"),
        "decoder fwd": s("decoder_fwd_start", "decoder_fwd_end"),
        "loss+matcher": s("fwd_end", "loss_end"),
        "heads+loss bwd": s("loss_end", "decoder_bwd_start"),
        "decoder bwd": s("decoder_bwd_start", "decoder_bwd_end"),
        "encoder bwd": s("decoder_bwd_end", "encoder_bwd_end"),
        "other bwd": s("encoder_bwd_end", "backbone_bwd_start"),
        "backbone bwd": s("backbone_bwd_start", "bwd_end"),
        "optimizer": s("bwd_end", "step_end"),
    }
    fwd = s("step_start", "fwd_end")
    parts = [ph["backbone fwd"], ph["encoder fwd"], ph["decoder fwd"]]
    ph["other fwd"] = fwd - sum(parts) if fwd is not None and None not in parts else None
    return {k: ph[k] for k in PHASES_FULL}


# ---------------------------------------------------------------------------------------------
# one provider: model copy, optimizer, the step functions


class Runner:
    def __init__(self, prov: Provider, base: DABDETR, base_sd: Dict[str, Tensor], recipe, device: str,
                 batch, compile_backend: str = "inductor", compile_mode: Optional[str] = None):
        self.prov, self.device, self.base_sd = prov, device, base_sd
        model = copy.deepcopy(base)
        model.set_backend(prov.backend)
        if prov.winograd or prov.direct:  # else the model's default ("f2")
            model.backbone[0].body.cpu_winograd = "f4" if prov.winograd else "off"
        model.to(device)
        images, mask, targets = batch
        if prov.channels_last:
            model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        self.model, self.images, self.mask, self.targets = model, images, mask, targets
        self.compile_kw = dict(backend=compile_backend, mode=compile_mode, dynamic=False)
        self.fwd = torch.compile(model, **self.compile_kw) if prov.compile else model
        self.criterion = model.build_criterion()
        self.clip = recipe.clip_max_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        # eager: the original's optimizer (torch's default AdamW: a per-parameter loop on the CPU);
        # fused: what `dabdetr train` uses by default (engine.build_optimizer: torch's fused AdamW);
        # +fusedopt forces the fused AdamW on either.
        kw = {"fused": True} if (prov.fused_optimizer or prov.backend != "torch") else {}
        self.opt = torch.optim.AdamW(model.param_groups(recipe.lr, recipe.lr_backbone, recipe.weight_decay),
                                     lr=recipe.lr, weight_decay=recipe.weight_decay, **kw)
        self.timer: Optional[PhaseTimer] = None
        self.info: Dict[str, Any] = {}

    def autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.prov.bf16)

    def reset_weights(self) -> None:
        self.model.load_state_dict(self.base_sd)

    def _mark(self, name: str) -> None:
        if self.timer is not None:
            self.timer.mark(name)

    def train_step(self) -> Tensor:
        self.model.train()
        self._mark("step_start")
        with self.autocast():
            out = self.fwd(self.images, self.mask, targets=self.targets)  # as the trainer (query denoising)
        out = _to_float(out)
        self._mark("fwd_end")
        losses = self.criterion(out, self.targets)
        loss = self.criterion.total(losses)
        self._mark("loss_end")
        loss.backward()
        self._mark("bwd_end")
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._mark("step_end")
        return loss.detach()

    def _eval_forward(self) -> Dict[str, Any]:
        self.model.eval()
        with torch.no_grad(), self.autocast():
            return self.fwd(self.images, self.mask)

    def infer(self):
        out = self._eval_forward()
        sizes = [[self.images.shape[-2], self.images.shape[-1]]] * self.images.shape[0]
        return self.model.postprocess(out, sizes)

    def eval_outputs(self) -> Dict[str, Tensor]:
        out = self._eval_forward()
        return {"pred_logits": out["pred_logits"].float(), "pred_boxes": out["pred_boxes"].float()}

    def breakdown_step(self) -> Dict[str, Optional[float]]:
        self.timer = PhaseTimer(self.device)
        handles = [] if self.prov.compile else install_breakdown_hooks(self.model, self.timer)
        try:
            self.train_step()
        finally:
            for h in handles:
                h.remove()
            timer, self.timer = self.timer, None
        return phases_from_marks(timer, self.prov.compile)


# ---------------------------------------------------------------------------------------------
# the decoder alone


class DecoderBench:
    """Forward + backward of one provider's ``transformer.decoder`` on fixed inputs (see the module
    docstring); ``__call__`` runs one iteration."""

    def __init__(self, runner: Runner, case: Case, seed: int = 1):
        m, device = runner.model, runner.device
        d, stride = m.config.hidden_dim, m.backbone.stride
        h, w = feature_size(case.H, stride), feature_size(case.W, stride)
        g = torch.Generator().manual_seed(seed)
        mask_f = F.interpolate(runner.mask[None].float(), size=(h, w)).to(torch.bool)[0]
        with torch.no_grad():
            pos = m.backbone[1](mask_f).to(torch.float32).flatten(2).transpose(1, 2).contiguous()
        Q = m.config.num_queries * max(1, m.config.num_patterns)
        self.memory = torch.randn(case.B, h * w, d, generator=g).to(device).requires_grad_(True)
        self.pos, self.mask = pos, mask_f.flatten(1)
        self.tgt = torch.zeros(case.B, Q, d, device=device)
        self.g_hs = torch.randn(m.config.dec_layers, case.B, Q, d, generator=g).to(device)
        self.g_ref = torch.randn(m.config.dec_layers, case.B, Q, 4, generator=g).to(device)
        self.runner, self.model = runner, m
        dec = m.transformer.decoder
        self.dec = torch.compile(dec, **runner.compile_kw) if runner.prov.compile else dec
        self.hw = (h, w)

    def __call__(self) -> None:
        m = self.model
        m.train()
        anchors = m.refpoint_embed()
        if m.config.num_patterns > 0:
            anchors = anchors.repeat(m.config.num_patterns, 1)
        refpoints = anchors[None].expand(self.tgt.shape[0], -1, -1)
        with self.runner.autocast():
            hs, refs = self.dec(self.tgt, self.memory, self.pos, refpoints, self.mask, m.bbox_embed)
        loss = (hs.float() * self.g_hs).sum() + (refs.float() * self.g_ref).sum()
        loss.backward()
        m.zero_grad(set_to_none=True)
        self.memory.grad = None


# ---------------------------------------------------------------------------------------------
# memory and profiles


def _cpu_peak_from_profile(prof) -> Optional[int]:
    """Maximum of the running sum of CPU allocator events (bytes) recorded by the profiler."""
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # pragma: no cover - profiler internals differ
        return None
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def _top_ops(prof, cuda: bool, n: int) -> List[Dict[str, Any]]:
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = []
    avgs = prof.key_averages()
    total = sum(getattr(a, key, 0) for a in avgs) or 1
    for a in sorted(avgs, key=lambda a: getattr(a, key, 0), reverse=True)[:n]:
        rows.append({"op": a.key, "calls": a.count, "self_ms": getattr(a, key, 0) / 1e3,
                     "self_pct": 100.0 * getattr(a, key, 0) / total})
    return rows


def profiled_call(fn: Callable[[], object], device: str, top_ops: int) -> Dict[str, Any]:
    """Peak memory of one call of ``fn`` above the level before it (see the module docstring), and
    the profiler's top ops by self time when ``top_ops`` > 0."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    res: Dict[str, Any] = {}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res["memory_method"] = "torch.cuda.max_memory_allocated() - memory_allocated() at the start"
    else:
        res["memory_method"] = ("torch.profiler(profile_memory=True): max of the running sum of CPU allocations "
                                "and frees in the call (tensor bytes, not RSS)")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    need_prof = top_ops > 0 or not cuda
    ctx = profile(activities=acts, profile_memory=not cuda) if need_prof else contextlib.nullcontext()
    with ctx as prof:
        fn()
        C.synchronize(device)
    if cuda:
        res["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        res["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    else:
        res["peak_bytes"] = _cpu_peak_from_profile(prof)
    if top_ops > 0:
        res["top_ops"] = _top_ops(prof, cuda, top_ops)
    return res


# ---------------------------------------------------------------------------------------------
# FLOPs


def count_flops(preset: str, cfg, case: Case) -> Dict[str, Any]:
    try:
        r = flops.count(cfg, (case.H, case.W), case.B, by_module=True)
    except Exception as exc:  # the benchmark must still report
        return {"error": f"{type(exc).__name__}: {exc}"}
    r["preset"] = preset
    if cfg == get_preset(preset).model.replace(backend=cfg.backend) and preset in flops.PAPER_GFLOPS:
        r["paper_gflops"] = flops.PAPER_GFLOPS[preset]
        r["paper_note"] = "paper: multiply-adds (GMACs), at COCO's average input size"
    return r


# ---------------------------------------------------------------------------------------------
# the benchmark of one case


class Deadline:
    def __init__(self, seconds: Optional[float]):
        self.end = time.monotonic() + seconds if seconds else None

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def _median_phases(steps: List[Dict[str, Optional[float]]]) -> Dict[str, Optional[float]]:
    out = {}
    for k in steps[0]:
        vals = [s[k] for s in steps if s.get(k) is not None]
        out[k] = statistics.median(vals) if vals else None
    return out


def _try(res: Dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; on an exception record it under ``res['errors'][key]`` and return None."""
    try:
        return fn()
    except Exception as exc:
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ''}"
        C.log(f"  {key}: FAILED: {msg}")
        res.setdefault("errors", {})[key] = msg
        return None


def run_case(args, case: Case, providers: List[Provider], base: DABDETR, cfg, recipe, device: str,
             deadline: Deadline, res: Dict[str, Any], save: Callable[[], None] = lambda: None) -> Dict[str, Any]:
    """Fills ``res`` with the case's results, calling ``save()`` after each phase (so that a run
    killed by a time limit leaves its results so far)."""
    timing_kw = dict(iters=args.iters, warmup=0, inner=1)
    batch = synthetic_batch(case, cfg.num_classes, device, args.seed)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    res.update({"case": case.label, "H": case.H, "W": case.W, "B": case.B,
                "feature_hw": [feature_size(case.H, base.backbone.stride), feature_size(case.W, base.backbone.stride)],
                "num_targets": [int(t["labels"].numel()) for t in batch[2]],
                "providers": {}})
    res["flops"] = count_flops(args.preset, cfg, case)
    fl = res["flops"].get("flops")

    runners: Dict[str, Runner] = {}
    ref_out = None
    for prov in providers:
        pres = res["providers"].setdefault(prov.name, {
            "backend": prov.backend or "auto", "compile": prov.compile, "bf16": prov.bf16,
            "channels_last": prov.channels_last, "fused_optimizer": prov.fused_optimizer})
        if deadline.passed():
            pres["skipped"] = "time limit"
            continue
        C.log(f"[bench_model] {case.label} {prov.name}: setup + warm-up")
        r = _try(pres, "setup", lambda: Runner(prov, base, base_sd, recipe, device, batch, args.compile_backend,
                                               args.compile_mode))
        if r is None:
            continue
        t0 = time.perf_counter()
        ok = _try(pres, "warmup", lambda: [r.train_step() for _ in range(max(1, args.warmup))])
        if ok is None:
            continue
        out = _try(pres, "warmup_infer", r.eval_outputs)
        if out is None:
            continue
        for _ in range(max(0, args.warmup - 1)):
            r.infer()
        C.synchronize(device)
        pres["setup_s"] = round(time.perf_counter() - t0, 3)
        if prov.name == "eager":
            ref_out = out
        if ref_out is not None:
            pres["max_abs_diff_vs_eager"] = {k: (out[k] - ref_out[k]).abs().max().item() for k in ref_out}
        runners[prov.name] = r
        save()  # setups (a compile) can be long: what is set up so far survives a kill

    def reset():
        for r in runners.values():
            r.reset_weights()

    def allowed(phase: str) -> bool:
        """False (and the phase listed in ``skipped_phases``) once the time limit has passed."""
        if deadline.passed():
            res.setdefault("skipped_phases", []).append(phase)
            return False
        return True

    save()
    # train step / inference, round-robin over the providers
    for key, method in (("train_step", "train_step"), ("infer", "infer")):
        if not runners or not allowed(key):
            continue
        reset()
        C.log(f"[bench_model] {case.label}: timing {key} ({args.iters} samples x {len(runners)} providers)")
        fns = {n: getattr(r, method) for n, r in runners.items()}
        timings = _try(res, key, lambda: C.measure(fns, device, **timing_kw)) or {}
        for n, t in timings.items():
            res["providers"][n][key] = t.as_dict()
    for n, pres in res["providers"].items():
        prov = parse_provider(n)
        base_name = prov.baseline if prov.baseline in res["providers"] else "eager"
        tr, ti = pres.get("train_step"), pres.get("infer")
        btr, bti = res["providers"][base_name].get("train_step"), res["providers"][base_name].get("infer")
        etr, eti = res["providers"]["eager"].get("train_step"), res["providers"]["eager"].get("infer")
        if tr:
            pres["train_speedup_vs_eager"] = _ratio(btr and btr["median_ms"], tr["median_ms"])
            pres["train_speedup_vs_eager_fp32"] = _ratio(etr and etr["median_ms"], tr["median_ms"])
            if fl:
                pres["train_gflops_per_s_approx"] = 3 * fl / (tr["median_ms"] / 1e3) / 1e9
        if ti:
            pres["infer_images_per_s"] = case.B / (ti["median_ms"] / 1e3)
            pres["infer_speedup_vs_eager"] = _ratio(bti and bti["median_ms"], ti["median_ms"])
            pres["infer_speedup_vs_eager_fp32"] = _ratio(eti and eti["median_ms"], ti["median_ms"])
            if fl:
                pres["infer_gflops_per_s"] = fl / (ti["median_ms"] / 1e3) / 1e9

    save()
    # breakdown
    if args.breakdown_iters > 0 and runners and allowed("breakdown"):
        C.log(f"[bench_model] {case.label}: breakdown ({args.breakdown_iters} steps per provider)")
        reset()
        for n, r in runners.items():
            steps = _try(res["providers"][n], "breakdown",
                         lambda: [r.breakdown_step() for _ in range(args.breakdown_iters)])
            if steps:
                res["providers"][n]["breakdown_ms"] = _median_phases(steps)

    save()
    # memory + top ops
    if args.memory and runners and allowed("memory"):
        C.log(f"[bench_model] {case.label}: memory and top ops (one profiled train step / inference per provider)")
        reset()
        for n, r in runners.items():
            pres = res["providers"][n]
            tr = _try(pres, "memory_train", lambda: profiled_call(r.train_step, device, args.top_ops))
            if tr:
                pres["train_peak_bytes"] = tr["peak_bytes"]
                pres["memory_method"] = tr["memory_method"]
                if "top_ops" in tr:
                    pres["top_ops_train"] = tr["top_ops"]
                if "max_memory_allocated" in tr:
                    pres["train_max_memory_allocated"] = tr["max_memory_allocated"]
            ti = _try(pres, "memory_infer", lambda: profiled_call(r.infer, device, 0))
            if ti:
                pres["infer_peak_bytes"] = ti["peak_bytes"]

    save()
    # decoder forward + backward
    if args.decoder and runners and allowed("decoder"):
        reset()
        benches = {}
        for n, r in runners.items():
            if r.prov.channels_last or r.prov.fused_optimizer:
                continue  # the same decoder as without these options
            b = _try(res["providers"][n], "decoder_setup", lambda: DecoderBench(r, case))
            if b is not None and _try(res["providers"][n], "decoder_warmup",
                                      lambda: [b() for _ in range(max(1, args.warmup))]) is not None:
                benches[n] = b
        if benches:
            hw = next(iter(benches.values())).hw
            res["decoder_inputs"] = {"memory": [case.B, hw[0] * hw[1], cfg.hidden_dim],
                                     "queries": cfg.num_queries * max(1, cfg.num_patterns),
                                     "layers": cfg.dec_layers}
            C.log(f"[bench_model] {case.label}: timing decoder fwd+bwd ({len(benches)} providers)")
            timings = _try(res, "decoder", lambda: C.measure(dict(benches), device, **timing_kw)) or {}
            for n, t in timings.items():
                res["providers"][n]["decoder_fwd_bwd"] = t.as_dict()
            for n, t in timings.items():
                b = parse_provider(n).baseline
                bt = timings.get(b) or timings.get("eager")
                res["providers"][n]["decoder_speedup_vs_eager"] = _ratio(bt and bt.median_ms, t.median_ms)
        del benches

    res["acceptance"] = acceptance(res)
    runners.clear()
    return res


def acceptance(res: Dict[str, Any]) -> Dict[str, Any]:
    """Issue 7's ratios in this run (float32 providers vs eager): decoder fwd+bwd fused, train step
    fused (default settings), and the best non-eager float32 configuration's train step."""
    P = res["providers"]
    out: Dict[str, Any] = {}
    dec = P.get("fused", {}).get("decoder_speedup_vs_eager")
    out["decoder_fused_vs_eager"] = {"ratio": dec, "target": TARGETS["decoder"],
                                     "met": None if dec is None else dec >= TARGETS["decoder"]}
    tr = P.get("fused", {}).get("train_speedup_vs_eager")
    out["train_fused_vs_eager"] = {"ratio": tr, "target": TARGETS["train"],
                                   "met": None if tr is None else tr >= TARGETS["train"]}
    cands = {n: p.get("train_speedup_vs_eager") for n, p in P.items()
             if n != "eager" and not p.get("bf16") and p.get("train_speedup_vs_eager")}
    if cands:
        best = max(cands, key=cands.get)
        out["train_best_vs_eager"] = {"provider": best, "ratio": cands[best], "target": TARGETS["best"],
                                      "met": cands[best] >= TARGETS["best"]}
    else:
        out["train_best_vs_eager"] = {"provider": None, "ratio": None, "target": TARGETS["best"], "met": None}
    return out


# ---------------------------------------------------------------------------------------------
# report


def _ms(t: Optional[dict]) -> str:
    return f"{t['median_ms']:.1f}" if t else "—"


def _iqr(t: Optional[dict]) -> str:
    return f"{t['iqr_ms']:.1f}" if t else "—"


def _mem(v: Optional[int]) -> str:
    return C.fmt_bytes(v) if v is not None else "—"


def flops_line(fl: Dict[str, Any], case: Case) -> str:
    if "flops" not in fl:
        return f"FLOPs: not counted ({fl.get('error', '?')})."
    line = (f"FLOPs of the forward at {case.H}x{case.W}, batch {case.B} (torch.utils.flop_counter): "
            f"**{fl['gflops']:.1f} GFLOPs** (2 per multiply-add) = **{fl['gmacs']:.1f} GMACs**; "
            f"params {fl['params'] / 1e6:.2f} M")
    if "paper_gflops" in fl:
        line += (f"; the paper reports {fl['paper_gflops']} GFLOPs for {fl['preset']} (multiply-adds, i.e. "
                 f"comparable to GMACs per image: {fl['gmacs'] / case.B:.1f})")
    bm = fl.get("by_module") or {}
    if bm:
        line += " — by module (GFLOPs): " + ", ".join(
            f"{k.split('.', 1)[-1]} {v / 1e9:.1f}" for k, v in sorted(bm.items(), key=lambda kv: -kv[1]))
    return line + "."


def case_report(res: Dict[str, Any], top_ops: int) -> str:
    case = Case(res["H"], res["W"], res["B"])
    P = res["providers"]
    any_bf16 = any(p.get("bf16") for p in P.values())
    lines = [f"### {res['H']}x{res['W']}, batch {res['B']} (feature map {res['feature_hw'][0]}x"
             f"{res['feature_hw'][1]}, {sum(res['num_targets'])} target boxes)", ""]
    headers = ["provider", "train step ms", "IQR", "vs eager", "infer img/s", "vs eager", "decoder fwd+bwd ms",
               "vs eager", "train peak mem", "infer peak mem", "setup s"]
    align = "lrrrrrrrrrr"
    if any_bf16:
        headers.insert(4, "vs eager fp32")
        align += "r"
    rows = []
    for n, p in P.items():
        if "train_step" not in p and "infer" not in p:
            why = (p.get("skipped") or "; ".join(f"{k}: {v}" for k, v in p.get("errors", {}).items())
                   or ("set up; " + ", ".join(res["skipped_phases"]) + " skipped (time limit)"
                       if res.get("skipped_phases") else "not run"))
            rows.append([n, why] + [""] * (len(headers) - 2))
            continue
        row = [n, _ms(p.get("train_step")), _iqr(p.get("train_step")), C.fmt_x(p.get("train_speedup_vs_eager")),
               f"{p['infer_images_per_s']:.2f}" if p.get("infer_images_per_s") else "—",
               C.fmt_x(p.get("infer_speedup_vs_eager")), _ms(p.get("decoder_fwd_bwd")),
               C.fmt_x(p.get("decoder_speedup_vs_eager")), _mem(p.get("train_peak_bytes")), _mem(p.get("infer_peak_bytes")),
               f"{p['setup_s']:.1f}" if p.get("setup_s") is not None else "—"]
        if any_bf16:
            row.insert(4, C.fmt_x(p.get("train_speedup_vs_eager_fp32")))
        rows.append(row)
    lines.append(C.markdown_table(headers, rows, align))
    lines += ["", "'vs eager' = the eager provider of the same precision (eager for float32, eager+bf16 for +bf16) "
                  "/ this provider, medians of this run" + ("; 'vs eager fp32' = float32 eager / this provider"
                                                           if any_bf16 else "") + ".", ""]
    fl = res.get("flops", {})
    lines.append(flops_line(fl, case))
    gf = [(n, p.get("infer_gflops_per_s"), p.get("train_gflops_per_s_approx")) for n, p in P.items()
          if p.get("infer_gflops_per_s")]
    if gf:
        lines.append("Achieved: " + "; ".join(
            f"{n} {a:.1f} GFLOP/s inference" + (f", ≈{b:.1f} train (3x fwd FLOPs)" if b else "") for n, a, b in gf)
            + ".")
    diffs = {n: p["max_abs_diff_vs_eager"] for n, p in P.items() if p.get("max_abs_diff_vs_eager") and n != "eager"}
    if diffs:
        lines.append("Eval outputs vs eager (max abs diff, logits / boxes): " + "; ".join(
            f"{n} {d['pred_logits']:.2g} / {d['pred_boxes']:.2g}" for n, d in diffs.items()) + ".")

    bd = {n: p["breakdown_ms"] for n, p in P.items() if p.get("breakdown_ms")}
    if bd:
        phases = [ph for ph in dict.fromkeys(PHASES_FULL + PHASES_COMPILED)
                  if any(b.get(ph) is not None for b in bd.values())]
        rows = []
        for ph in phases:
            rows.append([ph] + [f"{b[ph]:.1f}" if b.get(ph) is not None else "" for b in bd.values()])
        rows.append(["**sum**"] + [f"**{sum(v for v in b.values() if v is not None):.1f}**" for b in bd.values()])
        lines += ["", "Breakdown of one train step (ms, median of the breakdown steps; see the docstring for the "
                      "phase boundaries):", "", C.markdown_table(["phase"] + list(bd), rows, "l" + "r" * len(bd))]
    acc = res.get("acceptance") or {}
    if acc:
        def fmt(key, label):
            a = acc.get(key) or {}
            if a.get("ratio") is None:
                return f"{label}: not measured"
            who = f" ({a['provider']})" if a.get("provider") else ""
            return f"{label}{who} **{a['ratio']:.2f}x** (target ≥ {a['target']}x: {'met' if a['met'] else 'NOT met'})"
        lines += ["", "Issue 7 acceptance, float32, this run: " + "; ".join([
            fmt("decoder_fused_vs_eager", "decoder fwd+bwd fused vs eager"),
            fmt("train_fused_vs_eager", "train step fused vs eager"),
            fmt("train_best_vs_eager", "best train step vs eager")]) + "."]
    if top_ops:
        for n, p in P.items():
            ops_ = p.get("top_ops_train")
            if not ops_:
                continue
            rows = [[o["op"][:60], o["calls"], f"{o['self_ms']:.1f}", f"{o['self_pct']:.1f}%"] for o in ops_]
            lines += ["", f"<details><summary>top ops of one train step, {n} (torch.profiler, self time)</summary>",
                      "", C.markdown_table(["op", "calls", "self ms", "share"], rows, "lrrr"), "", "</details>"]
    return "\n".join(lines)


def report(payload: Dict[str, Any]) -> str:
    env, s = payload["environment"], payload["settings"]
    dev = env.get("gpu", {}).get("name") or C.cpu_label(env)
    lines = [f"## dabdetr model benchmark — {s['preset']}, {s['device']} ({dev}, {env['torch_threads']} threads), "
             f"torch {env['torch']}", "",
             f"Providers: {', '.join(s['providers'])}. Train step = forward + criterion + backward + clip + AdamW "
             f"step; {s['iters']} round-robin samples after {s['warmup']} warm-up calls, median."
             + (f" CPU memory policy (`--malloc`, see the docstring): {s['malloc']}." if s.get("malloc") and s["device"] == "cpu"
                else ""),
             ""]
    if env.get("busy_warning"):
        lines += [f"> warning: {env['busy_warning']}", ""]
    for res in payload["cases"]:
        if "providers" not in res:
            lines += [f"### {res['case']}: {res.get('skipped', 'not run')}", ""]
            continue
        lines += [case_report(res, s["top_ops"]), ""]
    return "\n".join(lines)


def plot(payload: Dict[str, Any], path: Path) -> Optional[Path]:
    """A PNG per run: for each case, the breakdown as stacked bars and the speedups vs eager."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        C.log("[bench_model] matplotlib is not importable: no PNG chart (pip install matplotlib for one)")
        return None
    cases = payload["cases"]
    fig, axes = plt.subplots(len(cases), 2, figsize=(13, 4.2 * len(cases)), squeeze=False)
    for row, res in zip(axes, cases):
        P = {n: p for n, p in res["providers"].items() if p.get("breakdown_ms")}
        ax = row[0]
        names = list(P)
        bottom = [0.0] * len(names)
        for cat, phases in CATEGORIES.items():
            vals = [sum(P[n]["breakdown_ms"].get(ph) or 0.0 for ph in phases) for n in names]
            if any(vals):
                ax.bar(names, vals, bottom=bottom, label=cat)
                bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("ms per train step")
        ax.set_title(f"{res['case']}: train-step breakdown")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax = row[1]
        metrics = [("train_speedup_vs_eager", "train step"), ("infer_speedup_vs_eager", "inference"),
                   ("decoder_speedup_vs_eager", "decoder fwd+bwd")]
        provs = [n for n in res["providers"] if n not in ("eager", "eager+bf16")]
        width = 0.8 / max(1, len(metrics))
        for i, (key, label) in enumerate(metrics):
            vals = [res["providers"][n].get(key) or 0.0 for n in provs]
            bars = ax.bar([j + i * width for j in range(len(provs))], vals, width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + width for j in range(len(provs))])
        ax.set_xticklabels(provs, rotation=20, fontsize=8)
        ax.set_ylabel("speedup vs eager (same precision)")
        ax.set_title(f"{res['case']}: speedups")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# CLI


def _parse_set(items: Sequence[str]) -> Dict[str, Any]:
    """``--set key=value`` items (values parsed as the trainer's ``--set``; ``model.`` prefix optional)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip().removeprefix("model.")] = parse_value(v)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default=None, help="model preset (default r50; --quick: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field (e.g. num_classes=91)")
    p.add_argument("--size", default=None, help="HxW of the padded batch (default 800x1333; --quick: 96x128)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 1; --quick: 2)")
    p.add_argument("--case", action="append", default=[], metavar="HxW[:B]",
                   help="a case to run (repeatable; replaces --size/--batch), e.g. --case 800x1333:1 --case 512x512:2")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated providers (default: {','.join(DEFAULT_PROVIDERS)}; on the CPU also "
                        "fused+winograd, fused+compile+winograd); options: "
                        f"{', '.join('+' + o for o in OPTIONS)}")
    p.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                   help="add the +bf16 variant of each provider (default on CUDA)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="no +bf16 variants (default on the CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="drop the +compile providers")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--iters", type=int, default=None, help="timed samples per provider (default 5; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per provider first (default 2; --quick 1)")
    p.add_argument("--breakdown-iters", type=int, default=None,
                   help="train steps cut into phases per provider (default 3; --quick 1; 0: no breakdown)")
    p.add_argument("--top-ops", type=int, default=None, help="profiler top ops per provider (default 12; --quick 5)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory / profiler step")
    p.add_argument("--no-decoder", dest="decoder", action="store_false", help="skip the decoder fwd+bwd timing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc", choices=C.MALLOC_CHOICES, default="retain", help=C.MALLOC_HELP)
    p.add_argument("--quick", action="store_true",
                   help="tiny preset (num_classes=5), 96x128 batch 2, few iterations (CI smoke test)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: measurements not started by then are skipped (results so far are written)")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/model_<device>_<dtype>[_<tag>].json; .md and .png "
                        "beside it); '-' for none")
    p.add_argument("--tag", default=None, help="suffix of the default output name")
    p.add_argument("--no-md", dest="md", action="store_false", help="do not write the .md beside the JSON")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="no PNG chart")
    args = p.parse_args(argv)

    args.device = args.device or C.default_device()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.bf16 is None:
        args.bf16 = args.device == "cuda"
    q = args.quick
    args.preset = args.preset or ("tiny" if q else "r50")
    args.iters = args.iters or (2 if q else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.breakdown_iters = args.breakdown_iters if args.breakdown_iters is not None else (1 if q else 3)
    args.top_ops = args.top_ops if args.top_ops is not None else (5 if q else 12)
    try:
        args.overrides = _parse_set(args.set)
        if q:
            args.overrides.setdefault("num_classes", 5)
        batch = args.batch or (2 if q else 1)
        texts = args.case or [args.size or ("96x128" if q else "800x1333")]
        args.cases = [parse_case(t, batch) for t in texts]
        names = [n for n in (args.providers.split(",") if args.providers else []) if n.strip()]
        provs = provider_list(names or None, args.bf16, cpu=(args.device or C.default_device()) == "cpu")
    except ValueError as exc:
        p.error(str(exc))
    if not args.compile:
        provs = [pr for pr in provs if not pr.compile]
    args.provider_objs = provs
    return args


def output_path(args) -> Optional[Path]:
    if args.out == "-":
        return None
    if args.out:
        return Path(args.out)
    dtype = "bfloat16" if any(p.bf16 for p in args.provider_objs) else "float32"
    tag = f"_{args.tag}" if args.tag else ""
    return C.RESULTS_DIR / f"model_{args.device}_{dtype}{tag}.json"


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = C.set_threads(args.threads)
    device = args.device
    malloc = C.apply_malloc_policy(device, args.malloc)
    preset = get_preset(args.preset)
    cfg = preset.model.replace(**args.overrides)
    recipe = preset.recipe
    env = C.environment(device)
    busy = C.busy_warning()
    if busy:
        C.log(f"[bench_model] WARNING: {busy}")
        env["busy_warning"] = busy
    names = [p.name for p in args.provider_objs]
    C.log(f"[bench_model] {args.preset} on {device}, {threads} threads, torch {torch.__version__}; providers "
          f"{', '.join(names)}; cases {', '.join(c.label for c in args.cases)}")
    torch.manual_seed(args.seed)
    base = DABDETR(cfg)
    out = output_path(args)
    payload: Dict[str, Any] = {
        "benchmark": "bench_model",
        "environment": env,
        "settings": {"preset": args.preset, "config_overrides": args.overrides, "config": cfg.to_dict(),
                     "recipe": {"lr": recipe.lr, "lr_backbone": recipe.lr_backbone,
                                "weight_decay": recipe.weight_decay, "clip_max_norm": recipe.clip_max_norm},
                     "device": device, "providers": names, "cases": [c.label for c in args.cases],
                     "iters": args.iters, "warmup": args.warmup, "breakdown_iters": args.breakdown_iters,
                     "top_ops": args.top_ops, "compile_backend": args.compile_backend,
                     "compile_mode": args.compile_mode, "quick": args.quick, "seed": args.seed,
                     "malloc": malloc},
        "cases": [],
    }
    deadline = Deadline(args.time_limit)
    for case in args.cases:
        torch._dynamo.reset()
        if deadline.passed():
            payload["cases"].append({"case": case.label, "skipped": "time limit"})
            continue
        res: Dict[str, Any] = {"case": case.label}
        payload["cases"].append(res)

        def save():
            env["load_average_end"] = C.load_average()
            if out is not None:
                C.write_json(out, payload)

        run_case(args, case, args.provider_objs, base, cfg, recipe, device, deadline, res, save)
        save()
    done = [r for r in payload["cases"] if "providers" in r]
    text = report(payload)
    print(text)
    if out is not None:
        C.write_json(out, payload)
        C.log(f"[bench_model] wrote {out}")
        if args.md:
            out.with_suffix(".md").write_text(text + "\n")
            C.log(f"[bench_model] wrote {out.with_suffix('.md')}")
        if args.plot and done:
            png = plot({**payload, "cases": done}, out.with_suffix(".png"))
            if png:
                C.log(f"[bench_model] wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
