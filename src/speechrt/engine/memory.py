"""Where an engine's weights live: tensors shared with the torch modules vs private copies.

A fused engine references a module's parameter whenever it can read it as stored (same dtype,
same layout) and keeps a private tensor otherwise (a cast, a concatenation such as Q/K/V, a
reordered projection). :func:`weight_report` walks what the engine holds and compares storages
(not tensors: slices and views of a parameter count as shared), so a benchmark can show that no
weight is held twice.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

# Per-length tables derived from the weights (``linear_pos(pe)``): a cache, not weights.
CACHE_KEYS = ("pos_proj",)


@dataclass(frozen=True)
class WeightReport:
    """Bytes (unique storages) held by an engine, against its model's parameters and buffers.

    param_bytes: the model's parameters and buffers. shared_bytes: engine tensors that are
    (views of) those. private_bytes: engine-only weight tensors; private_by_part: the same, per
    kind (block indices dropped, e.g. ``encoder.blocks.qkv_w``). cache_bytes: per-length caches.
    """

    param_bytes: int
    shared_bytes: int
    private_bytes: int
    cache_bytes: int
    private_by_part: dict[str, int] = field(default_factory=dict)

    def private_bytes_of(self, name: str) -> int:
        """Private bytes of the parts whose name contains ``name`` (e.g. ``"moe_"``)."""
        return sum(n for part, n in self.private_by_part.items() if name in part)


def held_tensors(obj: object, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor reachable from ``obj`` through dicts, lists, tuples,
    modules (parameters and buffers) and speechrt objects' attributes."""
    seen: set[int] = set()

    def walk(o: object, p: str) -> Iterator[tuple[str, torch.Tensor]]:
        if isinstance(o, torch.Tensor):
            yield p, o
            return
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, nn.Module):
            for name, t in [*o.named_parameters(), *o.named_buffers()]:
                yield f"{p}.{name}", t
        elif isinstance(o, dict):
            for k, v in o.items():
                yield from walk(v, f"{p}.{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                yield from walk(v, f"{p}.{i}")
        elif type(o).__module__.startswith("speechrt.") and hasattr(o, "__dict__"):
            for k, v in vars(o).items():
                yield from walk(v, f"{p}.{k}")

    yield from walk(obj, path)


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _part(path: str) -> str:
    """``encoder.blocks.3.qkv_w`` -> ``encoder.blocks.qkv_w``; a LayerNorm's weight/bias -> its
    norm; a module's parameters -> the module's path."""
    parts = [p for p in path.strip(".").split(".") if not re.fullmatch(r"\d+", p)]
    if len(parts) > 1 and parts[-1] in ("weight", "bias", "running_mean", "running_var"):
        parts = parts[:-1]
    return ".".join(parts)


def weight_report(module: nn.Module, parts: dict[str, object]) -> WeightReport:
    """Compare the tensors ``parts`` (name -> fused object) hold with ``module``'s storages."""
    params = dict(_storage(t) for t in [*module.parameters(), *module.buffers()])
    shared: dict[int, int] = {}
    private: dict[int, tuple[str, int]] = {}
    cache: dict[int, int] = {}
    for name, obj in parts.items():
        for path, t in held_tensors(obj, name):
            ptr, nbytes = _storage(t)
            if ptr in params:
                shared[ptr] = nbytes
            elif any(f".{k}." in f"{path}." for k in CACHE_KEYS):
                cache[ptr] = nbytes
            else:
                private.setdefault(ptr, (_part(path), nbytes))
    by_part: dict[str, int] = {}
    for part, nbytes in private.values():
        by_part[part] = by_part.get(part, 0) + nbytes
    return WeightReport(
        param_bytes=sum(params.values()),
        shared_bytes=sum(shared.values()),
        private_bytes=sum(n for _, n in private.values()),
        cache_bytes=sum(cache.values()),
        private_by_part=dict(sorted(by_part.items(), key=lambda kv: -kv[1])),
    )
