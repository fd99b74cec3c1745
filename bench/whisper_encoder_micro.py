"""Micro-benchmark of the two largest non-GEMM costs of the Whisper encoder at 16 x 30 s (large-v3).

    PYTHONPATH=src python3 bench/whisper_encoder_micro.py [--batch 16] [--dtype float16]
        [--gemms 24000x1280x5120:gelu 16384x256x2048:swish]

* ``fc1``: cuBLAS ``F.linear`` + a separate activation kernel vs
  :func:`speechrt.kernels.linear_act.linear_act` (activation in the GEMM epilogue) at its
  default config and every entry of ``CONFIGS`` (pointer and tensor-descriptor kernels), for
  each ``--gemms`` shape rows x K x N: the Whisper large-v3 fc1 (B * 1500 rows) and the
  Conformer FFN w1 at 64 x 1024 frames (16,384 rows) by default.
* ``attention``: ``F.scaled_dot_product_attention`` (B, 20, 1500, 64) under each SDPA backend
  that runs (cuDNN, flash, memory-efficient) and the default choice; ``packed`` is the default
  backend on q, k, v viewed out of one (B, 1500, 3, 20, 64) projection (the encoder's
  ``packed_qkv`` option).

Times: median of CUDA-event timings (``cuda_time_ms``); ``TFLOP/s`` from the nominal FLOPs.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from speechrt.benchmark.common import cuda_time_ms, environment, markdown_table
from speechrt.kernels.linear_act import CONFIGS, linear_act

ACTS = {"gelu": F.gelu, "swish": F.silu}


def fc1_rows(m: int, k: int, n: int, act: str, dtype: torch.dtype) -> list[dict]:
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    act_fn = ACTS[act]
    gold = act_fn(F.linear(x.float(), w.float(), b.float()))
    part = f"{m}x{k}x{n} {act}"
    flops = 2.0 * m * k * n
    rows = []

    def add(name: str, fn, cfg: str = "") -> None:
        try:
            err = float((fn().float() - gold).abs().max())
            ms = cuda_time_ms(fn, warmup=3, min_iters=20)
            rows.append({"part": part, "provider": name, "config": cfg, "ms": ms,
                         "TFLOP/s": flops / ms / 1e9, "max_err": err})  # fmt: skip
        except Exception as e:  # a config that does not compile on this GPU
            rows.append({"part": part, "provider": name, "config": cfg, "error": str(e)[:60]})

    add(f"cublas+{act}", lambda: act_fn(F.linear(x, w, b)))
    add("cublas alone", lambda: F.linear(x, w, b))
    add("linear_act", lambda: linear_act(x, w, b, act), "default")
    for cfg in CONFIGS:
        add("linear_act", lambda cfg=cfg: linear_act(x, w, b, act, config=cfg), str(cfg))
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
    packed = torch.randn(b, t, 3, h, d, device="cuda", dtype=dtype).permute(2, 0, 3, 1, 4)
    backends["packed"] = "packed"
    for name, backend in backends.items():

        def run(backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v)
            if backend == "packed":
                return F.scaled_dot_product_attention(packed[0], packed[1], packed[2])
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
    p.add_argument("--gemms", nargs="+", default=["24000x1280x5120:gelu", "16384x256x2048:swish"],
                   help="rows x K x N:activation of each fc1 GEMM")  # fmt: skip
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for spec in args.gemms:
        shape, act = spec.split(":")
        m, k, n = (int(v) for v in shape.split("x"))
        rows += fc1_rows(m, k, n, act, dtype)
    rows += attention_rows(args.batch, 20, 1500, 64, dtype)
    print(f"`{environment()}`\n")
    print(markdown_table(rows, ["part", "provider", "config", "ms", "TFLOP/s", "max_err", "error"]))


if __name__ == "__main__":
    main()
