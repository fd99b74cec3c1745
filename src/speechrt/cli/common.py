"""Pieces the CLI commands share: model options, input lists, per-file loading."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speechrt.api import METHODS
from speechrt.errors import AudioError, SpeechrtError


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="model directory or checkpoint (default: the bundled English model synthetic_en)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))


def add_decode_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="attention_rescoring", choices=METHODS)
    p.add_argument(
        "--beam-size",
        type=int,
        default=None,
        help="WeNet: default 10; Whisper: default greedy with temperature fallback",
    )
    p.add_argument("--ctc-weight", type=float, default=0.5)
    p.add_argument("--reverse-weight", type=float, default=0.0)
    p.add_argument(
        "--length-penalty",
        type=float,
        default=0.0,
        help="method attention: rank final beams by score / length**penalty (WeNet; 0 = off)",
    )
    p.add_argument(
        "--chunk-size",
        dest="decoding_chunk_size",
        type=int,
        default=-1,
        help="decoding_chunk_size: -1 full attention, >0 chunk (streaming models)",
    )
    p.add_argument("--left-chunks", dest="num_decoding_left_chunks", type=int, default=-1)
    p.add_argument(
        "--simulate-streaming",
        action="store_true",
        help="run the encoder chunk by chunk with caches (needs --chunk-size > 0)",
    )
    p.add_argument("--batch-size", type=positive_int, default=16)


def decode_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        method=args.method,
        beam_size=10 if args.beam_size is None else args.beam_size,
        ctc_weight=args.ctc_weight,
        reverse_weight=args.reverse_weight,
        length_penalty=args.length_penalty,
        decoding_chunk_size=args.decoding_chunk_size,
        num_decoding_left_chunks=args.num_decoding_left_chunks,
        simulate_streaming=args.simulate_streaming,
    )


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, or a one-line error naming it."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SpeechrtError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise SpeechrtError(f"cannot read {path}: {e.strerror}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def read_scp(path: str | Path) -> list[tuple[str, str]]:
    """WeNet ``wav.scp``: ``<key> <path>`` per line -> [(key, path)]."""
    path = Path(path)
    if not path.is_file():
        raise SpeechrtError(f"list file not found: {path}")
    items = []
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise SpeechrtError(f"{path}:{n}: expected '<key> <audio path>', got {line!r}")
        key, wav = parts[0], parts[1].strip()
        if not Path(wav).is_absolute():
            wav = str(path.parent / wav)  # relative entries are relative to the list file
        items.append((key, wav))
    return items


def expand_inputs(files: list[str]) -> list[tuple[str, str]]:
    """File arguments -> [(key, path)]; a ``*.scp`` argument expands to its entries."""
    items: list[tuple[str, str]] = []
    for f in files:
        if f.endswith(".scp"):
            items.extend(read_scp(f))
        else:
            items.append((f, f))
    if not items:
        raise SpeechrtError("no input files given")
    return items


def load_all(model, items: list[tuple[str, str]], progress: bool):
    """Load each input; report bad ones on stderr. Returns ([(key, path, wav)], n_failed)."""
    from tqdm import tqdm

    good, failed = [], 0
    for key, path in tqdm(items, desc="loading", unit="file", disable=not progress, leave=False):
        try:
            good.append((key, path, model.load_audio(path)))
        except AudioError as e:
            failed += 1
            sys.stderr.write(f"speechrt: error: {e}\n")
    return good, failed


EXIT_PARTIAL_CODE = 1  # some inputs failed, the others were processed


def progress_enabled(n_items: int) -> bool:
    return n_items > 1 and sys.stderr.isatty()
