"""Benchmark plumbing shared by the families: timing, error metrics, environment, reports."""

from __future__ import annotations

import csv
import datetime
import gc
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg")


def audio_files(folder: str | Path) -> list[Path]:
    """The audio files of ``folder`` (by suffix), sorted by name; an error when there is none."""
    files = sorted(f for f in Path(folder).iterdir() if f.suffix in AUDIO_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no audio files in {folder}")
    return files


def cuda_time_ms(
    fn: Callable[[], object],
    warmup: int = 3,
    min_iters: int = 10,
    budget_s: float = 0.5,
    max_iters: int = 200,
) -> float:
    """Median milliseconds of ``fn`` from CUDA events, after ``warmup`` calls.

    Without CUDA (CPU smoke runs) it times with the host clock instead."""
    if not torch.cuda.is_available():
        import time

        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    spent = 0.0
    while len(times) < min_iters or (spent < budget_s * 1000 and len(times) < max_iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        t = start.elapsed_time(end)
        times.append(t)
        spent += t
    times.sort()
    return times[len(times) // 2]


def graph_ms_per_call(calls: list[Callable[[], object]], reps: int = 30) -> float:
    """Milliseconds per call: the calls captured in one CUDA graph (after one warm-up call
    each), median of ``reps`` replays from CUDA events / number of calls. Needs CUDA."""
    for fn in calls:  # compile and warm up outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            for fn in calls:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / len(calls)


def sync_cuda() -> None:
    """Wait for the GPU, a no-op without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def strict_fp32():
    """Context: cuDNN convolutions without TF32 (they default to TF32), for FP32 references."""
    return torch.backends.cudnn.flags(
        enabled=True, benchmark=False, deterministic=False, allow_tf32=False
    )


def error_stats(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(a0, r0): max absolute error and median relative error (|d| / max(|ref|, 1e-6))."""
    out, ref = out.double().flatten(), ref.double().flatten()
    diff = (out - ref).abs()
    rel = diff / ref.abs().clamp_min(1e-6)
    return float(diff.max()), float(rel.median())


def valid_rows(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenate x[b, :lengths[b]] over the batch -> (sum(lengths), ...)."""
    return torch.cat([x[b, : int(n)] for b, n in enumerate(lengths.tolist())], dim=0)


def environment() -> dict:
    """GPU name, versions, commit and date for the report header."""
    import triton

    commit = "unknown"
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or commit
        )
    except OSError:
        pass
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": os.environ.get("SPEECHRT_COMMIT", commit),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


class PeakMemory:
    """Peak CUDA memory of a measurement above a baseline taken at construction (before the
    model was built): ``reset()`` before the measurement, ``peak_mib()`` after. None on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.base = torch.cuda.memory_allocated() if self.cuda else 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self.base) / 2**20


def free_cuda_cache(device: str) -> None:
    """Collect unreachable objects (an engine and its captured graphs form reference cycles,
    which would otherwise be freed in the middle of the next model's memory measurements), then
    return cached CUDA blocks to the driver (between models); no CUDA work on CPU."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def graph_pool_bytes() -> int:
    """Bytes the caching allocator holds in CUDA-graph private pools (segments outside the
    default pool), 0 without CUDA."""
    if not torch.cuda.is_available():
        return 0
    return sum(
        s["total_size"]
        for s in torch.cuda.memory_snapshot()
        if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0)
    )


def kernel_profile(fn: Callable[[], object], warmup: int = 3) -> tuple[list[dict], float]:
    """Per-kernel CUDA time of one call of ``fn`` (after ``warmup`` calls): rows of kernel,
    calls, total_us, share_% (largest first) and the total milliseconds."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if us > 0 and not ev.key.startswith("ProfilerStep"):
            rows.append({"kernel": ev.key[:80], "calls": ev.count, "total_us": us})
    total = sum(r["total_us"] for r in rows)
    rows.sort(key=lambda r: -r["total_us"])
    for r in rows:
        r["share_%"] = 100.0 * r["total_us"] / total if total else 0.0
    return rows, total / 1000.0


def set_encoder_options(encoder, options: tuple[tuple[str, bool], ...]) -> None:
    """Flip a fused encoder's kernel switches (before its first capture) for a comparison run."""
    from speechrt.engine.runner import ENCODER_SWITCHES

    for name, value in options:
        if name not in ENCODER_SWITCHES:
            raise ValueError(f"unknown encoder switch '{name}' ({', '.join(ENCODER_SWITCHES)})")
        setattr(encoder, name, value)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
