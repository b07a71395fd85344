"""Winograd F(m x m, 3 x 3) convolutions for the CPU backbone (stride 1, padding 1, m = 2 or 4).

A 3x3 convolution computes each m x m output tile from an (m + 2)^2 input window; Winograd's
minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) turns
that into (m + 2)^2 element-wise products in a transformed domain, i.e. (m + 2)^2 batched GEMMs over
the channels: ``y = A^T [(G g G^T) . (B^T d B)] A``. F(4, 3) does 36 multiplies per 16 outputs
where the direct convolution does 144 (4x fewer multiply-adds in the GEMMs), F(2, 3) 16 per 4
(2.25x fewer). The transforms cost memory passes, so it pays where the GEMMs are large and the
transformed weights small next to the activations (the backbone's rule: ``backbone._winograd_tile``).

Numerics: the same function in exact arithmetic, not the same rounding. In float32, F(4, 3)'s
output error against a float64 reference is ~4-8x that of oneDNN's direct convolution (R50 shapes,
He-initialised weights: 6-8e-6 vs 0.7-1.9e-6 relative to the output's maximum); F(2, 3)'s is
3-5e-7 on R50 shapes and small ones alike, at or below the direct one's
(benchmarks/bench_winograd.py prints them); cuDNN runs the original DAB-DETR's convolutions with the
same family of algorithms on GPUs. Hence the backbone's modes (``ResNet.cpu_winograd``): F(2, 3)
from 128 channels is the fused backends' default ("f2"), F(4, 3) a choice ("f4", the ``+winograd``
benchmark providers).

Layout: the image tensors are NCHW-shaped and channels-last in memory (``x.permute(0, 2, 3, 1)``
is then a view); the transformed domain is ``[(m + 2)^2, T, C]`` with ``T = N * ceil(H / m) *
ceil(W / m)`` tiles. The tile transforms run in the C++ ops ``torch.ops.dabdetr_winograd.*``
(csrc/cpu/winograd_cpu.cpp; one pass each) when the extension is loaded, else in the torch
formulation below (a gather, a small GEMM and a permute), which the tests also use as reference.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext

# Lavin & Gray's matrices: F(2, 3) on the points {0, 1, -1, inf}, F(4, 3) on {0, 1, -1, 2, -2, inf}.
_MATRICES = {
    2: dict(
        BT=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        G=[[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        AT=[[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: dict(
        BT=[[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        G=[[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
           [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        AT=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}
TILES = tuple(_MATRICES)
_KRON_CACHE: Dict[Tuple[int, torch.dtype, torch.device], Tuple[Tensor, Tensor, Tensor]] = {}


def _check_m(m: int) -> None:
    if m not in _MATRICES:
        raise ValueError(f"winograd tile 'm' must be one of {TILES}, got {m!r}")


def _kron(m: int, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """(B^T (x) B^T [A², A²], G (x) G [A², 9], A^T (x) A^T [m², A²]): the 2-D transforms of a
    row-major flattened tile as one matrix each (built in float64, then cast)."""
    key = (m, dtype, device)
    if key not in _KRON_CACHE:
        mats = {k: torch.tensor(v, dtype=torch.float64) for k, v in _MATRICES[m].items()}
        _KRON_CACHE[key] = tuple(torch.kron(mats[k], mats[k]).to(dtype=dtype, device=device)
                                 for k in ("BT", "G", "AT"))
    return _KRON_CACHE[key]


def weight_transform(weight: Tensor, m: int) -> Tensor:
    """``U[xi] = (G g G^T)[xi]`` of a ``[K, C, 3, 3]`` weight as ``[A², K, C]`` (differentiable).

    The C++ op ``dabdetr_winograd::weight_transform`` (and its adjoint for the gradient) when
    loaded, for a float32/float64 CPU weight: one pass each way, the weight read in its own layout
    and its gradient returned in it (no copy for ``AccumulateGrad``). Else, and under
    ``create_graph=True``, one GEMM on the weight's memory (``[K C, 9]`` read transposed): its
    backward is a GEMM with a 9-column result, which oneDNN/MKL run far below the memory rate (R50's
    ``[256, 256]`` layer3 filters on the 2-core CPU: 6.8 ms against the op's 0.56 ms)."""
    _check_m(m)
    if (HAS_CPP_WEIGHT_TRANSFORM and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64)
            and weight.dim() == 4):
        return _WeightTransform.apply(weight, m)
    return weight_transform_torch(weight, m)


