"""Mixture-of-experts feed-forward: router and grouped expert GEMMs (Triton), with torch references.

Three steps, none of which synchronises with the host (CUDA-graph safe):

1. :func:`moe_route` -- one kernel: router logits ``[embed, x] @ W (+ bias)`` accumulated in
   float32, a float32 softmax over *all* experts (row max subtracted, so large logits cannot
   overflow), and the top-k experts per row with their probabilities (optionally renormalised over
   the k). 3M-ASR's SpeechMoE routing is top-1 without renormalisation; WeNet's ``MoEFFNLayer``
   (softmax over the k selected logits) is top-k with renormalisation -- the same numbers, since
   ``exp(z_i) / sum_sel exp(z_j) = p_i / sum_sel p_j``. Experts are picked from the logits, so
   ties go to the lowest expert index (``torch.max``'s rule).
2. :func:`moe_sort` -- a stable counting sort of the (row, slot) assignments by expert: per block
   of rows a histogram, then each block's rows placed at (rows of lower experts) + (rows of its
   expert in earlier blocks) + (rank in the block, a cumulative sum of one-hot rows). Gives
   ``order`` (N*K,) assignment ids grouped by expert and ``offsets`` (E+1,) in two launches (one
   when a single block holds every row) instead of torch's sort + searchsorted (about seven).
3. :func:`moe_experts` -- two grouped GEMM launches covering every expert at once. The grid has
   one program per (row tile, column tile) with ``cdiv(N*K, BLOCK_M) + E - 1`` row tiles, an
   upper bound of ``sum_e cdiv(count_e, BLOCK_M)``; each program finds its expert from
   ``offsets`` (a cumulative sum of tile counts) and idle programs exit, so empty experts, one
   expert taking every token and odd counts need no host-side sizes. With
   ``GemmConfig.per_sm`` > 0 the same kernels run persistent instead: a 1-D grid of
   ``per_sm`` x SMs programs walks the real (row tile, column tile) list, counted on the GPU
   from ``offsets``, in a flattened loop that issues the next tile's loads under this tile's
   epilogue (opt-in: slower than the tiled grid at every configuration on the H200, session
   14).
   * up:   ``h = act(x[token] @ W1[e]^T + b1[e])`` for the sorted rows (gathered from x);
   * down: ``y = gate * (h @ W2[e]^T + b2[e])`` stored at the assignment's original row.
   With k > 1 the k rows of a token are summed afterwards in float32 (deterministic, no atomics).

Weights are read in the layout they are stored in: W1 (E, H, D), b1 (E, H), W2 (E, D, H),
b2 (E, D), i.e. per expert exactly an ``nn.Linear`` (``FMoELinear`` in 3M-ASR). Float32 inputs
use IEEE float32 dots (no TF32); float16/bfloat16 use tensor cores with float32 accumulation.

``moe_route_ref``, ``moe_sort_ref`` and ``moe_experts_ref`` are the plain-torch references (a loop
over experts with masks) that tests and benchmarks import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels._activations import ACTIVATIONS, activate
from speechrt.kernels._utils import (
    MISSING_TL,
    MISSING_TRITON,
    cdiv,
    check_float,
    check_launch,
    dot_precision,
    interpreting,
    next_power_of_2,
    sm_count,
)

try:  # Triton is optional: the references work without it, the launchers need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton, tl = MISSING_TRITON, MISSING_TL

__all__ = [
    "ACTIVATIONS",
    "GemmConfig",
    "RouteResult",
    "moe_experts",
    "moe_experts_ref",
    "moe_route",
    "moe_route_ref",
    "moe_sort",
    "moe_sort_ref",
]

# Activations the expert kernel fuses (code passed as a constexpr).
MAX_EXPERTS = 256
MAX_TOP_K = 8


@dataclass(frozen=True)
class RouteResult:
    """Router output for N rows and k experts per row.

    gate_idx: (N, K) chosen experts, best first (int32 from the kernel, int64 from the reference).
    gate_val: (N, K) float32 their softmax probabilities (renormalised over the k if asked).
    logits: (N, E) float32 router logits, or None when not requested.
    """

    gate_idx: torch.Tensor
    gate_val: torch.Tensor
    logits: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _route_kernel(
    X, EMB, W, BIAS, LOGITS, IDX, VAL,
    n_rows, D, DE, E,
    stride_x, stride_emb, stride_w,
    HAS_EMB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    TOP_K: tl.constexpr,
    RENORM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_TOPK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    # Router rows 0..DE-1 act on the embedding, rows DE..DE+D-1 on x (3M-ASR's concat order).
    if HAS_EMB:
        for k0 in range(0, DE, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < DE
            a = tl.load(EMB + rows64[:, None] * stride_emb + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + ks[:, None] * stride_w + cols[None, :],
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(X + rows64[:, None] * stride_x + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + (DE + ks)[:, None] * stride_w + cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if STORE_LOGITS:
        tl.store(LOGITS + rows64[:, None] * E + cols[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])
    # Softmax over all E experts, max subtracted first (exp never overflows).
    z = tl.where(col_ok[None, :], acc, float("-inf"))
    m = tl.max(z, axis=1)
    p = tl.exp(z - m[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    slots = tl.arange(0, BLOCK_TOPK)
    sel_idx = tl.zeros((BLOCK_M, BLOCK_TOPK), dtype=tl.int32)
    sel_val = tl.zeros((BLOCK_M, BLOCK_TOPK), dtype=tl.float32)
    for i in tl.static_range(TOP_K):
        best = tl.argmax(z, axis=1, tie_break_left=True).to(tl.int32)  # (BLOCK_M,)
        hit = cols[None, :] == best[:, None]
        val = tl.sum(tl.where(hit, p, 0.0), axis=1)
        sel_idx = tl.where(slots[None, :] == i, best[:, None], sel_idx)
        sel_val = tl.where(slots[None, :] == i, val[:, None], sel_val)
        z = tl.where(hit, float("-inf"), z)
    if RENORM:
        sel_val = sel_val / tl.sum(sel_val, axis=1)[:, None]
    out = rows64[:, None] * TOP_K + slots[None, :]
    smask = row_ok[:, None] & (slots < TOP_K)[None, :]
    tl.store(IDX + out, sel_idx, mask=smask)
    tl.store(VAL + out, sel_val, mask=smask)


@triton.jit
def _sort_count_kernel(IDX, COUNTS, n, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """COUNTS[b, e]: rows of block b (BLOCK ids) that chose expert e."""
    b = tl.program_id(0)
    es = tl.arange(0, BLOCK_E)
    i = b * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(IDX + i, mask=i < n, other=-1).to(tl.int32)
    counts = tl.sum((ids[:, None] == es[None, :]).to(tl.int32), axis=0)
    tl.store(COUNTS + b * BLOCK_E + es, counts)


@triton.jit
def _sort_place_kernel(
    IDX, COUNTS, ORDER, OFFS, n, E, n_blocks,
    ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    """ORDER[pos] = i for every id of block b; block 0 also writes OFFS (E+1,).

    ONE_BLOCK: a single block holds all n ids, its counts are computed here (no COUNTS)."""
    b = tl.program_id(0)
    es = tl.arange(0, BLOCK_E)
    i = b * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(IDX + i, mask=i < n, other=-1).to(tl.int32)
    hit = (ids[:, None] == es[None, :]).to(tl.int32)  # (BLOCK, BLOCK_E) one-hot
    if ONE_BLOCK:
        total = tl.sum(hit, axis=0)
        before = tl.zeros((BLOCK_E,), dtype=tl.int32)
    else:
        bs = tl.arange(0, BLOCK_NB)
        counts = tl.load(COUNTS + bs[:, None] * BLOCK_E + es[None, :],
                         mask=(bs < n_blocks)[:, None], other=0)  # (BLOCK_NB, BLOCK_E)
        total = tl.sum(counts, axis=0)
        before = tl.sum(tl.where((bs < b)[:, None], counts, 0), axis=0)
    first = tl.cumsum(total, axis=0) - total  # exclusive; first[E] = n (no id is >= E)
    if b == 0:
        tl.store(OFFS + es, first, mask=es <= E)
    rank = tl.cumsum(hit, axis=0)  # 1-based rank among the block's rows of that expert
    pos = tl.sum(tl.where(hit == 1, (first + before)[None, :] + rank - 1, 0), axis=1)
    tl.store(ORDER + pos, i, mask=i < n)


@triton.jit
def _expert_table(OFFS, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per-expert (BLOCK_E,) vectors: first sorted row, end row, row tiles ``cdiv(count, BLOCK_M)``
    and their inclusive cumulative sum (lanes >= E own no tiles)."""
    es = tl.arange(0, BLOCK_E)
    e_ok = es < E
    start = tl.load(OFFS + es, mask=e_ok, other=0)
    end = tl.load(OFFS + es + 1, mask=e_ok, other=0)
    tiles = (end - start + BLOCK_M - 1) // BLOCK_M
    return start, end, tiles, tl.cumsum(tiles, axis=0)


