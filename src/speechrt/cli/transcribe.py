"""``speechrt transcribe``: audio files (or wav.scp lists) to text."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from speechrt.cli.common import (
    EXIT_PARTIAL_CODE,
    add_decode_options,
    add_model_options,
    decode_kwargs,
    expand_inputs,
    load_all,
    progress_enabled,
)
from speechrt.errors import SpeechrtError


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
    """Batched recognition of loaded inputs (longest first); transcripts in input order."""
    from tqdm import tqdm

    with tqdm(
        total=len(loaded), desc="decoding", unit="file", disable=not progress, leave=False
    ) as bar:
        return model.recognize([w for _, _, w in loaded], batch_size, bar.update, **kwargs)


def _record(key: str, path: str, tr) -> dict:
    return {
        "key": key,
        "path": path,
        "text": tr.text,
        "tokens": list(tr.tokens),
        "score": tr.score,
        "timings": tr.timings,
    }


def _line(record: dict, fmt: str) -> str:
    if fmt == "jsonl":
        return json.dumps(record, ensure_ascii=False)
    return f"{record['key']}\t{record['text']}"


def write_outputs(out_dir: Path, records: list[dict], fmt: str) -> None:
    """One ``<name>.<format>`` file per input in ``out_dir`` (``.txt`` for text)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for r in records:
            ext = "txt" if fmt == "text" else fmt
            body = json.dumps(r, ensure_ascii=False, indent=2) if fmt == "json" else _line(r, fmt)
            (out_dir / f"{Path(r['path']).stem}.{ext}").write_text(body + "\n", encoding="utf-8")
    except OSError as e:
        raise SpeechrtError(f"cannot write to {out_dir}: {e.strerror}") from None


def run(args: argparse.Namespace) -> int:
    import speechrt

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
    whisper_only = [
        f
        for f, on in (
            ("--language", args.language),
            ("--task translate", args.task != "transcribe"),
            ("--word-timestamps", args.word_timestamps),
        )
        if on
    ]
    if whisper_only:
        raise speechrt.SpeechrtError(f"{whisper_only[0]} applies to Whisper models only")
    kwargs = decode_kwargs(args)
    model._options(**kwargs)  # validate options before touching audio
    t1 = time.perf_counter()
    progress = progress_enabled(len(items))
    loaded, failed = load_all(model, items, progress)
    t2 = time.perf_counter()
    results = recognize(model, loaded, kwargs, args.batch_size, progress) if loaded else []
    t3 = time.perf_counter()
    records = [_record(k, p, tr) for (k, p, _), tr in zip(loaded, results)]
    if args.output_dir:
        write_outputs(Path(args.output_dir), records, args.format)
    elif args.format == "json":
        print(json.dumps(records, ensure_ascii=False, indent=2))
    else:
        for r in records:
            print(_line(r, args.format))
    if args.timings:
        audio = sum(r["timings"]["audio_s"] for r in records)
        sys.stderr.write(
            f"speechrt: {len(records)} file(s), {audio:.2f} s of audio; model load "
            f"{t1 - t0:.2f} s, audio load {t2 - t1:.2f} s, recognition {t3 - t2:.3f} s "
            f"(RTF {((t3 - t2) / audio) if audio else 0:.4f}) on {model.device} {args.dtype}\n"
        )
    return EXIT_PARTIAL_CODE if failed else 0
