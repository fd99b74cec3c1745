"""Autoregressive attention beam search (WeNet's ``attention_beam_search``), batched.

The search consumes a ``step`` callable and tensors; it knows no model. Per utterance it is exactly
WeNet's search run on that utterance alone: hypotheses may grow to that utterance's own encoder
length, finished beams keep their score and extend with <eos>.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# step(tokens (B, W) last tokens, step index, parents (B, W) beam each row came from or None)
#   -> log-probs (B, W, V). The callable reorders its own caches by ``parents``.
StepFn = Callable[[torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]

STOP_CHECK_EVERY = 8  # one host sync per this many steps to stop early once every beam ended


@dataclass(frozen=True)
class BeamSearchResult:
    """tokens (B, S) best hypothesis padded with -1 (no sos/eos); lengths (B,); scores (B,)
    float32 sum of log-probs including the final <eos> when reached."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor


def attention_beam_search(
    step: StepFn,
    batch_size: int,
    beam_size: int,
    sos: int,
    eos: int,
    max_lengths: torch.Tensor,
    device: torch.device | str,
    length_penalty: float = 0.0,
) -> BeamSearchResult:
    """Beam search; max_lengths (B,) = each utterance's encoder length (WeNet's ``maxlen``).

    The final beams are ranked by ``score / num_tokens ** length_penalty`` (WeNet's rule; 0 =
    plain log-prob sums, which favours short hypotheses when the decoder was trained with label
    smoothing); the returned score is that ranked value.
    """
    b, w = batch_size, beam_size
    max_steps = int(max_lengths.max()) if max_lengths.numel() else 0  # sync-ok: once, before loop
    scores = torch.full((b, w), float("-inf"), device=device)
    scores[:, 0] = 0.0
    tokens = torch.full((b, w, max(max_steps, 1)), eos, dtype=torch.long, device=device)
    last = torch.full((b, w), sos, dtype=torch.long, device=device)
    ended = torch.zeros(b, w, dtype=torch.bool, device=device)
    parents = None
    ar = torch.arange(b, device=device).unsqueeze(1)
    for i in range(max_steps):
        if i and i % STOP_CHECK_EVERY == 0 and bool(ended.all()):  # sync-ok: bulk stop check
            break
        logp = step(last, i, parents)  # (B, W, V)
        top_logp, top_idx = logp.topk(w, dim=-1)  # (B, W, W)
        # A finished beam contributes exactly one continuation: <eos> with log-prob 0.
        fin = ended.unsqueeze(-1)
        first = torch.zeros_like(top_logp, dtype=torch.bool)
        first[..., 0] = True
        top_logp = torch.where(fin, torch.where(first, 0.0, float("-inf")), top_logp)
        top_idx = torch.where(fin, eos, top_idx)
        cand = (scores.unsqueeze(-1) + top_logp).view(b, w * w)
        new_scores, flat = cand.topk(w, dim=-1)  # (B, W)
        new_parents = torch.div(flat, w, rounding_mode="floor")
        new_tok = torch.gather(top_idx.view(b, w * w), 1, flat)
        active = (i < max_lengths).unsqueeze(1)  # (B, 1): utterance still within its maxlen
        keep = torch.arange(w, device=device).expand(b, w)
        parents = torch.where(active, new_parents, keep)
        tokens = tokens[ar, parents]
        tokens[:, :, i] = torch.where(active, new_tok, tokens[:, :, i])
        scores = torch.where(active, new_scores, scores)
        last = torch.where(active, new_tok, last[ar, parents])
        ended = torch.where(active, new_tok == eos, ended)
    if length_penalty:
        lengths = (tokens != eos).sum(-1).float()  # (B, W) tokens without sos/eos
        # An empty hypothesis divides by zero: -inf, as in WeNet (never nan, even for score 0).
        scores = torch.where(lengths > 0, scores / lengths.pow(length_penalty), float("-inf"))
    best_score, _ = scores.max(dim=-1)
    best = (scores == best_score.unsqueeze(-1)).to(torch.int8).argmax(dim=-1)
    hyp = tokens[torch.arange(b, device=device), best]  # (B, S)
    keep = hyp != eos  # a prefix: once a beam emits <eos> it only extends with <eos>
    return BeamSearchResult(torch.where(keep, hyp, -1), keep.sum(-1), best_score)
