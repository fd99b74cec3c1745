"""Batched long-form transcription: several files advance window by window together.

Each step encodes the current 30 s window of every active file in one encoder call and
decodes them in batched decode calls, one per group of windows whose initial tokens line up
(same language and same prompt length; the decoder needs one ``sample_begin`` per call).
Each file then seeks on its own exactly as in :func:`transcribe`; a window that needs a
temperature fallback is decoded again, together with the others that need one, at the next
temperature. Greedy and beam search give the tokens and segments of one-by-one decoding.
"""

from __future__ import annotations

from collections import defaultdict, deque

import torch
from torch import Tensor

from speechrt.decoding.whisper import WindowResult
from speechrt.models.whisper.transcribe import FileLoop, prepare
from speechrt.results import Transcript


def transcribe_batched(model, audios, batch_size: int = 8, **options) -> list[Transcript]:
    """Transcribe ``audios`` with up to ``batch_size`` files in flight; options as
    :func:`speechrt.models.whisper.transcribe.transcribe`. Results keep the input order."""
    results: list[Transcript | None] = [None] * len(audios)
    queue = deque(enumerate(audios))
    active: list[tuple[int, FileLoop]] = []
    while queue or active:
        while queue and len(active) < batch_size:
            index, audio = queue.popleft()
            active.append((index, prepare(model, audio, **options)))
        for index, loop in active:
            if loop.done:
                results[index] = loop.transcript()
        active = [(i, loop) for i, loop in active if not loop.done]
        if active:
            step(model, [loop for _, loop in active])
    return results


@torch.inference_mode()
def step(model, loops: list[FileLoop]) -> None:
    """Decode the current window of every loop (none done) and move each one's seek on."""
    windows = [loop.current() for loop in loops]
    features = model.embed_audio(torch.stack([mel for mel, _ in windows]))  # (A, S, D)
    prompts = [prompt for _, prompt in windows]
    results: list[WindowResult | None] = [None] * len(loops)
    pending = list(range(len(loops)))
    for temperature in loops[0].s.temperatures:
        decoded = _decode(model, loops, features, prompts, pending, temperature)
        for k, result in decoded.items():
            results[k] = result
        pending = [k for k in pending if loops[k].needs_fallback(results[k])]
        if not pending:
            break
    for loop, result in zip(loops, results):
        loop.accept(result)


def _decode(
    model, loops: list[FileLoop], features: Tensor, prompts: list[list[int]], rows: list[int], t
) -> dict[int, WindowResult]:
    """Decode windows ``rows`` of ``features`` (A, S, D) at temperature ``t``, one batched
    call per (language, prompt length) group; returns {row: result}."""
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for k in rows:
        groups[(loops[k].language, len(prompts[k]))].append(k)
    out: dict[int, WindowResult] = {}
    for group in groups.values():
        options = loops[group[0]].options_at(t, prompts[group[0]])
        batch = features[group]  # (G, S, D)
        results = model.decode_features(batch, options, [prompts[k] for k in group])
        out.update(zip(group, results))
    return out
