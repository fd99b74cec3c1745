"""Decoding of 30 s Whisper windows: language detection, greedy/sampling/beam search, filters.

Decoding consumes tensors through a :class:`DecoderSession` (the engine's session after
``set_audio``, or a bare network wrapped in :class:`EagerSession`), never a model. Semantics
follow openai-whisper's ``decoding.py`` (same options, same tokens on CPU) but every step is
batched over audios and candidates, and the step loop never reads the device except through
:class:`StopFlag` (on CUDA, one step late and without stalling). The session owns the token
buffer and the positions that its step reads, so a captured step replays without copies; the
prefill reads the first columns of that buffer and returns only the positions the loop uses
(the SOT's, for the no-speech probability, and the last one).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from speechrt.decoding.whisper_filters import (
    ApplyTimestampRules,
    ForcedLength,
    SuppressBlank,
    SuppressTokens,
)
from speechrt.decoding.whisper_search import BeamSearch, GreedySearch, rank
from speechrt.engine.transfer import as_device_tensor
from speechrt.errors import UnsupportedOptionError

if TYPE_CHECKING:  # decoding needs only the tokenizer's interface, not the model package
    from speechrt.models.whisper.tokenizer import WhisperTokenizer

CHUNK_SECONDS = 30
# Greedy decoding (temperature 0) runs each step's filters and update as a GreedyPost (device
# length, fixed shapes; a CUDA graph per configuration in DecodeEngine sessions) instead of the
# per-step host loop over filters and search; the tests hold both paths to the same tokens.
GREEDY_POST = True


class DecoderSession(Protocol):
    """The decoder of one batch of audio windows (cross-attention K/V already stored).

    Rows are grouped by audio (row b reads audio b // (B / n_audio)).
    """

    def token_buffers(self, batch: int, width: int) -> tuple[Tensor, Tensor]:
        """Token buffer (B, width) and positions (B,), long, that :meth:`step` reads."""

    def prefill(self, tokens: Tensor, at: Sequence[int]) -> Tensor:
        """tokens (B', T) at positions [0, T) (B' a multiple of the audios) -> logits
        (B', K, V) FP32 of the K positions ``at`` (ints in [-T, T)), valid until the next
        prefill; fills the self-attention cache [0, T)."""

    def step(self, kv_len: int) -> Tensor:
        """The token tokens[b, positions[b]] of every row at its position (< kv_len) ->
        logits (B, V) FP32, valid until the next step (filters may edit it in place)."""

    def reorder_cache(self, source: Tensor, length: int) -> None:
        """Self-attention cache row b <- row source[b] (positions [0, length) are written)."""

    def greedy_post(self, filters: Sequence, eot: int) -> GreedyPost:
        """A :class:`GreedyPost` over the session's rows with these filters (engines keep one
        per configuration, so that its CUDA graph is captured once)."""

    def post(self, post: GreedyPost, logits: Tensor) -> None:
        """Run ``post`` on the logits :meth:`step` just returned (engines: a graph replay)."""


class GreedyPost:
    """The tail of a greedy (temperature 0) decode step with no host work: the filters'
    ``apply_at``, :meth:`GreedySearch.update_at` on the token buffer, then ``length`` += 1 and
    every row's position set to ``length - 1`` for the next step -- all on the device with
    fixed shapes, so that an engine can capture it in a CUDA graph and replay it after each
    step instead of launching its ~20 small kernels from Python one by one.

    Its state (``length``, the search's ``sum_logprobs`` and ``done``) is kept in place across
    windows; :meth:`start` resets it.
    """

    def __init__(self, filters: Sequence, eot: int, rows: int, device: torch.device) -> None:
        self.filters = list(filters)
        self.rows = rows
        self.search = GreedySearch(0.0, eot, rows, device)
        self.length = torch.zeros((), dtype=torch.long, device=device)

    @staticmethod
    def signature(filters: Sequence, eot: int, rows: int) -> tuple:
        """What a captured post depends on besides its buffers."""
        return (eot, rows, *(f.signature() for f in filters))

    def start(self, sample_begin: int, filters: Sequence) -> GreedySearch:
        """Reset for a new batch of windows (``filters``: this batch's, of the same signature;
        a forced-length filter's lengths are copied in); returns the search it updates."""
        self.search.sum_logprobs.zero_()
        self.search.done.fill_(False)
        self.length.fill_(sample_begin)
        for mine, theirs in zip(self.filters, filters):
            if isinstance(mine, ForcedLength) and mine is not theirs:
                mine.lengths.copy_(theirs.lengths)
        return self.search

    def __call__(self, logits: Tensor, tokens: Tensor, positions: Tensor) -> None:
        """logits (>= B, V), tokens (>= B, W), positions (>= B,): the first B rows are the
        session's (padding rows beyond are left alone)."""
        logits, tokens = logits[: self.rows], tokens[: self.rows]
        for f in self.filters:
            f.apply_at(logits, tokens, self.length)
        self.search.update_at(tokens, self.length, logits)
        self.length.add_(1)
        positions[: self.rows].copy_((self.length - 1).expand(self.rows))


class CachedNet(Protocol):
    """A bare network with static caches (``WhisperNet`` after ``set_audio``)."""

    def prefill(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) at positions [0, T) -> logits (B, T, V) FP32."""

    def step(self, tokens: Tensor, positions: Tensor, kv_len: int | None = None) -> Tensor:
        """tokens (B, 1) at positions (B,) -> logits (B, V) FP32."""

    def reorder_cache(self, source: Tensor) -> None:
        """Self-attention cache row b <- row source[b]."""


class EagerSession:
    """A :class:`DecoderSession` over a bare :class:`CachedNet`: plain buffers, eager steps."""

    def __init__(self, net: CachedNet, device: torch.device) -> None:
        self.net = net
        self.device = device
        self.tokens: Tensor | None = None
        self.positions: Tensor | None = None

    def token_buffers(self, batch: int, width: int) -> tuple[Tensor, Tensor]:
        self.tokens = torch.zeros(batch, width, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=self.device)
        return self.tokens, self.positions

    def prefill(self, tokens: Tensor, at: Sequence[int]) -> Tensor:
        return self.net.prefill(tokens)[:, list(at)]  # (B, K, V)

    def step(self, kv_len: int) -> Tensor:
        tokens = self.tokens.gather(1, self.positions[:, None])  # (B, 1)
        return self.net.step(tokens, self.positions, kv_len=kv_len)

    def reorder_cache(self, source: Tensor, length: int) -> None:
        self.net.reorder_cache(source)

    def greedy_post(self, filters: Sequence, eot: int) -> GreedyPost:
        return GreedyPost(filters, eot, self.tokens.shape[0], self.device)

    def post(self, post: GreedyPost, logits: Tensor) -> None:
        post(logits, self.tokens, self.positions)


@dataclass(frozen=True)
class WhisperDecodeOptions:
    """Options of one window's decoding (those of openai-whisper's ``DecodingOptions``)."""

    task: str = "transcribe"
    language: str | None = None  # None: detect per audio
    temperature: float = 0.0
    sample_len: int | None = None  # max sampled tokens (default n_text_ctx // 2)
    best_of: int | None = None  # independent samples when temperature > 0
    beam_size: int | None = None  # beams when temperature == 0
    patience: float | None = None
    length_penalty: float | None = None  # None: divide by length; else Google NMT alpha
    prompt: str | Sequence[int] | None = None  # previous context (after <|startofprev|>)
    prefix: str | Sequence[int] | None = None  # forced start of this window's text
    suppress_tokens: str | Sequence[int] | None = "-1"  # "-1": the non-speech symbols
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: float | None = 1.0

    def __post_init__(self) -> None:
        if self.task not in ("transcribe", "translate"):
            raise UnsupportedOptionError(f"unknown task {self.task!r}; use transcribe or translate")
        if self.beam_size is not None and self.best_of is not None:
            raise UnsupportedOptionError("beam_size and best_of cannot be given together")
        if self.temperature == 0 and self.best_of is not None:
            raise UnsupportedOptionError("best_of needs temperature > 0")
        if self.patience is not None and self.beam_size is None:
            raise UnsupportedOptionError("patience needs beam_size")
        if self.patience is not None and self.patience <= 0:
            raise UnsupportedOptionError(f"patience must be > 0, got {self.patience}")
        if self.length_penalty is not None and not 0 <= self.length_penalty <= 1:
            raise UnsupportedOptionError("length_penalty must be within [0, 1]")
        for name in ("beam_size", "best_of", "sample_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UnsupportedOptionError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class WindowResult:
    """The decoding of one audio window."""

    language: str
    tokens: list[int] = field(default_factory=list)  # sampled tokens, without EOT
    text: str = ""
    sum_logprob: float = 0.0
    avg_logprob: float = float("nan")
    no_speech_prob: float = float("nan")
    temperature: float = float("nan")
    compression_ratio: float = float("nan")
    language_probs: dict[str, float] | None = None


def compression_ratio(text: str) -> float:
    """len(utf-8 bytes) / len(zlib-compressed bytes): high for repetitive text."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


class StopFlag:
    """Reads a device ``done`` flag: at once on CPU; on CUDA one step late (through pinned
    memory and an event), so the host never waits for the step it just queued."""

    def __init__(self, device: torch.device, lag: int | None = None) -> None:
        self.lag = (1 if device.type == "cuda" else 0) if lag is None else lag
        self._pending: list[tuple[Tensor, object]] = []

    def __call__(self, done: Tensor) -> bool:
        if self.lag == 0:
            return bool(done)
        if done.is_cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(done, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = done.clone(), None
        self._pending.append((host, event))
        if len(self._pending) <= self.lag:
            return False
        host, event = self._pending.pop(0)
        if event is not None:
            event.synchronize()
        return bool(host)


def detect_language(
    session: DecoderSession | CachedNet,
    tokenizer: WhisperTokenizer,
    n_audio: int,
    device: torch.device,
) -> tuple[Tensor, list[dict[str, float]]]:
    """Language tokens (A,) and per-audio {code: probability} from the logits after SOT."""
    if tokenizer.language is None:
        raise UnsupportedOptionError("this model has no language tokens (English-only)")
    if not hasattr(session, "token_buffers"):
        session = EagerSession(session, device)
    sot = torch.full((n_audio, 1), tokenizer.sot, dtype=torch.long, device=device)
    logits = session.prefill(sot, (0,))[:, 0]  # (A, V)
    allowed = as_device_tensor(tokenizer.all_language_tokens, device)
    masked = torch.full_like(logits, float("-inf"))
    masked[:, allowed] = logits[:, allowed]
    tokens = masked.argmax(dim=-1)  # (A,)
    probs = masked.softmax(dim=-1)[:, allowed].tolist()  # (A, n_languages) sync-ok: once
    codes = tokenizer.all_language_codes
    return tokens, [dict(zip(codes, row)) for row in probs]


class WindowDecoder:
    """Decodes a batch of windows with fixed options (openai-whisper's ``DecodingTask``)."""

    def __init__(
        self,
        tokenizer: WhisperTokenizer,
        options: WhisperDecodeOptions,
        n_text_ctx: int,
        n_audio_ctx: int,
        stop_lag: int | None = None,
    ) -> None:
        """``stop_lag``: steps by which the loop may notice completion late (default: 0 on
        CPU, 1 on CUDA); results do not depend on it, only RNG use after completion does."""
        if tokenizer.multilingual:
            tokenizer = tokenizer.with_options(options.language or "en", options.task)
        self.tokenizer = tokenizer
        self.options = options
        self.n_ctx = n_text_ctx
        self.group = options.beam_size or options.best_of or 1
        self.sample_len = options.sample_len or n_text_ctx // 2
        self.initial_tokens = self.initial_tokens_for(options.prompt)
        self.sample_begin = len(self.initial_tokens)
        self.sot_index = self.initial_tokens.index(tokenizer.sot)
        self.filters = self._filters(n_audio_ctx)
        self.stop_lag = stop_lag
        self.use_greedy_post = GREEDY_POST

    def initial_tokens_for(self, prompt: str | Sequence[int] | None) -> tuple[int, ...]:
        """SOT sequence (+ no-timestamps, prefix) after ``<|startofprev|> prompt`` if any."""
        tok, opts = self.tokenizer, self.options
        tokens = list(tok.sot_sequence)
        if opts.without_timestamps:
            tokens.append(tok.no_timestamps)
        if opts.prefix:
            prefix = _as_ids(tok, opts.prefix)
            max_prefix = self.n_ctx // 2 - self.sample_len
            tokens += prefix[-max_prefix:]
        if prompt:
            prompt = _as_ids(tok, prompt)
            tokens = [tok.sot_prev, *prompt[-(self.n_ctx // 2 - 1) :], *tokens]
        return tuple(tokens)

    def _filters(self, n_audio_ctx: int) -> list:
        tok, opts = self.tokenizer, self.options
        filters: list = []
        if opts.suppress_blank:
            filters.append(SuppressBlank([*tok.encode(" "), tok.eot], self.sample_begin))
        if opts.suppress_tokens:
            filters.append(SuppressTokens(suppressed_tokens(tok, opts.suppress_tokens)))
        if not opts.without_timestamps:
            max_initial = None
            if opts.max_initial_timestamp:
                max_initial = round(opts.max_initial_timestamp / (CHUNK_SECONDS / n_audio_ctx))
            filters.append(
                ApplyTimestampRules(
                    tok.timestamp_begin, tok.eot, tok.no_timestamps, self.sample_begin, max_initial
                )
            )
        return filters

    def run(
        self,
        session: DecoderSession | CachedNet,
        n_audio: int,
        device: torch.device,
        prompts: Sequence[Sequence[int]] | None = None,
        forced_lengths: Tensor | None = None,
    ) -> list[WindowResult]:
        """Decode ``n_audio`` windows whose features the session holds.

        ``prompts``: one previous-text prompt per window, replacing ``options.prompt``; all
        must give initial tokens as long as ``options.prompt`` does. ``forced_lengths`` (A,)
        (benchmarks): window a samples exactly that many tokens, then EOT.
        """
        if not hasattr(session, "token_buffers"):
            session = EagerSession(session, device)
        tok, opts = self.tokenizer, self.options
        tokens = torch.full((n_audio, self.n_ctx + 1), tok.eot, dtype=torch.long, device=device)
        tokens[:, : self.sample_begin] = self._initial_rows(prompts, n_audio, device)
        languages, language_probs = [opts.language] * n_audio, None
        if opts.language is None:
            lang_tokens, language_probs = detect_language(session, tok, n_audio, device)
            languages = [max(p, key=p.get) for p in language_probs]
            tokens[:, self.sot_index + 1] = lang_tokens
        filters = list(self.filters)
        if forced_lengths is not None:
            lengths = as_device_tensor(forced_lengths, device).repeat_interleave(self.group)  # (B,)
            filters.append(ForcedLength(lengths, self.sample_begin, tok.eot))
        buffer, positions = session.token_buffers(n_audio * self.group, self.n_ctx + 1)
        buffer.copy_(tokens.repeat_interleave(self.group, dim=0))  # (B, n_ctx + 1)
        search, length, no_speech = self._search(session, buffer, positions, filters, n_audio)
        chosen = rank(
            search.finalize(buffer, length, self.group),
            self.sample_begin,
            tok.eot,
            opts.length_penalty,
        )
        return [
            self._result(ids, logprob, languages[a], no_speech[a * self.group], language_probs, a)
            for a, (ids, logprob) in enumerate(chosen)
        ]

    def _initial_rows(self, prompts, n_audio: int, device: torch.device) -> Tensor:
        """Initial tokens (1 or A, sample_begin) for all windows or one row per window."""
        if prompts is None:
            return as_device_tensor(self.initial_tokens, device)[None]
        rows = [self.initial_tokens_for(p) for p in prompts]
        if len(rows) != n_audio or any(len(r) != self.sample_begin for r in rows):
            raise ValueError("need one prompt per window, all as long as options.prompt")
        return as_device_tensor(rows, device)  # (A, sample_begin)

    def _search(
        self,
        session: DecoderSession,
        tokens: Tensor,
        positions: Tensor,
        filters: list,
        n_audio: int,
    ):
        """The step loop over the session's buffers tokens (B, n_ctx + 1) and positions (B,);
        returns (search, final length, no-speech probability per row)."""
        opts, eot = self.options, self.tokenizer.eot
        batch, device = tokens.shape[0], tokens.device
        post = None
        if opts.beam_size is not None:
            search = BeamSearch(opts.beam_size, eot, opts.patience, n_audio, self.n_ctx, device)
        elif opts.temperature == 0 and self.use_greedy_post and hasattr(session, "greedy_post"):
            post = session.greedy_post(filters, eot)
            search = post.start(self.sample_begin, filters)
        else:
            search = GreedySearch(opts.temperature, eot, batch, device)
        stop = StopFlag(device, self.stop_lag)
        length = self.sample_begin
        # the prefill reads the session's buffer in place; (B, 2, V): SOT and last position
        logits = session.prefill(tokens[:, :length], (self.sot_index, length - 1))
        no_speech = logits[:, 0].softmax(dim=-1)[:, self.tokenizer.no_speech]
        logits = logits[:, 1]
        if post is not None:  # filters, update and next positions on the device
            post(logits, tokens, positions)  # the prefill's logits: eagerly
            length += 1
            for _ in range(1, self.sample_len):
                if length > self.n_ctx or stop(search.done):
                    break
                session.post(post, session.step(kv_len=length))
                length += 1
            return search, length, no_speech.tolist()  # sync-ok: after the step loop
        for i in range(self.sample_len):
            if i > 0:
                positions.fill_(length - 1)
                logits = session.step(kv_len=length)
            for f in filters:
                f.apply(logits, tokens, length)
            # cache positions [0, length) hold keys/values now
            search.update(tokens, length, logits, partial(session.reorder_cache, length=length))
            length += 1
            if length > self.n_ctx or stop(search.done):
                break
        return search, length, no_speech.tolist()  # sync-ok: after the step loop

    def _result(self, ids, logprob, language, no_speech, language_probs, a) -> WindowResult:
        text = self.tokenizer.decode(ids).strip()
        return WindowResult(
            language=language,
            tokens=ids,
            text=text,
            sum_logprob=logprob,
            avg_logprob=logprob / (len(ids) + 1),
            no_speech_prob=no_speech,
            temperature=self.options.temperature,
            compression_ratio=compression_ratio(text),
            language_probs=None if language_probs is None else language_probs[a],
        )


def _as_ids(tokenizer: WhisperTokenizer, value: str | Sequence[int]) -> list[int]:
    if isinstance(value, str):
        return tokenizer.encode(" " + value.strip())
    return list(value)


def suppressed_tokens(tokenizer: WhisperTokenizer, spec: str | Sequence[int]) -> list[int]:
    """Token ids to suppress: ``spec`` ("-1" / -1 = the non-speech symbols, or ids, or a
    comma-separated string) plus the task/SOT/prev/LM/no-speech control tokens."""
    ids = [int(t) for t in spec.split(",")] if isinstance(spec, str) else [int(t) for t in spec]
    if -1 in ids:
        ids = [t for t in ids if t >= 0] + list(tokenizer.non_speech_tokens)
    ids += [tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev]
    ids += [tokenizer.sot_lm, tokenizer.no_speech]
    return sorted(set(ids))
