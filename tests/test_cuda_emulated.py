"""The CUDA kernels (csrc/cuda/*.cu) run on the CPU: compiled by the host compiler on top of an
emulator of the CUDA execution model (csrc/emu/cuda_emu.h; built by tests/cuda_emu.py) and checked
like every other kernel: forward and all gradients against the float64 reference on fresh random
inputs, for float64 / float32 / float16 / bfloat16, on the op tests' own cases plus cases sized for
the CUDA kernels' tiles (several query and key tiles, partial last tiles, head dims up to 64) and
grid-stride loops (the emulated device has 2 SMs, and for the sine kernels also an H100's 132). Then
what only a parallel machine can get wrong: each kernel's results are bitwise the same whether the
threads between two barriers run in thread order, in reverse or in a random order, the blocks too (a
missing __syncthreads / __syncwarp, or a block depending on another's writes, shows up as a
difference), shared memory nobody wrote reads as NaN, outputs start as NaN (a row the kernel forgets
shows up), and a write past the dynamic shared memory, a deadlock, a warp collective with exited
lanes or a misaligned WMMA / vector access is an error. The last tests check that the emulator does
catch those defects. ``python tests/cuda_emu.py --asan`` (part of `make test`) runs this file again
with the kernels under AddressSanitizer and UndefinedBehaviorSanitizer: any access outside a
tensor's memory, and any vector access through a misaligned pointer, is an error with its source
line.

The device math functions (exp2f, log2f, __sincosf) carry errors within CUDA's documented bounds
(cuda_emu.h), so the tolerances hold for the hardware's error budget. What this cannot check: the
compiled device code (registers, spills, PTX: see benchmarks/cuda_resource_report.py), the memory
model beyond barriers, and speed. Those need a GPU (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch

import cuda_emu
from _helpers import (
    assert_ignores_padded_key_contents,
    ALL_DTYPES,
    ATTN_DIFF,
    attention_grad_floors,
    compare_to_reference,
    dtype_id,
    forward_backward,
    make_attention_inputs,
    make_coords,
    make_msq_inputs,
)
from dabdetr.ops import reference
from test_ops_attention import CASES as ATTN_CASES
from test_ops_attention import _case
from test_ops_sine import MSQ_CASES, MSQ_DIFF, SINE_CASES, _msq_case, _ref_temps, _sine_case

DTYPES = [pytest.param(d, id=dtype_id(d)) for d in ALL_DTYPES]
ATTN = "content_position_attention"


@pytest.fixture(scope="module")
def emu():
    why = cuda_emu.load()
    if why is not None:
        if cuda_emu.required():
            pytest.fail(f"DABDETR_REQUIRE_CUDA_EMULATION=1 but the CUDA emulation cannot be built: {why}")
        pytest.skip(f"CUDA emulation unavailable: {why}")
    E = cuda_emu.ops()
    E.set_schedule(0, 0)
    yield E
    E.set_schedule(0, 0)


# The emulated device's SM count, by which the sine kernels size their grid-stride grids: 2 (the
# loops take several turns at test sizes) and an H100's / H200's 132 (larger grids, idle warps).
SMS = [pytest.param(2, id="2sm"), pytest.param(132, id="132sm")]


@pytest.fixture
def sms(emu, request):
    emu.set_num_sms(request.param)
    yield request.param
    emu.set_num_sms(2)


class _Schedule:
    """Runs the block under an emulator schedule (0: thread order, 1: reverse, 2: random)."""

    def __init__(self, E, mode: int, seed: int = 0):
        self.E, self.mode, self.seed = E, mode, seed

    def __enter__(self):
        self.E.set_schedule(self.mode, self.seed)

    def __exit__(self, *exc):
        self.E.set_schedule(0, 0)


# ---------------------------------------------------------------------------------------------
# the emulated kernels as differentiable callables (forward kernel; backward kernel in backward)


def attention_call(E, scale=None):
    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, qc, qp, kc, kp, v, mask, s):
            out, lse = E.content_position_attention(qc, qp, kc, kp, v, mask, s)
            ctx.save_for_backward(qc, qp, kc, kp, v, out, lse)
            ctx.mask, ctx.s = mask, s
            return out

        @staticmethod
        def backward(ctx, go):
            qc, qp, kc, kp, v, out, lse = ctx.saved_tensors
            grads = E.content_position_attention_backward(go, qc, qp, kc, kp, v, ctx.mask, out, lse, ctx.s)
            return (*grads, None, None)

    def call(q_content, q_pos, k_content, k_pos, value, key_padding_mask):
        s = scale if scale is not None else (q_content.shape[-1] + q_pos.shape[-1]) ** -0.5
        return Fn.apply(q_content, q_pos, k_content, k_pos, value, key_padding_mask, s)

    return call


def sine_call(E, F, temps, scale, xy):
    temps = [float(t) for t in temps]

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, coords):
            ctx.save_for_backward(coords)
            return E.sine_embed(coords, F, temps, scale, xy)

        @staticmethod
        def backward(ctx, go):
            (coords,) = ctx.saved_tensors
            return E.sine_embed_backward(go, coords, F, temps, scale, xy)

    return lambda coords: Fn.apply(coords)


def msq_call(E, F, temps, scale):
    temps = [float(t) for t in temps]

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, anchors, ref_wh, pos_scale):
            ctx.save_for_backward(anchors, ref_wh, pos_scale)
            return E.modulated_sine_query(anchors, ref_wh, pos_scale, F, temps, scale)

        @staticmethod
        def backward(ctx, go):
            anchors, ref_wh, pos_scale = ctx.saved_tensors
            ga, gr, gp = E.modulated_sine_query_backward(go, anchors, ref_wh, pos_scale, F, temps, scale)
            return ga, (gr if ref_wh is not None else None), (gp if pos_scale is not None else None)

    return lambda anchors, ref_wh, pos_scale: Fn.apply(anchors, ref_wh, pos_scale)


# ---------------------------------------------------------------------------------------------
# content_position_attention

# Sized for the CUDA kernels' tiles (forward 32 x 64 query x key rows, 16 x 32 for float64;
# backward 32 x 64 / 32 x 32 / 16 x 16), on top of the op tests' cases.
TILE_CASES = {
    "tiles_dabdetr": _case(B=2, Nq=37, Nk=70, H=2, Dc=32, Dp=32, Dv=32, mask="random"),
    "tiles_exact": _case(B=1, Nq=64, Nk=128, H=1, Dc=16, Dp=16, Dv=16, mask="none", scale=0.2),
    "tiles_head_dim_64": _case(B=2, Nq=33, Nk=65, H=1, Dc=64, Dp=64, Dv=64, mask="full_row"),
    "tiles_peaky_seq_first": _case(B=2, Nq=40, Nk=100, H=2, Dc=24, Dp=8, Dv=40, layout="seq_first", mask="random",
                                   q_gain=12.0),
    "tiles_packed_odd": _case(B=1, Nq=17, Nk=97, H=3, Dc=20, Dp=12, Dv=20, layout="packed", mask="random"),
}
ALL_ATTN_CASES = {**ATTN_CASES, **TILE_CASES}


def _attn_inputs(c, gen, dtype):
    return make_attention_inputs(gen, "cpu", dtype, c["B"], c["Nq"], c["Nk"], c["H"], c["Dc"], c["Dp"], c["Dv"],
                                 c["layout"], c["mask"], c["q_gain"])


def _attn_ref(scale):
    def ref(q_content, q_pos, k_content, k_pos, value, key_padding_mask):
        return reference.content_position_attention(q_content, q_pos, k_content, k_pos, value, key_padding_mask,
                                                    scale)[0]

    return ref


@pytest.mark.parametrize("case", list(ALL_ATTN_CASES), ids=list(ALL_ATTN_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_attention_matches_reference(emu, dtype, case, gen, seed):
    c = ALL_ATTN_CASES[case]
    inputs = _attn_inputs(c, gen, dtype)
    out, _, _, _ = compare_to_reference(
        ATTN, attention_call(emu, c["scale"]), _attn_ref(c["scale"]), inputs, ATTN_DIFF, gen,
        ctx=f"[seed={seed}, emulated CUDA kernel]",
        grad_floors=lambda in64, g: attention_grad_floors(in64, g, c["scale"]),
    )
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_attention_logsumexp_and_masked_rows(emu, dtype, gen, seed):
    """The saved logsumexp (float32; float64 for float64) against the reference, -inf for a batch
    element whose keys are all padding, whose output and gradients are then exactly zero."""
    inputs = make_attention_inputs(gen, "cpu", dtype, 2, 37, 70, 2, 32, 32, 32, "seq_first", "full_row")
    scale = 0.3
    out, lse = emu.content_position_attention(*inputs.values(), scale)
    in64 = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    want = reference.attention_logsumexp(in64["q_content"], in64["q_pos"], in64["k_content"], in64["k_pos"],
                                         in64["key_padding_mask"], scale)
    assert lse.shape == (2, 2, 37)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.all(torch.isneginf(lse[0])), f"all-padding rows must have logsumexp -inf [seed={seed}]"
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}[dtype]
    torch.testing.assert_close(lse[1].double(), want[1], rtol=tol, atol=tol, msg=lambda m: f"{m} [seed={seed}]")
    assert torch.all(out[0] == 0)
    gout = torch.randn(out.shape, generator=gen).to(dtype)
    _, grads = forward_backward(attention_call(emu, scale), inputs, ATTN_DIFF, gout)
    for k in ATTN_DIFF:
        assert torch.all(grads[k][0] == 0), f"grad of {k} non-zero for an all-padding batch element [seed={seed}]"


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_attention_ignores_padded_key_contents(emu, dtype, gen, seed):
    """inf / NaN in padded keys and values leave the output and every gradient bitwise as with zeros
    there (the kernels load padded key rows as zeros), and padded keys get zero gradients."""
    assert_ignores_padded_key_contents(attention_call(emu), "cpu", dtype, gen, seed)


@pytest.mark.parametrize("dims,message", [
    ((65, 8, 8), "'q_content' / 'k_content' have Dc = 65"),
    ((8, 80, 8), "'q_pos' / 'k_pos' have Dp = 80"),
    ((8, 8, 70), "'value' has Dv = 70"),
])
def test_emulated_attention_rejects_head_dims_over_64(emu, dims, message, gen):
    """The CUDA host code's own limit (head dims up to 64 each), with the argument named."""
    inputs = make_attention_inputs(gen, "cpu", torch.float32, 1, 3, 5, 1, *dims)
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(")):
        emu.content_position_attention(*inputs.values(), 0.1)


def _run_all(fn):
    """fn() -> tensors; returns them as a list (for bitwise comparison across schedules)."""
    out = fn()
    return [t.clone() for t in (out if isinstance(out, (tuple, list)) else [out])]


def _assert_schedule_independent(E, fn, what, seed):
    with _Schedule(E, 0):
        base = _run_all(fn)
    for i, a in enumerate(base):  # -inf: the logsumexp of all-padding rows
        assert not torch.isnan(a).any(), f"{what}: result {i} has NaN (unwritten output or shared memory) [seed={seed}]"
    for mode, sched_seed in ((1, 0), (2, seed), (2, seed + 1)):
        with _Schedule(E, mode, sched_seed):
            got = _run_all(fn)
        for i, (a, b) in enumerate(zip(base, got)):
            assert torch.equal(a, b), (
                f"{what}: result {i} differs between thread order and schedule mode {mode} "
                f"(seed {sched_seed}): a data race (missing barrier) [seed={seed}]")


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_attention_is_race_free(emu, dtype, gen, seed):
    """Forward and backward bitwise identical under thread-order, reverse and random schedules."""
    inputs = make_attention_inputs(gen, "cpu", dtype, 2, 37, 70, 2, 24, 8, 20, "seq_first", "full_row")
    scale = 0.25
    out, lse = emu.content_position_attention(*inputs.values(), scale)
    gout = torch.randn(out.shape, generator=gen).to(dtype)
    args = list(inputs.values())

    def fwd_bwd():
        o, l = emu.content_position_attention(*args, scale)
        return (o, l, *emu.content_position_attention_backward(gout, *args, out, lse, scale))

    _assert_schedule_independent(emu, fwd_bwd, f"content_position_attention {dtype}", seed)


# ---------------------------------------------------------------------------------------------
# sine_embed and modulated_sine_query

# Beyond the op tests' cases: grid-stride loops (many rows on the 2-SM emulated device), the
# backward without its shared-memory frequency table (C * F/2 * sizeof(acc) > 32 KiB), more
# coordinates than fit in the kernel parameters (64: a device array), odd pair counts (no
# vectorized stores).
EMU_SINE_CASES = {
    "many_rows": dict(lead=(3, 300), C=4, F=128, temp="list", xy=True, layout="seq_first"),
    "no_table": dict(lead=(5,), C=4, F=4096, temp="list", xy=True, layout="contiguous"),
    "many_coords": dict(lead=(3,), C=70, F=4, temp="list", xy=True, layout="contiguous"),
    "odd_pairs": dict(lead=(4, 9), C=3, F=6, temp="tuple", xy=False, layout="sliced"),
}
ALL_SINE_CASES = {**SINE_CASES, **EMU_SINE_CASES}
EMU_MSQ_CASES = {
    "many_rows": dict(lead=(2, 700), F=128, ref=True, ps=True, temp="list", layout="seq_first"),
    "odd_pairs": dict(lead=(5, 3), F=10, ref=True, ps=True, temp="list", layout="strided_last"),
}
ALL_MSQ_CASES = {**MSQ_CASES, **EMU_MSQ_CASES}


@pytest.mark.parametrize("sms", SMS, indirect=True)
@pytest.mark.parametrize("case", list(ALL_SINE_CASES), ids=list(ALL_SINE_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_sine_embed_matches_reference(emu, sms, dtype, case, gen, seed):
    c = ALL_SINE_CASES[case]
    coords, temperature = _sine_case(c, gen, "cpu", dtype, False)
    F, xy = c["F"], c["xy"]
    scale = c.get("scale", 2 * math.pi)
    temps = _ref_temps(temperature, c["C"])

    def ref(coords):
        return reference.sine_embed(coords, F, temps, scale, xy)

    out, _, _, _ = compare_to_reference("sine_embed", sine_call(emu, F, temps, scale, xy), ref, {"coords": coords},
                                        ["coords"], gen, ctx=f"[seed={seed}, emulated CUDA kernel]")
    assert out.shape == (*coords.shape[:-1], c["C"] * F) and out.is_contiguous()


@pytest.mark.parametrize("sms", SMS, indirect=True)
@pytest.mark.parametrize("case", list(ALL_MSQ_CASES), ids=list(ALL_MSQ_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_modulated_sine_query_matches_reference(emu, sms, dtype, case, gen, seed):
    c = ALL_MSQ_CASES[case]
    inputs, temperature = _msq_case(c, gen, "cpu", dtype, False)
    F = c["F"]
    scale = c.get("scale", 2 * math.pi)
    temps = _ref_temps(temperature, 2)

    def ref(anchors, ref_wh, pos_scale):
        return reference.modulated_sine_query(anchors, ref_wh, pos_scale, F, temps, scale)

    out, _, _, _ = compare_to_reference("modulated_sine_query", msq_call(emu, F, temps, scale), ref, inputs, MSQ_DIFF,
                                        gen, ctx=f"[seed={seed}, emulated CUDA kernel]")
    assert out.shape == (*inputs["anchors"].shape[:-1], 2 * F) and out.is_contiguous()


@pytest.mark.parametrize("sms", SMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_sine_kernels_are_race_free(emu, sms, dtype, gen, seed):
    """Both ops' forward and backward (shuffles, the shared frequency table) bitwise identical
    under every schedule."""
    coords = make_coords(gen, "cpu", dtype, (3, 50), 4, "seq_first")
    temps = [10000.0, 20.0, 10000.0, 20.0]
    g_sine = torch.randn(3, 50, 4 * 64, generator=gen).to(dtype)
    msq = make_msq_inputs(gen, "cpu", dtype, (2, 60), 64, True, True, "contiguous")
    g_msq = torch.randn(2, 60, 128, generator=gen).to(dtype)
    two_pi = 2 * math.pi

    def run():
        return (
            emu.sine_embed(coords, 64, temps, two_pi, True),
            emu.sine_embed_backward(g_sine, coords, 64, temps, two_pi, True),
            emu.modulated_sine_query(msq["anchors"], msq["ref_wh"], msq["pos_scale"], 64, [20.0, 10000.0], two_pi),
            *emu.modulated_sine_query_backward(g_msq, msq["anchors"], msq["ref_wh"], msq["pos_scale"], 64,
                                               [20.0, 10000.0], two_pi),
        )

    _assert_schedule_independent(emu, run, f"sine kernels {dtype}", seed)


# ---------------------------------------------------------------------------------------------
# the CUDA kernels inside the model: parity with the original implementation

KERNEL_OPS = ("sine_embed", "sine_embed_backward", "modulated_sine_query", "modulated_sine_query_backward",
              "content_position_attention", "content_position_attention_backward")


@contextlib.contextmanager
def cuda_kernels_as_cpu_kernels(E):
    """Within the block, the dabdetr:: ops' CPU kernels are the emulated CUDA kernels (same
    arguments: they are the functions registered for dabdetr::CUDA), so ``backend="cpu"`` runs the
    CUDA kernels on CPU tensors through the ops' real dispatch and autograd; the C++ kernels are back
    afterwards."""
    lib = torch.library.Library("dabdetr", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name in KERNEL_OPS:
                op = getattr(E, name)
                lib.impl(name, (lambda f: lambda *args: f(*args))(op), "CPU")
        yield
    finally:
        lib._destroy()


def test_model_matches_the_original_with_emulated_cuda_kernels(emu):
    """The fixture model (../shared/fixtures, the original code's outputs, losses and gradients) with
    every fused op on the CUDA kernels: eval outputs, matcher, every loss, every gradient (the
    decoder's cross-attention, the sine embeddings, the CPU self-attentions on the attention op, as
    the model calls them: strided column slices of the batched key-side projections, masks)."""
    import test_model_parity as parity
    from conftest_model import load_fixture

    d = load_fixture()
    x = torch.rand(5, 4)
    before = torch.ops.dabdetr.sine_embed(x, 64, [1e4] * 4, 2 * math.pi, True)

    with cuda_kernels_as_cpu_kernels(emu):
        assert not torch.equal(torch.ops.dabdetr.sine_embed(x, 64, [1e4] * 4, 2 * math.pi, True), before), \
            "the override did not take: the C++ kernel ran"
        model = parity._model("cpu")
        with torch.no_grad():
            out = model(d["inputs"]["images"], d["inputs"]["mask"])
        ref = d["outputs"]
        parity._assert_close("pred_logits", out["pred_logits"], ref["pred_logits"])
        parity._assert_close("pred_boxes", out["pred_boxes"], ref["pred_boxes"])
        for i, (a, r) in enumerate(zip(out["aux_outputs"], ref["aux_outputs"])):
            parity._assert_close(f"aux{i}.pred_logits", a["pred_logits"], r["pred_logits"])
            parity._assert_close(f"aux{i}.pred_boxes", a["pred_boxes"], r["pred_boxes"])
        parity.test_losses_matcher_and_gradients("cpu")
    assert torch.equal(torch.ops.dabdetr.sine_embed(x, 64, [1e4] * 4, 2 * math.pi, True), before), \
        "the C++ kernel is not back after the override"


def test_model_bf16_autocast_with_emulated_cuda_kernels(emu):
    """The bfloat16 train step (autocast: the fused ops run in bf16, the GPU benchmark's setting) with
    every fused op on the emulated CUDA kernels stays as close to the original's float32 losses and
    gradients (the fixture) as the same step on the C++ CPU kernels: every loss within 3%, and per
    non-negligible gradient a cosine similarity to the float32 one at most 0.02 below the CPU
    kernels' (bf16 rounding dominates both; measured: losses within 0.7% (CPU kernels 0.8%), lowest
    cosine 0.944 (CPU kernels 0.935), at most 0.005 below the CPU kernels')."""
    import test_model_parity as parity
    from conftest_model import load_fixture
    from dabdetr.models.checkpoint import original_to_ours

    d = load_fixture()

    def step():
        model = parity._model("cpu").train()
        criterion = model.build_criterion()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(d["inputs"]["images"], d["inputs"]["mask"])
        losses = criterion(out, d["targets"])
        criterion.total(losses).backward()
        grads = {n: p.grad.detach().double().flatten() for n, p in model.named_parameters() if p.grad is not None}
        return {k: v.item() for k, v in losses.items()}, grads

    cpu_losses, cpu_grads = step()
    with cuda_kernels_as_cpu_kernels(emu):
        emu_losses, emu_grads = step()
    for k, r in d["loss"]["loss_dict"].items():
        if "error" in k:  # class / cardinality error: counts, not losses
            continue
        rel = abs(emu_losses[k] - r.item()) / max(abs(r.item()), 1e-6)
        assert rel <= 0.03, f"{k}: {emu_losses[k]:.5f} vs float32 {r.item():.5f} (CPU kernels: {cpu_losses[k]:.5f})"
    ref = {next(iter(original_to_ours({k: g}))): g.double().flatten() for k, g in d["grads"].items()}
    biggest = max(g.norm().item() for g in ref.values())

    def cos(a, b):
        return (a @ b / (a.norm() * b.norm())).item()

    checked = 0
    for name, g in ref.items():
        if g.norm().item() < 1e-3 * biggest:
            continue  # (near-)zero in exact arithmetic: rounding noise in both
        c_emu, c_cpu = cos(emu_grads[name], g), cos(cpu_grads[name], g)
        assert c_emu >= c_cpu - 0.02, f"grad of {name}: cosine to float32 {c_emu:.4f}, CPU kernels {c_cpu:.4f}"
        checked += 1
    assert checked > 50


# ---------------------------------------------------------------------------------------------
# the emulator catches the defects the tests above rely on it to catch (csrc/emu/selftest_emu.cpp)


def test_emulator_detects_a_missing_barrier(emu):
    racy, safe = [], []
    for mode in (0, 1, 2):
        with _Schedule(emu, mode, 1):
            racy.append(emu.selftest(0, 64, 2))
            safe.append(emu.selftest(1, 64, 2))
    want = (torch.arange(64) + 1) % 64 + 1
    for s in safe:
        assert torch.equal(s, want.float().repeat(2))
    assert not all(torch.equal(r, racy[0]) for r in racy[1:]), "a missing barrier gave the same result in every order"
    assert torch.isnan(racy[0]).any(), "thread order: the neighbour's slot is read before it is written (NaN)"


def test_emulator_detects_blocks_that_depend_on_their_order(emu):
    """Block b reads what block b - 1 wrote: right in grid order only (the schedule orders the blocks
    too, as the race checks above rely on)."""
    results = []
    for mode in (0, 1, 2):
        with _Schedule(emu, mode, 3):
            results.append(emu.selftest(10, 32, 6)[:6])
    assert torch.equal(results[0], torch.arange(1.0, 7.0))
    assert torch.equal(results[1], torch.ones(6)), "reverse order: every block reads a zero"
    assert not torch.equal(results[2], results[0]), "random block order gave grid order (seed 3)"


@pytest.mark.parametrize("kind,message", [
    (2, "deadlock"),
    (3, "exited while its warp waited"),
    (4, "wrote past the end"),
    (6, "wmma::load_matrix_sync: address not aligned to 32 bytes"),
    (7, "vector access: address not aligned to 16 bytes"),
    (8, "asks for 65536 bytes of dynamic shared memory, the kernel allows 49152"),
])
def test_emulator_reports_errors(emu, kind, message):
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(kind, 64, 1)


def test_emulator_allows_large_shared_memory_after_opting_in(emu):
    assert torch.all(emu.selftest(9, 64, 1) == 2.0)


def test_emulator_poisons_shared_memory(emu):
    assert torch.isnan(emu.selftest(5, 64, 1)).all()
