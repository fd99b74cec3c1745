"""Batched CTC decoding on tensors: greedy search and WeNet-exact prefix beam search.

Both decoders take a padded batch of CTC log-posteriors ``(B, T, V)`` with per-utterance
``lengths`` and never sync with the host while decoding: the prefix beam search runs a Python
loop over ``range(T)`` (T from the tensor shape) whose body is tensor operations only, and
frames ``t >= lengths[b]`` leave utterance ``b`` untouched.

The prefix beam search reproduces WeNet's ``ctc_prefix_beam_search`` (``wenet/transformer/
search.py``) exactly - n-best token sequences, their order (including WeNet's tie-break by
dictionary insertion order), count and viterbi token times - and its scores to float64 rounding.
``speechrt.decoding.reference`` holds the per-utterance oracle it is tested against.

How the beam search is batched. Every utterance keeps ``W = beam_size`` slots in beam order. At
frame t WeNet visits, for each of the top-K tokens u (topk order) and each prefix h (beam order),
the entries "h" (u blank, or u == last(h)) and then "h+u" (u not blank) of a dictionary. We
give every visit the code ``(k * W + w) * 2 + slot`` (slot 0 = "h", slot 1 = "h+u"), which is
the dictionary's insertion order. Two visits reach the same prefix only when ``h+u`` equals
another beam prefix P (then h = P[:-1] and u = last(P)); parents are found with a rolling hash
of every prefix. Each resulting prefix gets WeNet's scores, its first visit code, and the
selection keeps the W best by score with ties broken by that code. Token sequences and time
lists live in ``(B, W, T)`` buffers that are gathered from the selected source slot and written
at one position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from speechrt.errors import UnsupportedOptionError

__all__ = [
    "CTCGreedyResult",
    "CTCPrefixBeamResult",
    "ctc_greedy_search",
    "ctc_prefix_beam_search",
    "nbest_lists",
]

_NEG_INF = float("-inf")
# Two polynomial hashes modulo primes below 2**31: every product stays below 2**63.
_HASH_MUL = (1_000_003, 999_983)
_HASH_MOD = (2_147_483_647, 2_147_483_629)


@dataclass(frozen=True)
class CTCGreedyResult:
    """Greedy (best path) CTC decoding of a batch.

    Attributes:
        tokens: (B, T) int64 token ids, left-aligned, padded with -1.
        token_lengths: (B,) int64 number of tokens per utterance.
        scores: (B,) float32 log-probability of the best path (sum over the valid frames of the
            per-frame maximum log-probability).
    """

    tokens: torch.Tensor
    token_lengths: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True)
class CTCPrefixBeamResult:
    """CTC prefix beam search n-best lists of a batch, best first (W = beam_size, L = T).

    Attributes:
        hyps: (B, W, L) int64 token ids, padded with -1 (rows of absent hypotheses are all -1).
        hyp_lengths: (B, W) int64 number of tokens, -1 for absent hypotheses.
        scores: (B, W) prefix scores log(P_blank_end + P_nonblank_end) in the search's
            score_dtype, -inf for absent hypotheses.
        count: (B,) int64 number of hypotheses (1 <= count <= W).
        times: (B, W, L) int64 frame of the viterbi peak of each token, padded with -1.
    """

    hyps: torch.Tensor
    hyp_lengths: torch.Tensor
    scores: torch.Tensor
    count: torch.Tensor
    times: torch.Tensor


def _check_inputs(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int) -> torch.Tensor:
    """Validate shapes and the blank id; return lengths on the log-probs' device, in [0, T]."""
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (B, T, V), got shape {tuple(log_probs.shape)}")
    batch, frames, vocab = log_probs.shape
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be ({batch},), got shape {tuple(lengths.shape)}")
    if vocab < 1 or not 0 <= blank < vocab:
        raise UnsupportedOptionError(f"blank id {blank} is outside the vocabulary of {vocab}")
    return lengths.to(device=log_probs.device, dtype=torch.long).clamp(0, frames)


# ---------------------------------------------------------------------------------------------
# Greedy search
# ---------------------------------------------------------------------------------------------


