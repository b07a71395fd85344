"""Bad inputs: the public ops raise TypeError/ValueError whose message names the argument; the
registered ops (torch.ops.dabdetr.*, called directly, bypassing the Python checks) raise
RuntimeError naming the argument and never crash the process (they run in a subprocess, so a
crash fails these tests instead of killing the test session).

Run as a script (``python tests/test_ops_errors.py``) it executes the direct-call cases and prints
one JSON line per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:  # when run as a script
    sys.path.insert(0, TESTS_DIR)

from dabdetr import _ext, ops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
TWO_PI = 6.283185307179586


def f32(*shape):
    return torch.rand(*shape)


def anchors(*lead):
    return torch.rand(*lead, 4) * 0.9 + 0.1


def attn(B=2, Nq=3, Nk=5, H=2, Dc=4, Dp=2, Dv=3, dtype=torch.float32, **override):
    t = {
        "q_content": torch.randn(B, Nq, H, Dc, dtype=dtype),
        "q_pos": torch.randn(B, Nq, H, Dp, dtype=dtype),
        "k_content": torch.randn(B, Nk, H, Dc, dtype=dtype),
        "k_pos": torch.randn(B, Nk, H, Dp, dtype=dtype),
        "value": torch.randn(B, Nk, H, Dv, dtype=dtype),
        "key_padding_mask": torch.zeros(B, Nk, dtype=torch.bool),
    }
    t.update(override)
    return t


def cpa(**override):
    t = attn(**override)
    return lambda: ops.content_position_attention(**t)


def cpa_kw(kw, **override):
    t = attn(**override)
    return lambda: ops.content_position_attention(**t, **kw)


# (callable, exception type, substrings the message must contain: the argument's name first)
PUBLIC_CASES = {
    # sine_embed
    "sine/coords_not_tensor": (lambda: ops.sine_embed([[0.1, 0.2]], 8), TypeError, ["'coords'", "torch.Tensor"]),
    "sine/coords_int": (lambda: ops.sine_embed(torch.ones(3, 2, dtype=torch.int64), 8), TypeError, ["'coords'", "floating"]),
    "sine/coords_bool": (lambda: ops.sine_embed(torch.ones(3, 2, dtype=torch.bool), 8), TypeError, ["'coords'"]),
    "sine/coords_0d": (lambda: ops.sine_embed(torch.tensor(0.5), 8), ValueError, ["'coords'"]),
    "sine/c1_with_exchange_xy": (lambda: ops.sine_embed(f32(3, 1), 8), ValueError, ["'coords'", "exchange_xy"]),
    "sine/c0_no_exchange": (lambda: ops.sine_embed(f32(3, 0), 8, exchange_xy=False), ValueError, ["'coords'"]),
    "sine/num_feats_odd": (lambda: ops.sine_embed(f32(3, 2), 7), ValueError, ["'num_feats'", "even"]),
    "sine/num_feats_zero": (lambda: ops.sine_embed(f32(3, 2), 0), ValueError, ["'num_feats'"]),
    "sine/num_feats_negative": (lambda: ops.sine_embed(f32(3, 2), -4), ValueError, ["'num_feats'"]),
    "sine/num_feats_float": (lambda: ops.sine_embed(f32(3, 2), 8.0), ValueError, ["'num_feats'"]),
    "sine/temperature_count": (lambda: ops.sine_embed(f32(3, 4), 8, [1e4, 1e4, 1e4]), ValueError, ["'temperature'", "4"]),
    "sine/temperature_negative": (lambda: ops.sine_embed(f32(3, 2), 8, -10.0), ValueError, ["'temperature'"]),
    "sine/temperature_zero_in_list": (lambda: ops.sine_embed(f32(3, 2), 8, [10.0, 0.0]), ValueError, ["'temperature'"]),
    "sine/temperature_string": (lambda: ops.sine_embed(f32(3, 2), 8, "hot"), TypeError, ["'temperature'"]),
    "sine/scale_nan": (lambda: ops.sine_embed(f32(3, 2), 8, scale=float("nan")), ValueError, ["'scale'"]),
    "sine/scale_string": (lambda: ops.sine_embed(f32(3, 2), 8, scale="2pi"), TypeError, ["'scale'"]),
    # modulated_sine_query
    "msq/anchors_not_tensor": (lambda: ops.modulated_sine_query((0.5, 0.5, 0.1, 0.1), num_feats=8), TypeError, ["'anchors'"]),
    "msq/anchors_int": (lambda: ops.modulated_sine_query(torch.ones(3, 4, dtype=torch.int32), num_feats=8), TypeError, ["'anchors'", "floating"]),
    "msq/anchors_last_dim_2": (lambda: ops.modulated_sine_query(f32(3, 2), num_feats=8), ValueError, ["'anchors'", "4"]),
    "msq/ref_wh_last_dim_3": (lambda: ops.modulated_sine_query(anchors(3), f32(3, 3), num_feats=8), ValueError, ["'ref_wh'", "2"]),
    "msq/ref_wh_leading_shape": (lambda: ops.modulated_sine_query(anchors(3), f32(4, 2), num_feats=8), ValueError, ["'ref_wh'", "leading"]),
    "msq/ref_wh_broadcastable_rank": (lambda: ops.modulated_sine_query(anchors(2, 3), f32(3, 2), num_feats=8), ValueError, ["'ref_wh'"]),
    "msq/ref_wh_not_tensor": (lambda: ops.modulated_sine_query(anchors(3), [[1.0, 1.0]] * 3, num_feats=8), TypeError, ["'ref_wh'"]),
    "msq/ref_wh_dtype": (lambda: ops.modulated_sine_query(anchors(3), f32(3, 2).double(), num_feats=8), TypeError, ["'ref_wh'", "dtype"]),
    "msq/ref_wh_int": (lambda: ops.modulated_sine_query(anchors(3), torch.ones(3, 2, dtype=torch.int64), num_feats=8), TypeError, ["'ref_wh'"]),
    "msq/pos_scale_size": (lambda: ops.modulated_sine_query(anchors(3), None, f32(3, 17), num_feats=8), ValueError, ["'pos_scale'", "16"]),
    "msq/pos_scale_leading_shape": (lambda: ops.modulated_sine_query(anchors(3), None, f32(2, 16), num_feats=8), ValueError, ["'pos_scale'"]),
    "msq/pos_scale_dtype": (lambda: ops.modulated_sine_query(anchors(3), None, f32(3, 16).half(), num_feats=8), TypeError, ["'pos_scale'"]),
    "msq/num_feats_odd": (lambda: ops.modulated_sine_query(anchors(3), num_feats=5), ValueError, ["'num_feats'"]),
    "msq/temperature_count": (lambda: ops.modulated_sine_query(anchors(3), num_feats=8, temperature=[1.0, 2.0, 3.0, 4.0]), ValueError, ["'temperature'", "2"]),
    # content_position_attention
    "cpa/q_content_rank3": (cpa(q_content=torch.randn(2, 3, 8)), ValueError, ["'q_content'", "4-D"]),
    "cpa/value_rank5": (cpa(value=torch.randn(2, 5, 2, 3, 1)), ValueError, ["'value'", "4-D"]),
    "cpa/k_pos_rank2": (cpa(k_pos=torch.randn(5, 2)), ValueError, ["'k_pos'"]),
    "cpa/batch_mismatch": (cpa(k_content=torch.randn(3, 5, 2, 4)), ValueError, ["'k_content'", "batch"]),
    "cpa/heads_mismatch": (cpa(q_pos=torch.randn(2, 3, 3, 2)), ValueError, ["'q_pos'", "heads"]),
    "cpa/queries_mismatch": (cpa(q_pos=torch.randn(2, 4, 2, 2)), ValueError, ["'q_pos'", "queries"]),
    "cpa/keys_mismatch_value": (cpa(value=torch.randn(2, 6, 2, 3)), ValueError, ["'value'", "keys"]),
    "cpa/keys_mismatch_k_pos": (cpa(k_pos=torch.randn(2, 4, 2, 2)), ValueError, ["'k_pos'", "keys"]),
    "cpa/content_dim_mismatch": (cpa(k_content=torch.randn(2, 5, 2, 5)), ValueError, ["'k_content'", "content head dim"]),
    "cpa/position_dim_mismatch": (cpa(k_pos=torch.randn(2, 5, 2, 3)), ValueError, ["'k_pos'", "position head dim"]),
    "cpa/mask_uint8": (cpa(key_padding_mask=torch.zeros(2, 5, dtype=torch.uint8)), TypeError, ["'key_padding_mask'", "bool"]),
    "cpa/mask_float": (cpa(key_padding_mask=torch.zeros(2, 5)), TypeError, ["'key_padding_mask'", "bool"]),
    "cpa/mask_shape": (cpa(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)), ValueError, ["'key_padding_mask'", "[2, 5]"]),
    "cpa/mask_rank3": (cpa(key_padding_mask=torch.zeros(2, 1, 5, dtype=torch.bool)), ValueError, ["'key_padding_mask'"]),
    "cpa/mask_transposed": (cpa(key_padding_mask=torch.zeros(5, 2, dtype=torch.bool)), ValueError, ["'key_padding_mask'"]),
    "cpa/mask_not_tensor": (cpa(key_padding_mask=[[False] * 5] * 2), TypeError, ["'key_padding_mask'"]),
    "cpa/value_dtype": (cpa(value=torch.randn(2, 5, 2, 3, dtype=torch.float64)), TypeError, ["'value'", "dtype"]),
    "cpa/q_pos_half": (cpa(q_pos=torch.randn(2, 3, 2, 2).half()), TypeError, ["'q_pos'", "dtype"]),
    "cpa/q_content_int": (cpa(q_content=torch.ones(2, 3, 2, 4, dtype=torch.int64)), TypeError, ["'q_content'", "floating"]),
    "cpa/k_pos_not_tensor": (cpa(k_pos=[[0.0]]), TypeError, ["'k_pos'"]),
    "cpa/dropout_one": (cpa_kw({"dropout_p": 1.0}), ValueError, ["'dropout_p'"]),
    "cpa/dropout_negative": (cpa_kw({"dropout_p": -0.1}), ValueError, ["'dropout_p'"]),
    "cpa/scale_string": (cpa_kw({"scale": "auto"}), TypeError, ["'scale'"]),
    "cpa/scale_inf": (cpa_kw({"scale": float("inf")}), ValueError, ["'scale'"]),
}


@pytest.mark.parametrize("case", list(PUBLIC_CASES), ids=list(PUBLIC_CASES))
@pytest.mark.parametrize("backend", [None, "torch"], ids=["auto", "torch"])
def test_public_bad_input(case, backend, monkeypatch):
    monkeypatch.delenv("DABDETR_BACKEND", raising=False)
    fn, exc, words = PUBLIC_CASES[case]
    if backend is not None:  # the checks run before dispatch, whatever the backend
        monkeypatch.setenv("DABDETR_BACKEND", backend)
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    assert msg.startswith("dabdetr.ops."), msg
    for w in words:
        assert w in msg, f"{w!r} not in message: {msg}"


def _cuda_cases():
    dev = "cuda"
    return {
        "cpa/mixed_devices": (lambda: ops.content_position_attention(**attn(k_pos=torch.randn(2, 5, 2, 2, device=dev))), ValueError, ["'k_pos'", "cuda"]),
        "cpa/mask_device": (lambda: ops.content_position_attention(**{**{k: v.to(dev) for k, v in attn().items() if k != "key_padding_mask"},
                                                                      "key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}),
                            ValueError, ["'key_padding_mask'"]),
        "msq/ref_wh_device": (lambda: ops.modulated_sine_query(anchors(3), f32(3, 2).to(dev), num_feats=8), ValueError, ["'ref_wh'", "cuda"]),
        "msq/pos_scale_device": (lambda: ops.modulated_sine_query(anchors(3).to(dev), None, f32(3, 16), num_feats=8), ValueError, ["'pos_scale'"]),
    }


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="mixed devices need a CUDA device")
@pytest.mark.parametrize("case", ["cpa/mixed_devices", "cpa/mask_device", "msq/ref_wh_device", "msq/pos_scale_device"])
def test_public_mixed_devices(case):
    fn, exc, words = _cuda_cases()[case]
    with pytest.raises(exc) as e:
        fn()
    for w in words:
        assert w in str(e.value), str(e.value)


def test_public_case_count():
    """The issue asks for at least 15 bad-input cases; keep the list from shrinking silently."""
    assert len(PUBLIC_CASES) >= 15 and len(DIRECT_CASES) >= 15


# ---------------------------------------------------------------------------------------------
# the registered ops called directly (no Python checks in front): RuntimeError naming the argument

D = torch.ops.dabdetr if _ext.LOADED else None


def _direct_attn(**override):
    t = attn(**override)
    return [t[k] for k in ("q_content", "q_pos", "k_content", "k_pos", "value", "key_padding_mask")]


def _direct_attn_bwd(which, bad):
    t = attn()
    fwd = [t[k] for k in ("q_content", "q_pos", "k_content", "k_pos", "value")]
    B, Nq, H, Dv = 2, 3, 2, 3
    args = {"grad_out": torch.randn(B, Nq, H, Dv), "out": torch.randn(B, Nq, H, Dv), "logsumexp": torch.randn(B, H, Nq)}
    args[which] = bad
    return (args["grad_out"], *fwd, t["key_padding_mask"], args["out"], args["logsumexp"], 0.5)


# name -> (op, args factory, substrings the RuntimeError message must contain)
DIRECT_CASES = {
    "sine_embed/coords_int": ("sine_embed", lambda: (torch.ones(3, 2, dtype=torch.int64), 8, [1e4, 1e4], TWO_PI, True), ["'coords'"]),
    "sine_embed/coords_not_tensor": ("sine_embed", lambda: (3.0, 8, [1e4], TWO_PI, True), ["coords"]),
    "sine_embed/coords_0d": ("sine_embed", lambda: (torch.tensor(0.5), 8, [1e4], TWO_PI, False), ["'coords'"]),
    "sine_embed/c1_exchange": ("sine_embed", lambda: (f32(3, 1), 8, [1e4], TWO_PI, True), ["'coords'"]),
    "sine_embed/num_feats_odd": ("sine_embed", lambda: (f32(3, 2), 7, [1e4, 1e4], TWO_PI, True), ["'num_feats'"]),
    "sine_embed/num_feats_zero": ("sine_embed", lambda: (f32(3, 2), 0, [1e4, 1e4], TWO_PI, True), ["'num_feats'"]),
    "sine_embed/num_feats_negative": ("sine_embed", lambda: (f32(3, 2), -2, [1e4, 1e4], TWO_PI, True), ["'num_feats'"]),
    "sine_embed/temperature_count": ("sine_embed", lambda: (f32(3, 4), 8, [1e4], TWO_PI, True), ["'temperature'"]),
    "sine_embed/temperature_negative": ("sine_embed", lambda: (f32(3, 2), 8, [1e4, -1.0], TWO_PI, True), ["'temperature'"]),
    "sine_embed_backward/grad_out_last_dim": ("sine_embed_backward", lambda: (f32(3, 15), f32(3, 2), 8, [1e4, 1e4], TWO_PI, True), ["'grad_out'"]),
    "sine_embed_backward/grad_out_leading": ("sine_embed_backward", lambda: (f32(4, 16), f32(3, 2), 8, [1e4, 1e4], TWO_PI, True), ["'grad_out'"]),
    "sine_embed_backward/grad_out_dtype": ("sine_embed_backward", lambda: (f32(3, 16).double(), f32(3, 2), 8, [1e4, 1e4], TWO_PI, True), ["'grad_out'"]),
    "sine_embed_backward/coords_int": ("sine_embed_backward", lambda: (f32(3, 16), torch.ones(3, 2, dtype=torch.int32), 8, [1e4, 1e4], TWO_PI, True), ["'coords'"]),
    "modulated_sine_query/anchors_last_dim": ("modulated_sine_query", lambda: (f32(3, 3), None, None, 8, [1e4, 1e4], TWO_PI), ["'anchors'"]),
    "modulated_sine_query/anchors_int": ("modulated_sine_query", lambda: (torch.ones(3, 4, dtype=torch.int64), None, None, 8, [1e4, 1e4], TWO_PI), ["'anchors'"]),
    "modulated_sine_query/ref_wh_last_dim": ("modulated_sine_query", lambda: (anchors(3), f32(3, 3), None, 8, [1e4, 1e4], TWO_PI), ["'ref_wh'"]),
    "modulated_sine_query/ref_wh_leading": ("modulated_sine_query", lambda: (anchors(3), f32(2, 2), None, 8, [1e4, 1e4], TWO_PI), ["'ref_wh'"]),
    "modulated_sine_query/ref_wh_rank": ("modulated_sine_query", lambda: (anchors(2, 3), f32(3, 2), None, 8, [1e4, 1e4], TWO_PI), ["'ref_wh'"]),
    "modulated_sine_query/ref_wh_dtype": ("modulated_sine_query", lambda: (anchors(3), f32(3, 2).double(), None, 8, [1e4, 1e4], TWO_PI), ["'ref_wh'"]),
    "modulated_sine_query/pos_scale_size": ("modulated_sine_query", lambda: (anchors(3), None, f32(3, 15), 8, [1e4, 1e4], TWO_PI), ["'pos_scale'"]),
    "modulated_sine_query/pos_scale_leading": ("modulated_sine_query", lambda: (anchors(3), None, f32(1, 16), 8, [1e4, 1e4], TWO_PI), ["'pos_scale'"]),
    "modulated_sine_query/temperature_count": ("modulated_sine_query", lambda: (anchors(3), None, None, 8, [1e4], TWO_PI), ["'temperature'"]),
    "modulated_sine_query/num_feats_odd": ("modulated_sine_query", lambda: (anchors(3), None, None, 3, [1e4, 1e4], TWO_PI), ["'num_feats'"]),
    "modulated_sine_query_backward/grad_out_size": ("modulated_sine_query_backward", lambda: (f32(3, 8), anchors(3), None, None, 8, [1e4, 1e4], TWO_PI), ["'grad_out'"]),
    "modulated_sine_query_backward/grad_out_dtype": ("modulated_sine_query_backward", lambda: (f32(3, 16).half(), anchors(3), None, None, 8, [1e4, 1e4], TWO_PI), ["'grad_out'"]),
    "content_position_attention/q_content_rank": ("content_position_attention", lambda: (*_direct_attn(q_content=torch.randn(2, 3, 8)), 0.5), ["'q_content'"]),
    "content_position_attention/batch_mismatch": ("content_position_attention", lambda: (*_direct_attn(k_content=torch.randn(3, 5, 2, 4)), 0.5), ["'k_content'"]),
    "content_position_attention/heads_mismatch": ("content_position_attention", lambda: (*_direct_attn(value=torch.randn(2, 5, 3, 3)), 0.5), ["'value'"]),
    "content_position_attention/keys_mismatch": ("content_position_attention", lambda: (*_direct_attn(k_pos=torch.randn(2, 4, 2, 2)), 0.5), ["'k_pos'"]),
    "content_position_attention/queries_mismatch": ("content_position_attention", lambda: (*_direct_attn(q_pos=torch.randn(2, 4, 2, 2)), 0.5), ["'q_pos'"]),
    "content_position_attention/dc_mismatch": ("content_position_attention", lambda: (*_direct_attn(k_content=torch.randn(2, 5, 2, 3)), 0.5), ["'k_content'"]),
    "content_position_attention/dp_mismatch": ("content_position_attention", lambda: (*_direct_attn(k_pos=torch.randn(2, 5, 2, 5)), 0.5), ["'k_pos'"]),
    "content_position_attention/mask_dtype": ("content_position_attention", lambda: (*_direct_attn(key_padding_mask=torch.zeros(2, 5, dtype=torch.uint8)), 0.5), ["'key_padding_mask'"]),
    "content_position_attention/mask_shape": ("content_position_attention", lambda: (*_direct_attn(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), 0.5), ["'key_padding_mask'"]),
    "content_position_attention/value_dtype": ("content_position_attention", lambda: (*_direct_attn(value=torch.randn(2, 5, 2, 3, dtype=torch.float64)), 0.5), ["'value'"]),
    "content_position_attention/q_int": ("content_position_attention", lambda: (*_direct_attn(q_content=torch.ones(2, 3, 2, 4, dtype=torch.int64)), 0.5), ["'q_content'"]),
    "content_position_attention_backward/grad_out_shape": ("content_position_attention_backward", lambda: _direct_attn_bwd("grad_out", torch.randn(2, 3, 2, 4)), ["'grad_out'"]),
    "content_position_attention_backward/out_shape": ("content_position_attention_backward", lambda: _direct_attn_bwd("out", torch.randn(2, 3, 3)), ["'out'"]),
    "content_position_attention_backward/logsumexp_shape": ("content_position_attention_backward", lambda: _direct_attn_bwd("logsumexp", torch.randn(2, 3, 2)), ["'logsumexp'"]),
    "content_position_attention_backward/logsumexp_dtype": ("content_position_attention_backward", lambda: _direct_attn_bwd("logsumexp", torch.randn(2, 2, 3).half()), ["'logsumexp'"]),
}


def run_direct_cases(names):
    """Runs each case, printing ``START name`` then one JSON result line (flushed), so that a crash
    is attributed to its case."""
    for name in names:
        op, make, _ = DIRECT_CASES[name]
        print(f"START {name}", flush=True)
        if not _ext.LOADED:
            res = {"status": "skip", "why": f"extension not loaded: {_ext.LOAD_ERROR}"}
        elif not _ext.kernel_registered(op, "CPU"):
            res = {"status": "skip", "why": f"dabdetr::{op} has no CPU kernel in this build"}
        else:
            try:
                getattr(torch.ops.dabdetr, op)(*make())
                res = {"status": "no_error"}
            except Exception as exc:  # noqa: BLE001 - recorded and judged by the test
                res = {"status": "raised", "type": type(exc).__name__, "runtime": isinstance(exc, RuntimeError),
                       "message": str(exc)}
        print("RESULT " + json.dumps({"name": name, **res}), flush=True)


@pytest.fixture(scope="module")
def direct_results():
    env = {k: v for k, v in os.environ.items() if k != "DABDETR_BACKEND"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *DIRECT_CASES], capture_output=True, text=True,
                          env=env, timeout=300)
    results, started = {}, []
    for line in proc.stdout.splitlines():
        if line.startswith("START "):
            started.append(line[6:])
        elif line.startswith("RESULT "):
            r = json.loads(line[7:])
            results[r["name"]] = r
    crashed = [n for n in started if n not in results]
    return {"results": results, "crashed": crashed, "rc": proc.returncode, "stderr": proc.stderr[-4000:]}


@pytest.mark.parametrize("case", list(DIRECT_CASES), ids=list(DIRECT_CASES))
def test_direct_op_bad_input(case, direct_results):
    res = direct_results["results"].get(case)
    if res is None:
        culprit = direct_results["crashed"]
        pytest.fail(f"the subprocess died (rc={direct_results['rc']}) in case {culprit} before reaching {case}:\n"
                    f"{direct_results['stderr']}")
    if res["status"] == "skip":
        pytest.skip(res["why"])
    assert res["status"] == "raised", f"torch.ops.dabdetr.{DIRECT_CASES[case][0]} accepted a bad input"
    assert res["runtime"], f"expected a RuntimeError, got {res['type']}: {res['message']}"
    for w in DIRECT_CASES[case][2]:
        assert w in res["message"], f"{w!r} not in message: {res['message']}"


def test_direct_calls_did_not_crash(direct_results):
    assert direct_results["rc"] == 0 and not direct_results["crashed"], (
        f"rc={direct_results['rc']}, crashed in {direct_results['crashed']}:\n{direct_results['stderr']}")


if __name__ == "__main__":
    run_direct_cases(sys.argv[1:] or list(DIRECT_CASES))
