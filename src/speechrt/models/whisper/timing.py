"""Word timestamps: DTW over the alignment heads' cross-attention (openai-whisper's method).

For a window's text tokens, the decoder is run teacher-forced on
``sot_sequence + <|notimestamps|> + text + EOT``; the cross-attention scores of the alignment
heads are softmaxed over the window's frames, standardised per frame over tokens, median
filtered along time, averaged over heads, and aligned to the audio frames (20 ms each) by
dynamic time warping. A word starts where its first token's path first reaches a new token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TOKENS_PER_SECOND = 50  # audio positions per second (20 ms each)
SENTENCE_END = ".。!！?？"


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def median_filter(x: Tensor, width: int) -> Tensor:
    """Median over a sliding ``width`` (odd) window along the last dim, reflect-padded."""
    half = width // 2
    if x.shape[-1] <= half:
        return x
    squeeze = x.ndim <= 2
    if squeeze:
        x = x[None, None]  # the 2-D reflect padding below needs >= 3 dims
    x = F.pad(x, (half, half, 0, 0), mode="reflect")  # 2-D reflect padding of the last dims
    out = x.unfold(-1, width, 1).sort(dim=-1).values[..., half]
    return out[0, 0] if squeeze else out


def dtw(cost_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost monotone path through (N, M) costs -> (row indices, column indices).

    Steps are diagonal, down or right; ties prefer right, then down (as openai-whisper).
    Cumulative costs are kept in float32 like the original. Anti-diagonals are vectorised.
    """
    n, m = cost_matrix.shape
    x = cost_matrix.astype(np.float64)
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    cost[0, 0] = 0
    trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        best = np.choose(t, [c0, c1, c2])
        cost[i, j] = x[i - 1, j - 1] + best
        trace[i, j] = t
    return _backtrace(trace)


def _backtrace(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = trace.shape[0] - 1, trace.shape[1] - 1
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    rows, cols = np.array(path[::-1]).T
    return rows, cols


def find_alignment(
    model,
    tokenizer,
    text_tokens: list[int],
    mel: Tensor,
    num_frames: int,
    medfilt_width: int = 7,
    qk_scale: float = 1.0,
) -> list[WordTiming]:
    """Word timings (seconds from the window start) of text tokens in a (n_mels, 3000) window."""
    if not text_tokens:
        return []
    prefix = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
    tokens = torch.tensor([[*prefix, *text_tokens, tokenizer.eot]], device=model.device)
    with torch.inference_mode():
        features = model.embed_audio(mel[None])
        logits, scores = model.net.cross_attention_scores(tokens, features)
        probs = logits[0, len(tokenizer.sot_sequence) :, : tokenizer.eot].float().softmax(dim=-1)
        index = torch.arange(len(text_tokens), device=probs.device)
        token_probs = probs[index, torch.tensor(text_tokens, device=probs.device)].tolist()
        matrix = _alignment_matrix(
            model.net.alignment_heads, scores, num_frames, medfilt_width, qk_scale
        )
    matrix = matrix[len(tokenizer.sot_sequence) : -1]  # (1 + n_text, frames)
    rows, cols = dtw(-matrix.double().cpu().numpy())
    return _word_timings(tokenizer, text_tokens, token_probs, rows, cols)


def _alignment_matrix(
    heads: Tensor, scores: list[Tensor], num_frames: int, width: int, scale: float
) -> Tensor:
    """(tokens, frames) mean over alignment heads of standardised, median-filtered attention."""
    layer_head = heads.nonzero().tolist()
    weights = torch.stack([scores[layer][0, head] for layer, head in layer_head])  # (K, T, S)
    weights = (weights[:, :, : num_frames // 2] * scale).softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / std, width)
    return weights.mean(dim=0)


def _word_timings(tokenizer, text_tokens, token_probs, rows, cols) -> list[WordTiming]:
    words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot])
    if len(word_tokens) <= 1:
        return []
    bounds = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(rows), (1, 0), constant_values=1).astype(bool)
    jump_times = cols[jumps] / TOKENS_PER_SECOND
    starts, ends = jump_times[bounds[:-1]], jump_times[bounds[1:]]
    probs = [float(np.mean(token_probs[i:j])) for i, j in zip(bounds[:-1], bounds[1:])]
    return [
        WordTiming(word, list(toks), float(start), float(end), prob)
        for word, toks, start, end, prob in zip(words, word_tokens, starts, ends, probs)
    ]


