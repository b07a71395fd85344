"""sine_embed and modulated_sine_query: every available backend × device × dtype against the float64
reference (forward and every gradient) on fresh random inputs, the reference against the original
code's formulas, float64 gradcheck of the C++ kernels."""

from __future__ import annotations

import math

import pytest
import torch

from dabdetr import ops
from dabdetr.ops import reference

from _helpers import (
    ALL_DTYPES,
    check_cotangent_layouts,
    compare_to_reference,
    cpu_kernel_params,
    device_backend_params,
    dtype_id,
    interpreted,
    make_coords,
    make_msq_inputs,
    make_temperature,
    msq_call,
    original_modulated_sine_query,
    original_sine_embed,
    rel_err,
    sine_call,
    skip_unsupported,
)

DTYPES = [pytest.param(d, id=dtype_id(d)) for d in ALL_DTYPES]


def _ref_temps(temperature, C):
    if temperature is None:
        return (10000.0,) * C
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.tolist()
    if isinstance(temperature, (list, tuple)):
        return tuple(float(t) for t in temperature)
    return (float(temperature),) * C


# ---------------------------------------------------------------------------------------------
# sine_embed

SINE_CASES = {
    # DAB-DETR's 4-D anchors, default F=128 / T=10000
    "anchors4d": dict(lead=(7,), C=4, F=128, temp="default", xy=True, layout="contiguous"),
    # a sequence-first [N, B, C] tensor viewed batch-first, per-coordinate temperatures
    "seq_first": dict(lead=(3, 5), C=2, F=6, temp="list", xy=True, layout="seq_first"),
    "sliced_noxy": dict(lead=(2, 3, 5), C=3, F=10, temp="tuple", xy=False, layout="sliced"),
    "c1_strided_last": dict(lead=(5,), C=1, F=2, temp="scalar", xy=False, layout="strided_last"),
    "broadcast_c5": dict(lead=(4, 3), C=5, F=34, temp="tensor", xy=True, layout="broadcast"),
    "single_row": dict(lead=(), C=4, F=16, temp="list", xy=True, layout="contiguous"),
    "empty": dict(lead=(0,), C=4, F=8, temp="default", xy=True, layout="contiguous"),
    "empty_middle": dict(lead=(3, 0, 2), C=2, F=8, temp="list", xy=True, layout="seq_first"),
    # more leading dims than the C++ row indexer takes with strides (kMaxRowDims = 6)
    "many_dims": dict(lead=(2, 3, 1, 2, 1, 2, 3), C=2, F=4, temp="default", xy=True, layout="seq_first"),
    # negative and larger coordinates, a custom scale
    "wide_values": dict(lead=(6,), C=4, F=128, temp="list", xy=True, layout="contiguous", low=-3.0, high=3.0, scale=1.7),
    # the image position encoding: (T_W, T_H) = (20, 20), normalized (x, y)
    "image_pe": dict(lead=(2, 9), C=2, F=128, temp=(20.0, 20.0), xy=True, layout="contiguous", scale=2 * math.pi),
}


def _sine_case(case, gen, device, dtype, tiny):
    lead = case["lead"]
    if tiny:
        lead = tuple(min(s, 2) for s in lead)
    coords = make_coords(gen, device, dtype, lead, case["C"], case["layout"], case.get("low", 0.0), case.get("high", 1.0))
    temp = case["temp"]
    temperature = temp if isinstance(temp, tuple) and not isinstance(temp, str) else make_temperature(gen, case["C"], temp)
    return coords, temperature