def ctc_greedy_search(
    log_probs: torch.Tensor, lengths: torch.Tensor, blank: int = 0
) -> CTCGreedyResult:
    """Best-path decoding: argmax per frame, collapse repeats, drop blanks (WeNet's rule).

    Args:
        log_probs: (B, T, V) CTC log-posteriors.
        lengths: (B,) valid frames per utterance; later frames count as blank.
        blank: blank token id.
    Returns:
        a :class:`CTCGreedyResult`.
    """
    lengths = _check_inputs(log_probs, lengths, blank)
    batch, frames, _ = log_probs.shape
    best_lp, best = log_probs.topk(1, dim=2)  # (B, T, 1): WeNet's tie order
    best, best_lp = best.squeeze(2), best_lp.squeeze(2)  # (B, T)
    valid = torch.arange(frames, device=best.device) < lengths[:, None]  # (B, T)
    best = best.masked_fill(~valid, blank)
    prev = torch.cat([best.new_full((batch, 1), -1), best], dim=1)[:, :frames]  # (B, T)
    keep = (best != blank) & (best != prev)  # (B, T)
    dest = torch.where(keep, keep.cumsum(1) - 1, frames)  # (B, T): dropped frames -> column T
    tokens = best.new_full((batch, frames + 1), -1)
    tokens.scatter_(1, dest, torch.where(keep, best, -1))
    scores = torch.where(valid, best_lp, 0.0).sum(1, dtype=torch.float32)  # (B,)
    return CTCGreedyResult(tokens=tokens[:, :frames], token_lengths=keep.sum(1), scores=scores)


# ---------------------------------------------------------------------------------------------
# Prefix beam search
# ---------------------------------------------------------------------------------------------


class _Beam(NamedTuple):
    """Search state of W prefixes per utterance, in beam order (slot 0 = best).

    Times lists come in pairs, index 0 = the best blank-ending path (WeNet's ``times_s``),
    index 1 = the best non-blank-ending path (``times_ns``).
    """

    valid: torch.Tensor  # (B, W) bool: the slot holds a prefix
    length: torch.Tensor  # (B, W) int64 number of tokens
    last: torch.Tensor  # (B, W) int64 last token, -1 for the empty prefix
    hash: torch.Tensor  # (B, W, 2) int64 hash of the token sequence
    parent_hash: torch.Tensor  # (B, W, 2) int64 hash of the sequence without its last token
    s: torch.Tensor  # (B, W) log P(paths ending in blank)
    ns: torch.Tensor  # (B, W) log P(paths ending in a token)
    v: torch.Tensor  # (B, W, 2) viterbi log P of the best blank- / token-ending path
    tokens: torch.Tensor  # (B, W, L) int64, -1 beyond length
    times: torch.Tensor  # (B, W, 2, L) int64 peak frames of the two viterbi paths, -1 padded
    times_len: torch.Tensor  # (B, W, 2) int64 length of each times list


class _Candidates(NamedTuple):
    """Next-frame prefixes, M per utterance, with how to build their buffers from the beam."""

    exists: torch.Tensor  # (B, M) bool
    order: torch.Tensor  # (B, M) int64 code of the first visit (WeNet insertion order)
    length: torch.Tensor  # (B, M)
    last: torch.Tensor  # (B, M)
    hash: torch.Tensor  # (B, M, 2)
    parent_hash: torch.Tensor  # (B, M, 2)
    s: torch.Tensor  # (B, M)
    ns: torch.Tensor  # (B, M)
    v: torch.Tensor  # (B, M, 2)
    tok_src: torch.Tensor  # (B, M) source slot of the tokens
    tok_pos: torch.Tensor  # (B, M) position written with tok_val, -1 = none
    tok_val: torch.Tensor  # (B, M)
    times_src: torch.Tensor  # (B, M, 2) source list slot * 2 + kind, -1 = empty list
    times_pos: torch.Tensor  # (B, M, 2) position written with the frame index, -1 = none
    times_len: torch.Tensor  # (B, M, 2)


def _log_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise log(exp(a) + exp(b)), the same float operations as WeNet's ``log_add``."""
    m = torch.maximum(a, b)
    m_safe = torch.where(m == _NEG_INF, 0.0, m)
    out = m_safe + torch.log(torch.exp(a - m_safe) + torch.exp(b - m_safe))
    return torch.where(m == _NEG_INF, _NEG_INF, out)


