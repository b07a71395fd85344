"""DAB-DETR transformer: encoder with the conditionally rescaled image PE, and the DAB decoder.

Faithful to the original ``models/DAB_DETR/transformer.py`` (REFERENCE.md §2-§4), with two layout
changes that do not change the math: tensors are batch-first (``[B, N, C]``) inside, and attention
runs through ``F.scaled_dot_product_attention`` (self-attention; on the CPU the cross-attention's
kernel, see ``_attention``) and :func:`dabdetr.ops.content_position_attention` (the decoder's split
cross-attention). Parameter names
are the original's (``sa_qcontent_proj``, ``ca_kpos_proj``, ``self_attn.in_proj_weight`` ...), so the
original checkpoints load with an identity key map.

Every ``dabdetr.ops`` call gets ``backend=self.backend``: ``"torch"`` is the eager reference,
``"cpu"`` / ``"cuda"`` / ``"triton"`` the fused kernels, ``None`` the automatic choice.

Intermediates: pass a dict as ``rec`` and every module appends the tensors the parity fixture names
(batch-first here; the fixture stores the transformer's tensors sequence-first).
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import _dispatch
from . import activations
from .box_ops import at_least_float32, inverse_sigmoid

__all__ = ["MLP", "TransformerEncoderLayer", "TransformerEncoder", "TransformerDecoderLayer",
           "TransformerDecoder", "Transformer", "build_activation"]

Rec = Optional[Dict[str, list]]


def _put(rec: Rec, key: str, value: Tensor) -> None:
    if rec is not None:
        rec.setdefault(key, []).append(value.detach())


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = activations.relu(x)  # F.relu (on the CPU with an opaque backward under torch.compile)
        return x


class _ScalarPReLUCPU(torch.autograd.Function):
    """``F.prelu`` with one slope ``a``, whose backward is built from vectorised CPU kernels:
    ``grad_x = lerp(threshold_backward(g, x, 0), g, a)`` (``g`` where ``x > 0``, else ``a g``) and
    ``grad_a = sum(min(x, 0) g)``. torch's own CPU backward (``_prelu_kernel_backward``) is a scalar
    loop that also writes a per-element slope gradient before summing it. On this project's 2-core
    AVX2 EPYC, float32, the profiler in an FFN block (linear1, PReLU, linear2, forward+backward):
    9.3-11.3 ms per backward at ``[1050, 2048]`` (the R50 encoder at 800x1333) against 5.4-6.6 ms
    here, most of it first-touch page faults of the fresh temporaries; alone, allocator warm, 4.5 vs
    0.8 ms at ``[600, 2048]``. The same values: ``grad_x`` bitwise for slopes below 0.5 (``lerp``
    then computes ``start + a (end - start)``, i.e. ``a g``), ``grad_a`` the same products summed by
    the same reduction (bitwise for contiguous inputs)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return F.prelu(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.lerp(torch.ops.aten.threshold_backward(grad, x, 0), grad, weight.reshape(()))
        if ctx.needs_input_grad[1]:
            grad_w = x.clamp(max=0).mul_(grad).sum().reshape(weight.shape)
        return grad_x, grad_w


class PReLU(nn.PReLU):
    """``nn.PReLU`` (same parameter, same state-dict key) with a faster backward on the CPU for the
    fused backends (:class:`_ScalarPReLUCPU`: one slope, float32/float64); ``backend="torch"``,
    other devices and dtypes (autocast) run ``F.prelu`` as the original does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend: Optional[str] = None  # set for the whole model by DABDETR.set_backend

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (self.backend != "torch" and w.numel() == 1 and x.device.type == "cpu" and x.dtype == w.dtype
                and x.dtype in (torch.float32, torch.float64)):
            return _ScalarPReLUCPU.apply(x, w)
        return F.prelu(x, w)


def build_activation(name: str) -> nn.Module:
    """The original's ``_get_activation_fn`` (``glu`` changes widths and is not supported); PReLU is
    :class:`PReLU` (the original's ``nn.PReLU``, a faster CPU backward for the fused backends)."""
    table = {"relu": nn.ReLU, "gelu": nn.GELU, "prelu": PReLU, "selu": nn.SELU}
    if name not in table:
        raise ValueError(f"activation should be one of {sorted(table)}, not {name!r}")
    return table[name]()


def _heads(x: Tensor, nhead: int) -> Tensor:
    """``[B, N, C]`` → ``[B, H, N, C/H]``."""
    B, N, C = x.shape
    return x.view(B, N, nhead, C // nhead).transpose(1, 2)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float) -> Tensor:
    """``F.scaled_dot_product_attention`` on ``[B, H, N, d]``; on the CPU, half-precision inputs
    (autocast) are computed in float32 and cast back: torch's CPU flash-attention backward in
    bfloat16 is ~5x slower than in float32 (23 vs 5 ms per demo step on a 2-core Zen 4), and the
    float32 result is the more accurate one."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the float32 inputs back
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                 dropout_p=dropout_p)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def _cpu_kernel_serves(q: Tensor, backend: Optional[str], dropout_p: float, attn_mask: Optional[Tensor]) -> bool:
    """Whether a fused-backend self-attention runs on the CPU kernel of
    :func:`dabdetr.ops.content_position_attention` rather than SDPA: CPU float32/float64 inputs
    without dropout or a general mask (a key padding mask is fine), where that op's automatic (or
    the requested) backend is ``"cpu"``. Measured on a 2-core Zen 4 (float32, 8 heads of 32,
    forward+backward): 26.6 vs 37.7 ms at 1050 tokens (R50's encoder at 800x1333), 3.5 vs 4.4 ms at
    2 x 256, 5.4 vs 6.0 ms at 2 x 300 (the decoder's self-attention)."""
    if q.device.type != "cpu" or dropout_p > 0 or attn_mask is not None or q.shape[-1] < 2:
        return False
    if q.dtype not in (torch.float32, torch.float64) or backend not in (None, "cpu"):
        return False
    try:
        return _dispatch.resolve("content_position_attention", q.device, backend, dtype=q.dtype) == "cpu"
    except ops.BackendError:
        return False


def _attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
               backend: Optional[str], key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Multi-head attention on ``[B, H, N, d]``; ``attn_mask`` bool ``[B|1, 1, Nq, Nk]`` (True = may
    attend), ``key_padding_mask`` bool ``[B, Nk]`` (True = padding, DETR's convention).
    ``backend="torch"``: the original's computation (``nn.MultiheadAttention`` with its default
    ``need_weights=True``: the scaled logits, masked, softmax, dropout, the weighted sum, with the
    probabilities materialised). Any other backend: on the CPU where :func:`_cpu_kernel_serves`,
    the content/position attention kernel with the head split in two halves (``q·k = q[:h]·k[:h] +
    q[h:]·k[h:]``, the same logits), else SDPA (:func:`_sdpa`). Rows whose keys are all padding
    give zeros from the kernel (NaN from the other two)."""
    if backend != "torch" and _cpu_kernel_serves(q, backend, dropout_p, attn_mask):
        # the backend is resolved (DABDETR_BACKEND included): the op gets "cpu", not a second choice
        d = q.shape[-1]
        h = d // 2
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, N, H, d] views
        out = ops.content_position_attention(qt[..., :h], qt[..., h:], kt[..., :h], kt[..., h:], vt,
                                             key_padding_mask=key_padding_mask, scale=d ** -0.5, backend="cpu")
        return out.transpose(1, 2)
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
        attn_mask = keep if attn_mask is None else attn_mask & keep
    if backend != "torch":
        return _sdpa(q, k, v, attn_mask, dropout_p)
    logits = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf"))
    probs = F.dropout(logits.softmax(-1), dropout_p) if dropout_p > 0 else logits.softmax(-1)
    return torch.matmul(probs, v)


def _linear_cat(x: Tensor, layers: Sequence[nn.Linear]) -> List[Tensor]:
    """``[layer(x) for layer in layers]`` from one GEMM (the weights side by side; the outputs are
    column slices of its result)."""
    w = torch.cat([m.weight for m in layers])
    b = torch.cat([m.bias for m in layers])
    return list(F.linear(x, w, b).split([m.out_features for m in layers], dim=-1))


def _merge(x: Tensor) -> Tensor:
    """``[B, H, N, d]`` → ``[B, N, H*d]``."""
    B, H, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, H * d)


class EncoderSelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (``in_proj_weight`` rows q | k | v, ``out_proj``); q and
    k share their input (``src + pos``), v gets ``src``. Fused backends: q and k from one GEMM;
    ``backend="torch"``: the original's per-projection GEMMs; the attention: :func:`_attention`."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"hidden_dim {d_model} must be divisible by nheads {nhead}")
        self.d_model, self.nhead, self.dropout = d_model, nhead, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        self.backend: Optional[str] = None  # set for the whole model by DABDETR.set_backend

    def forward(self, qk: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        d = self.d_model
        w, b = self.in_proj_weight, self.in_proj_bias
        if self.backend == "torch":
            q = F.linear(qk, w[:d], b[:d])
            k = F.linear(qk, w[d:2 * d], b[d:2 * d])
        else:
            q, k = F.linear(qk, w[:2 * d], b[:2 * d]).split(d, dim=-1)
        v = F.linear(v, w[2 * d:], b[2 * d:])
        out = _attention(_heads(q, self.nhead), _heads(k, self.nhead), _heads(v, self.nhead), None,
                         self.dropout if self.training else 0.0, self.backend, key_padding_mask)
        return self.out_proj(_merge(out))


class OutProjOnly(nn.Module):
    """The original decoder's attention modules have no input projection, only ``out_proj``."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(x)


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: ``q = k = src + pos_l``, ``v = src``; FFN with ``activation``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.0,
                 activation: str = "prelu"):
        super().__init__()
        self.self_attn = EncoderSelfAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = build_activation(activation)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        src2 = self.self_attn(src + pos, src, key_padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class TransformerEncoder(nn.Module):
    """Encoder; before each layer the image PE is rescaled element-wise by ``query_scale`` (one MLP
    shared by all layers) of that layer's input. No final norm (post-norm model)."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Optional[Tensor], rec: Rec = None) -> Tensor:
        out = src
        for layer in self.layers:
            pos_scales = self.query_scale(out)
            _put(rec, "enc_pos_scales", pos_scales)
            out = layer(out, pos * pos_scales, key_padding_mask)
            _put(rec, "enc_layer_out", out)
        return out


class TransformerDecoderLayer(nn.Module):
    """DAB-DETR decoder layer (REFERENCE.md §4), post-norm.

    Self-attention over the queries with separately projected content/position parts (8 heads,
    scale 1/sqrt(d/H)); split cross-attention ``softmax((q_c·k_c + q_s·k_p)/sqrt(2d/H)) v`` through
    :func:`dabdetr.ops.content_position_attention`; FFN. ``ca_qpos_proj`` exists in the first layer
    only (``keep_query_pos=False``), where the positional query/key are also added to the content
    parts.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.0,
                 activation: str = "prelu", is_first: bool = False, backend: Optional[str] = None):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"hidden_dim {d_model} must be divisible by nheads {nhead}")
        self.d_model, self.nhead, self.attn_dropout = d_model, nhead, dropout
        self.is_first = is_first
        self.backend = backend
        # self-attention
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = OutProjOnly(d_model)
        # cross-attention
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if is_first else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = OutProjOnly(d_model)
        # FFN
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = build_activation(activation)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, query_sine_embed: Tensor,
                memory_key_padding_mask: Optional[Tensor], rec: Rec = None,
                self_attn_mask: Optional[Tensor] = None,
                key_side: Optional[Tuple[Tensor, Tensor, Tensor]] = None, zero_content: bool = False) -> Tensor:
        """``self_attn_mask``: optional ``[B|1, 1, Q, Q]`` bool (True = may attend), the query
        denoising groups' mask (:mod:`dabdetr.models.denoising`). ``key_side``: this layer's
        ``(ca_kcontent_proj(memory), ca_v_proj(memory), ca_kpos_proj(pos))`` when already computed
        (:meth:`TransformerDecoder.key_side_projections`). ``zero_content``: the caller vouches that
        ``tgt`` is all zeros (the fused backends then take :meth:`_zero_content_self_attention`)."""
        p = self.attn_dropout if self.training else 0.0
        _put(rec, "dec_layer_in", tgt)
        # ---- self-attention
        if zero_content and self.backend != "torch" and self_attn_mask is None and p == 0.0:
            tgt2 = self._zero_content_self_attention(tgt)
        else:
            tgt2 = self._self_attention(tgt, query_pos, self_attn_mask, p)
        _put(rec, "dec_self_attn_out", tgt2)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        return self._cross_attention_and_ffn(tgt, memory, pos, query_pos, query_sine_embed, memory_key_padding_mask,
                                             rec, key_side, p)

    def _zero_content_self_attention(self, tgt: Tensor) -> Tensor:
        """The self-attention's output when every content query is zero (the first layer without
        patterns or denoising queries, REFERENCE.md): every value row is ``sa_v_proj(0)``, its bias,
        and each softmax row sums to one, so the output is ``out_proj(sa_v_proj.bias)`` for every
        query, whatever the logits (with attention dropout or a mask it is not: the caller checks).
        That skips the five projections, the attention and all but one row of ``out_proj``,
        forward and backward.
        Gradients are the original's in exact arithmetic: ``sa_v_proj.weight`` and the q/k
        projections get zeros (the original's rounding leaves ~1e-9 on the positional ones), added
        explicitly so every parameter still takes part in the graph (DDP without
        ``find_unused_parameters``, gradient clipping and the optimizers see the same set)."""
        unused = (self.sa_qcontent_proj, self.sa_kcontent_proj, self.sa_qpos_proj, self.sa_kpos_proj)
        zero = self.sa_v_proj.weight.sum() + sum(m.weight.sum() + m.bias.sum() for m in unused)
        out = self.self_attn((self.sa_v_proj.bias + 0.0 * zero).to(tgt.dtype))
        return out.expand(tgt.shape)

    def _self_attention(self, tgt: Tensor, query_pos: Tensor, self_attn_mask: Optional[Tensor], p: float) -> Tensor:
        """The self-attention's output (after ``out_proj``, before the residual and ``norm1``)."""
        H = self.nhead
        if self.backend == "torch":  # the original: five projections
            q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
            k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
            v = self.sa_v_proj(tgt)
        else:  # the same from two GEMMs: [q_c | k_c | v](tgt) and [q_p | k_p](query_pos)
            q, k, v = _linear_cat(tgt, (self.sa_qcontent_proj, self.sa_kcontent_proj, self.sa_v_proj))
            qp, kp = _linear_cat(query_pos, (self.sa_qpos_proj, self.sa_kpos_proj))
            q, k = q + qp, k + kp
        sa = _attention(_heads(q, H), _heads(k, H), _heads(v, H), self_attn_mask, p, self.backend)
        return self.self_attn(_merge(sa))

    def _cross_attention_and_ffn(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                                 query_sine_embed: Tensor, memory_key_padding_mask: Optional[Tensor], rec: Rec,
                                 key_side: Optional[Tuple[Tensor, Tensor, Tensor]], p: float) -> Tensor:
        H = self.nhead
        # ---- cross-attention
        B, Q, d = tgt.shape
        HW = memory.shape[1]
        q_content = self.ca_qcontent_proj(tgt)
        if key_side is None:
            k_content, value, k_pos = self.ca_kcontent_proj(memory), self.ca_v_proj(memory), self.ca_kpos_proj(pos)
        else:
            k_content, value, k_pos = key_side
        if self.ca_qpos_proj is not None:
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        q_pos = self.ca_qpos_sine_proj(query_sine_embed)
        dh = d // H
        args = (q_content.view(B, Q, H, dh), q_pos.view(B, Q, H, dh), k_content.view(B, HW, H, dh),
                k_pos.view(B, HW, H, dh), value.view(B, HW, H, dh))
        out = ops.content_position_attention(*args, key_padding_mask=memory_key_padding_mask, dropout_p=p,
                                             backend=self.backend)
        out = out.reshape(B, Q, d)
        if rec is not None:
            for name, t in zip(("dec_ca_q_content", "dec_ca_q_pos", "dec_ca_k_content", "dec_ca_k_pos", "dec_ca_v"),
                               (q_content, q_pos, k_content, k_pos, value)):
                _put(rec, name, t)
            if memory_key_padding_mask is not None:
                _put(rec, "dec_ca_key_padding_mask", memory_key_padding_mask)
            _put(rec, "dec_ca_out_before_proj", out)
            _put(rec, "dec_cross_attn_weights", _head_averaged_weights(*args[:4], memory_key_padding_mask))
        tgt2 = self.cross_attn(out)
        _put(rec, "dec_cross_attn_out", tgt2)
        tgt = self.norm2(tgt + self.dropout2(tgt2))

        # ---- FFN
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


@torch.no_grad()
def _head_averaged_weights(qc: Tensor, qp: Tensor, kc: Tensor, kp: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Head-averaged cross-attention probabilities ``[B, Nq, Nk]`` (for inspection only)."""
    scale = (qc.shape[-1] + qp.shape[-1]) ** -0.5
    logits = (torch.einsum("bqhd,bkhd->bhqk", qc, kc) + torch.einsum("bqhd,bkhd->bhqk", qp, kp)) * scale
    if mask is not None:
        logits = logits.masked_fill(mask[:, None, None, :], float("-inf"))
    return logits.float().softmax(-1).mean(1)


class TransformerDecoder(nn.Module):
    """The DAB decoder loop (REFERENCE.md §3): per layer, the anchor sine embedding →
    ``ref_point_head`` (query position), the conditional scale ``query_scale(content)`` (layers ≥ 1),
    the w/h modulation by ``sigmoid(ref_anchor_head(content))``, the layer, then the anchor update
    ``sigmoid(bbox_embed(out) + inverse_sigmoid(anchor))`` (kept with its gradient for the returned
    references; detached for the next layer). The shared ``bbox_embed`` is passed in by the model (it
    is not registered here, so it appears once in the state dict)."""

    def __init__(self, d_model: int, nhead: int, num_layers: int, dim_feedforward: int, dropout: float,
                 activation: str, query_temperature: float = 10000.0, inverse_sigmoid_eps: float = 1e-3,
                 backend: Optional[str] = None):
        super().__init__()
        self.d_model = d_model
        self.num_layers = num_layers
        self.query_temperature = float(query_temperature)
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        self.backend = backend
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, is_first=(i == 0),
                                    backend=backend)
            for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2)

    def key_side_projections(self, memory: Tensor, pos: Tensor) -> List[Tuple[Tensor, Tensor, Tensor]]:
        """Every layer's ``(ca_kcontent_proj(memory), ca_v_proj(memory), ca_kpos_proj(pos))`` from
        two GEMMs instead of ``3 L`` (memory and pos are the same for every layer): the layers'
        weights side by side, the outputs column slices (the attention op reads strided rows). In
        the backward, the gradient of ``memory`` is one GEMM too, instead of ``2 L`` GEMMs and
        ``2 L - 1`` additions. The same function, up to float rounding."""
        mem = _linear_cat(memory, [m for layer in self.layers for m in (layer.ca_kcontent_proj, layer.ca_v_proj)])
        pe = _linear_cat(pos, [layer.ca_kpos_proj for layer in self.layers])
        return [(mem[2 * i], mem[2 * i + 1], pe[i]) for i in range(len(self.layers))]

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, refpoints_unsigmoid: Tensor,
                memory_key_padding_mask: Optional[Tensor], bbox_embed: nn.Module,
                rec: Rec = None, self_attn_mask: Optional[Tensor] = None,
                tgt_is_zero: bool = False) -> Tuple[Tensor, Tensor]:
        """``tgt [B,Q,d]``, ``memory``/``pos [B,HW,d]``, ``refpoints_unsigmoid [B,Q,4]`` →
        ``hs [L,B,Q,d]`` (decoder-normed outputs), ``references [L,B,Q,4]`` (float32).
        ``tgt_is_zero``: ``tgt`` is all zeros (no patterns, no denoising queries): the first layer's
        self-attention is then a constant (:meth:`TransformerDecoderLayer._zero_content_self_attention`)."""
        F_ = self.d_model // 2
        T = self.query_temperature
        eps = self.inverse_sigmoid_eps
        output = tgt
        reference_points = at_least_float32(refpoints_unsigmoid).sigmoid()
        refs: List[Tensor] = [reference_points]
        intermediate: List[Tensor] = []
        # fused backends: the key-side projections of all layers at once (backend "torch" keeps the
        # original's per-layer projections)
        key_side = self.key_side_projections(memory, pos) if self.backend != "torch" else None
        for lid, layer in enumerate(self.layers):
            anchors = reference_points
            sine = ops.sine_embed(anchors, num_feats=F_, temperature=T, backend=self.backend)  # [B,Q,2d] (y,x,w,h)
            query_pos = self.ref_point_head(sine)
            pos_scale = None if lid == 0 else self.query_scale(output)
            ref_hw_logits = self.ref_anchor_head(output)
            ref_wh = ref_hw_logits.sigmoid()
            # one dtype for the op's inputs (under autocast the op itself casts them to the autocast dtype)
            qse = ops.modulated_sine_query(anchors, ref_wh.to(anchors.dtype),
                                           None if pos_scale is None else pos_scale.to(anchors.dtype),
                                           num_feats=F_, temperature=T, backend=self.backend)
            if rec is not None:
                _put(rec, "dec_query_sine_embed_raw", sine)
                _put(rec, "dec_query_pos", query_pos)
                if pos_scale is not None:
                    _put(rec, "dec_query_scale_out", pos_scale)
                _put(rec, "dec_ref_anchor_head_out", ref_hw_logits)
                _put(rec, "dec_query_sine_embed", qse)
            output = layer(output, memory, pos, query_pos, qse, memory_key_padding_mask, rec, self_attn_mask,
                           None if key_side is None else key_side[lid], zero_content=tgt_is_zero and lid == 0)
            _put(rec, "dec_layer_out", output)
            # anchor update on the un-normalised output, in float32 (float64 for a float64 model)
            delta = at_least_float32(bbox_embed(output))
            _put(rec, "dec_bbox_embed_in_loop_out", delta)
            new_ref = (delta + inverse_sigmoid(reference_points, eps)).sigmoid()
            if lid != self.num_layers - 1:
                refs.append(new_ref)
            reference_points = new_ref.detach()
            intermediate.append(self.norm(output))
        return torch.stack(intermediate), torch.stack(refs)


class Transformer(nn.Module):
    """Encoder + decoder + (optional) pattern embeddings.

    ``num_patterns = P > 0``: decoder query ``p*nq + a`` has content ``patterns.weight[p]`` and anchor
    ``a`` (pattern-major order, as the original); ``P = 0``: zero content, one query per anchor.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.0,
                 activation: str = "prelu", num_patterns: int = 0, query_temperature: float = 10000.0,
                 inverse_sigmoid_eps: float = 1e-3, backend: Optional[str] = None):
        super().__init__()
        self.d_model, self.nhead = d_model, nhead
        enc_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation)
        self.encoder = TransformerEncoder(enc_layer, num_encoder_layers, d_model)
        self.decoder = TransformerDecoder(d_model, nhead, num_decoder_layers, dim_feedforward, dropout, activation,
                                          query_temperature, inverse_sigmoid_eps, backend)
        self._reset_parameters()
        self.num_patterns = num_patterns
        if num_patterns > 0:
            self.patterns = nn.Embedding(num_patterns, d_model)

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, refpoint_embed, pos_embed: Tensor, bbox_embed: nn.Module,
                rec: Rec = None, dn=None, return_memory: bool = False):
        """``src``/``pos_embed [B,d,h,w]``, ``mask [B,h,w]``, ``refpoint_embed [nq,4]`` (logits) →
        ``hs [L,B,Q,d]``, ``references [L,B,Q,4]``. ``dn``: optional
        :class:`~dabdetr.models.denoising.DenoisingQueries`, put before the matching queries (then
        ``Q = dn.num_queries + nq``). ``return_memory``: also return the encoder output ``[B,HW,d]``.
        ``refpoint_embed`` may also be per image, ``[B,nq,4]``, or a callable ``memory -> [B,nq,4]``
        (anchors chosen from the encoder output: query selection)."""
        B = src.shape[0]
        src = src.flatten(2).transpose(1, 2)  # [B,HW,d]
        pos = pos_embed.flatten(2).transpose(1, 2)
        key_padding_mask = mask.flatten(1)
        memory = self.encoder(src, pos, key_padding_mask, rec)
        if rec is not None:
            rec["memory"] = [memory.detach()]
        if callable(refpoint_embed):
            refpoint_embed = refpoint_embed(memory)
        if refpoint_embed.dim() == 2:
            refpoint_embed = refpoint_embed[None].expand(B, -1, -1)
        nq = refpoint_embed.shape[1]
        if self.num_patterns > 0:
            tgt = self.patterns.weight[:, None, :].expand(self.num_patterns, nq, self.d_model).reshape(-1, self.d_model)
            tgt = tgt[None].expand(B, -1, -1)
            refpoints = refpoint_embed.repeat(1, self.num_patterns, 1)
        else:
            tgt = memory.new_zeros(B, nq, self.d_model)
            refpoints = refpoint_embed
        attn_mask = None
        tgt_is_zero = self.num_patterns == 0 and dn is None
        if dn is not None:
            tgt = torch.cat([dn.content.to(tgt.dtype), tgt], 1)
            refpoints = torch.cat([dn.anchors.to(refpoints.dtype), refpoints], 1)
            attn_mask = dn.self_attn_mask
        hs, references = self.decoder(tgt, memory, pos, refpoints, key_padding_mask, bbox_embed, rec, attn_mask,
                                      tgt_is_zero=tgt_is_zero)
        return (hs, references, memory) if return_memory else (hs, references)
