"""Tests of speechrt.kernels.attention against its plain-torch references (WeNet's formula).

CPU runs use Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported); set
SPEECHRT_TEST_DEVICE=cuda to run the same tests compiled on a GPU.
"""

from __future__ import annotations

import os

if os.environ.get("SPEECHRT_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from speechrt.errors import UnsupportedOptionError  # noqa: E402
from speechrt.kernels import attention as attn_mod  # noqa: E402
from speechrt.kernels.attention import (  # noqa: E402
    AttentionConfig,
    attention,
    attention_ref,
    rel_pos_attention,
    rel_pos_attention_ref,
    visibility_mask,
)

SMALL = AttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}


def _qkv(b, tq, tk, h, d, dtype, device, seed):
    """q (B, Tq, H, Dk), k, v (B, Tk, H, Dk) as strided views, like a fused QKV GEMM output."""
    g = torch.Generator().manual_seed(seed)
    if tq == tk:
        qkv = torch.randn(b, tk, 3, h, d, generator=g).to(device=device, dtype=dtype)
        return qkv.unbind(2)  # each (B, T, H, Dk), strides (T*3*H*Dk, 3*H*Dk, Dk, 1)
    q = torch.randn(b, h, tq, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    kv = torch.randn(b, tk, 2, h, d, generator=g).to(device=device, dtype=dtype)
    k, v = kv.unbind(2)
    return q, k, v


def _pos(tk, h, d, dtype, device, seed):
    """p (Tk, H, Dk) and pos_bias_u, pos_bias_v (H, Dk)."""
    g = torch.Generator().manual_seed(seed + 1)
    p = torch.randn(tk, h, d, generator=g)
    u = 0.5 * torch.randn(h, d, generator=g)
    bv = 0.5 * torch.randn(h, d, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (p, u, bv))


def _lengths(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _ragged(b, t):
    """Key lengths with a full row, a one-key row and an empty row (in that order)."""
    return [t, 1, 0][:b]


# --------------------------------------------------------------------------------------------
# Exact parity (float32)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "t", "h", "d", "config"),
    [
        (1, 1, 2, 16, None),
        (2, 5, 4, 32, None),
        (3, 17, 2, 16, SMALL),
        (2, 40, 4, 16, None),
        (3, 40, 2, 32, SMALL),
        (2, 19, 4, 36, None),  # head dim of the shipped default model (d=144, 4 heads): padded
        (2, 9, 3, 24, SMALL),
        (1, 6, 2, 8, None),
    ],
)
@pytest.mark.parametrize("ragged", [False, True])
def test_rel_pos_attention_matches_ref(device, b, t, h, d, config, ragged):
    q, k, v = _qkv(b, t, t, h, d, torch.float32, device, seed=t + d)
    p, u, bv = _pos(t, h, d, torch.float32, device, seed=t)
    lengths = _lengths(_ragged(b, t) if ragged else [t] * b, device)
    out = rel_pos_attention(q, k, v, p, u, bv, lengths, config=config)
    ref = rel_pos_attention_ref(q, k, v, p, u, bv, lengths)
    assert out.shape == (b, t, h, d) and out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **FP32_TOL)
    if ragged and b == 3:
        assert torch.count_nonzero(out[2]) == 0  # key length 0: every row masked -> zeros


@pytest.mark.parametrize("num_left_chunks", [-1, 0, 1, 2])
@pytest.mark.parametrize(("t", "chunk_size", "lengths"), [(40, 8, [40, 23]), (17, 5, [17, 3, 0])])
def test_chunk_mask_matches_ref(device, t, chunk_size, lengths, num_left_chunks):
    b, h, d = len(lengths), 2, 16
    q, k, v = _qkv(b, t, t, h, d, torch.float32, device, seed=3)
    p, u, bv = _pos(t, h, d, torch.float32, device, seed=3)
    key_len = _lengths(lengths, device)
    kw = {"chunk_size": chunk_size, "num_left_chunks": num_left_chunks}
    out = rel_pos_attention(q, k, v, p, u, bv, key_len, config=SMALL, **kw)
    ref = rel_pos_attention_ref(q, k, v, p, u, bv, key_len, **kw)
    torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize(
    ("tq", "chunk_size", "num_left_chunks"), [(8, 0, -1), (8, 8, 2), (5, 5, 1)]
)
def test_key_offset_streaming_equals_full(device, tq, chunk_size, num_left_chunks):
    """Queries = the last Tq of Tk keys (cache + new chunk) give the full run's last Tq rows."""
    b, tk, h, d = 2, 40, 2, 16
    q, k, v = _qkv(b, tk, tk, h, d, torch.float32, device, seed=5)
    p, u, bv = _pos(tk, h, d, torch.float32, device, seed=5)
    key_len = _lengths([tk, tk], device)
    kw = {"chunk_size": chunk_size, "num_left_chunks": num_left_chunks}
    full = rel_pos_attention(q, k, v, p, u, bv, key_len, config=SMALL, **kw)
    step = rel_pos_attention(
        q[:, -tq:], k, v, p, u, bv, key_len, key_offset=tk - tq, config=SMALL, **kw
    )
    ref = rel_pos_attention_ref(q, k, v, p, u, bv, key_len, **kw)[:, -tq:]
    torch.testing.assert_close(step, full[:, -tq:], **FP32_TOL)
    torch.testing.assert_close(step, ref, **FP32_TOL)


