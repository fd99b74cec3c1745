"""Single-token decode steps of a cached encoder-decoder, replayed from bucketed CUDA graphs.

:class:`DecodeEngine` serves a network with static caches (the :class:`CachedDecoder` protocol;
e.g. ``WhisperNet``) to a decoding loop through one :class:`DecodeSession` per batch of windows:

* the engine owns the step's static buffers: per padded batch, the token buffer (Bp, W) and the
  positions (Bp,) that the loop writes in place and the captured step reads (nothing is copied
  per step); the step gathers each row's token at its position;
* the step is captured once per (padded rows, padded audios, kv bucket, kernel path) and
  replayed; beam-search cache reorders are captured per (padded rows, kv bucket);
* on CUDA a batch is padded: its audios up to a bucket of ``Buckets.batch_sizes`` (rows stay in
  groups of ``group`` per audio) and ``kv_len`` up to a multiple of ``kv_step`` (the kernel path
  reads exactly positions + 1 entries, so it uses one bucket, the cache length). Padded rows
  read unused cache rows; their outputs are dropped;
* on CPU, or with ``cuda_graphs=False``, the same functions run eagerly: on CUDA with the same
  padding (so graphs and eager give the same numbers), on CPU without padding and with the exact
  ``kv_len`` (so results equal the bare network's).

Graphs read the caches' memory: when the network reallocates them (``cache_version`` changes)
every graph is dropped and captured again on demand.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from speechrt.engine.batching import Buckets
from speechrt.engine.graphs import GraphRunner


class CachedDecoder(Protocol):
    """A decoder with static self-attention caches and per-audio cross-attention caches."""

    cache_version: int
    cache_len: int

    def ensure_caches(self, batch: int, n_audio: int, max_len: int | None = None) -> None:
        """Caches for at least ``batch`` rows, ``n_audio`` audios and ``max_len`` positions."""

    def set_audio(self, features: Tensor) -> None:
        """Store cross-attention K/V of features (A, S, D); rows then group by audio."""

    def uses_kernels(self, device: torch.device) -> bool:
        """True when a step reads exactly positions + 1 cache entries (kv_len is not needed)."""

    def prefill(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) at positions [0, T) -> logits (B, T, V)."""

    def step(
        self,
        tokens: Tensor,
        positions: Tensor,
        kv_len: int | None = None,
        n_audio: int | None = None,
    ) -> Tensor:
        """tokens (B, 1) at positions (B,) -> logits (B, V); rows grouped into n_audio audios."""

    def reorder_cache(self, source: Tensor, upto: int | None = None) -> None:
        """Self-attention cache row b <- row source[b] for positions [0, upto)."""


