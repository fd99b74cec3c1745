"""Long-form Whisper transcription: 30 s windows, seeking on timestamps, temperature fallback.

Follows openai-whisper's ``transcribe`` (same windows, prompts, fallback rules and segments):
the whole file's log-mel is computed once with 30 s of zero padding; each window starts at
``seek`` (in 10 ms frames); after decoding, a window that ends in a timestamp pair seeks to
its last timestamp, otherwise to the window's end.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from speechrt.audio.log_mel import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from speechrt.decoding.whisper import WhisperDecodeOptions, WindowResult
from speechrt.errors import AudioError, UnsupportedOptionError
from speechrt.models.whisper.tokenizer import WhisperTokenizer, normalize_language
from speechrt.results import Segment, Transcript, Word

PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"


def load_whisper_audio(audio) -> Tensor:
    """A path, bytes or a 16 kHz mono float array -> (N,) float32 tensor; AudioError if bad."""
    from speechrt.audio.io import load_audio

    if isinstance(audio, (np.ndarray, Tensor)):
        if audio.ndim != 1:
            raise AudioError(
                f"audio array must be 16 kHz mono (N,), got shape {tuple(audio.shape)}"
            )
        return load_audio(audio, sample_rate=SAMPLE_RATE)
    return load_audio(audio)


@dataclass
class _Settings:
    """Transcription settings beyond one window's decode options."""

    temperatures: tuple[float, ...]
    compression_ratio_threshold: float | None
    logprob_threshold: float | None
    no_speech_threshold: float | None
    condition_on_previous_text: bool
    word_timestamps: bool
    prepend_punctuations: str
    append_punctuations: str
    decode: dict = field(default_factory=dict)

    def options_at(self, temperature: float) -> WhisperDecodeOptions:
        """Window options at one temperature: beam search at 0, best-of sampling above."""
        kwargs = dict(self.decode)
        if temperature > 0:
            kwargs.update(beam_size=None, patience=None)
        else:
            kwargs.update(best_of=None)
        return WhisperDecodeOptions(temperature=temperature, **kwargs)


def transcribe(model, audio, **options) -> Transcript:
    """Transcribe one audio with a :class:`WhisperModel` (see openai-whisper's ``transcribe``).

    ``options`` are the keyword arguments of :func:`prepare`. ``temperature`` is tried in order
    while a window's result is too repetitive (compression ratio above
    ``compression_ratio_threshold``) or too improbable (average log-prob below
    ``logprob_threshold``), unless it looks silent (no-speech probability above
    ``no_speech_threshold``); beam search (``beam_size``) is used at temperature 0 and
    ``best_of`` samples above it. Silent windows are skipped.
    """
    return prepare(model, audio, **options).run()


def prepare(
    model,
    audio,
    *,
    language: str | None = None,
    task: str = "transcribe",
    temperature: float | tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    beam_size: int | None = None,
    best_of: int | None = 5,
    patience: float | None = None,
    length_penalty: float | None = None,
    compression_ratio_threshold: float | None = 2.4,
    logprob_threshold: float | None = -1.0,
    no_speech_threshold: float | None = 0.6,
    condition_on_previous_text: bool = True,
    initial_prompt: str | None = None,
    carry_initial_prompt: bool = False,
    word_timestamps: bool = False,
    prepend_punctuations: str = PREPEND_PUNCTUATIONS,
    append_punctuations: str = APPEND_PUNCTUATIONS,
    without_timestamps: bool = False,
    suppress_tokens: str | list[int] | None = "-1",
    suppress_blank: bool = True,
    max_initial_timestamp: float | None = 1.0,
    sample_len: int | None = None,
) -> FileLoop:
    """Check the options (those of :func:`transcribe`), load the audio, compute its log-mel
    and pick its language; returns the file's :class:`FileLoop` at seek 0."""
    if language is not None:
        language = normalize_language(language)
    temps = (temperature,) if isinstance(temperature, (int, float)) else tuple(temperature)
    settings = _Settings(
        temps, compression_ratio_threshold, logprob_threshold, no_speech_threshold,
        condition_on_previous_text, word_timestamps, prepend_punctuations, append_punctuations,
        dict(task=task, beam_size=beam_size, best_of=best_of, patience=patience,
             length_penalty=length_penalty, without_timestamps=without_timestamps,
             suppress_tokens=suppress_tokens, suppress_blank=suppress_blank,
             max_initial_timestamp=max_initial_timestamp, sample_len=sample_len),
    )  # fmt: skip
    for t in temps:
        settings.options_at(t)  # option errors before any work
    mel = model.log_mel(load_whisper_audio(audio), padding=N_SAMPLES)  # (n_mels, F + 3000)
    language = language or _language_of(model, mel)
    tokenizer = model.tokenizer.with_options(language, task)
    prompt = _initial_prompt(tokenizer, initial_prompt, model.dims.n_text_ctx)
    return FileLoop(model, tokenizer, settings, mel, prompt, carry_initial_prompt, language)


