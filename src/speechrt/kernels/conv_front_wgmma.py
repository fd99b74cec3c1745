"""The Conv2d subsampling front's implicit GEMM on Hopper with conv1's ReLU under conv2's MMAs.

:mod:`speechrt.kernels.conv_subsampling` recomputes conv1 (+ bias + ReLU) for every K step of
conv2's implicit GEMM as a small GEMM on the input patch: ``h = patch @ W1[tap]`` then
``acc += relu(h) @ W2[tap]``. With ``tl.dot`` each step waits for its conv1 product, then runs the
ReLU and the rounding while the tensor cores idle; issuing the next step's conv1 product before
this step's conv2 product is 20-25 % faster but not safe in Triton 3.6 (the next ReLU can be
written into registers the in-flight conv2 MMA still reads as its A operand; BENCHMARKS.md,
session 10). This Gluon kernel (Triton's explicit-layout dialect) does that overlap safely:

* conv1 is the same 3 x 3 filter at every conv2 tap, only its input window moves: each row's
  nine tap windows (9 samples + a 1 for the bias, padded to K = 16) are gathered once into
  shared memory, and conv1 of a K step is one m64n64k16 MMA against a resident (16, C) weight
  (the Triton kernel's 7 x 7 patch needs K = 64: four times the MMA work);
* the ReLU'd conv1 tile goes to shared memory (two buffers), and conv2's warpgroup MMA reads its
  A operand from there, so no register is read asynchronously;
* per K step ``i``: issue conv1's MMA for step ``i + 1``, then conv2's MMA for step ``i``, wait
  until only the latter is in flight, apply the ReLU and rounding of step ``i + 1`` on the CUDA
  cores and store the tile to the other buffer while conv2's MMA runs;
* conv2's weights stream through a TMA ring of 4 stages, a stage refilled once the conv2 MMA
  reading it is known complete in both warpgroups.

H200, fp16, C = 256: 175.5 us at 64 x 256 frames (the session-10 version with the K = 64 conv1:
187; the Triton kernel: 239), 669 us at 64 x 1024 (BENCHMARKS.md, session 11; a fully unrolled
variant with the windows in registers ran 172 us but took 22 s to compile, this one 2 s).

Same arithmetic as the Triton kernels (float32 accumulation, conv1 rounded once after its ReLU,
conv2's bias and ReLU in float32), except that conv1's ten products are summed in another order:
a conv1 value may differ from the Triton kernel's in its last bit (the tests hold its error
against float32 to twice the Triton kernel's). Constraints (:func:`supported`):
float16/bfloat16 on compute capability 9.x, C = 64, 128 or 256. Gluon has no CPU interpreter:
the kernel is tested on the GPU only (``tests/kernels/test_conv_subsampling.py``).
"""

from __future__ import annotations

import torch

