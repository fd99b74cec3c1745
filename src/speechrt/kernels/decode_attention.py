"""Decode attention: one query token per (row, head) against a static key/value cache.

Flash-decoding: the keys of one (cache row, head) are cut into ``num_splits`` contiguous chunks,
each program runs an online softmax (float32, base 2) over its chunk and writes its normalised
partial output with its log-sum-exp; a second kernel combines the partials with float32
log-sum-exp weights -- or, given a ``counters`` workspace, the last program of each (row, head)
to finish does (an acquire-release counter per (row, head), reset by that program). With one
split the first kernel writes the output directly.

Reading is bounded by a per-row length tensor on the device (``lengths[b]`` keys), so the launch
shape depends only on the cache's static size: the step stays host-sync free and CUDA-graph safe.
Two generic options serve decoders:

* ``group``: query row ``b`` reads cache row ``b // group`` (rows that share one cross-attention
  memory, e.g. beams of one audio); the ``group`` queries of a cache row are one tile, so the
  cache is read once per group;
* ``k_new`` / ``v_new`` (append): the new key/value of row ``b`` is written into the cache at
  position ``lengths[b] - 1`` by the program that owns that position, which uses it from
  registers (no separate scatter kernel, no read-after-write hazard);
* int8 caches (``k_scale`` / ``v_scale``): symmetric int8 keys/values with a float32 scale per
  (cache row, head, position), made by :func:`quantize_kv`, read half the bytes of a float16
  cache (Whisper's cross-attention K/V, about half of a batch-16 large-v3 step). A key tile is
  converted to q's dtype (exact: |k| <= 127) for the q.K dot, whose float32 scores are then
  multiplied by the key scales; a value tile is dequantized in registers (float32 * scale ->
  q's dtype) before the P.V dot (scaling p by the value scales instead would push small
  probabilities into float16 subnormals).

``decode_attention_ref`` is the plain-torch reference that tests and benchmarks import;
``dequantize_kv`` the int8 caches' dequantization that it (and model code) uses.
"""

from __future__ import annotations

import math

import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels._pdl import gdc_launch_dependents, gdc_wait, pdl_kwargs
from speechrt.kernels._utils import (
    FLOAT_DTYPES,
    MISSING_TL,
    MISSING_TRITON,
    cdiv,
    check_counters,
    check_launch,
    next_power_of_2,
    out_or_empty,
    sm_count,
)

try:  # Triton is optional: the reference works without it, the launcher needs it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton, tl = MISSING_TRITON, MISSING_TL

__all__ = [
    "decode_attention",
    "decode_attention_ref",
    "default_num_splits",
    "dequantize_kv",
    "quantize_kv",
]

PROGRAMS_PER_SM = 4  # default splits aim at this many programs per SM (H200 sweep, session 5)
# Software-pipeline stages of the key/value loop: decode_attention's ``num_stages`` default,
# read at each launch so that a benchmark can compare. Triton pipelines the K/V loads (and the
# int8 scales) when the head dim is a multiple of 16, which its integer specialization makes
# visible: the head-dim mask is then uniform over each vector (sm_90 TTGIR, session 13). Two
# stages were fastest on the H200 for float16 and int8 caches alike (3-4 gave nothing, session
# 14: bench/decode_attention_micro.py --stages).
NUM_STAGES = 2


