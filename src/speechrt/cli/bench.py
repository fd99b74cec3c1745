"""``speechrt bench``: GPU benchmarks (speed and accuracy side by side in one run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from speechrt.errors import SpeechrtError, UnsupportedOptionError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple(tuple(int(v) for v in s.split("x")) for s in text.split(",") if s)  # type: ignore
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BxT[,BxT...], got {text!r}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="GPU benchmark tables (needs CUDA)")
    p.add_argument("family", choices=("conformer",))
    p.add_argument("--out", default="bench_out", help="folder for the .md, .csv and .png")
    p.add_argument("--batches", type=_ints, default=(1, 4, 16, 64))
    p.add_argument(
        "--lengths", type=_ints, default=(16, 64, 256, 1024), help="input frames (10 ms each)"
    )
    p.add_argument(
        "--compile",
        type=_shapes,
        default=(),
        help="shapes BxT to time torch.compile max-autotune at (slow: minutes each)",
    )
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--e2e-dir", default=None, help="folder of .flac files for the end-to-end RTF")
    p.add_argument(
        "--profile",
        type=_shapes,
        default=((16, 256),),
        help="BxT of the per-kernel profile of one encoder forward",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise SpeechrtError("speechrt bench needs a CUDA GPU; none is visible")
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    for d in dtypes:
        if d not in ("fp16", "bf16", "fp32"):
            raise UnsupportedOptionError(f"unknown dtype '{d}' in --dtypes (fp32, fp16, bf16)")
    from speechrt.benchmark.conformer import BenchConfig, ConformerBench

    cfg = BenchConfig(
        batches=args.batches,
        lengths=args.lengths,
        compile_shapes=args.compile,
        dtypes=dtypes,
        e2e_dir=args.e2e_dir,
        out=Path(args.out),
        profile_shape=args.profile[0],
    )
    ConformerBench(cfg).run()
    print((cfg.out / "conformer.md").read_text())
    return 0