from speechrt.kernels._gluon import (
    HAVE_GLUON,
    descriptor,
    fence_async_shared,
    gl,
    gluon,
    hopper,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from speechrt.kernels._utils import cdiv

__all__ = ["conv_front_wgmma", "supported"]

BLOCK_M = 128  # output positions per program (two warpgroups of 64)
BLOCK_K = 64  # conv1 channels per K step


def supported(channels: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`conv_front_wgmma` runs this front (see the module docstring)."""
    if not hopper(device) or dtype not in (torch.float16, torch.bfloat16):
        return False
    return channels in (64, 128, 256)


if HAVE_GLUON:

    @gluon.jit
    def _tap_patch(X, MEAN, ISTD, bi, t2, f2, row_ok, sxb, sxt, sxf,
                   TAP: gl.constexpr, HAS_CMVN: gl.constexpr, blk: gl.constexpr,
                   dtype: gl.constexpr):  # fmt: skip
        """(BM, 16) conv1 A operand of conv2 tap TAP: the 3 x 3 input window (CMVN'd) of each
        row's conv1 position at that tap in columns p * 3 + q, 1 in column 9 (conv1's bias)."""
        pc = gl.arange(0, 16, layout=gl.SliceLayout(0, blk))
        p = pc // 3
        q = pc - 3 * p
        t_idx = gl.expand_dims(4 * t2 + 2 * (TAP // 3), 1) + gl.expand_dims(p, 0)
        f_idx = gl.expand_dims(4 * f2 + 2 * (TAP % 3), 1) + gl.expand_dims(q, 0)
        ok = gl.expand_dims(row_ok, 1) & gl.expand_dims(pc < 9, 0)
        ptr = (X + gl.expand_dims(bi.to(gl.int64) * sxb, 1) + t_idx.to(gl.int64) * sxt
               + f_idx.to(gl.int64) * sxf)  # fmt: skip
        v = gl.load(ptr, mask=ok, other=0.0).to(gl.float32)
        if HAS_CMVN:
            mean = gl.load(MEAN + f_idx, mask=ok, other=0.0)
            istd = gl.load(ISTD + f_idx, mask=ok, other=0.0)
            v = (v - mean) * istd
        return gl.where(gl.expand_dims(pc == 9, 0), 1.0, v).to(dtype)

    @gluon.jit
    def _issue_w2(w2_desc, step, bars, w2s, pred, NCH: gl.constexpr, BLOCK_N: gl.constexpr):
        """TMA of K step ``step``'s conv2 (64, C) tile into its stage."""
        tap = step // NCH
        k0 = (step - tap * NCH) * 64
        bar = bars.index(step % 4)
        mbarrier.expect(bar, w2_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(
            w2_desc, [tap * BLOCK_N + k0, 0], bar, w2s.index(step % 4), pred
        )

    @gluon.jit
    def _conv_front_k16_kernel(
        X, MEAN, ISTD, w1_desc, w2_desc, B2, OUT,
        M, T2F2, F2, sxb, sxt, sxf, stride_om,
        HAS_CMVN: gl.constexpr, BLOCK_N: gl.constexpr,
    ):  # fmt: skip
        BM: gl.constexpr = 128
        NCH: gl.constexpr = BLOCK_N // 64
        N_STEPS: gl.constexpr = 9 * NCH
        dtype: gl.constexpr = w2_desc.dtype
        mma1: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, 64, 16]
        )
        mma2: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, BLOCK_N, 16]
        )
        blk: gl.constexpr = gl.BlockedLayout([1, 2], [4, 8], [8, 1], [1, 0])
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, 64], dtype)
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, 16], dtype)

        w1s = gl.allocate_shared_memory(dtype, [NCH] + w1_desc.block_type.shape, w1_desc.layout)
        w2s = gl.allocate_shared_memory(dtype, [4] + w2_desc.block_type.shape, w2_desc.layout)
        a_s = gl.allocate_shared_memory(dtype, [2, BM, 64], a_layout)
        p_s = gl.allocate_shared_memory(dtype, [9, BM, 16], p_layout)
        bars = gl.allocate_shared_memory(gl.int64, [5, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(5):
            mbarrier.init(bars.index(b), count=1)
        w1bar = bars.index(4)
        mbarrier.expect(w1bar, NCH * w1_desc.block_type.nbytes)
        for ch in gl.static_range(NCH):  # conv1's (16, C) weights, resident
            tma.async_copy_global_to_shared(w1_desc, [0, ch * 64], w1bar, w1s.index(ch))
        for st in gl.static_range(3):
            _issue_w2(w2_desc, st, bars, w2s, True, NCH, BLOCK_N)

        # The nine (BM, 16) conv1 operands, gathered once into shared memory.
        rows = gl.program_id(0) * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, blk))
        row_ok = rows < M
        bi = rows // T2F2
        rem = rows - bi * T2F2
        t2 = rem // F2
        f2 = rem - t2 * F2
        for t in gl.static_range(9):
            p_s.index(t).store(
                _tap_patch(X, MEAN, ISTD, bi, t2, f2, row_ok, sxb, sxt, sxf, t, HAS_CMVN, blk,
                           dtype)
            )  # fmt: skip
        fence_async_shared()
        gl.thread_barrier()

        zero1 = gl.zeros([BM, 64], gl.float32, mma1)
        mbarrier.wait(w1bar, 0)
        mbarrier.wait(bars.index(0), 0)
        h = warpgroup_mma(p_s.index(0), w1s.index(0), zero1, use_acc=False)
        a_s.index(0).store(gl.maximum(h, 0.0).to(dtype))
        fence_async_shared()
        gl.thread_barrier()

        acc = warpgroup_mma_init(gl.zeros([BM, BLOCK_N], gl.float32, mma2))
        for i in range(N_STEPS):
            # In flight while this iteration's CUDA-core work runs: conv2 of step i. Stages:
            # i (conv2's B), i + 1 landing, i + 2 landing, i - 1 = i + 3 free once conv2 of
            # step i - 1 is known complete in both warpgroups (after the barrier below). The
            # wait leaves only conv2 of step i in flight: conv1 of step i + 1 is done, and so
            # is conv2 of step i - 1, whose A buffer (nxt % 2) takes the ReLU of step i + 1.
            nxt = i + 1
            has_next = nxt < N_STEPS  # else conv1 reads a stale stage: result unused
            mbarrier.wait(bars.index(nxt % 4), (nxt // 4) & 1, pred=has_next)
            nxt_tap = gl.minimum(nxt // NCH, 8)
            h_tok = warpgroup_mma(p_s.index(nxt_tap), w1s.index(nxt % NCH), zero1, use_acc=False,
                                  is_async=True)  # fmt: skip
            acc = warpgroup_mma(a_s.index(i % 2), w2s.index(i % 4), acc, is_async=True)
            h = warpgroup_mma_wait(1, deps=[h_tok])
            a_s.index(nxt % 2).store(gl.maximum(h, 0.0).to(dtype))
            fence_async_shared()
            gl.thread_barrier()
            _issue_w2(w2_desc, i + 3, bars, w2s, i + 3 < N_STEPS, NCH, BLOCK_N)
        acc = warpgroup_mma_wait(0, deps=[acc])

        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma2))
        out = gl.maximum(acc + gl.expand_dims(gl.load(B2 + cols), 0), 0.0)
        orow = gl.program_id(0) * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, mma2))
        optr = OUT + gl.expand_dims(orow.to(gl.int64) * stride_om, 1) + gl.expand_dims(cols, 0)
        gl.store(optr, out.to(dtype), mask=gl.expand_dims(orow < M, 1))
        for b in gl.static_range(5):
            mbarrier.invalidate(bars.index(b))


def conv_front_wgmma(x, weights, mean_t, istd_t, cmvn: bool, y, m: int, t2: int, f2: int) -> None:
    """Launch for :func:`speechrt.kernels.conv_subsampling.conv_subsampling` (its checks done):
    x (B, T, F), packed weights, float32 CMVN vectors (any tensors when ``cmvn`` is False), y
    the (B, T2, F2 * C) output."""
    c = weights.channels
    _conv_front_k16_kernel[(cdiv(m, BLOCK_M),)](
        x, mean_t, istd_t,
        descriptor(weights.w1_3x3, [16, BLOCK_K]),
        descriptor(weights.w2, [BLOCK_K, c]),
        weights.b2, y, m, t2 * f2, f2, x.stride(0), x.stride(1), x.stride(2), c,
        HAS_CMVN=cmvn, BLOCK_N=c, num_warps=8,
    )  # fmt: skip
