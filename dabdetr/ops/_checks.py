"""Argument validation of the public ops: errors name the argument and say what was expected.

All checks are plain Python on shapes/dtypes/devices, so torch.compile traces them into guards.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor


def tensor(op: str, name: str, t, floating: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: '{name}' must be a floating-point tensor, got dtype {t.dtype}")


def same_dtype_device(op: str, named: Sequence[Tuple[str, Optional[Tensor]]]) -> None:
    """All given tensors (None entries skipped) share the dtype and device of the first."""
    present = [(n, t) for n, t in named if t is not None]
    if not present:
        return
    n0, t0 = present[0]
    for n, t in present[1:]:
        if t.device != t0.device:
            raise ValueError(f"{op}: '{n}' is on {t.device} but '{n0}' is on {t0.device}")
        if t.dtype != t0.dtype:
            raise TypeError(f"{op}: '{n}' has dtype {t.dtype} but '{n0}' has dtype {t0.dtype}")


def num_feats(op: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 2:
        raise ValueError(f"{op}: 'num_feats' must be a positive even int, got {value!r}")
    return value


def real(op: str, name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{op}: '{name}' must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{op}: '{name}' must be a finite{' positive' if positive else ''} number, got {value!r}")
    return v


def temperatures(op: str, value: Union[float, Sequence[float]], count: int) -> Tuple[float, ...]:
    """A scalar or a sequence of ``count`` positive temperatures, as a tuple of floats."""
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(
                f"{op}: 'temperature' must be a number or a sequence of {count} numbers "
                f"(one per input coordinate), got {len(value)} values"
            )
        return tuple(real(op, "temperature", v, positive=True) for v in value)
    return (real(op, "temperature", value, positive=True),) * count


def rank(op: str, name: str, t: Tensor, n: int, layout: str) -> None:
    if t.dim() != n:
        raise ValueError(f"{op}: '{name}' must be {n}-D {layout}, got shape {tuple(t.shape)}")


def last_dim(op: str, name: str, t: Tensor, size: int, why: str = "") -> None:
    if t.dim() < 1 or t.shape[-1] != size:
        raise ValueError(
            f"{op}: '{name}' must have last dimension {size}{why}, got shape {tuple(t.shape)}"
        )


def leading_like(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.shape[:-1] != ref.shape[:-1]:
        raise ValueError(
            f"{op}: '{name}' must have the leading shape of '{ref_name}' {tuple(ref.shape[:-1])}, "
            f"got shape {tuple(t.shape)}"
        )


def dim_match(op: str, what: str, a_name: str, a: int, b_name: str, b: int) -> None:
    if a != b:
        raise ValueError(f"{op}: {what} of '{a_name}' ({a}) does not match {what} of '{b_name}' ({b})")
