"""Micro-benchmark of the two largest non-GEMM costs of the Whisper encoder at 16 x 30 s (large-v3).

    PYTHONPATH=src python3 bench/whisper_encoder_micro.py [--batch 16] [--dtype float16]

* ``fc1``: cuBLAS ``F.linear`` + a separate exact-GELU kernel vs
  :func:`speechrt.kernels.linear_act.linear_act` (GELU in the GEMM epilogue) at its default
  config and every entry of ``CONFIGS``; rows = B * 1500, K = 1280, N = 5120.
* ``attention``: ``F.scaled_dot_product_attention`` (B, 20, 1500, 64) under each SDPA backend
  that runs (cuDNN, flash, memory-efficient) and the default choice.

Times: median of CUDA-event timings (``cuda_time_ms``); ``TFLOP/s`` from the nominal FLOPs.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from speechrt.benchmark.common import cuda_time_ms, environment, markdown_table
from speechrt.kernels.linear_act import CONFIGS, linear_act


def fc1_rows(m: int, k: int, n: int, dtype: torch.dtype) -> list[dict]:
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    gold = F.gelu(F.linear(x.float(), w.float(), b.float()))
    flops = 2.0 * m * k * n
    rows = []

    def add(name: str, fn, cfg: str = "") -> None:
        try:
            err = float((fn().float() - gold).abs().max())
            ms = cuda_time_ms(fn, warmup=3, min_iters=20)
            rows.append({"part": "fc1", "provider": name, "config": cfg, "ms": ms,
                         "TFLOP/s": flops / ms / 1e9, "max_err": err})  # fmt: skip
        except Exception as e:  # a config that does not compile on this GPU
            rows.append({"part": "fc1", "provider": name, "config": cfg, "error": str(e)[:60]})

    add("cublas+gelu", lambda: F.gelu(F.linear(x, w, b)))
    add("linear_act", lambda: linear_act(x, w, b, "gelu"), "default")
    for cfg in CONFIGS:
        add("linear_act", lambda cfg=cfg: linear_act(x, w, b, "gelu", config=cfg), str(cfg))
    return rows


def attention_rows(b: int, h: int, t: int, d: int, dtype: torch.dtype) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=dtype) for _ in range(3))
    flops = 4.0 * b * h * t * t * d
    rows = []
    backends = {
        "default": None,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    for name, backend in backends.items():

        def run(backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            ms = cuda_time_ms(run, warmup=3, min_iters=20)
            rows.append({"part": "attention", "provider": name, "ms": ms,
                         "TFLOP/s": flops / ms / 1e9})  # fmt: skip
        except RuntimeError as e:
            rows.append({"part": "attention", "provider": name, "error": str(e)[:60]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = fc1_rows(args.batch * 1500, 1280, 5120, dtype)
    rows += attention_rows(args.batch, 20, 1500, 64, dtype)
    print(f"`{environment()}`\n")
    print(markdown_table(rows, ["part", "provider", "config", "ms", "TFLOP/s", "max_err", "error"]))


if __name__ == "__main__":
    main()
