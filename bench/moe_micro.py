"""Benchmark: the Triton MoE path (router + grouped GEMMs) against dense and per-expert baselines.

Run on a CUDA machine from the repository root::

    python bench/moe_micro.py [--part gemm encoder] [--dtype float32 float16 bfloat16]
                              [--no-compile] [--csv moe.csv]

Part "gemm" (16 x 1024 frames, D=512, H=1024, E=32, top-1): the two grouped GEMMs
(``moe_experts``) with uniform and skewed (half the frames on one expert) routing, against one
dense FFN of the same FLOPs (``F.linear`` x2, what a top-1 MoE would cost with perfect GEMMs),
the per-expert loop reference, and the routing kernel alone. TFLOP/s count 4*N*D*H.

Part "encoder": a whole 3M-ASR-shaped Conformer-MoE encoder (recipe dims D=512, 8 heads, H=2048,
6-block embedding network; 18 MoE blocks, 32 experts; random weights, random routers) at
B x T' = 1x206, 1x1024, 1x2048, 16x1024 encoder frames (fbank input of 4*T'+3 frames), with the
MoE FFNs on the Triton path, on the eager per-expert loop (``moe_ffn_ref``), and on
``torch.compile`` of that loop. Milliseconds are medians of CUDA-event timings after warm-up;
peak memory is ``torch.cuda.max_memory_allocated`` during one forward.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
try:
    import speechrt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

ENCODER_SHAPES = ((1, 206), (1, 1024), (1, 2048), (16, 1024))


def _time_ms(fn: Callable[[], object], warmup: int = 5, reps: int = 20) -> float:
    """Median wall time of ``fn`` on the current stream, from CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------------ part 1: GEMMs


def gemm_rows(dtype: torch.dtype, n: int = 16 * 1024, d: int = 512, h: int = 1024,
              e: int = 32) -> list[dict[str, object]]:
    """Grouped GEMM vs a dense GEMM of equal FLOPs, the loop reference and the router."""
    from speechrt.kernels.moe import moe_experts, moe_experts_ref, moe_route

    dev = "cuda"
    x = torch.randn(n, d, device=dev, dtype=dtype)
    w1 = (torch.randn(e, h, d, device=dev) / d**0.5).to(dtype)
    w2 = (torch.randn(e, d, h, device=dev) / h**0.5).to(dtype)
    b1, b2 = (torch.randn(e, h, device=dev) * 0.1).to(dtype), (torch.randn(e, d, device=dev) *
                                                                0.1).to(dtype)
    gate = torch.rand(n, 1, device=dev)
    uniform = torch.randint(0, e, (n, 1), device=dev)
    skewed = torch.where(torch.rand(n, 1, device=dev) < 0.5, torch.zeros_like(uniform), uniform)
    dense_w1, dense_b1, dense_w2, dense_b2 = w1[0], b1[0], w2[0], b2[0]
    router = (torch.randn(2 * d, e, device=dev) * 0.05).to(dtype)
    emb = torch.randn(n, d, device=dev, dtype=dtype)
    flops = 4 * n * d * h
    cases = {
        "grouped[uniform]": lambda: moe_experts(x, uniform, gate, w1, b1, w2, b2),
        "grouped[skewed]": lambda: moe_experts(x, skewed, gate, w1, b1, w2, b2),
        "dense_equal_flops": lambda: F.linear(F.silu(F.linear(x, dense_w1, dense_b1)),
                                              dense_w2, dense_b2),
        "loop_ref[uniform]": lambda: moe_experts_ref(x, uniform, gate, w1, b1, w2, b2),
        "router[E=32,k=1]": lambda: moe_route(x, router, None, emb),
    }
    dense_ms = None
    rows = []
    for name, fn in cases.items():
        ms = _time_ms(fn)
        if name == "dense_equal_flops":
            dense_ms = ms
        rows.append({"part": "gemm", "case": name, "shape": f"N{n} D{d} H{h} E{e}",
                     "dtype": str(dtype)[6:], "ms": ms,
                     "TFLOPs": flops / ms / 1e9 if not name.startswith("router") else 0.0,
                     "peak_MiB": _peak_mib(fn)})
    for r in rows:
        r["vs_dense"] = r["ms"] / dense_ms
    return rows


