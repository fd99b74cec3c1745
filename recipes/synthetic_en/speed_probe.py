"""Training-speed probe: milliseconds per step and audio seconds per second for several batch sizes.

Answers "is training launch-bound or GPU-bound, and what batch size uses the GPU?" before a long
run is spent on a guess. Uses the recipe's own data loader, model, loss and optimizer step::

    python -m recipes.synthetic_en.speed_probe --data out/synthetic_en/data \
        --max-frames 60000 150000 --steps 20

For each ``--max-frames`` (padded frames per batch): a fresh model, ``--warmup`` untimed steps,
then ``--steps`` timed steps (wall clock with a synchronize at the end), and, on CUDA, the summed
kernel time of two profiled steps (``GPU busy``): when it is far below the wall time, the step is
bound by the host launching kernels and a larger batch is nearly free.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from recipes.synthetic_en.train import (
    _optimizer,
    add_dropout,
    chunk_size,
    load_split,
    make_batches,
    train_step,
)
from recipes.synthetic_en.wenet_dir import PRESETS, TrainingConf, build_model, build_train_yaml


def _gpu_busy_ms(fn, steps: int = 2) -> float:
    """Summed device time of the kernels of ``steps`` calls, per call (ms)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / 1000 / steps


def probe(data: Path, max_frames: int, steps: int, warmup: int, preset: str, fused: bool,
          device: torch.device, train) -> dict[str, float]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    conf = TrainingConf(amp_dtype="bf16", max_frames_in_batch=max_frames)
    _, net = build_model(build_train_yaml(PRESETS[preset], conf))
    net = net.to(device)
    add_dropout(net, conf.dropout)
    net.train()
    opt = _optimizer(net, conf, fused=fused)
    fill = net.encoder.cmvn_mean.detach().float()
    gen = torch.Generator(device=device).manual_seed(0)
    batches = make_batches(train.lengths_cpu, max_frames, rng)
    amp = torch.bfloat16 if device.type == "cuda" else None
    frames = 0

    def step():
        nonlocal frames
        idx = batches.pop()
        frames += int(train.lengths_cpu[idx].sum())
        train_step(net, opt, train.batch(idx), 1e-4, conf, fill, gen, chunk_size(rng), amp)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    frames = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    row = {"max_frames": max_frames, "fused_adamw": fused, "ms_per_step": wall * 1000,
           "audio_s_per_s": frames / 100 / (wall * steps)}
    if device.type == "cuda":
        row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        row["gpu_busy_ms"] = _gpu_busy_ms(step)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--max-frames", type=int, nargs="+", default=[60000, 150000])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--max-train-utts", type=int, default=8000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train = load_split(args.data / "train", device, args.max_train_utts)
    for mf in args.max_frames:
        for fused in ([False, True] if device.type == "cuda" else [False]):
            row = probe(args.data, mf, args.steps, args.warmup, args.preset, fused, device, train)
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
