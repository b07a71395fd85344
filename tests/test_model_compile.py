"""``torch.compile(model, fullgraph=True)`` of the DAB-DETR forward with the fused ops (issue 7).

The ``tiny`` preset (5 classes) on a 2-image batch of 96x128 images, the second one padded at the
bottom/right (a real key padding mask), on the CPU with the automatic backend (the C++ kernels when
built). Dynamo must capture the forward as one graph holding the fused ops as opaque custom ops;
the compiled forward + backward (AOT autograd, train mode) and forward (inductor, eval) must match
eager.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from dabdetr import ops
from dabdetr.models import DABDETR, get_config

FUSED_OPS = ("sine_embed", "modulated_sine_query", "content_position_attention")


def _model(seed: int) -> DABDETR:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DABDETR(get_config("tiny", num_classes=5))


def _batch(gen: torch.Generator):
    images = torch.randn(2, 3, 96, 128, generator=gen)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 80:, :] = True
    mask[1, :, 100:] = True
    images.masked_fill_(mask[:, None], 0.0)
    return images, mask


def _flat(out):
    """pred_logits, pred_boxes and every aux output, in a fixed order."""
    ts = [out["pred_logits"], out["pred_boxes"]]
    for a in out.get("aux_outputs", []):
        ts += [a["pred_logits"], a["pred_boxes"]]
    return ts


def _assert_close(got, want, rtol=1e-4, what="output"):
    for i, (g, w) in enumerate(zip(got, want)):
        scale = max(w.abs().max().item(), 1.0)
        err = (g - w).abs().max().item()
        assert err <= rtol * scale, f"{what} {i}: max abs diff {err:.3g} > {rtol:g} x {scale:.3g}"


def _fused_available() -> bool:
    return all("cpu" in ops.available_backends("cpu", op) for op in FUSED_OPS)


def test_compiled_forward_backward_is_one_graph_and_matches_eager(gen):
    """Train mode, ``fullgraph=True`` (a graph break would raise), AOT autograd (the fused ops' fake
    kernels and autograd formulas inside the traced joint graph): one graph that holds the fused
    ops, and outputs and every parameter gradient as in eager."""
    model = _model(1).train()
    images, mask = _batch(gen)
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    def run(fn):
        out = fn(images, mask)
        loss = sum((t.float() * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in _flat(out))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [t.detach() for t in _flat(out)], grads

    want, want_g = run(model)
    torch._dynamo.reset()
    got, got_g = run(torch.compile(model, fullgraph=True, backend=recording_aot_eager))
    assert len(graphs) == 1
    if _fused_available():
        targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
        for op in FUSED_OPS:
            assert any(t.startswith(f"dabdetr.{op}") for t in targets), (op, sorted(t for t in targets if "dabdetr" in t))
    _assert_close(got, want)
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        if w is None:
            assert g is None or not g.abs().max().item()
            continue
        scale = max(w.abs().max().item(), 1e-6)
        assert (g - w).abs().max().item() <= 1e-3 * scale, f"gradient of parameter {i}"


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor needs a C++ compiler on the CPU; none on PATH")
def test_inductor_fullgraph_eval_matches_eager(gen):
    """Inductor (the default backend) on the eval forward: the fused ops stay opaque calls in the
    generated code. (No inductor config patches here: e.g. ``cpp.vec_isa_ok=False`` leaves a
    precompiled header without the vector types in inductor's cache, and later vectorised kernels
    of other tests in the same process fail to compile against it.)"""
    model = _model(2).eval()
    images, mask = _batch(gen)
    with torch.no_grad():
        want = _flat(model(images, mask))
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        got = _flat(compiled(images, mask))
        got2 = _flat(compiled(images, mask))  # the cached graph
    _assert_close(got, want)
    _assert_close(got2, want)
