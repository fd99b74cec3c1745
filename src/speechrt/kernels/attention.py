"""Flash-style multi-head attention with key lengths, chunk masks and WeNet relative positions.

One Triton kernel serves two launchers:

* :func:`rel_pos_attention` -- WeNet's ``RelPositionMultiHeadedAttention`` (no ``rel_shift``)::

      score[b, h, i, j] = ((q_i + u_h) . k_j + (q_i + v_h) . p_j) * scale

  rewritten as standard attention with keys ``k'_j = k_j + p_j`` and a per-key additive bias
  ``c_j = u_h . k_j + v_h . p_j``::

      score[b, h, i, j] = (q_i . k'_j + c_j) * scale

  ``k'`` and ``c`` are formed in registers from the ``k`` and ``p`` tiles (no extra HBM tensor).
* :func:`attention` -- plain attention (key padding, optional causal mask) for the attention
  decoder; the same kernel with the position terms compiled out.

Masks are never materialised: the kernel takes ``key_lengths`` (B,) and the chunk parameters and
skips key tiles that no query of the block can see. Softmax runs online in float32 (flash
attention); masked probabilities are 0 and a query row with no visible key outputs 0, as WeNet's
``masked_fill(mask, 0)`` after a NaN softmax does.

``rel_pos_attention_ref`` / ``attention_ref`` are the plain-torch references (WeNet's formula with
an explicit boolean mask) that tests and benchmarks import.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels._pdl import pdl_enter, pdl_kwargs
from speechrt.kernels._utils import MISSING_TL, MISSING_TRITON, check_launch, out_or_empty

try:  # Triton is optional: the references work without it, the launchers need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton, tl = MISSING_TRITON, MISSING_TL

__all__ = [
    "AttentionConfig",
    "attention",
    "attention_ref",
    "rel_pos_attention",
    "rel_pos_attention_ref",
    "visibility_mask",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # any head dim up to this; tiles pad it to a power of two (masked)


@dataclass(frozen=True)
class AttentionConfig:
    """Launch configuration of the attention kernel (tile sizes and pipelining)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"AttentionConfig.{name} must be a power of two >= 16, got {val}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(
                f"AttentionConfig.num_warps must be 1..16 (power of 2), got {self.num_warps}"
            )
        if self.num_stages < 1:
            raise ValueError(f"AttentionConfig.num_stages must be >= 1, got {self.num_stages}")


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; UPCAST feeds fp32 operands (same products).

    UPCAST is only set under TRITON_INTERPRET for bfloat16, where the interpreter's dot
    multiplies raw bf16 bit patterns (triton-lang/triton#11584); bf16 products are exact in
    fp32, so results match the tensor-core dot up to summation order.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _dot_tf32(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b on float32 operands in TF32 (10 mantissa bits per operand, fp32 range);
    IEEE float32 under the interpreter (UPCAST)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")


# fmt: off
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, P, BU, BV, KLEN, Out,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_pt, stride_ph,
    stride_buh, stride_bvh,
    stride_ob, stride_ot, stride_oh,
    H, Tq, Tk, qk_scale,
    chunk_size, num_left_chunks, q_offset,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    REL_POS: tl.constexpr,
    CHUNK: tl.constexpr,
    LEFT_LIMIT: tl.constexpr,
    CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    TF32_DOTS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # fmt: on
    pdl_enter(USE_PDL)
    """One (query block, batch*head) program; online softmax over the visible key tiles.

    ``qk_scale`` is ``scale * log2(e)`` (softmax in base 2). Query i sits at key position
    ``q_offset + i`` for the chunk and causal masks.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)  # head dim padded to a power of two, masked
    d_ok = offs_d < HEAD_DIM
    offs_n0 = tl.arange(0, BLOCK_N)
    q_pos = offs_m + q_offset  # key position of each query row

    kv_len = tl.load(KLEN + b).to(tl.int32)
    kv_len = tl.maximum(tl.minimum(kv_len, Tk), 0)

    # Key window [lo, hi) that at least one (real) query row of this block can see.
    first_pos = pid_m * BLOCK_M + q_offset
    last_pos = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq) - 1 + q_offset
    lo = 0
    hi = kv_len
    if CHUNK:
        hi = tl.minimum(hi, (last_pos // chunk_size + 1) * chunk_size)
        if LEFT_LIMIT:
            lo = tl.maximum((first_pos // chunk_size - num_left_chunks) * chunk_size, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(hi, last_pos + 1)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Tq) & d_ok[None, :], other=0.0)

    if REL_POS:
        bias_u = tl.load(BU + h * stride_buh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        bias_v = tl.load(BV + h * stride_bvh + offs_d, mask=d_ok, other=0.0).to(tl.float32)

    if CHUNK:
        chunk_idx = q_pos // chunk_size
        row_hi = (chunk_idx + 1) * chunk_size
        if LEFT_LIMIT:
            row_lo = (chunk_idx - num_left_chunks) * chunk_size

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    zero_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        key_ok = offs_n < kv_len  # padded keys are never read
        kd_ok = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=kd_ok, other=0.0)
        if REL_POS:
            p = tl.load(P + h * stride_ph + offs_n[:, None] * stride_pt + offs_d[None, :],
                        mask=kd_ok, other=0.0).to(tl.float32)
            k32 = k.to(tl.float32)
            k_eff = k32 + p  # k' = k + p   (BLOCK_N, BLOCK_D) float32
            c = tl.sum(k32 * bias_u[None, :] + p * bias_v[None, :], axis=1)  # (BLOCK_N,)
            if TF32_DOTS:
                s = _dot_tf32(q, tl.trans(k_eff), zero_s, UPCAST_DOT)
            else:
                s = _dot(q, tl.trans(k_eff.to(q.dtype)), zero_s, UPCAST_DOT, INPUT_PRECISION)
            s = (s + c[None, :]) * qk_scale
        else:
            s = _dot(q, tl.trans(k), zero_s, UPCAST_DOT, INPUT_PRECISION) * qk_scale

        visible = key_ok[None, :]
        if CHUNK:
            visible = visible & (offs_n[None, :] < row_hi[:, None])
            if LEFT_LIMIT:
                visible = visible & (offs_n[None, :] >= row_lo[:, None])
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        prob = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :],
                    mask=kd_ok, other=0.0)
        acc = acc * alpha[:, None]
        if TF32_DOTS:
            acc = _dot_tf32(prob, v, acc, UPCAST_DOT)
        else:
            acc = _dot(prob.to(v.dtype), v, acc, UPCAST_DOT, INPUT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # fully masked rows: acc == 0 -> output 0
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Tq) & d_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """True when the kernel was built by Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_attention_fwd_kernel).__name__ == "InterpretedFunction"


@functools.cache
def _default_config(head_dim: int, dtype: torch.dtype, tq: int, interpret: bool) -> AttentionConfig:
    """Deterministic tile choice per (head_dim, dtype, query length); cached per shape.

    On an H200 (Triton 3.6, fp16, H=4, Dk=64) ``bench/attention_micro.py --autotune`` picked
    128x64, 8 warps, 3 stages for B=64, T=1024 (this default); smaller shapes are bound by launch
    overhead and every config times alike. The interpreter prefers big tiles (fewer steps).
    """
    if interpret:
        return AttentionConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return AttentionConfig(block_m=16 if tq <= 16 else 64, block_n=32, num_warps=4,
                               num_stages=2)
    if tq <= 16:
        return AttentionConfig(block_m=16, block_n=64, num_warps=4, num_stages=3)
    if tq <= 64:
        return AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    if head_dim > 128:
        return AttentionConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    return AttentionConfig(block_m=128, block_n=64, num_warps=8,
                           num_stages=2 if head_dim > 64 else 3)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_lengths: torch.Tensor) -> None:
    check_launch(_attention_fwd_kernel, q, k, v, key_lengths)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, T, H, Dk); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                         f"match as (B, Tq, H, Dk), (B, Tk, H, Dk), (B, Tk, H, Dk)")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise UnsupportedOptionError(f"attention kernel supports float32/float16/bfloat16 with "
                                     f"one dtype for q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise UnsupportedOptionError(f"attention kernel supports head dims 1..{MAX_HEAD_DIM}; "
                                     f"got {q.shape[-1]}")
    if key_lengths.shape != (q.shape[0],) or key_lengths.dtype.is_floating_point:
        raise ValueError(f"key_lengths must be an integer tensor of shape ({q.shape[0]},); got "
                         f"{key_lengths.dtype} {tuple(key_lengths.shape)}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor,
            pos: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, *, scale: float | None,
            chunk_size: int, num_left_chunks: int, q_offset: int, causal: bool,
            allow_tf32: bool, config: AttentionConfig | None,
            out: torch.Tensor | None, tf32_dots: bool = False) -> torch.Tensor:
    """Shared launcher; ``pos`` is ``(p, pos_bias_u, pos_bias_v)`` or None (no position terms)."""
    _check_inputs(q, k, v, key_lengths)
    if q_offset < 0:
        raise ValueError(f"key/query offset must be >= 0, got {q_offset}")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    batch, tq, heads, head_dim = q.shape
    tk = k.shape[1]
    out = out_or_empty(out, (batch, tq, heads, head_dim), q.dtype, q.device)
    if out.numel() == 0:
        return out
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    interpret = _interpreted()
    cfg = config or _default_config(head_dim, q.dtype, tq, interpret)

    if pos is not None:
        p, bias_u, bias_v = (_last_dim_contiguous(t) for t in pos)
        p_strides = (p.stride(0), p.stride(1))
        bias_strides = (bias_u.stride(0), bias_v.stride(0))
    else:
        p, bias_u, bias_v = q, q, q  # never read: REL_POS is compiled out
        p_strides = bias_strides = (0, 0)

    grid = (triton.cdiv(tq, cfg.block_m), batch * heads)
    # fmt: off
    _attention_fwd_kernel[grid](
        q, k, v, p, bias_u, bias_v, key_lengths, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *p_strides, *bias_strides,
        out.stride(0), out.stride(1), out.stride(2),
        heads, tq, tk, scale * math.log2(math.e),
        max(chunk_size, 1), num_left_chunks, q_offset,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        REL_POS=pos is not None,
        CHUNK=chunk_size > 0,
        LEFT_LIMIT=chunk_size > 0 and num_left_chunks >= 0,
        CAUSAL=causal,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 and not allow_tf32 else "tf32",
        UPCAST_DOT=(q.dtype == torch.bfloat16 or tf32_dots) and interpret,
        TF32_DOTS=tf32_dots and q.dtype != torch.float32,
        **pdl_kwargs(q.device, grid[0] * grid[1]),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    # fmt: on
    return out


def _check_pos(p: torch.Tensor, bias_u: torch.Tensor, bias_v: torch.Tensor,
               k: torch.Tensor) -> None:
    tk, heads, head_dim = k.shape[1:]
    if p.shape != (tk, heads, head_dim):
        raise ValueError(f"p must be (Tk, H, Dk) = {(tk, heads, head_dim)}; got {tuple(p.shape)}")
    for name, t in (("pos_bias_u", bias_u), ("pos_bias_v", bias_v)):
        if t.shape != (heads, head_dim):
            raise ValueError(f"{name} must be (H, Dk) = {(heads, head_dim)}; got {tuple(t.shape)}")
    for name, t in (("p", p), ("pos_bias_u", bias_u), ("pos_bias_v", bias_v)):
        if not t.dtype.is_floating_point or t.device != k.device:
            raise ValueError(f"{name} must be a float tensor on {k.device}; got {t.dtype} on "
                             f"{t.device}")


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor,
    pos_bias_u: torch.Tensor,
    pos_bias_v: torch.Tensor,
    key_lengths: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 0,
    num_left_chunks: int = -1,
    key_offset: int = 0,
    allow_tf32: bool = False,
    tf32_dots: bool = False,
    config: AttentionConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """WeNet relative-position self-attention (no rel_shift) with length and chunk masks.

    Args:
        q: (B, Tq, H, Dk) queries; any strides on B/T/H (e.g. a slice of a fused QKV output
            (B, T, 3, H, Dk)); a non-contiguous last dim is copied.
        k, v: (B, Tk, H, Dk) keys and values, same dtype as q (fp32, fp16 or bf16).
        p: (Tk, H, Dk) projected positional embedding, one row per key position.
        pos_bias_u, pos_bias_v: (H, Dk) WeNet's pos_bias_u / pos_bias_v.
        key_lengths: (B,) int; keys j >= key_lengths[b] are masked.
        scale: score scale, default 1/sqrt(Dk).
        chunk_size: > 0 applies WeNet's subsequent_chunk_mask: query i (at key position
            key_offset + i) sees keys of its own chunk and the ``num_left_chunks`` chunks before it
            (all earlier chunks if ``num_left_chunks < 0``).
        num_left_chunks: see chunk_size.
        key_offset: number of keys before the first query (streaming with a key cache). With
            ``chunk_size == 0`` every valid key is visible and this has no effect.
        allow_tf32: use TF32 tensor cores for float32 inputs (default exact IEEE).
        tf32_dots: half inputs (meant for bfloat16): both products run on float32 operands in
            TF32, so ``k + p`` and the softmax probabilities keep 10 mantissa bits instead of
            being rounded to the input dtype (bfloat16: 7) -- about twice the dot cost.
        config: tile sizes / warps / stages; default a cached heuristic per shape.
        out: optional contiguous (B, Tq, H, Dk) output buffer (dtype of q), written in place.

    Returns:
        (B, Tq, H, Dk) contiguous (``out`` if given), dtype of q. Rows with no visible key are 0.
    """
    _check_pos(p, pos_bias_u, pos_bias_v, k)
    return _launch(q, k, v, key_lengths, (p, pos_bias_u, pos_bias_v), scale=scale,
                   chunk_size=chunk_size, num_left_chunks=num_left_chunks, q_offset=key_offset,
                   causal=False, allow_tf32=allow_tf32, config=config, out=out,
                   tf32_dots=tf32_dots)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    query_offset: int = 0,
    allow_tf32: bool = False,
    config: AttentionConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention with key padding from lengths and an optional causal mask.

    Args:
        q: (B, Tq, H, Dk); k, v: (B, Tk, H, Dk); any strides on B/T/H, same dtype.
        key_lengths: (B,) int; keys j >= key_lengths[b] are masked.
        causal: key j is visible to query i iff j <= i + query_offset.
        scale: default 1/sqrt(Dk).
        query_offset: key position of the first query (cached decoder steps).
        allow_tf32, config, out: as in :func:`rel_pos_attention`.

    Returns:
        (B, Tq, H, Dk) contiguous (``out`` if given), dtype of q. Rows with no visible key are 0.
    """
    return _launch(q, k, v, key_lengths, None, scale=scale, chunk_size=0, num_left_chunks=-1,
                   q_offset=query_offset, causal=causal, allow_tf32=allow_tf32, config=config,
                   out=out)


# --------------------------------------------------------------------------------------------
# Plain-torch references
# --------------------------------------------------------------------------------------------


def visibility_mask(
    key_lengths: torch.Tensor,
    tq: int,
    tk: int,
    *,
    chunk_size: int = 0,
    num_left_chunks: int = -1,
    causal: bool = False,
    query_offset: int = 0,
) -> torch.Tensor:
    """Boolean (B, Tq, Tk) mask, True where query i may attend to key j.

    Combines key padding (j < key_lengths[b]), WeNet's subsequent_chunk_mask for query position
    ``query_offset + i`` (when chunk_size > 0) and the causal mask j <= query_offset + i.
    """
    dev = key_lengths.device
    j = torch.arange(tk, device=dev)  # (Tk,)
    pos = torch.arange(tq, device=dev) + query_offset  # (Tq,)
    mask = (j[None, :] < key_lengths.to(dev).long()[:, None])[:, None, :]  # (B, 1, Tk)
    if chunk_size > 0:
        chunk = pos // chunk_size  # (Tq,)
        window = j[None, :] < torch.clamp((chunk + 1) * chunk_size, max=tk)[:, None]
        if num_left_chunks >= 0:
            start = torch.clamp((chunk - num_left_chunks) * chunk_size, min=0)
            window = window & (j[None, :] >= start[:, None])
        mask = mask & window[None]  # (B, Tq, Tk)
    if causal:
        mask = mask & (j[None, :] <= pos[:, None])[None]
    return mask.expand(key_lengths.shape[0], tq, tk)


def _masked_softmax_av(scores: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WeNet's forward_attention: scores (B, H, Tq, Tk), v (B, Tk, H, Dk), mask (B, Tq, Tk)."""
    hidden = ~mask[:, None]  # (B, 1, Tq, Tk)
    scores = scores.masked_fill(hidden, float("-inf"))
    attn = torch.softmax(scores, dim=-1).masked_fill(hidden, 0.0)
    return torch.matmul(attn, v.transpose(1, 2)).transpose(1, 2)  # (B, Tq, H, Dk)


def rel_pos_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor,
    pos_bias_u: torch.Tensor,
    pos_bias_v: torch.Tensor,
    key_lengths: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 0,
    num_left_chunks: int = -1,
    key_offset: int = 0,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference for :func:`rel_pos_attention`: WeNet's two-matrix formula with an explicit mask.

    ``upcast=True`` computes in float32 (float64 inputs stay float64); ``upcast=False`` computes
    in the input dtype, as WeNet does in half precision. Returns (B, Tq, H, Dk), dtype of q.
    """
    dtype = q.dtype
    if upcast:
        ct = torch.promote_types(dtype, torch.float32)
        q, k, v, p = (t.to(ct) for t in (q, k, v, p))
        pos_bias_u, pos_bias_v = pos_bias_u.to(ct), pos_bias_v.to(ct)
    else:
        pos_bias_u, pos_bias_v = pos_bias_u.to(dtype), pos_bias_v.to(dtype)
    q_u = (q + pos_bias_u).transpose(1, 2)  # (B, H, Tq, Dk)
    q_v = (q + pos_bias_v).transpose(1, 2)  # (B, H, Tq, Dk)
    matrix_ac = torch.matmul(q_u, k.permute(0, 2, 3, 1))  # (B, H, Tq, Tk)
    matrix_bd = torch.matmul(q_v, p.permute(1, 2, 0))  # (B, H, Tq, Tk)
    scores = matrix_ac + matrix_bd
    scores = scores / math.sqrt(q.shape[-1]) if scale is None else scores * scale
    mask = visibility_mask(key_lengths, q.shape[1], k.shape[1], chunk_size=chunk_size,
                           num_left_chunks=num_left_chunks, query_offset=key_offset)
    return _masked_softmax_av(scores, v, mask).to(dtype)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    query_offset: int = 0,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference for :func:`attention` (WeNet's MultiHeadedAttention with an explicit mask).

    Returns (B, Tq, H, Dk), dtype of q; ``upcast`` as in :func:`rel_pos_attention_ref`.
    """
    dtype = q.dtype
    if upcast:
        ct = torch.promote_types(dtype, torch.float32)
        q, k, v = (t.to(ct) for t in (q, k, v))
    scores = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1))  # (B, H, Tq, Tk)
    scores = scores / math.sqrt(q.shape[-1]) if scale is None else scores * scale
    mask = visibility_mask(key_lengths, q.shape[1], k.shape[1], causal=causal,
                           query_offset=query_offset)
    return _masked_softmax_av(scores, v, mask).to(dtype)
