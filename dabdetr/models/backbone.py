"""ResNet backbones with frozen batch norm, and the backbone + position-encoding wrapper.

The ResNet is written here (no torchvision dependency) with torchvision's parameter names
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0`` ...), so torchvision ImageNet
weights load into :class:`ResNet` directly (``fc.*`` is dropped) when a user has them; nothing is
downloaded at run time.

Module paths inside :class:`DABDETR` follow the original: ``backbone.0.body.<torchvision name>``
(``backbone`` is a :class:`Joiner`, a two-entry ``nn.Sequential`` of the :class:`Backbone` and the
position encoding), so the original checkpoints' backbone keys map one to one.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ext
from . import activations, winograd

__all__ = [
    "FrozenBatchNorm2d",
    "conv_norm",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet",
    "RESNET_SPECS",
    "Backbone",
    "Joiner",
    "load_torchvision_resnet_weights",
]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers).

    ``y = x * s + (b - mean * s)``, ``s = w * rsqrt(var + eps)``, eps 1e-5 as the original.
    ``num_batches_tracked`` in a loaded state dict is ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def scale_bias(self) -> Tuple[Tensor, Tensor]:
        """``(s, b - mean * s)``: the per-channel affine map this layer applies."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        scale, bias = self.scale_bias()
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + bias.reshape(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _norm_factory(kind: str, eps: float):
    if kind == "frozen":
        return lambda c: FrozenBatchNorm2d(c, eps=eps)
    if kind == "batch":
        return lambda c: nn.BatchNorm2d(c, eps=eps)
    raise ValueError(f"backbone norm must be 'frozen' or 'batch', got {kind!r}")


HAS_RELAYOUT = _ext.has_cpu_op("dabdetr_layout::relayout")

if HAS_RELAYOUT:
    @torch.library.register_fake("dabdetr_layout::relayout")
    def _(x, channels_last):
        if x.dim() != 4:
            raise ValueError(f"dabdetr_layout.relayout: 'x' must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
        return torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def relayout(x: Tensor, channels_last: bool) -> Tensor:
    """``x.contiguous(memory_format=...)`` for a 4-D tensor: NCHW-contiguous (``channels_last=False``)
    or channels-last. Between those two layouts on the CPU (float32/float64) the copy is the C++ op
    ``dabdetr_layout::relayout`` (csrc/cpu/layout_cpu.cpp: a tiled transpose, 1.1-3.8x faster than
    torch's copy on R50's maps, e.g. ``[1, 128, 200, 334]`` to NCHW 17-26 -> 7 ms on 2 cores), else
    torch's; ``x`` itself when it has that layout already (the op always copies)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if HAS_RELAYOUT and x.dim() == 4 and x.device.type == "cpu" and not x.is_contiguous(memory_format=fmt):
        return torch.ops.dabdetr_layout.relayout(x, channels_last)
    return x.contiguous(memory_format=fmt)


# explicit schema: independent of how a torch version parses the postponed (string) annotations
@torch.library.custom_op("dabdetr_backbone::conv2d_weight_grad_nchw", mutates_args=(),
                         schema="(Tensor grad_out, Tensor x, Tensor weight, int[] stride, int[] padding, "
                                "int[] dilation, int groups) -> Tensor")
def conv2d_weight_grad_nchw(grad_out: Tensor, x: Tensor, weight: Tensor, stride: List[int], padding: List[int],
                            dilation: List[int], groups: int) -> Tensor:
    """The weight gradient of ``F.conv2d(x, weight, None, stride, padding, dilation, groups)`` for
    the output gradient ``grad_out``, computed from NCHW (contiguous) copies of ``grad_out`` and
    ``x`` whatever their layout (see :class:`_ConvNCHWWeightGrad`). An opaque op so that
    ``torch.compile`` keeps the choice: inductor runs a CPU graph's convolutions channels-last
    (its layout optimization), which would bring back the slow channels-last kernel."""
    return torch.ops.aten.convolution_backward(relayout(grad_out, False), relayout(x, False), weight, None, stride,
                                               padding, dilation, False, [0, 0], groups, [False, True, False])[1]


@conv2d_weight_grad_nchw.register_fake
def _(grad_out, x, weight, stride, padding, dilation, groups):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


class _ConvNCHWWeightGrad(torch.autograd.Function):
    """``F.conv2d`` of a channels-last CPU input whose weight gradient is computed from NCHW copies
    of the input and of the output gradient (the forward and the input gradient stay channels-last).

    Why: oneDNN's channels-last convolutions are the fast ones on x86 CPUs (R50 at 800x1333 on a
    2-core AVX2 EPYC: the forward of 1x1 convolutions up to 3x faster than from NCHW, the frozen stem
    and layer1 ~1.8x) except one kernel, the weight gradient of spatial (3x3) convolutions: 1.5-5.6x
    slower than from NCHW there (layer2's 3x3: 312 vs 56 ms), from 128 channels up (narrower ones are
    faster channels-last: ``_NCHW_WGRAD_MIN_CHANNELS``). Two layout copies of that convolution's
    input and output gradient cost a few ms. Measured over the R50 body's forward + backward (frozen
    stem and layer1, as in training): NCHW 4.7-5.1 s, all channels-last 4.4 s (backward +8%), this
    mix 4.1 s at 800x1333 batch 1; 1.9-2.2 s / 1.9 s / 1.8-1.9 s at 512x512 batch 2."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (list(stride), list(padding), list(dilation), groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            go = relayout(grad_out, True)
            grad_x = torch.ops.aten.convolution_backward(go, x, weight, None, stride, padding, dilation, False,
                                                         [0, 0], groups, [True, False, False])[0]
        if need_w:
            grad_w = conv2d_weight_grad_nchw(grad_out, x, weight, stride, padding, dilation, groups)
        if need_b and ctx.has_bias:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def _is_channels_last(t: Tensor) -> bool:
    """A 4-D tensor laid out channels-last (and not also plain-contiguous, as e.g. 1x1 maps are)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


# Channels-last 3x3 weight gradient / NCHW one (copies included), same machine: 0.5-0.8 at 32-64
# channels (the demo's narrow ResNet), 1.05-1.3 at 128 and small maps, 1.6-2.3 at 128-512 channels
# on R50's maps.
_NCHW_WGRAD_MIN_CHANNELS = 128


# Winograd for 3x3 stride-1 CPU convolutions (``ResNet.cpu_winograd``), per mode:
#   "f2": F(2x2, 3x3) only, from _WINOGRAD_F2_MIN_CHANNELS channels. Its float32 output error
#         against float64 is at or below the direct convolution's (R50 shapes: 3.6-4.2e-7 vs
#         0.7-1.9e-6 relative to the output's maximum; small maps 3-5e-7 vs 2-4e-7; the transforms
#         are adds and halvings), so it is the fused backends' default. Forward+backward per
#         convolution, 2-core AVX-512 EPYC, vs the direct path (channels-last oneDNN, NCHW weight
#         gradient), ms: R50 at 800x1333:1 layer2 (128 channels, 100x167) 74.7 -> 59.6, layer3
#         (256, 50x84) 72.8 -> 48.5, layer4 (512, 25x42) 74.4 -> 47.2; at 512x512:2 37.5 -> 29.0,
#         37.2 -> 25.3, 41.3 -> 28.0; forward only 1.02-1.38x at 128-256 channels, 1.2-1.3x at
#         512. At 64 channels it loses (layer1, forward only: 11.3 -> 14.6 ms at 512x512:2), hence
#         the floor.
#   "f4": F(4x4, 3x3) from _WINOGRAD_MIN_CHANNELS channels where the map has enough tiles, else
#         F(2x2, 3x3) as "f2": 4x fewer multiply-adds in the GEMMs, float32 error ~4-8x the direct
#         one's (6-8e-6), hence a choice (``backbone_winograd="f4"``, the "+winograd" benchmark
#         providers). Same machine, same cases: layer2 74.7 -> 36.7, layer3 72.8 -> 32.9, layer4
#         (77 tiles of F(4, 3)) 74.4 -> 40.4; at 512x512:2 37.5 -> 18.3, 37.2 -> 18.5, layer4 (32
#         tiles: F(2, 3)) 41.3 -> 28.0; layer1 22.2 -> 18.2 and 11.3 -> 9.2 (forward only).
#   "off": the direct convolution.
# (benchmarks/results/winograd_cpu_float32_vm.md; python benchmarks/bench_winograd.py)
WINOGRAD_MODES = ("off", "f2", "f4")
_WINOGRAD_MIN_CHANNELS = 64
_WINOGRAD_F2_MIN_CHANNELS = 128
# ... and enough tiles: the weight transform and the transformed weights ((m+2)^2 C K values) cost
# the same whatever the map size, the GEMMs' saving grows with it. Measured crossovers
# (benchmarks/bench_winograd.py, 128-384 px images; forward+backward, C = K): F(4, 3) at 256 channels
# loses to the direct convolution on 16 tiles (0.88x), wins on 36 (1.32x); at 128 channels it wins
# from 16; at 512 channels it ties F(2, 3) on 32 tiles (0.99x) and beats it from 64 (1.15-1.26x on
# 64-77; 0.83x on 16); F(2, 3) at 512 channels loses to direct on 36 tiles (0.76x), wins on 128
# (1.18x). Rule: F(4, 3) on at least max(32, max(C, K) / 8) tiles, else F(2, 3) on at least
# max(C, K) / 4.
_WINOGRAD_MIN_TILES = 32


def winograd_mode(value) -> str:
    """A ``cpu_winograd`` / ``backbone_winograd`` value as one of :data:`WINOGRAD_MODES`: the
    strings themselves, ``True`` = ``"f4"`` and ``False`` / ``None`` = ``"off"`` (the boolean
    switch of earlier versions, whose ``True`` was F(4, 3))."""
    if value is True:
        return "f4"
    if value is False or value is None:
        return "off"
    if isinstance(value, str) and value.lower() in WINOGRAD_MODES:
        return value.lower()
    raise ValueError(f"backbone_winograd (ResNet.cpu_winograd) must be one of {WINOGRAD_MODES} or a bool, "
                     f"got {value!r}")


def _winograd_tile(conv: nn.Conv2d, x: Tensor, mode: str = "f4") -> int:
    """The Winograd tile (4 or 2) for ``conv`` on ``x`` in ``mode`` (see WINOGRAD_MODES), 0: the
    direct convolution."""
    if mode == "off" or not winograd.conv_supported(conv, x) or torch.is_autocast_enabled("cpu"):
        return 0
    narrow, wide = min(conv.in_channels, conv.out_channels), max(conv.in_channels, conv.out_channels)
    n, _, h, w = x.shape
    if (mode == "f4" and narrow >= _WINOGRAD_MIN_CHANNELS
            and winograd.tile_grid(4, n, h, w)[2] >= max(_WINOGRAD_MIN_TILES, wide // 8)):
        return 4
    if narrow >= _WINOGRAD_F2_MIN_CHANNELS and winograd.tile_grid(2, n, h, w)[2] >= wide // 4:
        return 2
    return 0


def _conv2d(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Optional[Tensor], winograd_mode: str = "off") -> Tensor:
    """``F.conv2d`` with ``conv``'s geometry and the given weight and bias; a channels-last CPU input
    of a spatial convolution of at least ``_NCHW_WGRAD_MIN_CHANNELS`` channels whose weight trains
    goes through :class:`_ConvNCHWWeightGrad` (not under CPU autocast, whose casts that function
    does not track). ``winograd_mode``: 3x3 stride-1 CPU convolutions may run as Winograd F(2, 3) /
    F(4, 3) (:mod:`.winograd`; which ones: :func:`_winograd_tile`)."""
    m = _winograd_tile(conv, x, winograd_mode)
    if m:
        return winograd.winograd_conv3x3(x, weight, bias, m)
    if (x.device.type == "cpu" and weight.requires_grad and torch.is_grad_enabled() and max(conv.kernel_size) > 1
            and min(conv.in_channels, conv.out_channels) >= _NCHW_WGRAD_MIN_CHANNELS and _is_channels_last(x)
            and not torch.is_autocast_enabled("cpu") and isinstance(conv.padding, tuple)):
        return _ConvNCHWWeightGrad.apply(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor, fold: bool, winograd_mode: str = "off") -> Tensor:
    """``norm(conv(x))``. ``fold=False``: exactly that (the original's modules). ``fold=True`` (the
    fused backends): with a :class:`FrozenBatchNorm2d`, the frozen affine map is folded into the
    convolution: ``conv(x, W * s) + (b - mean * s)``, the same function (float rounding aside) in one
    pass over the activation instead of three (the convolution's output, then the multiply and the
    add of the original's FrozenBatchNorm2d, each a full read and write; one more pass in the
    backward); the gradient still reaches ``conv.weight`` (through ``W * s``). The convolution runs
    through :func:`_conv2d` (channels-last CPU inputs: see :class:`_ConvNCHWWeightGrad`;
    ``winograd_mode``: Winograd for the 3x3 stride-1 ones, see ``ResNet.cpu_winograd``)."""
    if not fold:
        return norm(conv(x))
    if not isinstance(norm, FrozenBatchNorm2d):
        return norm(_conv2d(conv, x, conv.weight, conv.bias, winograd_mode))
    scale, bias = norm.scale_bias()
    w = conv.weight
    return _conv2d(conv, x, w * scale.to(w.dtype).reshape(-1, 1, 1, 1), bias.to(w.dtype), winograd_mode)


def _downsample(ds: Optional[nn.Module], x: Tensor, fold: bool) -> Tensor:
    if ds is None:
        return x
    if isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d):
        return conv_norm(ds[0], ds[1], x, fold)
    return ds(x)


def _block_relu(x: Tensor, relu: nn.Module, fused: bool, after_winograd: bool = False) -> Tensor:
    """The backbone's ReLU (``relu``, torchvision's in-place module). On the fused backends, while
    ``torch.compile`` traces a CPU graph that needs gradients, :func:`.activations.relu` (an opaque
    backward: no bool masks in the compiled step); in eager, out of place after a convolution that
    may have run as Winograd (``after_winograd``): that one returns a permuted view of its autograd
    output, and an in-place op on such a view makes autograd clone the whole gradient in the
    backward (``CopySlices``; ~1 ms per convolution at 512x512:2 on the 2-core CPU)."""
    if fused and activations.use_cpu_relu(x):
        return activations.relu(x)
    if after_winograd and x.requires_grad and torch.is_grad_enabled():
        return F.relu(x)
    return relu(x)


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: int = 1, norm=None):
        super().__init__()
        # torchvision's BasicBlock refuses dilation; here DC5 works for resnet18/34 too (both 3x3
        # convolutions dilated, as the bottleneck's one), which only changes padding, not weights.
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm(planes)
        self.downsample = downsample
        self.stride = stride
        self.backend: Optional[str] = None  # "torch": the original's unfolded frozen BN (see conv_norm)
        self.winograd = "off"  # set by ResNet.cpu_winograd

    def forward(self, x: Tensor) -> Tensor:
        fold = self.backend != "torch"
        wino = self.winograd if fold else "off"
        identity = _downsample(self.downsample, x, fold)
        out = _block_relu(conv_norm(self.conv1, self.bn1, x, fold, wino), self.relu, fold, wino != "off")
        out = conv_norm(self.conv2, self.bn2, out, fold, wino)
        return _block_relu(out + identity, self.relu, fold)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: int = 1, norm=None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.backend: Optional[str] = None  # "torch": the original's unfolded frozen BN (see conv_norm)
        self.winograd = "off"  # set by ResNet.cpu_winograd

    def forward(self, x: Tensor) -> Tensor:
        fold = self.backend != "torch"
        identity = _downsample(self.downsample, x, fold)
        out = _block_relu(conv_norm(self.conv1, self.bn1, x, fold), self.relu, fold)
        wino = self.winograd if fold else "off"
        out = _block_relu(conv_norm(self.conv2, self.bn2, out, fold, wino), self.relu, fold, wino != "off")
        out = conv_norm(self.conv3, self.bn3, out, fold)
        return _block_relu(out + identity, self.relu, fold)


RESNET_SPECS: Dict[str, Tuple[Type[nn.Module], Tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """ResNet body (no pooling head / fc) with torchvision parameter names; returns layer4's map.

    ``dilation=True`` replaces layer4's stride by dilation 2 (DC5, output stride 16): its first block
    keeps dilation 1 and stride 1, the others use dilation 2, as torchvision's
    ``replace_stride_with_dilation=[False, False, True]``.

    ``width`` is the stem / layer1 width (64 in torchvision's ResNets; layers 2-4 double it each
    time): a narrower ResNet for the ``tiny`` preset, with the same parameter names.
    """

    def __init__(self, block: Type[nn.Module], layers: Sequence[int], dilation: bool = False,
                 norm: str = "frozen", norm_eps: float = 1e-5, width: int = 64, stages: int = 4):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if stages not in (3, 4):
            raise ValueError(f"stages must be 3 (up to layer3, output stride 16) or 4, got {stages}")
        if stages == 3 and dilation:
            raise ValueError("dilation (DC5) changes layer4, which stages=3 leaves out")
        self._norm = _norm_factory(norm, norm_eps)
        self.inplanes = width
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.stages = stages
        if stages == 4:
            self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2, dilate=dilation)
        self.num_channels = (8 if stages == 4 else 4) * width * block.expansion
        self.stride = 16 if (dilation or stages == 3) else 32
        # ``backend`` (set for the whole model by DABDETR.set_backend): "torch" keeps the original's
        # frozen-BN formulation (the eager baseline); any other value folds frozen BN into the
        # preceding convolution (conv_norm).
        self.backend: Optional[str] = None
        # fused backends on the CPU: channels-last activations (see _channels_last); False: NCHW
        self.cpu_channels_last = True
        self.cpu_winograd = "f2"
        self._init_weights()

    @property
    def cpu_winograd(self) -> str:
        """How the fused backends run the blocks' 3x3 stride-1 convolutions on the CPU (one of
        :data:`WINOGRAD_MODES`): ``"f2"`` (default) Winograd F(2, 3) from 128 channels, whose
        float32 rounding error is at or below the direct convolution's; ``"f4"`` F(4, 3) from 64
        channels (else F(2, 3) as "f2"), fewer multiply-adds but ~4-8x the direct convolution's
        float32 error;
        ``"off"`` the direct convolution. Each only where the map has enough tiles (measured gains
        and crossovers: the comment above ``WINOGRAD_MODES``). Set it with a mode or a bool (True:
        ``"f4"``). ``backend="torch"`` never uses it."""
        modes = {getattr(m, "winograd", "off") for m in self.modules() if isinstance(m, (BasicBlock, Bottleneck))}
        return modes.pop() if len(modes) == 1 else "mixed"

    @cpu_winograd.setter
    def cpu_winograd(self, value) -> None:
        mode = winograd_mode(value)
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                m.winograd = mode

    def _channels_last(self, x: Tensor) -> bool:
        """Whether the body runs channels-last: for a channels-last model
        (``model.to(memory_format=torch.channels_last)``: the images follow, or each convolution
        would convert its input), and for the fused backends on the CPU while ``cpu_channels_last``
        and the stem is frozen (the original's recipe: stem and layer1 frozen, or all frozen).
        There oneDNN's channels-last kernels win (see :class:`_ConvNCHWWeightGrad` for the one that
        does not): R50 train step 4-5% faster at 800x1333:1 and 512x512:2, an R18 body with that
        rule ~4%; with every layer training (the ``tiny`` preset from scratch) channels-last
        activations measured 4-5% slower, so that case stays NCHW. ``backend="torch"`` with an
        NCHW model keeps the original's NCHW computation. The output is then channels-last too,
        which makes the transformer's ``flatten(2).transpose(1, 2)`` of the projected features a
        view."""
        w = self.conv1.weight
        if _is_channels_last(w):
            return True
        return (self.cpu_channels_last and self.backend != "torch" and x.device.type == "cpu"
                and not w.requires_grad)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       self._norm(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation, norm=self._norm)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, dilation=self.dilation, norm=self._norm))
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_backend(self, backend: Optional[str]) -> None:
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        if self._channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last)
        fold = self.backend != "torch"
        x = self.maxpool(_block_relu(conv_norm(self.conv1, self.bn1, x, fold), self.relu, fold))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x) if self.stages == 4 else x


def resnet(name: str, dilation: bool = False, norm: str = "frozen", norm_eps: float = 1e-5, width: int = 64,
           stages: int = 4) -> ResNet:
    if name not in RESNET_SPECS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(RESNET_SPECS)}")
    block, layers = RESNET_SPECS[name]
    return ResNet(block, layers, dilation=dilation, norm=norm, norm_eps=norm_eps, width=width, stages=stages)


def load_torchvision_resnet_weights(body: ResNet, state_dict: Dict[str, Tensor]) -> None:
    """Load a torchvision ``resnetXX`` state dict (e.g. ImageNet weights a user has on disk) into
    ``body``. ``fc.*``, ``num_batches_tracked`` (and ``layer4.*`` for a 3-stage body) are dropped;
    every other key must match."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
          and not (body.stages == 3 and k.startswith("layer4."))}
    missing, unexpected = body.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise KeyError(f"torchvision ResNet weights do not match the backbone: missing {missing[:10]}, "
                       f"unexpected {unexpected[:10]}")


