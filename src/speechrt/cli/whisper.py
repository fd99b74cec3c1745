"""The Whisper branch of ``speechrt transcribe``: long-form files, segments, subtitle formats."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from speechrt.cli.common import EXIT_PARTIAL_CODE
from speechrt.errors import AudioError, SpeechrtError


def _ts(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def format_segments(tr, fmt: str) -> str:
    """A Transcript's segments as an SRT, WebVTT or TSV (start/end in ms) document."""
    segs = tr.segments
    if fmt == "srt":
        return "\n".join(
            f"{i}\n{_ts(s.start, ',')} --> {_ts(s.end, ',')}\n{s.text.strip()}\n"
            for i, s in enumerate(segs, 1)
        )
    if fmt == "vtt":
        body = "\n".join(
            f"{_ts(s.start, '.')} --> {_ts(s.end, '.')}\n{s.text.strip()}\n" for s in segs
        )
        return "WEBVTT\n\n" + body
    rows = [f"{int(s.start * 1000)}\t{int(s.end * 1000)}\t{s.text.strip()}" for s in segs]
    return "start\tend\ttext\n" + "\n".join(rows) + "\n"


def _record(key: str, path: str, tr) -> dict:
    d = tr.to_dict()
    d.update(key=key, path=path)
    return d


def run_whisper(model, items: list[tuple[str, str]], args) -> int:
    subtitle = args.format in ("srt", "vtt", "tsv")
    if subtitle and len(items) > 1 and not args.output_dir:
        raise SpeechrtError(f"--format {args.format} with several inputs needs --output-dir")
    opts = {"task": args.task}
    if args.language:
        opts["language"] = args.language
    if args.beam_size is not None:
        opts["beam_size"] = args.beam_size
    if args.word_timestamps:
        opts["word_timestamps"] = True
    failed, records = 0, []
    for key, path in items:
        try:
            tr = model.transcribe(path, **opts)
        except AudioError as e:  # a bad file is reported; the others are still transcribed
            failed += 1
            sys.stderr.write(f"speechrt: error: {e}\n")
            continue
        records.append((key, path, tr))
    for key, path, tr in records:
        if args.format in ("text", "jsonl") or subtitle:
            text = {
                "text": f"{key}\t{tr.text.strip()}",
                "jsonl": json.dumps(_record(key, path, tr), ensure_ascii=False),
            }.get(args.format) or format_segments(tr, args.format)
            if args.output_dir:
                out = Path(args.output_dir) / f"{Path(path).stem}.{args.format}"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(text + "\n", encoding="utf-8")
            else:
                print(text)
    if args.format == "json":
        print(json.dumps([_record(k, p, t) for k, p, t in records], ensure_ascii=False, indent=2))
    return EXIT_PARTIAL_CODE if failed else 0