def _language_of(model, mel: Tensor) -> str:
    if not model.is_multilingual:
        return "en"
    codes, _ = model.detect_language_features(model.embed_audio(_window(mel, 0, N_FRAMES)[None]))
    return codes[0]


def _initial_prompt(tokenizer: WhisperTokenizer, text: str | None, n_text_ctx: int) -> list[int]:
    if text is None:
        return []
    ids = tokenizer.encode(" " + text.strip())
    if len(ids) > n_text_ctx // 2 - 1:
        raise UnsupportedOptionError(
            f"initial_prompt is {len(ids)} tokens; the model takes at most {n_text_ctx // 2 - 1}"
        )
    return ids


def _window(mel: Tensor, seek: int, size: int) -> Tensor:
    """mel[:, seek : seek + size] zero-padded to N_FRAMES frames -> (n_mels, N_FRAMES)."""
    segment = mel[:, seek : seek + size]
    return F.pad(segment, (0, N_FRAMES - segment.shape[-1]))


class FileLoop:
    """State of one file's transcription: seek position, tokens so far, segments.

    :meth:`run` decodes alone; a batched driver calls :meth:`current`, decodes the window
    (with :meth:`options_at` and :meth:`needs_fallback`) and hands the result to :meth:`accept`.
    """

    def __init__(
        self, model, tokenizer, settings: _Settings, mel: Tensor, prompt, carry: bool, language
    ) -> None:
        self.model, self.tok, self.s, self.mel = model, tokenizer, settings, mel
        self.language: str = language
        self.seek = 0
        self.window: tuple[Tensor, int] | None = None  # (mel window, frames) at ``seek``
        self.content_frames = mel.shape[-1] - N_FRAMES
        self.input_stride = N_FRAMES // model.dims.n_audio_ctx  # mel frames per audio token
        self.time_precision = self.input_stride * HOP_LENGTH / SAMPLE_RATE  # 0.02 s
        self.initial_prompt = prompt
        self.carry = carry
        self.all_tokens: list[int] = list(prompt)
        self.segments: list[dict] = []
        self.prompt_reset_since = 0
        self.score = 0.0
        self.last_speech_timestamp = 0.0

    @property
    def done(self) -> bool:
        return self.seek >= self.content_frames

    def run(self) -> Transcript:
        """Decode window after window, one at a time."""
        while not self.done:
            mel_window, prompt = self.current()
            self.accept(self._decode_with_fallback(mel_window, prompt))
        return self.transcript()

    def transcript(self) -> Transcript:
        """The finished transcription."""
        text_tokens = [t for t in self.all_tokens[len(self.initial_prompt) :] if t < self.tok.eot]
        return Transcript(
            text=self.tok.decode(self.all_tokens[len(self.initial_prompt) :]),
            tokens=tuple(text_tokens),
            score=self.score,
            language=self.language,
            segments=tuple(_to_segment(s) for s in self.segments),
        )

    def _prompt(self) -> list[int]:
        if not self.carry:
            return self.all_tokens[self.prompt_reset_since :]
        remaining = self.model.dims.n_text_ctx // 2 - 1 - len(self.initial_prompt)
        ignored = max(len(self.initial_prompt), self.prompt_reset_since)
        rest = self.all_tokens[ignored:][-remaining:] if remaining > 0 else []
        return self.initial_prompt + rest

    def current(self) -> tuple[Tensor, list[int]]:
        """The window at ``seek`` (n_mels, N_FRAMES) and its prompt (token ids)."""
        size = min(N_FRAMES, self.content_frames - self.seek)
        self.window = (_window(self.mel, self.seek, size), size)
        return self.window[0], self._prompt()

    def accept(self, result: WindowResult) -> None:
        """Record the decoding of :meth:`current`'s window and move ``seek`` on."""
        self.seek = self._window_done(self.seek, *self.window, result)
        self.window = None

    def _window_done(self, seek: int, mel_window: Tensor, size: int, result) -> int:
        """Record a window's segments; returns the next seek."""
        if self._is_silent(result):
            return seek + size
        time_offset = float(seek * HOP_LENGTH / SAMPLE_RATE)
        segments, next_seek = self._split(result, seek, size, time_offset)
        if self.s.word_timestamps:
            single_ending = _single_timestamp_ending(result.tokens, self.tok)
            next_seek = self._add_words(
                segments, mel_window, size, next_seek, time_offset, single_ending
            )
        for segment in segments:
            if segment["start"] == segment["end"] or not segment["text"].strip():
                segment.update(text="", tokens=[], words=[])
        for segment in segments:
            segment["id"] = len(self.segments)
            self.segments.append(segment)
            self.all_tokens.extend(segment["tokens"])
        self.score += result.sum_logprob
        if not self.s.condition_on_previous_text or result.temperature > 0.5:
            self.prompt_reset_since = len(self.all_tokens)
        return next_seek

    def options_at(self, temperature: float, prompt: list[int]) -> WhisperDecodeOptions:
        """This file's window options at one temperature."""
        return replace(self.s.options_at(temperature), prompt=prompt, language=self.language)

    def _decode_with_fallback(self, mel_window: Tensor, prompt: list[int]) -> WindowResult:
        result = None
        for t in self.s.temperatures:
            result = self.model.decode(mel_window, self.options_at(t, prompt))
            if not self.needs_fallback(result):
                break
        return result

    def needs_fallback(self, r: WindowResult) -> bool:
        s = self.s
        too_repetitive = (
            s.compression_ratio_threshold is not None
            and r.compression_ratio > s.compression_ratio_threshold
        )
        too_improbable = s.logprob_threshold is not None and r.avg_logprob < s.logprob_threshold
        silent = (
            s.no_speech_threshold is not None
            and r.no_speech_prob > s.no_speech_threshold
            and s.logprob_threshold is not None
            and r.avg_logprob < s.logprob_threshold
        )
        return (too_repetitive or too_improbable) and not silent

    def _is_silent(self, r: WindowResult) -> bool:
        s = self.s
        if s.no_speech_threshold is None or r.no_speech_prob <= s.no_speech_threshold:
            return False
        return not (s.logprob_threshold is not None and r.avg_logprob > s.logprob_threshold)

    def _split(self, result: WindowResult, seek: int, size: int, time_offset: float):
        """Cut a window's tokens into segments at timestamp pairs; returns (segments, seek)."""
        tokens, tb = result.tokens, self.tok.timestamp_begin
        is_ts = [t >= tb for t in tokens]
        single_ending = _single_timestamp_ending(tokens, self.tok)
        cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
        if not cuts:
            duration = size * HOP_LENGTH / SAMPLE_RATE
            stamps = [t for t in tokens if t >= tb]
            if stamps and stamps[-1] != tb:
                duration = (stamps[-1] - tb) * self.time_precision
            end = time_offset + duration
            return [self._segment(seek, time_offset, end, tokens, result)], seek + size
        if single_ending:
            cuts.append(len(tokens))
        segments, last = [], 0
        for cut in cuts:
            part = tokens[last:cut]
            start = time_offset + (part[0] - tb) * self.time_precision
            end = time_offset + (part[-1] - tb) * self.time_precision
            segments.append(self._segment(seek, start, end, part, result))
            last = cut
        if single_ending:
            return segments, seek + size
        return segments, seek + (tokens[last - 1] - tb) * self.input_stride

    def _segment(self, seek: int, start: float, end: float, tokens: list[int], r: WindowResult):
        return {
            "seek": seek,
            "start": start,
            "end": end,
            "text": self.tok.decode([t for t in tokens if t < self.tok.eot]),
            "tokens": list(tokens),
            "temperature": r.temperature,
            "avg_logprob": r.avg_logprob,
            "compression_ratio": r.compression_ratio,
            "no_speech_prob": r.no_speech_prob,
            "words": [],
        }

    def _add_words(self, segments, mel_window, size, next_seek, time_offset, single_ending) -> int:
        """Word timestamps for a window's segments; may move the next seek to the last word."""
        from speechrt.models.whisper.timing import add_word_timestamps

        add_word_timestamps(
            segments=segments,
            model=self.model,
            tokenizer=self.tok,
            mel=mel_window,
            num_frames=size,
            prepend_punctuations=self.s.prepend_punctuations,
            append_punctuations=self.s.append_punctuations,
            last_speech_timestamp=self.last_speech_timestamp,
        )
        last_word_end = _last_word_end(segments)
        if last_word_end is not None:
            self.last_speech_timestamp = last_word_end
        if not single_ending and last_word_end is not None and last_word_end > time_offset:
            return round(last_word_end * SAMPLE_RATE / HOP_LENGTH)
        return next_seek


def _single_timestamp_ending(tokens: list[int], tokenizer: WhisperTokenizer) -> bool:
    """True when the tokens end with text then one timestamp (no speech after it)."""
    return [t >= tokenizer.timestamp_begin for t in tokens[-2:]] == [False, True]


def _last_word_end(segments: list[dict]) -> float | None:
    for segment in reversed(segments):
        for word in reversed(segment["words"]):
            return word["end"]
    return segments[-1]["end"] if segments else None


def _to_segment(s: dict) -> Segment:
    words = tuple(Word(w["word"], w["start"], w["end"], w["probability"]) for w in s["words"])
    return Segment(
        id=s["id"],
        seek=s["seek"],
        start=s["start"],
        end=s["end"],
        text=s["text"],
        tokens=tuple(s["tokens"]),
        avg_logprob=s["avg_logprob"],
        compression_ratio=s["compression_ratio"],
        no_speech_prob=s["no_speech_prob"],
        words=words,
    )
