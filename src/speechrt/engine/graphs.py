"""CUDA graphs captured per bucket, with an eager mode that runs the very same step function.

A :class:`GraphRunner` wraps ``fn(*inputs) -> output(s)``. On CUDA it captures one graph per bucket
key (static input buffers, warm-up on a side stream, capture, replay); elsewhere, or with
``enabled=False``, it calls ``fn`` directly, so a bug reproduces without graphs. Inputs are copied
into the static buffers with ``copy_`` (shape must equal the bucket's); outputs are the graph's
static tensors, valid until the next replay of that bucket, so callers copy what they keep.

With ``copy_inputs=False`` the caller's tensors ARE the static buffers: they are captured as
given and must be passed again (the same tensor objects) with that key, so replays copy
nothing. Non-tensor inputs (ints, flags) are passed through; they are constant per key.

With ``share_pool=True`` every graph of the runner allocates from one memory pool (made at the
first capture), so the runner holds the largest graph's temporaries, not their sum; an output
is then valid only until the next replay of ANY key of the runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: object
    capture_s: float


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager_calls: int = 0
    capture_seconds: dict = field(default_factory=dict)
    capture_failure: str | None = None


class GraphRunner:
    """Bucketed CUDA-graph replay of ``fn``; see the module docstring."""

    def __init__(
        self,
        fn: Callable,
        enabled: bool = True,
        warmup: int = 2,
        pool=None,
        copy_inputs: bool = True,
        share_pool: bool = False,
    ):
        """``warmup``: eager calls before a capture (0 for a ``fn`` that is not idempotent,
        e.g. a permutation applied in place); ``pool``: a graph memory pool to share;
        ``share_pool``: one pool for all of this runner's graphs (see the module docstring)."""
        self.fn = fn
        self.enabled = enabled
        self.warmup = warmup
        self.pool = pool
        self.share_pool = share_pool
        self.copy_inputs = copy_inputs
        self.graphs: dict[object, _Captured] = {}
        self.stats = GraphStats()

    def clear(self) -> None:
        """Drop every captured graph (e.g. after buffers they read were reallocated)."""
        self.graphs.clear()
        if self.share_pool:
            self.pool = None  # a fresh pool for the next captures; the old one goes with them

    def _use_graphs(self, inputs) -> bool:
        return (
            self.enabled
            and all(not isinstance(t, torch.Tensor) or t.is_cuda for t in inputs)
            and any(isinstance(t, torch.Tensor) for t in inputs)
        )

    def capture(self, key, *inputs: torch.Tensor) -> _Captured:
        """Capture ``fn`` for this bucket (warm-up included); returns the captured entry."""
        t0 = time.perf_counter()
        if self.share_pool and self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static = tuple(
            t.clone() if self.copy_inputs and isinstance(t, torch.Tensor) else t for t in inputs
        )
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*static)
        torch.cuda.synchronize()
        entry = _Captured(graph, static, output, time.perf_counter() - t0)
        self.graphs[key] = entry
        self.stats.captures += 1
        self.stats.capture_seconds[key] = entry.capture_s
        return entry

    def __call__(self, key, *inputs: torch.Tensor):
        if not self._use_graphs(inputs):
            self.stats.eager_calls += 1
            return self.fn(*inputs)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.capture(key, *inputs)
            except RuntimeError as e:  # an op that cannot be captured: stay eager, say why
                torch.cuda.synchronize()
                self.enabled = False
                self.stats.capture_failure = f"{type(e).__name__}: {e}"[:300]
                self.stats.eager_calls += 1
                return self.fn(*inputs)
        for dst, src in zip(entry.inputs, inputs):
            if isinstance(dst, torch.Tensor) and dst is not src:
                dst.copy_(src)
        entry.graph.replay()
        self.stats.replays += 1
        return entry.output
