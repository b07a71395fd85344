"""The CPU kernels compiled for older instruction sets than this machine's: the attention tile
kernels and the Winograd transforms each carry AVX-512, AVX2 and baseline (SSE2) copies and pick
the best at load time, so a test run exercises one copy only. Here a subprocess per instruction set
caps the choice (DABDETR_ATTENTION_ISA, DABDETR_WINOGRAD_ISA) and checks that copy against the
float64 reference (attention: outputs and gradients; Winograd: the torch formulation)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dabdetr import _ext

ROOT = Path(__file__).resolve().parents[1]

SNIPPET = r"""
import torch
from dabdetr import ops
from dabdetr.ops import reference
from dabdetr.models import winograd as wg

g = torch.Generator().manual_seed(0)
# attention: odd sizes (tails of every tile loop), a padded key, float32 and float64
for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
    B, Nq, Nk, H, Dc, Dp, Dv = 2, 13, 37, 3, 8, 8, 12
    ts = [torch.randn(B, n, H, d, generator=g, dtype=torch.float64)
          for n, d in ((Nq, Dc), (Nq, Dp), (Nk, Dc), (Nk, Dp), (Nk, Dv))]
    mask = torch.zeros(B, Nk, dtype=torch.bool)
    mask[1, -5:] = True
    ref_in = [t.clone().requires_grad_() for t in ts]
    ref = reference.content_position_attention(*ref_in, key_padding_mask=mask)[0]
    got_in = [t.to(dtype).requires_grad_() for t in ts]
    out = ops.content_position_attention(*got_in, key_padding_mask=mask, backend="cpu")
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(go)
    out.backward(go.to(dtype))
    scale = ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() <= tol * scale, ("attention output", dtype)
    for a, b in zip(got_in, ref_in):
        s = b.grad.abs().max().item()
        assert (a.grad.double() - b.grad).abs().max().item() <= tol * max(s, 1.0), ("attention grad", dtype)
# Winograd transforms: the C++ ops against the torch formulation
ops_w = torch.ops.dabdetr_winograd
for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-12)):
    for m in (2, 4):
        n, h, w, c = 2, 7, 9, 70
        x = torch.randn(n, h, w, c, generator=g, dtype=dtype)
        v = ops_w.input_transform(x, m)
        torch.testing.assert_close(v, wg.input_transform_torch(x, m), rtol=tol, atol=tol)
        gv = torch.randn(v.shape, generator=g, dtype=dtype)
        torch.testing.assert_close(ops_w.input_transform_backward(gv, [n, h, w, c], m),
                                   wg.input_transform_backward_torch(gv, [n, h, w, c], m), rtol=tol, atol=tol)
        b = torch.randn(c, generator=g, dtype=dtype)
        torch.testing.assert_close(ops_w.output_transform(gv, b, [n, h, w, c], m),
                                   wg.output_transform_torch(gv, b, [n, h, w, c], m), rtol=tol, atol=tol)
        gy = torch.randn(n, h, w, c, generator=g, dtype=dtype)
        torch.testing.assert_close(ops_w.output_transform_backward(gy, m), wg.output_transform_backward_torch(gy, m),
                                   rtol=tol, atol=tol)
print("ok")
"""


def _has_avx2() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except Exception:  # pragma: no cover - older torch
        return False


@pytest.mark.skipif(not (_ext.HAS_CPU_KERNELS and hasattr(torch.ops, "dabdetr_winograd")),
                    reason="dabdetr._C (the C++ CPU kernels) not built")
@pytest.mark.parametrize("isa", ["sse2", pytest.param("avx2", marks=pytest.mark.skipif(not _has_avx2(),
                                                                                        reason="no AVX2"))])
def test_older_instruction_set_copies(isa):
    env = dict(os.environ, PYTHONPATH=str(ROOT), DABDETR_ATTENTION_ISA=isa, DABDETR_WINOGRAD_ISA=isa,
               OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