# fmt: off
@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with float32 accumulation; UPCAST (interpreter, bfloat16) multiplies in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _attend_tile(q, k, v, n, lens, m_i, l_i, acc, kn, vn, pos, qk_scale, ks, vs,
                 APPEND: tl.constexpr, KV_INT8: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Online-softmax update of (m_i, l_i, acc) with the key/value tile k, v (BLOCK_N, BLOCK_D)
    at positions n; with APPEND, position pos takes the new entry kn, vn; with KV_INT8, k and v
    are int8 and ks, vs (BLOCK_N,) their float32 scales."""
    if APPEND:
        k = tl.where((n == pos)[:, None], kn[None, :], k)
        v = tl.where((n == pos)[:, None], vn[None, :], v)
    zero_s = tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32)
    if KV_INT8:  # k exact in q's dtype, its scales on the scores; v dequantized in registers
        s = _dot(q, tl.trans(k.to(q.dtype)), zero_s, UPCAST, PRECISION)  # (BLOCK_G, BLOCK_N)
        s = s * (ks * qk_scale)[None, :]
        v = (v.to(tl.float32) * vs[:, None]).to(q.dtype)
    else:
        s = _dot(q, tl.trans(k), zero_s, UPCAST, PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N)
    s = tl.where(n[None, :] < lens[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
    return m_new, l_i, acc


@triton.jit
def _load_tile(k_base, v_base, ks_base, vs_base, n, valid, d, d_ok, stride_kl, stride_vl,
               stride_ksl, stride_vsl, qk_scale, KV_INT8: tl.constexpr):
    """Key/value tile at positions n (BLOCK_N,), entries where ``valid`` is false read as 0;
    with KV_INT8 also their scales (else placeholders)."""
    mask = valid[:, None] & d_ok[None, :]
    k = tl.load(k_base + n[:, None] * stride_kl + d[None, :], mask=mask, other=0.0)
    v = tl.load(v_base + n[:, None] * stride_vl + d[None, :], mask=mask, other=0.0)
    if KV_INT8:
        ks = tl.load(ks_base + n * stride_ksl, mask=valid, other=0.0)  # (BLOCK_N,)
        vs = tl.load(vs_base + n * stride_vsl, mask=valid, other=0.0)
    else:
        ks, vs = qk_scale, qk_scale  # unused
    return k, v, ks, vs


@triton.jit
def _decode_attention_kernel(
    Q, K, V, KN, VN, LENS, O, LSE, FINAL, COUNT, KS, VS,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ksb, stride_ksh, stride_ksl,
    stride_vsb, stride_vsh, stride_vsl,
    stride_knb, stride_knh, stride_vnb, stride_vnh,
    stride_ob, stride_oh, stride_os,
    stride_fb, stride_fh,
    B, H, L, D, chunk, qk_scale, n_splits,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_LENS: tl.constexpr,
    APPEND: tl.constexpr,
    KV_INT8: tl.constexpr,
    PRELOAD: tl.constexpr,
    SPLIT: tl.constexpr,
    FUSE_COMBINE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # fmt: on
    """Program (cache row * H + head, split): the GROUP query rows of one cache row over the
    keys [split * chunk, min((split + 1) * chunk, max length of the group)).

    With PRELOAD (no append, no lengths: cross-attention over a memory written by earlier
    kernels, never by the one it waits for) the first key/value tile is loaded before
    ``gdc_wait``; on the H200 that took a one-row Whisper cross-attention from 8.3 to 6.9 us,
    while self-attention, whose tiles Triton pipelines inside the loop, got slower with it
    (bench/decode_attention_micro.py, session 6)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    kv_row = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    k_base = K + kv_row * stride_kb + h * stride_kh
    v_base = V + kv_row * stride_vb + h * stride_vh
    ks_base = KS + kv_row * stride_ksb + h * stride_ksh  # int8 caches' scales
    vs_base = VS + kv_row * stride_vsb + h * stride_vsh
    lo = split * chunk
    if PRELOAD:
        n = lo + tl.arange(0, BLOCK_N)
        k, v, ks, vs = _load_tile(k_base, v_base, ks_base, vs_base, n, n < L, d, d_ok,
                                  stride_kl, stride_vl, stride_ksl, stride_vsl, qk_scale, KV_INT8)
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    g = tl.arange(0, BLOCK_G)
    rows = kv_row * GROUP + g  # (BLOCK_G,) query rows
    row_ok = (g < GROUP) & (rows < B)
    if HAS_LENS:
        lens = tl.load(LENS + rows, mask=row_ok, other=0).to(tl.int32)
        lens = tl.minimum(tl.maximum(lens, 0), L)
    else:
        lens = tl.where(row_ok, L, 0)
    n_max = tl.max(lens, axis=0)
    hi = tl.minimum(lo + chunk, n_max)

    q = tl.load(Q + rows[:, None] * stride_qb + h * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    pos = n_max * 0  # placeholders unless APPEND
    kn = tl.zeros([BLOCK_D], dtype=K.dtype.element_ty)
    vn = kn
    if APPEND:  # GROUP == 1: cache row == query row; its new entry goes to position n_max - 1
        pos = n_max - 1
        kn = tl.load(KN + kv_row * stride_knb + h * stride_knh + d, mask=d_ok, other=0.0)
        vn = tl.load(VN + kv_row * stride_vnb + h * stride_vnh + d, mask=d_ok, other=0.0)
        pos_d = tl.full([BLOCK_D], 0, dtype=tl.int32) + pos  # vector: the interpreter's masks
        mine = d_ok & (pos_d >= lo) & (pos_d < hi)
        tl.store(k_base + pos * stride_kl + d, kn, mask=mine)
        tl.store(v_base + pos * stride_vl + d, vn, mask=mine)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    start0 = lo
    if PRELOAD:  # the preloaded first tile, entries past the length zeroed
        keep = (n < hi)[:, None]
        k, v = tl.where(keep, k, tl.zeros_like(k)), tl.where(keep, v, tl.zeros_like(v))
        if KV_INT8:
            ks, vs = tl.where(n < hi, ks, 0.0), tl.where(n < hi, vs, 0.0)
        m_i, l_i, acc = _attend_tile(q, k, v, n, lens, m_i, l_i, acc, kn, vn, pos, qk_scale,
                                     ks, vs, APPEND, KV_INT8, UPCAST, PRECISION)
        start0 = lo + BLOCK_N
    for start in range(start0, hi, BLOCK_N):  # K/V loads feed tl.dot: Triton pipelines them
        n = start + tl.arange(0, BLOCK_N)
        k, v, ks, vs = _load_tile(k_base, v_base, ks_base, vs_base, n, n < hi, d, d_ok,
                                  stride_kl, stride_vl, stride_ksl, stride_vsl, qk_scale,
                                  KV_INT8)
        m_i, l_i, acc = _attend_tile(q, k, v, n, lens, m_i, l_i, acc, kn, vn, pos, qk_scale,
                                     ks, vs, APPEND, KV_INT8, UPCAST, PRECISION)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # no visible key: output 0
    out = acc / l_safe[:, None]
    o_ptrs = O + rows[:, None] * stride_ob + h * stride_oh + split * stride_os + d[None, :]
    o_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))  # base 2
        tl.store(LSE + (rows * H + h) * n_splits + split, lse, mask=row_ok)
        tl.store(o_ptrs, out, mask=o_mask)
        if FUSE_COMBINE:  # the last split of this (cache row, head) to finish combines
            tl.debug_barrier()  # every thread's partial stores are done
            done = tl.atomic_add(COUNT + pid, 1, sem="acq_rel", scope="gpu")
            if done == n_splits - 1:
                for gi in range(GROUP):
                    row = kv_row * GROUP + gi
                    if row < B:
                        _combine_row(LSE + (row * H + h) * n_splits, O + row * stride_ob
                                     + h * stride_oh, FINAL + row * stride_fb + h * stride_fh,
                                     stride_os, D, n_splits, BLOCK_S, BLOCK_D, ".cg")
                tl.atomic_xchg(COUNT + pid, 0, sem="relaxed", scope="gpu")  # for the next launch
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)


