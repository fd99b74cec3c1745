"""Grid-wide primitives for persistent kernels: a self-resetting grid barrier and L2 prefetch.

A persistent kernel runs one program per SM for its whole life and separates its dependent
phases with :func:`grid_sync` instead of kernel boundaries. That is only correct when every
program of the grid is resident at once, so launchers keep the grid at or below the SM count,
one program per SM, and never run such a kernel under the interpreter (which runs programs one
after another: the first barrier would wait forever).

Barrier state is two int32 counters in device memory, zero at launch: ``BAR[0]`` counts
arrivals (barrier ``j`` of a launch waits until it reaches ``(j + 1) * num_programs``),
``BAR[1]`` counts programs that have finished waiting. :func:`grid_exit` lets the last program
to finish reset both to zero, so the next launch (a CUDA-graph replay) finds them clean with no
memset. A barrier that waits longer than ``MAX_SPIN`` polls gives up and sets ``ERR[0] = 1``
instead of hanging the GPU (the results are then garbage; the caller checks the flag in bulk).
Launchers make sure every program can be resident: :func:`resident_programs_per_sm` reads the
compiled kernel's registers, warps and shared memory.

Memory ordering: every thread's stores are ordered before the program's arrival by a CTA
barrier, the arrival is a gpu-scope release, polling is a gpu-scope acquire, and data that
other programs wrote must be read with ``cache_modifier=".cg"`` (L2, never a stale L1 line).

:func:`prefetch_l2` asks L2 to fetch the 128-byte lines of a byte range spread over the
programs (``prefetch.global.L2``), e.g. the weights of the next phase while this one computes.
"""

from __future__ import annotations

import torch

from speechrt.kernels._utils import MISSING_TL, MISSING_TRITON

try:  # Triton is optional: importing this module must not need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton, tl = MISSING_TRITON, MISSING_TL

__all__ = ["MAX_SPIN", "grid_exit", "grid_sync", "prefetch_l2", "resident_programs_per_sm"]

MAX_SPIN = 1 << 18  # polls before a barrier gives up (~0.1-0.3 s of waiting)


@triton.jit
def _fence_acquire(x):
    """gpu-scope acquire fence (ordered after the poll that produced x)."""
    return tl.inline_asm_elementwise(
        "fence.acq_rel.gpu; mov.u32 $0, $1;",
        "=r,r",
        [x],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def grid_sync(BAR, ERR, target, max_spin, SPIN: tl.constexpr = 0):
    """Arrive at the grid barrier and wait until ``BAR[0] >= target`` (all programs arrived),
    at most ``max_spin`` polls; returns whether it got there (pass 0 as ``max_spin`` to later
    barriers of a program whose barrier timed out, so a broken launch ends quickly).

    SPIN 0 polls with acquire atomics (one per program; the faster on the H200), 1 with
    volatile loads and one acquire fence after."""
    tl.debug_barrier()  # this program's stores are done
    tl.atomic_add(BAR, 1, sem="release", scope="gpu")
    if SPIN == 0:
        seen = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    else:
        seen = tl.load(BAR, volatile=True)
    spins = 0
    while (seen < target) & (spins < max_spin):
        if SPIN == 0:
            seen = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
        else:
            seen = tl.load(BAR, volatile=True)
        spins += 1
    if SPIN != 0:
        seen = _fence_acquire(seen)
    if seen < target:
        tl.atomic_xchg(ERR, 1)
    tl.debug_barrier()
    return seen >= target


@triton.jit
def grid_exit(BAR, n_programs):
    """Called once per program after its last :func:`grid_sync`: the last program to get here
    (every other one has stopped polling) resets both counters for the next launch."""
    tl.debug_barrier()
    done = tl.atomic_add(BAR + 1, 1, sem="acq_rel", scope="gpu")
    if done == n_programs - 1:
        tl.atomic_xchg(BAR, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(BAR + 1, 0, sem="relaxed", scope="gpu")


@triton.jit
def _prefetch_lines(ptrs):
    tl.inline_asm_elementwise(
        "mov.u32 $0, 0; prefetch.global.L2 [$1];", "=r,l", [ptrs],
        dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def prefetch_l2(BASE, nbytes, pid, n_programs, BLOCK: tl.constexpr):
    """Program ``pid`` of ``n_programs`` prefetches its share of the lines of the ``nbytes``
    bytes at ``BASE`` (any pointer type) into L2; returns at once (no data comes back)."""
    base = BASE.to(tl.pointer_type(tl.int8))
    lines = (nbytes + 127) // 128
    per = (lines + n_programs - 1) // n_programs
    lo = pid * per
    hi = tl.minimum(lo + per, lines)
    for start in range(lo, hi, BLOCK):
        idx = tl.minimum(start + tl.arange(0, BLOCK), hi - 1).to(tl.int64)
        _prefetch_lines(base + idx * 128)


def resident_programs_per_sm(compiled, device: torch.device) -> int:
    """How many programs of a compiled Triton kernel fit on one SM at once (registers, warps,
    shared memory), from the kernel's metadata and the device's limits."""
    compiled._init_handles()
    props = torch.cuda.get_device_properties(device)
    warps = compiled.metadata.num_warps
    regs_per_warp = -(-max(compiled.n_regs, 1) * 32 // 256) * 256  # allocation unit: 256
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    threads = getattr(props, "max_threads_per_multi_processor", 2048)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    by_smem = smem // (compiled.metadata.shared + 1024)  # 1 KB reserved per block
    return max(0, min(regs // (regs_per_warp * warps), threads // (32 * warps), by_smem, 32))
