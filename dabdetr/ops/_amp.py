"""Autocast support: under ``torch.autocast`` the fused ops run in the autocast dtype."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


# Device types with an autocast mode (torch.is_autocast_enabled raises for others, e.g. "meta").
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    if dtype is None or t is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    return t.to(dtype)
