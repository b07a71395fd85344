"""Registration and dispatch of the fused ops: torch.library.opcheck of every registered op,
torch.compile(fullgraph=True) parity with eager, autocast, backend selection (argument,
DABDETR_BACKEND, automatic choice, errors), and the package without its compiled extension."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dabdetr
from dabdetr import _ext, ops
from dabdetr.ops import BackendError, _dispatch, reference

from _helpers import (
    ATTN_DIFF,
    DEVICES,
    HAS_CUDA,
    attention_call,
    device_backend_params,
    forward_backward,
    interpreted,
    make_attention_inputs,
    make_coords,
    make_msq_inputs,
    msq_call,
    random_cotangent,
    rel_err,
    sine_call,
)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
OPS = _ext.FORWARD_OPS
TWO_PI = 2 * math.pi


@pytest.fixture
def no_env_backend(monkeypatch):
    """These tests choose the backend themselves: ignore a DABDETR_BACKEND of the caller."""
    monkeypatch.delenv("DABDETR_BACKEND", raising=False)


# ---------------------------------------------------------------------------------------------
# the build


def test_extension_state_is_consistent():
    """Either the extension loaded (and the sine ops have CPU kernels), or it did not and says why."""
    if not dabdetr.extension_loaded:
        assert _ext.LOAD_ERROR, "extension not loaded but no LOAD_ERROR"
        assert all(ops.available_backends("cpu", op) == ["torch"] for op in OPS)
        pytest.skip(f"dabdetr._C not loaded: {_ext.LOAD_ERROR}")
    for op in ("sine_embed", "modulated_sine_query"):
        assert "cpu" in ops.available_backends("cpu", op)


@pytest.mark.skipif(not dabdetr.extension_loaded, reason="dabdetr._C not loaded")
def test_build_has_every_cpu_kernel():
    """A loaded extension must carry the C++ CPU kernel of every op and backward op: otherwise the
    backend-parametrized tests would silently skip the missing kernel."""
    missing = [op for op in _ext.OPS if not _ext.kernel_registered(op, "CPU")]
    assert not missing, f"dabdetr._C has no CPU kernel for {missing}; rebuild (pip install -e . --no-build-isolation)"


@pytest.mark.cuda
@pytest.mark.skipif(os.environ.get("DABDETR_EXPECT_CUDA_KERNELS") != "1", reason="set DABDETR_EXPECT_CUDA_KERNELS=1 to require them")
def test_build_has_every_cuda_kernel():
    missing = [op for op in _ext.OPS if not _ext.kernel_registered(op, "CUDA")]
    assert dabdetr.extension_loaded and not missing, f"no CUDA kernel for {missing} ({_ext.LOAD_ERROR})"


_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


@pytest.mark.skipif(not shutil.which("g++"), reason="no g++")
def test_torch_free_sources_are_cpp17():
    """torch 2.11 (the GPU machines') builds extensions with -std=c++17, torch 2.14 (here) with
    c++20, so the sources must compile as both. The ones that include no torch header are checked
    as C++17 here (torch 2.14's own headers need C++20); a std::bit_cast slipped in once."""
    free = []
    for name in sorted(os.listdir(os.path.join(_CSRC, "cpu"))):
        path = os.path.join(_CSRC, "cpu", name)
        if name.endswith(".cpp"):
            with open(path) as f:
                if not any(line.startswith(("#include <torch", "#include <ATen", "#include <c10")) for line in f):
                    free.append(path)
    assert len(free) >= 2, f"expected the torch-free kernels (sincos.cpp, attention_kernels.cpp) in {_CSRC}/cpu"
    for path in free:
        r = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-fopenmp", "-Wall", "-I" + _CSRC, path],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"{os.path.relpath(path, _CSRC)} is not valid C++17:\n{r.stderr[-3000:]}"


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck


def _opcheck_samples(device):
    """(op name, args) samples for every registered op (forward and backward), small and varied:
    optional tensors absent and present, non-contiguous views, float32 and float64, an empty
    batch, a fully-masked batch element."""
    g = torch.Generator().manual_seed(0)  # fixed: opcheck is about registration, not values
    dev = device
    samples = []
    c32 = make_coords(g, dev, torch.float32, (3, 5), 4, layout="seq_first")
    c64 = make_coords(g, dev, torch.float64, (7,), 2)
    c0 = make_coords(g, dev, torch.float32, (0, 3), 3)
    for coords, F, xy in ((c32, 8, True), (c64, 6, False), (c0, 4, True)):
        C = coords.shape[-1]
        temps = [10.0 * (i + 1) for i in range(C)]
        samples.append(("sine_embed", (coords.requires_grad_(True), F, temps, TWO_PI, xy)))
        gout = torch.randn(*coords.shape[:-1], C * F, generator=g, dtype=coords.dtype).to(dev)
        samples.append(("sine_embed_backward", (gout, coords.detach(), F, temps, TWO_PI, xy)))
    for lead, F, ref, ps, dtype, layout in (((2, 5), 8, True, True, torch.float32, "seq_first"),
                                            ((4,), 4, False, True, torch.float64, "contiguous"),
                                            ((3,), 6, True, False, torch.float32, "sliced"),
                                            ((0, 2), 4, False, False, torch.float32, "contiguous")):
        inp = make_msq_inputs(g, dev, dtype, lead, F, ref, ps, layout)
        a, r, p = (t.requires_grad_(True) if t is not None else None for t in inp.values())
        samples.append(("modulated_sine_query", (a, r, p, F, [10.0, 20.0], TWO_PI)))
        gout = torch.randn(*lead, 2 * F, generator=g, dtype=dtype).to(dev)
        det = [t.detach() if t is not None else None for t in (a, r, p)]
        samples.append(("modulated_sine_query_backward", (gout, *det, F, [10.0, 20.0], TWO_PI)))
    for shape, dtype, layout, mask in (((2, 3, 7, 2, 4, 3, 5), torch.float32, "seq_first", "full_row"),
                                       ((1, 2, 5, 1, 2, 2, 3), torch.float64, "contiguous", "none"),
                                       ((0, 2, 3, 2, 2, 2, 2), torch.float32, "contiguous", "random")):
        inp = make_attention_inputs(g, dev, dtype, *shape, layout=layout, mask=mask)
        qc, qp, kc, kp, v, m = inp.values()
        fwd = tuple(t.requires_grad_(True) for t in (qc, qp, kc, kp, v))
        samples.append(("content_position_attention", (*fwd, m, 0.5)))
        det = tuple(t.detach() for t in fwd)
        out, _ = reference.content_position_attention(*det, m, 0.5)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        lse = reference.attention_logsumexp(*(t.to(acc) for t in det[:4]), m, 0.5)
        gout = torch.randn(out.shape, generator=g, dtype=dtype).to(dev)
        samples.append(("content_position_attention_backward", (gout, *det, m, out, lse, 0.5)))
    return samples


def _opcheck_params():
    params = []
    for dev in ("cpu", "cuda"):
        key = dev.upper()
        for op in _ext.OPS:
            marks = [pytest.mark.cuda] if dev == "cuda" else []
            if dev == "cuda" and not HAS_CUDA:
                marks.append(pytest.mark.skip(reason="no CUDA device"))
            elif not _ext.kernel_registered(op, key):
                marks.append(pytest.mark.skip(reason=f"dabdetr::{op} has no {key} kernel in this build"))
            params.append(pytest.param(dev, op, id=f"{dev}-{op}", marks=marks))
    return params


@pytest.mark.parametrize("device,op", _opcheck_params())
def test_opcheck(device, op):
    """torch.library.opcheck with its default test_utils (test_schema, test_autograd_registration,
    test_faketensor, test_aot_dispatch_dynamic) on every sample of every registered op. All of them
    apply to the backward ops too: they have no autograd formula (no double backward), and
    test_autograd_registration only requires that an op without one does not silently return
    outputs that require grad, which holds for the C++ kernels."""
    samples = [args for name, args in _opcheck_samples(device) if name == op]
    assert samples
    for args in samples:
        result = torch.library.opcheck(getattr(torch.ops.dabdetr, op).default, args)
        assert all(v == "SUCCESS" for v in result.values()), result


# ---------------------------------------------------------------------------------------------
# torch.compile


def _fused_or_auto(device, op):
    fused = [b for b in ops.available_backends(device, op) if b != "torch" and not interpreted(device, b)]
    return fused[0] if fused else None


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device, gen, seed, no_env_backend):
    """One function calling the three public ops (a fused backend where one is built, else the
    automatic choice), compiled with fullgraph=True (no graph break in argument checks, dispatch or
    autocast handling): forward and backward equal eager."""
    bs = {op: _fused_or_auto(device, op) for op in OPS}
    dt = torch.float32
    coords = make_coords(gen, device, dt, (2, 5), 4, layout="seq_first")
    msq_in = make_msq_inputs(gen, device, dt, (2, 5), 8, True, True)
    att = make_attention_inputs(gen, device, dt, 2, 5, 9, 2, 4, 4, 3, "seq_first", "full_row")
    mask = att.pop("key_padding_mask")

    def fn(coords, anchors, ref_wh, pos_scale, qc, qp, kc, kp, v):
        e = ops.sine_embed(coords, 8, [20.0, 30.0, 40.0, 50.0], backend=bs["sine_embed"])
        q = ops.modulated_sine_query(anchors, ref_wh, pos_scale, 8, (100.0, 200.0), backend=bs["modulated_sine_query"])
        o = ops.content_position_attention(qc, qp, kc, kp, v, mask, backend=bs["content_position_attention"])
        return e.square().sum() + (q * q).sum() + (o * o.detach()).sum(), e, q, o

    inputs = [coords, *msq_in.values(), *att.values()]
    leaves_e = [t.detach().clone().requires_grad_(True) for t in inputs]
    leaves_c = [t.detach().clone().requires_grad_(True) for t in inputs]
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    loss_e, *outs_e = fn(*leaves_e)
    loss_c, *outs_c = compiled(*leaves_c)
    for a, b in zip(outs_c, outs_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    loss_e.backward()
    loss_c.backward()
    for i, (a, b) in enumerate(zip(leaves_c, leaves_e)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"input {i}: {m} [seed={seed}, {bs}]")


# ---------------------------------------------------------------------------------------------
# autocast

AUTOCAST_DTYPES = [pytest.param(torch.bfloat16, id="bfloat16"), pytest.param(torch.float16, id="float16")]


def _autocast_compare(device, amp_dtype, call, ref, inputs, diff, gen, ctx):
    """Under torch.autocast(device, amp_dtype) with float32 inputs: the output is amp_dtype and is
    within 2 × err(reference computed in amp_dtype) + 1e-3 of the float64 reference; the gradients
    (float32, the inputs' dtype) likewise. The float64 reference takes the inputs as autocast
    hands them to the op (rounded to amp_dtype): the rounding of the inputs is autocast's, not the
    kernel's, and on small tensors it would swamp the comparison."""
    in64 = {k: (v.detach().to(amp_dtype).double() if v is not None and v.is_floating_point() else v)
            for k, v in inputs.items()}
    out64 = ref(**in64)
    gout = random_cotangent(out64.shape, amp_dtype, device, gen)
    out64, g64 = forward_backward(ref, in64, diff, gout)
    lp = {k: (v.to(amp_dtype) if v is not None and v.is_floating_point() else v) for k, v in in64.items()}
    out_lp, g_lp = forward_backward(ref, lp, diff, gout)
    leaves = {k: (v.detach().requires_grad_(True) if k in diff and v is not None else v) for k, v in inputs.items()}
    with torch.autocast(device, dtype=amp_dtype):
        out = call(**leaves)
    assert out.dtype == amp_dtype, f"output dtype {out.dtype} under autocast({amp_dtype}) {ctx}"
    names = [k for k in diff if leaves.get(k) is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in names], gout.to(out.dtype))
    tol = 2 * rel_err(out_lp, out64) + 1e-3
    err = rel_err(out, out64)
    assert err <= tol, f"output error {err:.3g} > {tol:.3g} {ctx}"
    for k, gk in zip(names, grads):
        assert gk.dtype == torch.float32, f"grad of {k} has dtype {gk.dtype} {ctx}"
        tol = 2 * rel_err(g_lp[k], g64[k]) + 1e-3
        err = rel_err(gk, g64[k])
        assert err <= tol, f"grad of {k}: error {err:.3g} > {tol:.3g} {ctx}"


@pytest.mark.parametrize("amp_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("device,backend", device_backend_params("sine_embed"))
def test_autocast_sine_embed(device, backend, amp_dtype, gen, seed):
    coords = make_coords(gen, device, torch.float32, (3, 4), 4, layout="seq_first")
    temps = (20.0, 30.0, 1e4, 1e4)
    _autocast_compare(device, amp_dtype, sine_call(backend, 16, temps),
                      lambda coords: reference.sine_embed(coords, 16, temps, TWO_PI, True),
                      {"coords": coords}, ["coords"], gen, f"[seed={seed}, backend={backend}]")


@pytest.mark.parametrize("amp_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("device,backend", device_backend_params("modulated_sine_query"))
def test_autocast_modulated_sine_query(device, backend, amp_dtype, gen, seed):
    inputs = make_msq_inputs(gen, device, torch.float32, (2, 5), 16, True, True)
    _autocast_compare(device, amp_dtype, msq_call(backend, 16),
                      lambda anchors, ref_wh, pos_scale: reference.modulated_sine_query(
                          anchors, ref_wh, pos_scale, 16, (1e4, 1e4), TWO_PI),
                      inputs, ["anchors", "ref_wh", "pos_scale"], gen, f"[seed={seed}, backend={backend}]")


@pytest.mark.parametrize("amp_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("device,backend", device_backend_params("content_position_attention"))
def test_autocast_content_position_attention(device, backend, amp_dtype, gen, seed):
    inputs = make_attention_inputs(gen, device, torch.float32, 2, 5, 11, 2, 4, 4, 3, "seq_first", "full_row")
    _autocast_compare(device, amp_dtype, attention_call(backend),
                      lambda **kw: reference.content_position_attention(**kw)[0],
                      inputs, list(ATTN_DIFF), gen, f"[seed={seed}, backend={backend}]")


@pytest.mark.parametrize("op", [op for op in OPS])
def test_autocast_rule_of_registered_op(op, gen):
    """The dispatcher-level autocast rule: calling torch.ops.dabdetr.<op> directly under
    torch.autocast("cpu", bfloat16) with float32 inputs runs in bfloat16."""
    if not _ext.kernel_registered(op, "CPU"):
        pytest.skip(f"dabdetr::{op} has no CPU kernel in this build")
    if op == "sine_embed":
        args = (make_coords(gen, "cpu", torch.float32, (3,), 2), 8, [1e4, 1e4], TWO_PI, True)
    elif op == "modulated_sine_query":
        args = (*make_msq_inputs(gen, "cpu", torch.float32, (3,), 8, True, True).values(), 8, [1e4, 1e4], TWO_PI)
    else:
        args = (*make_attention_inputs(gen, "cpu", torch.float32, 1, 2, 3, 1, 2, 2, 2, mask="random").values(), 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = getattr(torch.ops.dabdetr, op)(*args)
    first = out[0] if isinstance(out, (tuple, list)) else out
    assert first.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# dispatch


class _OpLog(TorchDispatchMode):
    """Records the dabdetr operators that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dabdetr":
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _sample_call(op, gen, **kw):
    if op == "sine_embed":
        x = make_coords(gen, "cpu", torch.float32, (3,), 4)
        return lambda: ops.sine_embed(x, 8, **kw)
    if op == "modulated_sine_query":
        a = make_msq_inputs(gen, "cpu", torch.float32, (3,), 8, True, True)
        return lambda: ops.modulated_sine_query(*a.values(), num_feats=8, **kw)
    inp = make_attention_inputs(gen, "cpu", torch.float32, 2, 3, 5, 2, 2, 2, 2, mask="random")
    return lambda: ops.content_position_attention(*inp.values(), **kw)


def _ran_fused(call) -> bool:
    with _OpLog() as log:
        call()
    return bool(log.ops)


def _auto_cpu(op):
    return "cpu" if "cpu" in ops.available_backends("cpu", op) else "torch"


@pytest.mark.parametrize("op", OPS)
def test_dispatch_explicit_env_and_auto(op, gen, monkeypatch):
    """backend= wins over DABDETR_BACKEND, which wins over the automatic choice (cpu if built,
    else torch, for CPU tensors); the choice is what actually runs."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("DABDETR_BACKEND", raising=False)
    auto = _auto_cpu(op)
    assert _dispatch.resolve(op, cpu, None) == auto
    assert _ran_fused(_sample_call(op, gen)) == (auto == "cpu")
    assert not _ran_fused(_sample_call(op, gen, backend="torch"))
    for value in ("", "auto", " AUTO "):
        monkeypatch.setenv("DABDETR_BACKEND", value)
        assert _dispatch.resolve(op, cpu, None) == auto
    monkeypatch.setenv("DABDETR_BACKEND", "torch")
    assert _dispatch.resolve(op, cpu, None) == "torch"
    assert not _ran_fused(_sample_call(op, gen))
    if auto == "cpu":
        assert _ran_fused(_sample_call(op, gen, backend="cpu"))  # argument beats the environment
        monkeypatch.setenv("DABDETR_BACKEND", "cpu")
        assert _ran_fused(_sample_call(op, gen))
        assert not _ran_fused(_sample_call(op, gen, backend="torch"))


@pytest.mark.parametrize("op", OPS)
def test_dispatch_missing_backend_raises(op, gen, monkeypatch):
    """An explicitly requested backend that cannot run the call raises BackendError saying which
    backend, why, and (for the extension) how to build it; never a silent fallback."""
    monkeypatch.delenv("DABDETR_BACKEND", raising=False)
    with pytest.raises(BackendError, match=r"backend='cuda'.*cuda tensors|backend='cuda'.*dabdetr\._C") as e:
        _sample_call(op, gen, backend="cuda")()
    assert op in str(e.value)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no interpreter: Triton cannot take CPU tensors
    with pytest.raises(BackendError, match="backend='triton'") as e:
        _sample_call(op, gen, backend="triton")()
    assert "Triton" in str(e.value) or "triton" in str(e.value).split("cannot run this call:")[1]
    with pytest.raises(BackendError, match="unknown backend 'tpu'") as e:
        _sample_call(op, gen, backend="tpu")()
    assert "torch" in str(e.value) and "cpu" in str(e.value)
    monkeypatch.setenv("DABDETR_BACKEND", "cuda")
    with pytest.raises(BackendError, match="DABDETR_BACKEND='cuda'"):
        _sample_call(op, gen)()
    monkeypatch.setenv("DABDETR_BACKEND", "fast")
    with pytest.raises(BackendError, match="DABDETR_BACKEND='fast' is not a backend"):
        _sample_call(op, gen)()
    if "cpu" not in ops.available_backends("cpu", op):
        monkeypatch.delenv("DABDETR_BACKEND")
        with pytest.raises(BackendError, match="pip install -e ."):
            _sample_call(op, gen, backend="cpu")()


@pytest.mark.parametrize("kw", [{"need_weights": True}, {"dropout_p": 0.5}], ids=["need_weights", "dropout"])
def test_attention_reference_only_features(kw, gen, monkeypatch):
    """need_weights=True and dropout_p > 0: backend=None runs the reference; a fused backend asked
    for explicitly (argument or DABDETR_BACKEND) raises a BackendError naming the feature."""
    monkeypatch.delenv("DABDETR_BACKEND", raising=False)
    op = "content_position_attention"
    inp = make_attention_inputs(gen, "cpu", torch.float32, 2, 3, 6, 2, 3, 3, 2, "seq_first", "full_row")
    with _OpLog() as log:
        res = ops.content_position_attention(*inp.values(), **kw)
    assert not log.ops, "the reference path must serve this call"
    if "need_weights" in kw:
        out, weights = res
        assert weights.shape == (2, 3, 6)
        torch.testing.assert_close(out, reference.content_position_attention(*inp.values())[0])
    else:
        assert res.shape == (2, 3, 2, 2) and torch.isfinite(res).all()
        assert torch.all(res[0] == 0)  # all-padding element stays zero under dropout
    assert ops.content_position_attention(*inp.values(), **kw, backend="torch") is not None
    feature = next(iter(kw))
    for how in ("argument", "env"):
        if how == "env":
            monkeypatch.setenv("DABDETR_BACKEND", "cpu")
            call = lambda: ops.content_position_attention(*inp.values(), **kw)  # noqa: E731
        else:
            call = lambda: ops.content_position_attention(*inp.values(), **kw, backend="cpu")  # noqa: E731
        with pytest.raises(BackendError) as e:
            call()
        if "cpu" in ops.available_backends("cpu", op):
            assert feature in str(e.value)


def test_dropout_changes_the_output(gen, no_env_backend):
    """dropout_p > 0 drops attention probabilities (reference path): the output differs from
    dropout_p=0 and stays finite."""
    inp = make_attention_inputs(gen, "cpu", torch.float64, 1, 8, 16, 2, 3, 3, 4)
    a = ops.content_position_attention(*inp.values())
    b = ops.content_position_attention(*inp.values(), dropout_p=0.5)
    assert torch.isfinite(b).all() and not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------
# without the compiled extension

_NO_EXT_SCRIPT = textwrap.dedent(
    r"""
    import json, math, sys
    import torch
    sys.path.insert(0, TESTS_DIR)
    import dabdetr
    from dabdetr import ops, _ext
    from dabdetr.ops import reference, BackendError
    from _helpers import original_sine_embed, original_modulated_sine_query, einsum_attention

    res = {"loaded": dabdetr.extension_loaded, "load_error": _ext.LOAD_ERROR,
           "backends": {op: ops.available_backends("cpu", op) for op in _ext.FORWARD_OPS},
           "library_registered": ops._library._LIB is not None}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    out = ops.sine_embed(x, 16)
    res["sine_err"] = (out - original_sine_embed(x, 16)).abs().max().item()
    out.sum().backward()
    res["sine_grad_finite"] = bool(torch.isfinite(x.grad).all())
    a = torch.rand(5, 4, generator=g, dtype=torch.float64) * 0.9 + 0.1
    r = torch.rand(5, 2, generator=g, dtype=torch.float64)
    p = torch.randn(5, 16, generator=g, dtype=torch.float64)
    res["msq_err"] = (ops.modulated_sine_query(a, r, p, 8) - original_modulated_sine_query(a, r, p, 8)).abs().max().item()
    t = [torch.randn(2, n, 2, d, generator=g, dtype=torch.float64) for n, d in ((3, 4), (3, 2), (5, 4), (5, 2), (5, 3))]
    m = torch.tensor([[False, True, False, False, True], [True] * 5])
    res["attn_err"] = (ops.content_position_attention(*t, m) - einsum_attention(*t, m)[0]).abs().max().item()
    errors = {}
    for op, call in (("sine_embed", lambda b: ops.sine_embed(x, 16, backend=b)),
                     ("modulated_sine_query", lambda b: ops.modulated_sine_query(a, r, p, 8, backend=b)),
                     ("content_position_attention", lambda b: ops.content_position_attention(*t, m, backend=b))):
        try:
            call("cpu")
            errors[op] = None
        except BackendError as e:
            errors[op] = str(e)
    res["cpu_errors"] = errors
    print("RESULT " + json.dumps(res))
    """
)


def test_without_extension():
    """DABDETR_LIBRARY pointing at a missing file: the extension fails to load, `import dabdetr`
    works, backend=None runs the reference (correct values vs the original formulas), and
    backend="cpu" raises a BackendError that says why and how to build."""
    env = {k: v for k, v in os.environ.items() if k != "DABDETR_BACKEND"}
    env["DABDETR_LIBRARY"] = "/nonexistent/libdabdetr_missing.so"
    script = _NO_EXT_SCRIPT.replace("TESTS_DIR", repr(TESTS_DIR))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    assert res["loaded"] is False and "nonexistent" in (res["load_error"] or "")
    assert res["library_registered"] is False
    assert all(b == ["torch"] for b in res["backends"].values()), res["backends"]
    assert res["sine_err"] < 1e-12 and res["msq_err"] < 1e-12 and res["attn_err"] < 1e-12, res
    assert res["sine_grad_finite"]
    for op, msg in res["cpu_errors"].items():
        assert msg is not None, f"{op}: backend='cpu' without the extension did not raise"
        assert f"dabdetr.ops.{op}" in msg and "backend='cpu'" in msg
        assert "not available" in msg and "pip install -e ." in msg, msg
