"""Autocast support: under ``torch.autocast`` the fused ops run in the autocast dtype."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    if dtype is None or t is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    return t.to(dtype)
