"""Shared helpers of the Triton kernels: interpreter detection, the launch wrapper, block sizes and
the "rows" view of ``[..., K]`` tensors with arbitrary strides.

Imported only after ``import triton`` succeeded (``dabdetr.kernels.__init__`` guards it).
"""

import contextlib
import os
from typing import Tuple

import torch
import triton
from torch._subclasses.fake_tensor import is_fake

# ``TRITON_INTERPRET=1`` makes ``triton.jit`` return interpreted functions (numpy on the CPU); it is
# read when the kernels are decorated, i.e. when this package is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Registration path (DESIGN.md; issue "Triton kernels"): on GPUs the ops are ``torch.library.triton_op``
# (torch.compile traces into the kernels), under the interpreter plain ``custom_op`` wrappers (with
# which opcheck and torch.compile pass; triton_op's HOP does not work on interpreted functions).
USE_TRITON_OP = not INTERPRET

if USE_TRITON_OP:
    from torch.library import wrap_triton  # noqa: F401  (the name triton_op's kernel finder looks for)
else:

    def wrap_triton(kernel):  # noqa: D103  (the interpreter launches kernels directly)
        return kernel


# DABDETR_TRITON_AUTOTUNE=0: use only the first config of every autotuning set (no tuning; for
# time-limited test runs: first use of a kernel then compiles one config instead of all of them).
AUTOTUNE = os.environ.get("DABDETR_TRITON_AUTOTUNE", "1") != "0"


def tuning_set(configs):
    return list(configs) if AUTOTUNE else list(configs[:1])


def autotune(configs, key):
    """``triton.autotune`` over ``tuning_set(configs)``; the full list stays on the autotuner as
    ``all_configs`` (tests/test_triton.py runs every config against the reference on a GPU)."""

    def decorate(fn):
        tuner = triton.autotune(configs=tuning_set(configs), key=key)(fn)
        tuner.all_configs = list(configs)
        return tuner

    return decorate


def device_of(t: torch.Tensor):
    """Context for a launch on ``t``'s GPU: Triton launches on the current device (and its current
    stream), which need not be the one holding the tensors (``cuda:1`` tensors while ``cuda:0`` is
    current). A no-op for CPU tensors (the interpreter), when ``t``'s device is already current, and
    for fake tensors (torch.compile's tracing of the triton_op body launches nothing: no device is
    touched, so tracing works where the traced device is absent)."""
    if t.device.type == "cuda" and not INTERPRET and not is_fake(t):
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# The dtypes the Triton kernels take (float64 is served by the reference and the C++ CPU kernel).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(op: str, t: torch.Tensor) -> None:
    if t.dtype not in DTYPES:
        from dabdetr.ops._dispatch import BackendError

        raise BackendError(
            f"dabdetr.ops.{op}: backend 'triton' takes float32, float16 and bfloat16 tensors, got "
            f"{t.dtype}; use backend='torch' (or 'cpu' for CPU tensors) for {t.dtype}"
        )


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes an output of ``dtype`` in. The interpreter truncates fp32 -> bf16
    casts (GPUs round to nearest even, ``cvt.rn.bf16.f32``), so interpreted kernels write bf16
    outputs as fp32, rounded by torch afterwards (:func:`to_dtype`)."""
    return torch.float32 if (INTERPRET and dtype == torch.bfloat16) else dtype


def to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def dot_block(n: int) -> int:
    """Block size of a ``tl.dot`` operand dim holding ``n`` (masked) values: a power of two >= 16."""
    return max(16, next_pow2(n))


def rows(t: torch.Tensor) -> Tuple[torch.Tensor, int, int, int]:
    """A ``[..., K]`` tensor as rows ``r`` in ``[0, numel / K)``: returns ``(t', n_inner, s_outer,
    s_inner)`` with row ``r`` at ``t'.data_ptr() + (r // n_inner) * s_outer + (r % n_inner) * s_inner``
    (elements), its last dim at stride ``t'.stride(-1)``.

    Leading dims are merged where their strides allow; up to two merged dims are read in place
    (e.g. a sequence-first ``[N, B, C]`` tensor viewed as ``[B, N, C]``, or one expanded over dim 0);
    more are copied (``reshape``), which only happens for exotic layouts of small tensors.
    """
    dims = []  # (size, stride), outermost first, size-1 dims dropped
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if not dims:
        return t, 1, 0, 0
    if len(dims) == 1:
        return t, dims[0][0], 0, dims[0][1]
    if len(dims) == 2:
        return t, dims[1][0], dims[0][1], dims[1][1]
    t2 = t.reshape(-1, t.shape[-1])
    return t2, t2.shape[0], 0, t2.stride(0)


def config(num_warps: int, num_stages: int, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs (benchmarks/triton_compile_report.py compiles every kernel for
# sm_80 / sm_90 without a GPU)

def compile_spec(kernel, pointers, floats=(), constexprs=None, ones=(), cfg=None, label=""):
    """What ``triton.compile(ASTSource(...))`` needs to build ``kernel`` the way a launch would.

    ``pointers``: {arg: "*fp32" | ... | None (an absent optional input: constexpr None)};
    ``floats``: fp32 scalar args; other non-constexpr args are i32. ``ones``: int args the runtime
    specialises to the constant 1 (contiguous last-dim strides). ``cfg``: the autotuning config.
    Pointers get Triton's 16-byte divisibility hint (as for tensors from the caching allocator).
    """
    fn = getattr(kernel, "fn", kernel)  # Autotuner -> JITFunction
    consts = dict(constexprs or {})
    num_warps, num_stages = 4, 3
    if cfg is not None:
        consts.update(cfg.kwargs)
        num_warps, num_stages = cfg.num_warps, cfg.num_stages
    for a in ones:
        consts[a] = 1
    signature, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in pointers and pointers[a] is None:
            consts[a] = None
        if a in consts:
            signature[a] = "constexpr"
        elif a in pointers:
            signature[a] = pointers[a]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a in floats:
            signature[a] = "fp32"
        else:
            signature[a] = "i32"
    meta = dict(cfg.kwargs) if cfg is not None else {}
    return dict(name=fn.__name__, fn=fn, signature=signature, constexprs=consts, attrs=attrs,
                num_warps=num_warps, num_stages=num_stages, meta=meta, label=label)


def largest_config(configs):
    """The config with the biggest tile (the one most likely to run out of registers or memory)."""
    def size(c):
        n = 1
        for v in c.kwargs.values():
            n *= v
        return (n, c.num_warps, c.num_stages)

    return max(configs, key=size)
