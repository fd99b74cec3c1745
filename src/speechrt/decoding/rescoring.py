"""Attention rescoring of CTC n-best lists (WeNet's ``attention_rescoring``), batched.

All functions take tensors and return tensors; nothing here knows a model. Shapes: B utterances,
W hypotheses each, L = longest hypothesis, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def decoder_inputs(
    hyps: torch.Tensor, hyp_lengths: torch.Tensor, sos: int, eos: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build teacher-forcing inputs as WeNet does.

    hyps (B, W, L) padded with anything, hyp_lengths (B, W) (< 0 = absent hypothesis).
    Returns (l2r (B, W, L+1) = [sos, y1..yn, eos...], r2l (B, W, L+1) = [sos, yn..y1, eos...],
    input lengths (B, W) = n + 1).
    """
    b, w, l = hyps.shape
    n = hyp_lengths.clamp(min=0)
    pos = torch.arange(l, device=hyps.device)
    valid = pos < n.unsqueeze(-1)  # (B, W, L)
    fwd = torch.where(valid, hyps, eos)
    rev_idx = (n.unsqueeze(-1) - 1 - pos).clamp(min=0)
    rev = torch.where(valid, torch.gather(hyps.clamp(min=0), 2, rev_idx), eos)
    start = hyps.new_full((b, w, 1), sos)
    return torch.cat([start, fwd], dim=2), torch.cat([start, rev], dim=2), n + 1


def sequence_log_prob(
    log_probs: torch.Tensor,
    hyps: torch.Tensor,
    hyp_lengths: torch.Tensor,
    eos: int,
    reverse: bool = False,
) -> torch.Tensor:
    """Sum of the decoder log-probs of each hypothesis's tokens and its final <eos>.

    log_probs (B, W, L+1, V) from inputs built by :func:`decoder_inputs`; row j predicts token j
    (of the reversed hypothesis if ``reverse``). Returns (B, W) float64.
    """
    n = hyp_lengths.clamp(min=0)
    l = hyps.shape[2]
    pos = torch.arange(l, device=hyps.device)
    valid = pos < n.unsqueeze(-1)
    if reverse:
        idx = (n.unsqueeze(-1) - 1 - pos).clamp(min=0)
        targets = torch.gather(hyps.clamp(min=0), 2, idx)
    else:
        targets = hyps.clamp(min=0)
    targets = torch.where(valid, targets, 0)
    tok = torch.gather(log_probs[:, :, :l], 3, targets.unsqueeze(-1)).squeeze(-1)  # (B, W, L)
    tok = torch.where(valid, tok.double(), 0.0).sum(-1)
    end = torch.gather(log_probs[..., eos], 2, n.unsqueeze(-1)).squeeze(-1)  # (B, W)
    return tok + end.double()


@dataclass(frozen=True)
class RescoringResult:
    """best_index (B,) into the n-best; scores (B, W) float64 of every hypothesis (-inf absent);
    best_score (B,) float64."""

    best_index: torch.Tensor
    scores: torch.Tensor
    best_score: torch.Tensor


def rescoring_scores(
    l2r_log_probs: torch.Tensor,
    r2l_log_probs: torch.Tensor | None,
    hyps: torch.Tensor,
    hyp_lengths: torch.Tensor,
    ctc_scores: torch.Tensor,
    eos: int,
    ctc_weight: float = 0.5,
    reverse_weight: float = 0.0,
) -> RescoringResult:
    """WeNet's score: (1-rw)*L2R + rw*R2L + ctc_weight*ctc_score; the first maximum wins.

    The R2L term is used only when ``r2l_log_probs`` is given and ``reverse_weight > 0``.
    """
    score = sequence_log_prob(l2r_log_probs, hyps, hyp_lengths, eos)
    if r2l_log_probs is not None and reverse_weight > 0:
        r_score = sequence_log_prob(r2l_log_probs, hyps, hyp_lengths, eos, reverse=True)
        score = score * (1 - reverse_weight) + r_score * reverse_weight
    score = score + ctc_weight * ctc_scores.double()
    score = torch.where(hyp_lengths >= 0, score, float("-inf"))
    best_score, best = score.max(dim=-1)
    # torch.max's index on ties is not specified on every device: take the first maximum.
    first = (score == best_score.unsqueeze(-1)).to(torch.int8).argmax(dim=-1)
    return RescoringResult(first, score, best_score)