class Backbone(nn.Module):
    """ResNet body + padding-mask downsampling. Only the last stage is returned (layer4, as the
    original without ``--masks``; layer3 with ``stages=3``).

    Trainable-layer rule of the original: when ``train_backbone`` (``lr_backbone > 0``), parameters
    whose name contains one of ``trainable_layers`` (default layer2-4) train; all others are frozen.
    """

    def __init__(self, name: str = "resnet50", dilation: bool = False, train_backbone: bool = True,
                 trainable_layers: Sequence[str] = ("layer2", "layer3", "layer4"),
                 norm: str = "frozen", norm_eps: float = 1e-5, width: int = 64, stages: int = 4):
        super().__init__()
        self.body = resnet(name, dilation=dilation, norm=norm, norm_eps=norm_eps, width=width, stages=stages)
        self.num_channels = self.body.num_channels
        self.stride = self.body.stride
        for pname, p in self.body.named_parameters():
            if not train_backbone or not any(layer in pname for layer in trainable_layers):
                p.requires_grad_(False)

    def forward(self, images: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        feat = self.body(images)
        # legacy 'nearest' downsampling of the padding mask, as the original
        mask_f = F.interpolate(mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]
        return feat, mask_f


class Joiner(nn.Sequential):
    """``Sequential(backbone, position_embedding)`` as the original's Joiner (so its keys are
    ``backbone.0.body.*``). Returns ``(feature [B,C,h,w], mask [B,h,w], pos [B,d,h,w])``; the position
    embedding is cast to the feature dtype."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.stride = backbone.stride

    def forward(self, images: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        feat, mask_f = self[0](images, mask)
        pos = self[1](mask_f).to(feat.dtype)
        return feat, mask_f, pos