@triton.jit
def _combine_row(LSE, PO, OUT, stride_ps, D, n_splits, BLOCK_S: tl.constexpr,
                 BLOCK_D: tl.constexpr, CACHE: tl.constexpr):
    """OUT[d] = sum_s 2^(lse_s - max) * PO[s, d] / sum_s 2^(lse_s - max) for one (row, head):
    LSE (n_splits,) base-2 log-sum-exps, PO split s at PO + s * stride_ps. CACHE: the loads'
    cache modifier (".cg" for partials other programs of this launch wrote: L2, never L1)."""
    s = tl.arange(0, BLOCK_S)
    s_ok = s < n_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    lse = tl.load(LSE + s, mask=s_ok, other=float("-inf"), cache_modifier=CACHE)
    po = tl.load(PO + s[:, None] * stride_ps + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                 other=0.0, cache_modifier=CACHE)  # (BLOCK_S, BLOCK_D)
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)  # (BLOCK_S,), 0 for empty splits
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * po, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(OUT + d, out.to(OUT.dtype.element_ty), mask=d_ok)


@triton.jit
def _combine_kernel(
    LSE, PO, O,
    stride_ob, stride_oh,
    H, D, n_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (row * H + head): the split partials combined by :func:`_combine_row`."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0).to(tl.int64)
    _combine_row(LSE + pid * n_splits, PO + pid * n_splits * D,
                 O + (pid // H) * stride_ob + (pid % H) * stride_oh, D, D, n_splits, BLOCK_S,
                 BLOCK_D, "")


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    return type(_decode_attention_kernel).__name__ == "InterpretedFunction"


def default_num_splits(programs: int, length: int, block_n: int, device: torch.device) -> int:
    """Splits per (cache row, head): about ``PROGRAMS_PER_SM`` programs per SM in all, at most
    one split per key tile. ``programs``: cache rows x heads; ``length``: cache size. On the
    H200 (bench/decode_attention_micro.py) Whisper's cross-attention ran 8.3 -> 6.7 us at one
    row (24 splits of 64 keys) and 44 -> 34 us at 16 rows (2 splits)."""
    sms = sm_count(device) if device.type == "cuda" else 4
    tiles = cdiv(max(length, 1), block_n)
    return max(1, min(cdiv(PROGRAMS_PER_SM * sms, max(programs, 1)), tiles))


def _check(q, k_cache, v_cache, lengths, k_new, v_new, group, k_scale, v_scale) -> None:
    tensors = (q, k_cache, v_cache, lengths, k_new, v_new, k_scale, v_scale)
    check_launch(_decode_attention_kernel, *[t for t in tensors if t is not None])
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"q must be (B, H, D) and k_cache/v_cache (Bk, H, L, D) alike; got {tuple(q.shape)}, "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    b, h, d = q.shape
    if k_cache.shape[1] != h or k_cache.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)}")
    kv_dtypes = {k_cache.dtype, v_cache.dtype}
    if q.dtype not in FLOAT_DTYPES or kv_dtypes not in ({q.dtype}, {torch.int8}):
        raise UnsupportedOptionError(
            f"decode attention takes one of float32/float16/bfloat16 for q, k, v (or int8 k, v "
            f"with scales); got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    _check_scales(k_cache, k_scale, v_scale, k_new)
    if group < 1 or cdiv(b, group) > k_cache.shape[0]:
        raise ValueError(f"{b} rows in groups of {group} need more than {k_cache.shape[0]} rows")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride on its last dim")
    if lengths is not None and (lengths.shape != (b,) or lengths.dtype.is_floating_point):
        raise ValueError(f"lengths must be an integer ({b},) tensor, got {tuple(lengths.shape)}")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new go together")
    if k_new is not None:
        if group != 1 or lengths is None:
            raise ValueError("k_new/v_new need group == 1 and lengths")
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t.shape != q.shape or t.dtype != q.dtype or t.stride(-1) != 1:
                raise ValueError(f"{name} must be a {tuple(q.shape)} {q.dtype} tensor like q")


def _check_scales(k_cache, k_scale, v_scale, k_new) -> None:
    """int8 caches need float32 (Bk, H, L) k_scale and v_scale; float caches take none."""
    if k_cache.dtype != torch.int8:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale/v_scale go with int8 caches, not {k_cache.dtype} ones")
        return
    if k_scale is None or v_scale is None:
        raise ValueError("int8 k_cache/v_cache need k_scale and v_scale")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t.shape != k_cache.shape[:3] or t.dtype != torch.float32:
            raise ValueError(
                f"{name} must be a float32 {tuple(k_cache.shape[:3])} tensor (the cache's "
                f"(Bk, H, L)), got {t.dtype} {tuple(t.shape)}"
            )
    if k_new is not None:
        raise UnsupportedOptionError(
            "k_new/v_new (append) need float caches: int8 caches are read-only (cross-attention)"
        )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    group: int = 1,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of one query per (row, head) over a key/value cache, reading ``lengths`` keys.

    Args:
        q: (B, H, D) queries; any strides on B and H (e.g. a slice of a fused QKV output).
        k_cache, v_cache: (Bk, H, L, D) caches, same dtype as q, or both int8 (with k_scale
            and v_scale); query row b reads cache row ``b // group``; any strides but a unit
            last one.
        lengths: (B,) int on the device: row b attends to keys [0, lengths[b]) (clamped to
            [0, L]); None: all L keys. A row with no key outputs 0.
        k_new, v_new: optional (B, H, D): written into the caches at position lengths[b] - 1
            before attending (needs ``group == 1`` and lengths >= 1).
        group: query rows per cache row.
        scale: score scale, default 1/sqrt(D).
        num_splits: key chunks per (cache row, head) (default :func:`default_num_splits`,
            which depends only on static shapes).
        block_n: key tile (default 64, 32 for D > 128; 256 under the interpreter).
        out: optional contiguous (B, H, D) output of q's dtype.
        counters: optional int32 workspace of at least ceil(B / group) * H zeros, owned by the
            caller and left zeroed: with it, the last split program of each (cache row, head)
            to finish combines the partials (one launch instead of two); launches that share
            it must not run concurrently (on one stream they never do).
        k_scale, v_scale: (Bk, H, L) float32 scales of int8 caches (any strides): key n of
            cache row r, head h is ``k_cache[r, h, n] * k_scale[r, h, n]`` (:func:`quantize_kv`
            makes both); None for float caches. int8 caches cannot take k_new/v_new.
        num_stages: software-pipeline stages of the key/value loop (default
            :data:`NUM_STAGES`); the same results either way.
    Returns:
        (B, H, D) in q's dtype (``out`` if given).
    """
    _check(q, k_cache, v_cache, lengths, k_new, v_new, group, k_scale, v_scale)
    stages = NUM_STAGES if num_stages is None else num_stages
    if not isinstance(stages, int) or stages < 1:
        raise UnsupportedOptionError(f"num_stages must be a positive integer, got {stages!r}")
    b, h, d = q.shape
    length = k_cache.shape[2]
    out = out_or_empty(out, (b, h, d), q.dtype, q.device)
    if out.numel() == 0:
        return out
    block_d = max(16, next_power_of_2(d))
    if block_n is None:  # the interpreter runs a tile as one numpy op: big tiles are cheap
        block_n = 256 if _interpreted() else 64 if block_d <= 128 else 32
    programs = cdiv(b, group) * h
    splits = num_splits or default_num_splits(programs, length, block_n, q.device)
    chunk = cdiv(cdiv(max(length, 1), splits), block_n) * block_n
    splits = cdiv(max(length, 1), chunk)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    fuse = splits > 1 and counters is not None
    if counters is not None:
        check_counters(counters, programs, q.device)
    if splits > 1:
        lse = torch.empty((b, h, splits), dtype=torch.float32, device=q.device)
        partial = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
        target, o_strides = partial, partial.stride()[:3]
    else:
        lse, target, o_strides = out, out, (*out.stride()[:2], 0)
    k_new = k_new if k_new is not None else q
    v_new = v_new if v_new is not None else q
    int8 = k_scale is not None
    k_scale = k_scale if int8 else lse  # placeholders for float caches (never read)
    v_scale = v_scale if int8 else lse
    # fmt: off
    _decode_attention_kernel[(programs, splits)](
        q, k_cache, v_cache, k_new, v_new, lengths if lengths is not None else q, target, lse,
        out, counters if fuse else lse, k_scale, v_scale,
        q.stride(0), q.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        *(k_scale.stride() if int8 else (0, 0, 0)), *(v_scale.stride() if int8 else (0, 0, 0)),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        *o_strides, out.stride(0), out.stride(1),
        b, h, length, d, chunk, scale * math.log2(math.e), splits,
        GROUP=group,
        BLOCK_G=max(16, next_power_of_2(group)),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        HAS_LENS=lengths is not None,
        APPEND=k_new is not q,
        KV_INT8=int8,
        PRELOAD=k_new is q and lengths is None,
        SPLIT=splits > 1,
        FUSE_COMBINE=fuse,
        BLOCK_S=next_power_of_2(splits),
        UPCAST=_interpreted() and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **pdl_kwargs(q.device),
        num_warps=4,
        num_stages=stages,
    )
    if splits > 1 and not fuse:
        _combine_kernel[(b * h,)](
            lse, partial, out,
            out.stride(0), out.stride(1),
            h, d, splits,
            BLOCK_S=next_power_of_2(splits),
            BLOCK_D=block_d,
            **pdl_kwargs(q.device),
            num_warps=2,
        )
    # fmt: on
    return out


# --------------------------------------------------------------------------------------------
# int8 caches (plain torch: run once per audio, not per step)
# --------------------------------------------------------------------------------------------


def quantize_kv(
    x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of each row of D of keys or values x (..., L, D) float.

    scale = max |x| / 127 over the row (float32; 1 for a row of zeros), q = round(x / scale)
    clamped to [-127, 127], so |q * scale - x| <= scale / 2. ``out``: (q_out, scale_out)
    buffers to fill, int8 (..., L, D) and float32 (..., L) of x's shape (e.g. a static cache's
    rows; the int8 output is then not allocated). Returns (q, scale).
    """
    if out is not None:
        q_out, scale_out = out
        if (
            q_out.shape != x.shape
            or q_out.dtype != torch.int8
            or scale_out.shape != x.shape[:-1]
            or scale_out.dtype != torch.float32
        ):
            raise ValueError(
                f"out must be int8 {tuple(x.shape)} and float32 {tuple(x.shape[:-1])} tensors, "
                f"got {q_out.dtype} {tuple(q_out.shape)}, {scale_out.dtype} "
                f"{tuple(scale_out.shape)}"
            )
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # (..., L)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # (..., L)
    q = xf / scale[..., None] if xf is x else xf.div_(scale[..., None])  # in place on a copy
    q = q.round_().clamp_(-127, 127)  # (..., L, D) float32 of integers
    if out is None:
        return q.to(torch.int8), scale
    out[0].copy_(q)
    out[1].copy_(scale)
    return out


def dequantize_kv(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """int8 keys or values q (..., L, D) times their float32 scales (..., L) -> (..., L, D)
    ``dtype`` (the product in float32, then cast)."""
    return (q.float() * scale[..., None]).to(dtype)


# --------------------------------------------------------------------------------------------
# Plain-torch reference
# --------------------------------------------------------------------------------------------


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    group: int = 1,
    scale: float | None = None,
    upcast: bool = True,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference for :func:`decode_attention` (same arguments, same in-place cache writes):
    a masked softmax over the gathered cache rows, in float32 when ``upcast``; int8 caches are
    first dequantized (:func:`dequantize_kv`, to q's dtype unless ``upcast``). (B, H, D)."""
    if k_scale is not None or v_scale is not None:
        if k_new is not None:
            raise UnsupportedOptionError("k_new/v_new (append) need float caches")
        kv_dtype = torch.float32 if upcast else q.dtype
        k_cache = dequantize_kv(k_cache, k_scale, kv_dtype)  # (Bk, H, L, D)
        v_cache = dequantize_kv(v_cache, v_scale, kv_dtype)  # (Bk, H, L, D)
    b, h, d = q.shape
    length = k_cache.shape[2]
    rows = torch.arange(b, device=q.device)
    lens = torch.full((b,), length, device=q.device) if lengths is None else lengths.long()
    lens = lens.clamp(0, length)
    if k_new is not None:
        pos = lens - 1  # (B,)
        k_cache[rows, :, pos] = k_new
        v_cache[rows, :, pos] = v_new
    k = k_cache[rows // group]  # (B, H, L, D)
    v = v_cache[rows // group]  # (B, H, L, D)
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.einsum("bhd,bhld->bhl", q, k) * scale  # (B, H, L)
    visible = torch.arange(length, device=q.device)[None, :] < lens[:, None]  # (B, L)
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without keys -> 0
    return torch.einsum("bhl,bhld->bhd", probs, v).to(dtype)
