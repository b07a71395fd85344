"""Parameter and FLOP counts of DAB-DETR presets (``torch.utils.flop_counter``).

``torch.utils.flop_counter`` counts 2 FLOPs per multiply-add; the DAB-DETR paper (like DETR, via
fvcore) counts a multiply-add as one. :func:`count` reports both (``flops`` and ``macs``).

By default the model is built on the CPU and run on fake inputs (``FakeTensorMode``: no activation
memory, no compute); ``device="cpu"`` runs it for real. The fused ops
``torch.ops.dabdetr.*`` get flop formulas here (registered once, only when the extension is loaded),
as does PyTorch's CPU flash-attention kernel when this PyTorch has none for it, so counting on real
CPU tensors with a fused backend gives the same numbers.

>>> from dabdetr.models import flops
>>> flops.count("r50", (800, 1333))        # doctest: +SKIP
{'params': 43.67e6, 'flops': ..., 'macs': ..., 'gflops': ..., 'gmacs': ...}
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch.utils.flop_counter import FlopCounterMode

from .presets import DABDETRConfig, get_config

__all__ = ["count", "register_flop_formulas", "attention_flops", "PAPER_GFLOPS", "PAPER_PARAMS_M"]

# DAB-DETR paper, Table 2 (GFLOPs = multiply-adds; params in millions).
PAPER_GFLOPS = {"r50": 94, "r50_3pat": 100, "r50_dc5": 202, "r50_dc5_3pat": 216, "r101": 174, "r101_3pat": 179,
                "r101_dc5": 282, "r101_dc5_3pat": 296}
PAPER_PARAMS_M = {"r50": 44, "r50_3pat": 44, "r50_dc5": 44, "r50_dc5_3pat": 44, "r101": 63, "r101_3pat": 63,
                  "r101_dc5": 63, "r101_dc5_3pat": 63}

def attention_flops(q_content_shape, q_pos_shape, value_shape, k_len: int, backward: bool = False) -> int:
    """FLOPs (2 per multiply-add) of the split attention: ``q·kᵀ`` over Dc+Dp and ``p·v`` over Dv;
    the backward recomputes ``q·kᵀ`` and does ``dV, dP`` (Dv) and ``dQ, dK`` (Dc+Dp)."""
    B, Nq, H, Dc = q_content_shape
    Dp = q_pos_shape[-1]
    Dv = value_shape[-1]
    base = 2 * B * H * Nq * k_len
    if backward:
        return base * (3 * (Dc + Dp) + 2 * Dv)
    return base * ((Dc + Dp) + Dv)


def _op(name: str):
    try:
        return getattr(torch.ops.dabdetr, name)
    except (AttributeError, RuntimeError):
        return None


def register_flop_formulas() -> None:
    """Register flop formulas for the fused attention ops (``torch.ops.dabdetr.
    content_position_attention`` and its Triton twin ``content_position_attention_triton``, with
    their backward ops) and, if this PyTorch lacks one, for
    ``aten._scaled_dot_product_flash_attention_for_cpu``. Idempotent (call it again after more ops
    were loaded); ops that are not loaded are skipped. The sine ops are element-wise (no matmul)
    and, like every element-wise op in ``torch.utils.flop_counter``, count 0."""
    from torch.utils import flop_counter as fc

    def reg(target, fn):
        if target is None or target in fc.flop_registry:
            return
        try:
            fc.register_flop_formula(target)(fn)
        except Exception:  # pragma: no cover - unsupported target in this PyTorch
            pass

    def cpa_flop(q_content, q_pos, k_content, k_pos, value, *args, out_shape=None, **kwargs) -> int:
        return attention_flops(q_content, q_pos, value, k_content[1])

    def cpa_bwd_flop(grad_out, q_content, q_pos, k_content, k_pos, value, *args, out_shape=None, **kwargs) -> int:
        return attention_flops(q_content, q_pos, value, k_content[1], backward=True)

    for suffix in ("", "_triton"):
        reg(_op(f"content_position_attention{suffix}"), cpa_flop)
        reg(_op(f"content_position_attention_backward{suffix}"), cpa_bwd_flop)

    # PyTorch's CPU SDPA kernel has no formula in some versions (then SDPA on CPU counts 0).
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa.default not in fc.flop_registry:
        def sdpa_cpu_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
            B, H, Nq, D = query
            return 2 * B * H * Nq * key[-2] * (D + value[-1])

        reg(cpu_sdpa, sdpa_cpu_flop)


def count(preset: Union[str, DABDETRConfig] = "r50", size: Tuple[int, int] = (800, 1333), batch: int = 1,
          backend: Optional[str] = "torch", device: str = "fake",
          by_module: bool = False, **overrides: Any) -> Dict[str, Any]:
    """Parameters and forward FLOPs of one preset at image ``size`` (H, W).

    Returns ``params``, ``params_trainable``, ``flops`` (2 per multiply-add, torch's convention),
    ``macs`` (= flops / 2, the paper's "FLOPs"), ``gflops``, ``gmacs``, the paper's number when known
    (``paper_gflops``) and, with ``by_module``, per top-level module FLOPs."""
    from .dab_detr import DABDETR

    register_flop_formulas()
    cfg = get_config(preset, **overrides) if isinstance(preset, str) else preset.replace(**overrides)
    cfg = cfg.replace(backend=backend)
    if device == "fake":
        # real (CPU) parameters, fake inputs: the forward allocates and computes nothing
        from torch._subclasses.fake_tensor import FakeTensorMode

        model = DABDETR(cfg).eval()
        ctx = FakeTensorMode(allow_non_fake_inputs=True)
    else:
        with torch.device(device):
            model = DABDETR(cfg).eval()
        ctx = torch.device(device)
    params = sum(p.numel() for p in model.parameters()) + (
        model.refpoint_embed.weight_xy.numel() if cfg.freeze_anchor_xy else 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with ctx:
        images = torch.zeros(batch, 3, *size)
        mask = torch.zeros(batch, *size, dtype=torch.bool)
        with FlopCounterMode(display=False, depth=2) as counter:
            model(images, mask)
    total = counter.get_total_flops()
    out: Dict[str, Any] = {"preset": preset if isinstance(preset, str) else None, "size": tuple(size),
                           "batch": batch, "params": params, "params_trainable": trainable, "flops": total,
                           "macs": total // 2, "gflops": total / 1e9, "gmacs": total / 2e9}
    if isinstance(preset, str) and preset in PAPER_GFLOPS and not overrides:
        out["paper_gflops"] = PAPER_GFLOPS[preset]
        out["paper_params_m"] = PAPER_PARAMS_M[preset]
    if by_module:
        counts = counter.get_flop_counts()
        out["by_module"] = {k: sum(v.values()) for k, v in counts.items() if k.count(".") == 1}
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:  # python -m dabdetr.models.flops r50 800 1333
    import argparse

    p = argparse.ArgumentParser(description="parameter and FLOP count of a DAB-DETR preset")
    p.add_argument("presets", nargs="*", default=["r50"])
    p.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    a = p.parse_args(argv)
    print(f"{'preset':14s} {'params':>9s} {'GFLOPs(2/MAC)':>14s} {'GMACs':>8s} {'paper':>6s}")
    for name in a.presets:
        r = count(name, tuple(a.size))
        print(f"{name:14s} {r['params'] / 1e6:8.2f}M {r['gflops']:14.1f} {r['gmacs']:8.1f} "
              f"{r.get('paper_gflops', float('nan')):6}")


if __name__ == "__main__":
    main()
