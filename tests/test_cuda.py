"""CUDA-specific tests of the C++/CUDA kernels (csrc/cuda).

The general op tests (test_ops_*.py) are parametrized by device and already run every backend on
CUDA when a GPU is visible. This file adds what is specific to the CUDA build and kernels:

* the build (runs everywhere): when the extension was compiled with CUDA, every ``dabdetr::`` op has
  a CUDA kernel. "Compiled with CUDA" is read from a marker symbol the .cu files export
  (``dabdetr_cuda_build_info``: nvcc version and ``__CUDA_ARCH_LIST__``), independent of the
  registrations it checks; and on CI (or with ``DABDETR_BUILD_CUDA=1``) a build that *should* have
  included CUDA (setup.py's rule: torch has CUDA and nvcc is found) must have.
* on a GPU (skipped, not removed, elsewhere): float64 gradcheck of the CUDA kernels (the general
  tests skip float64 for non-CPU backends), the tensor-core (fp16/bf16) and FFMA (fp32) paths at
  DAB-DETR sizes with several query / key tiles, IEEE fp32 even when TF32 is allowed, the scalar
  (non-vectorized) sine path, > 64 coordinates, head dims > 64 rejected with the argument named,
  strided / broadcast inputs, non-default streams, another device, determinism of the backward,
  and CUDA-graph capture.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil

import pytest
import torch

import dabdetr
from dabdetr import _ext, ops
from dabdetr.ops import reference

from _helpers import (
    ATTN_DIFF,
    HAS_CUDA,
    attention_call,
    compare_to_reference,
    make_attention_inputs,
    make_coords,
    make_msq_inputs,
    msq_call,
    rel_err,
    sine_call,
)

CUDA_KERNELS = HAS_CUDA and _ext.HAS_CUDA_KERNELS
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
needs_kernels = pytest.mark.skipif(
    not CUDA_KERNELS, reason="no CUDA device" if not HAS_CUDA else "dabdetr._C was built without the CUDA kernels"
)


def cuda_only(fn):
    """Runs on a GPU with the CUDA kernels built; skipped (not removed) elsewhere."""
    return pytest.mark.cuda(needs_cuda(needs_kernels(fn)))


# ---------------------------------------------------------------------------------------------
# the build (no GPU needed)


def _library_path():
    path = os.environ.get("DABDETR_LIBRARY")
    if path:
        return path
    from dabdetr import _C  # noqa: F401  (already loaded by dabdetr._ext)

    return _C.__file__


def cuda_build_info():
    """The marker string of a CUDA build (e.g. ``"cuda 13.0 archs 800,900"``), or None."""
    if not _ext.LOADED:
        return None
    try:
        lib = ctypes.CDLL(_library_path())
        fn = lib.dabdetr_cuda_build_info
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def _cuda_build_expected():
    """setup.py's rule: DABDETR_BUILD_CUDA=1/0 forces; else torch has CUDA and nvcc is found."""
    flag = os.environ.get("DABDETR_BUILD_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    from torch.utils import cpp_extension

    home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    home = home or cpp_extension.CUDA_HOME
    has_nvcc = home is not None and (shutil.which("nvcc") is not None or os.path.exists(os.path.join(home, "bin", "nvcc")))
    return torch.version.cuda is not None and has_nvcc


def test_cuda_build_registers_every_op():
    """A CUDA build registers a CUDA kernel for every op (forward and backward)."""
    if not _ext.LOADED:
        pytest.skip(f"dabdetr._C not loaded: {_ext.LOAD_ERROR}")
    info = cuda_build_info()
    if info is None:
        pytest.skip("dabdetr._C was built without CUDA")
    missing = [op for op in _ext.OPS if not _ext.kernel_registered(op, "CUDA")]
    assert not missing, f"CUDA build ({info}) lacks CUDA kernels for {missing}"
    assert _ext.HAS_CUDA_KERNELS
    # and the CPU kernels are still there
    assert all(_ext.kernel_registered(op, "CPU") for op in _ext.OPS)


def test_cuda_build_info_lists_architectures():
    info = cuda_build_info()
    if info is None:
        pytest.skip("dabdetr._C was built without CUDA")
    assert info.startswith("cuda "), info
    if "archs" in info:
        archs = [int(a) for a in info.split("archs", 1)[1].split(",")]
        assert archs and all(a >= 800 for a in archs), f"unexpected architectures in {info!r} (need sm_80+)"


def test_cuda_build_present_when_expected():
    """On CI (or with DABDETR_BUILD_CUDA=1), where torch has CUDA and nvcc is found, the extension
    must include the CUDA kernels: setup.py must not have skipped them silently."""
    if not (os.environ.get("CI") or os.environ.get("DABDETR_BUILD_CUDA") == "1"):
        pytest.skip("only enforced on CI or with DABDETR_BUILD_CUDA=1")
    if not _ext.LOADED:
        pytest.skip(f"dabdetr._C not loaded: {_ext.LOAD_ERROR}")
    if not _cuda_build_expected():
        pytest.skip("this environment cannot build the CUDA kernels (no CUDA torch or no nvcc)")
    assert cuda_build_info() is not None, "torch has CUDA and nvcc is present, but dabdetr._C has no CUDA kernels"


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def cgen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _attn_ref(scale):
    def ref(q_content, q_pos, k_content, k_pos, value, key_padding_mask):
        return reference.content_position_attention(q_content, q_pos, k_content, k_pos, value, key_padding_mask, scale)[0]

    return ref


def _sine_ref(num_feats, temperature, exchange_xy=True):
    def ref(coords):
        C = coords.shape[-1]
        temps = [float(temperature)] * C if not isinstance(temperature, (list, tuple)) else list(temperature)
        return reference.sine_embed(coords, num_feats, temps, 2 * math.pi, exchange_xy)

    return ref


def _msq_ref(num_feats):
    def ref(anchors, ref_wh, pos_scale):
        return reference.modulated_sine_query(anchors, ref_wh, pos_scale, num_feats)

    return ref


# ---------------------------------------------------------------------------------------------
# float64 gradcheck of the CUDA kernels


@cuda_only
@pytest.mark.parametrize("mask", ["none", "full_row"])
@pytest.mark.parametrize("dims", [(5, 3, 7), (32, 32, 32)], ids=["odd", "dabdetr"])
def test_attention_gradcheck_float64(mask, dims, cgen):
    Dc, Dp, Dv = dims
    inp = make_attention_inputs(cgen, "cuda", torch.float64, 2, 5, 37, 2, Dc, Dp, Dv, "seq_first", mask)
    names = list(ATTN_DIFF)
    leaves = [inp[k].detach().requires_grad_(True) for k in names]

    def fn(*xs):
        return ops.content_position_attention(*xs, inp["key_padding_mask"], scale=0.3, backend="cuda")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@cuda_only
@pytest.mark.parametrize("num_feats", [8, 6], ids=["vector", "scalar"])
def test_sine_gradcheck_float64(num_feats, cgen):
    coords = make_coords(cgen, "cuda", torch.float64, (3, 4), 4, "seq_first").requires_grad_(True)
    fn = lambda c: ops.sine_embed(c, num_feats=num_feats, temperature=[20.0, 30.0, 10000.0, 7.0], backend="cuda")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (coords,), eps=1e-6, atol=1e-7, rtol=1e-5)