def weight_transform_torch(weight: Tensor, m: int) -> Tensor:
    """:func:`weight_transform` as one GEMM with ``G (x) G`` (reference; the fallback)."""
    k, c = weight.shape[:2]
    kg = _kron(m, weight.dtype, weight.device)[1]
    return torch.mm(kg, weight.reshape(k * c, 9).t()).view((m + 2) ** 2, k, c)


def weight_transform_backward_torch(grad_u: Tensor, m: int) -> Tensor:
    """The adjoint of :func:`weight_transform_torch`: ``G^T gU G`` per filter, ``[K, C, 3, 3]``."""
    a2, k, c = grad_u.shape
    kg = _kron(m, grad_u.dtype, grad_u.device)[1]
    return torch.mm(kg.t(), grad_u.reshape(a2, k * c)).t().reshape(k, c, 3, 3)


def tile_grid(m: int, n: int, h: int, w: int) -> Tuple[int, int, int]:
    """``(th, tw, T)``: tile rows and columns of an ``h x w`` map, and the tiles of ``n`` maps."""
    th, tw = -(-h // m), -(-w // m)
    return th, tw, n * th * tw


# ---- the tile transforms in torch (reference; the fallback without the extension) ----

def input_transform_torch(x: Tensor, m: int) -> Tensor:
    """``[N, H, W, C]`` -> ``[A², T, C]``: each tile's ``B^T d B`` (padding 1)."""
    n, h, w, c = x.shape
    th, tw, t = tile_grid(m, n, h, w)
    a = m + 2
    xp = F.pad(x, (0, 0, 1, m * tw + 1 - w, 1, m * th + 1 - h))
    s_n, s_h, s_w, _ = xp.stride()
    windows = xp.as_strided((a, a, n, th, tw, c), (s_h, s_w, s_n, m * s_h, m * s_w, 1)).reshape(a * a, t * c)
    return (_kron(m, x.dtype, x.device)[0] @ windows).view(a * a, t, c)


def input_transform_backward_torch(grad_v: Tensor, x_shape: Sequence[int], m: int) -> Tensor:
    """The adjoint of :func:`input_transform_torch`: ``B gV B^T`` of each tile, overlap-added."""
    n, h, w, c = x_shape
    th, tw, t = tile_grid(m, n, h, w)
    a = m + 2
    gd = (_kron(m, grad_v.dtype, grad_v.device)[0].t() @ grad_v.reshape(a * a, t * c)).view(a, a, n, th, tw, c)
    # padded image [N, (th + 1) m, (tw + 1) m, C] as blocks [N, th + 1, m, tw + 1, m, C]; a window
    # row i = block offset i // m, row i % m within the block (i >= m: the next block's first rows)
    gxp = grad_v.new_zeros(n, th + 1, m, tw + 1, m, c)
    for bi, rows in ((0, slice(0, m)), (1, slice(m, a))):
        for bj, cols in ((0, slice(0, m)), (1, slice(m, a))):
            part = gd[rows, cols].permute(2, 3, 0, 4, 1, 5)
            gxp[:, bi:bi + th, :part.shape[2], bj:bj + tw, :part.shape[4]] += part
    return gxp.view(n, (th + 1) * m, (tw + 1) * m, c)[:, 1:h + 1, 1:w + 1].contiguous()


def output_transform_torch(mt: Tensor, bias: Optional[Tensor], y_shape: Sequence[int], m: int) -> Tensor:
    """``[A², T, K]`` -> ``[N, H, W, K]``: each tile's ``A^T Mt A`` (+ bias), cropped."""
    n, h, w, k = y_shape
    th, tw, t = tile_grid(m, n, h, w)
    tiles = (_kron(m, mt.dtype, mt.device)[2] @ mt.reshape(-1, t * k)).view(m, m, n, th, tw, k)
    y = tiles.permute(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, k)[:, :h, :w]
    return (y + bias if bias is not None else y).contiguous()


def output_transform_backward_torch(grad_y: Tensor, m: int) -> Tensor:
    """The adjoint of :func:`output_transform_torch` (without the bias): ``A g A^T`` per tile."""
    n, h, w, k = grad_y.shape
    th, tw, t = tile_grid(m, n, h, w)
    gp = F.pad(grad_y, (0, 0, 0, tw * m - w, 0, th * m - h))
    tiles = gp.view(n, th, m, tw, m, k).permute(2, 4, 0, 1, 3, 5).reshape(m * m, t * k)
    return (_kron(m, grad_y.dtype, grad_y.device)[2].t() @ tiles).view(-1, t, k)


# ---- dispatch: the C++ ops when loaded ----

HAS_CPP_TRANSFORMS = _ext.has_cpu_op("dabdetr_winograd::input_transform")
# the weight transforms came later than the tile transforms (an extension built before them lacks them)
HAS_CPP_WEIGHT_TRANSFORM = _ext.has_cpu_op("dabdetr_winograd::weight_transform")

if HAS_CPP_TRANSFORMS:
    @torch.library.register_fake("dabdetr_winograd::input_transform")
    def _(x, m):
        n, h, w, c = x.shape
        return x.new_empty(((m + 2) ** 2, tile_grid(m, n, h, w)[2], c))

    @torch.library.register_fake("dabdetr_winograd::input_transform_backward")
    def _(grad_v, x_shape, m):
        return grad_v.new_empty(list(x_shape))

    @torch.library.register_fake("dabdetr_winograd::output_transform")
    def _(mt, bias, y_shape, m):
        return mt.new_empty(list(y_shape))

    @torch.library.register_fake("dabdetr_winograd::output_transform_backward")
    def _(grad_y, m):
        n, h, w, k = grad_y.shape
        return grad_y.new_empty(((m + 2) ** 2, tile_grid(m, n, h, w)[2], k))

if HAS_CPP_WEIGHT_TRANSFORM:
    @torch.library.register_fake("dabdetr_winograd::weight_transform")
    def _(weight, m):
        return weight.new_empty(((m + 2) ** 2, weight.shape[0], weight.shape[1]))

    @torch.library.register_fake("dabdetr_winograd::weight_transform_backward")
    def _(grad_u, m):
        return grad_u.new_empty((grad_u.shape[1], grad_u.shape[2], 3, 3))


if HAS_CPP_TRANSFORMS:
    @torch.library.custom_op("dabdetr_winograd::weight_grad", mutates_args=())
    def _weight_grad(grad_m: Tensor, x: Tensor, m: int) -> Tensor:
        """The transformed weights' gradient ``bmm(grad_m^T, input_transform(x))``, ``[A², K, C]``,
        as one opaque op. Written out in the backward of :class:`_WinogradConv`, the recomputed
        ``input_transform(x)`` is the same call as the forward's, so under ``torch.compile``
        (inductor) the two were merged and the transformed input was kept from the forward to the
        backward: (m + 2)² / m² times the input per convolution (R50 train step at 800x1333:1
        with F(2, 3): +0.23 GB of peak memory, 0.91 -> 1.14 GB; with this op 0.94 GB, and the same
        step time within noise: 1802.1 vs 1762.9 ms interleaved at 512x512:2 with F(4, 3))."""
        return torch.bmm(grad_m.transpose(1, 2), torch.ops.dabdetr_winograd.input_transform(x, m))

    @_weight_grad.register_fake
    def _(grad_m, x, m):
        return grad_m.new_empty((grad_m.shape[0], grad_m.shape[2], x.shape[3]))


def _use_cpp(cpp: Optional[bool]) -> bool:
    """``cpp=None``: the C++ ops when loaded (HAS_CPP_TRANSFORMS, read at call time: tests switch it)."""
    return HAS_CPP_TRANSFORMS if cpp is None else cpp


class _WeightTransform(torch.autograd.Function):
    """:func:`weight_transform` by the C++ op and its adjoint; under ``create_graph=True`` the
    backward is the torch formulation (differentiable: the map is linear)."""

    @staticmethod
    def forward(ctx, weight: Tensor, m: int) -> Tensor:
        ctx.m = m
        return torch.ops.dabdetr_winograd.weight_transform(weight, m)

    @staticmethod
    def backward(ctx, grad_u: Tensor):
        if torch.is_grad_enabled():
            return weight_transform_backward_torch(grad_u, ctx.m), None
        return torch.ops.dabdetr_winograd.weight_transform_backward(grad_u, ctx.m), None


def _in(x: Tensor, m: int, cpp: Optional[bool] = None) -> Tensor:
    if _use_cpp(cpp):
        return torch.ops.dabdetr_winograd.input_transform(x, m)
    return input_transform_torch(x, m)


def _in_bwd(gv: Tensor, shape: List[int], m: int, cpp: Optional[bool] = None) -> Tensor:
    if _use_cpp(cpp):
        return torch.ops.dabdetr_winograd.input_transform_backward(gv, shape, m)
    return input_transform_backward_torch(gv, shape, m)


def _out(mt: Tensor, bias: Optional[Tensor], shape: List[int], m: int, cpp: Optional[bool] = None) -> Tensor:
    if _use_cpp(cpp):
        return torch.ops.dabdetr_winograd.output_transform(mt, bias, shape, m)
    return output_transform_torch(mt, bias, shape, m)


def _out_bwd(gy: Tensor, m: int, cpp: Optional[bool] = None) -> Tensor:
    if _use_cpp(cpp):
        return torch.ops.dabdetr_winograd.output_transform_backward(gy, m)
    return output_transform_backward_torch(gy, m)


class _WinogradConv(torch.autograd.Function):
    """y = output_transform(bmm(input_transform(x), U^T)) (+ bias); x and y NHWC, U ``[A², K, C]``
    (:func:`weight_transform`; bmm reads it transposed, at the same speed). The backward
    recomputes the transformed input (one pass) instead of keeping it (2.25x / 4x the input for
    F(4, 3) / F(2, 3)), so the saved memory is that of a direct convolution. Under
    ``create_graph=True`` the backward runs the torch formulation of the transforms (the C++ ops
    have no autograd formulas), so double backward works too."""

    @staticmethod
    def forward(ctx, x: Tensor, u: Tensor, bias: Optional[Tensor], m: int) -> Tensor:
        n, h, w, _ = x.shape
        k = u.shape[1]
        y = _out(torch.bmm(_in(x, m), u.transpose(1, 2)), bias, [n, h, w, k], m)
        ctx.save_for_backward(x, u)
        ctx.m = m
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, u = ctx.saved_tensors
        m = ctx.m
        # create_graph=True (a double backward ahead): the torch formulation, differentiable
        cpp = HAS_CPP_TRANSFORMS and not torch.is_grad_enabled()
        grad_y = grad_y.contiguous()
        gm = _out_bwd(grad_y, m, cpp)
        grad_x = grad_u = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _in_bwd(torch.bmm(gm, u), list(x.shape), m, cpp)
        if ctx.needs_input_grad[1]:  # [A², K, C], as u
            if cpp:  # one opaque op: see _weight_grad
                grad_u = torch.ops.dabdetr_winograd.weight_grad(gm, x, m)
            else:
                grad_u = torch.bmm(gm.transpose(1, 2), _in(x, m, cpp))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum((0, 1, 2))
        return grad_x, grad_u, grad_b, None


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, m: int = 4) -> Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=1)`` for a 3x3 ``weight`` ``[K, C, 3, 3]`` and a
    4-D ``x`` ``[N, C, H, W]`` (any layout; channels-last avoids a copy) by Winograd F(m x m, 3 x 3).
    Returns a channels-last ``[N, K, H, W]`` tensor. Differentiable in x, weight and bias."""
    _check_m(m)
    if x.dim() != 4:
        raise ValueError(f"winograd_conv3x3: 'x' must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"winograd_conv3x3: 'weight' must be [K, {x.shape[1]}, 3, 3], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"winograd_conv3x3: 'bias' must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    y = _WinogradConv.apply(x.permute(0, 2, 3, 1).contiguous(), weight_transform(weight, m), bias, m)
    return y.permute(0, 3, 1, 2)


def conv_supported(conv: torch.nn.Conv2d, x: Tensor) -> bool:
    """Whether ``conv`` on ``x`` is a convolution :func:`winograd_conv3x3` computes: 3x3, stride 1,
    padding 1, dilation 1, one group, float32/float64 CPU tensors."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4)