def merge_punctuations(alignment: list[WordTiming], prepended: str, appended: str) -> None:
    """Attach opening punctuation to the next word and closing punctuation to the previous."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        prev, nxt = alignment[i], alignment[j]
        if prev.word.startswith(" ") and prev.word.strip() in prepended:
            nxt.word, nxt.tokens = prev.word + nxt.word, prev.tokens + nxt.tokens
            prev.word, prev.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        prev, nxt = alignment[i], alignment[j]
        if not prev.word.endswith(" ") and nxt.word in appended:
            prev.word, prev.tokens = prev.word + nxt.word, prev.tokens + nxt.tokens
            nxt.word, nxt.tokens = "", []
        else:
            i = j
        j += 1


def _clip_long_words(alignment: list[WordTiming]) -> tuple[float, float]:
    """Cap sentence-boundary words at twice the median duration; returns (median, max)."""
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) > 0 else 0.0
    longest = median * 2
    if len(durations) > 0:
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > longest:
                if alignment[i].word in SENTENCE_END:
                    alignment[i].end = alignment[i].start + longest
                elif alignment[i - 1].word in SENTENCE_END:
                    alignment[i].start = alignment[i].end - longest
    return median, longest


def add_word_timestamps(
    *,
    segments: list[dict],
    model,
    tokenizer,
    mel: Tensor,
    num_frames: int,
    prepend_punctuations: str,
    append_punctuations: str,
    last_speech_timestamp: float,
) -> None:
    """Fill ``segment["words"]`` of one window's segments and adjust their start/end."""
    if not segments:
        return
    per_segment = [[t for t in s["tokens"] if t < tokenizer.eot] for s in segments]
    flat = [t for tokens in per_segment for t in tokens]
    alignment = find_alignment(model, tokenizer, flat, mel, num_frames)
    median, longest = _clip_long_words(alignment)
    merge_punctuations(alignment, prepend_punctuations, append_punctuations)
    time_offset = segments[0]["seek"] * 160 / 16000
    index = 0
    for segment, text_tokens in zip(segments, per_segment):
        saved, words = 0, []
        while index < len(alignment) and saved < len(text_tokens):
            timing = alignment[index]
            if timing.word:
                words.append(
                    dict(
                        word=timing.word,
                        start=round(time_offset + timing.start, 2),
                        end=round(time_offset + timing.end, 2),
                        probability=timing.probability,
                    )
                )
            saved += len(timing.tokens)
            index += 1
        if words:
            last_speech_timestamp = _fit_segment(
                segment, words, median, longest, last_speech_timestamp
            )
        segment["words"] = words


def _fit_segment(
    segment: dict, words: list[dict], median: float, longest: float, last_speech: float
) -> float:
    """Trim over-long first/last words after pauses and reconcile the segment's bounds."""
    first_too_long = words[0]["end"] - words[0]["start"] > longest or (
        len(words) > 1 and words[1]["end"] - words[0]["start"] > longest * 2
    )
    if words[0]["end"] - last_speech > median * 4 and first_too_long:
        if len(words) > 1 and words[1]["end"] - words[1]["start"] > longest:
            boundary = max(words[1]["end"] / 2, words[1]["end"] - longest)
            words[0]["end"] = words[1]["start"] = boundary
        words[0]["start"] = max(0, words[0]["end"] - longest)
    if segment["start"] < words[0]["end"] and segment["start"] - 0.5 > words[0]["start"]:
        words[0]["start"] = max(0, min(words[0]["end"] - median, segment["start"]))
    else:
        segment["start"] = words[0]["start"]
    if segment["end"] > words[-1]["start"] and segment["end"] + 0.5 < words[-1]["end"]:
        words[-1]["end"] = max(words[-1]["start"] + median, segment["end"])
    else:
        segment["end"] = words[-1]["end"]
    return segment["end"]