@cuda_only
@pytest.mark.parametrize("with_ref,with_ps", [(True, True), (True, False), (False, True), (False, False)])
def test_msq_gradcheck_float64(with_ref, with_ps, cgen):
    inp = make_msq_inputs(cgen, "cuda", torch.float64, (3, 2), 6, with_ref, with_ps, "sliced")
    names = [k for k in ("anchors", "ref_wh", "pos_scale") if inp[k] is not None]
    leaves = {k: inp[k].detach().requires_grad_(True) for k in names}

    def fn(*xs):
        kw = dict(inp, **dict(zip(names, xs)))
        return ops.modulated_sine_query(kw["anchors"], kw["ref_wh"], kw["pos_scale"], num_feats=6, backend="cuda")

    assert torch.autograd.gradcheck(fn, tuple(leaves[k] for k in names), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# attention: tensor-core / FFMA paths at DAB-DETR sizes


ATTN_SIZES = {
    # DAB-DETR cross-attention: 300 queries over ~850 memory tokens, 8 heads, 32 / 32 / 32
    "dabdetr": dict(B=2, Nq=300, Nk=850, H=8, Dc=32, Dp=32, Dv=32, layout="seq_first", mask="full_row"),
    # largest supported head dims, partial tiles everywhere
    "dims64": dict(B=1, Nq=77, Nk=131, H=2, Dc=64, Dp=64, Dv=64, layout="contiguous", mask="random"),
    # odd dims (padding to 16 inside the tiles), packed / broadcast views
    "odd_packed": dict(B=3, Nq=33, Nk=65, H=3, Dc=9, Dp=7, Dv=5, layout="packed", mask="random"),
    "strided_last": dict(B=2, Nq=17, Nk=70, H=2, Dc=16, Dp=8, Dv=24, layout="strided_last", mask="none"),
}


@cuda_only
@pytest.mark.parametrize("size", list(ATTN_SIZES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["float16", "bfloat16", "float32", "float64"])
def test_attention_paths_match_reference(size, dtype, cgen, seed):
    c = ATTN_SIZES[size]
    inp = make_attention_inputs(cgen, "cuda", dtype, c["B"], c["Nq"], c["Nk"], c["H"], c["Dc"], c["Dp"], c["Dv"],
                                c["layout"], c["mask"])
    scale = 0.125
    compare_to_reference("content_position_attention", attention_call("cuda", scale), _attn_ref(scale), inp,
                         ATTN_DIFF, cgen, ctx=f"(size={size}, dtype={dtype}, seed={seed})")


@cuda_only
def test_attention_float32_is_ieee_even_with_tf32_allowed(cgen, monkeypatch):
    """The fp32 kernel uses FFMA: its accuracy does not change when TF32 is allowed globally."""
    c = ATTN_SIZES["dabdetr"]
    inp = make_attention_inputs(cgen, "cuda", torch.float32, c["B"], 64, 300, c["H"], 32, 32, 32, "contiguous", "random")
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        out = attention_call("cuda", 0.125)(**inp)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    ref = _attn_ref(0.125)(**{k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in inp.items()})
    assert rel_err(out, ref) <= 1e-5  # TF32 would give ~1e-3


@cuda_only
def test_attention_logsumexp_and_fully_masked_rows(cgen):
    inp = make_attention_inputs(cgen, "cuda", torch.bfloat16, 3, 70, 200, 4, 32, 32, 32, "seq_first", "full_row")
    out, lse = torch.ops.dabdetr.content_position_attention(
        inp["q_content"], inp["q_pos"], inp["k_content"], inp["k_pos"], inp["value"], inp["key_padding_mask"], 0.125)
    assert lse.dtype == torch.float32 and lse.shape == (3, 4, 70) and out.is_contiguous()
    in64 = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in inp.items()}
    lse64 = reference.attention_logsumexp(in64["q_content"], in64["q_pos"], in64["k_content"], in64["k_pos"],
                                          in64["key_padding_mask"], 0.125)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    assert (lse[1:] - lse64[1:]).abs().max().item() < 2e-2
    # zero gradients for the fully padded batch element
    leaves = {k: inp[k].detach().requires_grad_(True) for k in ATTN_DIFF}
    y = attention_call("cuda", 0.125)(**leaves, key_padding_mask=inp["key_padding_mask"])
    y.float().square().sum().backward()
    assert (leaves["q_content"].grad[0] == 0).all() and (leaves["q_pos"].grad[0] == 0).all()
    assert (leaves["value"].grad[0] == 0).all() and (leaves["k_content"].grad[0] == 0).all()
    for k in ATTN_DIFF:
        assert torch.isfinite(leaves[k].grad).all()


@cuda_only
@pytest.mark.parametrize("dims,arg", [((65, 32, 32), "q_content"), ((32, 65, 32), "q_pos"), ((32, 32, 65), "value")])
def test_attention_rejects_head_dims_over_64(dims, arg, cgen):
    Dc, Dp, Dv = dims
    inp = make_attention_inputs(cgen, "cuda", torch.float16, 1, 4, 8, 1, Dc, Dp, Dv)
    with pytest.raises(RuntimeError, match=arg):
        torch.ops.dabdetr.content_position_attention(inp["q_content"], inp["q_pos"], inp["k_content"], inp["k_pos"],
                                                     inp["value"], None, 0.1)
    with pytest.raises(Exception, match="64"):
        attention_call("cuda")(**inp)
    # the automatic choice falls back to the reference and stays correct
    out = attention_call(None)(**inp)
    assert out.shape == (1, 4, 1, Dv)


@cuda_only
def test_attention_rejects_cpu_mask_and_wrong_dtype(cgen):
    inp = make_attention_inputs(cgen, "cuda", torch.float32, 1, 4, 8, 1, 4, 4, 4, mask="random")
    args = [inp[k] for k in ATTN_DIFF]
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        torch.ops.dabdetr.content_position_attention(*args, inp["key_padding_mask"].cpu(), 0.1)
    with pytest.raises(RuntimeError, match="value"):
        torch.ops.dabdetr.content_position_attention(*args[:4], args[4].half(), None, 0.1)


@cuda_only
def test_attention_backward_is_deterministic(cgen):
    """Two-kernel backward (no atomics): bitwise-identical gradients on every run."""
    inp = make_attention_inputs(cgen, "cuda", torch.bfloat16, 2, 150, 400, 8, 32, 32, 32, "seq_first", "random")
    args = [inp[k] for k in ATTN_DIFF]
    out, lse = torch.ops.dabdetr.content_position_attention(*args, inp["key_padding_mask"], 0.125)
    g = torch.randn(out.shape, generator=cgen).to(out)
    r1 = torch.ops.dabdetr.content_position_attention_backward(g, *args, inp["key_padding_mask"], out, lse, 0.125)
    r2 = torch.ops.dabdetr.content_position_attention_backward(g, *args, inp["key_padding_mask"], out, lse, 0.125)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# sine ops: vector / scalar paths, many rows, many coordinates


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("num_feats,C", [(128, 4), (64, 2), (6, 3), (10, 1)], ids=["F128C4", "F64C2", "F6C3", "F10C1"])
def test_sine_embed_paths_match_reference(dtype, num_feats, C, cgen, seed):
    coords = make_coords(cgen, "cuda", dtype, (37, 29), C, "seq_first")
    temps = [20.0, 10000.0, 30.0, 7.5][:C]
    compare_to_reference("sine_embed", sine_call("cuda", num_feats, temps, exchange_xy=C >= 2),
                         _sine_ref(num_feats, temps, exchange_xy=C >= 2), {"coords": coords}, ["coords"], cgen,
                         ctx=f"(seed={seed})")


@cuda_only
def test_sine_embed_large_rows_float32(cgen):
    """B*Nq = 64k rows (the bandwidth target size): fp32 within 1e-5 of float64."""
    coords = make_coords(cgen, "cuda", torch.float32, (64, 1024), 4)
    out = ops.sine_embed(coords, num_feats=128, backend="cuda")
    ref = reference.sine_embed(coords.double(), 128, [10000.0] * 4, 2 * math.pi, True)
    assert rel_err(out, ref) <= 1e-5


@cuda_only
def test_sine_embed_many_coordinates(cgen):
    """More coordinates than fit the kernel parameters (temperatures in a device array)."""
    C = 70
    coords = make_coords(cgen, "cuda", torch.float32, (5,), C)
    temps = [10.0 + 3.0 * i for i in range(C)]
    compare_to_reference("sine_embed", sine_call("cuda", 8, temps, exchange_xy=False),
                         _sine_ref(8, temps, exchange_xy=False), {"coords": coords}, ["coords"], cgen)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("with_ref,with_ps", [(True, True), (False, False), (True, False), (False, True)])
def test_msq_matches_reference_at_dabdetr_size(dtype, with_ref, with_ps, cgen, seed):
    inp = make_msq_inputs(cgen, "cuda", dtype, (300, 8), 128, with_ref, with_ps, "seq_first")
    diff = [k for k in ("anchors", "ref_wh", "pos_scale") if inp[k] is not None]
    compare_to_reference("modulated_sine_query", msq_call("cuda", 128), _msq_ref(128), inp, diff, cgen,
                         ctx=f"(seed={seed})")


# ---------------------------------------------------------------------------------------------
# streams, devices, graphs


def _run_all(inp_attn, coords, msq):
    a = attention_call("cuda", 0.125)(**inp_attn)
    s = ops.sine_embed(coords, num_feats=128, backend="cuda")
    m = ops.modulated_sine_query(msq["anchors"], msq["ref_wh"], msq["pos_scale"], num_feats=128, backend="cuda")
    return a, s, m


@cuda_only
def test_kernels_run_on_the_current_stream(cgen):
    inp = make_attention_inputs(cgen, "cuda", torch.float16, 2, 100, 300, 8, 32, 32, 32, "seq_first", "random")
    coords = make_coords(cgen, "cuda", torch.float32, (300, 2), 4)
    msq = make_msq_inputs(cgen, "cuda", torch.float32, (300, 2), 128, True, True)
    expected = _run_all(inp, coords, msq)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _run_all(inp, coords, msq)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


@cuda_only
@pytest.mark.skipif(torch.cuda.device_count() < 2 if HAS_CUDA else True, reason="needs two GPUs")
def test_kernels_run_on_another_device(cgen):
    inp = make_attention_inputs(cgen, "cuda:1", torch.bfloat16, 1, 40, 90, 2, 32, 32, 32)
    out = attention_call("cuda", 0.125)(**inp)
    assert out.device == torch.device("cuda:1")
    ref = attention_call("cuda", 0.125)(**{k: (v.to("cuda:0") if v is not None else v) for k, v in inp.items()})
    assert torch.equal(out.cpu(), ref.cpu())


@cuda_only
def test_cuda_graph_capture(cgen):
    inp = make_attention_inputs(cgen, "cuda", torch.bfloat16, 2, 64, 128, 4, 32, 32, 32, "contiguous", "random")
    coords = make_coords(cgen, "cuda", torch.float32, (64, 2), 4)
    msq = make_msq_inputs(cgen, "cuda", torch.float32, (64, 2), 128, True, True)
    expected = _run_all(inp, coords, msq)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _run_all(inp, coords, msq)  # warm-up (smem attributes) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _run_all(inp, coords, msq)
    graph.replay()
    torch.cuda.synchronize()
    for e, g in zip(expected, captured):
        assert torch.equal(e, g)
