"""Micro-benchmark of the Triton relative-position attention kernel at Conformer shapes (GPU).

Providers, each timed with ``triton.testing.do_bench`` (median, after warm-up):

* ``triton``       -- ``rel_pos_attention`` with its default (heuristic) tile config
* ``triton-tuned`` -- the same kernel with the config picked by ``--autotune`` for this shape
* ``wenet-eager``  -- ``rel_pos_attention_ref(upcast=False)``: WeNet's two-matrix formula in the
                      input dtype with an explicit (B, T, T) mask, as WeNet runs it
* ``sdpa``         -- ``F.scaled_dot_product_attention`` on k' = k + p with an additive float
                      mask = (u.k + v.p) * scale + (0 / -inf from the key lengths)

Sweep: B in {1, 16, 64} x T in {64, 256, 1024}, H=4, Dk=64, fp16 (flags change it). Key lengths
are ragged, drawn once per shape from a fixed seed (the first row is full length).

Autotune: every config of ``CONFIGS`` is timed per shape; the fastest median wins, ties go to the
earlier config, and the choice is cached per shape in memory and in ``--tune-cache`` (JSON), so a
re-run reuses the same choice instead of re-timing.

Usage (on a GPU machine)::

    python bench/attention_micro.py [--autotune] [--csv out.csv] [--tune-cache tune.json]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from speechrt.kernels.attention import (
    AttentionConfig,
    rel_pos_attention,
    rel_pos_attention_ref,
    visibility_mask,
)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CONFIGS = [
    AttentionConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=s)
    for bm, bn, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
]


@dataclass(frozen=True)
class Shape:
    """One benchmark point."""

    batch: int
    time: int
    heads: int
    head_dim: int
    dtype: str
    chunk_size: int = 0
    num_left_chunks: int = -1

    @property
    def key(self) -> str:
        return (
            f"B{self.batch}-T{self.time}-H{self.heads}-D{self.head_dim}-{self.dtype}"
            f"-c{self.chunk_size}-l{self.num_left_chunks}"
        )


@dataclass
class Inputs:
    """Tensors of one shape: q, k, v (B, T, H, Dk) views of one fused (B, T, 3, H, Dk) tensor."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    p: torch.Tensor  # (T, H, Dk)
    bias_u: torch.Tensor  # (H, Dk)
    bias_v: torch.Tensor  # (H, Dk)
    lengths: torch.Tensor  # (B,) int32


