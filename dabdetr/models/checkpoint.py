"""Checkpoints: the original repository's ``checkpoint.pth``, HuggingFace ``dab_detr`` state dicts,
and our own format, all read with ``torch.load(weights_only=True)``.

* Original: ``{"model": state_dict, "args": argparse.Namespace | dict, ...}``. Only
  ``argparse.Namespace`` is allow-listed for unpickling; anything else that needs a class is refused
  with an error naming that class. Our parameter names are the original's, except that the shared box
  MLP is stored once (``bbox_embed.*``; the original also stores it as
  ``transformer.decoder.bbox_embed.*``).
* HuggingFace: ``model.safetensors`` / ``pytorch_model.bin`` state dict + ``config.json``; mapped
  to the original names by :data:`HF_TO_ORIGINAL` (the inverse of HF's converter), eps 1e-5.
* Ours: ``{"format": "dabdetr-v1", "config": DABDETRConfig.to_dict(), "model": state_dict}``,
  written by :func:`convert_checkpoint` / :func:`save_checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from .dab_detr import DABDETR
from .presets import DABDETRConfig

__all__ = [
    "CheckpointError",
    "safe_load",
    "config_from_original_args",
    "original_to_ours",
    "load_original_checkpoint",
    "hf_to_original",
    "config_from_hf",
    "load_hf_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "convert_checkpoint",
    "FORMAT",
]

FORMAT = "dabdetr-v1"
PathOrDict = Union[str, "os.PathLike[str]", Mapping[str, Any]]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# ------------------------------------------------------------------------------------------ loading
def safe_load(path: Union[str, "os.PathLike[str]"]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with only ``argparse.Namespace``
    allow-listed. Never unpickles anything else."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        m = re.search(r"(?:Unsupported global|GLOBAL)[:\s]*(?:GLOBAL\s+)?([\w.]+)", msg)
        what = f"the class or function {m.group(1)!r}" if m else "an object that is not allow-listed"
        detail = next((ln.strip() for ln in msg.splitlines() if "WeightsUnpickler error" in ln),
                      msg.splitlines()[0] if msg else "")
        raise CheckpointError(
            f"refusing to load {path}: it needs {what}, which is not on the allow-list (only tensors, "
            f"plain containers and argparse.Namespace are accepted; nothing is unpickled with "
            f"weights_only=False). Re-save the checkpoint with plain types. ({detail})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None


def _as_dict(args: Any) -> Dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, Mapping):
        return dict(args)
    raise CheckpointError(f"checkpoint 'args' must be an argparse.Namespace or a dict, got {type(args).__name__}")


def _split_checkpoint(obj: Any) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """``(state_dict, args)`` of an original checkpoint (or of the parity fixture's layout)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint must be a dict, got {type(obj).__name__}")
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key]), _as_dict(obj.get("args"))
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj), {}
    raise CheckpointError(f"no state dict in checkpoint (expected a 'model' entry); keys: {sorted(obj)[:10]}")