@pytest.mark.parametrize(
    ("b", "tq", "tk", "causal", "query_offset", "lengths"),
    [
        (2, 17, 17, True, 0, [17, 9]),  # decoder self-attention over padded hypotheses
        (3, 5, 5, True, 0, [5, 1, 0]),
        (2, 17, 40, False, 0, [40, 23]),  # cross-attention over encoder memory lengths
        (2, 5, 17, True, 12, [17, 15]),  # cached decoder steps: queries are keys 12..16
    ],
)
@pytest.mark.parametrize("d", [16, 36])
def test_attention_matches_ref(device, b, tq, tk, causal, query_offset, lengths, d):
    h = 4
    q, k, v = _qkv(b, tq, tk, h, d, torch.float32, device, seed=tq + tk)
    key_len = _lengths(lengths, device)
    kw = {"causal": causal, "query_offset": query_offset}
    out = attention(q, k, v, key_len, config=SMALL, **kw)
    ref = attention_ref(q, k, v, key_len, **kw)
    torch.testing.assert_close(out, ref, **FP32_TOL)


def test_empty_inputs(device):
    q, k, v = _qkv(2, 5, 0, 2, 16, torch.float32, device, seed=19)  # no keys at all
    out = attention(q, k, v, _lengths([0, 0], device))
    assert out.shape == (2, 5, 2, 16) and torch.count_nonzero(out) == 0
    torch.testing.assert_close(out, attention_ref(q, k, v, _lengths([0, 0], device)))
    q0 = q[:, :0]  # no queries
    assert attention(q0, q0, q0, _lengths([0, 0], device)).shape == (2, 0, 2, 16)


def test_causal_step_equals_last_row_of_full(device):
    b, t, h, d = 2, 17, 2, 32
    q, k, v = _qkv(b, t, t, h, d, torch.float32, device, seed=11)
    key_len = _lengths([t, t], device)
    full = attention(q, k, v, key_len, causal=True)
    step = attention(q[:, -1:], k, v, key_len, causal=True, query_offset=t - 1)
    torch.testing.assert_close(step, full[:, -1:], **FP32_TOL)


# --------------------------------------------------------------------------------------------
# Half precision: at most twice PyTorch's own same-dtype error against an fp32 reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["rel_pos", "causal"])
def test_half_precision_error_bound(device, dtype, op):
    b, t, h, d = 2, 40, 2, 32
    q, k, v = _qkv(b, t, t, h, d, dtype, device, seed=7)
    key_len = _lengths([t, 23], device)
    if op == "rel_pos":
        p, u, bv = _pos(t, h, d, dtype, device, seed=7)
        args, kw = (q, k, v, p, u, bv, key_len), {"chunk_size": 8, "num_left_chunks": 1}
        kernel, ref = rel_pos_attention, rel_pos_attention_ref
    else:
        args, kw = (q, k, v, key_len), {"causal": True}
        kernel, ref = attention, attention_ref
    out = kernel(*args, **kw)
    exact = ref(*args, upcast=True, **kw).float()
    torch_same_dtype = ref(*args, upcast=False, **kw).float()
    assert out.dtype == dtype
    err = (out.float() - exact).abs().max().item()
    torch_err = (torch_same_dtype - exact).abs().max().item()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)


