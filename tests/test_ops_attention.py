"""content_position_attention: every available backend × device × dtype against the float64
reference (forward and the gradients of all five tensors) on fresh random inputs; fully-masked
rows; the saved logsumexp of the fused forward; float64 gradcheck of the C++ kernel; and the
reference itself against independent formulations (einsum split form, the original code's
concat + bmm + masked softmax + bmm, SDPA), so that the spec is checked before any kernel is."""

from __future__ import annotations

import pytest
import torch

from dabdetr import ops
from dabdetr.ops import reference

from _helpers import (
    assert_ignores_padded_key_contents,
    ALL_DTYPES,
    ATTN_DIFF,
    attention_call,
    attention_grad_floors,
    check_cotangent_layouts,
    compare_to_reference,
    cpu_kernel_params,
    device_backend_params,
    dtype_id,
    einsum_attention,
    forward_backward,
    interpreted,
    make_attention_inputs,
    original_attention,
    raw_attention_forward,
    skip_unsupported,
)

OP = "content_position_attention"
DTYPES = [pytest.param(d, id=dtype_id(d)) for d in ALL_DTYPES]


def _case(B=2, Nq=5, Nk=17, H=2, Dc=8, Dp=8, Dv=4, layout="contiguous", mask="random", q_gain=1.0, scale=None):
    return dict(B=B, Nq=Nq, Nk=Nk, H=H, Dc=Dc, Dp=Dp, Dv=Dv, layout=layout, mask=mask, q_gain=q_gain, scale=scale)


CASES = {
    # DAB-DETR's structure (Dc = Dp = Dv, explicit scale) at a small size
    "dabdetr_like": _case(B=2, Nq=5, Nk=17, H=2, Dc=8, Dp=8, Dv=8, scale=0.25),
    # sequence-first [N, B, H*d] tensors viewed batch-first, odd sizes, one batch element padded
    "seq_first_full_row": _case(B=3, Nq=7, Nk=13, H=3, Dc=5, Dp=3, Dv=7, layout="seq_first", mask="full_row"),
    "packed": _case(B=2, Nq=4, Nk=11, H=2, Dc=6, Dp=4, Dv=5, layout="packed", mask="random"),
    "strided_last_no_mask": _case(B=2, Nq=3, Nk=9, H=1, Dc=3, Dp=5, Dv=2, layout="strided_last", mask="none"),
    "mask_without_padding": _case(B=2, Nq=3, Nk=6, H=2, Dc=4, Dp=2, Dv=3, mask="no_padding"),
    "all_padding": _case(B=2, Nq=3, Nk=5, H=2, Dc=3, Dp=3, Dv=2, mask="all"),
    # large logits: the online softmax must subtract the running max
    "peaky": _case(B=2, Nq=4, Nk=19, H=2, Dc=4, Dp=4, Dv=3, mask="random", q_gain=12.0),
    # several key tiles, the last one partial
    "long_keys": _case(B=1, Nq=3, Nk=150, H=2, Dc=16, Dp=16, Dv=8, layout="seq_first", mask="random"),
    "head_dim_64": _case(B=1, Nq=2, Nk=7, H=1, Dc=64, Dp=64, Dv=64, mask="none"),
    "single": _case(B=1, Nq=1, Nk=1, H=1, Dc=1, Dp=1, Dv=1, mask="none"),
    "empty_batch": _case(B=0, Nq=3, Nk=4, H=2, Dc=2, Dp=2, Dv=2, mask="random"),
    "no_queries": _case(B=2, Nq=0, Nk=4, H=2, Dc=2, Dp=2, Dv=2, mask="random"),
    "no_keys": _case(B=2, Nq=3, Nk=0, H=2, Dc=2, Dp=2, Dv=2, mask="none"),
    "no_keys_masked": _case(B=2, Nq=3, Nk=0, H=2, Dc=2, Dp=2, Dv=2, mask="random"),
}


def _inputs(case, gen, device, dtype, tiny=False):
    c = dict(case)
    if tiny:  # the Triton interpreter: keep it small
        c["Nk"] = min(c["Nk"], 40)
    return make_attention_inputs(
        gen, device, dtype, c["B"], c["Nq"], c["Nk"], c["H"], c["Dc"], c["Dp"], c["Dv"], c["layout"], c["mask"], c["q_gain"]
    )