def config_from_original_args(args: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> DABDETRConfig:
    """Our config from the original's command-line ``args`` (missing entries take the original's
    defaults); the class count comes from ``class_embed.weight``'s shape."""
    a = dict(args)
    if "class_embed.weight" not in state_dict:
        raise CheckpointError("state dict has no 'class_embed.weight' (is this a DAB-DETR checkpoint?)")
    backbone = a.get("backbone", "resnet50")
    if backbone not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise CheckpointError(f"unsupported backbone {backbone!r} in checkpoint args (ResNet-18/34/50/101 only)")
    if a.get("masks", False):
        raise CheckpointError("segmentation checkpoints (--masks) are not supported")
    if a.get("position_embedding", "sine") not in ("sine", "v2", "v3"):
        raise CheckpointError(f"position_embedding {a.get('position_embedding')!r} is not supported (sine only)")
    nq = int(a.get("num_queries", 300))
    if "refpoint_embed.weight" in state_dict and state_dict["refpoint_embed.weight"].shape[0] != nq:
        nq = int(state_dict["refpoint_embed.weight"].shape[0])
    return DABDETRConfig(
        backbone=backbone,
        dilation=bool(a.get("dilation", False)),
        train_backbone=float(a.get("lr_backbone", 1e-5)) > 0,
        pe_temperature_h=float(a.get("pe_temperatureH", 20)),
        pe_temperature_w=float(a.get("pe_temperatureW", 20)),
        hidden_dim=int(a.get("hidden_dim", 256)),
        nheads=int(a.get("nheads", 8)),
        enc_layers=int(a.get("enc_layers", 6)),
        dec_layers=int(a.get("dec_layers", 6)),
        dim_feedforward=int(a.get("dim_feedforward", 2048)),
        dropout=float(a.get("dropout", 0.0)),
        activation=str(a.get("transformer_activation", "prelu")),
        num_queries=nq,
        num_patterns=int(a.get("num_patterns", 0)),
        random_refpoints_xy=bool(a.get("random_refpoints_xy", False)),
        num_classes=int(state_dict["class_embed.weight"].shape[0]),
        aux_loss=bool(a.get("aux_loss", True)),
        num_select=int(a.get("num_select", 300)),
        set_cost_class=float(a.get("set_cost_class", 2)),
        set_cost_bbox=float(a.get("set_cost_bbox", 5)),
        set_cost_giou=float(a.get("set_cost_giou", 2)),
        cls_loss_coef=float(a.get("cls_loss_coef", 1)),
        bbox_loss_coef=float(a.get("bbox_loss_coef", 5)),
        giou_loss_coef=float(a.get("giou_loss_coef", 2)),
        focal_alpha=float(a.get("focal_alpha", 0.25)),
    )


def _infer_args(state_dict: Mapping[str, Tensor]) -> Dict[str, Any]:
    """Architecture read from the state dict alone (when a checkpoint has no ``args``). nheads,
    dilation and the PE temperatures cannot be read from weights: they keep the defaults."""
    def count(prefix: str) -> int:
        idx = {int(m.group(1)) for k in state_dict for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
        return max(idx) + 1 if idx else 0

    a: Dict[str, Any] = {}
    if "input_proj.weight" in state_dict:
        a["hidden_dim"] = int(state_dict["input_proj.weight"].shape[0])
    a["enc_layers"] = count("transformer.encoder.layers.")
    a["dec_layers"] = count("transformer.decoder.layers.")
    if "transformer.encoder.layers.0.linear1.weight" in state_dict:
        a["dim_feedforward"] = int(state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0])
    if "transformer.patterns.weight" in state_dict:
        a["num_patterns"] = int(state_dict["transformer.patterns.weight"].shape[0])
    a["transformer_activation"] = "prelu" if "transformer.encoder.layers.0.activation.weight" in state_dict else "relu"
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state_dict
    blocks = tuple(count(f"backbone.0.body.layer{i}.") for i in range(1, 5))
    from .backbone import RESNET_SPECS

    for name, (block, layers) in RESNET_SPECS.items():
        if tuple(layers) == blocks and (block.expansion == 4) == bottleneck:
            a["backbone"] = name
    return a


def original_to_ours(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Map original key names to ours (floats cast to float32). ``transformer.decoder.bbox_embed.*``
    must equal ``bbox_embed.*`` (the original stores one shared module twice) and is dropped."""
    out: Dict[str, Tensor] = {}
    dup = "transformer.decoder.bbox_embed."
    for k, v in state_dict.items():
        if not isinstance(v, Tensor):
            raise CheckpointError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        if v.is_floating_point():
            v = v.float()
        if k.startswith(dup):
            twin = "bbox_embed." + k[len(dup):]
            if twin in state_dict and not torch.equal(state_dict[twin].float(), v):
                raise CheckpointError(f"{k!r} differs from {twin!r}; the decoder's and the head's box MLP must "
                                      f"be the same module")
            if twin not in state_dict:
                out[twin] = v
            continue
        if k.endswith("num_batches_tracked"):
            continue
        out[k] = v
    return out


def _load_into(model: DABDETR, state_dict: Dict[str, Tensor], source: str) -> None:
    """Strict load with errors that list every missing / unexpected / mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {missing[:12]}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {shapes[:8]}{' ...' if len(shapes) > 8 else ''}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model built from its config: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def load_original_checkpoint(path_or_dict: PathOrDict, backend: Optional[str] = None,
                             **overrides: Any) -> DABDETR:
    """A ready :class:`DABDETR` (eval mode) from an original DAB-DETR checkpoint.

    ``path_or_dict``: a ``checkpoint.pth`` path or an already loaded dict with the weights under
    ``model`` (or ``state_dict``) and the command-line ``args`` (``argparse.Namespace`` or dict; if
    absent, the architecture is read from the weights). ``overrides``: config fields to change (e.g.
    ``freeze_anchor_xy=True``)."""
    obj = safe_load(path_or_dict) if not isinstance(path_or_dict, Mapping) else path_or_dict
    source = f"checkpoint {os.fspath(path_or_dict)!r}" if not isinstance(path_or_dict, Mapping) else "checkpoint"
    state_dict, args = _split_checkpoint(obj)
    if not args:
        args = _infer_args(state_dict)
    config = config_from_original_args(args, state_dict)
    if overrides:
        config = config.replace(**overrides)
    if backend is not None:
        config = config.replace(backend=backend)
    model = DABDETR(config)
    _load_into(model, original_to_ours(state_dict), source)
    return model.eval()


# ------------------------------------------------------------------------------------- HuggingFace
# HF name (without the "model." prefix) -> original name; applied in order, first match wins.
HF_TO_ORIGINAL = [
    (r"^backbone\.conv_encoder\.model\.(?:_backbone\.)?(.*)$", r"backbone.0.body.\1"),
    (r"^input_projection\.(.*)$", r"input_proj.\1"),
    (r"^query_refpoint_embeddings\.weight$", r"refpoint_embed.weight"),
    (r"^patterns\.weight$", r"transformer.patterns.weight"),
    (r"^class_embed\.(.*)$", r"class_embed.\1"),
    (r"^bbox_predictor\.(.*)$", r"bbox_embed.\1"),
    (r"^decoder\.bbox_embed\.(.*)$", r"transformer.decoder.bbox_embed.\1"),
    (r"^encoder\.query_scale\.(.*)$", r"transformer.encoder.query_scale.\1"),
    (r"^decoder\.layernorm\.(.*)$", r"transformer.decoder.norm.\1"),
    (r"^decoder\.(ref_point_head|ref_anchor_head|query_scale)\.(.*)$", r"transformer.decoder.\1.\2"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.(.*)$", r"transformer.encoder.layers.\1.self_attn.out_proj.\2"),
    (r"^encoder\.layers\.(\d+)\.fc(\d)\.(.*)$", r"transformer.encoder.layers.\1.linear\2.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(.*)$", r"transformer.encoder.layers.\1.norm1.\2"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(.*)$", r"transformer.encoder.layers.\1.norm2.\2"),
    (r"^encoder\.layers\.(\d+)\.activation_fn\.weight$", r"transformer.encoder.layers.\1.activation.weight"),
    (r"^decoder\.layers\.(\d+)\.layer\.0\.self_attn\.output_proj\.(.*)$",
     r"transformer.decoder.layers.\1.self_attn.out_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.0\.self_attn_query_content_proj\.(.*)$", r"transformer.decoder.layers.\1.sa_qcontent_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.0\.self_attn_key_content_proj\.(.*)$", r"transformer.decoder.layers.\1.sa_kcontent_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.0\.self_attn_query_pos_proj\.(.*)$", r"transformer.decoder.layers.\1.sa_qpos_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.0\.self_attn_key_pos_proj\.(.*)$", r"transformer.decoder.layers.\1.sa_kpos_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.0\.self_attn_value_proj\.(.*)$", r"transformer.decoder.layers.\1.sa_v_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.0\.self_attn_layer_norm\.(.*)$", r"transformer.decoder.layers.\1.norm1.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.1\.cross_attn\.output_proj\.(.*)$",
     r"transformer.decoder.layers.\1.cross_attn.out_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.1\.cross_attn_query_content_proj\.(.*)$", r"transformer.decoder.layers.\1.ca_qcontent_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.1\.cross_attn_query_pos_proj\.(.*)$", r"transformer.decoder.layers.\1.ca_qpos_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.1\.cross_attn_key_content_proj\.(.*)$", r"transformer.decoder.layers.\1.ca_kcontent_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.1\.cross_attn_key_pos_proj\.(.*)$", r"transformer.decoder.layers.\1.ca_kpos_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.1\.cross_attn_value_proj\.(.*)$", r"transformer.decoder.layers.\1.ca_v_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.1\.cross_attn_query_pos_sine_proj\.(.*)$", r"transformer.decoder.layers.\1.ca_qpos_sine_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.1\.cross_attn_layer_norm\.(.*)$", r"transformer.decoder.layers.\1.norm2.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.2\.fc(\d)\.(.*)$", r"transformer.decoder.layers.\1.linear\2.\3"),
    (r"^decoder\.layers\.(\d+)\.layer\.2\.final_layer_norm\.(.*)$", r"transformer.decoder.layers.\1.norm3.\2"),
    (r"^decoder\.layers\.(\d+)\.layer\.2\.activation_fn\.weight$", r"transformer.decoder.layers.\1.activation.weight"),
]
_HF_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$")


def hf_to_original(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """HF ``dab_detr`` key names → the original's (the encoder's q/k/v projections are stacked
    back into ``in_proj_weight/bias``). Unknown keys raise :class:`CheckpointError`."""
    out: Dict[str, Tensor] = {}
    qkv: Dict[Tuple[str, str], Dict[str, Tensor]] = {}
    unknown = []
    for key, v in state_dict.items():
        k = key[len("model."):] if key.startswith("model.") else key
        if k.endswith("num_batches_tracked"):
            continue
        m = _HF_QKV.match(k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        for pat, rep in HF_TO_ORIGINAL:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} key(s) of the HF state dict are not DAB-DETR keys: {unknown[:12]}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"encoder layer {layer}: {kind} of q/k/v projections incomplete ({sorted(parts)})")
        out[f"transformer.encoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def config_from_hf(hf_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> DABDETRConfig:
    """Our config from an HF ``DabDetrConfig`` dict (config.json). ``inverse_sigmoid_eps`` = 1e-5
    (HF's port); num_classes from ``class_embed.weight``."""
    c = dict(hf_config)
    backbone = c.get("backbone") or "resnet50"
    if not c.get("use_timm_backbone", True):
        raise CheckpointError("HF checkpoints with a transformers (AutoBackbone) ResNet are not supported; "
                              "only the timm-backbone layout of the released dab-detr checkpoints")
    if c.get("keep_query_pos", False):
        raise CheckpointError("keep_query_pos=True is not supported (the original model never uses it)")
    if c.get("query_scale_type", "cond_elewise") != "cond_elewise":
        raise CheckpointError(f"query_scale_type {c.get('query_scale_type')!r} is not supported")
    enc_h, dec_h = int(c.get("encoder_attention_heads", 8)), int(c.get("decoder_attention_heads", 8))
    enc_f, dec_f = int(c.get("encoder_ffn_dim", 2048)), int(c.get("decoder_ffn_dim", 2048))
    if enc_h != dec_h or enc_f != dec_f:
        raise CheckpointError("encoder and decoder must share heads and FFN width")
    w = state_dict.get("class_embed.weight")
    num_classes = int(w.shape[0]) if w is not None else int(c.get("num_labels", len(c.get("id2label", {})) or 91))
    return DABDETRConfig(
        backbone=backbone, dilation=bool(c.get("dilation", False)),
        pe_temperature_h=float(c.get("temperature_height", 20)), pe_temperature_w=float(c.get("temperature_width", 20)),
        hidden_dim=int(c.get("d_model", c.get("hidden_size", 256))), nheads=enc_h,
        enc_layers=int(c.get("encoder_layers", 6)), dec_layers=int(c.get("decoder_layers", 6)),
        dim_feedforward=enc_f, dropout=float(c.get("dropout", 0.0)),
        activation=str(c.get("activation_function", "prelu")), num_queries=int(c.get("num_queries", 300)),
        num_patterns=int(c.get("num_patterns", 0)), random_refpoints_xy=bool(c.get("random_refpoints_xy", False)),
        num_classes=num_classes, aux_loss=True, inverse_sigmoid_eps=1e-5,
        set_cost_class=float(c.get("class_cost", 2)), set_cost_bbox=float(c.get("bbox_cost", 5)),
        set_cost_giou=float(c.get("giou_cost", 2)), cls_loss_coef=float(c.get("cls_loss_coefficient", 2)),
        bbox_loss_coef=float(c.get("bbox_loss_coefficient", 5)), giou_loss_coef=float(c.get("giou_loss_coefficient", 2)),
        focal_alpha=float(c.get("focal_alpha", 0.25)),
    )


def _read_hf_state_dict(path: str) -> Dict[str, Tensor]:
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise CheckpointError(f"no model.safetensors or pytorch_model.bin in {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError("reading .safetensors needs the 'safetensors' package "
                                  "(pip install safetensors), or pass the loaded state dict") from None
        return load_file(path)
    obj = safe_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict")
    return dict(obj)


def load_hf_checkpoint(state_dict_or_path: PathOrDict, config: Optional[Union[Mapping[str, Any], str]] = None,
                       backend: Optional[str] = None, **overrides: Any) -> DABDETR:
    """A ready :class:`DABDETR` (eval mode) from HF ``dab_detr`` weights.

    ``state_dict_or_path``: a state dict, a weights file or a model folder (with ``config.json``).
    ``config``: the HF config as a dict or a path to ``config.json`` (default: ``config.json``
    beside the weights). The model uses HF's inverse-sigmoid eps 1e-5."""
    path = None if isinstance(state_dict_or_path, Mapping) else os.fspath(state_dict_or_path)
    sd = dict(state_dict_or_path) if path is None else _read_hf_state_dict(path)
    if config is None and path is not None:
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        config = os.path.join(folder, "config.json")
    if config is None:
        raise CheckpointError("an HF checkpoint needs its config (config.json or a dict)")
    if isinstance(config, (str, os.PathLike)):
        if not os.path.exists(config):
            raise CheckpointError(f"HF config not found: {os.fspath(config)}")
        with open(config) as f:
            config = json.load(f)
    orig = hf_to_original(sd)
    cfg = config_from_hf(config, orig)
    if overrides:
        cfg = cfg.replace(**overrides)
    if backend is not None:
        cfg = cfg.replace(backend=backend)
    model = DABDETR(cfg)
    _load_into(model, original_to_ours(orig), "HF checkpoint")
    return model.eval()


# ------------------------------------------------------------------------------------- our format
def save_checkpoint(model: DABDETR, path: Union[str, "os.PathLike[str]"], **extra: Any) -> None:
    """Write ``{"format", "config", "model"}`` (plain types and tensors only; loadable with
    ``weights_only=True``). Written to a temporary file then renamed (atomic)."""
    obj = {"format": FORMAT, "config": model.config.replace(backend=None).to_dict(),
           "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    path = os.fspath(path)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path_or_dict: PathOrDict, backend: Optional[str] = None, **overrides: Any) -> DABDETR:
    """A :class:`DABDETR` (eval mode) from our format; original checkpoints are detected and
    loaded through :func:`load_original_checkpoint`."""
    obj = safe_load(path_or_dict) if not isinstance(path_or_dict, Mapping) else path_or_dict
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        return load_original_checkpoint(obj, backend=backend, **overrides)
    try:
        cfg = DABDETRConfig.from_dict(obj["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"bad config in checkpoint: {exc}") from None
    if overrides:
        cfg = cfg.replace(**overrides)
    if backend is not None:
        cfg = cfg.replace(backend=backend)
    model = DABDETR(cfg)
    _load_into(model, dict(obj["model"]), "checkpoint")
    return model.eval()


def convert_checkpoint(src: Union[str, "os.PathLike[str]", Mapping[str, Any]], dst: Union[str, "os.PathLike[str]"],
                       source: str = "auto", hf_config: Optional[Union[Mapping[str, Any], str]] = None) -> DABDETR:
    """Convert an original (``source="original"``) or HF (``"hf"``) checkpoint to our format at
    ``dst``; ``"auto"`` picks HF when the keys look like HF's. Returns the loaded model."""
    if source not in ("auto", "original", "hf"):
        raise ValueError(f"source must be 'auto', 'original' or 'hf', got {source!r}")
    if source == "auto":
        if isinstance(src, Mapping):
            keys = list(_split_checkpoint(src)[0]) if ("model" in src or "state_dict" in src) else list(src)
        elif os.path.isdir(os.fspath(src)) or os.fspath(src).endswith(".safetensors"):
            keys = ["model.input_projection.weight"]
        else:
            loaded = safe_load(src)
            src = loaded
            keys = list(_split_checkpoint(loaded)[0]) if ("model" in loaded or "state_dict" in loaded) else list(loaded)
        source = "hf" if any(k.startswith("model.input_projection") or k.startswith("input_projection")
                             for k in keys) else "original"
    model = load_hf_checkpoint(src, hf_config) if source == "hf" else load_original_checkpoint(src)
    save_checkpoint(model, dst, source=source)
    return model
