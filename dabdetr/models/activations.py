"""Activations with CPU-specific autograd formulations (same function and gradient as torch's).

:func:`relu`: ``F.relu``; under ``torch.compile``, for a CPU tensor that needs a gradient,
:class:`_CPUReLU`, whose backward is opaque to the compile (see there). Used by the fused backends'
backbone blocks and by the transformer's MLPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.library.custom_op("dabdetr_act::relu_backward", mutates_args=(), schema="(Tensor grad, Tensor out) -> Tensor")
def relu_backward(grad: Tensor, out: Tensor) -> Tensor:
    """The gradient of ``out = relu(x)``: ``grad`` where ``out > 0``, else 0 (``threshold_backward``).
    Opaque to ``torch.compile``: see :class:`_CPUReLU`."""
    return torch.ops.aten.threshold_backward(grad, out, 0.0)


@relu_backward.register_fake
def _(grad, out):
    return torch.empty_like(grad)


class _CPUReLU(torch.autograd.Function):
    """``relu(x)`` whose backward reads the saved output through the opaque op
    :func:`relu_backward` (only taken while ``torch.compile`` traces: :func:`use_cpu_relu`).

    Why: compiling the training step, AOTAutograd's partitioner saves each ReLU's mask ``out <= 0``
    as a bool tensor (smaller than the float output) and inductor's CPU code stores and loads bool
    tensors slowly in torch 2.14 (a 1M-element ``x > 0`` to bool: 5.1 ms compiled, 0.23 ms eager;
    ``where`` on a stored mask: 2 ms). An opaque backward keeps the mask out of the graph: the
    float output is saved (the next convolution saves it anyway). Measured, R50 body forward +
    backward compiled with Winograd, interleaved runs: 1111 -> 1087 ms at 512x512:2, 2159 -> 2098 ms
    at 800x1333:1. Same values and gradients (the op is ``F.relu``'s own ``threshold_backward``)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = torch.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable
            return grad * (out > 0).to(grad.dtype)
        return relu_backward(grad, out)


def use_cpu_relu(x: Tensor) -> bool:
    """Whether :func:`relu` takes :class:`_CPUReLU` for ``x``: while ``torch.compile`` traces, for a
    CPU tensor that needs a gradient. Outside a compile plain ``F.relu`` is as fast or faster (the
    demo's tiny model, eager: a Python autograd Function per ReLU cost 2.6-3.9% of its step)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x.requires_grad and torch.is_grad_enabled()


def relu(x: Tensor) -> Tensor:
    """``F.relu(x)`` (out of place); :class:`_CPUReLU` where :func:`use_cpu_relu` says so."""
    return _CPUReLU.apply(x) if use_cpu_relu(x) else F.relu(x)
