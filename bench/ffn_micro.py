"""Micro-benchmark: a whole Conformer FFN + residual add + LayerNorm, two kernels vs one.

Run on a CUDA machine from the repository root (about a minute on an H200 with a cold Triton
cache: ``--jobs`` worker processes first compile every kernel the run launches into Triton's
disk cache, in parallel; the sweep stops ``--time-limit`` s after the start)::

    PYTHONPATH=src python bench/ffn_micro.py [--dtype float16 bfloat16]
        [--shapes 16384x256x2048 4096x256x2048 1024x256x2048 16384x144x576]
        [--time-limit 60] [--jobs 12] [--out DIR]
    PYTHONPATH=src python bench/ffn_micro.py --smoke --out DIR   # CPU, interpreter, tiny shapes

Each shape M x D x H is the FFN sublayer of the fused encoder: ``x += 0.5 * (act(y W1^T + b1)
W2^T + b2)`` on the float32 residual stream x (in place), ``y' = LayerNorm(x)`` in the compute
dtype, SiLU. Providers:

* (a) ``linear_act + F.linear + add_ln``: today's FP16 path (Triton GEMM + SiLU to an (M, H)
  hidden, cuBLAS ``F.linear`` rounding the branch to the compute dtype, ``add_layer_norm``);
* (b) ``linear_act + linear_add_ln``: today's BF16 path (``triton_add_ln``: the second GEMM with
  bias, add and LayerNorm in its epilogue);
* (c) ``ffn_add_ln default``: :func:`speechrt.kernels.fused_ffn.ffn_add_layer_norm`, one kernel,
  its default config;
* (d) ``ffn_add_ln best``: the fastest config of ``CONFIGS`` (swept until the time limit).

``ms``: median of CUDA-event timings of a CUDA graph replaying the provider 10 times, divided by
10 (launch overhead hidden, as in the engine); on CPU (``--smoke``) host-clock milliseconds of
the interpreter, which only prove the script runs. ``TFLOP/s`` counts the two GEMMs,
4 * M * D * H. ``vs (a)`` = (a) ms / this ms. ``err_ref`` = max |y' - ffn_add_layer_norm_ref|
(float32 math, hidden rounded to the compute dtype as the kernel does); ``err_exact`` = max
|y' - the float64 FFN without that rounding|. The report goes to stdout and to DIR/ffn_micro.md
(and every timed row to DIR/ffn_micro.csv).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
try:
    import speechrt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

SHAPES = ("16384x256x2048", "4096x256x2048", "1024x256x2048", "16384x144x576")
SMOKE_SHAPES = ("96x80x144", "40x48x72")
CALLS_PER_GRAPH = 10
SCALE = 0.5
WARM_ROWS = 64  # sweep configs compile on this many rows: the same specialisation as M % 16 == 0


def _inputs(m: int, d: int, h: int, dtype: torch.dtype, dev: str) -> dict[str, torch.Tensor]:
    """Random FFN weights of nn.Linear scale, a float32 stream with a mean and a spread."""
    return {
        "y": torch.randn(m, d, device=dev).to(dtype),
        "w1": (torch.randn(h, d, device=dev) / d**0.5).to(dtype),
        "b1": (0.1 * torch.randn(h, device=dev)).to(dtype),
        "w2": (torch.randn(d, h, device=dev) / h**0.5).to(dtype),
        "b2": (0.1 * torch.randn(d, device=dev)).to(dtype),
        "x": 3 * torch.randn(m, d, device=dev) + 1.0,
        "lw": 1 + 0.1 * torch.randn(d, device=dev),
        "lb": 0.1 * torch.randn(d, device=dev),
    }


def _providers(t: dict[str, torch.Tensor]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """(a), (b), (c): each maps a residual stream x (updated in place) to y'."""
    from speechrt.kernels.fused_ffn import ffn_add_layer_norm
    from speechrt.kernels.layer_norm import add_layer_norm
    from speechrt.kernels.linear_act import linear_act
    from speechrt.kernels.linear_add_layer_norm import linear_add_layer_norm

    y, w1, b1, w2, b2, lw, lb = (t[k] for k in ("y", "w1", "b1", "w2", "b2", "lw", "lb"))

    def fp16_path(x: torch.Tensor) -> torch.Tensor:
        z = linear_act(y, w1, b1, "swish")  # (M, H)
        return add_layer_norm(F.linear(z, w2), x, lw, lb, x_bias=b2, scale=SCALE, h_out=x)[1]

    def bf16_path(x: torch.Tensor) -> torch.Tensor:
        z = linear_act(y, w1, b1, "swish")  # (M, H)
        return linear_add_layer_norm(z, w2, x, lw, lb, bias=b2, scale=SCALE)[1]

    def fused(x: torch.Tensor, config=None) -> torch.Tensor:
        return ffn_add_layer_norm(y, w1, b1, w2, x, lw, lb, b2=b2, scale=SCALE, config=config)[1]

    return {
        "(a) linear_act + F.linear + add_ln": fp16_path,
        "(b) linear_act + linear_add_ln": bf16_path,
        "(c) ffn_add_ln default": fused,
    }


