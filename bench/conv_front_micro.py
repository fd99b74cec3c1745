"""Micro-benchmark: the Conv2d subsampling front, the FFN's first GEMM + activation, and the
sublayers' last GEMM + residual add + LayerNorm.

Run on a CUDA machine from the repository root (about 1-2 minutes on an H200, most of it Triton
compiling each config)::

    PYTHONPATH=src python bench/conv_front_micro.py [--dtype float16 bfloat16]
        [--shapes 1x1024 16x256 16x1024 64x256 64x1024] [--part front ffn addln]
        [--rows 256 4096 16384 65536] [--csv conv_front.csv]

Part "front" (B x T fbank frames, F=80 bins, C=256 channels): CMVN + conv1 + ReLU + conv2 + ReLU
to the (B, T2, F2*C) flattened-NHWC output that the projection reads, by

* ``cudnn_cl``: the fused encoder's previous path (CMVN and cast kernels, cuDNN convs in
  channels-last, in-place ReLUs; the output is a view);
* ``cudnn_nchw``: the same convs in NCHW, then one copy to the NHWC output;
* ``triton``: :func:`speechrt.kernels.conv_subsampling.conv_subsampling`, one launch, at each
  config of ``CONFIGS`` and at the default choice (config ``default``).

Part "ffn" (rows = B*T/4, D=256, H=2048): ``F.linear`` then ``F.silu`` (what the encoder runs)
against :func:`speechrt.kernels.linear_act.linear_act` at each config and the default.

Part "addln" (``--rows`` rows, D=256, K=2048 (an FFN's w2) and K=256 (attention out, conv pw2)):
``F.linear`` without bias then :func:`~speechrt.kernels.layer_norm.add_layer_norm` (bias, scale
0.5, float32 residual updated in place; what the encoder runs) against
:func:`speechrt.kernels.linear_add_layer_norm.linear_add_layer_norm` at each config and the
default. ``max_err`` is on y (the LayerNorm output); each provider starts from the same residual.

Times: median of CUDA-event timings, eager (one call between two events) and graph (one replay
of a CUDA graph holding one call: launch overhead hidden, as in the engine). ``speedup`` =
baseline graph ms / this graph ms (baseline: ``cudnn_cl``, ``linear+silu``). ``max_err`` = max
|output - float32 reference| (the module's ``_ref`` with ``upcast``; TF32 off).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
try:
    import speechrt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

from speechrt.benchmark.common import environment, markdown_table, write_csv  # noqa: E402

SHAPES = ("1x1024", "16x256", "16x1024", "64x256", "64x1024")
ADDLN_ROWS = (256, 4096, 16384, 65536)
N_MELS, CHANNELS, FFN_HIDDEN = 80, 256, 2048


def _time_ms(fn: Callable[[], object], reps: int = 25) -> tuple[float, float]:
    """(eager, graph) medians in ms of ``fn`` on the current stream, from CUDA events."""
    for _ in range(3):  # compile, cuDNN autotuning
        fn()
    torch.cuda.synchronize()

    def median(run: Callable[[], object]) -> float:
        times = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    eager = median(fn)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        graph.replay()
    return eager, median(graph.replay)


def _max_err(out: torch.Tensor, gold: torch.Tensor) -> float:
    return float((out.float() - gold).abs().max())


def _row(part, shape, provider, config, dtype, fn, gold) -> dict[str, object]:
    row = {"part": part, "shape": shape, "provider": provider, "config": config,
           "dtype": str(dtype)[6:], "eager_ms": math.nan, "graph_ms": math.nan,
           "speedup": math.nan, "max_err": math.nan, "error": ""}  # fmt: skip
    try:
        row["max_err"] = _max_err(fn(), gold)
        row["eager_ms"], row["graph_ms"] = _time_ms(fn)
    except Exception as e:  # noqa: BLE001 - a config that cannot launch is a row, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    torch.cuda.synchronize()
    return row


def _cudnn_front(convs, mean, istd, dtype, channels_last: bool) -> Callable[[torch.Tensor], object]:
    """The encoder's cuDNN front: CMVN, cast, conv + ReLU twice, to (B, T2, F2 * C)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    mods = [copy.deepcopy(c).to(dtype).to(memory_format=fmt) for c in convs]

    def run(x: torch.Tensor) -> torch.Tensor:
        h = ((x - mean) * istd).to(dtype).unsqueeze(1)  # (B, 1, T, F)
        tf32 = dtype != torch.float32  # as the encoder runs it
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=tf32):
            for m in mods:
                h = torch.relu_(m(h))
        b, c, t, f = h.shape
        return h.permute(0, 2, 3, 1).reshape(b, t, f * c)  # a view in channels-last, else a copy

    return run


