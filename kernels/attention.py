"""Triton kernels of ``content_position_attention``: flash-style forward and backward.

Per (batch b, head h): ``out = softmax(scale * (q_c k_c^T + q_p k_p^T) + mask) v`` (DESIGN.md op 3,
REFERENCE.md §4/§14), computed from the content and position halves through separate pointers (two
``tl.dot`` per logit tile, accumulated into one fp32 tile): the per-head concatenation of the
original code is never materialised.

Forward (grid: query tiles x B*H): online softmax over key tiles in the log2 domain (logits times
``scale * log2(e)``, ``exp2``), fp32 accumulators, and the logsumexp ``lse = ln sum_k exp(scale *
logit)`` stored per row ([B, H, Nq], float32) for the backward. Keys beyond Nk and padded keys
(``key_padding_mask`` True) get -inf logits. A row whose keys are all padding keeps ``m = -inf`` and
``l = 0``: the kernel then writes zeros and ``lse = -inf`` (the C++ contract; no NaN is ever formed:
the running max is replaced by 0 where it is -inf before subtracting).

Backward (two kernels, no atomics): with ``P = exp(S - lse)`` recomputed from the saved lse,
``dP = dO V^T``, ``delta = rowsum(dO * O)`` and ``dS = P * (dP - delta)``:
  1. ``_attn_bwd_dq_kernel`` (grid: query tiles x B*H) computes ``delta`` of its rows (written to a
     [B, H, Nq] fp32 buffer), then loops over key tiles: ``dQ_c = scale * dS K_c``,
     ``dQ_p = scale * dS K_p``. fp32: ``delta = rowsum(dO * O)``. fp16/bf16: ``delta = sum_j P_ij
     dP_ij`` in a first pass over the key tiles (3 more dots per tile, only in this kernel), because
     ``rowsum(dO * O)`` with O rounded to the half dtype dominated the gradient error of
     ill-conditioned rows (measured in the interpreter: ~1 % of random bf16 cases beyond DESIGN.md's
     "2 x the bf16 reference's error + 1e-3", none with the exact delta).
  2. ``_attn_bwd_dkdv_kernel`` (grid: key tiles x B*H) loops over query tiles, in the transposed
     orientation (``S^T = K Q^T``): ``dV = P^T dO``, ``dK_c = scale * dS^T Q_c``,
     ``dK_p = scale * dS^T Q_p``.
  Why two kernels rather than one kernel with atomic dQ: every gradient is written exactly once
  (deterministic, no fp32 dQ buffer to zero and convert, identical behaviour in the interpreter),
  and the extra cost — recomputing ``Q K^T`` once more — is small at DAB-DETR's head dims (32+32)
  where the kernels are bound by memory traffic and latency, not by tensor-core throughput. The
  ``delta`` precompute rides along in the dQ kernel (it has dO and the row's lse at hand), so the
  backward is two launches. Rows with ``lse = -inf`` (all keys padding) use ``+inf`` instead,
  so that ``P = 0`` there and every gradient of such a row is exactly zero.

Inputs: ``[B, N, H, D]`` with any strides (sequence-first views read in place; the last-dim stride
is an argument too, specialised to 1 by Triton when contiguous). Head dims are padded to power-of-2
blocks >= 16 (``tl.dot``'s minimum) and masked, so odd sizes (e.g. 5) work. fp32 dots use
``input_precision="ieee"`` (no TF32, DESIGN.md); fp16/bf16 tiles go to the tensor cores in their
dtype with fp32 accumulation, P / dS cast to the input dtype for the second dot (FlashAttention-2
practice). Under the interpreter half tiles are upcast to fp32 before every ``tl.dot`` (bf16
``tl.dot`` is wrong in the interpreter, triton-lang/triton#11584).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, autotune, check_dtype, config, device_of, dot_block, kernel_dtype, to_dtype, wrap_triton

LOG2E = 1.4426950408889634

# Largest head dim (each of Dc, Dp, Dv) the GPU kernels take (the configs below are sized for it).
MAX_HEAD_DIM = 64

# Autotuning configs for A100 / H100 (sm_80 / sm_90): four sets per kernel (one JIT function each,
# wrapped by four autotuners; the launcher picks by dtype and by padded head dim, <= 32 or 64):
#  * fp16 / bf16: tensor-core tiles. DAB-DETR's cross-attention has Nq = 300 (900 with 3 patterns)
#    queries, Nk ~ 600-1100 memory tokens and B*H = 8 * batch programs per query tile: small query
#    tiles keep all SMs busy at batch 2, large key tiles amortise the online-softmax rescale.
#  * fp32: IEEE fp32 dots (no TF32, DESIGN.md) run on the FMA units with operands staged through
#    shared memory; ptxas spills such tiles to a multi-KB stack frame beyond ~32 x 32 at head dim 64,
#    so the fp32 sets are small.
#  Every config of every set was compiled for sm_80 and sm_90 and kept only if ptxas needed no
#  stack frame beyond a few dozen bytes (spills): `python benchmarks/triton_compile_report.py --all-configs
#  [--head-dim 32]` shows regs / stack / smem per config.
# The autotuning key is the problem-size bucket (log2 of the next power of two of Nq, Nk) and the
# padded head dims, so image-size changes within a bucket do not retune. Interpreter: one small
# config (multi-config autotuning needs a GPU driver).
if INTERPRET:
    _ONE = [config(1, 1, BLOCK_M=16, BLOCK_N=16)]
    _FWD_HALF = _FWD_HALF_D64 = _FWD_F32 = _FWD_F32_D64 = _ONE
    _DQ_HALF = _DQ_HALF_D64 = _DQ_F32 = _DQ_F32_D64 = _ONE
    _DKDV_HALF = _DKDV_HALF_D64 = _DKDV_F32 = _DKDV_F32_D64 = _ONE
else:
    # fp16 / bf16, head blocks <= 32 (DAB-DETR: Dc = Dp = Dv = 32)
    _FWD_HALF = [
        config(4, 3, BLOCK_M=32, BLOCK_N=64),
        config(4, 3, BLOCK_M=64, BLOCK_N=64),
        config(4, 3, BLOCK_M=64, BLOCK_N=128),
        config(8, 3, BLOCK_M=128, BLOCK_N=64),
        config(4, 4, BLOCK_M=16, BLOCK_N=128),
    ]
    _DQ_HALF = [
        config(4, 2, BLOCK_M=32, BLOCK_N=64),
        config(4, 3, BLOCK_M=64, BLOCK_N=64),
        config(4, 3, BLOCK_M=16, BLOCK_N=64),
    ]
    _DKDV_HALF = [
        config(4, 2, BLOCK_M=32, BLOCK_N=64),
        config(4, 3, BLOCK_M=64, BLOCK_N=64),
        config(8, 2, BLOCK_M=64, BLOCK_N=128),
        config(4, 3, BLOCK_M=32, BLOCK_N=32),
    ]
    # fp16 / bf16, 64-wide head blocks: tiles that ptxas compiles without spilling on sm_80 / sm_90
    _FWD_HALF_D64 = [
        config(4, 3, BLOCK_M=32, BLOCK_N=64),
        config(4, 3, BLOCK_M=64, BLOCK_N=64),
        config(8, 3, BLOCK_M=128, BLOCK_N=64),
        config(4, 4, BLOCK_M=16, BLOCK_N=128),
    ]
    _DQ_HALF_D64 = [
        config(4, 2, BLOCK_M=32, BLOCK_N=64),
        config(4, 3, BLOCK_M=16, BLOCK_N=64),
        config(8, 2, BLOCK_M=32, BLOCK_N=128),
    ]
    _DKDV_HALF_D64 = [
        config(4, 3, BLOCK_M=32, BLOCK_N=32),
        config(8, 2, BLOCK_M=32, BLOCK_N=32),
    ]
    # fp32: only tiles that ptxas compiles without a stack frame on sm_90 (measured at F = 32 / 64).
    _FWD_F32 = [
        config(4, 2, BLOCK_M=32, BLOCK_N=32),
        config(8, 2, BLOCK_M=64, BLOCK_N=64),
        config(4, 2, BLOCK_M=16, BLOCK_N=32),
    ]
    _DQ_F32 = [
        config(4, 2, BLOCK_M=32, BLOCK_N=32),
        config(8, 2, BLOCK_M=32, BLOCK_N=32),
        config(4, 2, BLOCK_M=16, BLOCK_N=32),
    ]
    _DKDV_F32 = [
        config(4, 2, BLOCK_M=32, BLOCK_N=32),
        config(8, 2, BLOCK_M=32, BLOCK_N=32),
    ]
    _FWD_F32_D64 = [
        config(8, 2, BLOCK_M=32, BLOCK_N=32),
        config(4, 2, BLOCK_M=16, BLOCK_N=64),
        config(4, 2, BLOCK_M=16, BLOCK_N=32),
    ]
    _DQ_F32_D64 = [
        config(8, 2, BLOCK_M=32, BLOCK_N=32),
        config(4, 2, BLOCK_M=16, BLOCK_N=64),
        config(4, 2, BLOCK_M=16, BLOCK_N=32),
    ]
    _DKDV_F32_D64 = [
        config(8, 2, BLOCK_M=32, BLOCK_N=32),
        config(4, 2, BLOCK_M=32, BLOCK_N=32),
    ]

_KEY = ["Q_BUCKET", "K_BUCKET", "BLOCK_DC", "BLOCK_DP", "BLOCK_DV"]
_NO_SPEC = ["Q_BUCKET", "K_BUCKET"]


@triton.jit
def _load_masked(ptr, rows, cols, row_ok, col_ok, s_row, s_col, UPCAST: tl.constexpr):
    """``ptr[rows, cols]`` with zeros where ``row_ok`` or ``col_ok`` is False. Key / value tiles pass
    the key validity as ``row_ok`` / ``col_ok`` where it matters, so that padded keys load as zeros:
    like the C++ kernels, which skip them, the result then does not depend on what padded keys
    hold (an inf or NaN there would otherwise reach the row through 0 * NaN in P V, dS K or V dO^T)."""
    t = tl.load(ptr + rows[:, None] * s_row + cols[None, :] * s_col,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _load_tile(ptr, rows, cols, n_rows, n_cols, s_row, s_col, UPCAST: tl.constexpr):
    """``ptr[rows, cols]`` (zeros outside ``rows < n_rows``, ``cols < n_cols``)."""
    return _load_masked(ptr, rows, cols, rows < n_rows, cols < n_cols, s_row, s_col, UPCAST)


@triton.jit
def _key_valid(MASK, b, n, Nk, sm_b, sm_n, HAS_MASK: tl.constexpr):
    valid = n < Nk
    if HAS_MASK:
        pad = tl.load(MASK + b * sm_b + n * sm_n, mask=valid, other=1)
        valid = valid & (pad == 0)
    return valid


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_fwd_kernel(
    QC, QP, KC, KP, V, MASK, O, LSE,
    sqc_b, sqc_n, sqc_h, sqc_d,
    sqp_b, sqp_n, sqp_h, sqp_d,
    skc_b, skc_n, skc_h, skc_d,
    skp_b, skp_n, skp_h, skp_d,
    sv_b, sv_n, sv_h, sv_d,
    sm_b, sm_n,
    H, Nq, Nk, DC, DP, DV,
    qk_scale,
    Q_BUCKET, K_BUCKET,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_DC: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)  # (b * H + h) * query tiles + query tile: one grid axis, no 65535 cap on B * H
    tiles = tl.cdiv(Nq, BLOCK_M)
    pid_m = pid % tiles
    bh = pid // tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    dc = tl.arange(0, BLOCK_DC)
    dp = tl.arange(0, BLOCK_DP)
    dv = tl.arange(0, BLOCK_DV)

    qc = _load_tile(QC + b * sqc_b + h * sqc_h, offs_m, dc, Nq, DC, sqc_n, sqc_d, UPCAST)
    qp = _load_tile(QP + b * sqp_b + h * sqp_h, offs_m, dp, Nq, DP, sqp_n, sqp_d, UPCAST)
    KC += b * skc_b + h * skc_h
    KP += b * skp_b + h * skp_h
    V += b * sv_b + h * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        n = start_n + offs_n
        kcT = _load_tile(KC, dc, n, DC, Nk, skc_d, skc_n, UPCAST)  # [BLOCK_DC, BLOCK_N]
        kpT = _load_tile(KP, dp, n, DP, Nk, skp_d, skp_n, UPCAST)
        s = tl.dot(qc, kcT, input_precision="ieee")
        s = tl.dot(qp, kpT, s, input_precision="ieee")
        s = s * qk_scale
        valid = _key_valid(MASK, b, n, Nk, sm_b, sm_n, HAS_MASK)
        s = tl.where(valid[None, :], s, float("-inf"))  # (a padded key's NaN logit is dropped here)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid inf - inf
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_masked(V, n, dv, valid, dv < DV, sv_n, sv_d, UPCAST)  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        m_i = m_new

    empty = l_i == 0.0  # every key of the row is padding (or Nk == 0)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    row = (b * H + h) * Nq + offs_m
    tl.store(LSE + row, lse, mask=offs_m < Nq)
    o_ptrs = O + ((b * Nq + offs_m[:, None]) * H + h) * DV + dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < Nq)[:, None] & (dv < DV)[None, :])


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dq_kernel(
    QC, QP, KC, KP, V, MASK, O, DO, LSE, DELTA, DQC, DQP,
    sqc_b, sqc_n, sqc_h, sqc_d,
    sqp_b, sqp_n, sqp_h, sqp_d,
    skc_b, skc_n, skc_h, skc_d,
    skp_b, skp_n, skp_h, skp_d,
    sv_b, sv_n, sv_h, sv_d,
    sm_b, sm_n,
    so_b, so_n, so_h, so_d,
    sdo_b, sdo_n, sdo_h, sdo_d,
    H, Nq, Nk, DC, DP, DV,
    qk_scale, scale,
    Q_BUCKET, K_BUCKET,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, EXACT_DELTA: tl.constexpr,
    BLOCK_DC: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)  # (b * H + h) * query tiles + query tile: one grid axis, no 65535 cap on B * H
    tiles = tl.cdiv(Nq, BLOCK_M)
    pid_m = pid % tiles
    bh = pid // tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    dc = tl.arange(0, BLOCK_DC)
    dp = tl.arange(0, BLOCK_DP)
    dv = tl.arange(0, BLOCK_DV)
    mmask = offs_m < Nq

    qc = _load_tile(QC + b * sqc_b + h * sqc_h, offs_m, dc, Nq, DC, sqc_n, sqc_d, UPCAST)
    qp = _load_tile(QP + b * sqp_b + h * sqp_h, offs_m, dp, Nq, DP, sqp_n, sqp_d, UPCAST)
    do = _load_tile(DO + b * sdo_b + h * sdo_h, offs_m, dv, Nq, DV, sdo_n, sdo_d, UPCAST)
    row = (b * H + h) * Nq + offs_m
    lse = tl.load(LSE + row, mask=mmask, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    KC += b * skc_b + h * skc_h
    KP += b * skp_b + h * skp_h
    V += b * sv_b + h * sv_h

    if EXACT_DELTA:
        # delta = sum_j P_ij dP_ij (= rowsum(dO * O) in exact arithmetic) from fp32-accumulated
        # products of the inputs: free of the output's rounding to fp16/bf16.
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, Nk, BLOCK_N):
            n = start_n + offs_n
            valid = _key_valid(MASK, b, n, Nk, sm_b, sm_n, HAS_MASK)
            kcT = _load_masked(KC, dc, n, dc < DC, valid, skc_d, skc_n, UPCAST)
            kpT = _load_masked(KP, dp, n, dp < DP, valid, skp_d, skp_n, UPCAST)
            vT = _load_masked(V, dv, n, dv < DV, valid, sv_d, sv_n, UPCAST)
            s = tl.dot(qc, kcT, input_precision="ieee")
            s = tl.dot(qp, kpT, s, input_precision="ieee")
            s = s * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            p = tl.exp2(s - lse2[:, None])
            delta += tl.sum(p * tl.dot(do, vT, input_precision="ieee"), axis=1)
    else:
        o = _load_tile(O + b * so_b + h * so_h, offs_m, dv, Nq, DV, so_n, so_d, False)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + row, delta, mask=mmask)

    dqc = tl.zeros([BLOCK_M, BLOCK_DC], dtype=tl.float32)
    dqp = tl.zeros([BLOCK_M, BLOCK_DP], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        n = start_n + offs_n
        valid = _key_valid(MASK, b, n, Nk, sm_b, sm_n, HAS_MASK)
        kcT = _load_masked(KC, dc, n, dc < DC, valid, skc_d, skc_n, UPCAST)  # [BLOCK_DC, BLOCK_N]
        kpT = _load_masked(KP, dp, n, dp < DP, valid, skp_d, skp_n, UPCAST)
        vT = _load_masked(V, dv, n, dv < DV, valid, sv_d, sv_n, UPCAST)  # [BLOCK_DV, BLOCK_N]
        s = tl.dot(qc, kcT, input_precision="ieee")
        s = tl.dot(qp, kpT, s, input_precision="ieee")
        s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dpt = tl.dot(do, vT, input_precision="ieee")
        ds = (p * (dpt - delta[:, None])).to(kcT.dtype)
        dqc = tl.dot(ds, tl.trans(kcT), dqc, input_precision="ieee")
        dqp = tl.dot(ds, tl.trans(kpT), dqp, input_precision="ieee")

    base = (b * Nq + offs_m[:, None]) * H + h
    tl.store(DQC + base * DC + dc[None, :], (dqc * scale).to(DQC.dtype.element_ty),
             mask=mmask[:, None] & (dc < DC)[None, :])
    tl.store(DQP + base * DP + dp[None, :], (dqp * scale).to(DQP.dtype.element_ty),
             mask=mmask[:, None] & (dp < DP)[None, :])


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dkdv_kernel(
    QC, QP, KC, KP, V, MASK, DO, LSE, DELTA, DKC, DKP, DV_,
    sqc_b, sqc_n, sqc_h, sqc_d,
    sqp_b, sqp_n, sqp_h, sqp_d,
    skc_b, skc_n, skc_h, skc_d,
    skp_b, skp_n, skp_h, skp_d,
    sv_b, sv_n, sv_h, sv_d,
    sm_b, sm_n,
    sdo_b, sdo_n, sdo_h, sdo_d,
    H, Nq, Nk, DC, DP, DV,
    qk_scale, scale,
    Q_BUCKET, K_BUCKET,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_DC: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)  # (b * H + h) * key tiles + key tile
    tiles = tl.cdiv(Nk, BLOCK_N)
    pid_n = pid % tiles
    bh = pid // tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    dc = tl.arange(0, BLOCK_DC)
    dp = tl.arange(0, BLOCK_DP)
    dv = tl.arange(0, BLOCK_DV)
    nmask = offs_n < Nk

    valid = _key_valid(MASK, b, offs_n, Nk, sm_b, sm_n, HAS_MASK)
    # padded keys' logits are replaced by -inf below; their values must load as zeros (dP = V dO^T)
    kc = _load_tile(KC + b * skc_b + h * skc_h, offs_n, dc, Nk, DC, skc_n, skc_d, UPCAST)  # [BLOCK_N, BLOCK_DC]
    kp = _load_tile(KP + b * skp_b + h * skp_h, offs_n, dp, Nk, DP, skp_n, skp_d, UPCAST)
    v = _load_masked(V + b * sv_b + h * sv_h, offs_n, dv, valid, dv < DV, sv_n, sv_d, UPCAST)

    QC += b * sqc_b + h * sqc_h
    QP += b * sqp_b + h * sqp_h
    DO += b * sdo_b + h * sdo_h
    LSE += (b * H + h) * Nq
    DELTA += (b * H + h) * Nq
    dkc = tl.zeros([BLOCK_N, BLOCK_DC], dtype=tl.float32)
    dkp = tl.zeros([BLOCK_N, BLOCK_DP], dtype=tl.float32)
    dvv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        m = start_m + offs_m
        qcT = _load_tile(QC, dc, m, DC, Nq, sqc_d, sqc_n, UPCAST)  # [BLOCK_DC, BLOCK_M]
        qpT = _load_tile(QP, dp, m, DP, Nq, sqp_d, sqp_n, UPCAST)
        do = _load_tile(DO, m, dv, Nq, DV, sdo_n, sdo_d, UPCAST)  # [BLOCK_M, BLOCK_DV]
        lse = tl.load(LSE + m, mask=m < Nq, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + m, mask=m < Nq, other=0.0)
        sT = tl.dot(kc, qcT, input_precision="ieee")
        sT = tl.dot(kp, qpT, sT, input_precision="ieee")
        sT = sT * qk_scale
        sT = tl.where(valid[:, None], sT, float("-inf"))
        pT = tl.exp2(sT - lse2[None, :])  # [BLOCK_N, BLOCK_M]
        dvv = tl.dot(pT.to(do.dtype), do, dvv, input_precision="ieee")
        dpT = tl.dot(v, tl.trans(do), input_precision="ieee")
        dsT = (pT * (dpT - delta[None, :])).to(qcT.dtype)
        dkc = tl.dot(dsT, tl.trans(qcT), dkc, input_precision="ieee")
        dkp = tl.dot(dsT, tl.trans(qpT), dkp, input_precision="ieee")

    base = (b * Nk + offs_n[:, None]) * H + h
    tl.store(DKC + base * DC + dc[None, :], (dkc * scale).to(DKC.dtype.element_ty),
             mask=nmask[:, None] & (dc < DC)[None, :])
    tl.store(DKP + base * DP + dp[None, :], (dkp * scale).to(DKP.dtype.element_ty),
             mask=nmask[:, None] & (dp < DP)[None, :])
    tl.store(DV_ + base * DV + dv[None, :], dvv.to(DV_.dtype.element_ty),
             mask=nmask[:, None] & (dv < DV)[None, :])


def _tuned(configs, kernel):
    return autotune(configs, _KEY)(kernel)


_fwd_half = _tuned(_FWD_HALF, _attn_fwd_kernel)
_fwd_half_d64 = _tuned(_FWD_HALF_D64, _attn_fwd_kernel)
_fwd_f32 = _tuned(_FWD_F32, _attn_fwd_kernel)
_fwd_f32_d64 = _tuned(_FWD_F32_D64, _attn_fwd_kernel)
_dq_half = _tuned(_DQ_HALF, _attn_bwd_dq_kernel)
_dq_half_d64 = _tuned(_DQ_HALF_D64, _attn_bwd_dq_kernel)
_dq_f32 = _tuned(_DQ_F32, _attn_bwd_dq_kernel)
_dq_f32_d64 = _tuned(_DQ_F32_D64, _attn_bwd_dq_kernel)
_dkdv_half = _tuned(_DKDV_HALF, _attn_bwd_dkdv_kernel)
_dkdv_half_d64 = _tuned(_DKDV_HALF_D64, _attn_bwd_dkdv_kernel)
_dkdv_f32 = _tuned(_DKDV_F32, _attn_bwd_dkdv_kernel)
_dkdv_f32_d64 = _tuned(_DKDV_F32_D64, _attn_bwd_dkdv_kernel)


def _variant(dtype: torch.dtype, head_block: int) -> str:
    """Which autotuner set serves a call: "half" / "f32" (head blocks <= 32) or "half_d64" /
    "f32_d64" (64-wide head blocks)."""
    kind = "f32" if dtype == torch.float32 else "half"
    return kind if head_block <= 32 else kind + "_d64"


# ---------------------------------------------------------------------------------------------
# launchers (bodies of the registered ops: tensor code + wrap_triton launches, traceable by
# torch.library.triton_op)


def _check(q_content: torch.Tensor, q_pos: torch.Tensor, value: torch.Tensor) -> None:
    check_dtype("content_position_attention", q_content)
    if q_content.device.type == "cuda":
        dims = (q_content.shape[-1], q_pos.shape[-1], value.shape[-1])
        if max(dims) > MAX_HEAD_DIM:
            raise ValueError(
                f"dabdetr.ops.content_position_attention: the Triton kernels take head dims up to "
                f"{MAX_HEAD_DIM}, got (Dc, Dp, Dv) = {dims}; use backend='torch'"
            )


def _bucket(n) -> int:
    """Autotuning bucket of a sequence length: log2 of the next power of two. Under torch.compile
    with symbolic sizes: 0 (Inductor tunes user kernels itself; never specialise on a size)."""
    if not isinstance(n, int):
        return 0
    return max(n - 1, 0).bit_length()


def _meta(q_content, q_pos, k_content, value, key_padding_mask):
    Nq, Nk = q_content.shape[1], k_content.shape[1]
    upcast = INTERPRET and q_content.dtype != torch.float32
    return dict(
        Q_BUCKET=_bucket(Nq), K_BUCKET=_bucket(Nk),
        HAS_MASK=key_padding_mask is not None, UPCAST=upcast,
        BLOCK_DC=dot_block(q_content.shape[-1]), BLOCK_DP=dot_block(q_pos.shape[-1]),
        BLOCK_DV=dot_block(value.shape[-1]),
    )


def _mask_args(key_padding_mask: Optional[torch.Tensor]):
    if key_padding_mask is None:
        return None, 0, 0
    return key_padding_mask, key_padding_mask.stride(0), key_padding_mask.stride(1)


def attention_fwd(q_content: torch.Tensor, q_pos: torch.Tensor, k_content: torch.Tensor, k_pos: torch.Tensor,
                  value: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    _check(q_content, q_pos, value)
    B, Nq, H, Dc = q_content.shape
    Dp = q_pos.shape[-1]
    Nk = k_content.shape[1]
    Dv = value.shape[-1]
    dtype = q_content.dtype
    out = value.new_empty((B, Nq, H, Dv), dtype=kernel_dtype(dtype))
    lse = q_content.new_empty((B, H, Nq), dtype=torch.float32)
    if B * H * Nq == 0:
        return to_dtype(out, dtype), lse
    mask, sm_b, sm_n = _mask_args(key_padding_mask)

    def grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]) * B * H,)

    meta = _meta(q_content, q_pos, k_content, value, key_padding_mask)
    v = _variant(dtype, max(meta["BLOCK_DC"], meta["BLOCK_DP"], meta["BLOCK_DV"]))
    kernel = (_fwd_half if v == "half" else _fwd_half_d64 if v == "half_d64"
              else _fwd_f32 if v == "f32" else _fwd_f32_d64)
    with device_of(q_content):
        wrap_triton(kernel)[grid](
            q_content, q_pos, k_content, k_pos, value, mask, out, lse,
            *q_content.stride(), *q_pos.stride(), *k_content.stride(), *k_pos.stride(), *value.stride(),
            sm_b, sm_n, H, Nq, Nk, Dc, Dp, Dv, float(scale) * LOG2E, **meta,
        )
    return to_dtype(out, dtype), lse


def attention_bwd(grad_out: torch.Tensor, q_content: torch.Tensor, q_pos: torch.Tensor, k_content: torch.Tensor,
                  k_pos: torch.Tensor, value: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                  out: torch.Tensor, lse: torch.Tensor,
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(q_content, q_pos, value)
    B, Nq, H, Dc = q_content.shape
    Dp = q_pos.shape[-1]
    Nk = k_content.shape[1]
    Dv = value.shape[-1]
    dtype = q_content.dtype
    kdt = kernel_dtype(dtype)
    if B * H == 0 or Nq == 0:  # no queries: the key/value gradients are zeros
        return (q_content.new_empty(q_content.shape), q_pos.new_empty(q_pos.shape),
                k_content.new_zeros(k_content.shape), k_pos.new_zeros(k_pos.shape), value.new_zeros(value.shape))
    dqc = q_content.new_empty(q_content.shape, dtype=kdt)
    dqp = q_pos.new_empty(q_pos.shape, dtype=kdt)
    dkc = k_content.new_empty(k_content.shape, dtype=kdt)
    dkp = k_pos.new_empty(k_pos.shape, dtype=kdt)
    dv = value.new_empty(value.shape, dtype=kdt)
    lse = lse.contiguous()
    delta = lse.new_empty((B, H, Nq))
    mask, sm_b, sm_n = _mask_args(key_padding_mask)
    meta = _meta(q_content, q_pos, k_content, value, key_padding_mask)
    strides = (*q_content.stride(), *q_pos.stride(), *k_content.stride(), *k_pos.stride(), *value.stride(),
               sm_b, sm_n)

    def grid_q(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]) * B * H,)

    def grid_k(meta):
        return (triton.cdiv(Nk, meta["BLOCK_N"]) * B * H,)

    v = _variant(dtype, max(meta["BLOCK_DC"], meta["BLOCK_DP"], meta["BLOCK_DV"]))
    dq_kernel = (_dq_half if v == "half" else _dq_half_d64 if v == "half_d64"
                 else _dq_f32 if v == "f32" else _dq_f32_d64)
    dkdv_kernel = (_dkdv_half if v == "half" else _dkdv_half_d64 if v == "half_d64"
                   else _dkdv_f32 if v == "f32" else _dkdv_f32_d64)
    with device_of(q_content):
        wrap_triton(dq_kernel)[grid_q](
            q_content, q_pos, k_content, k_pos, value, mask, out, grad_out, lse, delta, dqc, dqp,
            *strides, *out.stride(), *grad_out.stride(),
            H, Nq, Nk, Dc, Dp, Dv, float(scale) * LOG2E, float(scale), EXACT_DELTA=dtype != torch.float32,
            **meta,
        )
        if Nk > 0:
            wrap_triton(dkdv_kernel)[grid_k](
                q_content, q_pos, k_content, k_pos, value, mask, grad_out, lse, delta, dkc, dkp, dv,
                *strides, *grad_out.stride(),
                H, Nq, Nk, Dc, Dp, Dv, float(scale) * LOG2E, float(scale), **meta,
            )
    return tuple(to_dtype(t, dtype) for t in (dqc, dqp, dkc, dkp, dv))


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs (benchmarks/triton_compile_report.py)


def compile_specs(dtype: str, head_dim: int = MAX_HEAD_DIM, all_configs: bool = False):
    """One spec per kernel (and config): ``dtype`` in {"fp32", "bf16", "fp16"}, Dc = Dp = Dv =
    ``head_dim`` (default: the largest the GPU kernels take), with a key padding mask, contiguous
    last dims, the compiled (not interpreted) dot path."""
    from ._common import compile_spec, largest_config

    t = "*" + dtype
    bd = dot_block(head_dim)
    v = _variant(torch.float32 if dtype == "fp32" else torch.bfloat16, bd)
    fwd = {"half": _fwd_half, "half_d64": _fwd_half_d64, "f32": _fwd_f32, "f32_d64": _fwd_f32_d64}[v]
    dq = {"half": _dq_half, "half_d64": _dq_half_d64, "f32": _dq_f32, "f32_d64": _dq_f32_d64}[v]
    dkdv = {"half": _dkdv_half, "half_d64": _dkdv_half_d64, "f32": _dkdv_f32, "f32_d64": _dkdv_f32_d64}[v]
    consts = dict(HAS_MASK=True, UPCAST=False, BLOCK_DC=bd, BLOCK_DP=bd, BLOCK_DV=bd)
    ones = ("sqc_d", "sqp_d", "skc_d", "skp_d", "sv_d")
    specs = []

    def configs(kernel):
        return kernel.configs if all_configs else [largest_config(kernel.configs)]

    for cfg in configs(fwd):
        ptrs = {"QC": t, "QP": t, "KC": t, "KP": t, "V": t, "MASK": "*i1", "O": t, "LSE": "*fp32"}
        specs.append(compile_spec(fwd, ptrs, floats=("qk_scale",), constexprs=consts, ones=ones, cfg=cfg))
    for cfg in configs(dq):
        ptrs = {"QC": t, "QP": t, "KC": t, "KP": t, "V": t, "MASK": "*i1", "O": t, "DO": t, "LSE": "*fp32",
                "DELTA": "*fp32", "DQC": t, "DQP": t}
        specs.append(compile_spec(dq, ptrs, floats=("qk_scale", "scale"),
                                  constexprs=dict(consts, EXACT_DELTA=dtype != "fp32"),
                                  ones=ones + ("so_d", "sdo_d"), cfg=cfg))
    for cfg in configs(dkdv):
        ptrs = {"QC": t, "QP": t, "KC": t, "KP": t, "V": t, "MASK": "*i1", "DO": t, "LSE": "*fp32",
                "DELTA": "*fp32", "DKC": t, "DKP": t, "DV_": t}
        specs.append(compile_spec(dkdv, ptrs, floats=("qk_scale", "scale"), constexprs=consts,
                                  ones=ones + ("sdo_d",), cfg=cfg))
    return specs
