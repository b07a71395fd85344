"""Helpers of the op tests: device/backend parametrization, random input makers with memory
layouts, tolerances (DESIGN.md, "Backends, registration, dispatch") and the fused-vs-float64
comparison harness; plus independent formulations of the three ops written from REFERENCE.md (the
original code's math), used to check the spec in ``dabdetr.ops.reference`` itself.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import pytest
import torch
from torch import Tensor

from dabdetr import ops
from dabdetr.ops import _dispatch

OPS = ("sine_embed", "modulated_sine_query", "content_position_attention")
HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HAS_CUDA = torch.cuda.is_available()

_NO_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, _NO_CUDA])]

# DESIGN.md tolerances vs the float64 reference, relative to the reference's max magnitude.
FP32_TOL = {"sine_embed": 1e-5, "modulated_sine_query": 1e-5, "content_position_attention": 1e-4}
FP64_TOL = 1e-10
HALF_EPS = 1e-3


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# parametrization


def device_backend_params(op: str, fused_only: bool = False) -> List:
    """``(device, backend)`` params: every backend ``available_backends(device, op)`` reports, on
    the CPU always and on CUDA when a GPU is visible (a skipped placeholder otherwise). New
    backends (e.g. triton, under TRITON_INTERPRET=1 on the CPU) join automatically."""
    params = []
    for dev in ("cpu", "cuda"):
        marks = [pytest.mark.cuda] if dev == "cuda" else []
        if dev == "cuda" and not HAS_CUDA:
            params.append(pytest.param("cuda", "n/a", id="cuda", marks=marks + [_NO_CUDA]))
            continue
        backends = [b for b in ops.available_backends(dev, op) if not (fused_only and b == "torch")]
        if not backends:
            reason = f"no fused backend for {op} on {dev} in this build"
            params.append(pytest.param(dev, "n/a", id=f"{dev}-nofused", marks=marks + [pytest.mark.skip(reason=reason)]))
        for b in backends:
            params.append(pytest.param(dev, b, id=f"{dev}-{b}", marks=marks))
    return params


def cpu_kernel_params(op: str) -> List:
    """``backend="cpu"`` (the C++ kernels) if registered for ``op``, else one skipped param."""
    if "cpu" in ops.available_backends("cpu", op):
        return [pytest.param("cpu", id="cpu")]
    why = _dispatch._why_missing("cpu", op, torch.device("cpu"))
    return [pytest.param("cpu", id="cpu", marks=pytest.mark.skip(reason=f"C++ CPU kernel unavailable: {why}"))]


def interpreted(device: str, backend: str) -> bool:
    """Triton on CPU tensors runs in the (slow) interpreter: use tiny shapes."""
    return backend == "triton" and device == "cpu"


def dtype_supported(backend: str, dtype: torch.dtype) -> bool:
    # DESIGN.md: float64 is required of the reference and the C++ CPU kernel (gradcheck); the GPU
    # backends need not take it.
    return dtype != torch.float64 or backend in ("torch", "cpu")


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if not dtype_supported(backend, dtype):
        pytest.skip(f"float64 is not required of backend {backend!r}")


# ---------------------------------------------------------------------------------------------
# random inputs


def sampler(gen: torch.Generator, dtype, device, kind: str = "normal", low: float = 0.0, high: float = 1.0):
    """``f(shape)`` -> a contiguous tensor of ``dtype`` on ``device`` (drawn in float64 on the CPU
    from ``gen``, so the draw does not depend on the dtype or device)."""

    def f(shape):
        if kind == "normal":
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            x = torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low
        return x.to(device=device, dtype=dtype)

    return f


LAYOUTS = ("contiguous", "seq_first", "sliced", "strided_last", "broadcast")


def with_layout(make: Callable, shape: Sequence[int], layout: str) -> Tensor:
    """A tensor of logical ``shape`` whose values come from ``make(base_shape)``, laid out as:

    contiguous; seq_first: a view of a ``[N, B, ...]`` tensor transposed to ``[B, N, ...]`` (the
    ``x.view(N, B, H, d).transpose(0, 1)`` pattern); sliced: a slice of a wider last dim (last
    stride 1, larger row stride, non-zero offset); strided_last: every other element of the last
    dim (last stride 2); broadcast: expanded over dim 0 (stride 0).
    """
    shape = tuple(shape)
    if layout == "contiguous":
        return make(shape)
    if layout == "seq_first":
        if len(shape) < 3:
            return make(shape)
        return make((shape[1], shape[0], *shape[2:])).transpose(0, 1)
    if layout == "sliced":
        return make((*shape[:-1], shape[-1] + 3))[..., 1 : 1 + shape[-1]]
    if layout == "strided_last":
        return make((*shape[:-1], 2 * shape[-1]))[..., ::2]
    if layout == "broadcast":
        if len(shape) < 2:
            return make(shape)
        return make((1, *shape[1:])).expand(shape)
    raise ValueError(layout)


def make_coords(gen, device, dtype, lead: Sequence[int], C: int, layout="contiguous", low=0.0, high=1.0) -> Tensor:
    return with_layout(sampler(gen, dtype, device, "uniform", low, high), (*lead, C), layout)


def make_temperature(gen, C: int, kind: str):
    """``kind``: "default" (None: use the op's default), "scalar", "list" (one per coordinate),
    "tuple", "tensor"."""
    if kind == "default":
        return None
    vals = (10.0 ** (1.0 + 3.5 * torch.rand(C, generator=gen, dtype=torch.float64))).tolist()
    if kind == "scalar":
        return vals[0]
    if kind == "list":
        return vals
    if kind == "tuple":
        return tuple(vals)
    if kind == "tensor":
        return torch.tensor(vals)
    raise ValueError(kind)


def make_msq_inputs(gen, device, dtype, lead, num_feats, with_ref: bool, with_ps: bool, layout="contiguous") -> Dict:
    """anchors (cx, cy in (0, 1); w, h in (0.05, 1)), ref_wh in (0.05, 1), pos_scale ~ N(0, 1)."""

    def make_anchors(shape):
        a = sampler(gen, torch.float64, "cpu", "uniform", 0.0, 1.0)(shape)
        a[..., 2:] = a[..., 2:] * 0.95 + 0.05
        return a.to(device=device, dtype=dtype)

    anchors = with_layout(make_anchors, (*lead, 4), layout)
    ref_wh = with_layout(sampler(gen, dtype, device, "uniform", 0.05, 1.0), (*lead, 2), layout) if with_ref else None
    pos_scale = with_layout(sampler(gen, dtype, device), (*lead, 2 * num_feats), layout) if with_ps else None
    return {"anchors": anchors, "ref_wh": ref_wh, "pos_scale": pos_scale}


MASK_KINDS = ("none", "no_padding", "random", "full_row", "all")


def make_mask(gen, device, B: int, Nk: int, kind: str, transposed: bool = False) -> Optional[Tensor]:
    """Key padding mask ``[B, Nk]`` (True = padding). ``full_row``: random padding plus batch
    element 0 entirely padding; ``all``: every key padding. ``transposed``: a non-contiguous view
    of a ``[Nk, B]`` tensor."""
    if kind == "none":
        return None
    if kind == "no_padding":
        m = torch.zeros(B, Nk, dtype=torch.bool)
    elif kind == "all":
        m = torch.ones(B, Nk, dtype=torch.bool)
    else:
        m = torch.rand(B, Nk, generator=gen) < 0.35
        if kind == "full_row" and B > 0:
            m[0] = True
    if transposed:
        m = m.t().contiguous().t()
    return m.to(device)


def make_attention_inputs(
    gen, device, dtype, B, Nq, Nk, H, Dc, Dp, Dv, layout="contiguous", mask="none", q_gain=1.0
) -> Dict:
    """Inputs of content_position_attention. ``layout``:

    contiguous; seq_first: every tensor a ``x.view(N, B, H, d).transpose(0, 1)`` view of a
    sequence-first ``[N, B, H*d]`` tensor and the mask a transposed view; packed: q_content/q_pos
    (and k_content/k_pos) slices of one per-head ``[.., Dc + Dp]`` tensor, value a head-major
    ``[B, H, Nk, Dv]`` tensor transposed, k_pos broadcast over the batch; strided_last: last
    dims with stride 2.
    ``q_gain`` multiplies the queries (large values: peaky softmax, tests the online max).
    """
    normal = sampler(gen, dtype, device)

    def gained(shape):
        x = sampler(gen, torch.float64, "cpu")(shape) * q_gain
        return x.to(device=device, dtype=dtype)

    if layout in ("contiguous", "seq_first", "strided_last"):
        lay = layout
        qc = with_layout(gained, (B, Nq, H, Dc), lay)
        qp = with_layout(gained, (B, Nq, H, Dp), lay)
        kc = with_layout(normal, (B, Nk, H, Dc), lay)
        kp = with_layout(normal, (B, Nk, H, Dp), lay)
        v = with_layout(normal, (B, Nk, H, Dv), lay)
    elif layout == "packed":
        q = gained((B, Nq, H, Dc + Dp))
        qc, qp = q[..., :Dc], q[..., Dc:]
        k = normal((B, Nk, H, Dc + Dp + 1))
        kc = k[..., :Dc]
        kp = normal((1, Nk, H, Dp)).expand(B, Nk, H, Dp)
        v = normal((B, H, Nk, Dv)).transpose(1, 2)
    else:
        raise ValueError(layout)
    m = make_mask(gen, device, B, Nk, mask, transposed=layout in ("seq_first", "packed"))
    return {"q_content": qc, "q_pos": qp, "k_content": kc, "k_pos": kp, "value": v, "key_padding_mask": m}


ATTN_DIFF = ("q_content", "q_pos", "k_content", "k_pos", "value")


# ---------------------------------------------------------------------------------------------
# comparison


def rel_err(actual: Tensor, expected: Tensor, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor) (absolute when both are 0)."""
    if expected.numel() == 0:
        return 0.0
    expected = expected.detach().to(torch.float64)
    diff = (actual.detach().to(device=expected.device, dtype=torch.float64) - expected).abs().max().item()
    denom = max(expected.abs().max().item(), floor)
    return diff / denom if denom > 0 else diff


def _float64(v):
    if isinstance(v, Tensor) and v.is_floating_point():
        return v.detach().to(torch.float64)
    return v


def _cast(v, dtype):
    if isinstance(v, Tensor) and v.is_floating_point():
        return v.detach().to(dtype)
    return v


def forward_backward(call: Callable, inputs: Dict, diff: Iterable[str], gout: Optional[Tensor]):
    """Runs ``call(**inputs)`` with ``diff`` inputs requiring grad (as leaves with the SAME strides
    as given) and returns ``(out, {name: grad})`` for the cotangent ``gout`` (cast to the output's
    dtype); gradients of unused inputs are zeros."""
    leaves = {}
    for k, v in inputs.items():
        if k in diff and v is not None:
            leaves[k] = v.detach().requires_grad_(True)
        else:
            leaves[k] = v
    names = [k for k in diff if leaves.get(k) is not None]
    out = call(**leaves)
    grads = {}
    if names and gout is not None:
        g = torch.autograd.grad(out, [leaves[k] for k in names], gout.to(out.dtype), allow_unused=True)
        for k, gk in zip(names, g):
            grads[k] = torch.zeros_like(leaves[k]) if gk is None else gk
    return out, grads


def check(name: str, actual: Tensor, expected64: Tensor, tol: float, ctx: str = "", floor: float = 0.0) -> float:
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)} {ctx}"
    if actual.numel():
        bad = (~torch.isfinite(actual)).sum().item()
        assert bad == 0, f"{name}: {bad} non-finite values {ctx}"
    err = rel_err(actual, expected64, floor)
    assert err <= tol, f"{name}: relative error {err:.3g} > tolerance {tol:.3g} {ctx}"
    return err


