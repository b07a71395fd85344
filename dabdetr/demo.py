"""A short demo of dabdetr's fused ops at DAB-DETR sizes: `python -m dabdetr.demo`.

Runs one decoder layer's worth of the fused ops (4-D anchor sine embedding, modulated positional
query, content+position cross-attention through the nn module, forward and backward) with the best
available backend and with the reference, and prints the agreement and the time of each.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import ops
from .nn import ContentPositionCrossAttention


def _time(fn, iters: int = 10) -> float:
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--keys", type=int, default=1050, help="memory tokens (800x1333 / 32: 25*42)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    B, Nq, Nk, d = args.batch, args.queries, args.keys, 256
    fused = [b for b in ops.available_backends(dev, "content_position_attention") if b != "torch"]
    backend = fused[0] if fused else "torch"
    print(f"dabdetr {__import__('dabdetr').__version__} | torch {torch.__version__} | device {dev} | "
          f"backends here: {ops.available_backends(dev)} | using '{backend}' vs reference 'torch'")

    anchors = torch.rand(Nq, B, 4, device=dev).clamp(0.05, 0.95)  # sequence-first, as in the decoder
    ref_wh = torch.rand(Nq, B, 2, device=dev)
    pos_scale = torch.randn(Nq, B, d, device=dev)
    memory = torch.randn(Nk, B, d, device=dev)
    pos = torch.randn(Nk, B, d, device=dev)
    tgt = torch.randn(Nq, B, d, device=dev)
    mask = torch.zeros(B, Nk, dtype=torch.bool, device=dev)
    mask[-1, Nk * 3 // 4:] = True  # the second image is smaller: padded keys

    layer = ContentPositionCrossAttention(d, 8, query_pos_proj=False).to(dev)

    def step(b: str):
        layer.backend = b
        sine = ops.sine_embed(anchors, d // 2, backend=b)  # [Nq, B, 512], (y, x, w, h) order
        qse = ops.modulated_sine_query(anchors, ref_wh, pos_scale, d // 2, backend=b)  # [Nq, B, 256]
        out = layer(tgt, memory, pos, qse, memory_key_padding_mask=mask)
        layer.zero_grad(set_to_none=True)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        return sine, qse, out.detach(), grads

    rows = []
    got = step(backend)
    want = step("torch")
    names = ["sine_embed(anchors 4-D)", "modulated_sine_query", "cross-attention output"]
    for name, a, b in zip(names, got[:3], want[:3]):
        rows.append((name, (a - b).abs().max().item()))
    # Relative to the largest gradient of the module: the key-projection biases have an exactly zero
    # gradient (softmax is shift-invariant), so a per-tensor relative error would divide noise by 0.
    gscale = max(b.abs().max().item() for b in want[3])
    gmax = max((a - b).abs().max().item() for a, b in zip(got[3], want[3])) / gscale
    rows.append(("cross-attention param grads (rel.)", gmax))
    print("\nagreement with the reference (max abs difference, float32):")
    for name, err in rows:
        print(f"  {name:<36} {err:.2e}")
    t_fused = _time(lambda: step(backend))
    t_ref = _time(lambda: step("torch"))
    print(f"\none decoder layer's fused ops, forward+backward (B={B}, Nq={Nq}, Nk={Nk}): "
          f"{backend}: {t_fused:.1f} ms, reference: {t_ref:.1f} ms ({t_ref / t_fused:.2f}x)")


if __name__ == "__main__":
    main()