class DecodeEngine:
    """Bucketed CUDA-graph decode steps of ``net``; see the module docstring.

    ``pad``: pad batches to buckets (default: on CUDA only), e.g. to test padding on CPU.
    """

    def __init__(
        self,
        net: CachedDecoder,
        cuda_graphs: bool = True,
        buckets: Buckets | None = None,
        kv_step: int = 64,
        pad: bool | None = None,
    ) -> None:
        self.net = net
        self.buckets = buckets or Buckets()
        self.kv_step = kv_step
        self.pad = pad
        self.steps = GraphRunner(self._step, enabled=cuda_graphs, copy_inputs=False)
        # a reorder permutes in place: no eager warm-up before its capture
        self.reorders = GraphRunner(self._reorder, enabled=cuda_graphs, warmup=0, copy_inputs=False)
        self._buffers: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        self._version: int | None = None

    @property
    def cuda_graphs(self) -> bool:
        return self.steps.enabled

    @cuda_graphs.setter
    def cuda_graphs(self, enabled: bool) -> None:
        self.steps.enabled = self.reorders.enabled = enabled

    def stats(self) -> dict:
        """Captures, replays, eager calls and capture seconds of the step and reorder graphs."""
        s, r = self.steps.stats, self.reorders.stats
        return {
            "captures": s.captures + r.captures,
            "replays": s.replays + r.replays,
            "eager_calls": s.eager_calls + r.eager_calls,
            "capture_s": sum(s.capture_seconds.values()) + sum(r.capture_seconds.values()),
            "capture_failure": s.capture_failure or r.capture_failure,
        }

    # ------------------------------------------------------------------ captured functions
    def _step(self, tokens: Tensor, positions: Tensor, kv_len: int, n_audio: int) -> Tensor:
        """tokens (Bp, W), positions (Bp,) -> logits (Bp, V) of tokens[b, positions[b]]."""
        return self.net.step(tokens.gather(1, positions[:, None]), positions, kv_len, n_audio)

    def _reorder(self, source: Tensor, upto: int) -> None:
        self.net.reorder_cache(source, upto)

    # ------------------------------------------------------------------ sessions
    def pads(self, device: torch.device) -> bool:
        """Whether batches on ``device`` are padded to buckets."""
        return device.type == "cuda" if self.pad is None else self.pad

    def session(self, features: Tensor, group: int) -> DecodeSession:
        """Store the cross-attention K/V of features (A, S, D) and open a session whose rows
        are ``group`` consecutive rows per audio."""
        n_audio = features.shape[0]
        n_pad = self.buckets.batch(n_audio) if self.pads(features.device) else n_audio
        self.net.ensure_caches(n_pad * group, n_pad)
        if self.net.cache_version != self._version:
            self.steps.clear()
            self.reorders.clear()
            self._version = self.net.cache_version
        self.net.set_audio(features)
        return DecodeSession(self, n_audio, n_pad, group, features.device)

    def token_buffers(self, rows: int, width: int, device: torch.device):
        """(tokens (rows, width), positions (rows,), reorder source (rows,)), long, reused."""
        key = (rows, width, device)
        if key not in self._buffers:
            tokens = torch.zeros(rows, width, dtype=torch.long, device=device)
            positions = torch.zeros(rows, dtype=torch.long, device=device)
            source = torch.arange(rows, device=device)  # padded rows keep their own cache
            self._buffers[key] = (tokens, positions, source)
        return self._buffers[key]

    def kv_bucket(self, length: int, device: torch.device) -> int:
        """Cache entries a padded step or reorder covers for ``length`` positions."""
        if not self.pads(device):
            return length
        return min(self.net.cache_len, -(-length // self.kv_step) * self.kv_step)


class DecodeSession:
    """Decoding state of one batch of windows: ``A`` audios x ``group`` rows (implements
    :class:`speechrt.decoding.whisper.DecoderSession`)."""

    def __init__(
        self, engine: DecodeEngine, n_audio: int, n_pad: int, group: int, device: torch.device
    ) -> None:
        self.engine = engine
        self.rows, self.rows_pad = n_audio * group, n_pad * group
        self.n_pad = n_pad
        self.device = device
        self._tokens: Tensor | None = None
        self._positions: Tensor | None = None
        self._source: Tensor | None = None

    def token_buffers(self, batch: int, width: int) -> tuple[Tensor, Tensor]:
        """The engine's token buffer (B, width) and positions (B,) views that :meth:`step`
        reads in place (rows beyond B are padding)."""
        if batch != self.rows:
            raise ValueError(f"session has {self.rows} rows, asked for {batch}")
        tokens, positions, source = self.engine.token_buffers(self.rows_pad, width, self.device)
        self._tokens, self._positions, self._source = tokens, positions, source
        return tokens[:batch], positions[:batch]

    def prefill(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) at positions [0, T) -> logits (B, T, V) FP32 (eager, once per window)."""
        return self.engine.net.prefill(tokens)

    def step(self, kv_len: int) -> Tensor:
        """Run every row's token ``tokens[b, positions[b]]`` (all positions < kv_len) ->
        logits (B, V) FP32, a view of the graph's output valid until the next step."""
        e, net = self.engine, self.engine.net
        by_position = net.uses_kernels(self.device)
        if by_position and e.pads(self.device):
            kv = net.cache_len
        else:
            kv = e.kv_bucket(kv_len, self.device)
        key = (self.rows_pad, self._tokens.shape[1], self.n_pad, kv, by_position)
        out = e.steps(key, self._tokens, self._positions, kv, self.n_pad)
        return out[: self.rows]

    def reorder_cache(self, source: Tensor, length: int) -> None:
        """Self-attention cache row b <- row source[b] (B,), for the ``length`` positions
        written so far."""
        upto = self.engine.kv_bucket(length, self.device)
        self._source[: self.rows].copy_(source)
        self.engine.reorders((self.rows_pad, upto), self._source, upto)