def test_tf32_dots_keep_bfloat16_probabilities_finer(device):
    """tf32_dots: k + p and the probabilities are not rounded to bfloat16 before the products,
    so the output is closer to the exact result of the same bfloat16 inputs (the rest of the
    error is the output's own rounding); float32 inputs are unaffected."""
    b, t, h, d = 2, 48, 2, 32
    q, k, v = _qkv(b, t, t, h, d, torch.bfloat16, device, seed=11)
    p, u, bv = _pos(t, h, d, torch.bfloat16, device, seed=11)
    key_len = _lengths([t, 29], device)
    args = (q, k, v, p, u, bv, key_len)
    exact = rel_pos_attention_ref(*args, upcast=True).float()
    errors = {}
    for tf32 in (False, True):
        out = rel_pos_attention(*args, tf32_dots=tf32)
        assert out.dtype == torch.bfloat16
        errors[tf32] = (out.float() - exact).abs().mean().item()
    assert errors[True] < 0.75 * errors[False], errors
    args32 = tuple(x.float() if x.is_floating_point() else x for x in args)
    torch.testing.assert_close(
        rel_pos_attention(*args32, tf32_dots=True), rel_pos_attention(*args32)
    )


# --------------------------------------------------------------------------------------------
# Every output element written; padded keys never read
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["rel_pos", "plain"])
def test_poisoned_output_fully_written(device, op):
    b, t, h, d = 3, 17, 2, 16
    q, k, v = _qkv(b, t, t, h, d, torch.float32, device, seed=13)
    key_len = _lengths([17, 4, 0], device)
    out = torch.full((b, t, h, d), float("nan"), device=device)
    if op == "rel_pos":
        p, u, bv = _pos(t, h, d, torch.float32, device, seed=13)
        got = rel_pos_attention(q, k, v, p, u, bv, key_len, config=SMALL, out=out)
        ref = rel_pos_attention_ref(q, k, v, p, u, bv, key_len)
    else:
        got = attention(q, k, v, key_len, causal=True, config=SMALL, out=out)
        ref = attention_ref(q, k, v, key_len, causal=True)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize("op", ["rel_pos", "plain"])
def test_output_ignores_padded_key_content(device, op):
    """Garbage in padded keys/values changes nothing (inf values: padded rows are never read)."""
    b, t, h, d = 2, 40, 2, 16
    q, k, v = _qkv(b, t, t, h, d, torch.float32, device, seed=17)
    key_len = _lengths([40, 19], device)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[1, 19:] = 1e30
    v_bad[1, 19:] = float("inf")
    if op == "rel_pos":
        p, u, bv = _pos(t, h, d, torch.float32, device, seed=17)
        clean = rel_pos_attention(q, k, v, p, u, bv, key_len, config=SMALL)
        dirty = rel_pos_attention(q, k_bad, v_bad, p, u, bv, key_len, config=SMALL)
    else:
        clean = attention(q, k, v, key_len, config=SMALL)
        dirty = attention(q, k_bad, v_bad, key_len, config=SMALL)
    assert torch.equal(clean, dirty)


# --------------------------------------------------------------------------------------------
# The algebra and the masks, independent of the kernel
# --------------------------------------------------------------------------------------------


def test_rewrite_equals_wenet_two_matrix_formula_float64():
    """((q+u).k + (q+v).p) == q.(k+p) + (u.k + v.p), WeNet's ac + bd, in float64."""
    g = torch.Generator().manual_seed(0)
    b, tq, tk, h, d = 2, 7, 9, 3, 16
    q = torch.randn(b, tq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, tk, h, d, generator=g, dtype=torch.float64)
    p = torch.randn(tk, h, d, generator=g, dtype=torch.float64)
    u = torch.randn(h, d, generator=g, dtype=torch.float64)
    bv = torch.randn(h, d, generator=g, dtype=torch.float64)
    matrix_ac = torch.einsum("bihd,bjhd->bhij", q + u, k)  # (B, H, Tq, Tk)
    matrix_bd = torch.einsum("bihd,jhd->bhij", q + bv, p)  # (B, H, Tq, Tk)
    k_eff = k + p  # (B, Tk, H, Dk)
    bias = torch.einsum("hd,bjhd->bhj", u, k) + torch.einsum("hd,jhd->hj", bv, p)  # (B, H, Tk)
    rewritten = torch.einsum("bihd,bjhd->bhij", q, k_eff) + bias[:, :, None, :]
    torch.testing.assert_close(rewritten, matrix_ac + matrix_bd, atol=1e-12, rtol=1e-12)


