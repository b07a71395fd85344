"""Triton kernels of ``sine_embed`` and ``modulated_sine_query`` (forward and backward).

Math (DESIGN.md op 1/2, REFERENCE.md §1a): for output slot ``i`` (input coordinate ``src_i``) and
feature ``f`` of pair ``j = f // 2``: ``x = c[src_i] * scale * w_j`` with ``w_j = T^(-2j/F)`` and
``out = sin(x + phase_f)``, ``phase_f = 0`` (even f: sin) or ``pi/2`` (odd f: cos). So every output
element is one sine evaluation, and its derivative with respect to ``x`` is ``sin(x + phase + pi/2)``.
The argument is first reduced to [-pi, pi] (two-term Cody-Waite, 4 flops): on NVIDIA GPUs
``tl.sin`` is libdevice's ``__nv_sinf``, whose slow large-argument path is then never taken (its
small stack frame shows in the compile report), and the result does not depend on how a backend
reduces large arguments.

Layout: the input is read as rows (``_common.rows``: up to two strided leading dims in place, any
last-dim stride); outputs and gradients are contiguous. One program handles ``BLOCK_R`` rows of one
output slot (grid dim 1), looping over the ``F`` features in chunks of ``BLOCK_F`` (a power of two:
odd ``F/2`` and ``F`` not a power of two are masked). Math in float32 for every input dtype.

sine_embed takes any number of coordinates C: a launch handles a group of up to 4 slots, whose
source coordinate and log-temperature arrive as scalar arguments (no device-side table, so no
host-to-device copy per call and nothing that breaks CUDA graphs); C > 4 launches once per group.
"""

import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, autotune, check_dtype, config, device_of, kernel_dtype, next_pow2, rows, to_dtype,
                      wrap_triton)

INV_TWO_PI: tl.constexpr = tl.constexpr(0.15915494309189535)
TWO_PI_HI: tl.constexpr = tl.constexpr(6.28125)  # 201/32: k * TWO_PI_HI is exact for |k| < 2**16
TWO_PI_LO: tl.constexpr = tl.constexpr(0.0019353071795864769)  # 2*pi - TWO_PI_HI
HALF_PI: tl.constexpr = tl.constexpr(1.5707963267948966)

SLOTS_PER_LAUNCH = 4

# Rows per program. The ops are memory-bound elementwise maps (F=128: 512 B of output per row and
# slot in float32); the configs trade tile size against parallelism for DAB-DETR's 300-900 query
# rows x batch. Interpreter: one config (multi-config autotune needs a GPU driver).
if INTERPRET:
    _SINE_CONFIGS = [config(1, 1, BLOCK_R=8)]
else:
    _SINE_CONFIGS = [
        config(4, 1, BLOCK_R=8),
        config(4, 1, BLOCK_R=4),
        config(4, 1, BLOCK_R=16),
        config(8, 1, BLOCK_R=32),
    ]


@triton.jit
def _phase_sin(x, phase):
    """sin(x + phase), x reduced to [-pi, pi] first."""
    k = tl.floor(x * INV_TWO_PI + 0.5)
    r = x - k * TWO_PI_HI
    r = r - k * TWO_PI_LO
    return tl.sin(r + phase)