def front_rows(b: int, t: int, dtype: torch.dtype) -> list[dict[str, object]]:
    """Every front provider at B x T frames."""
    from speechrt.kernels import conv_subsampling as cs

    dev, shape = "cuda", f"{b}x{t}"
    x = torch.randn(b, t, N_MELS, device=dev) * 3 + 8  # fbank-like
    mean, istd = x.mean(dim=(0, 1)), x.std(dim=(0, 1)).reciprocal()
    convs = [nn.Conv2d(1, CHANNELS, 3, 2).to(dev), nn.Conv2d(CHANNELS, CHANNELS, 3, 2).to(dev)]
    raw = (convs[0].weight, convs[0].bias, convs[1].weight, convs[1].bias)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        gold = cs.conv_subsampling_ref(x, *raw, mean, istd, upcast=True)
    packed = cs.pack_conv_subsampling(*raw, dtype)
    rows = []
    with torch.no_grad():
        for name, cl in (("cudnn_cl", True), ("cudnn_nchw", False)):
            run = _cudnn_front(convs, mean, istd, dtype, cl)
            rows.append(_row("front", shape, name, "", dtype, lambda run=run: run(x), gold))
        out = torch.empty_like(gold, dtype=dtype)
        configs = [None, *(cs.CONFIGS if dtype != torch.float32 else cs.CONFIGS_FP32)]
        for cfg in configs:
            fn = functools.partial(cs.conv_subsampling, x, packed, mean, istd, out=out, config=cfg)
            rows.append(_row("front", shape, "triton", str(cfg or "default"), dtype, fn, gold))
    return rows


def ffn_rows(b: int, t: int, dtype: torch.dtype) -> list[dict[str, object]]:
    """F.linear + SiLU vs linear_act at (B*T/4, 256) x (2048, 256)."""
    from speechrt.kernels import linear_act as la

    dev, m = "cuda", b * t // 4
    shape = f"{m}x{CHANNELS} @ {FFN_HIDDEN}x{CHANNELS}"
    x = torch.randn(m, CHANNELS, device=dev).to(dtype)
    w = (torch.randn(FFN_HIDDEN, CHANNELS, device=dev) / CHANNELS**0.5).to(dtype)
    bias = (torch.randn(FFN_HIDDEN, device=dev) * 0.1).to(dtype)
    with _no_tf32():
        gold = la.linear_act_ref(x, w, bias, "swish", upcast=True)
    rows = [
        _row("ffn", shape, "linear+silu", "", dtype, lambda: F.silu(F.linear(x, w, bias)), gold)
    ]
    out = torch.empty(m, FFN_HIDDEN, device=dev, dtype=dtype)
    configs = [None, *(la.CONFIGS if dtype != torch.float32 else la.CONFIGS_FP32)]
    for cfg in configs:
        fn = functools.partial(la.linear_act, x, w, bias, "swish", out=out, config=cfg)
        rows.append(_row("ffn", shape, "linear_act", str(cfg or "default"), dtype, fn, gold))
    return rows


