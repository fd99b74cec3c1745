"""Score a model on a WAV list without soundfile/soxr (the training machine lacks them).

Usage (from the repository root)::

    python -m recipes.synthetic_en.evaluate --model DIR --data test/wav.scp --text test/text \\
        [--method attention_rescoring] [--ctc-weight 0.5] [--reverse-weight 0.3]

Same decoding and scoring as ``speechrt eval`` (``Model.transcribe_waveforms`` and
``speechrt.metrics``); only the WAV reading differs (16-bit PCM via the standard library). Prints
WER and CER and writes the JSON report (per-utterance rows) to ``--report``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import speechrt
from speechrt.api import METHODS
from speechrt.metrics import report

from .augment import read_wav, resample


def read_list(path: Path) -> list[tuple[str, str]]:
    rows = [line.split(maxsplit=1) for line in path.read_text(encoding="utf-8").splitlines()]
    return [(r[0], r[1] if len(r) > 1 else "") for r in rows if r]


def transcribe(model, wavs: list[torch.Tensor], batch_size: int, **options) -> list[str]:
    """Longest-first batches; texts in input order."""
    order = sorted(range(len(wavs)), key=lambda i: -wavs[i].shape[-1])
    texts = [""] * len(wavs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for i, tr in zip(idx, model.transcribe_waveforms([wavs[i] for i in idx], **options)):
            texts[i] = tr.text
    return texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--text", required=True, type=Path)
    p.add_argument("--method", default="attention_rescoring", choices=METHODS)
    p.add_argument("--beam-size", type=int, default=10)
    p.add_argument("--ctc-weight", type=float, default=0.5)
    p.add_argument("--reverse-weight", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--report", type=Path, default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model = speechrt.load_model(args.model, device=args.device)
    items = read_list(args.data)
    refs = dict(read_list(args.text))
    wavs = []
    for _, path in items:
        x, rate = read_wav(path)
        wavs.append(torch.from_numpy(resample(x, rate, model.sample_rate)))
    options = dict(method=args.method, beam_size=args.beam_size, ctc_weight=args.ctc_weight,
                   reverse_weight=args.reverse_weight)
    hyps = transcribe(model, wavs, args.batch_size, **options)
    keys = [k for k, _ in items]
    words = report(keys, [refs[k] for k in keys], hyps, unit="word")
    chars = report(keys, [refs[k] for k in keys], hyps, unit="char")
    out = {"model": str(args.model), "decode": options, "wer": words["totals"],
           "cer": chars["totals"], "utterances": words["utterances"],
           "seconds": round(time.perf_counter() - t0, 2)}
    text = json.dumps(out, indent=2)
    if args.report:
        args.report.write_text(text + "\n", encoding="utf-8")
    print(f"WER {words['totals']['rate_percent']:.2f}% CER {chars['totals']['rate_percent']:.2f}% "
          f"over {len(keys)} utterances ({args.method}, {out['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
