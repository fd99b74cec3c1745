"""Benchmark plumbing shared by the families: timing, error metrics, environment, reports."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch


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
