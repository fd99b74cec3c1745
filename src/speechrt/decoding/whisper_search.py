"""Whisper token searches (greedy/sampling and beam search) and the final ranking, batched.

Searches keep their state on the device and never read it back inside the step loop: each
``update`` writes the next token of every row into the token buffer and sets ``done`` (a device
bool). Once ``done`` is set, further updates change nothing, so a caller may notice it a step
late. Results are read back once, in ``finalize``.

Rows are grouped by audio: row ``a * group + g`` is candidate ``g`` of audio ``a``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Categorical

from speechrt.errors import UnsupportedOptionError

# (per audio) candidate token sequences (incl. initial tokens, ending with EOT) and log-probs
Candidates = list[list[tuple[list[int], float]]]


def _logprob_of(logits: Tensor, chosen: Tensor) -> Tensor:
    """float32 log-softmax of logits (B, V) at the chosen tokens (B,) -> (B,)."""
    return F.log_softmax(logits.float(), dim=-1).gather(1, chosen[:, None])[:, 0]


class GreedySearch:
    """Argmax at temperature 0, else one sample per row from softmax(logits / temperature)."""

    def __init__(self, temperature: float, eot: int, batch: int, device: torch.device) -> None:
        self.temperature = temperature
        self.eot = eot
        self.sum_logprobs = torch.zeros(batch, device=device)  # (B,)
        self.done = torch.zeros((), dtype=torch.bool, device=device)

    def update_at(self, tokens: Tensor, length: Tensor, logits: Tensor) -> None:
        """:meth:`update` at temperature 0 with ``length`` a 0-d long device tensor, its state
        updated in place (``sum_logprobs``, ``done`` keep their storage): one CUDA graph can
        run it at every step."""
        if self.temperature != 0:
            raise UnsupportedOptionError("update_at is the greedy (temperature 0) update")
        rows = tokens.shape[0]
        chosen = logits.argmax(dim=-1)  # (B,)
        chosen_logprob = _logprob_of(logits, chosen)
        ended = tokens.gather(1, (length - 1).expand(rows, 1))[:, 0] == self.eot
        self.sum_logprobs.add_(chosen_logprob.masked_fill(ended, 0.0))
        new = torch.where(ended, self.eot, chosen)
        tokens.scatter_(1, length.expand(rows, 1), new[:, None])
        self.done.copy_(new.eq(self.eot).all())

    def update(
        self, tokens: Tensor, length: int, logits: Tensor, reorder: Callable | None = None
    ) -> None:
        """Choose token ``length`` of every row: tokens (B, >length) long, logits (B, V).
        Rows keep their place, so ``reorder`` (for beam search's interface) is not called."""
        if self.temperature == 0:
            chosen = logits.argmax(dim=-1)  # (B,)
        else:
            dist = Categorical(logits=logits / self.temperature, validate_args=False)
            chosen = dist.sample()
        chosen_logprob = _logprob_of(logits, chosen)
        ended = tokens[:, length - 1] == self.eot
        self.sum_logprobs = torch.where(
            ended, self.sum_logprobs, self.sum_logprobs + chosen_logprob
        )
        tokens[:, length] = torch.where(ended, self.eot, chosen)
        self.done = tokens[:, length].eq(self.eot).all()

    def finalize(self, tokens: Tensor, length: int, group: int) -> Candidates:
        """Per audio, the ``group`` rows of tokens[:, :length] (EOT appended) and log-probs."""
        rows = tokens[:, :length].tolist()  # sync-ok: finalize, after the loop
        scores = self.sum_logprobs.tolist()  # sync-ok: after the search loop
        n_audio = len(rows) // group
        return [
            [(rows[a * group + g] + [self.eot], scores[a * group + g]) for g in range(group)]
            for a in range(n_audio)
        ]


class BeamSearch:
    """Beam search with ``beam_size`` beams per audio, collecting up to
    ``round(beam_size * patience)`` finished sequences per audio (arXiv:2204.05424).

    Each step ranks the ``beam_size + 1`` best extensions of every beam by cumulative log-prob
    (stable, descending); extensions ending in EOT found before the ``beam_size``-th live one are
    finished, the first ``beam_size`` live ones become the new beams. On the first step all
    beams are equal, so only beam 0's extensions count.
    """

    def __init__(
        self,
        beam_size: int,
        eot: int,
        patience: float | None,
        n_audio: int,
        max_len: int,
        device: torch.device,
    ) -> None:
        self.beam = beam_size
        self.eot = eot
        self.max_candidates = round(beam_size * (patience or 1.0))
        if self.max_candidates <= 0:
            raise UnsupportedOptionError(f"invalid beam_size {beam_size} / patience {patience}")
        self.n_audio = n_audio
        batch = n_audio * beam_size
        slots = self.max_candidates + 1  # the last slot takes writes that are dropped
        self.sum_logprobs = torch.zeros(batch, device=device)  # (B,)
        self.fin_tokens = torch.full((n_audio, slots, max_len + 1), eot, device=device)
        self.fin_scores = torch.zeros((n_audio, slots), device=device)
        self.fin_len = torch.zeros((n_audio, slots), dtype=torch.long, device=device)
        self.fin_count = torch.zeros(n_audio, dtype=torch.long, device=device)
        self.done = torch.zeros((), dtype=torch.bool, device=device)
        self._rows = torch.arange(batch, device=device)
        self._first = True

    def update(
        self, tokens: Tensor, length: int, logits: Tensor, reorder: Callable[[Tensor], None]
    ) -> None:
        """Extend beams: tokens (B, >length) rows are reordered and get token ``length``;
        ``reorder(source)`` is called with the (B,) source row of every new beam."""
        a, beam, k = self.n_audio, self.beam, self.beam + 1
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (B, V)
        top_logprob, top_token = logprobs.topk(k)  # (B, K)
        scores = (self.sum_logprobs[:, None] + top_logprob).reshape(a, beam * k)
        cand_token = top_token.reshape(a, beam * k)
        cand_src = self._rows.view(a, beam, 1).expand(a, beam, k).reshape(a, beam * k)
        valid = torch.ones_like(cand_token, dtype=torch.bool)
        if self._first:
            valid[:, k:] = False
        order = scores.masked_fill(~valid, float("-inf")).sort(dim=1, descending=True, stable=True)[
            1
        ]
        s_score, s_token = scores.gather(1, order), cand_token.gather(1, order)  # (A, beam*K)
        s_src, s_valid = cand_src.gather(1, order), valid.gather(1, order)
        live = s_valid & (s_token != self.eot)
        live_upto = live.cumsum(dim=1)  # live candidates up to and including each position
        keep = live & (live_upto <= beam)
        finished = s_valid & (s_token == self.eot) & (live_upto < beam) & ~self.done
        self._store_finished(tokens, length, finished, s_score, s_src)
        kept = (~keep).to(torch.uint8).sort(dim=1, stable=True)[1][:, :beam]  # (A, beam)
        source = torch.where(self.done, self._rows, s_src.gather(1, kept).reshape(-1))  # (B,)
        new_sum = s_score.gather(1, kept).reshape(-1)
        self.sum_logprobs = torch.where(self.done, self.sum_logprobs, new_sum)
        tokens[:, : length + 1] = tokens[:, : length + 1].index_select(0, source)
        new_token = s_token.gather(1, kept).reshape(-1)
        tokens[:, length] = torch.where(self.done, self.eot, new_token)  # frozen beams end here
        reorder(source)
        self._first = False
        self.done = self.done | (self.fin_count >= self.max_candidates).all()

    def _store_finished(
        self, tokens: Tensor, length: int, finished: Tensor, score: Tensor, src: Tensor
    ) -> None:
        """Append finished candidates (A, N) (in rank order) while slots remain."""
        slot = self.fin_count[:, None] + finished.cumsum(dim=1) - 1  # (A, N)
        store = finished & (slot < self.max_candidates)
        slot = torch.where(store, slot, self.max_candidates)  # (A, N)
        a, n = src.shape
        seqs = tokens[:, : length + 1].index_select(0, src.reshape(-1)).view(a, n, length + 1)
        seqs[:, :, length] = self.eot  # (A, N, length + 1)
        index = slot[:, :, None].expand(a, n, length + 1)
        self.fin_tokens[:, :, : length + 1].scatter_(1, index, seqs)
        self.fin_scores.scatter_(1, slot, score)
        self.fin_len.scatter_(1, slot, torch.full_like(slot, length + 1))
        self.fin_count = self.fin_count + store.sum(dim=1)

    def finalize(self, tokens: Tensor, length: int, group: int) -> Candidates:
        """Finished sequences per audio, topped up with the best live beams (+ EOT) when fewer
        than ``beam_size`` finished."""
        counts = self.fin_count.tolist()  # sync-ok: after the search loop
        fin_tokens, fin_len = self.fin_tokens.tolist(), self.fin_len.tolist()  # sync-ok: finalize
        fin_scores = self.fin_scores.tolist()  # sync-ok: after the search loop
        live = tokens[:, :length].tolist()  # sync-ok: after the search loop
        live_scores = self.sum_logprobs.cpu().numpy()  # sync-ok: finalize
        out: Candidates = []
        for a in range(self.n_audio):
            cands = [
                (fin_tokens[a][s][: fin_len[a][s]], fin_scores[a][s]) for s in range(counts[a])
            ]
            rows = live_scores[a * self.beam : (a + 1) * self.beam]
            for j in list(np.argsort(rows))[::-1]:
                if len(cands) >= self.beam:
                    break
                cands.append((live[a * self.beam + j] + [self.eot], float(rows[j])))
            out.append(cands)
        return out


def rank(candidates: Candidates, sample_begin: int, eot: int, length_penalty: float | None):
    """Per audio: the best candidate's sampled tokens (up to its first EOT) and log-prob.

    Score = logprob / length, or logprob / ((5 + length) / 6) ** length_penalty (Google NMT).
    Returns a list of (tokens, sum_logprob).
    """
    chosen = []
    for cands in candidates:
        texts = [_until_eot(seq[sample_begin:], eot) for seq, _ in cands]
        scores = []
        for (_, logprob), text in zip(cands, texts):
            n = len(text)
            penalty = n if length_penalty is None else ((5 + n) / 6) ** length_penalty
            scores.append(logprob / penalty)
        best = int(np.argmax(scores))
        chosen.append((texts[best], cands[best][1]))
    return chosen


def _until_eot(seq: list[int], eot: int) -> list[int]:
    return seq[: seq.index(eot)] if eot in seq else seq