# ---------------------------------------------------------------------------- part 2: encoder


def build_encoder(blocks: int = 18, experts: int = 32, device: str = "cuda",
                  dtype: torch.dtype = torch.float16, d: int = 512, heads: int = 8,
                  hidden: int = 2048, embed_blocks: int = 6):
    """A 3M-ASR-recipe-shaped MoE encoder (CTC-only proto) with random weights and routers."""
    from speechrt.models.conformer_moe.config import parse_3m_config
    from speechrt.models.conformer_moe.model import MoEEncoder

    common = dict(attention_heads=heads, attention_dim=d, cnn_module_norm="layer_norm")
    raw = {"job_type": "moe", "nnet_proto": "conformer_moe_catEmbed", "model_conf": dict(
        num_blocks=blocks, **common,
        embed_conf=dict(num_blocks=embed_blocks, linear_units=hidden, **common),
        moe_conf=dict(num_experts=experts, hidden_units=hidden),
    )}
    cfg = parse_3m_config(raw, vocab_size=5000)
    return MoEEncoder(cfg).to(device=device, dtype=dtype).eval()


def _set_backend(encoder, backend: str) -> None:
    for layer in encoder.layers:
        layer.ff.backend = backend


def encoder_rows(dtype: torch.dtype, blocks: int, experts: int,
                 compile_loop: bool) -> list[dict[str, object]]:
    enc = build_encoder(blocks, experts, "cuda", dtype)
    rows = []
    for b, t_out in ENCODER_SHAPES:
        t_in = 4 * t_out + 3
        feats = torch.randn(b, t_in, 80, device="cuda", dtype=dtype)
        lens = torch.full((b,), t_in, device="cuda")

        def run(fn=enc, feats=feats, lens=lens):
            with torch.inference_mode():
                return fn(feats, lens)[0]

        providers = {"triton": ("triton", enc), "eager_loop": ("torch", enc)}
        if compile_loop:
            providers["compile_loop"] = ("torch", torch.compile(enc))
        base = None
        for name, (backend, fn) in providers.items():
            _set_backend(enc, backend)
            try:
                ms = _time_ms(lambda fn=fn: run(fn), warmup=3, reps=10)
                peak = _peak_mib(lambda fn=fn: run(fn))
            except Exception as err:  # torch.compile of the data-dependent loop may fail
                print(f"{name} {b}x{t_out} {dtype}: {type(err).__name__}: {err}", file=sys.stderr)
                ms, peak = float("nan"), float("nan")
            base = ms if name == "eager_loop" else base
            rows.append({"part": "encoder", "case": name, "shape": f"{b}x{t_out}",
                         "dtype": str(dtype)[6:], "ms": ms, "TFLOPs": 0.0,
                         "peak_MiB": peak})
        for r in rows[-len(providers):]:
            r["speedup_vs_eager_loop"] = base / r["ms"] if base else float("nan")
    _set_backend(enc, "auto")
    return rows


# ------------------------------------------------------------------------------------ output


def _header() -> str:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    return (f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | "
            f"triton {triton.__version__} | commit {commit or '?'}")


def _print_table(rows: list[dict[str, object]]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r.get(c, ''):.4g}" if isinstance(r.get(c), float) else str(r.get(c, ''))
                 for c in cols]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", default=["gemm", "encoder"],
                        choices=["gemm", "encoder"])
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16", "bfloat16"],
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--blocks", type=int, default=18)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("moe_micro.py needs a CUDA GPU")
    torch.manual_seed(0)
    rows: list[dict[str, object]] = []
    for name in args.dtype:
        dtype = getattr(torch, name)
        if "gemm" in args.part:
            rows += gemm_rows(dtype)
        if "encoder" in args.part:
            rows += encoder_rows(dtype, args.blocks, args.experts, not args.no_compile)
    print(_header())
    _print_table(rows)
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