def _time_ms(fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor) -> float:
    """Milliseconds of one call of ``fn`` on a copy of x0: a CUDA graph of CALLS_PER_GRAPH calls
    timed with CUDA events (speechrt.benchmark.common.cuda_time_ms); host clock on CPU."""
    from speechrt.benchmark.common import cuda_time_ms

    x = x0.clone()
    if not x.is_cuda:
        return cuda_time_ms(lambda: fn(x))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn(x)  # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(CALLS_PER_GRAPH):
                fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    ms = cuda_time_ms(graph.replay, warmup=2, min_iters=5, budget_s=0.1, max_iters=50)
    return ms / CALLS_PER_GRAPH


def _row(shape, dtype, provider, config, fn, x0, refs) -> dict[str, object]:
    """One timed provider: the first call (on a copy of x0) gives the errors, then timing."""
    m, d, h = shape
    row = {"shape": f"{m}x{d}x{h}", "dtype": str(dtype).removeprefix("torch."),
           "provider": provider, "config": config, "ms": math.nan, "TFLOP/s": math.nan,
           "vs (a)": math.nan, "err_ref": math.nan, "err_exact": math.nan, "error": ""}  # fmt: skip
    try:
        out = fn(x0.clone()).float()
        row["err_ref"] = float((out - refs[0]).abs().max())
        row["err_exact"] = float((out - refs[1]).abs().max())
        row["ms"] = _time_ms(fn, x0)
        row["TFLOP/s"] = 4 * m * d * h / (row["ms"] * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001 - a config that cannot launch is a row, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    if x0.is_cuda:
        torch.cuda.synchronize()
    return row


def _references(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ffn_add_layer_norm_ref's y', the float64 FFN's y'), both float32."""
    from speechrt.kernels.fused_ffn import ffn_add_layer_norm_ref

    args = (t["y"], t["w1"], t["b1"], t["w2"], t["x"], t["lw"], t["lb"])
    kw = dict(b2=t["b2"], scale=SCALE)
    ref = ffn_add_layer_norm_ref(*args, **kw)[1].float()
    exact = ffn_add_layer_norm_ref(*args, **kw, upcast=True)[1]
    return ref, exact


def _warm(task: tuple) -> str:
    """Worker process: launch once what ``task`` names, so that its kernels are compiled into
    Triton's disk cache: ("providers", dtype, shape) runs (a)-(c) at the shape (their default
    configs depend on M); ("config", dtype, config) the fused kernel at that config."""
    kind, dtype_name, what = task
    dtype = getattr(torch, dtype_name)
    try:
        with torch.inference_mode():
            if kind == "providers":
                t = _inputs(*what, dtype, "cuda")
                for fn in _providers(t).values():
                    fn(t["x"].clone())
            else:
                from speechrt.kernels.fused_ffn import FfnConfig

                t = _inputs(WARM_ROWS, 256, 2048, dtype, "cuda")
                _providers(t)["(c) ffn_add_ln default"](t["x"], FfnConfig(*what))
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - reported; the timed run meets it again
        return f"{task}: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return ""


def precompile(shapes, dtypes, configs, jobs: int) -> None:
    """Compile every kernel of the run in ``jobs`` parallel processes (Triton compiles one
    kernel at a time per process, 2-8 s for each fused config)."""
    tasks = [("providers", str(dt).removeprefix("torch."), s) for dt in dtypes for s in shapes]
    tasks += [
        (
            "config",
            str(dt).removeprefix("torch."),
            (c.block_m, c.block_h, c.num_warps, c.num_stages),
        )
        for c in configs
        for dt in dtypes
    ]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        for msg in pool.map(_warm, tasks):
            if msg:
                print(f"precompile: {msg}", file=sys.stderr, flush=True)


def run(shapes, dtypes, configs, time_limit: float, dev: str) -> tuple[list[dict], int]:
    """(rows of (a)-(c) for every shape and dtype, then the config sweep; rows skipped)."""
    t0 = time.perf_counter()
    cases = []
    for dtype in dtypes:
        for shape in shapes:
            t = _inputs(*shape, dtype, dev)
            cases.append((shape, dtype, t, _references(t), _providers(t)))
    rows: list[dict[str, object]] = []
    for shape, dtype, t, refs, providers in cases:
        for name, fn in providers.items():
            rows.append(_row(shape, dtype, name, "", fn, t["x"], refs))
        print(f"done {shape} {dtype}", file=sys.stderr, flush=True)
    skipped = 0
    for cfg in configs:  # config-major: each config compiles once per dtype, every shape reuses it
        for shape, dtype, t, refs, providers in cases:
            if time.perf_counter() - t0 > time_limit:
                skipped += 1
                continue
            fused = providers["(c) ffn_add_ln default"]
            fn = lambda x, fused=fused, cfg=cfg: fused(x, cfg)  # noqa: E731
            rows.append(_row(shape, dtype, "sweep", str(cfg), fn, t["x"], refs))
        print(f"done {cfg} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return rows, skipped


def _summary(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per shape and dtype: (a), (b), (c) and (d) = the fastest sweep row, with vs (a)."""
    out = []
    groups: dict[tuple[object, object], list[dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["dtype"]), []).append(r)
    for rs in groups.values():
        fixed = [dict(r) for r in rs if r["provider"] != "sweep"]
        swept = [r for r in rs if r["provider"] == "sweep" and not r["error"]]
        if swept:
            best = dict(min(swept, key=lambda r: r["ms"]))
            best["provider"] = "(d) ffn_add_ln best"
            fixed.append(best)
        base = fixed[0]["ms"]
        for r in fixed:
            r["vs (a)"] = base / r["ms"]
        out += fixed
    return out