def random_cotangent(shape, dtype, device, gen) -> Tensor:
    """N(0, 1) cotangent in float64 whose values are exactly representable in ``dtype``."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device=device, dtype=torch.float64)


def compare_to_reference(
    op: str,
    fused: Callable,
    ref: Callable,
    inputs: Dict,
    diff: Sequence[str],
    gen: torch.Generator,
    ctx: str = "",
    check_grads: bool = True,
    grad_floors: Optional[Callable] = None,
):
    """Forward and gradients of ``fused(**inputs)`` vs ``ref`` evaluated on float64 copies.

    Tolerance (DESIGN.md): float32 ``FP32_TOL[op]`` (or 2 × the float32 reference's own error
    where that is larger: ill-conditioned inputs), float64 ``FP64_TOL``, float16/bfloat16
    ``2 * max(err(ref in that dtype vs float64), eps of the dtype) + 1e-3`` (see ``tol``), each
    relative to the reference's max magnitude, separately for the output and each gradient.
    ``grad_floors(inputs64, gout64)`` may give, per gradient, a floor of that magnitude (see
    ``attention_grad_floors``). Returns ``(out, grads, ref_out64, ref_grads64)``.
    """
    first = next(v for v in inputs.values() if isinstance(v, Tensor) and v.is_floating_point())
    dtype, device = first.dtype, first.device
    in64 = {k: _float64(v) for k, v in inputs.items()}
    ref_out64 = ref(**in64)
    # the cotangent, drawn once and rounded to ``dtype``: every path then sees the same values
    gout64 = random_cotangent(ref_out64.shape, dtype, device, gen) if check_grads else None
    diff = list(diff) if check_grads else []
    ref_out64, ref_g64 = forward_backward(ref, in64, diff, gout64)
    out, grads = forward_backward(fused, inputs, diff, gout64)
    assert out.dtype == dtype, f"output dtype {out.dtype} != input dtype {dtype} {ctx}"
    assert out.device == device, f"output on {out.device}, inputs on {device} {ctx}"
    floors = grad_floors(in64, gout64) if (grad_floors is not None and diff) else {}
    same_err = {}  # error of the reference computed in ``dtype`` (vs float64)
    if dtype != torch.float64:
        lp_out, lp_g = forward_backward(ref, {k: _cast(v, dtype) for k, v in in64.items()}, diff, gout64)
        same_err["out"] = rel_err(lp_out, ref_out64)
        for k in lp_g:
            same_err[k] = rel_err(lp_g[k], ref_g64[k], floors.get(k, 0.0))

    def tol(key):
        if dtype == torch.float64:
            return FP64_TOL
        if dtype == torch.float32:
            # The DESIGN tolerance, unless the problem itself is ill-conditioned in float32 (e.g. a
            # gradient much smaller than the terms that cancel in it: tiny shapes with a peaky
            # softmax), where even the float32 reference misses it: then 2 × that error.
            return max(FP32_TOL[op], 2 * same_err[key])
        # The reference's own error, measured on one input, is noise around its typical size: a
        # few roundings of intermediates (probabilities, dS) decide it, and on tiny shapes it can
        # by chance fall far below the kernel's equally legitimate roundings (measured on the
        # emulated CUDA kernels: 1-2% of bf16 draws failed). So it counts as at least the dtype's
        # machine epsilon (bf16 0.0078, fp16 0.00098), relative to the max magnitude like the rest.
        return 2 * max(same_err[key], torch.finfo(dtype).eps) + HALF_EPS

    check(f"{op} output", out, ref_out64, tol("out"), ctx)
    for k in diff:
        if k not in ref_g64:
            continue
        assert grads[k].dtype == dtype, f"grad of {k}: dtype {grads[k].dtype} != {dtype} {ctx}"
        check(f"{op} grad of {k}", grads[k], ref_g64[k], tol(k), ctx, floors.get(k, 0.0))
    return out, grads, ref_out64, ref_g64


def assert_ignores_padded_key_contents(call: Callable, device, dtype, gen, seed) -> None:
    """A fused attention ``call`` (keyword inputs, as :func:`attention_call`) never reads a padded
    key into the result: inf / NaN in the keys and values at padded positions leave the output and
    every gradient bitwise as with zeros there, and the padded keys' gradients are zero. Two key
    tiles of the CUDA kernel (Nk = 70, a partial last one), seq-first views."""
    inputs = make_attention_inputs(gen, device, dtype, 2, 5, 70, 2, 8, 8, 8, "seq_first", "random")
    mask = inputs["key_padding_mask"].clone()
    mask[:, 0] = False  # every row keeps a key
    mask[1, 40:] = True
    inputs["key_padding_mask"] = mask
    gout = torch.randn(2, 5, 2, 8, generator=gen).to(device)
    clean = dict(inputs)
    poisoned = dict(inputs)
    for k, fill in (("k_content", float("nan")), ("k_pos", float("inf")), ("value", float("nan"))):
        clean[k] = inputs[k].masked_fill(mask[:, :, None, None], 0.0)
        poisoned[k] = inputs[k].masked_fill(mask[:, :, None, None], fill)
    out0, grads0 = forward_backward(call, clean, ATTN_DIFF, gout)
    out1, grads1 = forward_backward(call, poisoned, ATTN_DIFF, gout)
    assert torch.isfinite(out1).all(), f"padded keys' inf/NaN reached the output [seed={seed}]"
    assert torch.equal(out1, out0), f"output depends on padded keys' contents [seed={seed}]"
    for k in ATTN_DIFF:
        assert torch.equal(grads1[k], grads0[k]), f"grad of {k} depends on padded keys' contents [seed={seed}]"
    for k in ("k_content", "k_pos", "value"):
        assert torch.all(grads1[k][mask] == 0), f"padded keys get a non-zero grad of {k} [seed={seed}]"


# Fraction of the magnitude of the terms of a gradient below which its value is treated as the
# result of cancellation (see attention_grad_floors).
CANCELLATION_FLOOR = 1e-2


def attention_grad_floors(in64: Dict, gout64: Tensor, scale: Optional[float] = None) -> Dict[str, float]:
    """Per-gradient error-denominator floors of content_position_attention (float64).

    The query/key gradients are sums of ``P * (dP - delta)`` terms (``dP = dO · v``,
    ``delta = rowsum(dO * out)``) that cancel when the softmax is peaky over few keys: a gradient
    can then be 10^4 × smaller than its terms, and any float32 algorithm (the reference's softmax
    backward included) leaves an error of about eps × the terms. The floor is
    ``CANCELLATION_FLOOR × max`` of the term-magnitude bound (``scale · (P (|dP| + |delta|)) @ |k|``
    and its transposes; ``P^T @ |dO|`` for value), so that only such cancelled gradients are judged
    against the size of their terms instead of their own (tiny) size.
    """
    qc, qp, kc, kp, v, m = (in64[k] for k in ("q_content", "q_pos", "k_content", "k_pos", "value", "key_padding_mask"))
    if qc.numel() == 0 or kc.numel() == 0:
        return {}
    if scale is None:
        scale = (qc.shape[-1] + qp.shape[-1]) ** -0.5
    with torch.no_grad():
        logits = (torch.einsum("bqhd,bkhd->bhqk", qc, kc) + torch.einsum("bqhd,bkhd->bhqk", qp, kp)) * scale
        if m is not None:
            logits = logits.masked_fill(m[:, None, None, :], float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out = torch.einsum("bhqk,bkhd->bqhd", p, v)
        dp = torch.einsum("bqhd,bkhd->bhqk", gout64, v)
        delta = (gout64 * out).sum(-1).transpose(1, 2)[..., None]  # [B, H, Nq, 1]
        t = p * (dp.abs() + delta.abs())
        bounds = {
            "q_content": scale * torch.einsum("bhqk,bkhd->bqhd", t, kc.abs()),
            "q_pos": scale * torch.einsum("bhqk,bkhd->bqhd", t, kp.abs()),
            "k_content": scale * torch.einsum("bhqk,bqhd->bkhd", t, qc.abs()),
            "k_pos": scale * torch.einsum("bhqk,bqhd->bkhd", t, qp.abs()),
            "value": torch.einsum("bhqk,bqhd->bkhd", p, gout64.abs()),
        }
    return {k: CANCELLATION_FLOOR * b.max().item() if b.numel() else 0.0 for k, b in bounds.items()}


# ---------------------------------------------------------------------------------------------
# the public ops as keyword callables


def sine_call(backend, num_feats, temperature, scale=None, exchange_xy=True):
    def call(coords):
        kw = {"num_feats": num_feats, "exchange_xy": exchange_xy, "backend": backend}
        if temperature is not None:
            kw["temperature"] = temperature
        if scale is not None:
            kw["scale"] = scale
        return ops.sine_embed(coords, **kw)

    return call


def msq_call(backend, num_feats, temperature=None, scale=None):
    def call(anchors, ref_wh, pos_scale):
        kw = {"num_feats": num_feats, "backend": backend}
        if temperature is not None:
            kw["temperature"] = temperature
        if scale is not None:
            kw["scale"] = scale
        return ops.modulated_sine_query(anchors, ref_wh, pos_scale, **kw)

    return call


def attention_call(backend, scale=None):
    def call(q_content, q_pos, k_content, k_pos, value, key_padding_mask):
        return ops.content_position_attention(
            q_content, q_pos, k_content, k_pos, value, key_padding_mask, scale=scale, backend=backend
        )

    return call


# ---------------------------------------------------------------------------------------------
# independent formulations (REFERENCE.md §1a, §3, §4: the original code's math)


def original_sine_embed(pos: Tensor, num_feats=128, temperature=10000.0, scale=2 * math.pi, exchange_xy=True):
    """``gen_sineembed_for_position`` generalised to C coordinates / per-coordinate temperatures:
    one block per coordinate (the first two swapped when exchange_xy), sin/cos interleaved, pairs
    sharing ``dim_t = T ** (2 * (i // 2) / F)``."""
    C = pos.shape[-1]
    temps = list(temperature) if isinstance(temperature, (list, tuple)) else [temperature] * C
    order = ([1, 0] + list(range(2, C))) if exchange_xy else list(range(C))
    blocks = []
    for c in order:
        dim_t = torch.arange(num_feats, dtype=torch.float64, device=pos.device)
        dim_t = temps[c] ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
        p = pos[..., c, None] * scale / dim_t.to(pos.dtype)
        blocks.append(torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2))
    return torch.cat(blocks, dim=-1)


def original_modulated_sine_query(anchors, ref_wh, pos_scale, num_feats=128, temperature=10000.0, scale=2 * math.pi):
    """The decoder's ``qse = sine[..., :d] * query_scale; qse[x] *= w_ref / w; qse[y] *= h_ref / h``
    (REFERENCE.md §3), with d = 2F."""
    F = num_feats
    qse = original_sine_embed(anchors[..., :2], F, temperature, scale)  # [E(y) | E(x)]
    if pos_scale is not None:
        qse = qse * pos_scale
    if ref_wh is not None:
        y = qse[..., :F] * (ref_wh[..., 1] / anchors[..., 3])[..., None]
        x = qse[..., F:] * (ref_wh[..., 0] / anchors[..., 2])[..., None]
        qse = torch.cat([y, x], dim=-1)
    return qse


def einsum_attention(q_content, q_pos, k_content, k_pos, value, key_padding_mask=None, scale=None):
    """Split-form attention with einsum (never concatenates): ``softmax(s * (qc·kc + qp·kp)) v``;
    rows whose keys are all padding give zeros. Returns ``(out [B, Nq, H, Dv], probs [B, H, Nq, Nk])``."""
    if scale is None:
        scale = (q_content.shape[-1] + q_pos.shape[-1]) ** -0.5
    logits = (torch.einsum("bqhd,bkhd->bhqk", q_content, k_content)
              + torch.einsum("bqhd,bkhd->bhqk", q_pos, k_pos)) * scale
    if key_padding_mask is not None:
        full = key_padding_mask.all(dim=-1)
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        logits = logits.masked_fill(full[:, None, None, None], 0.0)
    p = torch.softmax(logits, dim=-1)
    if key_padding_mask is not None:
        p = p * (~full)[:, None, None, None].to(p.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, value), p


def original_attention(q_content, q_pos, k_content, k_pos, value, key_padding_mask=None, scale=None):
    """REFERENCE.md §4 on sequence-first tensors: per-head concat, ``q * scaling``, bmm,
    masked_fill(-inf), ``softmax(x - x.max(-1))``, bmm. Returns ``[B, Nq, H, Dv]``; rows whose keys
    are all padding are NaN here, as in the original."""
    B, Nq, H, Dc = q_content.shape
    Nk, Dv = k_content.shape[1], value.shape[-1]
    D = Dc + q_pos.shape[-1]
    if scale is None:
        scale = D ** -0.5
    # to the original's sequence-first [L, B, H*d] layout
    Q = torch.cat([q_content, q_pos], dim=3).transpose(0, 1).reshape(Nq, B, H * D)
    K = torch.cat([k_content, k_pos], dim=3).transpose(0, 1).reshape(Nk, B, H * D)
    V = value.transpose(0, 1).reshape(Nk, B, H * Dv)
    q = (Q * scale).contiguous().view(Nq, B * H, D).transpose(0, 1)
    k = K.contiguous().view(Nk, B * H, D).transpose(0, 1)
    v = V.contiguous().view(Nk, B * H, Dv).transpose(0, 1)
    w = torch.bmm(q, k.transpose(1, 2))
    if key_padding_mask is not None:
        w = w.view(B, H, Nq, Nk).masked_fill(key_padding_mask[:, None, None, :], float("-inf")).view(B * H, Nq, Nk)
    w = torch.softmax(w - w.max(dim=-1, keepdim=True)[0], dim=-1)
    out = torch.bmm(w, v).transpose(0, 1).reshape(Nq, B, H, Dv).transpose(0, 1)
    return out


def raw_attention_forward(backend: str) -> Callable:
    """The registered forward of a fused backend: ``f(qc, qp, kc, kp, v, mask, scale) -> (out, lse)``."""
    if backend in ("cpu", "cuda"):
        return torch.ops.dabdetr.content_position_attention
    return _dispatch.python_impl(backend, "content_position_attention")


def cotangent_layouts(shape, dtype, device, gen) -> Dict[str, Tensor]:
    """Gradients of the output as autograd hands them to a backward op in practice: the stride-0
    expansion of ``out.sum()``, a tensor broadcast over dim 0, a transposed view, a strided last
    dim. Values are exactly representable in ``dtype``."""
    shape = tuple(shape)

    def rnd(s):
        return torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device)

    layouts = {"sum": torch.ones((), dtype=dtype, device=device).expand(shape),
               "strided_last": rnd((*shape[:-1], 2 * shape[-1]))[..., ::2]}
    if len(shape) >= 2:
        layouts["broadcast"] = rnd((1, *shape[1:])).expand(shape)
    if len(shape) >= 3:
        layouts["transposed"] = rnd((shape[1], shape[0], *shape[2:])).transpose(0, 1)
    return layouts


def check_cotangent_layouts(op: str, fused: Callable, ref: Callable, inputs: Dict, diff: Sequence[str], gen, ctx=""):
    """Gradients of ``fused`` for every layout of ``cotangent_layouts`` vs the float64 reference."""
    leaves = {k: (v.detach().requires_grad_(True) if k in diff and v is not None else v) for k, v in inputs.items()}
    in64 = {k: (v.detach().double().requires_grad_(True) if k in diff and v is not None else _float64(v))
            for k, v in inputs.items()}
    names = [k for k in diff if leaves.get(k) is not None]
    out = fused(**leaves)
    out64 = ref(**in64)
    tol = FP32_TOL[op] if out.dtype == torch.float32 else FP64_TOL
    for lay, g in cotangent_layouts(out.shape, out.dtype, out.device, gen).items():
        got = torch.autograd.grad(out, [leaves[k] for k in names], g, retain_graph=True)
        want = torch.autograd.grad(out64, [in64[k] for k in names], g.double(), retain_graph=True)
        for k, a, b in zip(names, got, want):
            check(f"{op} grad of {k} for a '{lay}' output gradient", a, b, tol, ctx)
