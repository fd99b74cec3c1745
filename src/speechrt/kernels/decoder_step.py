"""One decode step of a whole pre-LN transformer decoder stack in ONE persistent kernel.

A decode step of one or two rows only streams weights: large-v3's 32 layers move ~1.7 GB, 0.43
ms at the H200's 4 TB/s, yet as a chain of ~290 small kernels (GEMVs, decode attention) each
paying its launch, ramp and drain, it takes 1.3 ms. Here one program per SM walks every layer's
eight phases, separated by grid-wide barriers (``kernels._grid``); optionally L2 fetches the
next phase's data while a program waits at a barrier (``prefetch_ahead``):

0. embedding (layer 0: ``tok_emb[token] + pos_emb[position]``), LayerNorm 0, the q/k/v GEMV:
   q to scratch, k and v straight into the self-attention cache at ``position``;
1. self-attention over cache entries ``[0, position]``, split over programs (partials);
2. combine of the partials, output projection, residual add;
3. LayerNorm 1, cross-attention q GEMV;
4. cross-attention over the memory K/V (all entries), split over programs;
5. combine, output projection, residual add;
6. LayerNorm 2, fc1 GEMV, activation;
7. fc2 GEMV, residual add.

Numerics follow :func:`speechrt.kernels.skinny_linear.skinny_linear` (the kernel path of a
step): the residual stream is float32; a LayerNorm takes float32 statistics and rounds its
output to the weight dtype; GEMVs accumulate in float32 and round q, k, v, the attention output
and the hidden activations to the weight dtype; attention runs in float32 (online softmax, base
2). The final LayerNorm and the output projection are left to the caller (one GEMV).

The stack is described by :class:`DecoderStack`: each weight is one tensor with the layer index
first, so one pointer reaches every layer (``nn.Linear`` layout, no copies at each step). Under
the interpreter, or with ``sync=False``, the same kernel runs one (layer, phase) per launch
without barriers (the debugging path). :func:`decoder_step_ref` is the plain-torch reference.

Measured (H200, large-v3, BENCHMARKS.md session 6): correct, but slower than the skinny-kernel
chain (1.58-1.70 vs 1.26-1.40 ms per step at one row). The 256 barriers cost ~0.24 ms; the
phases are the rest: one resident program per SM holds too few bytes in flight (each GEMV phase
pays two to five dependent DRAM round trips; the kernel needs 230-255 registers a thread, so
more programs per SM do not fit), and L2 prefetch did not help. A faster version would stream
each phase's weights through shared memory (TMA / cp.async rings) instead of registers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels._activations import ACTIVATIONS, activate
from speechrt.kernels._grid import (
    MAX_SPIN,
    grid_exit,
    grid_sync,
    prefetch_l2,
    resident_programs_per_sm,
)
from speechrt.kernels._pdl import gdc_launch_dependents, gdc_wait, pdl_kwargs
from speechrt.kernels._utils import (
    MISSING_TL,
    MISSING_TRITON,
    cdiv,
    check_launch,
    interpreting,
    next_power_of_2,
    sm_count,
)

try:  # Triton is optional: the reference works without it, the launcher needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton, tl = MISSING_TRITON, MISSING_TL

__all__ = [
    "DecoderStack",
    "StepConfig",
    "StepState",
    "decoder_step",
    "decoder_step_ref",
]

N_PHASES = 8
MAX_TILE = 16384  # weight elements per GEMV tile (BLOCK_N x next_pow2(K))
MAX_ROWS = 4


@dataclass
class DecoderStack:
    """Weights and caches of ``L`` pre-LN decoder layers, layer index first, one float dtype.

    ``ln_w``/``ln_b`` (L, 3, D) float32: the self-attention, cross-attention and feed-forward
    LayerNorms (``eps``); ``qkv_w`` (L, 3D, D), ``qkv_b`` (L, 3D): q, k, v projections stacked
    (a missing bias is zeros); ``o_w``/``cq_w``/``co_w`` (L, D, D) with (L, D) biases:
    self-attention output, cross-attention query and cross-attention output projections;
    ``fc1_w`` (L, F, D), ``fc1_b`` (L, F), ``fc2_w`` (L, D, F), ``fc2_b`` (L, D);
    ``tok_emb`` (V, D), ``pos_emb`` (P, D); caches, contiguous: ``self_k``/``self_v``
    (L, B, H, T, D/H), ``cross_k``/``cross_v`` (L, A, H, S, D/H), row ``b`` attending to
    memory row ``b``. ``activation``: of fc1 (``kernels._activations``).
    """

    ln_w: torch.Tensor
    ln_b: torch.Tensor
    eps: float
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    o_w: torch.Tensor
    o_b: torch.Tensor
    cq_w: torch.Tensor
    cq_b: torch.Tensor
    co_w: torch.Tensor
    co_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor
    tok_emb: torch.Tensor
    pos_emb: torch.Tensor
    self_k: torch.Tensor
    self_v: torch.Tensor
    cross_k: torch.Tensor
    cross_v: torch.Tensor
    n_head: int
    activation: str = "gelu"

    @property
    def n_layer(self) -> int:
        return self.qkv_w.shape[0]

    @property
    def dim(self) -> int:
        return self.qkv_w.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if f.type == "torch.Tensor"]

    def check(self) -> None:
        """Raise a one-line error naming the first tensor whose shape, dtype or layout is off."""
        n, d, h = self.n_layer, self.dim, self.n_head
        f = self.fc1_w.shape[1]
        dtype = self.qkv_w.dtype
        if h < 1 or d % h:
            raise ValueError(f"n_head {h} does not divide the model dim {d}")
        dh = d // h
        b, t = self.self_k.shape[1], self.self_k.shape[3]
        a, s = self.cross_k.shape[1], self.cross_k.shape[3]
        want = {
            "ln_w": (n, 3, d), "ln_b": (n, 3, d), "qkv_w": (n, 3 * d, d), "qkv_b": (n, 3 * d),
            "o_w": (n, d, d), "o_b": (n, d), "cq_w": (n, d, d), "cq_b": (n, d),
            "co_w": (n, d, d), "co_b": (n, d), "fc1_w": (n, f, d), "fc1_b": (n, f),
            "fc2_w": (n, d, f), "fc2_b": (n, d), "tok_emb": (self.tok_emb.shape[0], d),
            "pos_emb": (self.pos_emb.shape[0], d), "self_k": (n, b, h, t, dh),
            "self_v": (n, b, h, t, dh), "cross_k": (n, a, h, s, dh), "cross_v": (n, a, h, s, dh),
        }  # fmt: skip
        for name, shape in want.items():
            t_ = getattr(self, name)
            if tuple(t_.shape) != shape:
                raise ValueError(f"decoder stack {name} must be {shape}, got {tuple(t_.shape)}")
            if not t_.is_contiguous():
                raise ValueError(f"decoder stack {name} must be contiguous")
            need = torch.float32 if name.startswith("ln_") else dtype
            if t_.dtype != need:
                raise ValueError(f"decoder stack {name} must be {need}, got {t_.dtype}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UnsupportedOptionError(f"decoder step kernel takes float weights, got {dtype}")
        if dh != next_power_of_2(dh) or dh < 16:
            raise UnsupportedOptionError(
                f"decoder step kernel needs a power-of-two head dim >= 16, got {dh}"
            )
        if self.activation not in ("identity", "relu", "gelu", "swish"):
            raise UnsupportedOptionError(f"unknown activation '{self.activation}'")


@dataclass(frozen=True)
class StepConfig:
    """Launch configuration. ``programs``: the persistent grid (None: ``per_sm`` per SM; a
    launch that cannot keep them all resident is refused); ``num_warps``;
    ``prefetch_ahead``: phases whose data L2 fetches ahead of the one computing (0: none);
    ``block_n``: output columns per GEMV tile for (qkv, D x D, fc1, fc2), 0 = automatic."""

    programs: int | None = None
    per_sm: int = 1
    num_warps: int = 8
    prefetch_ahead: int = 0
    block_n: tuple[int, int, int, int] = (0, 0, 0, 0)
    spin: int = 0  # barrier polling (kernels._grid.grid_sync)
    phase_mask: int = 255  # benchmarks only: phases p with bit p clear are skipped

    def __str__(self) -> str:
        bn = "x".join(map(str, self.block_n))
        extra = f"s{self.spin}" + (f"m{self.phase_mask}" if self.phase_mask != 255 else "")
        grid = self.programs or f"{self.per_sm}sm"
        return f"p{grid}w{self.num_warps}a{self.prefetch_ahead}n{bn}{extra}"


# Candidates for bench/skinny_micro.py --persistent-sweep (H200, Whisper decode steps).
SWEEP: tuple[StepConfig, ...] = (
    *(StepConfig(per_sm=p, num_warps=w, prefetch_ahead=0) for p in (2, 3, 4) for w in (4, 8)),
    StepConfig(per_sm=2, num_warps=8, prefetch_ahead=1),
    StepConfig(per_sm=4, num_warps=4, prefetch_ahead=1),
    StepConfig(per_sm=2, num_warps=8, prefetch_ahead=0, block_n=(4, 2, 8, 1)),
    StepConfig(per_sm=4, num_warps=4, prefetch_ahead=0, block_n=(4, 2, 8, 1)),
    StepConfig(per_sm=2, num_warps=4, prefetch_ahead=0, phase_mask=0),
    StepConfig(per_sm=4, num_warps=4, prefetch_ahead=0, phase_mask=0),
)


# fmt: off
@triton.jit
def _pick_row(A, r, RB: tl.constexpr):
    """Row r of the (RB, K) tile A as a (K,) vector."""
    if RB == 1:
        return tl.sum(A, axis=0)
    ridx = tl.arange(0, RB)
    return tl.sum(tl.where(ridx[:, None] == r, A, 0.0), axis=0)


@triton.jit
def _ln_tile(x, mask, K: tl.constexpr, eps, LNW, LNB, ks, k_ok, DTYPE: tl.constexpr):
    """LayerNorm of the float32 rows x (RB, K_PAD): float32 statistics, rounded to DTYPE."""
    mean = tl.sum(x, axis=1) / K
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + eps)
    w = tl.load(LNW + ks, mask=k_ok, other=0.0)
    b = tl.load(LNB + ks, mask=k_ok, other=0.0)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    return y.to(DTYPE).to(tl.float32)


@triton.jit
def _load_rows(P, ROWS: tl.constexpr, RB: tl.constexpr, K: tl.constexpr,
               K_PAD: tl.constexpr):
    """Rows (ROWS, K) at P (contiguous), written by other programs: (RB, K_PAD) float32."""
    rows = tl.arange(0, RB)
    ks = tl.arange(0, K_PAD)
    mask = (rows < ROWS)[:, None] & (ks < K)[None, :]
    x = tl.load(P + rows[:, None] * K + ks[None, :], mask=mask, other=0.0, cache_modifier=".cg")
    return x.to(tl.float32), mask


@triton.jit
def _embed(TOK, POS, EMB, PEMB, X, pid, n_pos, ROWS: tl.constexpr, RB: tl.constexpr,
           D: tl.constexpr, K_PAD: tl.constexpr):
    """x = tok_emb[token] + pos_emb[position] rounded to the embedding dtype, as float32
    (RB, K_PAD); program 0 also writes it to the residual stream X."""
    rows = tl.arange(0, RB)
    ks = tl.arange(0, K_PAD)
    row_ok = rows < ROWS
    mask = row_ok[:, None] & (ks < D)[None, :]
    tok = tl.load(TOK + rows, mask=row_ok, other=0).to(tl.int64)
    pos = tl.minimum(tl.maximum(tl.load(POS + rows, mask=row_ok, other=0), 0), n_pos - 1)
    e = tl.load(EMB + tok[:, None] * D + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    p = tl.load(PEMB + pos.to(tl.int64)[:, None] * D + ks[None, :], mask=mask,
                other=0.0).to(tl.float32)
    x = (e + p).to(EMB.dtype.element_ty).to(tl.float32)
    if pid == 0:
        tl.store(X + rows[:, None] * D + ks[None, :], x, mask=mask)
    return x, mask


@triton.jit
def _combine_rows(PO, LSE, ROWS: tl.constexpr, RB: tl.constexpr, H: tl.constexpr,
                  H_PAD: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
                  DH: tl.constexpr, DTYPE: tl.constexpr):
    """Attention outputs (RB, H_PAD * DH) float32 (rounded to DTYPE) from the S split partials
    per (row, head): normalised outputs PO (R, H, S, DH) weighted by 2^LSE (R, H, S)."""
    hh = tl.arange(0, H_PAD)
    ss = tl.arange(0, S_PAD)
    dd = tl.arange(0, DH)
    hs_ok = (hh < H)[:, None] & (ss < S)[None, :]
    ridx = tl.arange(0, RB)
    A = tl.zeros([RB, H_PAD * DH], dtype=tl.float32)
    for r in tl.static_range(ROWS):
        hs = (r * H + hh[:, None]) * S + ss[None, :]  # (H_PAD, S_PAD)
        lse = tl.load(LSE + hs, mask=hs_ok, other=float("-inf"), cache_modifier=".cg")
        top = tl.max(lse, axis=1)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp2(lse - top[:, None])  # 0 for empty splits
        po = tl.load(PO + hs[:, :, None] * DH + dd[None, None, :], mask=hs_ok[:, :, None],
                     other=0.0, cache_modifier=".cg")  # (H_PAD, S_PAD, DH)
        total = tl.sum(w, axis=1)
        out = tl.sum(w[:, :, None] * po, axis=1) / tl.where(total > 0.0, total, 1.0)[:, None]
        vec = tl.reshape(out, [H_PAD * DH]).to(DTYPE).to(tl.float32)
        A = tl.where(ridx[:, None] == r, vec[None, :], A)
    return A


@triton.jit
def _gemv(pid, NP, A, W, BIAS, OUT, X, SK, SV, POS, cache_off, row_stride, head_stride,
          n_cache,
          N: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, BN: tl.constexpr,
          ROWS: tl.constexpr, RB: tl.constexpr, ACT: tl.constexpr, EPI: tl.constexpr,
          D: tl.constexpr, DH: tl.constexpr):
    """y = act(A @ W^T + b) for the tiles pid, pid + NP, ... of BN output columns (the next
    tile's weights loaded before this one is multiplied). EPI 0: OUT[r, n] = y (OUT's dtype);
    1: X[r, n] += y (float32 residual); 2: q/k/v split, q to OUT (R, D), k and v into the
    caches SK/SV at (row r, head, POS[r]) (``cache_off`` the layer's offset)."""
    ks = tl.arange(0, K_PAD)
    k_ok = ks < K
    lane = tl.arange(0, BN)
    cols = pid * BN + lane
    w = tl.load(W + cols.to(tl.int64)[:, None] * K + ks[None, :],
                mask=(cols < N)[:, None] & k_ok[None, :], other=0.0)
    for t in range(pid, tl.cdiv(N, BN), NP):
        cols = t * BN + lane
        col_ok = cols < N
        nxt = cols + NP * BN
        w_next = tl.load(W + nxt.to(tl.int64)[:, None] * K + ks[None, :],
                         mask=(nxt < N)[:, None] & k_ok[None, :], other=0.0)
        wf = w.to(tl.float32)
        bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
        for r in tl.static_range(ROWS):
            y = tl.sum(wf * _pick_row(A, r, RB)[None, :], axis=1) + bias
            y = activate(y, ACT)
            if EPI == 0:
                tl.store(OUT + r * N + cols, y.to(OUT.dtype.element_ty), mask=col_ok)
            elif EPI == 1:
                xp = X + r * N + cols
                tl.store(xp, tl.load(xp, mask=col_ok, other=0.0, cache_modifier=".cg") + y,
                         mask=col_ok)
            else:
                pos = tl.minimum(tl.maximum(tl.load(POS + r), 0), n_cache - 1).to(tl.int64)
                c = cols % D
                off = cache_off + r * row_stride + (c // DH) * head_stride + pos * DH + c % DH
                y = y.to(OUT.dtype.element_ty)
                tl.store(OUT + r * D + cols, y, mask=col_ok & (cols < D))
                tl.store(SK + off, y, mask=col_ok & (cols >= D) & (cols < 2 * D))
                tl.store(SV + off, y, mask=col_ok & (cols >= 2 * D))
        w = w_next


@triton.jit
def _attention(pid, NP, Q, KC, VC, POS, PO, LSE, cache_off, row_stride, head_stride, n_keys,
               qk_scale, HAS_POS: tl.constexpr, ROWS: tl.constexpr, H: tl.constexpr,
               S: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, DH: tl.constexpr):
    """Items (row, head, split) pid, pid + NP, ...: an online softmax (float32, base 2) of one
    query row over its split of the keys [0, POS[r] + 1) (HAS_POS) or [0, n_keys); writes the
    normalised partial output PO (R, H, S, DH) and its log-sum-exp LSE (R, H, S)."""
    dd = tl.arange(0, DH)
    for item in range(pid, ROWS * H * S, NP):
        s = item % S
        h = (item // S) % H
        r = item // (S * H)
        if HAS_POS:
            length = tl.minimum(tl.maximum(tl.load(POS + r), 0), n_keys - 1).to(tl.int32) + 1
        else:
            length = n_keys
        chunk = tl.cdiv(tl.cdiv(length, S), 16) * 16
        lo = s * chunk
        hi = tl.minimum(lo + chunk, length)
        q = tl.load(Q + r * D + h * DH + dd, cache_modifier=".cg").to(tl.float32)
        base = cache_off + tl.cast(r, tl.int64) * row_stride + h * head_stride
        m_i = tl.full([1], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([DH], dtype=tl.float32)
        for start in range(lo, hi, BLOCK):
            n = start + tl.arange(0, BLOCK)
            ok = n < hi
            kv = base + n.to(tl.int64)[:, None] * DH + dd[None, :]
            k = tl.load(KC + kv, mask=ok[:, None], other=0.0, cache_modifier=".cg")
            v = tl.load(VC + kv, mask=ok[:, None], other=0.0, cache_modifier=".cg")
            sc = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * qk_scale  # (BLOCK,)
            sc = tl.where(ok, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(sc - m_safe)  # (BLOCK,)
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            m_i = m_new
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(PO + ((r * H + h) * S + s) * DH + dd, acc / l_safe)
        tl.store(LSE + (r * H + h) * S + s + tl.arange(0, 1), lse)


@triton.jit
def _prefetch_phase(q, weights_only: tl.constexpr, pid, NP, LAYER_HI, POS,
                    QKV_W, O_W, CQ_W, CO_W, F1_W, F2_W, SK, SV, CK, CV,
                    self_layer, self_row, self_head, n_self, cross_layer, cross_row,
                    ROWS: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DH: tl.constexpr,
                    F: tl.constexpr, ESIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Prefetch into L2 what phase ``q`` (layer * 8 + phase) reads from memory, spread over
    the programs (the self-attention cache only when not ``weights_only``)."""
    layer = q // 8
    phase = q % 8
    lay = tl.cast(layer, tl.int64)
    if layer < LAYER_HI:
        if phase == 0:
            prefetch_l2(QKV_W + lay * 3 * D * D, 3 * D * D * ESIZE, pid, NP, BLOCK)
        elif phase == 1:
            if not weights_only:
                for run in range(pid, ROWS * H, NP):
                    r = run // H
                    pos = tl.minimum(tl.maximum(tl.load(POS + r), 0), n_self - 1)
                    off = lay * self_layer + r * self_row + (run % H) * self_head
                    run_bytes = (pos + 1) * DH * ESIZE
                    prefetch_l2(SK + off, run_bytes, 0, 1, BLOCK)
                    prefetch_l2(SV + off, run_bytes, 0, 1, BLOCK)
        elif phase == 2:
            prefetch_l2(O_W + lay * D * D, D * D * ESIZE, pid, NP, BLOCK)
        elif phase == 3:
            prefetch_l2(CQ_W + lay * D * D, D * D * ESIZE, pid, NP, BLOCK)
        elif phase == 4:
            nbytes = ROWS * cross_row * ESIZE
            prefetch_l2(CK + lay * cross_layer, nbytes, pid, NP, BLOCK)
            prefetch_l2(CV + lay * cross_layer, nbytes, pid, NP, BLOCK)
        elif phase == 5:
            prefetch_l2(CO_W + lay * D * D, D * D * ESIZE, pid, NP, BLOCK)
        elif phase == 6:
            prefetch_l2(F1_W + lay * F * D, F * D * ESIZE, pid, NP, BLOCK)
        else:
            prefetch_l2(F2_W + lay * F * D, F * D * ESIZE, pid, NP, BLOCK)


@triton.jit
def _decoder_step_kernel(
    TOK, POS, EMB, PEMB, X, Q, HID, PO_S, LSE_S, PO_C, LSE_C, BAR, ERR,
    LNW, LNB, QKV_W, QKV_B, O_W, O_B, CQ_W, CQ_B, CO_W, CO_B, F1_W, F1_B, F2_W, F2_B,
    SK, SV, CK, CV,
    n_pos, self_rows, n_self, cross_rows, n_cross, eps, qk_scale,
    LAYER_LO, LAYER_HI, PHASE_LO, PHASE_HI,
    D: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, F: tl.constexpr,
    ROWS: tl.constexpr, RB: tl.constexpr, ACT: tl.constexpr, EMBED: tl.constexpr,
    S_SELF: tl.constexpr, S_CROSS: tl.constexpr, S_PAD: tl.constexpr, H_PAD: tl.constexpr,
    BLOCK_SELF: tl.constexpr, BLOCK_CROSS: tl.constexpr,
    BN_QKV: tl.constexpr, BN_D: tl.constexpr, BN_F1: tl.constexpr, BN_F2: tl.constexpr,
    KD: tl.constexpr, KF_PAD: tl.constexpr,  # next_pow2(D) (== H_PAD * DH), next_pow2(F)
    SYNC: tl.constexpr, AHEAD: tl.constexpr, ESIZE: tl.constexpr, MAX_SPIN: tl.constexpr,
    SPIN: tl.constexpr, PHASE_MASK: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    NP = tl.num_programs(0)
    DTYPE: tl.constexpr = QKV_W.dtype.element_ty
    ks = tl.arange(0, KD)
    k_ok = ks < D
    self_head = n_self * DH
    self_row = H * self_head
    self_layer = self_rows * self_row
    cross_head = n_cross * DH
    cross_row = H * cross_head
    cross_layer = cross_rows * cross_row
    first = LAYER_LO * 8 + PHASE_LO
    if AHEAD > 0:  # weights need nothing from earlier kernels
        _prefetch_phase(first, True, pid, NP, LAYER_HI, POS, QKV_W, O_W, CQ_W, CO_W, F1_W,
                        F2_W, SK, SV, CK, CV, self_layer, self_row, self_head, n_self,
                        cross_layer, cross_row, ROWS, H, D, DH, F, ESIZE, 512)
    if USE_PDL:
        gdc_wait()
    for j in tl.static_range(1, AHEAD):
        _prefetch_phase(first + j, False, pid, NP, LAYER_HI, POS, QKV_W, O_W, CQ_W, CO_W,
                        F1_W, F2_W, SK, SV, CK, CV, self_layer, self_row, self_head, n_self,
                        cross_layer, cross_row, ROWS, H, D, DH, F, ESIZE, 512)
    target = 0
    spin_limit = MAX_SPIN
    for layer in range(LAYER_LO, LAYER_HI):
        lay = tl.cast(layer, tl.int64)
        for phase in range(PHASE_LO, PHASE_HI):
            ln_w = LNW + lay * 3 * D
            ln_b = LNB + lay * 3 * D
            if (PHASE_MASK >> phase) & 1 == 0:  # benchmarks: time the other phases
                pass
            elif phase == 0:
                x0, m0 = _load_rows(X, ROWS, RB, D, KD)
                if EMBED:
                    if layer == 0:  # the stream starts at the embedding (X is written here)
                        x0, m0 = _embed(TOK, POS, EMB, PEMB, X, pid, n_pos, ROWS, RB, D, KD)
                a0 = _ln_tile(x0, m0, D, eps, ln_w, ln_b, ks, k_ok, DTYPE)
                _gemv(pid, NP, a0, QKV_W + lay * 3 * D * D, QKV_B + lay * 3 * D, Q, X, SK, SV,
                      POS, lay * self_layer, self_row, self_head, n_self,
                      3 * D, D, KD, BN_QKV, ROWS, RB, 0, 2, D, DH)
            elif phase == 1:
                _attention(pid, NP, Q, SK, SV, POS, PO_S, LSE_S, lay * self_layer, self_row,
                           self_head, n_self, qk_scale, True, ROWS, H, S_SELF, BLOCK_SELF,
                           D, DH)
            elif phase == 2:
                a2 = _combine_rows(PO_S, LSE_S, ROWS, RB, H, H_PAD, S_SELF, S_PAD, DH, DTYPE)
                _gemv(pid, NP, a2, O_W + lay * D * D, O_B + lay * D, Q, X, SK, SV, POS,
                      0, 0, 0, 1, D, D, KD, BN_D, ROWS, RB, 0, 1, D, DH)
            elif phase == 3:
                x3, m3 = _load_rows(X, ROWS, RB, D, KD)
                a3 = _ln_tile(x3, m3, D, eps, ln_w + D, ln_b + D, ks, k_ok, DTYPE)
                _gemv(pid, NP, a3, CQ_W + lay * D * D, CQ_B + lay * D, Q, X, SK, SV, POS,
                      0, 0, 0, 1, D, D, KD, BN_D, ROWS, RB, 0, 0, D, DH)
            elif phase == 4:
                _attention(pid, NP, Q, CK, CV, POS, PO_C, LSE_C, lay * cross_layer, cross_row,
                           cross_head, n_cross, qk_scale, False, ROWS, H, S_CROSS,
                           BLOCK_CROSS, D, DH)
            elif phase == 5:
                a5 = _combine_rows(PO_C, LSE_C, ROWS, RB, H, H_PAD, S_CROSS, S_PAD, DH, DTYPE)
                _gemv(pid, NP, a5, CO_W + lay * D * D, CO_B + lay * D, Q, X, SK, SV, POS,
                      0, 0, 0, 1, D, D, KD, BN_D, ROWS, RB, 0, 1, D, DH)
            elif phase == 6:
                x6, m6 = _load_rows(X, ROWS, RB, D, KD)
                a6 = _ln_tile(x6, m6, D, eps, ln_w + 2 * D, ln_b + 2 * D, ks, k_ok, DTYPE)
                _gemv(pid, NP, a6, F1_W + lay * F * D, F1_B + lay * F, HID, X, SK, SV, POS,
                      0, 0, 0, 1, F, D, KD, BN_F1, ROWS, RB, ACT, 0, D, DH)
            else:
                a7, m7 = _load_rows(HID, ROWS, RB, F, KF_PAD)
                _gemv(pid, NP, a7, F2_W + lay * F * D, F2_B + lay * D, Q, X, SK, SV, POS,
                      0, 0, 0, 1, D, F, KF_PAD, BN_F2, ROWS, RB, 0, 1, D, DH)
            if AHEAD > 0:  # this program's loads are done: L2 fetches ahead while it waits
                _prefetch_phase(layer * 8 + phase + AHEAD, False, pid, NP, LAYER_HI, POS,
                                QKV_W, O_W, CQ_W, CO_W, F1_W, F2_W, SK, SV, CK, CV,
                                self_layer, self_row, self_head, n_self, cross_layer,
                                cross_row, ROWS, H, D, DH, F, ESIZE, 512)
            if SYNC:
                target += NP
                ok = grid_sync(BAR, ERR, target, spin_limit, SPIN)
                spin_limit = tl.where(ok, spin_limit, 0)  # a timed-out launch ends quickly
    if SYNC:
        grid_exit(BAR, NP)
    if USE_PDL:
        gdc_launch_dependents()
# fmt: on


class StepState:
    """Scratch of :func:`decoder_step` for ``rows`` rows of a stack (allocate once: CUDA graphs
    replay with these addresses): the output residual stream x (R, D) float32, q (R, D),
    hidden (R, F), attention partials, barrier counters and the error flag (nonzero after a
    barrier timed out: results are then invalid)."""

    def __init__(self, stack: DecoderStack, rows: int, config: StepConfig | None = None):
        if not 1 <= rows <= MAX_ROWS:
            raise UnsupportedOptionError(
                f"decoder step kernel takes 1..{MAX_ROWS} rows, got {rows}"
            )
        if rows > stack.self_k.shape[1] or rows > stack.cross_k.shape[1]:
            raise ValueError(f"{rows} rows need caches of at least {rows} rows")
        self.rows = rows
        self.config = config or StepConfig()
        dev, dtype = stack.qkv_w.device, stack.qkv_w.dtype
        d, h, f = stack.dim, stack.n_head, stack.fc1_w.shape[1]
        self.programs = self._programs(dev)
        self.s_self = max(1, min(self.programs // (rows * h), cdiv(stack.self_k.shape[3], 16)))
        self.s_cross = max(1, min(self.programs // (rows * h), cdiv(stack.cross_k.shape[3], 16)))
        s = max(self.s_self, self.s_cross)
        dh = d // h
        f32 = {"dtype": torch.float32, "device": dev}
        self.x = torch.zeros(rows, d, **f32)
        self.q = torch.zeros(rows, d, dtype=dtype, device=dev)
        self.hid = torch.zeros(rows, f, dtype=dtype, device=dev)
        self.po = torch.zeros(2, rows, h, s, dh, **f32)
        self.lse = torch.zeros(2, rows, h, s, **f32)
        self.bar = torch.zeros(2, dtype=torch.int32, device=dev)
        self.err = torch.zeros(1, dtype=torch.int32, device=dev)
        self.resident_checked = False

    def _programs(self, device: torch.device) -> int:
        if self.config.programs:
            return self.config.programs
        if device.type == "cuda":
            return self.config.per_sm * sm_count(device)
        return 3  # the interpreter: a few programs, each walking several tiles

    def failed(self) -> bool:
        """True when a barrier timed out in a launch so far (a host sync)."""
        return bool(self.err.item())


def _block_n(n: int, k: int, programs: int) -> int:
    """Output columns per GEMV tile: the widest (<= MAX_TILE elements with K padded) that still
    gives every program a tile."""
    bn = max(1, MAX_TILE // next_power_of_2(k))
    while bn > 1 and cdiv(n, bn) < programs:
        bn //= 2
    return bn


def _check_resident(args: tuple, n_layer: int, launch: dict, programs: int, device) -> None:
    """Refuse a persistent grid whose programs cannot all be resident at once (its barriers
    would wait for programs that never start)."""
    compiled = _decoder_step_kernel.warmup(*args, 0, n_layer, 0, N_PHASES, grid=(programs,),
                                           **launch)  # fmt: skip
    per_sm = resident_programs_per_sm(compiled, device)
    if programs > per_sm * sm_count(device):
        raise UnsupportedOptionError(
            f"the persistent decoder step needs {programs} resident programs but only "
            f"{per_sm} per SM fit ({compiled.n_regs} registers x {launch['num_warps']} warps)"
        )


def decoder_step(
    stack: DecoderStack,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    state: StepState,
    *,
    sync: bool | None = None,
) -> torch.Tensor:
    """Run every layer of ``stack`` for one token per row; returns x, the (R, D) float32
    residual stream after the last layer (before the final LayerNorm).

    tokens, positions: (R,) integer tensors on the device (token ``tokens[r]`` at position
    ``positions[r]``; its k/v go into the self-attention cache there and it attends to cache
    entries [0, positions[r]]); state: this stack's :class:`StepState` for R rows (its ``x``
    is the output, overwritten). ``sync``: one persistent launch with grid barriers (default
    on a CUDA device), or one launch per (layer, phase) (default under the interpreter).
    No host sync: CUDA-graph safe.
    """
    rows, x = state.rows, state.x
    d, h, f = stack.dim, stack.n_head, stack.fc1_w.shape[1]
    for name, t in (("tokens", tokens), ("positions", positions)):
        if (
            tuple(t.shape) != (rows,)
            or t.dtype.is_floating_point
            or (rows > 1 and t.stride(0) != 1)
        ):
            raise ValueError(
                f"{name} must be a unit-stride integer ({rows},) tensor, got "
                f"{tuple(t.shape)} {t.dtype}"
            )
    check_launch(_decoder_step_kernel, x, tokens, positions, *stack.tensors())
    interp = interpreting()
    if sync is None:
        sync = x.is_cuda and not interp
    if sync and interp:
        raise UnsupportedOptionError(
            "the persistent decoder step cannot run under the interpreter (sync=False)"
        )
    cfg = state.config
    np_ = state.programs
    bn = [
        given or _block_n(n, k, np_)
        for given, (n, k) in zip(cfg.block_n, ((3 * d, d), (d, d), (f, d), (d, f)))
    ]
    dh = d // h
    dtype = stack.qkv_w.dtype
    n_self, n_cross = stack.self_k.shape[3], stack.cross_k.shape[3]
    s_pad = next_power_of_2(max(state.s_self, state.s_cross))
    args = (
        tokens, positions, stack.tok_emb, stack.pos_emb, x, state.q, state.hid,
        state.po[0], state.lse[0], state.po[1], state.lse[1], state.bar, state.err,
        stack.ln_w, stack.ln_b, stack.qkv_w, stack.qkv_b, stack.o_w, stack.o_b,
        stack.cq_w, stack.cq_b, stack.co_w, stack.co_b, stack.fc1_w, stack.fc1_b,
        stack.fc2_w, stack.fc2_b, stack.self_k, stack.self_v, stack.cross_k, stack.cross_v,
        stack.pos_emb.shape[0], stack.self_k.shape[1], n_self, stack.cross_k.shape[1], n_cross,
        float(stack.eps), math.log2(math.e) / math.sqrt(dh),
    )  # fmt: skip
    consts = dict(
        D=d, H=h, DH=dh, F=f, ROWS=rows, RB=next_power_of_2(rows),
        ACT=ACTIVATIONS[stack.activation], EMBED=True,
        S_SELF=state.s_self, S_CROSS=state.s_cross, S_PAD=s_pad, H_PAD=next_power_of_2(h),
        BLOCK_SELF=max(16, min(256, next_power_of_2(cdiv(n_self, state.s_self)))),
        BLOCK_CROSS=max(16, min(256, next_power_of_2(cdiv(n_cross, state.s_cross)))),
        BN_QKV=bn[0], BN_D=bn[1], BN_F1=bn[2], BN_F2=bn[3],
        KD=next_power_of_2(d), KF_PAD=next_power_of_2(f),
        ESIZE=torch.empty((), dtype=dtype).element_size(), MAX_SPIN=MAX_SPIN,
        SPIN=cfg.spin, PHASE_MASK=cfg.phase_mask,
        num_warps=cfg.num_warps, num_stages=1,
    )  # fmt: skip
    n = stack.n_layer
    if sync:
        launch = dict(SYNC=True, AHEAD=cfg.prefetch_ahead, **pdl_kwargs(x.device), **consts)
        if not state.resident_checked:
            _check_resident(args, n, launch, np_, x.device)
            state.resident_checked = True
        _decoder_step_kernel[(np_,)](*args, 0, n, 0, N_PHASES, **launch)
        return x
    for layer in range(n):
        for phase in range(N_PHASES):
            _decoder_step_kernel[(np_,)](
                *args, layer, layer + 1, phase, phase + 1, SYNC=False, AHEAD=0,
                USE_PDL=False, **consts,
            )  # fmt: skip
    return x


# --------------------------------------------------------------------------------------------
# Plain-torch reference
# --------------------------------------------------------------------------------------------


def _attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 softmax attention of q (H, Dh) over k, v (H, T, Dh)."""
    scores = torch.einsum("hd,htd->ht", q.float(), k.float()) / math.sqrt(q.shape[-1])
    return torch.einsum("ht,htd->hd", torch.softmax(scores, dim=-1), v.float())


def decoder_step_ref(
    stack: DecoderStack, tokens: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Reference for :func:`decoder_step`, written plainly: the same rounding points (float32
    residual, LayerNorm and GEMV outputs rounded to the weight dtype, float32 math elsewhere),
    the same in-place cache writes. Returns the (R, D) float32 residual stream."""
    dtype = stack.qkv_w.dtype
    d, h = stack.dim, stack.n_head
    dh = d // h
    act = {"identity": lambda t: t, "relu": F.relu, "gelu": F.gelu, "swish": F.silu}[
        stack.activation
    ]

    def ln(t: torch.Tensor, layer: int, j: int) -> torch.Tensor:
        w, b = stack.ln_w[layer, j], stack.ln_b[layer, j]
        return F.layer_norm(t, (d,), w, b, stack.eps).to(dtype).float()

    def lin(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(t.float(), w.float(), b.float())

    x = (stack.tok_emb[tokens].float() + stack.pos_emb[positions].float()).to(dtype).float()
    for layer in range(stack.n_layer):
        qkv = lin(ln(x, layer, 0), stack.qkv_w[layer], stack.qkv_b[layer]).to(dtype)
        outs = []
        for r in range(x.shape[0]):
            p = int(positions[r])
            q, k, v = (t.view(h, dh) for t in qkv[r].split(d))
            stack.self_k[layer, r, :, p] = k
            stack.self_v[layer, r, :, p] = v
            outs.append(
                _attend_ref(
                    q, stack.self_k[layer, r, :, : p + 1], stack.self_v[layer, r, :, : p + 1]
                )
            )
        att = torch.stack(outs).reshape(-1, d).to(dtype)
        x = x + lin(att, stack.o_w[layer], stack.o_b[layer])
        q = lin(ln(x, layer, 1), stack.cq_w[layer], stack.cq_b[layer]).to(dtype)
        outs = [
            _attend_ref(q[r].view(h, dh), stack.cross_k[layer, r], stack.cross_v[layer, r])
            for r in range(x.shape[0])
        ]
        att = torch.stack(outs).reshape(-1, d).to(dtype)
        x = x + lin(att, stack.co_w[layer], stack.co_b[layer])
        hid = act(lin(ln(x, layer, 2), stack.fc1_w[layer], stack.fc1_b[layer])).to(dtype)
        x = x + lin(hid, stack.fc2_w[layer], stack.fc2_b[layer])
    return x
