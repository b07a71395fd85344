"""``sine_embed``: the sine/cosine embedding of N-D coordinates (DAB-DETR's anchor embedding)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _amp, _checks, _dispatch, reference

_OP = "dabdetr.ops.sine_embed"


def sine_embed(
    coords: Tensor,
    num_feats: int = 128,
    temperature: Union[float, Sequence[float]] = 10000.0,
    scale: float = 2 * math.pi,
    exchange_xy: bool = True,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Sine embedding of coordinates: ``coords [..., C]`` → ``[..., C * num_feats]``.

    Let ``c'`` be ``coords`` with its first two coordinates swapped when ``exchange_xy`` (DAB-DETR's
    (y, x, w, h) output order from (x, y, w, h) input), else ``coords``. For output slot ``i`` and
    pair ``j < num_feats / 2``, with ``v = c'[i] * scale`` and ``t = T_i ** (2 j / num_feats)``::

        out[i * num_feats + 2 j]     = sin(v / t)
        out[i * num_feats + 2 j + 1] = cos(v / t)

    Args:
        coords: floating tensor ``[..., C]`` (C ≥ 1; C ≥ 2 with ``exchange_xy``); any strides.
        num_feats: features per coordinate (positive, even). DAB-DETR: ``hidden_dim // 2``.
        temperature: a number, or one per coordinate in INPUT order (the temperature of x stays
            with x after the swap).
        scale: multiplies the coordinates before the division (DAB-DETR: 2π).
        exchange_xy: swap the first two coordinates in the output.
        backend: ``None`` (``DABDETR_BACKEND`` or automatic), ``"torch"``, ``"cpu"``, ``"cuda"``
            or ``"triton"``.

    Differentiable with respect to ``coords``. ``gen_sineembed_for_position(pos)`` of the original
    code is ``sine_embed(pos, 128)`` for 2-D and 4-D ``pos``.
    """
    _checks.tensor(_OP, "coords", coords)
    if coords.dim() < 1:
        raise ValueError(f"{_OP}: 'coords' must have at least 1 dimension (the coordinates), got a 0-d tensor")
    C = coords.shape[-1]
    min_c = 2 if exchange_xy else 1
    if C < min_c:
        raise ValueError(
            f"{_OP}: 'coords' must have at least {min_c} coordinate(s) in its last dimension"
            f"{' (exchange_xy=True swaps the first two)' if exchange_xy else ''}, got shape {tuple(coords.shape)}"
        )
    num_feats = _checks.num_feats(_OP, num_feats)
    temps = _checks.temperatures(_OP, temperature, C)
    scale = _checks.real(_OP, "scale", scale)
    exchange_xy = bool(exchange_xy)
    coords = _amp.cast(coords, _amp.autocast_dtype(coords.device.type))
    chosen = _dispatch.resolve("sine_embed", coords.device, backend, None, coords.dtype)
    if chosen == "torch":
        return reference.sine_embed(coords, num_feats, temps, scale, exchange_xy)
    if chosen == "triton":
        return _dispatch.python_impl("triton", "sine_embed")(coords, num_feats, list(temps), scale, exchange_xy)
    return torch.ops.dabdetr.sine_embed(coords, num_feats, list(temps), scale, exchange_xy)
