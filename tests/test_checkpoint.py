"""Checkpoint loading: original ``checkpoint.pth`` (path or dict, Namespace or dict args), HF
``dab_detr`` state dicts via the key map, our format + ``convert_checkpoint``, and clear errors for
bad checkpoints. Nothing is ever unpickled beyond the allow-list (``argparse.Namespace``)."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from conftest_model import load_fixture, small_config
from dabdetr.models import (
    DABDETR,
    CheckpointError,
    convert_checkpoint,
    load_checkpoint,
    load_hf_checkpoint,
    load_original_checkpoint,
    save_checkpoint,
)
from dabdetr.models.checkpoint import _infer_args, config_from_original_args, hf_to_original

# ---------------------------------------------------------------------------------------------
# HF's published converter (original -> HF names), restated here as test data to check our inverse
# map against it (transformers/models/dab_detr/convert_dab_detr_original_pytorch_checkpoint_to_pytorch.py).
_HF_FORWARD = [
    (r"input_proj\.(bias|weight)", r"input_projection.\1"),
    (r"refpoint_embed\.weight", r"query_refpoint_embeddings.weight"),
    (r"transformer\.patterns\.weight", r"patterns.weight"),
    (r"^bbox_embed\.layers\.(\d+)\.(bias|weight)", r"bbox_predictor.layers.\1.\2"),
    (r"transformer\.encoder\.query_scale\.layers\.(\d+)\.(bias|weight)", r"encoder.query_scale.layers.\1.\2"),
    (r"transformer\.decoder\.bbox_embed\.layers\.(\d+)\.(bias|weight)", r"decoder.bbox_embed.layers.\1.\2"),
    (r"transformer\.decoder\.norm\.(bias|weight)", r"decoder.layernorm.\1"),
    (r"transformer\.decoder\.(ref_point_head|ref_anchor_head|query_scale)\.", r"decoder.\1."),
    (r"transformer\.decoder\.layers\.0\.ca_qpos_proj\.", r"decoder.layers.0.layer.1.cross_attn_query_pos_proj."),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"transformer\.encoder\.layers\.(\d+)\.linear(\d)\.", r"encoder.layers.\1.fc\2."),
    (r"transformer\.encoder\.layers\.(\d+)\.norm1\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (r"transformer\.encoder\.layers\.(\d+)\.norm2\.", r"encoder.layers.\1.final_layer_norm."),
    (r"transformer\.encoder\.layers\.(\d+)\.activation\.weight", r"encoder.layers.\1.activation_fn.weight"),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"decoder.layers.\1.layer.0.self_attn.output_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.cross_attn\.out_proj\.", r"decoder.layers.\1.layer.1.cross_attn.output_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.linear(\d)\.", r"decoder.layers.\1.layer.2.fc\2."),
    (r"transformer\.decoder\.layers\.(\d+)\.norm1\.", r"decoder.layers.\1.layer.0.self_attn_layer_norm."),
    (r"transformer\.decoder\.layers\.(\d+)\.norm2\.", r"decoder.layers.\1.layer.1.cross_attn_layer_norm."),
    (r"transformer\.decoder\.layers\.(\d+)\.norm3\.", r"decoder.layers.\1.layer.2.final_layer_norm."),
    (r"transformer\.decoder\.layers\.(\d+)\.activation\.weight", r"decoder.layers.\1.layer.2.activation_fn.weight"),
    (r"transformer\.decoder\.layers\.(\d+)\.sa_qcontent_proj\.", r"decoder.layers.\1.layer.0.self_attn_query_content_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.sa_kcontent_proj\.", r"decoder.layers.\1.layer.0.self_attn_key_content_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.sa_qpos_proj\.", r"decoder.layers.\1.layer.0.self_attn_query_pos_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.sa_kpos_proj\.", r"decoder.layers.\1.layer.0.self_attn_key_pos_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.sa_v_proj\.", r"decoder.layers.\1.layer.0.self_attn_value_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.ca_qcontent_proj\.", r"decoder.layers.\1.layer.1.cross_attn_query_content_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.ca_kcontent_proj\.", r"decoder.layers.\1.layer.1.cross_attn_key_content_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.ca_kpos_proj\.", r"decoder.layers.\1.layer.1.cross_attn_key_pos_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.ca_v_proj\.", r"decoder.layers.\1.layer.1.cross_attn_value_proj."),
    (r"transformer\.decoder\.layers\.(\d+)\.ca_qpos_sine_proj\.", r"decoder.layers.\1.layer.1.cross_attn_query_pos_sine_proj."),
]


def _to_hf(original: dict) -> dict:
    out = {}
    for k, v in original.items():
        if k.startswith("backbone.0.body."):
            out["model.backbone.conv_encoder.model._backbone." + k[len("backbone.0.body."):]] = v
            continue
        m = re.match(r"transformer\.encoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)", k)
        if m:
            d = v.shape[0] // 3
            for i, n in enumerate("qkv"):
                out[f"model.encoder.layers.{m.group(1)}.self_attn.{n}_proj.{m.group(2)}"] = v[i * d:(i + 1) * d]
            continue
        new = k
        for pat, rep in _HF_FORWARD:
            new = re.sub(pat, rep, new)
        assert new != k or k.startswith("class_embed"), k
        out[new if new.startswith(("class_embed", "bbox_predictor")) else "model." + new] = v
    return out


def _fixture_ckpt():
    d = load_fixture()
    return {"model": d["state_dict"], "args": d["args"]}


# ---------------------------------------------------------------------------------------------
def test_original_checkpoint_from_path_with_namespace_args(tmp_path):
    d = load_fixture()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": d["state_dict"], "args": argparse.Namespace(**d["args"]), "epoch": 49}, path)
    model = load_original_checkpoint(path, backend="torch")
    assert not model.training and model.backend == "torch"
    c = model.config
    assert (c.backbone, c.enc_layers, c.dec_layers, c.dim_feedforward, c.num_queries, c.num_classes) == \
        ("resnet18", 2, 3, 256, 300, 91)
    assert (c.pe_temperature_h, c.pe_temperature_w, c.activation, c.inverse_sigmoid_eps) == (20.0, 20.0, "prelu", 1e-3)
    ref = load_original_checkpoint(_fixture_ckpt())
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_architecture_inferred_without_args():
    ckpt = _fixture_ckpt()
    inferred = _infer_args(ckpt["model"])
    cfg = config_from_original_args(inferred, ckpt["model"])
    assert cfg == config_from_original_args(ckpt["args"], ckpt["model"])
    model = load_original_checkpoint({"model": ckpt["model"]})
    assert model.config.backbone == "resnet18"


def test_overrides_and_freeze_anchor_xy_load():
    model = load_original_checkpoint(_fixture_ckpt(), freeze_anchor_xy=True)
    d = load_fixture()
    assert torch.equal(model.refpoint_embed(), d["state_dict"]["refpoint_embed.weight"].float())
    assert "refpoint_embed.weight_xy" in dict(model.named_buffers())


def test_missing_key_is_named():
    ckpt = _fixture_ckpt()
    sd = dict(ckpt["model"])
    del sd["transformer.decoder.layers.1.ca_kpos_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing key.*transformer\.decoder\.layers\.1\.ca_kpos_proj\.weight"):
        load_original_checkpoint({"model": sd, "args": ckpt["args"]})


def test_unexpected_key_is_named():
    ckpt = _fixture_ckpt()
    sd = dict(ckpt["model"])
    sd["transformer.decoder.layers.1.ca_qpos_proj.weight"] = torch.zeros(256, 256)
    with pytest.raises(CheckpointError, match=r"unexpected key.*layers\.1\.ca_qpos_proj\.weight"):
        load_original_checkpoint({"model": sd, "args": ckpt["args"]})


def test_wrong_shape_is_named():
    ckpt = _fixture_ckpt()
    sd = dict(ckpt["model"])
    sd["input_proj.weight"] = torch.zeros(256, 256, 1, 1)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*input_proj\.weight.*\(256, 256, 1, 1\).*\(256, 512, 1, 1\)"):
        load_original_checkpoint({"model": sd, "args": ckpt["args"]})
    # args that disagree with the weights
    args = dict(ckpt["args"], dim_feedforward=2048)
    with pytest.raises(CheckpointError, match=r"linear1\.weight"):
        load_original_checkpoint({"model": ckpt["model"], "args": args})


def test_diverging_shared_box_mlp_is_refused():
    ckpt = _fixture_ckpt()
    sd = dict(ckpt["model"])
    sd["transformer.decoder.bbox_embed.layers.0.bias"] = sd["bbox_embed.layers.0.bias"] + 1
    with pytest.raises(CheckpointError, match="bbox_embed"):
        load_original_checkpoint({"model": sd, "args": ckpt["args"]})


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_original_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_original_checkpoint(tmp_path / "garbage.pth")
    with pytest.raises(CheckpointError, match="args"):
        load_original_checkpoint({"model": _fixture_ckpt()["model"], "args": 3})


_EXECUTED = []


def _side_effect():
    _EXECUTED.append(True)
    return {}


class _Evil:
    def __reduce__(self):
        return (_side_effect, ())


class _Custom:
    pass


def test_pickle_needing_a_non_allow_listed_class_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match=r"_side_effect.*not on the allow-list"):
        load_original_checkpoint(path)
    assert not _EXECUTED, "untrusted code ran while loading"
    path2 = tmp_path / "custom.pth"
    torch.save({"model": {}, "args": _Custom()}, path2)
    with pytest.raises(CheckpointError, match=r"_Custom"):
        load_original_checkpoint(path2)


def test_hf_state_dict_via_key_map(tmp_path):
    d = load_fixture()
    original = {k: v.float() for k, v in d["state_dict"].items()}
    hf = _to_hf(original)
    assert "model.decoder.layers.0.layer.1.cross_attn_query_pos_proj.weight" in hf
    back = hf_to_original(hf)
    assert set(back) == set(original)
    for k in original:
        assert torch.equal(back[k], original[k]), k
    hf_config = {"use_timm_backbone": True, "backbone": "resnet18", "encoder_layers": 2, "decoder_layers": 3,
                 "encoder_ffn_dim": 256, "decoder_ffn_dim": 256, "d_model": 256, "num_queries": 300,
                 "activation_function": "prelu", "temperature_height": 20, "temperature_width": 20,
                 "dropout": 0.1, "num_labels": 91}
    model = load_hf_checkpoint(hf, hf_config)
    assert model.config.inverse_sigmoid_eps == 1e-5
    ref = load_original_checkpoint(_fixture_ckpt())
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    # saved HF layout: weights file + config.json in a folder (shared box MLP stored once)
    hf.pop("model.decoder.bbox_embed.layers.0.weight")
    torch.save(hf, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    model2 = load_hf_checkpoint(tmp_path)
    assert torch.equal(model2.bbox_embed.layers[0].weight, ref.bbox_embed.layers[0].weight)
    # a key that is not DAB-DETR's
    with pytest.raises(CheckpointError, match="model.decoder.foo"):
        hf_to_original({**_to_hf(original), "model.decoder.foo.weight": torch.zeros(1)})


def test_convert_and_reload_our_format(tmp_path):
    d = load_fixture()
    src = tmp_path / "checkpoint.pth"
    torch.save({"model": d["state_dict"], "args": argparse.Namespace(**d["args"])}, src)
    dst = tmp_path / "converted.pt"
    model = convert_checkpoint(src, dst)
    raw = torch.load(dst, weights_only=True)  # plain types: no allow-list needed
    assert raw["format"] == "dabdetr-v1" and raw["source"] == "original"
    assert not any(k.startswith("transformer.decoder.bbox_embed") for k in raw["model"])
    again = load_checkpoint(dst, backend="torch")
    assert again.config == model.config.replace(backend="torch")
    for (k, a), b in zip(again.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    # load_checkpoint also takes original checkpoints
    assert load_checkpoint(src).config == model.config


def test_save_load_small_model_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = DABDETR(small_config(num_patterns=2, freeze_anchor_xy=True))
    save_checkpoint(model, tmp_path / "m.pt", epoch=3)
    again = load_checkpoint(tmp_path / "m.pt")
    assert again.config.num_patterns == 2 and again.config.freeze_anchor_xy
    for (k, a), b in zip(again.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