def _report(rows, skipped, args) -> str:
    from speechrt.benchmark.common import environment, markdown_table

    cols = ["shape", "dtype", "provider", "config", "ms", "TFLOP/s", "vs (a)", "err_ref",
            "err_exact", "error"]  # fmt: skip
    sweep = [r for r in rows if r["provider"] == "sweep"]
    lines = [
        "# Fused FFN + add + LayerNorm (bench/ffn_micro.py)",
        "",
        f"`{json.dumps(environment())}`",
        "",
        f"`{' '.join(sys.argv)}`"
        + (" (CPU interpreter: times mean nothing)" if args.smoke else ""),
        "",
        markdown_table(_summary(rows), cols),
        "",
        f"Sweep ({len(sweep)} rows"
        + (f", {skipped} skipped at the time limit)" if skipped else ")"),
        "",
        markdown_table(sweep, [c for c in cols if c != "vs (a)"]) if sweep else "(none)",
    ]
    return "\n".join(lines) + "\n"


def _shape(text: str) -> tuple[int, int, int]:
    m, d, h = (int(v) for v in text.split("x"))
    return m, d, h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"]
    )
    parser.add_argument("--shapes", nargs="+", type=_shape, default=None, help="M x D x H")
    parser.add_argument(
        "--jobs",
        type=int,
        default=max(1, min(12, (os.cpu_count() or 2) - 2)),
        help="processes that compile the kernels before timing (1: compile while timing)",
    )
    parser.add_argument(
        "--time-limit", type=float, default=60.0,
        help="seconds after which the CONFIGS sweep is cut short ((a)-(c) are always timed)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="folder for ffn_micro.md and ffn_micro.csv")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny shapes"
    )
    args = parser.parse_args()
    if args.smoke:  # before any speechrt.kernels import: Triton reads it at @triton.jit
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        sys.exit("ffn_micro.py needs a CUDA GPU (or --smoke)")
    from speechrt.benchmark.common import write_csv
    from speechrt.kernels.fused_ffn import CONFIGS

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 references without TF32
    shapes = args.shapes or [_shape(s) for s in (SMOKE_SHAPES if args.smoke else SHAPES)]
    configs = CONFIGS[:2] if args.smoke else CONFIGS
    dev = "cpu" if args.smoke else "cuda"
    dtypes = [getattr(torch, name) for name in args.dtype]
    t0 = time.perf_counter()
    if not args.smoke and args.jobs > 1:
        precompile(shapes, dtypes, configs, args.jobs)
        print(f"precompiled ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    with torch.inference_mode():
        rows, skipped = run(
            shapes, dtypes, configs, args.time_limit - (time.perf_counter() - t0), dev
        )
    report = _report(rows, skipped, args)
    print(report)
    print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ffn_micro.md").write_text(report)
        write_csv(args.out / "ffn_micro.csv", rows)


if __name__ == "__main__":
    main()