@pytest.mark.parametrize("case", list(SINE_CASES), ids=list(SINE_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", device_backend_params("sine_embed"))
def test_sine_embed_matches_reference(device, backend, dtype, case, gen, seed):
    skip_unsupported(backend, dtype)
    c = SINE_CASES[case]
    coords, temperature = _sine_case(c, gen, device, dtype, interpreted(device, backend))
    F, xy, scale = c["F"], c["xy"], c.get("scale")
    ref_temps = _ref_temps(temperature, c["C"])

    def ref(coords):
        return reference.sine_embed(coords, F, ref_temps, 2 * math.pi if scale is None else scale, xy)

    out, grads, _, _ = compare_to_reference(
        "sine_embed", sine_call(backend, F, temperature, scale, xy), ref, {"coords": coords}, ["coords"], gen,
        ctx=f"[seed={seed}, backend={backend}, coords strides {coords.stride()}]",
    )
    assert out.shape == (*coords.shape[:-1], c["C"] * F)
    assert out.is_contiguous()


@pytest.mark.parametrize("case", ["anchors4d", "seq_first", "sliced_noxy", "broadcast_c5", "image_pe"])
def test_sine_embed_reference_matches_original_code(case, gen):
    """The spec (reference.sine_embed) vs gen_sineembed_for_position written from REFERENCE.md."""
    c = SINE_CASES[case]
    coords, temperature = _sine_case(c, gen, "cpu", torch.float64, False)
    temps = _ref_temps(temperature, c["C"])
    scale = c.get("scale", 2 * math.pi)
    got = reference.sine_embed(coords, c["F"], temps, scale, c["xy"])
    want = original_sine_embed(coords, c["F"], list(temps), scale, c["xy"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device,backend", device_backend_params("sine_embed"))
def test_sine_embed_temperature_forms_and_exchange(device, backend, gen):
    """A scalar temperature equals C equal temperatures (list, tuple, tensor); with exchange_xy the
    temperature of x stays with x (DESIGN.md: temperatures in INPUT coordinate order)."""
    coords = make_coords(gen, device, torch.float32, (5,), 3)
    f = lambda c, **kw: ops.sine_embed(c, 8, backend=backend, **kw)  # noqa: E731
    base = f(coords, temperature=20.0)
    for t in ([20.0] * 3, (20.0,) * 3, torch.full((3,), 20.0)):
        torch.testing.assert_close(f(coords, temperature=t), base, rtol=0, atol=1e-6)
    temps = [7.0, 300.0, 5000.0]
    swapped = f(coords, temperature=temps, exchange_xy=True)
    plain = f(coords, temperature=temps, exchange_xy=False)
    F = 8
    torch.testing.assert_close(swapped[:, :F], plain[:, F : 2 * F], rtol=0, atol=1e-6)  # y block (T_y) first
    torch.testing.assert_close(swapped[:, F : 2 * F], plain[:, :F], rtol=0, atol=1e-6)
    torch.testing.assert_close(swapped[:, 2 * F :], plain[:, 2 * F :], rtol=0, atol=1e-6)
    # default arguments: DAB-DETR's F=128, T=10000, scale=2π, exchange
    d = ops.sine_embed(coords[:, :2], backend=backend)
    torch.testing.assert_close(d.double(), original_sine_embed(coords[:, :2].double()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device,backend", device_backend_params("sine_embed", fused_only=True))
def test_sine_embed_large_coordinates(device, backend, gen, seed):
    """Angles beyond the vectorised range reduction (|angle| > 65536 in the C++ kernel: libm
    path). fp32 arithmetic itself loses accuracy there, so the bound is 2 × the error of the
    reference computed in float32 + 1e-5."""
    if interpreted(device, backend):
        pytest.skip("interpreter: covered by the small-value cases")
    coords = make_coords(gen, device, torch.float32, (4, 3), 2, low=-2.0e4, high=2.0e4)
    out = ops.sine_embed(coords, 16, backend=backend)
    want = reference.sine_embed(coords.double(), 16, (1e4, 1e4), 2 * math.pi, True)
    ref32 = reference.sine_embed(coords, 16, (1e4, 1e4), 2 * math.pi, True)
    err, err32 = rel_err(out, want), rel_err(ref32, want)
    assert err <= 2 * err32 + 1e-5, f"error {err:.3g} vs float32 reference {err32:.3g} [seed={seed}]"


@pytest.mark.parametrize("backend", cpu_kernel_params("sine_embed"))
def test_sine_embed_gradcheck(backend, gen):
    """float64 gradcheck of the C++ kernels (forward + registered backward op)."""
    cases = [
        (make_coords(gen, "cpu", torch.float64, (3,), 4), 6, [10.0, 20.0, 30.0, 40.0], True),
        (make_coords(gen, "cpu", torch.float64, (2, 3), 3, layout="seq_first"), 4, [7.0] * 3, False),
        (make_coords(gen, "cpu", torch.float64, (2,), 1, layout="strided_last"), 2, [100.0], False),
    ]
    for coords, F, temps, xy in cases:
        x = coords.detach().requires_grad_(True)
        fn = lambda c: ops.sine_embed(c, F, temps, 2 * math.pi, xy, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# modulated_sine_query

MSQ_CASES = {
    "decoder_layer": dict(lead=(2, 7), F=128, ref=True, ps=True, temp="default", layout="seq_first"),
    "layer0": dict(lead=(2, 7), F=128, ref=True, ps=False, temp="default", layout="contiguous"),
    "no_ref_sliced": dict(lead=(5,), F=6, ref=False, ps=True, temp="list", layout="sliced"),
    "plain_strided_last": dict(lead=(3,), F=10, ref=False, ps=False, temp="scalar", layout="strided_last"),
    "broadcast": dict(lead=(2, 3, 3), F=34, ref=True, ps=True, temp="tuple", layout="broadcast", scale=1.0),
    "single_row": dict(lead=(), F=16, ref=True, ps=True, temp="list", layout="contiguous"),
    "empty": dict(lead=(0,), F=8, ref=True, ps=True, temp="default", layout="contiguous"),
    "empty_seq_first": dict(lead=(4, 0, 1), F=8, ref=True, ps=False, temp="default", layout="seq_first"),
    "many_dims": dict(lead=(2, 1, 2, 1, 2, 1, 3), F=4, ref=True, ps=True, temp="list", layout="seq_first"),
}
MSQ_DIFF = ("anchors", "ref_wh", "pos_scale")


def _msq_case(case, gen, device, dtype, tiny):
    lead = case["lead"]
    if tiny:
        lead = tuple(min(s, 2) for s in lead)
    inputs = make_msq_inputs(gen, device, dtype, lead, case["F"], case["ref"], case["ps"], case["layout"])
    return inputs, make_temperature(gen, 2, case["temp"])


@pytest.mark.parametrize("case", list(MSQ_CASES), ids=list(MSQ_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", device_backend_params("modulated_sine_query"))
def test_modulated_sine_query_matches_reference(device, backend, dtype, case, gen, seed):
    skip_unsupported(backend, dtype)
    c = MSQ_CASES[case]
    inputs, temperature = _msq_case(c, gen, device, dtype, interpreted(device, backend))
    F, scale = c["F"], c.get("scale")
    temps = _ref_temps(temperature, 2)

    def ref(anchors, ref_wh, pos_scale):
        return reference.modulated_sine_query(anchors, ref_wh, pos_scale, F, temps, 2 * math.pi if scale is None else scale)

    out, grads, _, _ = compare_to_reference(
        "modulated_sine_query", msq_call(backend, F, temperature, scale), ref, inputs, MSQ_DIFF, gen,
        ctx=f"[seed={seed}, backend={backend}]",
    )
    assert out.shape == (*inputs["anchors"].shape[:-1], 2 * F)
    assert out.is_contiguous()
    if inputs["ref_wh"] is None and grads:
        # without modulation, w and h do not enter the output
        assert torch.all(grads["anchors"][..., 2:] == 0)


@pytest.mark.parametrize("case", ["decoder_layer", "layer0", "no_ref_sliced", "broadcast"])
def test_modulated_sine_query_reference_matches_original_code(case, gen):
    """The spec vs the decoder's in-place sequence of REFERENCE.md §3 (sine[..., :d] * query_scale,
    x half *= w_ref / w, y half *= h_ref / h)."""
    c = MSQ_CASES[case]
    inputs, temperature = _msq_case(c, gen, "cpu", torch.float64, False)
    temps = _ref_temps(temperature, 2)
    scale = c.get("scale", 2 * math.pi)
    got = reference.modulated_sine_query(**inputs, num_feats=c["F"], temperature=temps, scale=scale)
    want = original_modulated_sine_query(**inputs, num_feats=c["F"], temperature=list(temps), scale=scale)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device,backend", device_backend_params("modulated_sine_query"))
def test_modulated_sine_query_is_modulated_sine_embed(device, backend, gen):
    """Without ref_wh/pos_scale the op is sine_embed of (cx, cy); with them, the two blocks are
    scaled by h_ref/h and w_ref/w and element-wise by pos_scale."""
    inputs = make_msq_inputs(gen, device, torch.float64 if backend in ("torch", "cpu") else torch.float32, (6,), 8, True, True)
    a, r, p = inputs["anchors"], inputs["ref_wh"], inputs["pos_scale"]
    tol = dict(rtol=1e-5, atol=1e-5)
    e = ops.sine_embed(a[:, :2], 8, [30.0, 70.0], backend=backend)
    torch.testing.assert_close(ops.modulated_sine_query(a, num_feats=8, temperature=(30.0, 70.0), backend=backend), e, **tol)
    ratio = torch.cat([(r[:, 1] / a[:, 3])[:, None].expand(6, 8), (r[:, 0] / a[:, 2])[:, None].expand(6, 8)], dim=1)
    got = ops.modulated_sine_query(a, r, p, 8, (30.0, 70.0), backend=backend)
    torch.testing.assert_close(got, e * ratio * p, **tol)


@pytest.mark.parametrize("backend", cpu_kernel_params("modulated_sine_query"))
@pytest.mark.parametrize("with_ref,with_ps", [(True, True), (True, False), (False, True), (False, False)])
def test_modulated_sine_query_gradcheck(backend, with_ref, with_ps, gen):
    inputs = make_msq_inputs(gen, "cpu", torch.float64, (2, 3), 4, with_ref, with_ps, layout="seq_first")
    names = [k for k in MSQ_DIFF if inputs[k] is not None]
    leaves = [inputs[k].detach().requires_grad_(True) for k in names]

    def fn(*ts):
        kw = dict(zip(names, ts))
        return ops.modulated_sine_query(kw["anchors"], kw.get("ref_wh"), kw.get("pos_scale"), 4, (10.0, 50.0), backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# both ops


@pytest.mark.parametrize("op", ["sine_embed", "modulated_sine_query"])
@pytest.mark.parametrize("device,backend", device_backend_params("sine_embed"))
def test_backward_with_non_contiguous_output_gradients(op, device, backend, gen, seed):
    """The backward ops get whatever gradient autograd has: expanded (``out.sum()``), broadcast,
    transposed, strided in the last dim."""
    if op == "sine_embed":
        inputs = {"coords": make_coords(gen, device, torch.float32, (3, 4), 4, layout="seq_first")}
        fused = sine_call(backend, 8, [10.0, 20.0, 30.0, 40.0])
        ref = lambda coords: reference.sine_embed(coords, 8, (10.0, 20.0, 30.0, 40.0), 2 * math.pi, True)  # noqa: E731
        diff = ["coords"]
    else:
        if backend not in ops.available_backends(device, op):
            pytest.skip(f"{backend} does not serve {op}")
        inputs = make_msq_inputs(gen, device, torch.float32, (3, 4), 8, True, True, "seq_first")
        fused = msq_call(backend, 8)
        ref = lambda **kw: reference.modulated_sine_query(**kw, num_feats=8, temperature=(1e4, 1e4), scale=2 * math.pi)  # noqa: E731
        diff = list(MSQ_DIFF)
    check_cotangent_layouts(op, fused, ref, inputs, diff, gen, ctx=f"[seed={seed}, backend={backend}]")