def _ref(scale):
    def ref(q_content, q_pos, k_content, k_pos, value, key_padding_mask):
        return reference.content_position_attention(q_content, q_pos, k_content, k_pos, value, key_padding_mask, scale)[0]

    return ref


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", device_backend_params(OP))
def test_attention_matches_reference(device, backend, dtype, case, gen, seed):
    skip_unsupported(backend, dtype)
    c = CASES[case]
    inputs = _inputs(c, gen, device, dtype, interpreted(device, backend))
    out, grads, ref_out, _ = compare_to_reference(
        OP, attention_call(backend, c["scale"]), _ref(c["scale"]), inputs, ATTN_DIFF, gen,
        ctx=f"[seed={seed}, backend={backend}]",
        grad_floors=lambda in64, g: attention_grad_floors(in64, g, c["scale"]),
    )
    B, Nq, H, _ = inputs["q_content"].shape
    assert out.shape == (B, Nq, H, inputs["value"].shape[-1])
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16")])
@pytest.mark.parametrize("device,backend", device_backend_params(OP))
def test_attention_fully_masked_rows_are_zero(device, backend, dtype, gen, seed):
    """A batch element whose keys are all padding: exactly zero output and zero gradients for its
    queries, keys and values; no NaN anywhere (the original returns NaN)."""
    skip_unsupported(backend, dtype)
    inputs = make_attention_inputs(gen, device, dtype, 3, 4, 9, 2, 4, 4, 3, "seq_first", "random")
    mask = inputs["key_padding_mask"].clone()
    mask[1] = True
    mask[0, 0] = False  # the others keep at least one key
    mask[2, -1] = False
    inputs["key_padding_mask"] = mask
    gout = torch.randn(3, 4, 2, 3, generator=gen).to(device)
    out, grads = forward_backward(attention_call(backend), inputs, ATTN_DIFF, gout)
    assert torch.isfinite(out).all(), f"non-finite output [seed={seed}]"
    assert torch.all(out[1] == 0), f"fully-masked batch element gives non-zero output [seed={seed}]"
    assert out[0].abs().sum() > 0 and out[2].abs().sum() > 0
    for k, g in grads.items():
        assert torch.isfinite(g).all(), f"non-finite grad of {k} [seed={seed}]"
        assert torch.all(g[1] == 0), f"grad of {k} is non-zero for the fully-masked batch element [seed={seed}]"
    # padded keys of the other elements get zero key/value gradients
    for k in ("k_content", "k_pos", "value"):
        assert torch.all(grads[k][mask] == 0), f"padded keys get a non-zero grad of {k} [seed={seed}]"


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16")])
@pytest.mark.parametrize("device,backend", device_backend_params(OP, fused_only=True))
def test_fused_attention_ignores_padded_key_contents(device, backend, dtype, gen, seed):
    """The fused kernels never read a padded key into the result: inf / NaN in the keys and values
    at padded positions leave the output and every gradient exactly as with zeros there (and the
    padded keys' gradients zero). The original's math (``backend="torch"``) turns such a row NaN
    (0 * NaN in P V and in dQ = dS K), hence fused backends only."""
    skip_unsupported(backend, dtype)
    assert_ignores_padded_key_contents(attention_call(backend), device, dtype, gen, seed)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64"),
                                   pytest.param(torch.float16, id="float16")])
@pytest.mark.parametrize("device,backend", device_backend_params(OP, fused_only=True))
def test_fused_forward_logsumexp(device, backend, dtype, gen, seed):
    """The registered forward returns (out [B, Nq, H, Dv] contiguous, logsumexp [B, H, Nq]) with the
    logsumexp in float32 (float64 for float64 inputs) and -inf for all-padding rows."""
    skip_unsupported(backend, dtype)
    inputs = make_attention_inputs(gen, device, dtype, 2, 5, 23, 2, 6, 2, 3, "seq_first", "full_row")
    scale = 0.3
    out, lse = raw_attention_forward(backend)(*inputs.values(), scale)
    in64 = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    want = reference.attention_logsumexp(in64["q_content"], in64["q_pos"], in64["k_content"], in64["k_pos"],
                                         in64["key_padding_mask"], scale)
    assert lse.shape == (2, 2, 5)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.all(torch.isneginf(lse[0])), "all-padding rows must have logsumexp -inf"
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(lse[1].double(), want[1], rtol=tol, atol=tol, msg=lambda m: f"{m} [seed={seed}]")


@pytest.mark.parametrize("device,backend", device_backend_params(OP))
def test_attention_backward_with_non_contiguous_output_gradients(device, backend, gen, seed):
    """The backward op gets whatever gradient autograd has: expanded (``out.sum()``), broadcast,
    transposed, strided in the last dim."""
    inputs = make_attention_inputs(gen, device, torch.float32, 2, 3, 7, 2, 3, 2, 4, "seq_first", "full_row")
    check_cotangent_layouts(OP, attention_call(backend), _ref(None), inputs, ATTN_DIFF, gen,
                            ctx=f"[seed={seed}, backend={backend}]")