def _wenet_chunk_mask(size, chunk_size, num_left_chunks):
    """Row-by-row transcription of WeNet's subsequent_chunk_mask (the obvious oracle)."""
    ret = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        start = (
            0 if num_left_chunks < 0 else max((i // chunk_size - num_left_chunks) * chunk_size, 0)
        )
        ending = min((i // chunk_size + 1) * chunk_size, size)
        ret[i, start:ending] = True
    return ret


@pytest.mark.parametrize(("size", "chunk_size"), [(17, 5), (16, 4), (3, 8)])
@pytest.mark.parametrize("num_left_chunks", [-1, 0, 1, 2])
def test_visibility_mask_matches_wenet(size, chunk_size, num_left_chunks):
    lengths = torch.tensor([size, max(size - 4, 0), 0])
    got = visibility_mask(
        lengths, size, size, chunk_size=chunk_size, num_left_chunks=num_left_chunks
    )
    pad = torch.arange(size)[None, :] < lengths[:, None]  # (B, Tk)
    want = _wenet_chunk_mask(size, chunk_size, num_left_chunks)[None] & pad[:, None, :]
    assert torch.equal(got, want)


def test_visibility_mask_causal_with_offset():
    got = visibility_mask(torch.tensor([6]), 2, 6, causal=True, query_offset=3)
    want = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(got[0], want)


def test_reference_zeroes_fully_masked_rows():
    q = k = v = torch.randn(1, 3, 1, 16)
    out = attention_ref(q, k, v, torch.tensor([0]))
    assert torch.count_nonzero(out) == 0
    scale = 1.0 / math.sqrt(16)
    single = attention_ref(q, k, v, torch.tensor([1]), scale=scale)
    torch.testing.assert_close(single, v[:, :1].expand(1, 3, 1, 16))  # one key -> its value


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_unsupported_head_dim_raises(device):
    q = torch.zeros(1, 4, 2, 264, device=device)
    with pytest.raises(UnsupportedOptionError, match="head dims"):
        attention(q, q, q, _lengths([4], device))


def test_shape_mismatch_raises(device):
    q = torch.zeros(1, 4, 2, 16, device=device)
    k = torch.zeros(1, 4, 3, 16, device=device)
    with pytest.raises(ValueError, match="do not match"):
        attention(q, k, k, _lengths([4], device))
    p = torch.zeros(5, 2, 16, device=device)
    u = torch.zeros(2, 16, device=device)
    with pytest.raises(ValueError, match=r"p must be \(Tk, H, Dk\)"):
        rel_pos_attention(q, q, q, p, u, u, _lengths([4], device))


def test_missing_triton_raises(monkeypatch):
    monkeypatch.setattr(attn_mod, "_attention_fwd_kernel", None)
    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(UnsupportedOptionError, match="triton"):
        attention(q, q, q, torch.tensor([4]))


# --------------------------------------------------------------------------------------------
# GPU: Conformer-sized shapes, compiled kernel (run with -m gpu on the device machine)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("t", "d", "chunk_size"), [(1024, 64, 0), (300, 128, 16), (256, 64, 0)])
def test_gpu_conformer_shapes(dtype, t, d, chunk_size):
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs CUDA and the compiled (non-interpreted) kernel")
    b, h = 8, 4
    q, k, v = _qkv(b, t, t, h, d, dtype, "cuda", seed=t)
    p, u, bv = _pos(t, h, d, dtype, "cuda", seed=t)
    g = torch.Generator().manual_seed(t)
    key_len = torch.randint(t // 2, t + 1, (b,), generator=g).cuda()
    args, kw = (q, k, v, p, u, bv, key_len), {"chunk_size": chunk_size, "num_left_chunks": 2}
    out = rel_pos_attention(*args, **kw)
    exact = rel_pos_attention_ref(*args, **kw).float()
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)
        tf32 = rel_pos_attention(*args, allow_tf32=True, **kw)
        torch.testing.assert_close(tf32, exact, atol=2e-2, rtol=2e-2)
    else:
        torch_err = (rel_pos_attention_ref(*args, upcast=False, **kw).float() - exact).abs().max()
        err = (out.float() - exact).abs().max()
        assert err <= 2 * torch_err + 1e-3, (err.item(), torch_err.item())