@triton.jit
def _row_tile(rt, start, end, tiles, cum, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row tile ``rt`` of :func:`_expert_table`: (expert, first sorted row, end row); expert == E
    past the last tile. Expert e owns ``tiles[e]`` consecutive tiles; tile rt belongs to the
    expert whose cumulative tile count first exceeds rt (empty experts own none)."""
    es = tl.arange(0, BLOCK_E)
    e = tl.sum(((es < E) & (cum <= rt)).to(tl.int32), axis=0)
    mine = es == e
    first_tile = tl.sum(tl.where(mine, cum - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(mine, start, 0), axis=0) + (rt - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, end, 0), axis=0)
    return e, row_start, row_end


@triton.jit
def _expert_tile_dot(
    A, a_idx, stride_a, row_ok, w_base, ns, n_ok, K, stride_wn,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) float32 tile of A @ W_e^T: rows ``a_idx`` (BLOCK_M,) int64 of A (K
    contiguous values each, ``stride_a`` apart), ``w_base`` the expert's (N, K) weight, ``ns`` its
    output rows. The row addresses are formed here, from a kernel argument's stride, not passed
    in as pointers: in the persistent kernels' flattened loop a carried pointer tensor loses its
    alignment and Triton 3.6 would not pipeline A's loads (seen in the sm_90 TTGIR)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(A + a_idx[:, None] * stride_a + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_base + ns[None, :] * stride_wn + ks[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _up_tile(
    X, ORDER, W1, B1, H, e, row_start, row_end, col_tile,
    D, HID, top_k, stride_x, stride_we, stride_wn, stride_be, stride_h,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One up-projection tile: sorted rows [row_start, row_end) of expert e (gathered from X by
    token), column tile ``col_tile`` of H."""
    rows = row_start + tl.arange(0, BLOCK_M)  # positions in the sorted order
    row_ok = rows < row_end
    assign = tl.load(ORDER + rows, mask=row_ok, other=0)
    tok = (assign // top_k).to(tl.int64)
    ns = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < HID
    w_base = W1 + e.to(tl.int64) * stride_we
    acc = _expert_tile_dot(X, tok, stride_x, row_ok, w_base, ns, n_ok, D, stride_wn,
                           UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(B1 + e.to(tl.int64) * stride_be + ns, mask=n_ok,
                       other=0.0).to(tl.float32)[None, :]
    acc = activate(acc, ACT)
    tl.store(H + rows.to(tl.int64)[:, None] * stride_h + ns[None, :],
             acc.to(H.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_tile(
    HS, ORDER, GATE, W2, B2, Y, e, row_start, row_end, col_tile,
    D, HID, stride_h, stride_we, stride_wn, stride_be, stride_y,
    HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One down-projection tile: sorted hidden rows [row_start, row_end) of expert e, column
    tile ``col_tile`` of Y, each row stored (gate-scaled) at its assignment's original row."""
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    assign = tl.load(ORDER + rows, mask=row_ok, other=0).to(tl.int64)
    ns = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < D
    w_base = W2 + e.to(tl.int64) * stride_we
    acc = _expert_tile_dot(HS, rows.to(tl.int64), stride_h, row_ok, w_base, ns, n_ok, HID,
                           stride_wn, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(B2 + e.to(tl.int64) * stride_be + ns, mask=n_ok,
                       other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        acc *= tl.load(GATE + assign, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(Y + assign[:, None] * stride_y + ns[None, :],
             acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _expert_up_kernel(
    X, ORDER, OFFS, W1, B1, H,
    D, HID, E, top_k,
    stride_x, stride_we, stride_wn, stride_be, stride_h,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PROGRAMS: tl.constexpr,
):
    """Grouped up-projection. PROGRAMS == 0: one program per (row tile, column tile) of the
    grid, idle past the last row tile. PROGRAMS > 0: persistent, a 1-D grid of PROGRAMS;
    program p takes tiles p, p + PROGRAMS, ... of the (row tile, column tile) list (column tiles
    fastest) and the flattened loop lets the pipeliner issue the next tile's first loads under
    this tile's epilogue."""
    start, end, tiles, cum = _expert_table(OFFS, E, BLOCK_M, BLOCK_E)
    if PROGRAMS == 0:
        e, row_start, row_end = _row_tile(tl.program_id(0), start, end, tiles, cum, E,
                                          BLOCK_M, BLOCK_E)
        if e < E:
            _up_tile(X, ORDER, W1, B1, H, e, row_start, row_end, tl.program_id(1),
                     D, HID, top_k, stride_x, stride_we, stride_wn, stride_be, stride_h,
                     HAS_BIAS, ACT, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        n_col = tl.cdiv(HID, BLOCK_N)
        total = tl.sum(tiles, axis=0) * n_col
        for t in tl.range(tl.program_id(0), total, PROGRAMS, flatten=True):
            e, row_start, row_end = _row_tile(t // n_col, start, end, tiles, cum, E,
                                              BLOCK_M, BLOCK_E)
            _up_tile(X, ORDER, W1, B1, H, e, row_start, row_end, t % n_col,
                     D, HID, top_k, stride_x, stride_we, stride_wn, stride_be, stride_h,
                     HAS_BIAS, ACT, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _expert_down_kernel(
    HS, ORDER, OFFS, GATE, W2, B2, Y,
    D, HID, E,
    stride_h, stride_we, stride_wn, stride_be, stride_y,
    HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PROGRAMS: tl.constexpr,
):
    """Grouped down-projection; PROGRAMS as :func:`_expert_up_kernel`'s."""
    start, end, tiles, cum = _expert_table(OFFS, E, BLOCK_M, BLOCK_E)
    if PROGRAMS == 0:
        e, row_start, row_end = _row_tile(tl.program_id(0), start, end, tiles, cum, E,
                                          BLOCK_M, BLOCK_E)
        if e < E:
            _down_tile(HS, ORDER, GATE, W2, B2, Y, e, row_start, row_end, tl.program_id(1),
                       D, HID, stride_h, stride_we, stride_wn, stride_be, stride_y,
                       HAS_BIAS, HAS_GATE, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        n_col = tl.cdiv(D, BLOCK_N)
        total = tl.sum(tiles, axis=0) * n_col
        for t in tl.range(tl.program_id(0), total, PROGRAMS, flatten=True):
            e, row_start, row_end = _row_tile(t // n_col, start, end, tiles, cum, E,
                                              BLOCK_M, BLOCK_E)
            _down_tile(HS, ORDER, GATE, W2, B2, Y, e, row_start, row_end, t % n_col,
                       D, HID, stride_h, stride_we, stride_wn, stride_be, stride_y,
                       HAS_BIAS, HAS_GATE, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    check_float(name, x)
    x2d = x.reshape(-1, x.shape[-1])  # (N, C)
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def moe_route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    embed: torch.Tensor | None = None,
    top_k: int = 1,
    renormalize: bool = False,
    return_logits: bool = False,
) -> RouteResult:
    """Router logits, float32 softmax and top-k in one kernel.

    Args:
        x: (..., D) router input (the FFN input).
        weight: (DE + D, E) router matrix; its first DE rows act on ``embed``.
        bias: (E,) or None.
        embed: (..., DE) side input (3M-ASR's embedding network output) or None (DE = 0).
        top_k: experts per row (1..8, at most E).
        renormalize: divide the k probabilities by their sum.
        return_logits: also return the (N, E) float32 logits.
    Returns:
        :class:`RouteResult` with N = prod(x.shape[:-1]) rows; gate_idx int32.
    """
    x2d = _rows(x, "x")
    n, d = x2d.shape
    de = 0
    emb2d = None
    if embed is not None:
        emb2d = _rows(embed, "embed")
        de = emb2d.shape[1]
        if emb2d.shape[0] != n:
            raise ValueError(f"embed has {emb2d.shape[0]} rows, x has {n}")
    e = _check_router(weight, bias, d + de, top_k)
    check_launch(_route_kernel, *(t for t in (x2d, emb2d, weight, bias) if t is not None))
    weight = weight.contiguous()
    idx = torch.empty(n, top_k, dtype=torch.int32, device=x.device)
    val = torch.empty(n, top_k, dtype=torch.float32, device=x.device)
    logits = torch.empty(n, e, dtype=torch.float32, device=x.device) if return_logits else None
    if n == 0:
        return RouteResult(idx, val, logits)
    block_m, block_k = _route_config(n)
    _route_kernel[(cdiv(n, block_m),)](
        x2d, emb2d if emb2d is not None else x2d, weight, bias if bias is not None else weight,
        logits if logits is not None else val, idx, val,
        n, d, de, e,
        x2d.stride(0), emb2d.stride(0) if emb2d is not None else 0, weight.stride(0),
        HAS_EMB=emb2d is not None, HAS_BIAS=bias is not None, STORE_LOGITS=return_logits,
        TOP_K=top_k, RENORM=renormalize, BLOCK_M=block_m, BLOCK_K=block_k,
        BLOCK_E=max(16, next_power_of_2(e)), BLOCK_TOPK=next_power_of_2(top_k),
        num_warps=4,
    )
    return RouteResult(idx, val, logits)


def _route_config(n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of the router: enough programs for small batches."""
    return (16, 128) if n <= 4096 else (32, 64)


def _check_router(weight: torch.Tensor, bias: torch.Tensor | None, k: int, top_k: int) -> int:
    if weight.dim() != 2 or weight.shape[0] != k:
        raise ValueError(f"router weight must be ({k}, E), got {tuple(weight.shape)}")
    e = weight.shape[1]
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"the router supports 1..{MAX_EXPERTS} experts, got {e}")
    if not 1 <= top_k <= min(e, MAX_TOP_K):
        raise ValueError(f"top_k must be in 1..{min(e, MAX_TOP_K)}, got {top_k}")
    if bias is not None and tuple(bias.shape) != (e,):
        raise ValueError(f"router bias must be ({e},), got {tuple(bias.shape)}")
    return e


def moe_sort(gate_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the N*K (row, slot) assignments by expert, in one launch, without a host sync.

    gate_idx (N, K) int32/int64 in [0, E) -> (order (N*K,) int32 flat assignment ids, expert by
    expert, each expert's in increasing id order; offsets (E+1,) int32, expert e owns
    ``order[offsets[e]:offsets[e+1]]``).
    """
    flat = gate_idx.reshape(-1)  # (N*K,)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    check_launch(_sort_place_kernel, flat)
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"the sort supports 1..{MAX_EXPERTS} experts, got {num_experts}")
    n = flat.numel()
    block_e = next_power_of_2(num_experts + 1)
    # One-hot blocks of <= 16k elements; every block reads the whole (blocks, experts) counts.
    block = max(16, min(next_power_of_2(n), 16384 // block_e))
    n_blocks = max(1, cdiv(n, block))
    if n_blocks * block_e > 32768:  # > 131k assignments for 32 experts: torch's sort
        return moe_sort_ref(gate_idx, num_experts)
    order = torch.empty(n, dtype=torch.int32, device=flat.device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=flat.device)
    counts = order
    if n_blocks > 1:
        counts = torch.empty(n_blocks, block_e, dtype=torch.int32, device=flat.device)
        _sort_count_kernel[(n_blocks,)](flat, counts, n, BLOCK=block, BLOCK_E=block_e)
    _sort_place_kernel[(n_blocks,)](
        flat, counts, order, offsets, n, num_experts, n_blocks, ONE_BLOCK=n_blocks == 1,
        BLOCK=block, BLOCK_E=block_e, BLOCK_NB=next_power_of_2(n_blocks),
    )
    return order, offsets


def moe_sort_ref(gate_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch :func:`moe_sort` (stable sort + searchsorted); same outputs."""
    flat = gate_idx.reshape(-1).to(torch.int32)  # (N*K,)
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=torch.int32)
    offsets = torch.searchsorted(sorted_ids, bounds)
    return order.to(torch.int32), offsets.to(torch.int32)


@dataclass(frozen=True)
class GemmConfig:
    """Tile configuration of the grouped expert GEMMs: one program per BLOCK_M x BLOCK_N tile,
    or with ``per_sm`` > 0 a persistent kernel of ``per_sm`` programs per SM walking the tiles."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    per_sm: int = 0

    def __str__(self) -> str:
        return (
            f"m{self.block_m}n{self.block_n}k{self.block_k}"
            f"w{self.num_warps}s{self.num_stages}" + (f"p{self.per_sm}" if self.per_sm else "")
        )

    def grid(self, row_tiles: int, col_tiles: int, device: torch.device) -> tuple[tuple, int]:
        """(launch grid, PROGRAMS) for at most ``row_tiles`` x ``col_tiles`` tiles. The
        persistent grid is ``per_sm`` x SMs (2 under the interpreter) whatever the rows, so
        PROGRAMS, a compile-time constant, does not recompile the kernel per batch size;
        programs beyond the real tile count run no iteration."""
        if not self.per_sm:
            return (row_tiles, col_tiles), 0
        programs = 2 if interpreting() else self.per_sm * sm_count(device)
        return (programs,), programs


def _gemm_config(n_assign: int, num_experts: int, dtype: torch.dtype) -> GemmConfig:
    """Tile sizes: row tiles sized to the mean rows per expert (small batches waste less)."""
    mean = n_assign / max(num_experts, 1)
    block_m = 16 if mean <= 16 else (32 if mean <= 48 else 64)
    if interpreting():  # few, large programs: the interpreter's cost is per program and op
        return GemmConfig(32, 64, 64, 4, 1)
    # First choices; `speechrt bench moe` sweeps tile configs on the GPU to revise them.
    if dtype == torch.float32:
        return GemmConfig(128, 128, 32, 8, 2) if mean > 256 else GemmConfig(block_m, 64, 32, 4, 2)
    if mean > 256:
        return GemmConfig(128, 256, 64, 8, 3)
    return GemmConfig(block_m, 128, 64, 4, 3)


def _check_experts(x2d, w1, b1, w2, b2) -> tuple[int, int, int]:
    e, hid, d = w1.shape
    if x2d.shape[1] != d:
        raise ValueError(f"x has {x2d.shape[1]} features, W1 expects {d}")
    if tuple(w2.shape) != (e, d, hid):
        raise ValueError(f"W2 must be {(e, d, hid)}, got {tuple(w2.shape)}")
    for name, b, shape in (("b1", b1, (e, hid)), ("b2", b2, (e, d))):
        if b is not None and tuple(b.shape) != shape:
            raise ValueError(f"{name} must be {shape}, got {tuple(b.shape)}")
    for name, t in (("w1", w1), ("w2", w2)):
        if t.dtype != x2d.dtype:
            raise ValueError(f"{name} is {t.dtype} but x is {x2d.dtype}")
    return e, hid, d


def moe_experts(
    x: torch.Tensor,
    gate_idx: torch.Tensor,
    gate_val: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str = "swish",
    _config: GemmConfig | tuple[GemmConfig, GemmConfig] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Every row through its chosen experts: ``sum_k gate[k] * W2_e act(W1_e x + b1_e) + b2_e``.

    Args:
        x: (..., D) rows, float32/float16/bfloat16.
        gate_idx: (N, K) experts per row (N = prod(x.shape[:-1])), int32 or int64.
        gate_val: (N, K) weights per (row, slot), or None for weight 1.
        w1: (E, H, D), b1: (E, H) or None, w2: (E, D, H), b2: (E, D) or None, x's dtype.
        activation: one of :data:`ACTIVATIONS`.
        _config: tile config override (both GEMMs, or (up, down)) for tuning sweeps.
        out_dtype: output dtype (default x's); float32 keeps the down-projection's accumulator
            unrounded (for a float32 residual stream).
    Returns:
        (..., D) in ``out_dtype``. The hidden activations are rounded to x's dtype between the two
        GEMMs (as a dense FFN in that dtype does); accumulation is float32.
    """
    if activation not in ACTIVATIONS:
        raise UnsupportedOptionError(
            f"activation '{activation}' has no fused MoE kernel ({', '.join(ACTIVATIONS)})"
        )
    x2d = _rows(x, "x")
    n = x2d.shape[0]
    e, hid, d = _check_experts(x2d, w1, b1, w2, b2)
    if gate_idx.dim() != 2 or gate_idx.shape[0] != n:
        raise ValueError(f"gate_idx must be ({n}, K), got {tuple(gate_idx.shape)}")
    k = gate_idx.shape[1]
    if gate_val is not None and gate_val.shape != gate_idx.shape:
        raise ValueError(f"gate_val {tuple(gate_val.shape)} != gate_idx {tuple(gate_idx.shape)}")
    tensors = (x2d, gate_idx, w1, w2) + tuple(t for t in (gate_val, b1, b2) if t is not None)
    check_launch(_expert_up_kernel, *tensors)
    if e > MAX_EXPERTS:
        raise ValueError(f"at most {MAX_EXPERTS} experts, got {e}")
    n_assign = n * k
    out_dtype = out_dtype or x.dtype
    y_dtype = out_dtype if k == 1 else torch.float32
    # Every (row, slot) is written exactly once by the down kernel: no zero fill needed.
    y = torch.empty(n_assign, d, dtype=y_dtype, device=x.device)  # (N*K, D)
    if n_assign > 0:
        order, offsets = moe_sort(gate_idx, e)
        if _config is None:
            _config = _gemm_config(n_assign, e, x2d.dtype)
        up, down = _config if isinstance(_config, tuple) else (_config, _config)
        h = _expert_up(x2d, order, offsets, w1, b1, activation, k, up)
        gate = gate_val.reshape(-1).float().contiguous() if gate_val is not None else None
        _expert_down(h, order, offsets, gate, w2, b2, y, down)
    if k > 1:
        y = y.view(n, k, d).sum(dim=1).to(out_dtype)  # (N, D)
    return y.view(*x.shape[:-1], d)


def _tile_kwargs(cfg: GemmConfig, dtype: torch.dtype, num_experts: int) -> dict:
    """Launch constants shared by both grouped GEMMs."""
    return dict(
        **dot_precision(dtype),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_E=max(2, next_power_of_2(num_experts)),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _expert_up(
    x2d: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    activation: str,
    top_k: int,
    cfg: GemmConfig,
) -> torch.Tensor:
    """Grouped up-projection: x2d (N, D), order (N*K,), offsets (E+1,) from :func:`moe_sort`
    -> h (N*K, H) in x's dtype, rows in sorted (expert) order, activation applied."""
    e, hid, d = w1.shape
    n_assign = order.numel()
    w1 = w1.contiguous()
    b1 = b1.contiguous() if b1 is not None else None
    h = torch.empty(n_assign, hid, dtype=x2d.dtype, device=x2d.device)  # (N*K, H), sorted
    grid, programs = cfg.grid(cdiv(n_assign, cfg.block_m) + e - 1, cdiv(hid, cfg.block_n),
                              x2d.device)
    _expert_up_kernel[grid](
        x2d, order, offsets, w1, b1 if b1 is not None else w1, h,
        d, hid, e, top_k,
        x2d.stride(0), w1.stride(0), w1.stride(1), b1.stride(0) if b1 is not None else 0,
        h.stride(0),
        HAS_BIAS=b1 is not None, ACT=ACTIVATIONS[activation], PROGRAMS=programs,
        **_tile_kwargs(cfg, x2d.dtype, e),
    )  # fmt: skip
    return h


def _expert_down(
    h: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    gate: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    y: torch.Tensor,
    cfg: GemmConfig,
) -> None:
    """Grouped down-projection of :func:`_expert_up`'s h (N*K, H) into y (N*K, D), each row
    stored at its assignment's original position; gate (N*K,) float32 or None."""
    e, d, hid = w2.shape
    w2 = w2.contiguous()
    b2 = b2.contiguous() if b2 is not None else None
    grid, programs = cfg.grid(cdiv(order.numel(), cfg.block_m) + e - 1, cdiv(d, cfg.block_n),
                              h.device)
    _expert_down_kernel[grid](
        h, order, offsets, gate if gate is not None else h, w2, b2 if b2 is not None else w2, y,
        d, hid, e,
        h.stride(0), w2.stride(0), w2.stride(1), b2.stride(0) if b2 is not None else 0,
        y.stride(0),
        HAS_BIAS=b2 is not None, HAS_GATE=gate is not None, PROGRAMS=programs,
        **_tile_kwargs(cfg, h.dtype, e),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def moe_route_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    embed: torch.Tensor | None = None,
    top_k: int = 1,
    renormalize: bool = False,
) -> RouteResult:
    """Plain-torch router: float32 ``softmax([embed, x] @ W + b)``, top-k by logit.

    Shapes as :func:`moe_route`; returns gate_idx int64 and the logits.
    """
    r = x.reshape(-1, x.shape[-1]).float()  # (N, D)
    if embed is not None:
        r = torch.cat([embed.reshape(-1, embed.shape[-1]).float(), r], dim=-1)  # (N, DE + D)
    logits = r @ weight.float()
    if bias is not None:
        logits = logits + bias.float()
    probs = torch.softmax(logits, dim=-1)
    if top_k == 1:
        idx = logits.argmax(dim=-1, keepdim=True)  # first maximum, as torch.max
    else:
        idx = torch.topk(logits, top_k, dim=-1).indices
    val = probs.gather(-1, idx)
    if renormalize:
        val = val / val.sum(dim=-1, keepdim=True)
    return RouteResult(idx, val, logits)


_TORCH_ACT = {
    "identity": lambda h: h,
    "swish": F.silu,
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
}


def moe_experts_ref(
    x: torch.Tensor,
    gate_idx: torch.Tensor,
    gate_val: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str = "swish",
    upcast: bool = False,
) -> torch.Tensor:
    """Plain-torch :func:`moe_experts`: a loop over experts, each on the rows that chose it.

    GEMMs run in x's dtype (float32 with ``upcast``); the weighted sum over the k experts of a row
    accumulates in float32. Returns (..., D) in x's dtype.
    """
    act = _TORCH_ACT.get(activation)
    if act is None:
        raise UnsupportedOptionError(f"unknown MoE activation '{activation}'")
    dtype = x.dtype
    x2d = x.reshape(-1, x.shape[-1])  # (N, D)
    cdt = torch.float32 if upcast else dtype
    out = torch.zeros(x2d.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        rows, slots = torch.where(gate_idx == e)
        if rows.numel() == 0:
            continue
        h = x2d[rows].to(cdt) @ w1[e].to(cdt).T
        if b1 is not None:
            h = h + b1[e].to(cdt)
        y = act(h) @ w2[e].to(cdt).T
        if b2 is not None:
            y = y + b2[e].to(cdt)
        y = y.float()
        if gate_val is not None:
            y = y * gate_val[rows, slots].float().unsqueeze(-1)
        out.index_add_(0, rows, y)
    return out.to(dtype).view(*x.shape[:-1], w2.shape[1])
