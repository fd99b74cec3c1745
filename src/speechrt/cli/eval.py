"""``speechrt eval``: recognise a wav.scp and score it against a WeNet ``text`` file (CER/WER)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speechrt.cli.common import (
    EXIT_PARTIAL_CODE,
    add_decode_options,
    add_model_options,
    decode_kwargs,
    load_all,
    progress_enabled,
    read_lines,
    read_scp,
)
from speechrt.cli.transcribe import recognize
from speechrt.errors import AudioError, SpeechrtError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="transcribe a wav.scp and report CER/WER against references")
    add_model_options(p)
    add_decode_options(p)
    p.add_argument("--data", required=True, help="wav.scp: '<key> <audio path>' per line")
    p.add_argument("--text", required=True, help="references: '<key> <transcript>' per line")
    p.add_argument(
        "--unit",
        default="auto",
        choices=("auto", "char", "word"),
        help="auto: Chinese/Japanese/Korean by character, other text by word",
    )
    p.add_argument("--report", default=None, help="write the JSON report here (default: stdout)")
    p.set_defaults(run=run)


def read_text(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise SpeechrtError(f"reference text file not found: {path}")
    refs = {}
    for line in read_lines(path):
        if line.strip():
            parts = line.split(maxsplit=1)
            refs[parts[0]] = parts[1] if len(parts) > 1 else ""
    return refs


def _whisper_texts(model, items, kwargs):
    keys, texts, failed = [], [], 0
    for key, path in items:
        try:
            texts.append(model.transcribe(path, **kwargs).text.strip())
            keys.append(key)
        except AudioError as e:
            failed += 1
            sys.stderr.write(f"speechrt: error: {e}\n")
    return keys, texts, failed


def run(args: argparse.Namespace) -> int:
    import speechrt
    from speechrt.metrics import report

    items = read_scp(args.data)
    refs = read_text(args.text)
    missing = [k for k, _ in items if k not in refs]
    if missing:
        raise SpeechrtError(
            f"{len(missing)} key(s) of {args.data} have no reference, e.g. {missing[0]}"
        )
    model = speechrt.load_model(args.model, device=args.device, dtype=args.dtype)
    if hasattr(model, "transcribe_waveforms"):
        kwargs = decode_kwargs(args)
        model._options(**kwargs)
        progress = progress_enabled(len(items))
        loaded, failed = load_all(model, items, progress)
        results = recognize(model, loaded, kwargs, args.batch_size, progress) if loaded else []
        keys, texts = [k for k, _, _ in loaded], [tr.text for tr in results]
    else:  # Whisper: long-form, one file at a time
        kwargs = {} if args.beam_size is None else {"beam_size": args.beam_size}
        keys, texts, failed = _whisper_texts(model, items, kwargs)
    rep = report(keys, [refs[k] for k in keys], texts, unit=args.unit)
    rep["model"] = str(args.model or "synthetic_en (bundled)")
    rep["decode"] = kwargs
    rep["failed_files"] = failed
    t = rep["totals"]
    name = {"char": "CER", "word": "WER"}.get(args.unit, "error rate (CJK by char, else by word)")
    sys.stderr.write(
        f"{name} {t['rate_percent']:.2f}% (N={t['ref_len']}, S={t['substitutions']}, "
        f"D={t['deletions']}, I={t['insertions']}) over {len(keys)} utterance(s)\n"
    )
    text = json.dumps(rep, ensure_ascii=False, indent=2)
    if args.report:
        try:
            Path(args.report).write_text(text + "\n", encoding="utf-8")
        except OSError as e:
            raise SpeechrtError(f"cannot write the report {args.report}: {e.strerror}") from None
    else:
        print(text)
    return EXIT_PARTIAL_CODE if failed else 0