def _hash_push(h: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Hash of a sequence extended by ``token``: (..., 2) int64 hashes, (...) int64 tokens."""
    parts = [(h[..., i] * _HASH_MUL[i] + token + 1) % _HASH_MOD[i] for i in range(2)]
    return torch.stack(parts, -1)  # (..., 2)


def _init_beam(
    batch: int, width: int, frames: int, dtype: torch.dtype, device: torch.device
) -> _Beam:
    """Slot 0 holds the empty prefix with WeNet's start scores s=0, ns=-inf, v_s=v_ns=0."""
    first = torch.arange(width, device=device)[None, :] == 0  # (1, W)
    first = first.expand(batch, width)
    zeros = torch.zeros(batch, width, dtype=dtype, device=device)
    neg = torch.full_like(zeros, _NEG_INF)
    long = torch.zeros(batch, width, dtype=torch.long, device=device)
    return _Beam(
        valid=first.clone(),
        length=long,
        last=long - 1,
        hash=torch.zeros(batch, width, 2, dtype=torch.long, device=device),
        parent_hash=torch.full((batch, width, 2), -1, dtype=torch.long, device=device),
        s=torch.where(first, zeros, neg),
        ns=neg,
        v=torch.where(first, zeros, neg)[..., None].expand(batch, width, 2).clone(),
        tokens=torch.full((batch, width, frames), -1, dtype=torch.long, device=device),
        times=torch.full((batch, width, 2, frames), -1, dtype=torch.long, device=device),
        times_len=torch.zeros(batch, width, 2, dtype=torch.long, device=device),
    )


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, ...]] for x (B, W, *rest) and index (B, *idx): returns (B, *idx, *rest)."""
    batch, rest = x.shape[0], x.shape[2:]
    flat = index.reshape(batch, -1)  # (B, n)
    picked = x.gather(1, flat.view(batch, -1, *([1] * len(rest))).expand(-1, -1, *rest))
    return picked.view(*index.shape, *rest)


def _viterbi_kind(beam: _Beam) -> torch.Tensor:
    """(B, W) int64: which path WeNet's ``viterbi_score()``/``times()`` use, 0 = blank-ending."""
    return (beam.v[..., 0] <= beam.v[..., 1]).long()