def make_inputs(shape: Shape, device: torch.device) -> Inputs:
    """Deterministic inputs for ``shape`` (seeded by the shape key)."""
    g = torch.Generator().manual_seed(sum(map(ord, shape.key)))
    b, t, h, d = shape.batch, shape.time, shape.heads, shape.head_dim
    dtype = DTYPES[shape.dtype]
    qkv = torch.randn(b, t, 3, h, d, generator=g).to(device=device, dtype=dtype)
    q, k, v = qkv.unbind(2)  # each (B, T, H, Dk), strided
    p = torch.randn(t, h, d, generator=g).to(device=device, dtype=dtype)
    biases = (0.5 * torch.randn(2, h, d, generator=g)).to(device=device, dtype=dtype)
    bias_u, bias_v = biases.unbind(0)  # each (H, Dk)
    lengths = torch.randint(max(t // 2, 1), t + 1, (b,), generator=g)
    lengths[0] = t
    return Inputs(q, k, v, p, bias_u, bias_v, lengths.to(device=device, dtype=torch.int32))


def _chunk_kw(shape: Shape) -> dict[str, int]:
    return {"chunk_size": shape.chunk_size, "num_left_chunks": shape.num_left_chunks}


def provider_fns(
    shape: Shape, x: Inputs, tuned: AttentionConfig | None
) -> dict[str, Callable[[], torch.Tensor]]:
    """The callables to time for ``shape``; each returns (B, T, H, Dk)."""
    args = (x.q, x.k, x.v, x.p, x.bias_u, x.bias_v, x.lengths)
    kw = _chunk_kw(shape)
    scale = 1.0 / math.sqrt(shape.head_dim)

    def sdpa() -> torch.Tensor:
        mask = visibility_mask(x.lengths, shape.time, shape.time, **kw)  # (B, T, T) or expanded
        if shape.chunk_size == 0:
            mask = mask[:, :1]  # (B, 1, Tk): key padding only
        k_eff = (x.k + x.p).transpose(1, 2)  # (B, H, Tk, Dk)
        bias = torch.einsum("hd,bjhd->bhj", x.bias_u, x.k) + torch.einsum(
            "hd,jhd->hj", x.bias_v, x.p
        )  # (B, H, Tk)
        add = torch.zeros(mask.shape, dtype=x.q.dtype, device=x.q.device)
        add = add.masked_fill(~mask, float("-inf"))[:, None]  # (B, 1, Tq or 1, Tk)
        attn_mask = bias[:, :, None, :] * scale + add  # (B, H, Tq or 1, Tk)
        out = F.scaled_dot_product_attention(
            x.q.transpose(1, 2), k_eff, x.v.transpose(1, 2), attn_mask=attn_mask, scale=scale
        )  # (B, H, Tq, Dk)
        return out.transpose(1, 2)

    fns = {
        "triton": lambda: rel_pos_attention(*args, **kw),
        "wenet-eager": lambda: rel_pos_attention_ref(*args, upcast=False, **kw),
        "sdpa": sdpa,
    }
    if tuned is not None:
        fns["triton-tuned"] = lambda: rel_pos_attention(*args, config=tuned, **kw)
    return fns


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench, CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


class Autotuner:
    """Per-shape best config: measured once, cached in memory and (optionally) in a JSON file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.cache: dict[str, dict[str, int]] = {}
        if path is not None and path.exists():
            self.cache = json.loads(path.read_text())

    def best(self, shape: Shape, x: Inputs) -> AttentionConfig:
        if shape.key in self.cache:
            return AttentionConfig(**self.cache[shape.key])
        args = (x.q, x.k, x.v, x.p, x.bias_u, x.bias_v, x.lengths)
        timings = []
        for idx, cfg in enumerate(CONFIGS):
            try:
                ms = bench_ms(
                    lambda cfg=cfg: rel_pos_attention(*args, config=cfg, **_chunk_kw(shape))
                )
            except Exception as exc:  # e.g. out of shared memory for this config
                print(f"  skip {cfg}: {type(exc).__name__}")
                continue
            timings.append((ms, idx))
        _, best_idx = min(timings)  # ties -> earlier config: deterministic
        self.cache[shape.key] = asdict(CONFIGS[best_idx])
        if self.path is not None:
            self.path.write_text(json.dumps(self.cache, indent=1, sort_keys=True))
        return CONFIGS[best_idx]


def environment() -> dict[str, str]:
    """GPU, versions and commit recorded with every row."""
    import triton

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit,
    }


def max_error(out: torch.Tensor, shape: Shape, x: Inputs) -> float:
    """max |out - fp32 reference| over all rows."""
    args = (x.q, x.k, x.v, x.p, x.bias_u, x.bias_v, x.lengths)
    exact = rel_pos_attention_ref(*args, upcast=True, **_chunk_kw(shape)).float()
    return (out.float() - exact).abs().max().item()


def run(shapes: list[Shape], tuner: Autotuner | None) -> list[dict[str, object]]:
    device = torch.device("cuda")
    env = environment()
    rows = []
    for shape in shapes:
        x = make_inputs(shape, device)
        tuned = tuner.best(shape, x) if tuner is not None else None
        fns = provider_fns(shape, x, tuned)
        times = {name: bench_ms(fn) for name, fn in fns.items()}
        row: dict[str, object] = {"shape": shape.key, **asdict(shape)}
        row.update({f"{name}_ms": round(ms, 4) for name, ms in times.items()})
        row["speedup_vs_eager"] = round(times["wenet-eager"] / times["triton"], 2)
        row["speedup_vs_sdpa"] = round(times["sdpa"] / times["triton"], 2)
        row["triton_max_err"] = f"{max_error(fns['triton'](), shape, x):.2e}"
        row["sdpa_max_err"] = f"{max_error(fns['sdpa'](), shape, x):.2e}"
        if tuned is not None:
            row["tuned_config"] = (
                f"{tuned.block_m}x{tuned.block_n}w{tuned.num_warps}s{tuned.num_stages}"
            )
        rows.append({**row, **env})
        print_row(row)
        del x, fns
        torch.cuda.empty_cache()
    return rows


_PRINTED_HEADER: list[str] = []


def print_row(row: dict[str, object]) -> None:
    cols = [c for c in row if c.endswith("_ms") or c.startswith("speedup") or c.endswith("err")]
    cols = ["shape", *cols, *(["tuned_config"] if "tuned_config" in row else [])]
    if not _PRINTED_HEADER:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        _PRINTED_HEADER.extend(cols)
    print("| " + " | ".join(str(row.get(c, "")) for c in _PRINTED_HEADER) + " |", flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--time", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--chunk-size", type=int, default=0)
    ap.add_argument("--num-left-chunks", type=int, default=-1)
    ap.add_argument("--autotune", action="store_true", help="pick a config per shape")
    ap.add_argument("--tune-cache", type=Path, default=None, help="JSON cache of tuned configs")
    ap.add_argument("--csv", type=Path, default=None, help="write all rows to this CSV")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_micro.py needs a CUDA GPU")
    shapes = [
        Shape(b, t, args.heads, args.head_dim, args.dtype, args.chunk_size, args.num_left_chunks)
        for b in args.batch
        for t in args.time
    ]
    tuner = Autotuner(args.tune_cache) if args.autotune else None
    rows = run(shapes, tuner)
    if args.csv is not None:
        keys = list(dict.fromkeys(k for row in rows for k in row))
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
