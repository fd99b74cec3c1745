"""Micro-benchmark: each Triton kernel against its plain-torch reference at Conformer shapes.

Run on a CUDA machine from the repository root::

    python bench/kernels_micro.py [--dtype float16 bfloat16] [--csv kernels.csv]

Times are medians in microseconds: "eager" from ``triton.testing.do_bench`` (L2 flushed,
Python launch overhead included: small kernels are launch-bound there), "graph" from
``triton.testing.do_bench_cudagraph`` (replayed CUDA graph, as the engine runs them; inputs
may stay in L2). "torch" is the op's ``_ref`` in the input dtype, i.e. what an unfused PyTorch
model runs. GB/s (from the graph time) counts the bytes a kernel must move at least (inputs
read once, outputs written once). "err" is the largest |output - float32 reference|.
"""

import argparse
import csv
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import speechrt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))


@dataclass(frozen=True)
class Case:
    """One benchmark row: a kernel at one shape, its providers and its float32 reference."""

    kernel: str
    shape: str
    min_bytes: int
    triton: Callable[[], torch.Tensor]
    torch: Callable[[], torch.Tensor]
    gold: Callable[[], torch.Tensor]


def _layer_norm_cases(dtype: torch.dtype, dev: str) -> list[Case]:
    from speechrt.kernels import layer_norm as ln

    cases, rows = [], 64 * 256
    for d in (256, 512):
        x = torch.randn(rows, d, device=dev, dtype=dtype)
        res = torch.randn(rows, d, device=dev, dtype=dtype)
        w, b, xb = (torch.randn(d, device=dev, dtype=dtype) for _ in range(3))
        nbytes = rows * d * x.element_size()
        cases.append(
            Case(
                "layer_norm",
                f"{rows}x{d}",
                2 * nbytes,
                lambda x=x, w=w, b=b: ln.layer_norm(x, w, b),
                lambda x=x, w=w, b=b: ln.layer_norm_ref(x, w, b),
                lambda x=x, w=w, b=b: ln.layer_norm_ref(x, w, b, upcast=True),
            )
        )
        kw = dict(x_bias=xb, scale=0.5)
        cases.append(
            Case(
                "add_layer_norm",
                f"{rows}x{d}",
                4 * nbytes,
                lambda x=x, r=res, w=w, b=b, kw=kw: ln.add_layer_norm(x, r, w, b, **kw)[1],
                lambda x=x, r=res, w=w, b=b, kw=kw: ln.add_layer_norm_ref(x, r, w, b, **kw)[1],
                lambda x=x, r=res, w=w, b=b, kw=kw: ln.add_layer_norm_ref(
                    x, r, w, b, upcast=True, **kw
                )[1],
            )
        )
    return cases


def _conv_cases(dtype: torch.dtype, dev: str) -> list[Case]:
    from speechrt.kernels import conv_module as cm

    b, t, c, k = 64, 256, 256, 15
    x2 = torch.randn(b, t, 2 * c, device=dev, dtype=dtype)
    w = (torch.randn(c, k, device=dev) / k**0.5).to(dtype)
    bias, ln_w, ln_b = (torch.randn(c, device=dev, dtype=dtype) for _ in range(3))
    lengths = torch.randint(t // 2, t + 1, (b,), device=dev)
    cases = []
    for norm in ("batch", "layer"):
        kw = dict(causal=False, norm=norm, ln_weight=ln_w, ln_bias=ln_b)
        cases.append(
            Case(
                f"glu_depthwise_conv[{norm}]",
                f"B{b} T{t} C{c} K{k}",
                3 * b * t * c * x2.element_size(),
                lambda kw=kw: cm.glu_depthwise_conv(x2, w, bias, lengths, **kw),
                lambda kw=kw: cm.glu_depthwise_conv_ref(x2, w, bias, lengths, **kw),
                lambda kw=kw: cm.glu_depthwise_conv_ref(x2, w, bias, lengths, upcast=True, **kw),
            )
        )
    return cases


def _log_softmax_cases(dtype: torch.dtype, dev: str) -> list[Case]:
    from speechrt.kernels import log_softmax as ls

    cases, n = [], 640
    for v in (4233, 51865):
        x = torch.randn(n, v, device=dev, dtype=dtype) * 4
        cases.append(
            Case(
                "log_softmax",
                f"{n}x{v}",
                n * v * (x.element_size() + 4),
                lambda x=x: ls.log_softmax(x),
                lambda x=x: ls.log_softmax_ref(x),
                lambda x=x: ls.log_softmax_ref(x, upcast=True),
            )
        )
    d, v = 256, 4233
    x = torch.randn(n, d, device=dev, dtype=dtype)
    w = (torch.randn(v, d, device=dev) / d**0.5).to(dtype)
    b = torch.randn(v, device=dev, dtype=dtype)
    cases.append(
        Case(
            "linear_log_softmax",
            f"{n}x{d} @ {v}x{d}",
            (n * d + v * d) * x.element_size() + n * v * 4,
            lambda: ls.linear_log_softmax(x, w, b),
            lambda: ls.linear_log_softmax_ref(x, w, b),
            lambda: ls.linear_log_softmax_ref(x, w, b, upcast=True),
        )
    )
    return cases


def _max_err(out: torch.Tensor, gold: torch.Tensor) -> float:
    return float((out.float() - gold.float()).abs().max())


def _header() -> str:
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "?"
    return (
        f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | "
        f"triton {triton.__version__} | commit {commit or '?'}"
    )


def _warm_up_gpu(seconds: float = 1.0) -> None:
    """Keep the GPU busy for a while so the first rows are not timed at idle clocks."""
    import time

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def run(dtypes: list[torch.dtype]) -> list[dict[str, object]]:
    """Time every case for each dtype; returns one dict per (case, dtype)."""
    from triton.testing import do_bench, do_bench_cudagraph

    def eager(fn: Callable[[], torch.Tensor]) -> float:
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3

    def graph(fn: Callable[[], torch.Tensor]) -> float:
        return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3

    _warm_up_gpu()
    rows = []
    for dtype in dtypes:
        for factory in (_layer_norm_cases, _conv_cases, _log_softmax_cases):
            for case in factory(dtype, "cuda"):
                gold = case.gold()
                t_err, r_err = _max_err(case.triton(), gold), _max_err(case.torch(), gold)
                del gold
                t_graph, r_graph = graph(case.triton), graph(case.torch)
                rows.append(
                    {
                        "kernel": case.kernel,
                        "shape": case.shape,
                        "dtype": str(dtype)[6:],
                        "triton_eager_us": eager(case.triton),
                        "torch_eager_us": eager(case.torch),
                        "triton_graph_us": t_graph,
                        "torch_graph_us": r_graph,
                        "graph_speedup": r_graph / t_graph,
                        "triton_GBps": case.min_bytes / t_graph / 1e3,
                        "triton_err": t_err,
                        "torch_err": r_err,
                    }
                )
    return rows


def _print_table(rows: list[dict[str, object]]) -> None:
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=["float16", "bfloat16"],
        choices=["float32", "float16", "bfloat16"],
    )
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels_micro.py needs a CUDA GPU")
    torch.manual_seed(0)
    rows = run([getattr(torch, name) for name in args.dtype])
    print(_header())
    _print_table(rows)
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