def addln_rows(m: int, k: int, dtype: torch.dtype) -> list[dict[str, object]]:
    """F.linear + add_layer_norm vs linear_add_layer_norm at (m, k) x (256, k), residual and
    y as the encoder has them (float32 stream, y in the compute dtype)."""
    from speechrt.kernels import linear_add_layer_norm as lal
    from speechrt.kernels.layer_norm import add_layer_norm

    dev, d = "cuda", CHANNELS
    shape = f"{m}x{k} @ {d}x{k}"
    z = torch.randn(m, k, device=dev).to(dtype)
    w = (torch.randn(d, k, device=dev) / k**0.5).to(dtype)
    bias = (torch.randn(d, device=dev) * 0.1).to(dtype)
    lw = (1 + 0.1 * torch.randn(d, device=dev)).to(dtype)
    lb = (0.1 * torch.randn(d, device=dev)).to(dtype)
    r0 = torch.randn(m, d, device=dev) * 3
    with _no_tf32():
        _, gold = lal.linear_add_layer_norm_ref(z, w, r0, lw, lb, bias=bias, scale=0.5, upcast=True)

    def unfused(r: torch.Tensor) -> torch.Tensor:
        return add_layer_norm(F.linear(z, w), r, lw, lb, x_bias=bias, scale=0.5, h_out=r)[1]

    base = functools.partial(unfused, r0.clone())
    rows = [_row("addln", shape, "linear+add_ln", "", dtype, base, gold)]
    configs = [None, *(lal.CONFIGS if dtype != torch.float32 else lal.CONFIGS_FP32)]
    for cfg in configs:

        def fused(r: torch.Tensor, cfg=cfg) -> torch.Tensor:
            return lal.linear_add_layer_norm(z, w, r, lw, lb, bias=bias, scale=0.5, config=cfg)[1]

        fn = functools.partial(fused, r0.clone())  # the first call (max_err) sees r0
        rows.append(_row("addln", shape, "linear_add_ln", str(cfg or "default"), dtype, fn, gold))
    return rows


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Float32 matmuls without TF32 inside (for the float32 references)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _speedups(rows: list[dict[str, object]]) -> None:
    """speedup = graph ms of the shape's baseline (first row of each part/shape) / own."""
    base: dict[tuple[object, object, object], float] = {}
    for r in rows:
        key = (r["part"], r["shape"], r["dtype"])
        base.setdefault(key, r["graph_ms"])
        r["speedup"] = base[key] / r["graph_ms"]


def _best(rows: list[dict[str, object]]) -> None:
    """Per part/shape/dtype: the fastest Triton config against the baseline."""
    print("\nFastest Triton config per shape (graph ms):\n")
    print("| part | shape | dtype | baseline ms | best config | best ms | speedup | default ms |")
    print("|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[object, object, object], list[dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((r["part"], r["shape"], r["dtype"]), []).append(r)
    for (part, shape, dtype), rs in groups.items():
        tri = [r for r in rs if r["config"] not in ("", "default") and not r["error"]]
        default = [r for r in rs if r["config"] == "default"]
        if not tri:
            continue
        best = min(tri, key=lambda r: r["graph_ms"])
        d_ms = default[0]["graph_ms"] if default else math.nan
        print(f"| {part} | {shape} | {dtype} | {rs[0]['graph_ms']:.4g} | {best['config']} | "
              f"{best['graph_ms']:.4g} | {best['speedup']:.3g} | {d_ms:.4g} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype", nargs="+", default=["float16"], choices=["float32", "float16", "bfloat16"]
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="B x T, e.g. 16x256")
    parser.add_argument(
        "--part", nargs="+", default=["front", "ffn"], choices=["front", "ffn", "addln"]
    )
    parser.add_argument(
        "--rows", nargs="+", type=int, default=list(ADDLN_ROWS), help="addln: GEMM rows"
    )
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("conv_front_micro.py needs a CUDA GPU")
    torch.manual_seed(0)
    rows: list[dict[str, object]] = []
    for dtype in (getattr(torch, name) for name in args.dtype):
        for shape in args.shapes if {"front", "ffn"} & set(args.part) else ():
            b, t = (int(v) for v in shape.split("x"))
            if "front" in args.part:
                rows += front_rows(b, t, dtype)
            if "ffn" in args.part:
                rows += ffn_rows(b, t, dtype)
            print(f"done {shape} {dtype}", file=sys.stderr, flush=True)
        if "addln" in args.part:
            for m in args.rows:
                for k in (FFN_HIDDEN, CHANNELS):
                    rows += addln_rows(m, k, dtype)
                print(f"done addln {m} rows {dtype}", file=sys.stderr, flush=True)
    _speedups(rows)
    print(f"`{json.dumps(environment())}`\n")
    print(markdown_table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    _best(rows)
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
