"""Hypothesis fuzzing of shapes, layouts, dtypes and values: every available backend against the
float64 reference (forward and gradients), with the tolerances of DESIGN.md. Failures print the
falsifying example (hypothesis replays it from its database on the next run)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dabdetr.ops import reference

from _helpers import (
    ALL_DTYPES,
    ATTN_DIFF,
    LAYOUTS,
    MASK_KINDS,
    attention_call,
    attention_grad_floors,
    compare_to_reference,
    dtype_supported,
    device_backend_params,
    interpreted,
    make_attention_inputs,
    make_coords,
    make_msq_inputs,
    msq_call,
    sine_call,
)

# DABDETR_FUZZ_EXAMPLES=500 for a longer search
FUZZ = settings(max_examples=int(os.environ.get("DABDETR_FUZZ_EXAMPLES", "30")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(ALL_DTYPES)
leads = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("device,backend", device_backend_params("sine_embed"))
@FUZZ
@given(seed=seeds, dtype=dtypes, lead=leads, C=st.integers(1, 5), half_f=st.integers(1, 33), exchange=st.booleans(),
       layout=st.sampled_from(LAYOUTS), per_coord=st.booleans(), temp=st.floats(2.0, 1e5),
       scale=st.floats(0.1, 2 * math.pi), reach=st.floats(0.01, 3.0), negative=st.booleans())
def test_fuzz_sine_embed(device, backend, seed, dtype, lead, C, half_f, exchange, layout, per_coord, temp, scale, reach,
                         negative):
    assume(dtype_supported(backend, dtype))
    if interpreted(device, backend):
        lead = tuple(min(s, 2) for s in lead)
    gen = _gen(seed)
    exchange = exchange and C >= 2
    coords = make_coords(gen, device, dtype, lead, C, layout, -reach if negative else 0.0, reach)
    temps = [temp * (1 + i) for i in range(C)] if per_coord else temp
    ref_temps = tuple(temps) if per_coord else (temp,) * C
    F = 2 * half_f
    compare_to_reference(
        "sine_embed", sine_call(backend, F, temps, scale, exchange),
        lambda coords: reference.sine_embed(coords, F, ref_temps, scale, exchange), {"coords": coords}, ["coords"], gen,
        ctx=f"[backend={backend}, strides {coords.stride()}]",
    )


@pytest.mark.parametrize("device,backend", device_backend_params("modulated_sine_query"))
@FUZZ
@given(seed=seeds, dtype=dtypes, lead=leads, half_f=st.integers(1, 33), with_ref=st.booleans(), with_ps=st.booleans(),
       layout=st.sampled_from(LAYOUTS), temps=st.tuples(st.floats(2.0, 1e5), st.floats(2.0, 1e5)),
       scale=st.floats(0.1, 2 * math.pi))
def test_fuzz_modulated_sine_query(device, backend, seed, dtype, lead, half_f, with_ref, with_ps, layout, temps, scale):
    assume(dtype_supported(backend, dtype))
    if interpreted(device, backend):
        lead = tuple(min(s, 2) for s in lead)
    gen = _gen(seed)
    F = 2 * half_f
    inputs = make_msq_inputs(gen, device, dtype, lead, F, with_ref, with_ps, layout)
    compare_to_reference(
        "modulated_sine_query", msq_call(backend, F, temps, scale),
        lambda anchors, ref_wh, pos_scale: reference.modulated_sine_query(anchors, ref_wh, pos_scale, F, temps, scale),
        inputs, ["anchors", "ref_wh", "pos_scale"], gen, ctx=f"[backend={backend}]",
    )


@pytest.mark.parametrize("device,backend", device_backend_params("content_position_attention"))
@FUZZ
@given(seed=seeds, dtype=dtypes, B=st.integers(0, 3), Nq=st.integers(0, 6), Nk=st.integers(0, 70), H=st.integers(1, 3),
       Dc=st.integers(1, 9), Dp=st.integers(1, 9), Dv=st.integers(1, 9),
       layout=st.sampled_from(("contiguous", "seq_first", "packed", "strided_last")),
       mask=st.sampled_from(MASK_KINDS), q_gain=st.floats(0.1, 10.0), scale=st.none() | st.floats(0.05, 2.0))
def test_fuzz_content_position_attention(device, backend, seed, dtype, B, Nq, Nk, H, Dc, Dp, Dv, layout, mask, q_gain,
                                         scale):
    assume(dtype_supported(backend, dtype))
    if interpreted(device, backend):
        Nk = min(Nk, 16)
    gen = _gen(seed)
    inputs = make_attention_inputs(gen, device, dtype, B, Nq, Nk, H, Dc, Dp, Dv, layout, mask, q_gain)
    compare_to_reference(
        "content_position_attention", attention_call(backend, scale),
        lambda **kw: reference.content_position_attention(**kw, scale=scale)[0], inputs, ATTN_DIFF, gen,
        ctx=f"[backend={backend}]", grad_floors=lambda in64, g: attention_grad_floors(in64, g, scale),
    )