@pytest.mark.parametrize("backend", cpu_kernel_params(OP))
@pytest.mark.parametrize("mask", ["none", "full_row"])
def test_attention_gradcheck(backend, mask, gen):
    """float64 gradcheck of the C++ kernel (forward + registered backward op)."""
    inputs = make_attention_inputs(gen, "cpu", torch.float64, 2, 3, 5, 2, 3, 2, 2, "seq_first", mask)
    m = inputs.pop("key_padding_mask")
    leaves = tuple(v.detach().requires_grad_(True) for v in inputs.values())
    fn = lambda *ts: ops.content_position_attention(*ts, m, scale=0.7, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the reference (the spec) against independent formulations


@pytest.mark.parametrize("case", ["seq_first_full_row", "packed", "peaky", "all_padding", "empty_batch",
                                  "no_queries", "no_keys_masked"])
def test_reference_matches_einsum_split_form(case, gen):
    """reference (concat + bmm + masked softmax) vs an einsum of the two halves, float64, forward and
    the gradients of all five tensors."""
    c = CASES[case]
    inputs = _inputs(c, gen, "cpu", torch.float64)
    gout = torch.randn(c["B"], c["Nq"], c["H"], c["Dv"], generator=gen, dtype=torch.float64)
    out, g = forward_backward(_ref(c["scale"]), inputs, ATTN_DIFF, gout)
    out2, g2 = forward_backward(lambda **kw: einsum_attention(**kw, scale=c["scale"])[0], inputs, ATTN_DIFF, gout)
    torch.testing.assert_close(out, out2, rtol=1e-10, atol=1e-12)
    for k in ATTN_DIFF:
        torch.testing.assert_close(g[k], g2[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"grad of {k}: {m}")


@pytest.mark.parametrize("case", ["dabdetr_like", "seq_first_full_row", "packed", "peaky", "long_keys"])
def test_reference_matches_original_code(case, gen):
    """reference vs REFERENCE.md §4 (sequence-first, per-head concat, q * scaling, bmm, -inf fill,
    softmax(x - max), bmm): equal where a row has a key; where all keys are padding the original
    gives NaN and the reference zeros."""
    c = CASES[case]
    inputs = _inputs(c, gen, "cpu", torch.float64)
    got = _ref(c["scale"])(**inputs)
    want = original_attention(**inputs, scale=c["scale"])
    mask = inputs["key_padding_mask"]
    full = mask.all(-1) if mask is not None else torch.zeros(c["B"], dtype=torch.bool)
    torch.testing.assert_close(got[~full], want[~full], rtol=1e-10, atol=1e-12)
    assert torch.isnan(want[full]).all() and torch.all(got[full] == 0)


def test_reference_matches_sdpa(gen):
    """reference vs torch's scaled_dot_product_attention (math backend, float64) over the
    concatenated [content | position] queries and keys, head dim of v different from q/k's."""
    inputs = make_attention_inputs(gen, "cpu", torch.float64, 2, 6, 10, 3, 5, 3, 4, "contiguous", "random")
    mask = inputs["key_padding_mask"]
    mask[:, 0] = False  # no fully-masked rows: SDPA gives NaN there
    q = torch.cat([inputs["q_content"], inputs["q_pos"]], -1).transpose(1, 2)
    k = torch.cat([inputs["k_content"], inputs["k_pos"]], -1).transpose(1, 2)
    v = inputs["value"].transpose(1, 2)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~mask[:, None, None, :], scale=0.4)
    got = _ref(0.4)(**inputs)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-10, atol=1e-12)


def test_reference_logsumexp_and_weights(gen):
    """attention_logsumexp reconstructs the probabilities: out = Σ_k exp(logit - lse) v; the
    head-averaged weights of need_weights=True are those probabilities averaged over heads, rows
    summing to 1 (0 for all-padding rows)."""
    inputs = make_attention_inputs(gen, "cpu", torch.float64, 3, 4, 9, 2, 3, 5, 2, "seq_first", "full_row")
    qc, qp, kc, kp, v, m = inputs.values()
    scale = 0.6
    lse = reference.attention_logsumexp(qc, qp, kc, kp, m, scale)
    assert lse.shape == (3, 2, 4) and torch.isneginf(lse[0]).all()
    logits = (torch.einsum("bqhd,bkhd->bhqk", qc, kc) + torch.einsum("bqhd,bkhd->bhqk", qp, kp)) * scale
    p = torch.exp(logits.masked_fill(m[:, None, None, :], float("-inf")) - lse[..., None])
    p = torch.nan_to_num(p, nan=0.0)  # -inf - -inf on all-padding rows
    recon = torch.einsum("bhqk,bkhd->bqhd", p, v)
    out, weights = ops.content_position_attention(qc, qp, kc, kp, v, m, scale, need_weights=True)
    torch.testing.assert_close(out, recon, rtol=1e-10, atol=1e-12)
    _, probs = einsum_attention(qc, qp, kc, kp, v, m, scale)
    torch.testing.assert_close(weights, probs.mean(1), rtol=1e-10, atol=1e-12)
    sums = weights.sum(-1)
    torch.testing.assert_close(sums[1:], torch.ones_like(sums[1:]))
    assert torch.all(sums[0] == 0)


def test_attention_default_scale(gen):
    """scale=None means (Dc + Dp) ** -0.5 on every path."""
    inputs = make_attention_inputs(gen, "cpu", torch.float64, 1, 3, 5, 2, 6, 10, 3)
    a = ops.content_position_attention(*inputs.values(), backend="torch")
    b = ops.content_position_attention(*inputs.values(), scale=0.25, backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
