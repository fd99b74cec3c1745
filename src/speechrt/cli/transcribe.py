"""``speechrt transcribe``: audio files (or wav.scp lists) to text."""

from __future__ import annotations

import argparse
import json
import sys
import time

from speechrt.cli.common import (
    EXIT_PARTIAL_CODE,
    add_decode_options,
    add_model_options,
    decode_kwargs,
    expand_inputs,
    load_all,
    progress_enabled,
)


def add_parser(sub) -> None:
    p = sub.add_parser("transcribe", help="transcribe audio files")
    add_model_options(p)
    add_decode_options(p)
    p.add_argument(
        "--format",
        default="text",
        choices=("text", "json", "jsonl", "srt", "vtt", "tsv"),
        help="srt / vtt / tsv need segment timestamps (Whisper models)",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        help="write one <name>.<format> file per input instead of printing",
    )
    p.add_argument("--language", default=None, help="Whisper: language code (default: detect)")
    p.add_argument(
        "--task",
        default="transcribe",
        choices=("transcribe", "translate"),
        help="Whisper: transcribe or translate to English",
    )
    p.add_argument("--word-timestamps", action="store_true", help="Whisper: word timings")
    p.add_argument("--timings", action="store_true", help="print a timing summary on stderr")
    p.add_argument("files", nargs="+", help="audio files (wav, flac, mp3, ogg) or wav.scp lists")
    p.set_defaults(run=run)


def recognize(model, loaded, kwargs: dict, batch_size: int, progress: bool):
    """Batched recognition of loaded inputs, longest first. Returns transcripts in input order."""
    from tqdm import tqdm

    order = sorted(range(len(loaded)), key=lambda i: -loaded[i][2].shape[-1])
    out = [None] * len(loaded)
    bar = tqdm(total=len(loaded), desc="decoding", unit="file", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for i, tr in zip(idx, model.transcribe_waveforms([loaded[i][2] for i in idx], **kwargs)):
            out[i] = tr
        bar.update(len(idx))
    bar.close()
    return out


def _record(key: str, path: str, tr) -> dict:
    return {
        "key": key,
        "path": path,
        "text": tr.text,
        "tokens": list(tr.tokens),
        "score": tr.score,
        "timings": tr.timings,
    }


def run(args: argparse.Namespace) -> int:
    import speechrt

    if args.batch_size < 1:
        raise speechrt.SpeechrtError(f"--batch-size must be >= 1, got {args.batch_size}")
    items = expand_inputs(args.files)
    t0 = time.perf_counter()
    model = speechrt.load_model(args.model, device=args.device, dtype=args.dtype)
    if not hasattr(model, "transcribe_waveforms"):  # Whisper: segments, per-file long-form
        from speechrt.cli.whisper import run_whisper

        return run_whisper(model, items, args)
    if args.format in ("srt", "vtt", "tsv"):
        raise speechrt.SpeechrtError(
            f"--format {args.format} needs segment timestamps, which only Whisper models give"
        )
    kwargs = decode_kwargs(args)
    model._options(**kwargs)  # validate options before touching audio
    t1 = time.perf_counter()
    progress = progress_enabled(len(items))
    loaded, failed = load_all(model, items, progress)
    t2 = time.perf_counter()
    results = recognize(model, loaded, kwargs, args.batch_size, progress) if loaded else []
    t3 = time.perf_counter()
    records = [_record(k, p, tr) for (k, p, _), tr in zip(loaded, results)]
    if args.format == "json":
        print(json.dumps(records, ensure_ascii=False, indent=2))
    else:
        for r in records:
            if args.format == "jsonl":
                print(json.dumps(r, ensure_ascii=False))
            else:
                print(f"{r['key']}\t{r['text']}")
    if args.timings:
        audio = sum(r["timings"]["audio_s"] for r in records)
        sys.stderr.write(
            f"speechrt: {len(records)} file(s), {audio:.2f} s of audio; model load "
            f"{t1 - t0:.2f} s, audio load {t2 - t1:.2f} s, recognition {t3 - t2:.3f} s "
            f"(RTF {((t3 - t2) / audio) if audio else 0:.4f}) on {model.device} {args.dtype}\n"
        )
    return EXIT_PARTIAL_CODE if failed else 0
