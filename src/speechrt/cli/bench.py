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
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in text.split(",") if s)
    except ValueError:
        shapes = ((),)
    if not shapes or any(len(s) != 2 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected BxT[,BxT...], got {text!r}")
    return shapes  # type: ignore[return-value]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="GPU benchmark tables (needs CUDA)")
    p.add_argument("family", choices=("conformer", "whisper", "moe"))
    p.add_argument("--out", default="bench_out", help="folder for the .md, .csv and .png")
    p.add_argument(
        "--batches",
        type=_ints,
        default=None,
        help="batch sizes (conformer: 1,4,16,64; whisper decode: 1,16,64)",
    )
    p.add_argument(
        "--lengths", type=_ints, default=(16, 64, 256, 1024), help="input frames (10 ms each)"
    )
    p.add_argument(
        "--compile",
        type=_shapes,
        nargs="?",
        const=True,
        default=None,
        help="shapes BxT to time torch.compile at (slow: minutes each); moe: on by default, "
        "at every --shapes shape unless shapes are given here",
    )
    p.add_argument("--no-compile", action="store_true", help="moe: skip torch.compile")
    p.add_argument("--dtypes", default=None, help="default fp16,bf16 (moe: fp32,fp16,bf16)")
    p.add_argument("--e2e-dir", default=None, help="folder of .flac files for the end-to-end RTF")
    p.add_argument(
        "--profile",
        type=_shapes,
        default=((16, 256),),
        help="BxT of the per-kernel profile of one encoder forward",
    )
    p.add_argument(
        "--encoder-option",
        action="append",
        type=_switch,
        default=[],
        metavar="NAME=on|off",
        help="conformer/moe: set a fused-encoder switch (triton_front, triton_ffn, triton_glu, "
        "triton_linear, triton_add_ln, fp32_branches, tf32_attention, fused_ffn) before "
        "timing; repeatable",
    )
    m = p.add_argument_group("moe")
    m.add_argument(
        "--shapes",
        type=_shapes,
        default=None,
        help="encoder frames BxT' (default 1x206,1x1024,1x2048,16x1024)",
    )
    m.add_argument("--compile-dtypes", default="fp16", help="dtypes torch.compile runs in")
    m.add_argument("--compile-mode", default="default", help="torch.compile mode")
    m.add_argument("--no-gemm", action="store_true", help="skip the grouped GEMM table")
    w = p.add_argument_group("whisper")
    w.add_argument(
        "--presets",
        default="tiny,large-v3-turbo,large-v3",
        help="Whisper presets (random weights of their dims)",
    )
    w.add_argument("--enc-batches", type=_ints, default=(1, 16), help="encoder batch sizes")
    w.add_argument("--steps", type=int, default=64, help="forced decode steps per window")
    w.add_argument("--providers", default="speechrt,openai,hf", help="speechrt, openai, hf")
    w.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph decode step")
    w.add_argument(
        "--torch-compile", action="store_true", help="also time torch.compile'd encoders (slow)"
    )
    w.add_argument(
        "--e2e-model",
        default=None,
        help="real checkpoint (path or name) for --e2e-dir RTFx (unforced transcribe)",
    )
    w.add_argument(
        "--e2e-preset",
        default=None,
        help="without --e2e-model: random weights of this preset, token counts forced to the "
        "folder's trans.txt (default: the last of --presets)",
    )
    w.add_argument(
        "--e2e-batches", type=_ints, default=(1, 16), help="speechrt files per batch (e2e)"
    )
    w.add_argument(
        "--e2e-only", action="store_true", help="only the end-to-end rows (needs --e2e-dir)"
    )
    p.set_defaults(run=run)


def _switch(text: str) -> tuple[str, bool]:
    from speechrt.engine.runner import ENCODER_SWITCHES

    name, _, value = text.partition("=")
    if name not in ENCODER_SWITCHES or value not in ("on", "off"):
        raise argparse.ArgumentTypeError(
            f"expected NAME=on|off with NAME in {', '.join(ENCODER_SWITCHES)}, got '{text}'"
        )
    return name, value == "on"


def _dtypes(text: str) -> tuple[str, ...]:
    dtypes = tuple(d for d in text.split(",") if d)
    for d in dtypes:
        if d not in ("fp16", "bf16", "fp32"):
            raise UnsupportedOptionError(f"unknown dtype '{d}' in --dtypes (fp32, fp16, bf16)")
    return dtypes


def run(args: argparse.Namespace) -> int:
    import torch

    default = "fp32,fp16,bf16" if args.family == "moe" else "fp16,bf16"
    dtypes = _dtypes(args.dtypes or default)
    wcfg = whisper_config(args, dtypes) if args.family == "whisper" else None
    mcfg = moe_config(args, dtypes) if args.family == "moe" else None
    if not torch.cuda.is_available():
        raise SpeechrtError("speechrt bench needs a CUDA GPU; none is visible")
    if mcfg is not None:
        from speechrt.benchmark.moe import MoEBench

        MoEBench(mcfg).run()
        print((mcfg.out / "moe.md").read_text())
        return 0
    if wcfg is not None:
        from speechrt.benchmark.whisper import WhisperBench

        WhisperBench(wcfg).run()
        print((wcfg.out / "whisper.md").read_text())
        return 0
    from speechrt.benchmark.conformer import BenchConfig, ConformerBench

    cfg = BenchConfig(
        batches=args.batches or (1, 4, 16, 64),
        lengths=args.lengths,
        compile_shapes=args.compile if isinstance(args.compile, tuple) else (),
        dtypes=dtypes,
        e2e_dir=args.e2e_dir,
        out=Path(args.out),
        profile_shape=args.profile[0],
        encoder_options=tuple(args.encoder_option),
    )
    ConformerBench(cfg).run()
    print((cfg.out / "conformer.md").read_text())
    return 0


def whisper_config(args: argparse.Namespace, dtypes: tuple[str, ...]):
    """The validated :class:`WhisperBenchConfig` of the command line (errors before any work)."""
    from speechrt.benchmark.whisper import PROVIDERS, WhisperBenchConfig
    from speechrt.models.whisper.config import preset

    presets = tuple(x for x in args.presets.split(",") if x)
    n_ctx = min(preset(name).n_text_ctx for name in presets)  # unknown names fail here
    if args.e2e_preset is not None:
        preset(args.e2e_preset)
    if args.e2e_only and not args.e2e_dir:
        raise UnsupportedOptionError("--e2e-only needs --e2e-dir")
    providers = tuple(x for x in args.providers.split(",") if x)
    for prov in providers:
        if prov not in PROVIDERS:
            raise UnsupportedOptionError(
                f"unknown provider '{prov}' in --providers ({', '.join(PROVIDERS)})"
            )
    max_steps = n_ctx - WhisperBenchConfig.prefix
    if not 1 <= args.steps <= max_steps:
        raise UnsupportedOptionError(f"--steps must be in [1, {max_steps}], got {args.steps}")
    return WhisperBenchConfig(
        presets=presets,
        enc_batches=args.enc_batches,
        batches=args.batches or (1, 16, 64),
        steps=args.steps,
        dtypes=dtypes,
        providers=providers,
        cuda_graphs=not args.no_graphs,
        compile=args.torch_compile,
        e2e_dir=args.e2e_dir,
        e2e_model=args.e2e_model,
        e2e_preset=args.e2e_preset,
        e2e_batches=args.e2e_batches,
        e2e_only=args.e2e_only,
        out=Path(args.out),
    )


def moe_config(args: argparse.Namespace, dtypes: tuple[str, ...]):
    """The :class:`MoEBenchConfig` of the command line (errors before any work)."""
    from speechrt.benchmark.moe import SHAPES, MoEBenchConfig

    shapes = args.shapes or SHAPES
    for b, t in shapes:
        if b < 1 or t < 1:
            raise UnsupportedOptionError(f"--shapes needs positive BxT', got {b}x{t}")
    compile_dtypes = () if args.no_compile else _dtypes(args.compile_dtypes)
    return MoEBenchConfig(
        shapes=shapes,
        dtypes=dtypes,
        compile_dtypes=compile_dtypes,
        compile_shapes=args.compile if isinstance(args.compile, tuple) else None,
        compile_mode=args.compile_mode,
        gemm=not args.no_gemm,
        out=Path(args.out),
        encoder_options=tuple(args.encoder_option),
    )
