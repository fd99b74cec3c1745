"""Whisper logit filters, batched: each masks ``logits`` (B, V) in place, without host syncs.

``apply(logits, tokens, length)`` sees the token buffer ``tokens`` (B, >= length) whose first
``length`` columns are the context so far (initial tokens, then sampled ones from
``sample_begin`` on). ``length`` is a host int (the step number), never read from the device.

``apply_at(logits, tokens, length)`` does the same with ``length`` a 0-d long tensor on the
device and every shape fixed (the whole token buffer, masked past ``length``), so that one CUDA
graph can run it at every step; ``signature()`` names what a captured graph depends on. The
tests hold ``apply_at`` equal to ``apply``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from speechrt.engine.transfer import as_device_tensor

NEG_INF = float("-inf")


class _Indexed:
    """A fixed token-id list, kept as an index tensor per device."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = list(ids)
        self._on: dict[torch.device, Tensor] = {}

    def index(self, device: torch.device) -> Tensor:
        if device not in self._on:
            self._on[device] = as_device_tensor(self.ids, device)
        return self._on[device]


class SuppressBlank(_Indexed):
    """At the first sampled position, forbid a blank (" ") or an immediate end of text."""

    def __init__(self, blank_ids: Sequence[int], sample_begin: int) -> None:
        super().__init__(blank_ids)
        self.sample_begin = sample_begin

    def apply(self, logits: Tensor, tokens: Tensor, length: int) -> None:
        if length == self.sample_begin:
            logits.index_fill_(1, self.index(logits.device), NEG_INF)

    def apply_at(self, logits: Tensor, tokens: Tensor, length: Tensor) -> None:
        idx = self.index(logits.device)
        first = length == self.sample_begin  # 0-d bool
        logits.index_copy_(1, idx, logits.index_select(1, idx).masked_fill(first, NEG_INF))

    def signature(self) -> tuple:
        return (type(self).__name__, tuple(self.ids), self.sample_begin)


class SuppressTokens(_Indexed):
    """Forbid a fixed set of tokens at every step."""

    def apply(self, logits: Tensor, tokens: Tensor, length: int) -> None:
        logits.index_fill_(1, self.index(logits.device), NEG_INF)

    def apply_at(self, logits: Tensor, tokens: Tensor, length: Tensor) -> None:
        self.apply(logits, tokens, 0)

    def signature(self) -> tuple:
        return (type(self).__name__, tuple(self.ids))


