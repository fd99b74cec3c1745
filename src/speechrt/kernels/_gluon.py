"""Gluon (Triton's explicit-layout dialect) for the Hopper kernels: guarded imports, helpers.

Gluon ships with Triton >= 3.5 and has no CPU interpreter; the kernels that use it run only on
compute capability 9.x and are tested on the GPU. Without Gluon every name below is None and
:data:`HAVE_GLUON` is False, so the modules import anywhere and their ``supported`` checks say no.
``SPEECHRT_GLUON=0`` in the environment (read at each launch) turns them all off: the Triton
kernels they replace run instead (Gluon's API is young; a Triton release can change it).
"""

from __future__ import annotations

import os

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )

    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the Triton build
    gluon = gl = fence_async_shared = mbarrier = tma = None
    warpgroup_mma = warpgroup_mma_init = warpgroup_mma_wait = None
    HAVE_GLUON = False

__all__ = [
    "HAVE_GLUON",
    "descriptor",
    "fence_async_shared",
    "gl",
    "gluon",
    "hopper",
    "mbarrier",
    "tma",
    "warpgroup_mma",
    "warpgroup_mma_init",
    "warpgroup_mma_wait",
]


def hopper(device: torch.device) -> bool:
    """Whether the Gluon kernels run on ``device``: Gluon present, compute capability 9.x, and
    not switched off by ``SPEECHRT_GLUON=0``."""
    if not HAVE_GLUON or torch.device(device).type != "cuda":
        return False
    if os.environ.get("SPEECHRT_GLUON", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def descriptor(t: torch.Tensor, block: list[int]):
    """A TMA tensor descriptor of ``t`` with ``block`` boxes in the default NVMMA shared layout
    (the widest swizzle the box allows)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dtypes = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}
    layout = gl.NVMMASharedLayout.get_default_for(block, dtypes[t.dtype])
    return TensorDescriptor.from_tensor(t, block, layout)
