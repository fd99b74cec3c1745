"""Decoding passes of a cached encoder-decoder, replayed from bucketed CUDA graphs.

:class:`DecodeEngine` serves a network with static caches (the :class:`CachedDecoder` protocol;
e.g. ``WhisperNet``) to a decoding loop through one :class:`DecodeSession` per batch of windows.
Every pass of a window is captured: the cross-attention K/V (``set_audio``, once per window),
the prefill of the initial tokens (once per window) and the single-token steps:

* the engine owns the static buffers: per padded batch, the token buffer (Bp, W) and the
  positions (Bp,) that the loop writes in place and the captured step reads (nothing is copied
  per step); the step gathers each row's token at its position; the prefill reads the first
  columns of the same buffer in place (other token tensors, e.g. language detection's SOT, are
  copied into a staging buffer) and returns only the logits of the positions asked for,
  gathered inside the graph (no (B, T, V) logits);
* greedy decoding (temperature 0) hands each step's tail -- logit filters, argmax update of
  the token buffer, next positions -- to a :class:`~speechrt.decoding.whisper.GreedyPost` kept
  per (rows, filters) configuration and replayed as its own graph right after the step (one
  launch instead of ~20 small kernels from Python per token);
* ``set_audio`` is captured per (padded audios, feature shape, kernel path), the prefill per
  (padded rows, token buffer width, length bucket, gathered positions, padded audios, kernel
  path), the step per (padded rows, padded audios, kv bucket, kernel path); beam-search cache
  reorders per (padded rows, kv bucket). The prefill graphs share one memory pool;
* on CUDA a batch is padded: its audios up to a bucket of ``Buckets.batch_sizes`` (rows stay in
  groups of ``group`` per audio; the features are copied into a static (Ap, S, D) buffer),
  ``kv_len`` up to a multiple of ``kv_step`` (the kernel path reads exactly positions + 1
  entries, so it uses one bucket, the cache length) and the prefill length up to a power of two.
  Padded rows read unused cache rows; their outputs are dropped. Padded prefill positions lie
  after the real ones, so causal attention leaves the real ones unchanged; the cache entries
  they write (positions >= T) are never read before a step overwrites them (a step writes its
  position before attending: the kernel path reads positions + 1 entries, the torch path masks
  keys beyond each row's position);
* on CPU, or with ``cuda_graphs=False``, the same functions run eagerly: on CUDA with the same
  padding (so graphs and eager give the same numbers), on CPU without padding and with the exact
  ``kv_len`` and prefill length (so results equal the bare network's).

A replayed ``set_audio`` does not update the network's default audio count (Python state), so
every prefill and step of a padded session passes its padded audio count explicitly.

Graphs read the caches' memory: when the network reallocates them (``cache_version`` changes)
every graph is dropped and captured again on demand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from speechrt.engine.batching import Buckets
from speechrt.engine.graphs import GraphRunner, GraphStats


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

    def prefill(
        self, tokens: Tensor, at: Tensor | None = None, n_audio: int | None = None
    ) -> Tensor:
        """tokens (B, T) at positions [0, T) -> logits (B, T, V), or (B, K, V) of the
        positions ``at`` (K,); rows grouped into n_audio audios."""

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
    """Bucketed CUDA-graph decoding passes of ``net``; see the module docstring.

    ``pad``: pad batches to buckets (default: on CUDA only), e.g. to test padding on CPU.
    ``post_graphs`` (class default :data:`POST_GRAPHS`): replay the greedy step tails from
    CUDA graphs; off, they run eagerly (the same code).
    """

    # On since session 14: the H200 run of tests/models/whisper/test_prefill.py::
    # test_cuda_graph_decoding_like_eager held the replayed tails to the eager ones, and the
    # window loop's ms/token fell 1.42 -> 0.52 (turbo) and 1.75 -> 1.56 (large-v3) at batch 1.
    POST_GRAPHS = True

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
        self.prefills = GraphRunner(
            self._prefill, enabled=cuda_graphs, copy_inputs=False, share_pool=True
        )
        self.audios = GraphRunner(net.set_audio, enabled=cuda_graphs, copy_inputs=False)
        # greedy step tails (decoding.whisper.GreedyPost), one per configuration, each with
        # its own runner: captured without warm-up (a post advances its state in place)
        self._posts: dict[tuple, tuple[object, GraphRunner]] = {}
        self._buffers: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        self._static: dict[tuple, Tensor] = {}  # staging tokens, gather positions, features
        self._version: int | None = None

    @property
    def runners(self) -> tuple[GraphRunner, ...]:
        return (self.audios, self.prefills, self.steps, self.reorders)

    @property
    def cuda_graphs(self) -> bool:
        return self.steps.enabled

    @cuda_graphs.setter
    def cuda_graphs(self, enabled: bool) -> None:
        for runner in self.runners:
            runner.enabled = enabled
        for _, runner in self._posts.values():
            runner.enabled = enabled and self.POST_GRAPHS

    def stats(self) -> dict:
        """Captures, replays, eager calls and capture seconds of all graphs (set_audio,
        prefill, step, reorder, greedy post), plus ``by_pass``: {pass: (captures, replays)}."""
        posts = GraphStats()  # the post runners' stats summed
        for _, runner in self._posts.values():
            posts.captures += runner.stats.captures
            posts.replays += runner.stats.replays
            posts.eager_calls += runner.stats.eager_calls
            posts.capture_seconds.update(runner.stats.capture_seconds)
            posts.capture_failure = posts.capture_failure or runner.stats.capture_failure
        all_stats = [r.stats for r in self.runners] + [posts]
        names = ("set_audio", "prefill", "step", "reorder", "post")
        failures = [s.capture_failure for s in all_stats if s.capture_failure]
        return {
            "captures": sum(s.captures for s in all_stats),
            "replays": sum(s.replays for s in all_stats),
            "eager_calls": sum(s.eager_calls for s in all_stats),
            "capture_s": sum(sum(s.capture_seconds.values()) for s in all_stats),
            "capture_failure": failures[0] if failures else None,
            "by_pass": {n: (s.captures, s.replays) for n, s in zip(names, all_stats)},
        }

    # ------------------------------------------------------------------ captured functions
    def _step(self, tokens: Tensor, positions: Tensor, kv_len: int, n_audio: int) -> Tensor:
        """tokens (Bp, W), positions (Bp,) -> logits (Bp, V) of tokens[b, positions[b]]."""
        return self.net.step(tokens.gather(1, positions[:, None]), positions, kv_len, n_audio)

    def _prefill(self, tokens: Tensor, length: int, at: Tensor, n_audio: int) -> Tensor:
        """tokens (Bp, W) -> logits (Bp, K, V) of the positions at (K,) after running
        tokens[:, :length] at positions [0, length)."""
        return self.net.prefill(tokens[:, :length], at=at, n_audio=n_audio)

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
            for runner in self.runners:
                runner.clear()
            self._posts.clear()
            self._version = self.net.cache_version
        if self.pads(features.device):
            shape = (n_pad, *features.shape[1:])  # (Ap, S, D)
            static = self.static_buffer("audio", shape, features.dtype, features.device)
            static[:n_audio].copy_(features)  # rows beyond n_audio: padding
            by_position = self.net.uses_kernels(features.device)
            self.audios((n_pad, *features.shape[1:], features.dtype, by_position), static)
        else:
            self.net.set_audio(features)
        return DecodeSession(self, n_audio, n_pad, group, features.device)

    def greedy_post(self, filters, eot: int, rows: int, rows_pad: int, width: int, device):
        """The (GreedyPost, runner) of this configuration, made on first use."""
        from speechrt.decoding.whisper import GreedyPost

        key = (rows_pad, width, device, GreedyPost.signature(filters, eot, rows))
        if key not in self._posts:
            post = GreedyPost(filters, eot, rows, device)
            enabled = self.cuda_graphs and self.POST_GRAPHS
            runner = GraphRunner(post, enabled=enabled, warmup=0, copy_inputs=False)
            self._posts[key] = (post, runner)
        return self._posts[key]

    def static_buffer(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """A zero-initialised buffer, reused for the same (name, shape, dtype, device)."""
        key = (name, shape, dtype, device)
        if key not in self._static:
            self._static[key] = torch.zeros(shape, dtype=dtype, device=device)
        return self._static[key]

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

    def prefill_bucket(self, length: int, limit: int) -> int:
        """Positions a padded prefill of ``length`` tokens runs: the next power of two, at most
        ``limit`` (the token buffer's width) and the cache length."""
        return min(1 << (length - 1).bit_length(), limit, self.net.cache_len)


class DecodeSession:
    """Decoding state of one batch of windows: ``A`` audios x ``group`` rows (implements
    :class:`speechrt.decoding.whisper.DecoderSession`)."""

    def __init__(
        self, engine: DecodeEngine, n_audio: int, n_pad: int, group: int, device: torch.device
    ) -> None:
        self.engine = engine
        self.rows, self.rows_pad = n_audio * group, n_pad * group
        self.n_audio, self.n_pad = n_audio, n_pad
        self.device = device
        self._tokens: Tensor | None = None
        self._positions: Tensor | None = None
        self._source: Tensor | None = None
        self._step_out: Tensor | None = None
        self._post_runner: GraphRunner | None = None

    def token_buffers(self, batch: int, width: int) -> tuple[Tensor, Tensor]:
        """The engine's token buffer (B, width) and positions (B,) views that :meth:`step`
        reads in place (rows beyond B are padding)."""
        if batch != self.rows:
            raise ValueError(f"session has {self.rows} rows, asked for {batch}")
        tokens, positions, source = self.engine.token_buffers(self.rows_pad, width, self.device)
        self._tokens, self._positions, self._source = tokens, positions, source
        return tokens[:batch], positions[:batch]

    def prefill(self, tokens: Tensor, at: Sequence[int]) -> Tensor:
        """tokens (B', T) at positions [0, T) -> logits (B', K, V) FP32 of the K positions
        ``at`` (ints in [-T, T)); B' is a multiple of the audios (e.g. the session's rows, or
        one row per audio). Fills the self-attention cache [0, T) of rows [0, B').

        Padded (CUDA): one replay of the graph of the padded rows and length bucket; tokens
        that are the first columns of :meth:`token_buffers` are read in place, others are
        copied into a staging buffer. The result is a view valid until the next prefill.
        Unpadded (CPU): the bare network's full logits at ``at``, exactly."""
        e, t = self.engine, tokens.shape[1]
        if any(not -t <= a < t for a in at):
            raise IndexError(f"prefill positions {list(at)} out of range for {t} tokens")
        if not e.pads(self.device):
            return e.net.prefill(tokens)[:, list(at)]
        if tokens.shape[0] % self.n_audio:
            raise ValueError(f"{tokens.shape[0]} rows do not group into {self.n_audio} audios")
        rows = self.n_pad * (tokens.shape[0] // self.n_audio)
        source = self._prefill_source(tokens, rows)  # (rows, W)
        length = e.prefill_bucket(t, source.shape[1])
        index = e.static_buffer("prefill_at", (len(at),), torch.long, self.device)
        for k, a in enumerate(at):
            index[k : k + 1].fill_(a % t)  # no host-to-device copy
        by_position = e.net.uses_kernels(self.device)
        key = (rows, source.shape[1], length, len(at), self.n_pad, by_position)
        return e.prefills(key, source, length, index, self.n_pad)[: tokens.shape[0]]

    def _prefill_source(self, tokens: Tensor, rows: int) -> Tensor:
        """The static (rows, W) token tensor whose first T columns hold ``tokens`` (B', T)."""
        buf = self._tokens
        if (
            buf is not None
            and tokens.shape[0] == self.rows
            and tokens.data_ptr() == buf.data_ptr()
            and tokens.stride() == buf.stride()
        ):
            return buf  # the step's token buffer, read in place
        t = tokens.shape[1]
        width = self.engine.prefill_bucket(t, self.engine.net.cache_len)
        staging = self.engine.static_buffer(
            "prefill_tokens", (rows, width), tokens.dtype, self.device
        )
        staging[: tokens.shape[0], :t].copy_(tokens)
        return staging

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
        self._step_out = out
        return out[: self.rows]

    def greedy_post(self, filters, eot: int):
        """The engine's :class:`~speechrt.decoding.whisper.GreedyPost` for these filters over
        this session's rows (see :meth:`post`)."""
        post, runner = self.engine.greedy_post(
            filters, eot, self.rows, self.rows_pad, self._tokens.shape[1], self.device
        )
        self._post_runner = runner
        return post

    def post(self, post, logits: Tensor) -> None:
        """Run ``post`` on the logits :meth:`step` just returned: on CUDA one replay of its
        graph over the step's full output and the token/position buffers (captured per step
        output buffer: one per step graph)."""
        out, runner = self._step_out, self._post_runner
        if runner is None or runner.fn is not post:
            raise ValueError("post takes the GreedyPost this session's greedy_post returned")
        if logits.data_ptr() != out.data_ptr():
            raise ValueError("post takes the logits of this session's last step")
        runner(out.data_ptr(), out, self._tokens, self._positions)

    def reorder_cache(self, source: Tensor, length: int) -> None:
        """Self-attention cache row b <- row source[b] (B,), for the ``length`` positions
        written so far."""
        upto = self.engine.kv_bucket(length, self.device)
        self._source[: self.rows].copy_(source)
        self.engine.reorders((self.rows_pad, upto), self._source, upto)
