"""Programmatic dependent launch (PDL) for chains of dependent kernels.

A decode step is a chain of small dependent kernels (GEMVs, decode attention): each waits for
the previous one to finish, then pays its own launch and memory ramp, a few microseconds that
dominate kernels moving 3-13 MB. With PDL (Hopper and newer) a kernel is launched while its
predecessor still runs: it issues the loads that do not depend on the predecessor (weights)
and then blocks in :func:`gdc_wait` until the predecessor has completed and its writes are
visible. Kernels call :func:`gdc_launch_dependents` right AFTER their wait, so that at most two
kernels of the chain are resident: called before it, every queued kernel could launch at once and
their waiting programs could take the SMs from the one running (a B=16 step ran 1.3x slower on the
H200). CUDA graphs capture these launches as programmatic edges.

Rules for a kernel that takes ``USE_PDL``: before ``gdc_wait`` it writes nothing and reads only
memory that the kernel launched just before it does not write (weights, biases, LayerNorm
parameters, attention caches filled by earlier kernels): that kernel is the only one that can
still be running, since it released this one only after its own wait for the one before.
Launched without the attribute (``USE_PDL`` off, a pre-Hopper GPU, the interpreter) both calls
are no-ops.

``SPEECHRT_PDL=0`` in the environment turns it off (read at each launch, so benchmarks can
compare both ways in one process).
"""

from __future__ import annotations

import functools
import os

import torch

from speechrt.kernels._utils import MISSING_TL, MISSING_TRITON, interpreting, sm_count

try:  # Triton is optional: importing this module must not need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton, tl = MISSING_TRITON, MISSING_TL

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # older Triton (or none): kernels keep USE_PDL off
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


__all__ = ["gdc_launch_dependents", "gdc_wait", "pdl_enter", "pdl_kwargs", "pdl_supported"]


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """The first statement of a kernel that reads nothing before it: wait for the kernel before
    it (``gdc_wait``), then release the next (``gdc_launch_dependents``). Only the launch and
    the program's start overlap the previous kernel, which is what kernels of many waves (the
    encoder's GEMMs, LayerNorms, convolutions) can use: the next kernel launches once every
    program of this one has started."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def _launch_option_exists() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - Triton without the NVIDIA backend
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__


@functools.cache
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_supported(device: torch.device) -> bool:
    """True when kernels on ``device`` can launch with PDL: a CUDA device of compute capability
    9.0+, a Triton with grid dependency control, not the interpreter, ``SPEECHRT_PDL`` not 0."""
    if device.type != "cuda" or interpreting() or not HAS_GDC:
        return False
    if os.environ.get("SPEECHRT_PDL", "1") == "0" or not _launch_option_exists():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_ok(index)


def pdl_kwargs(device: torch.device, work: int | None = None) -> dict:
    """Launch keywords for a kernel with a ``USE_PDL`` constexpr: ``USE_PDL`` and, when
    supported, ``launch_pdl``. ``work``: the launch's tiles of work (its programs, or the
    tiles a persistent kernel walks); more than the GPU has SMs launch without PDL -- kernels of
    several waves gained nothing from it (H200, Conformer encoder with PDL on every kernel:
    1-3 % slower at 4,032-16,320 rows, 3-8 % faster at 1,008 and 255)."""
    if pdl_supported(device) and (work is None or work <= sm_count(device)):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}
