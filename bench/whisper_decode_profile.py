"""Per-kernel GPU time of one Whisper decode step on the kernel path (random weights, FP16).

    python3 bench/whisper_decode_profile.py [--preset large-v3] [--batches 1 16] [--pos 40]
        [--skinny auto|on|off]

For each batch: one eager ``net.step`` under torch.profiler (kernels, calls, microseconds), then
the same step captured in a CUDA graph and replayed (median of CUDA-event timings): the gap
between the graph's time and the sum of kernel times is launch/scheduling overhead.
"""

from __future__ import annotations

import argparse

import torch

from speechrt.benchmark.common import cuda_time_ms, kernel_profile, markdown_table
from speechrt.benchmark.whisper import build_speechrt
from speechrt.models.whisper.config import preset


def profile_step(net, b: int, pos: int, top: int) -> None:
    dims = net.dims
    net.kernels = True
    net.setup_caches(b, dims.n_text_ctx, b)
    feats = torch.randn(b, dims.n_audio_ctx, dims.n_audio_state, device="cuda").half()
    net.set_audio(feats)
    tok = torch.randint(0, dims.n_vocab, (b, 1), device="cuda")
    positions = torch.full((b,), pos, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        rows, total_ms = kernel_profile(lambda: net.step(tok, positions))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                net.step(tok, positions)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            net.step(tok, positions)
        graph_ms = cuda_time_ms(graph.replay, warmup=5, min_iters=50)
    calls = sum(r["calls"] for r in rows)
    print(f"\n### B={b}: {calls} kernels, {total_ms:.3f} ms of kernel time; graph replay "
          f"{graph_ms:.3f} ms\n")  # fmt: skip
    print(markdown_table(rows[:top], ["kernel", "calls", "total_us", "share_%"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="large-v3")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--pos", type=int, default=40, help="cache position of the step")
    p.add_argument("--top", type=int, default=14)
    p.add_argument(
        "--skinny", choices=["auto", "on", "off"], default="auto",
        help="TextDecoder.skinny_step: the default by row count, or forced on/off",
    )  # fmt: skip
    args = p.parse_args()
    net = build_speechrt(preset(args.preset), torch.float16, "cuda", 0)
    net.decoder.skinny_step = {"auto": None, "on": True, "off": False}[args.skinny]
    for b in args.batches:
        profile_step(net, b, args.pos, args.top)


if __name__ == "__main__":
    main()