def _parent_arc(
    beam: _Beam, kind: torch.Tensor, score: torch.Tensor, p_l: torch.Tensor, with_l: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The arc Q -> P = Q + last(P) from a parent Q = P[:-1] in the beam (a "h+u" visit that
    lands on the beam prefix P). All (B, W), indexed by P.

    Returns:
        q: parent slot; with_e: the arc exists; q_kind: which times list of Q it extends
        (0 = blank-ending); ns_e: its log-prob; c_e: its viterbi log-prob; q_len: length of
        the extended times list.
    """
    is_parent = (
        (beam.parent_hash[:, :, None, :] == beam.hash[:, None, :, :]).all(3)
        & (beam.length[:, :, None] == beam.length[:, None, :] + 1)
        & beam.valid[:, None, :]
    )  # (B, W_P, W_Q)
    q = is_parent.long().argmax(2)  # (B, W)
    with_e = with_l & is_parent.any(2)  # (B, W)
    q_same = _gather(beam.last, q) == beam.last  # Q also ends in last(P): only *u- paths extend
    q_kind = torch.where(q_same, 0, _gather(kind, q))  # (B, W)
    ns_e = torch.where(q_same, _gather(beam.s, q), _gather(score, q)) + p_l
    c_e = _gather(beam.v, q).gather(2, q_kind[..., None])[..., 0] + p_l  # (B, W)
    q_len = _gather(beam.times_len, q).gather(2, q_kind[..., None])[..., 0]  # (B, W)
    neg = torch.full_like(ns_e, _NEG_INF)
    return q, with_e, q_kind, torch.where(with_e, ns_e, neg), torch.where(with_e, c_e, neg), q_len


def _stay_candidates(
    beam: _Beam, val: torch.Tensor, idx: torch.Tensor, blank: int
) -> tuple[_Candidates, torch.Tensor]:
    """The W prefixes left unchanged by frame t (WeNet's ``next_hyps[prefix]``).

    Such a prefix P collects the blank arc, the repeat arc of last(P) and, when P[:-1] = Q is in
    the beam, Q's arc with last(P) (merged here). Returns the candidates and the (B, K, W) mask
    of the extensions (k, Q) merged that way.
    """
    batch, width = beam.valid.shape
    slot = torch.arange(width, device=idx.device).expand(batch, width)  # (B, W)
    kind = _viterbi_kind(beam)  # (B, W)
    score = _log_add(beam.s, beam.ns)  # (B, W)
    vit = beam.v.gather(2, kind[..., None])[..., 0]  # (B, W)
    neg = torch.full_like(score, _NEG_INF)
    big = torch.full_like(slot, 4 * idx.shape[1] * width)

    is_blank = idx == blank  # (B, K)
    kb = is_blank.long().argmax(1, keepdim=True)  # (B, 1) topk position of blank
    p_b = val.gather(1, kb)  # (B, 1)
    with_b = beam.valid & is_blank.any(1, keepdim=True)  # (B, W)
    match = idx[:, None, :] == beam.last[:, :, None]  # (B, W, K)
    kl = match.long().argmax(2)  # (B, W) topk position of last(P)
    p_l = val.gather(1, kl)  # (B, W)
    with_l = beam.valid & match.any(2)  # (B, W)
    q, with_e, q_kind, ns_e, c_e, q_len = _parent_arc(beam, kind, score, p_l, with_l)
    ns_r = torch.where(with_l, beam.ns + p_l, neg)  # repeat arc *u + u
    c_r = torch.where(with_l, beam.v[..., 1] + p_l, neg)

    # WeNet writes times_ns on the first improving visit; the repeat arc never overwrites it.
    take_e = (c_e > _NEG_INF) & ((q < slot) | (c_e > c_r))
    take_r = ~take_e & (c_r > _NEG_INF)
    ns_len = beam.times_len[..., 1]
    own_len = beam.times_len.gather(2, kind[..., None])[..., 0]
    none = torch.full_like(slot, -1)

    order = torch.stack(
        [
            torch.where(with_b, (kb * width + slot) * 2, big),
            torch.where(with_l, (kl * width + slot) * 2, big),
            torch.where(with_e, (kl * width + q) * 2 + 1, big),
        ]
    ).amin(0)  # (B, W)
    cand = _Candidates(
        exists=with_b | with_l,
        order=order,
        length=beam.length,
        last=beam.last,
        hash=beam.hash,
        parent_hash=beam.parent_hash,
        s=torch.where(with_b, score + p_b, neg),
        ns=_log_add(ns_r, ns_e),
        v=torch.stack([torch.where(with_b, vit + p_b, neg), torch.maximum(c_r, c_e)], 2),
        tok_src=slot,
        tok_pos=none,
        tok_val=none,
        times_src=torch.stack(
            [
                torch.where(with_b, slot * 2 + kind, -1),
                torch.where(take_e, q * 2 + q_kind, torch.where(take_r, slot * 2 + 1, -1)),
            ],
            2,
        ),
        times_pos=torch.stack(
            [none, torch.where(take_e, q_len, torch.where(take_r, ns_len - 1, -1))], 2
        ),
        times_len=torch.stack(
            [
                torch.where(with_b, own_len, 0),
                torch.where(take_e, q_len + 1, torch.where(take_r, ns_len, 0)),
            ],
            2,
        ),
    )
    merged_kq = (
        with_e[:, None, None, :]
        & (q[:, None, None, :] == slot[:, None, :, None])
        & (kl[:, None, None, :] == torch.arange(idx.shape[1], device=idx.device)[:, None, None])
    ).any(3)  # (B, K, W_Q): extension (k, Q) already merged into its beam prefix
    return cand, merged_kq


def _extend_candidates(
    beam: _Beam, val: torch.Tensor, idx: torch.Tensor, blank: int, merged: torch.Tensor
) -> _Candidates:
    """The K * W new prefixes h+u (WeNet's ``next_hyps[prefix + (u,)]``), flattened (k, w).

    Extensions that equal a prefix already in the beam were merged into it and do not exist here.
    """
    batch, width = beam.valid.shape
    k = idx.shape[1]
    slot = torch.arange(width, device=idx.device).expand(batch, k, width)  # (B, K, W)
    kpos = torch.arange(k, device=idx.device)[:, None].expand(batch, k, width)  # (B, K, W)
    u = idx[:, :, None].expand(batch, k, width)  # (B, K, W)
    p = val[:, :, None]  # (B, K, 1)
    kind = _viterbi_kind(beam)  # (B, W)
    same = beam.last[:, None, :] == u  # (B, K, W): h ends in u -> only blank-ending paths
    score = _log_add(beam.s, beam.ns)[:, None, :]  # (B, 1, W)
    ns = torch.where(same, beam.s[:, None, :], score) + p  # (B, K, W)
    src_kind = torch.where(same, 0, kind[:, None, :])  # (B, K, W)
    v_src = beam.v[:, None].expand(batch, k, width, 2).gather(3, src_kind[..., None])[..., 0]
    c = v_src + p  # (B, K, W)
    len_src = beam.times_len[:, None].expand(batch, k, width, 2)
    len_src = len_src.gather(3, src_kind[..., None])[..., 0]  # (B, K, W)
    written = c > _NEG_INF  # WeNet only writes the viterbi fields on an improvement
    neg = torch.full_like(c, _NEG_INF)
    none = torch.full_like(slot, -1)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, k * width, *x.shape[3:])  # (B, K*W, ...)

    return _Candidates(
        exists=flat(beam.valid[:, None, :] & (u != blank) & ~merged),
        order=flat((kpos * width + slot) * 2 + 1),
        length=flat(beam.length[:, None, :].expand(batch, k, width) + 1),
        last=flat(u),
        hash=flat(_hash_push(beam.hash[:, None], u)),
        parent_hash=flat(beam.hash[:, None].expand(batch, k, width, 2)),
        s=flat(neg),
        ns=flat(ns),
        v=flat(torch.stack([neg, torch.where(written, c, neg)], 3)),
        tok_src=flat(slot),
        tok_pos=flat(beam.length[:, None, :].expand(batch, k, width)),
        tok_val=flat(u),
        times_src=flat(torch.stack([none, torch.where(written, slot * 2 + src_kind, -1)], 3)),
        times_pos=flat(torch.stack([none, torch.where(written, len_src, -1)], 3)),
        times_len=flat(torch.stack([none + 1, torch.where(written, len_src + 1, 0)], 3)),
    )


def _select(cand: _Candidates, width: int) -> torch.Tensor:
    """(B, W) indices of the W best candidates: existing first, then by score descending, ties
    by first-visit order (Python's stable sort over WeNet's insertion-ordered dict)."""
    m = cand.exists.shape[1]
    ar = torch.arange(m, device=cand.order.device)
    order_key = torch.where(cand.exists, cand.order, m * 8 + ar)  # (B, M) distinct
    by_order = order_key.argsort(1)  # (B, M)
    total = torch.where(cand.exists, _log_add(cand.s, cand.ns), _NEG_INF).gather(1, by_order)
    by_score = total.sort(dim=1, descending=True, stable=True).indices[:, :width]  # (B, W)
    return by_order.gather(1, by_score)


def _write(buf: torch.Tensor, pos: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """buf (..., L) with buf[..., pos] = value where pos >= 0 (pos, value broadcast on (...))."""
    ar = torch.arange(buf.shape[-1], device=buf.device)
    value = value[..., None] if isinstance(value, torch.Tensor) else value
    return torch.where(ar == pos[..., None], value, buf)


def _build_beam(beam: _Beam, cand: _Candidates, sel: torch.Tensor, t: int) -> _Beam:
    """Gather the selected candidates (B, W) into a new beam, building token/time buffers."""
    batch, width = sel.shape
    frames = beam.tokens.shape[-1]
    pick = {name: _gather(getattr(cand, name), sel) for name in _Candidates._fields}
    tokens = _gather(beam.tokens, pick["tok_src"])  # (B, W, L)
    tokens = _write(tokens, pick["tok_pos"], pick["tok_val"])
    lists = beam.times.reshape(batch, 2 * width, frames)  # (B, 2W, L): slot * 2 + kind
    src = pick["times_src"]  # (B, W, 2)
    times = _gather(lists, src.clamp(min=0))  # (B, W, 2, L)
    times = torch.where(src[..., None] >= 0, times, -1)
    times = _write(times, pick["times_pos"], t)
    return _Beam(
        valid=pick["exists"],
        length=pick["length"],
        last=pick["last"],
        hash=pick["hash"],
        parent_hash=pick["parent_hash"],
        s=pick["s"],
        ns=pick["ns"],
        v=pick["v"],
        tokens=tokens,
        times=times,
        times_len=pick["times_len"],
    )


def _step(beam: _Beam, val: torch.Tensor, idx: torch.Tensor, blank: int, t: int) -> _Beam:
    """One frame of prefix beam search for every utterance. val/idx: (B, K) top-K log-probs."""
    stay, merged = _stay_candidates(beam, val, idx, blank)
    ext = _extend_candidates(beam, val, idx, blank, merged)
    cand = _Candidates(*(torch.cat([a, b], 1) for a, b in zip(stay, ext)))  # (B, W + K*W)
    return _build_beam(beam, cand, _select(cand, beam.valid.shape[1]), t)


def _keep_finished(active: torch.Tensor, new: _Beam, old: _Beam) -> _Beam:
    """Per utterance: the new beam while t < length, else the old one. active: (B,) bool."""
    fields = []
    for a, b in zip(new, old):
        mask = active.view(-1, *([1] * (a.dim() - 1)))
        fields.append(torch.where(mask, a, b))
    return _Beam(*fields)


def ctc_prefix_beam_search(
    log_probs: torch.Tensor,
    lengths: torch.Tensor,
    beam_size: int,
    blank: int = 0,
    score_dtype: torch.dtype = torch.float64,
) -> CTCPrefixBeamResult:
    """CTC prefix beam search of a batch, exactly WeNet's ``ctc_prefix_beam_search``.

    Per frame only the top ``min(beam_size, V)`` tokens are expanded (WeNet raises when
    beam_size > V); prefixes are ranked by log(P_blank_end + P_nonblank_end), ties in WeNet's
    dictionary insertion order. Ties between equal log-probs in the top-K pre-selection follow
    ``torch.topk`` on the input's device, as in WeNet. Scores are accumulated in
    ``score_dtype`` (float64 = WeNet's Python floats; float32 is faster but may flip near-ties).

    Args:
        log_probs: (B, T, V) CTC log-posteriors.
        lengths: (B,) valid frames per utterance (clamped to [0, T]).
        beam_size: beam width W >= 1.
        blank: blank token id.
        score_dtype: floating dtype of the prefix scores.
    Returns:
        a :class:`CTCPrefixBeamResult`; an utterance of length 0 gets one empty hypothesis with
        score 0.
    """
    lengths = _check_inputs(log_probs, lengths, blank)
    if beam_size < 1:
        raise UnsupportedOptionError(f"beam_size must be >= 1, got {beam_size}")
    if not score_dtype.is_floating_point:
        raise UnsupportedOptionError(f"score_dtype must be a floating dtype, got {score_dtype}")
    batch, frames, vocab = log_probs.shape
    top_val, top_idx = log_probs.topk(min(beam_size, vocab), dim=2)  # (B, T, K) WeNet's order
    top_val = top_val.to(score_dtype)
    beam = _init_beam(batch, beam_size, frames, score_dtype, log_probs.device)
    for t in range(frames):
        new = _step(beam, top_val[:, t], top_idx[:, t], blank, t)
        beam = _keep_finished(t < lengths, new, beam)
    return _finish(beam)


def _finish(beam: _Beam) -> CTCPrefixBeamResult:
    """Mask absent slots and pick each prefix's viterbi times list (WeNet's ``times()``)."""
    valid = beam.valid
    kind = _viterbi_kind(beam)  # (B, W)
    frames = beam.tokens.shape[-1]
    times = beam.times.gather(2, kind[..., None, None].expand(*kind.shape, 1, frames))[:, :, 0]
    scores = _log_add(beam.s, beam.ns)
    return CTCPrefixBeamResult(
        hyps=torch.where(valid[..., None], beam.tokens, -1),
        hyp_lengths=torch.where(valid, beam.length, -1),
        scores=torch.where(valid, scores, _NEG_INF),
        count=valid.sum(1),
        times=torch.where(valid[..., None], times, -1),
    )


def nbest_lists(result: CTCPrefixBeamResult) -> list[list[tuple[list[int], float]]]:
    """Python n-best lists ``[(tokens, score), ...]`` per utterance, best first (syncs once)."""
    hyps = result.hyps.tolist()  # sync-ok: once, after the search
    lens = result.hyp_lengths.tolist()  # sync-ok: after the search loop
    scores = result.scores.double().tolist()  # sync-ok: after the search loop
    counts = result.count.tolist()  # sync-ok: after the search loop
    return [
        [(hyps[b][i][: lens[b][i]], scores[b][i]) for i in range(counts[b])]
        for b in range(len(counts))
    ]