@triton.jit
def _frequencies(f, lt):
    """T^(-2 floor(f / 2) / F) = exp2(2 floor(f / 2) * lt) for features ``f`` (lt = -log2(T) / F), in
    float64 and rounded once: float32 ``tl.exp2`` is the approximate ``ex2.approx`` on GPUs (up to
    2 ulp), which large coordinates (angle = coordinate * frequency) magnify. One vector per block."""
    return tl.exp2(((f // 2) * 2).to(tl.float64) * lt).to(tl.float32)


@triton.jit
def _pick4(s, a0, a1, a2, a3):
    return tl.where(s == 0, a0, tl.where(s == 1, a1, tl.where(s == 2, a2, a3)))


@autotune(_SINE_CONFIGS, key=["F"])
@triton.jit
def _sine_embed_fwd_kernel(
    X, OUT,
    R, N1x, sx0, sx1, sxc,
    C, F, c0,
    src0, src1, src2, src3,
    lt0, lt1, lt2, lt3,
    scale,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    src = _pick4(s, src0, src1, src2, src3)
    lt = _pick4(s, lt0, lt1, lt2, lt3)  # -log2(T_src) / F
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    r = r.to(tl.int64)
    xoff = (r // N1x) * sx0 + (r % N1x) * sx1 + src * sxc
    v = tl.load(X + xoff, mask=rmask, other=0.0).to(tl.float32) * scale
    orow = r * C * F + (c0 + s) * F
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        w = _frequencies(f, lt)
        phase = (f % 2).to(tl.float32) * HALF_PI
        y = _phase_sin(v[:, None] * w[None, :], phase[None, :])
        mask = rmask[:, None] & (f < F)[None, :]
        tl.store(OUT + orow[:, None] + f[None, :], y.to(OUT.dtype.element_ty), mask=mask)


@autotune(_SINE_CONFIGS, key=["F"])
@triton.jit
def _sine_embed_bwd_kernel(
    G, X, DX,
    R, N1x, sx0, sx1, sxc,
    N1g, sg0, sg1, sgc,
    C, F, c0,
    src0, src1, src2, src3,
    lt0, lt1, lt2, lt3,
    scale,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    src = _pick4(s, src0, src1, src2, src3)
    lt = _pick4(s, lt0, lt1, lt2, lt3)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    r = r.to(tl.int64)
    xoff = (r // N1x) * sx0 + (r % N1x) * sx1 + src * sxc
    v = tl.load(X + xoff, mask=rmask, other=0.0).to(tl.float32) * scale
    grow = (r // N1g) * sg0 + (r % N1g) * sg1 + (c0 + s) * F * sgc
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        mask = rmask[:, None] & (f < F)[None, :]
        w = _frequencies(f, lt)
        phase = (f % 2).to(tl.float32) * HALF_PI + HALF_PI  # d/dx sin(x + p) = sin(x + p + pi/2)
        g = tl.load(G + grow[:, None] + f[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
        d = _phase_sin(v[:, None] * w[None, :], phase[None, :])
        acc += tl.sum(g * d * w[None, :], axis=1)
    tl.store(DX + r * C + src, (acc * scale).to(DX.dtype.element_ty), mask=rmask)


@autotune(_SINE_CONFIGS, key=["F", "HAS_REF", "HAS_PS"])
@triton.jit
def _msq_fwd_kernel(
    A, REF, PS, OUT,
    R, N1a, sa0, sa1, sac,
    N1r, sr0, sr1, src_,
    N1p, sp0, sp1, spc,
    F, lt_x, lt_y, scale,
    HAS_REF: tl.constexpr, HAS_PS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    blk = tl.program_id(1)  # output block 0 = E(cy) * h_ref / h, block 1 = E(cx) * w_ref / w
    coord = 1 - blk
    lt = tl.where(blk == 0, lt_y, lt_x)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    r = r.to(tl.int64)
    aoff = (r // N1a) * sa0 + (r % N1a) * sa1
    v = tl.load(A + aoff + coord * sac, mask=rmask, other=0.0).to(tl.float32) * scale
    if HAS_REF:
        size = tl.load(A + aoff + (coord + 2) * sac, mask=rmask, other=1.0).to(tl.float32)
        roff = (r // N1r) * sr0 + (r % N1r) * sr1
        ref = tl.load(REF + roff + coord * src_, mask=rmask, other=1.0).to(tl.float32)
        ratio = ref / size
    if HAS_PS:
        poff = (r // N1p) * sp0 + (r % N1p) * sp1 + blk * F * spc
    orow = r * 2 * F + blk * F
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        mask = rmask[:, None] & (f < F)[None, :]
        w = _frequencies(f, lt)
        phase = (f % 2).to(tl.float32) * HALF_PI
        y = _phase_sin(v[:, None] * w[None, :], phase[None, :])
        if HAS_PS:
            y = y * tl.load(PS + poff[:, None] + f[None, :] * spc, mask=mask, other=0.0).to(tl.float32)
        if HAS_REF:
            y = y * ratio[:, None]
        tl.store(OUT + orow[:, None] + f[None, :], y.to(OUT.dtype.element_ty), mask=mask)


@autotune(_SINE_CONFIGS, key=["F", "HAS_REF", "HAS_PS"])
@triton.jit
def _msq_bwd_kernel(
    G, A, REF, PS, DA, DREF, DPS,
    R, N1g, sg0, sg1, sgc,
    N1a, sa0, sa1, sac,
    N1r, sr0, sr1, src_,
    N1p, sp0, sp1, spc,
    F, lt_x, lt_y, scale,
    HAS_REF: tl.constexpr, HAS_PS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    coord = 1 - blk
    lt = tl.where(blk == 0, lt_y, lt_x)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    r = r.to(tl.int64)
    aoff = (r // N1a) * sa0 + (r % N1a) * sa1
    v = tl.load(A + aoff + coord * sac, mask=rmask, other=0.0).to(tl.float32) * scale
    goff = (r // N1g) * sg0 + (r % N1g) * sg1 + blk * F * sgc
    if HAS_PS:
        poff = (r // N1p) * sp0 + (r % N1p) * sp1 + blk * F * spc
    if HAS_REF:
        size = tl.load(A + aoff + (coord + 2) * sac, mask=rmask, other=1.0).to(tl.float32)
        roff = (r // N1r) * sr0 + (r % N1r) * sr1
        ref = tl.load(REF + roff + coord * src_, mask=rmask, other=1.0).to(tl.float32)
        ratio = ref / size
    else:
        ratio = tl.full([BLOCK_R], 1.0, tl.float32)
    d_ratio = tl.zeros([BLOCK_R], dtype=tl.float32)  # d out / d ratio
    d_v = tl.zeros([BLOCK_R], dtype=tl.float32)  # d out / d (c * scale), before the ratio
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        mask = rmask[:, None] & (f < F)[None, :]
        w = _frequencies(f, lt)
        phase = (f % 2).to(tl.float32) * HALF_PI
        x = v[:, None] * w[None, :]
        e = _phase_sin(x, phase[None, :])
        de = _phase_sin(x, phase[None, :] + HALF_PI)
        g = tl.load(G + goff[:, None] + f[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
        if HAS_PS:
            ps = tl.load(PS + poff[:, None] + f[None, :] * spc, mask=mask, other=0.0).to(tl.float32)
            dps = g * e * ratio[:, None]
            tl.store(DPS + (r * 2 * F + blk * F)[:, None] + f[None, :], dps.to(DPS.dtype.element_ty), mask=mask)
            g = g * ps
        d_ratio += tl.sum(g * e, axis=1)
        d_v += tl.sum(g * de * w[None, :], axis=1)
    tl.store(DA + r * 4 + coord, (d_v * ratio * scale).to(DA.dtype.element_ty), mask=rmask)
    if HAS_REF:
        # ratio = ref / size: d ratio / d ref = 1 / size, d ratio / d size = -ref / size^2
        tl.store(DA + r * 4 + 2 + coord, (-d_ratio * ref / (size * size)).to(DA.dtype.element_ty), mask=rmask)
        tl.store(DREF + r * 2 + coord, (d_ratio / size).to(DREF.dtype.element_ty), mask=rmask)
    else:
        tl.store(DA + r * 4 + 2 + coord, tl.zeros([BLOCK_R], dtype=tl.float32).to(DA.dtype.element_ty), mask=rmask)


# ---------------------------------------------------------------------------------------------
# launchers (the bodies of the registered ops: plain tensor code + wrap_triton launches, so that
# torch.library.triton_op can trace them)


def _feature_block(num_feats: int, cap: int = 128) -> int:
    return min(next_pow2(num_feats), cap)


# The modulated query's backward evaluates two sines per element and keeps the gradient, the
# position scale and the output gradient live: with 128-wide feature blocks its largest config
# (32 rows, 8 warps) hits the 255-register cap and spills on sm_80 with Triton 3.6.
_MSQ_BWD_BLOCK_F = 64


def _slot_args(C: int, num_feats: int, temperature: List[float], exchange_xy: bool):
    """Per output slot: the input coordinate it reads and -log2(T) / F of that coordinate."""
    srcs = [(1 - i) if (exchange_xy and i < 2) else i for i in range(C)]
    lts = [-math.log2(float(temperature[s])) / num_feats for s in srcs]
    return srcs, lts


def sine_embed_fwd(coords: torch.Tensor, num_feats: int, temperature: List[float], scale: float,
                   exchange_xy: bool) -> torch.Tensor:
    check_dtype("sine_embed", coords)
    C = coords.shape[-1]
    out = coords.new_empty((*coords.shape[:-1], C * num_feats), dtype=kernel_dtype(coords.dtype))
    if out.numel() == 0:
        return to_dtype(out, coords.dtype)
    R = out.numel() // (C * num_feats)
    x, n1, s0, s1 = rows(coords)
    srcs, lts = _slot_args(C, num_feats, temperature, exchange_xy)
    for c0 in range(0, C, SLOTS_PER_LAUNCH):
        ns = min(SLOTS_PER_LAUNCH, C - c0)
        sg = srcs[c0:c0 + ns] + [0] * (SLOTS_PER_LAUNCH - ns)
        lg = lts[c0:c0 + ns] + [0.0] * (SLOTS_PER_LAUNCH - ns)

        def grid(meta, ns=ns):
            return (triton.cdiv(R, meta["BLOCK_R"]), ns)

        with device_of(coords):
            wrap_triton(_sine_embed_fwd_kernel)[grid](
                x, out, R, n1, s0, s1, x.stride(-1), C, num_feats, c0,
                sg[0], sg[1], sg[2], sg[3], lg[0], lg[1], lg[2], lg[3], float(scale),
                BLOCK_F=_feature_block(num_feats),
            )
    return to_dtype(out, coords.dtype)


def sine_embed_bwd(grad_out: torch.Tensor, coords: torch.Tensor, num_feats: int, temperature: List[float],
                   scale: float, exchange_xy: bool) -> torch.Tensor:
    check_dtype("sine_embed", coords)
    C = coords.shape[-1]
    grad = coords.new_empty(coords.shape, dtype=kernel_dtype(coords.dtype))
    if grad.numel() == 0:
        return to_dtype(grad, coords.dtype)
    R = grad.numel() // C
    x, n1x, sx0, sx1 = rows(coords)
    g, n1g, sg0, sg1 = rows(grad_out)
    srcs, lts = _slot_args(C, num_feats, temperature, exchange_xy)
    for c0 in range(0, C, SLOTS_PER_LAUNCH):
        ns = min(SLOTS_PER_LAUNCH, C - c0)
        sg = srcs[c0:c0 + ns] + [0] * (SLOTS_PER_LAUNCH - ns)
        lg = lts[c0:c0 + ns] + [0.0] * (SLOTS_PER_LAUNCH - ns)

        def grid(meta, ns=ns):
            return (triton.cdiv(R, meta["BLOCK_R"]), ns)

        with device_of(coords):
            wrap_triton(_sine_embed_bwd_kernel)[grid](
                g, x, grad, R, n1x, sx0, sx1, x.stride(-1), n1g, sg0, sg1, g.stride(-1), C, num_feats, c0,
                sg[0], sg[1], sg[2], sg[3], lg[0], lg[1], lg[2], lg[3], float(scale),
                BLOCK_F=_feature_block(num_feats),
            )
    return to_dtype(grad, coords.dtype)


def _optional_rows(t: Optional[torch.Tensor]):
    if t is None:  # absent optional input: a None pointer (the kernel's HAS_* flag is False)
        return None, 1, 0, 0, 0
    t2, n1, s0, s1 = rows(t)
    return t2, n1, s0, s1, t2.stride(-1)


def msq_fwd(anchors: torch.Tensor, ref_wh: Optional[torch.Tensor], pos_scale: Optional[torch.Tensor],
            num_feats: int, temperature: List[float], scale: float) -> torch.Tensor:
    check_dtype("modulated_sine_query", anchors)
    F = num_feats
    out = anchors.new_empty((*anchors.shape[:-1], 2 * F), dtype=kernel_dtype(anchors.dtype))
    if out.numel() == 0:
        return to_dtype(out, anchors.dtype)
    R = out.numel() // (2 * F)
    a, n1a, sa0, sa1 = rows(anchors)
    rw, n1r, sr0, sr1, src_ = _optional_rows(ref_wh)
    ps, n1p, sp0, sp1, spc = _optional_rows(pos_scale)
    lt_x = -math.log2(float(temperature[0])) / F
    lt_y = -math.log2(float(temperature[1])) / F

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_R"]), 2)

    with device_of(anchors):
        wrap_triton(_msq_fwd_kernel)[grid](
            a, rw, ps, out, R, n1a, sa0, sa1, a.stride(-1), n1r, sr0, sr1, src_, n1p, sp0, sp1, spc,
            F, lt_x, lt_y, float(scale),
            HAS_REF=ref_wh is not None, HAS_PS=pos_scale is not None, BLOCK_F=_feature_block(F),
        )
    return to_dtype(out, anchors.dtype)


def msq_bwd(grad_out: torch.Tensor, anchors: torch.Tensor, ref_wh: Optional[torch.Tensor],
            pos_scale: Optional[torch.Tensor], num_feats: int, temperature: List[float],
            scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_dtype("modulated_sine_query", anchors)
    F = num_feats
    dtype = anchors.dtype
    kdt = kernel_dtype(dtype)
    g_anchors = anchors.new_empty(anchors.shape, dtype=kdt)
    absent = (0,)  # the gradient of an absent optional input: an empty tensor (C++ schema)
    g_ref = anchors.new_empty(ref_wh.shape if ref_wh is not None else absent, dtype=kdt)
    g_ps = anchors.new_empty(pos_scale.shape if pos_scale is not None else absent, dtype=kdt)
    if g_anchors.numel() == 0:
        return to_dtype(g_anchors, dtype), to_dtype(g_ref, dtype), to_dtype(g_ps, dtype)
    R = g_anchors.numel() // 4
    g, n1g, sg0, sg1 = rows(grad_out)
    a, n1a, sa0, sa1 = rows(anchors)
    rw, n1r, sr0, sr1, src_ = _optional_rows(ref_wh)
    ps, n1p, sp0, sp1, spc = _optional_rows(pos_scale)
    lt_x = -math.log2(float(temperature[0])) / F
    lt_y = -math.log2(float(temperature[1])) / F

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_R"]), 2)

    with device_of(anchors):
        wrap_triton(_msq_bwd_kernel)[grid](
            g, a, rw, ps, g_anchors, g_ref if ref_wh is not None else None,
            g_ps if pos_scale is not None else None,
            R, n1g, sg0, sg1, g.stride(-1), n1a, sa0, sa1, a.stride(-1), n1r, sr0, sr1, src_,
            n1p, sp0, sp1, spc, F, lt_x, lt_y, float(scale),
            HAS_REF=ref_wh is not None, HAS_PS=pos_scale is not None, BLOCK_F=_feature_block(F, _MSQ_BWD_BLOCK_F),
        )
    return to_dtype(g_anchors, dtype), to_dtype(g_ref, dtype), to_dtype(g_ps, dtype)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs (benchmarks/triton_compile_report.py)


def compile_specs(dtype: str, num_feats: int = 128, all_configs: bool = False):
    """One spec per kernel (and config): ``dtype`` in {"fp32", "bf16", "fp16"}; DAB-DETR's F = 128,
    all optional inputs present, contiguous last dims."""
    from ._common import compile_spec, largest_config

    t = "*" + dtype
    bf = {"BLOCK_F": _feature_block(num_feats)}
    lts = ("lt0", "lt1", "lt2", "lt3", "scale")
    specs = []

    def configs(kernel):
        return kernel.configs if all_configs else [largest_config(kernel.configs)]

    for cfg in configs(_sine_embed_fwd_kernel):
        specs.append(compile_spec(_sine_embed_fwd_kernel, {"X": t, "OUT": t}, floats=lts,
                                  constexprs=bf, ones=("sxc",), cfg=cfg))
    for cfg in configs(_sine_embed_bwd_kernel):
        specs.append(compile_spec(_sine_embed_bwd_kernel, {"G": t, "X": t, "DX": t},
                                  floats=lts, constexprs=bf, ones=("sxc", "sgc"), cfg=cfg))
    flags = dict(bf, HAS_REF=True, HAS_PS=True)
    for cfg in configs(_msq_fwd_kernel):
        specs.append(compile_spec(_msq_fwd_kernel, {"A": t, "REF": t, "PS": t, "OUT": t},
                                  floats=("lt_x", "lt_y", "scale"), constexprs=flags,
                                  ones=("sac", "src_", "spc"), cfg=cfg))
    for cfg in configs(_msq_bwd_kernel):
        specs.append(compile_spec(_msq_bwd_kernel, {"G": t, "A": t, "REF": t, "PS": t, "DA": t, "DREF": t, "DPS": t},
                                  floats=("lt_x", "lt_y", "scale"),
                                  constexprs=dict(flags, BLOCK_F=_feature_block(num_feats, _MSQ_BWD_BLOCK_F)),
                                  ones=("sgc", "sac", "src_", "spc"), cfg=cfg))
    return specs
