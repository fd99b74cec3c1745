"""Whisper encoder (random FP16 weights of a preset's dims): latency of the kernel path under each
combination of its switches (``EncoderOptions``), of the default switches replayed from a CUDA
graph, and of the torch path; then the GPU time per kernel (torch.profiler) of the default
kernel path. Run on a CUDA machine:

    PYTHONPATH=src python3 bench/whisper_encoder_profile.py [--preset large-v3] [--batches 1 16]
        [--top 12]

``ms``: median of CUDA-event timings of one ``embed_audio`` (B x 30 s) after warm-up;
``max_diff`` / ``mean_diff``: |output - the default kernel path's output| (the default's own
run-to-run noise is 0: same kernels, same order).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch
from torch.profiler import ProfilerActivity, profile

from speechrt.benchmark.common import cuda_time_ms, environment, markdown_table
from speechrt.benchmark.whisper import build_speechrt
from speechrt.engine.graphs import GraphRunner
from speechrt.models.whisper.config import preset
from speechrt.models.whisper.model import EncoderOptions


def variants() -> list[tuple[str, bool, EncoderOptions | None]]:
    """(name, kernel path, options): every switch combination, then the torch path."""
    names = [f.name for f in dataclasses.fields(EncoderOptions)]
    out = []
    for values in itertools.product((True, False), repeat=len(names)):
        opts = EncoderOptions(**dict(zip(names, values)))
        label = ", ".join(f"{n}={'on' if v else 'off'}" for n, v in zip(names, values))
        out.append((f"kernels: {label}", True, opts))
    out.append(("torch path", False, None))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="large-v3")
    p.add_argument("--batches", type=int, nargs="+", default=[16])
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    net = build_speechrt(preset(args.preset), torch.float16, "cuda", 0)
    print(f"`{environment()}`\n")
    for b in args.batches:
        mel = torch.randn(b, net.dims.n_mels, 3000, device="cuda", dtype=torch.float16)
        rows = []
        with torch.inference_mode():
            net.kernels, net.encoder.options = True, EncoderOptions()
            default = net.embed_audio(mel).float()
            for name, kernels, opts in variants():
                net.kernels = kernels
                if opts is not None:
                    net.encoder.options = opts
                ms = cuda_time_ms(lambda mel=mel: net.embed_audio(mel), warmup=2, min_iters=5)
                diff = (net.embed_audio(mel).float() - default).abs()
                rows.append({"batch": b, "variant": name, "ms": ms, "max_diff": diff.max().item(),
                             "mean_diff": diff.mean().item()})  # fmt: skip
            net.kernels, net.encoder.options = True, EncoderOptions()
            graphs = GraphRunner(net.embed_audio)
            ms = cuda_time_ms(lambda g=graphs, m=mel: g(0, m), warmup=2, min_iters=5)
            rows.append({"batch": b, "variant": "kernels, default options, CUDA graph", "ms": ms})
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                net.embed_audio(mel)
                torch.cuda.synchronize()
        print(markdown_table(rows, ["batch", "variant", "ms", "max_diff", "mean_diff"]))
        events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in events) / 1000
        print(f"\nDefault kernel path, B={b}: {total:.2f} ms of GPU time; top kernels:\n")
        top = [{"ms": e.self_device_time_total / 1000, "calls": e.count, "kernel": e.key[:90]}
               for e in events[: args.top]]  # fmt: skip
        print(markdown_table(top, ["ms", "calls", "kernel"]) + "\n")


if __name__ == "__main__":
    main()
