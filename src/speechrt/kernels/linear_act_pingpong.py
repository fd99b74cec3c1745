"""``act(x @ W^T + b)`` at K = 256 on Hopper: a warp-specialised ping-pong GEMM (Gluon).

The Conformer's FFN w1 (256 -> 2048 + swish) has four 64-deep K steps per output tile: a GEMM
whose warps run each tile's epilogue (bias, activation, rounding, store) after its MMAs leaves
the tensor cores idle for a large share of the time (the Triton ``linear_act``: ~340 TFLOP/s
at 16k rows on the H200). Here one program per SM owns a 256-column block of the output:

* a producer warp loads the (256, K) block of W into shared memory once (its first K chunk,
  then the first x tile, then the other chunks, one barrier each) and streams the
  (64, K) row tiles of x through three slots (TMA, one mbarrier per slot and direction);
* two consumer warpgroups take alternate row tiles; a turn barrier lets one issue its tile's
  warpgroup MMAs (m64n256k16, accumulator in registers) only after the other has issued its
  own, so one consumer's epilogue runs on the CUDA cores while the other's MMAs run;
* the epilogue writes the (64, 256) output tile into the x slot its MMAs just consumed and
  TMA-stores it from there, then frees the slot.

Same arithmetic as ``linear_act`` (float32 accumulation, bias and activation in float32, one
rounding). :func:`supported` says where it runs (half precision, compute capability 9.x, K = 256,
output in x's dtype, at least one tile per SM); :func:`speechrt.kernels.linear_act.linear_act`
takes it there by default. Gluon has no CPU interpreter: the kernel is tested on the GPU only
(``tests/kernels/test_linear_act.py``), against the same reference as the Triton kernels.
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
    warpgroup_mma_wait,
)
from speechrt.kernels._utils import cdiv, sm_count

__all__ = ["linear_act_pingpong", "supported"]

BM = 64  # rows per consumer tile
BN = 256  # output columns per program (its W block)
K = 256  # the x slot that stages an output tile holds (64, K) = (64, BN) half values


def supported(x2d: torch.Tensor, weight: torch.Tensor, y2d: torch.Tensor) -> bool:
    """Whether :func:`linear_act_pingpong` computes this problem (see the module docstring)."""
    if not hopper(x2d.device):
        return False
    if x2d.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x2d.dtype:
        return False
    m, k = x2d.shape
    n = weight.shape[0]
    if k != K or n % 8 or y2d.dtype != x2d.dtype:
        return False
    for t in (x2d, weight, y2d):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return cdiv(m, BM) * cdiv(n, BN) >= sm_count(x2d.device)


if HAVE_GLUON:

    @gluon.jit
    def _act(h, ACT: gl.constexpr):
        # Codes of speechrt.kernels._activations: 0 none, 1 swish, 2 relu, 3 gelu, 4 fast swish.
        if ACT == 4:  # x * (0.5 + 0.5 tanh(x / 2)), tanh by the special-function unit
            t = gl.inline_asm_elementwise(
                "tanh.approx.f32 $0, $1;", "=f,f", [h * 0.5], dtype=gl.float32, is_pure=True, pack=1
            )
            h = h * (0.5 + 0.5 * t)
        elif ACT == 1:
            h = h / (1.0 + gl.exp(-h))
        elif ACT == 2:
            h = gl.maximum(h, 0.0)
        elif ACT == 3:
            h = 0.5 * h * (1.0 + gl.erf(h * 0.7071067811865476))
        return h

    @gluon.jit
    def _producer(
        x_desc,
        w_desc,
        xbufs,
        wbufs,
        x_full,
        x_empty,
        w_full,
        col0,
        first,
        n_tiles,
        KT: gl.constexpr,
    ):
        # W's first K chunk, the first x tile, then W's other chunks, each chunk with its own
        # barrier: the first MMAs start once 64 KB have landed instead of 160 KB.
        mbarrier.expect(w_full.index(0), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [col0, 0], w_full.index(0), wbufs.index(0))
        mbarrier.expect(x_full.index(0), KT * x_desc.block_type.nbytes)
        for kk in gl.static_range(KT):  # tile 0 (n_tiles >= 1) into slot 0, free at the start
            tma.async_copy_global_to_shared(
                x_desc, [first * 64, kk * 64], x_full.index(0), xbufs.index(kk)
            )
        for kk in gl.static_range(1, KT):
            bar = w_full.index(kk)
            mbarrier.expect(bar, w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [col0, kk * 64], bar, wbufs.index(kk))
        for i in range(1, n_tiles):
            s = i % 3
            mbarrier.wait(x_empty.index(s), ((i // 3) & 1) ^ 1)
            bar = x_full.index(s)
            mbarrier.expect(bar, KT * x_desc.block_type.nbytes)
            for kk in gl.static_range(KT):
                tma.async_copy_global_to_shared(
                    x_desc, [(first + i) * 64, kk * 64], bar, xbufs.index(s * KT + kk)
                )

    @gluon.jit
    def _consumer(
        C: gl.constexpr,
        x_desc,
        y_desc,
        xbufs,
        wbufs,
        x_full,
        x_empty,
        w_full,
        turn,
        bias_ptr,
        N,
        col0,
        first,
        n_tiles,
        HAS_BIAS: gl.constexpr,
        ACT: gl.constexpr,
        KT: gl.constexpr,
    ):
        mma: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16]
        )
        zero = gl.zeros([64, 256], gl.float32, mma)
        if HAS_BIAS:
            cols = col0 + gl.arange(0, 256, layout=gl.SliceLayout(0, mma))
            bias = gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)
        for i in range(C, n_tiles, 2):
            s = i % 3
            k = i // 2
            mbarrier.wait(x_full.index(s), (i // 3) & 1)
            mbarrier.wait(turn.index(C), (k & 1) ^ (1 - C))
            mbarrier.wait(w_full.index(0), 0)  # W's chunks land once: later waits pass at once
            tok = warpgroup_mma(
                xbufs.index(s * KT),
                wbufs.index(0).permute((1, 0)),
                zero,
                use_acc=False,
                is_async=True,
            )
            for kk in gl.static_range(1, KT):
                mbarrier.wait(w_full.index(kk), 0)
                tok = warpgroup_mma(
                    xbufs.index(s * KT + kk), wbufs.index(kk).permute((1, 0)), tok, is_async=True
                )
            mbarrier.arrive(turn.index(1 - C))  # the other consumer's MMAs may queue now
            acc = warpgroup_mma_wait(0, deps=[tok])
            if HAS_BIAS:
                acc = acc + gl.expand_dims(bias, 0)
            out = _act(acc, ACT).to(y_desc.dtype)
            # The slot's x tile is consumed: it stages the (64, 256) output tile.
            c_smem = xbufs.index(s * KT)._reinterpret(y_desc.dtype, [64, 256], y_desc.layout)
            c_smem.store(out)
            fence_async_shared()
            gl.thread_barrier()
            tma.async_copy_shared_to_global(y_desc, [(first + i) * 64, col0], c_smem)
            tma.store_wait(pendings=0)
            gl.thread_barrier()
            mbarrier.arrive(x_empty.index(s))

    @gluon.jit
    def _pingpong_kernel(
        x_desc,
        w_desc,
        y_desc,
        bias_ptr,
        M,
        N,
        HAS_BIAS: gl.constexpr,
        ACT: gl.constexpr,
        KT: gl.constexpr,
    ):
        dtype: gl.constexpr = x_desc.dtype
        xbufs = gl.allocate_shared_memory(dtype, [3 * KT, 64, 64], x_desc.layout)
        wbufs = gl.allocate_shared_memory(dtype, [KT, 256, 64], w_desc.layout)
        x_full = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        x_empty = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        w_full = gl.allocate_shared_memory(gl.int64, [KT, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(3):
            mbarrier.init(x_full.index(b), count=1)
            mbarrier.init(x_empty.index(b), count=1)
        for b in gl.static_range(KT):
            mbarrier.init(w_full.index(b), count=1)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        fence_async_shared()

        # Programs split over column blocks, then over the row tiles of their block.
        col_blocks = gl.cdiv(N, 256)
        tiles_m = gl.cdiv(M, 64)
        per_col = gl.num_programs(0) // col_blocks
        pid = gl.program_id(0)
        cb = pid // per_col
        j = pid - cb * per_col
        first = j * tiles_m // per_col
        n_tiles = (j + 1) * tiles_m // per_col - first
        col0 = cb * 256
        # The consumers' argument tuples differ only in their first element; they are spelled out
        # because a tuple built by `+` in a Gluon kernel loses its constexpr elements (KT).
        gl.warp_specialize(
            [
                (
                    _consumer,
                    (
                        0,
                        x_desc,
                        y_desc,
                        xbufs,
                        wbufs,
                        x_full,
                        x_empty,
                        w_full,
                        turn,
                        bias_ptr,
                        N,
                        col0,
                        first,
                        n_tiles,
                        HAS_BIAS,
                        ACT,
                        KT,
                    ),
                ),
                (
                    _consumer,
                    (
                        1,
                        x_desc,
                        y_desc,
                        xbufs,
                        wbufs,
                        x_full,
                        x_empty,
                        w_full,
                        turn,
                        bias_ptr,
                        N,
                        col0,
                        first,
                        n_tiles,
                        HAS_BIAS,
                        ACT,
                        KT,
                    ),
                ),
                (
                    _producer,
                    (
                        x_desc,
                        w_desc,
                        xbufs,
                        wbufs,
                        x_full,
                        x_empty,
                        w_full,
                        col0,
                        first,
                        n_tiles,
                        KT,
                    ),
                ),
            ],
            [4, 1],
            [224, 40],
        )


def linear_act_pingpong(x2d, weight, bias, y2d, act: int) -> torch.Tensor:
    """``y2d = act(x2d @ weight^T + bias)`` (act: an ``_activations`` code) where
    :func:`supported` allows it."""
    m, _ = x2d.shape
    n = weight.shape[0]
    col_blocks = cdiv(n, BN)
    per_col = max(1, min(sm_count(x2d.device) // col_blocks, cdiv(m, BM)))
    _pingpong_kernel[(per_col * col_blocks,)](
        descriptor(x2d, [BM, 64]), descriptor(weight, [BN, 64]), descriptor(y2d, [BM, BN]),
        bias if bias is not None else weight, m, n,
        HAS_BIAS=bias is not None, ACT=act, KT=K // 64, num_warps=4,
    )  # fmt: skip
    return y2d