class ApplyTimestampRules:
    """Whisper's timestamp grammar.

    * ``<|notimestamps|>`` is never sampled;
    * timestamps come in pairs: after a lone timestamp only timestamps or EOT may follow, after
      a pair only text (a single timestamp may close the window right before EOT);
    * timestamps never decrease, and a segment has nonzero length;
    * the first sampled token is a timestamp no later than ``max_initial_timestamp_index``;
    * when the timestamps' total probability beats every single text token, a timestamp is forced.
    """

    def __init__(
        self,
        timestamp_begin: int,
        eot: int,
        no_timestamps: int,
        sample_begin: int,
        max_initial_timestamp_index: int | None,
    ) -> None:
        self.ts_begin = timestamp_begin
        self.eot = eot
        self.no_timestamps = no_timestamps
        self.sample_begin = sample_begin
        self.max_initial = max_initial_timestamp_index

    def apply(self, logits: Tensor, tokens: Tensor, length: int) -> None:
        logits[:, self.no_timestamps] = NEG_INF
        if length > self.sample_begin:
            self._pair_and_order(logits, tokens[:, self.sample_begin : length])
        else:
            logits[:, : self.ts_begin] = NEG_INF
            if self.max_initial is not None:
                logits[:, self.ts_begin + self.max_initial + 1 :] = NEG_INF
        self._timestamps_dominate(logits)

    def apply_at(self, logits: Tensor, tokens: Tensor, length: Tensor) -> None:
        logits[:, self.no_timestamps] = NEG_INF
        first = length <= self.sample_begin  # 0-d bool: nothing sampled yet
        sampled = tokens[:, self.sample_begin :]  # (B, W): the first length - begin are real
        n = length - self.sample_begin  # tokens sampled so far
        steps = torch.arange(sampled.shape[1], device=sampled.device)
        is_ts = (sampled >= self.ts_begin) & (steps < n)[None, :]  # (B, W)
        rows = sampled.shape[0]
        last = is_ts.gather(1, (n - 1).clamp(min=0).expand(rows, 1))[:, 0] & (n >= 1)
        penultimate = is_ts.gather(1, (n - 2).clamp(min=0).expand(rows, 1))[:, 0] | (n < 2)
        pair, lone = last & penultimate, last & ~penultimate  # (B,), both False when first
        timestamps = logits[:, self.ts_begin :]  # (B, n_timestamps) view
        timestamps.masked_fill_(pair[:, None], NEG_INF)
        logits[:, : self.eot].masked_fill_(lone[:, None], NEG_INF)
        where_last = torch.where(is_ts, steps, -1).amax(dim=1)  # (B,) -1: no timestamp yet
        last_ts = sampled.gather(1, where_last.clamp(min=0)[:, None])[:, 0] - self.ts_begin
        limit = torch.where(lone, last_ts, last_ts + 1)  # first allowed index
        ts_index = torch.arange(timestamps.shape[1], device=logits.device)
        below = (where_last >= 0)[:, None] & (ts_index[None, :] < limit[:, None])  # (B, n_ts)
        timestamps.masked_fill_(below, NEG_INF)
        logits[:, : self.ts_begin].masked_fill_(first, NEG_INF)
        if self.max_initial is not None:
            logits[:, self.ts_begin + self.max_initial + 1 :].masked_fill_(first, NEG_INF)
        self._timestamps_dominate(logits)

    def signature(self) -> tuple:
        return (type(self).__name__, self.ts_begin, self.eot, self.no_timestamps,
                self.sample_begin, self.max_initial)  # fmt: skip

    def _timestamps_dominate(self, logits: Tensor) -> None:
        """Forbid every text token (EOT included) in rows where the timestamps' total
        probability beats each single text token's."""
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (B, V)
        ts_logprob = logprobs[:, self.ts_begin :].logsumexp(dim=-1)  # (B,)
        text_max = logprobs[:, : self.ts_begin].max(dim=-1).values  # (B,)
        logits[:, : self.ts_begin].masked_fill_((ts_logprob > text_max)[:, None], NEG_INF)

    def _pair_and_order(self, logits: Tensor, sampled: Tensor) -> None:
        """Mask logits (B, V) by the pair and order rules given sampled tokens (B, S >= 1)."""
        is_ts = sampled >= self.ts_begin  # (B, S)
        last = is_ts[:, -1]
        if sampled.shape[1] >= 2:
            penultimate = is_ts[:, -2]
        else:
            penultimate = torch.ones_like(last)
        timestamps = logits[:, self.ts_begin :]  # (B, n_timestamps) view
        timestamps.masked_fill_((last & penultimate)[:, None], NEG_INF)
        logits[:, : self.eot].masked_fill_((last & ~penultimate)[:, None], NEG_INF)
        steps = torch.arange(sampled.shape[1], device=sampled.device)
        where_last = torch.where(is_ts, steps, -1).amax(dim=1)  # (B,) index of the last timestamp
        last_ts = sampled.gather(1, where_last.clamp(min=0)[:, None])[:, 0] - self.ts_begin
        limit = torch.where(last & ~penultimate, last_ts, last_ts + 1)  # first allowed index
        ts_index = torch.arange(timestamps.shape[1], device=logits.device)
        below = (where_last >= 0)[:, None] & (ts_index[None, :] < limit[:, None])  # (B, n_ts)
        timestamps.masked_fill_(below, NEG_INF)


class ForcedLength:
    """Benchmarks: row b samples exactly ``lengths[b]`` tokens, then EOT (EOT is forbidden
    before, everything else at that step). Apply it last."""

    def __init__(self, lengths: Tensor, sample_begin: int, eot: int) -> None:
        self.lengths = lengths  # (B,) long, on the logits' device
        self.sample_begin = sample_begin
        self.eot = eot
        self._not_eot: Tensor | None = None  # (V,) bool

    def apply_at(self, logits: Tensor, tokens: Tensor, length: Tensor) -> None:
        self.apply(logits, tokens, length)  # its ops take a device length as they take an int

    def signature(self) -> tuple:
        return (type(self).__name__, self.sample_begin, self.eot, self.lengths.shape[0])

    def apply(self, logits: Tensor, tokens: Tensor, length: int | Tensor) -> None:
        sampled = length - self.sample_begin  # tokens sampled so far
        logits[:, self.eot].masked_fill_(self.lengths > sampled, NEG_INF)
        if self._not_eot is None:
            self._not_eot = torch.ones_like(logits[0], dtype=torch.bool)
            self._not_eot[self.eot] = False
        ends = self.lengths == sampled  # (B,)
        logits.masked_fill_(ends[:, None] & self._not_eot[None, :], NEG_INF)
        # EOT itself may have been masked by an earlier filter (the timestamp rules forbid all
        # text, EOT included, when timestamps dominate): give it a finite logit where it must
        # come, or the row would pick token 0 with a NaN log-prob and run past its length
        logits[:, self.eot] = torch.where(ends, 0.0, logits[:, self.eot])
