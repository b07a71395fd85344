"""Winograd F(m x m, 3 x 3) convolutions of the CPU backbone (dabdetr.models.winograd,
csrc/cpu/winograd_cpu.cpp): the transforms (C++ against the torch formulation, each against its
adjoint), the convolution and its gradients against float64 ``F.conv2d`` on fresh random inputs,
float32 error bounds, opcheck of the four ops, bad inputs, and the backbone's ``cpu_winograd``
(which convolutions it takes, parity with the direct path, torch.compile fullgraph)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dabdetr.models import backbone as bb
from dabdetr.models import winograd as wg

needs_cpp = pytest.mark.skipif(not (wg.HAS_CPP_TRANSFORMS and wg.HAS_CPP_WEIGHT_TRANSFORM),
                               reason="dabdetr._C (the C++ transforms) not built")

# (N, C, K, H, W): odd sizes (partial tiles), 1x1 images, channel counts across the C++ channel
# block (64), fewer input than output channels and the reverse
SHAPES = [(2, 8, 5, 13, 10), (1, 3, 4, 4, 4), (1, 70, 66, 5, 9), (1, 2, 3, 1, 1), (3, 130, 7, 6, 7)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


@pytest.fixture(params=["cpp", "torch"])
def transforms(request, monkeypatch):
    """Runs a test with the C++ transforms and with the torch formulation."""
    if request.param == "cpp" and not (wg.HAS_CPP_TRANSFORMS and wg.HAS_CPP_WEIGHT_TRANSFORM):
        pytest.skip("dabdetr._C (the C++ transforms) not built")
    monkeypatch.setattr(wg, "HAS_CPP_TRANSFORMS", request.param == "cpp")
    monkeypatch.setattr(wg, "HAS_CPP_WEIGHT_TRANSFORM", request.param == "cpp")
    return request.param


def _rand(*shape, dtype=torch.float64, gen=None):
    return torch.randn(*shape, dtype=dtype, generator=gen)


@needs_cpp
@pytest.mark.parametrize("m", wg.TILES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cpp_transforms_match_the_torch_formulation(m, shape):
    n, c, k, h, w = shape
    g = torch.Generator().manual_seed(hash((m,) + shape) % 2**31)
    ops = torch.ops.dabdetr_winograd
    x = _rand(n, h, w, c, gen=g)
    v = ops.input_transform(x, m)
    torch.testing.assert_close(v, wg.input_transform_torch(x, m), rtol=1e-12, atol=1e-12)
    gv = _rand(*v.shape, gen=g)
    torch.testing.assert_close(ops.input_transform_backward(gv, [n, h, w, c], m),
                               wg.input_transform_backward_torch(gv, [n, h, w, c], m), rtol=1e-12, atol=1e-12)
    mt = _rand(v.shape[0], v.shape[1], k, gen=g)
    bias = _rand(k, gen=g)
    for b in (bias, None):
        torch.testing.assert_close(ops.output_transform(mt, b, [n, h, w, k], m),
                                   wg.output_transform_torch(mt, b, [n, h, w, k], m), rtol=1e-12, atol=1e-12)
    gy = _rand(n, h, w, k, gen=g)
    torch.testing.assert_close(ops.output_transform_backward(gy, m), wg.output_transform_backward_torch(gy, m),
                               rtol=1e-12, atol=1e-12)
    weight = _rand(k, c, 3, 3, gen=g)
    torch.testing.assert_close(ops.weight_transform(weight, m), wg.weight_transform_torch(weight, m),
                               rtol=1e-12, atol=1e-12)
    gu = _rand((m + 2) ** 2, k, c, gen=g)
    torch.testing.assert_close(ops.weight_transform_backward(gu, m), wg.weight_transform_backward_torch(gu, m),
                               rtol=1e-12, atol=1e-12)


@needs_cpp
@pytest.mark.parametrize("m", wg.TILES)
def test_cpp_weight_transform_float32_and_layouts(m):
    """float32 against the float64 GEMM; a non-contiguous weight (a channels-last parameter) reads
    the same; more filters than one parallel task (1024) with a partial last block."""
    g = torch.Generator().manual_seed(30 + m)
    ops = torch.ops.dabdetr_winograd
    weight = _rand(70, 33, 3, 3, gen=g)
    ref = wg.weight_transform_torch(weight, m)
    torch.testing.assert_close(ops.weight_transform(weight.float(), m), ref.float(), rtol=1e-5, atol=1e-6)
    cl = weight.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ops.weight_transform(cl, m), ref, rtol=1e-12, atol=1e-12)
    gu = _rand((m + 2) ** 2, 70, 33, gen=g)
    ref_b = wg.weight_transform_backward_torch(gu, m)
    got = ops.weight_transform_backward(gu.float(), m)
    assert got.shape == (70, 33, 3, 3) and got.is_contiguous()
    torch.testing.assert_close(got, ref_b.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.weight_transform_backward(gu.transpose(1, 2).contiguous().transpose(1, 2), m),
                               ref_b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", wg.TILES)
def test_backward_transforms_are_the_adjoints(m, transforms):
    """<T x, g> == <x, T* g> for both transform pairs (what makes the convolution's backward right)."""
    n, c, h, w = 2, 5, 7, 11
    g = torch.Generator().manual_seed(m)
    x = _rand(n, h, w, c, gen=g)
    v = wg._in(x, m)
    gv = _rand(*v.shape, gen=g)
    lhs, rhs = (v * gv).sum(), (x * wg._in_bwd(gv, [n, h, w, c], m)).sum()
    assert abs(lhs - rhs) <= 1e-10 * (abs(lhs) + 1)
    mt = _rand(*v.shape, gen=g)
    y = wg._out(mt, None, [n, h, w, c], m)
    gy = _rand(*y.shape, gen=g)
    lhs, rhs = (y * gy).sum(), (mt * wg._out_bwd(gy, m)).sum()
    assert abs(lhs - rhs) <= 1e-10 * (abs(lhs) + 1)
    weight = _rand(4, c, 3, 3, gen=g).requires_grad_()
    u = wg.weight_transform(weight, m)
    gu = _rand(*u.shape, gen=g)
    (gw,) = torch.autograd.grad(u, weight, gu)
    lhs, rhs = (u * gu).sum(), (weight * gw).sum()
    assert abs(lhs - rhs) <= 1e-10 * (abs(lhs) + 1)


@pytest.mark.parametrize("m", wg.TILES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_conv_matches_float64_conv2d(m, shape, layout, transforms):
    n, c, k, h, w = shape
    g = torch.Generator().manual_seed(hash((m, layout) + shape) % 2**31)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = _rand(n, c, h, w, gen=g).contiguous(memory_format=fmt).requires_grad_()
    weight = _rand(k, c, 3, 3, gen=g).requires_grad_()
    bias = _rand(k, gen=g).requires_grad_()
    y = wg.winograd_conv3x3(x, weight, bias, m)
    assert y.shape == (n, k, h, w) and y.is_contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = _rand(n, k, h, w, gen=g)
    got = torch.autograd.grad(y, (x, weight, bias), gy)
    want = torch.autograd.grad(ref, (x, weight, bias), gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m", wg.TILES)
def test_gradcheck(m, transforms):
    g = torch.Generator().manual_seed(10 + m)
    x = _rand(1, 3, 5, 6, gen=g).requires_grad_()
    weight = _rand(2, 3, 3, 3, gen=g).requires_grad_()
    bias = _rand(2, gen=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: wg.winograd_conv3x3(a, b, c, m), (x, weight, bias))


@pytest.mark.parametrize("m", wg.TILES)
def test_double_backward(m, transforms):
    """Under create_graph the backward switches to the torch formulation (the C++ transforms have
    no autograd formulas), so second-order gradients are right too."""
    g = torch.Generator().manual_seed(20 + m)
    x = _rand(1, 2, 5, 4, gen=g).requires_grad_()
    weight = _rand(3, 2, 3, 3, gen=g).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: wg.winograd_conv3x3(a, b, None, m), (x, weight))


@pytest.mark.parametrize("m,bound", [(2, 2e-6), (4, 2e-5)])
def test_float32_error_against_float64(m, bound):
    """R50-like layer (256 channels, He-initialised weights): the float32 output error relative to
    the output magnitude. Measured (bench_winograd.py, R50 shapes) ~4e-7 (F(2, 3)), 6-8e-6 (F(4, 3));
    oneDNN's direct 1-2e-6."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(1, 256, 20, 24, generator=g).relu()
    weight = torch.randn(256, 256, 3, 3, generator=g) * (2 / (9 * 256)) ** 0.5
    ref = F.conv2d(x.double(), weight.double(), padding=1)
    y = wg.winograd_conv3x3(x.contiguous(memory_format=torch.channels_last), weight, None, m)
    assert y.dtype == torch.float32
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < bound, f"F({m}, 3) float32 relative error {err:.2e}"


@needs_cpp
def test_opcheck():
    ops = torch.ops.dabdetr_winograd
    g = torch.Generator().manual_seed(0)
    for m in wg.TILES:
        x = torch.randn(2, 5, 7, 3, generator=g)
        v = ops.input_transform(x, m)
        samples = [
            (ops.input_transform.default, (x, m)),
            (ops.input_transform_backward.default, (torch.randn(v.shape, generator=g), [2, 5, 7, 3], m)),
            (ops.output_transform.default, (torch.randn(v.shape, generator=g), torch.randn(3, generator=g),
                                            [2, 5, 7, 3], m)),
            (ops.output_transform.default, (torch.randn(v.shape, generator=g), None, [2, 5, 7, 3], m)),
            (ops.output_transform_backward.default, (x, m)),
            (ops.weight_transform.default, (torch.randn(4, 3, 3, 3, generator=g), m)),
            (ops.weight_transform_backward.default, (torch.randn((m + 2) ** 2, 4, 3, generator=g), m)),
        ]
        for op, args in samples:
            torch.library.opcheck(op, args)


@needs_cpp
def test_ops_reject_bad_inputs_by_name():
    ops = torch.ops.dabdetr_winograd
    x = torch.randn(1, 4, 4, 2)
    with pytest.raises(RuntimeError, match="'m' must be 2 or 4"):
        ops.input_transform(x, 3)
    with pytest.raises(RuntimeError, match="'x' must be 4-D"):
        ops.input_transform(x[0], 4)
    with pytest.raises(RuntimeError, match="'x' must be float32 or float64"):
        ops.input_transform(x.half(), 4)
    with pytest.raises(RuntimeError, match=r"'grad_v' must have shape \[36, 1, 2\]"):
        ops.input_transform_backward(torch.randn(36, 2, 2), [1, 4, 4, 2], 4)
    with pytest.raises(RuntimeError, match="'bias' must have 2 values"):
        ops.output_transform(torch.randn(36, 1, 2), torch.randn(3), [1, 4, 4, 2], 4)
    with pytest.raises(RuntimeError, match="'y_shape' sizes must be positive"):
        ops.output_transform(torch.randn(36, 1, 2), None, [1, 0, 4, 2], 4)
    with pytest.raises(RuntimeError, match=r"'weight' must be \[K, C, 3, 3\]"):
        ops.weight_transform(torch.randn(2, 2, 5, 5), 4)
    with pytest.raises(RuntimeError, match="'weight' must be 4-D"):
        ops.weight_transform(torch.randn(2, 2, 9), 4)
    with pytest.raises(RuntimeError, match=r"'grad_u' must be \[16, K, C\]"):
        ops.weight_transform_backward(torch.randn(36, 2, 2), 2)
    with pytest.raises(RuntimeError, match="'grad_u' must be float32 or float64"):
        ops.weight_transform_backward(torch.randn(36, 2, 2).half(), 4)


def test_python_entry_rejects_bad_inputs():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="'m' must be one of"):
        wg.winograd_conv3x3(x, torch.randn(2, 2, 3, 3), None, 3)
    with pytest.raises(ValueError, match="'weight' must be"):
        wg.winograd_conv3x3(x, torch.randn(2, 2, 5, 5))
    with pytest.raises(ValueError, match="'bias' must have shape"):
        wg.winograd_conv3x3(x, torch.randn(3, 2, 3, 3), torch.randn(2))
    with pytest.raises(ValueError, match="'x' must be 4-D"):
        wg.winograd_conv3x3(x[0], torch.randn(2, 2, 3, 3))


# ---------------------------------------------------------------------------------------------
# the backbone


def _body(dtype=torch.float64):
    torch.manual_seed(0)
    body = bb.resnet("resnet18").to(dtype)  # layer2-4: 128-512 channels
    for name, p in body.named_parameters():  # the original's trainable layers
        if not any(layer in name for layer in ("layer2", "layer3", "layer4")):
            p.requires_grad_(False)
    body.set_backend("cpu")
    return body


@pytest.mark.parametrize("shape,channels,tile,tile_f2", [
    ((1, 64, 200, 334), 64, 4, 0),
    ((2, 512, 16, 16), 512, 2, 2),  # 32 tiles of F(4, 3) < 512 / 8; 128 of F(2, 3) >= 512 / 4
    ((1, 512, 25, 42), 512, 4, 2),  # 77 tiles of F(4, 3)
    ((2, 256, 32, 32), 256, 4, 2), ((1, 256, 24, 24), 256, 4, 2),  # 36 tiles of F(4, 3)
    ((1, 256, 16, 16), 256, 2, 2),  # 16 tiles of F(4, 3) < 32; 64 of F(2, 3) >= 256 / 4
    ((1, 64, 16, 16), 64, 0, 0),  # 16 tiles of F(4, 3) < 32, F(2, 3) not below 128 channels
    ((1, 256, 12, 12), 256, 0, 0),  # 36 tiles of F(2, 3) < 64
    ((1, 512, 12, 12), 512, 0, 0),  # F(2, 3): 36 tiles < 128
    ((2, 128, 64, 64), 128, 4, 2),
    ((1, 32, 64, 64), 32, 0, 0),  # narrower than 64 channels
])
def test_winograd_rule(shape, channels, tile, tile_f2):
    """Which tile the backbone picks: mode "f4" F(4, 3) from 64 channels on enough tiles, else as
    "f2"; mode "f2" F(2, 3) from 128 channels on enough tiles; "off" none."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    assert bb._winograd_tile(conv, torch.empty(shape), "f4") == tile
    assert bb._winograd_tile(conv, torch.empty(shape), "f2") == tile_f2
    for mode in bb.WINOGRAD_MODES:
        strided = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        assert bb._winograd_tile(strided, torch.empty(shape), mode) == 0
        assert bb._winograd_tile(conv, torch.empty(shape, dtype=torch.float16), mode) == 0
        assert bb._winograd_tile(conv, torch.empty(shape, device="meta"), mode) == 0
    assert bb._winograd_tile(conv, torch.empty(shape), "off") == 0


def test_winograd_mode_values():
    assert [bb.winograd_mode(v) for v in (True, False, None, "f2", "F4", "off")] == ["f4", "off", "off", "f2", "f4",
                                                                                     "off"]
    with pytest.raises(ValueError, match="backbone_winograd .* must be one of"):
        bb.winograd_mode("fast")
    body = bb.resnet("resnet18")
    assert body.cpu_winograd == "f2"  # the default
    body.cpu_winograd = True
    assert body.cpu_winograd == "f4"
    body.layer1[0].winograd = "off"
    assert body.cpu_winograd == "mixed"


def test_backbone_takes_the_convolutions_the_rule_picks(monkeypatch):
    body = _body(torch.float32)
    narrow = bb.resnet("resnet18", width=32)  # layer1: 32 channels
    narrow.set_backend("cpu")
    body.cpu_winograd = narrow.cpu_winograd = True
    assert body.cpu_winograd == "f4"
    calls = []
    real = wg.winograd_conv3x3

    def spy(x, weight, bias=None, m=4):
        calls.append((tuple(weight.shape), m))
        return real(x, weight, bias, m)

    monkeypatch.setattr(wg, "winograd_conv3x3", spy)
    x = torch.randn(1, 3, 256, 256)
    body(x)
    # resnet18 at 256x256: layer1 (64 channels, 64x64: 256 tiles) has 4 stride-1 3x3 convolutions,
    # layer2 (128, 32x32: 64 tiles) 3 (the first block's conv1 has stride 2); layer3 (256, 16x16:
    # 16 tiles of F(4, 3), 64 of F(2, 3)) 3 as F(2, 3); layer4 (512, 8x8: 16 tiles of F(2, 3)) none
    assert sorted(calls) == sorted([((64, 64, 3, 3), 4)] * 4 + [((128, 128, 3, 3), 4)] * 3
                                   + [((256, 256, 3, 3), 2)] * 3)
    calls.clear()
    narrow(x)  # layer1 32 channels: direct; layer2 64 channels at 32x32: 64 tiles; layer3 128 at 16x16:
    # 64 tiles of F(2, 3) >= 128 / 4; layer4 256 at 8x8: 16 < 64
    assert sorted(calls) == sorted([((64, 64, 3, 3), 4)] * 3 + [((128, 128, 3, 3), 2)] * 3)
    calls.clear()
    body.set_backend("torch")  # the eager baseline keeps the original's convolutions
    body(x)
    assert calls == []
    body.set_backend("cpu")
    body.cpu_winograd = "f2"  # F(2, 3) from 128 channels: layer2 (32x32: 256 tiles) and layer3 (16x16:
    body(x)  # 64 tiles >= 256 / 4) but not their strided first convolutions, layer4 (16 tiles) not
    assert sorted(calls) == sorted([((128, 128, 3, 3), 2)] * 3 + [((256, 256, 3, 3), 2)] * 3)
    calls.clear()
    body.cpu_winograd = False
    assert body.cpu_winograd == "off"
    body(x)
    assert calls == []


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_backbone_with_winograd_matches_the_direct_path(dtype, tol):
    body = _body(dtype)
    x = torch.randn(2, 3, 160, 224, dtype=dtype)  # layer1 and layer2 take Winograd (rule above), layer3-4 not
    outs, grads = [], []
    for on in ("off", "f4", "f2"):
        body.cpu_winograd = on
        body.zero_grad(set_to_none=True)
        y = body(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append({n: p.grad for n, p in body.named_parameters() if p.requires_grad})
    scale = outs[0].abs().max()
    for i in (1, 2):
        assert (outs[i] - outs[0]).abs().max() <= tol * scale
        for name, g0 in grads[0].items():
            assert (grads[i][name] - g0).abs().max() <= tol * g0.abs().max() + 1e-12, name


def test_backbone_with_winograd_compiles_fullgraph():
    body = _body(torch.float32)
    body.cpu_winograd = True
    x = torch.randn(1, 3, 160, 224)  # layer1-2 on Winograd
    y0 = body(x)
    y0.sum().backward()
    g0 = body.layer2[1].conv2.weight.grad.clone()
    body.zero_grad(set_to_none=True)
    compiled = torch.compile(body, fullgraph=True, dynamic=False)
    y1 = compiled(x)
    y1.sum().backward()
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(body.layer2[1].conv2.weight.grad, g0, rtol=1e-4, atol=1e-4)


def test_model_config_switches_it_on():
    from dabdetr.models import DABDETR, get_preset

    tiny = get_preset("tiny").model
    assert DABDETR(tiny).backbone[0].body.cpu_winograd == "f2"  # the default
    for value, mode in ((True, "f4"), ("f4", "f4"), (False, "off"), ("off", "off")):
        assert DABDETR(tiny.replace(backbone_winograd=value)).backbone[0].body.cpu_winograd == mode
    with pytest.raises(ValueError, match="backbone_winograd"):
        DABDETR(tiny.replace(backbone_winograd="yes"))


def test_bench_model_provider_option():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_model import parse_provider, provider_list

    p = parse_provider("fused+winograd+compile")
    assert p.name == "fused+compile+winograd" and p.winograd and p.compile
    assert not parse_provider("fused+compile").winograd
    # default providers: the +winograd ones on the CPU only (a no-op elsewhere), never with +bf16
    cpu = [p.name for p in provider_list(None, False, cpu=True)]
    assert cpu == ["eager", "fused", "fused+compile", "fused+winograd", "fused+compile+winograd"]
    assert {p.name for p in provider_list(None, True, cpu=False)} == {
        "eager", "eager+bf16", "fused", "fused+compile", "fused+bf16", "fused+compile+bf16"}
    assert not any(p.winograd and p.bf16 for p in provider_list(None, True, cpu=True))
    with pytest.raises(ValueError, match="winograd is an option of the fused backends"):
        parse_provider("eager+winograd")
    assert parse_provider("fused+direct").direct and not parse_provider("fused").direct
    with pytest.raises(ValueError, match="pick one"):
        parse_provider("fused+winograd+direct")
    with pytest.raises(ValueError, match="direct is an option of the fused backends"):
        parse_provider("eager+direct")


@needs_cpp
def test_weight_grad_op_and_compiled_saved_tensors():
    """``dabdetr_winograd::weight_grad`` is ``bmm(grad_m^T, input_transform(x))`` (opcheck), and a
    compiled Winograd convolution keeps x for the backward, not the transformed input
    (``(m + 2)² / m²`` times larger): written as two ops in the backward, inductor's graph passes
    merged the recomputed transform with the forward's and saved it (checked: this test then
    sees a ``[16, 72, 8]`` saved tensor)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 10, 5, generator=g)
    gm = torch.randn(16, wg.tile_grid(2, 2, 6, 10)[2], 4, generator=g)
    ops = torch.ops.dabdetr_winograd
    torch.testing.assert_close(ops.weight_grad(gm, x, 2), torch.bmm(gm.transpose(1, 2), ops.input_transform(x, 2)))
    torch.library.opcheck(ops.weight_grad.default, (gm, x, 2))

    n, c, k, h, w, m = 2, 8, 8, 12, 12, 2
    xx = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    ww = torch.randn(k, c, 3, 3, generator=g).requires_grad_()
    f = torch.compile(lambda a, b: torch.relu(wg.winograd_conv3x3(a, b, None, m)), fullgraph=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = f(xx, ww)
    domain = ((m + 2) ** 2, wg.tile_grid(m, n, h, w)[2], c)
    assert saved and domain not in saved and (n, h, w, c) in saved, saved
    y.sum().backward()
    ref = torch.autograd.grad(F.conv2d(xx, ww, padding=1).relu().sum(), ww)[0]
    torch.testing.assert_close(ww.grad, ref, rtol=1e-4, atol=1e-4)
