"""decode_attention (split-K flash-decoding over a static cache) against decode_attention_ref.

Awkward shapes: head dims that are not powers of two, cache sizes that are not multiples of the
key tile, lengths of 0 and of the full cache, groups that do not divide the batch, and forced
split counts (one split skips the combine kernel; many splits leave some empty). int8 caches:
quantize_kv against its error bound, the kernel against the reference on the same int8 values
(tight) and against the float cache they came from (the quantisation error).
"""

import pytest
import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels.decode_attention import (
    decode_attention,
    decode_attention_ref,
    default_num_splits,
    dequantize_kv,
    quantize_kv,
)

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _inputs(b, h, length, d, group, dtype, device, cache_rows=None):
    rows = cache_rows or -(-b // group)
    q = torch.randn(b, h, d, device=device).to(dtype)
    k = torch.randn(rows, h, length, d, device=device).to(dtype)
    v = torch.randn(rows, h, length, d, device=device).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b, h, length, d",
    [(1, 1, 1, 16), (3, 2, 7, 40), (5, 3, 100, 64), (2, 2, 300, 24)],
)
@pytest.mark.parametrize("splits", [1, 3, None])
def test_matches_reference_with_lengths(b, h, length, d, splits, dtype, device, check_output):
    q, k, v = _inputs(b, h, length, d, 1, dtype, device)
    lengths = torch.randint(0, length + 1, (b,), device=device)
    lengths[0] = length  # the full cache
    if b > 2:
        lengths[1] = 0  # no key at all: output 0
    out = decode_attention(q, k, v, lengths, num_splits=splits, block_n=32)
    gold = decode_attention_ref(q, k, v, lengths)
    check_output(
        out, gold, decode_attention_ref(q, k, v, lengths, upcast=False), dtype, atol=2e-5, rtol=2e-5
    )
    if b > 2:
        assert out[1].abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, group", [(6, 3), (5, 2), (4, 4), (17, 17)])
def test_groups_share_a_cache_row(b, group, dtype, device, check_output):
    """Cross-attention layout: row b reads cache row b // group, all keys (lengths None)."""
    q, k, v = _inputs(b, 2, 150, 64, group, dtype, device, cache_rows=-(-b // group) + 1)
    out = decode_attention(q, k, v, None, group=group, num_splits=3)
    gold = decode_attention_ref(q, k, v, None, group=group)
    check_output(
        out,
        gold,
        decode_attention_ref(q, k, v, None, group=group, upcast=False),
        dtype,
        atol=2e-5,
        rtol=2e-5,
    )
    lengths = torch.randint(1, 151, (b,), device=device)  # ragged lengths inside a group
    out = decode_attention(q, k, v, lengths, group=group)
    torch.testing.assert_close(
        out.float(),
        decode_attention_ref(q, k, v, lengths, group=group).float(),
        atol=2e-2 if dtype != torch.float32 else 2e-5,
        rtol=2e-2,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 4])
def test_append_writes_the_cache_then_attends(splits, dtype, device):
    """k_new/v_new land at lengths - 1 (only there) and take part in the attention."""
    b, h, length, d = 3, 2, 90, 32
    q, k, v = _inputs(b, h, length, d, 1, dtype, device)
    k_new, v_new = torch.randn(2, b, h, d, device=device).to(dtype)
    lengths = torch.tensor([1, 45, 90], device=device)
    k_ref, v_ref = k.clone(), v.clone()
    gold = decode_attention_ref(q, k_ref, v_ref, lengths, k_new=k_new, v_new=v_new)
    out = decode_attention(q, k, v, lengths, k_new=k_new, v_new=v_new, num_splits=splits)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), gold.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, group, splits", [(1, 1, 5), (4, 1, 3), (6, 3, 4), (5, 2, 2)])
def test_combine_by_the_last_split(b, group, splits, dtype, device, check_output):
    """With a counters workspace the last split program of each (cache row, head) combines:
    same result as the two-kernel path, counters back at zero, reusable (twice), also with
    ragged lengths (splits past a row's length stay empty) and appends."""
    h = 3
    q, k, v = _inputs(b, h, 200, 40, group, dtype, device)
    counters = torch.zeros(-(-b // group) * h + 2, dtype=torch.int32, device=device)
    gold = decode_attention_ref(q, k, v, None, group=group)
    loose = decode_attention_ref(q, k, v, None, group=group, upcast=False)
    for _ in range(2):
        out = decode_attention(q, k, v, None, group=group, num_splits=splits, block_n=32,
                               counters=counters)  # fmt: skip
        check_output(out, gold, loose, dtype, atol=2e-5, rtol=2e-5)
        assert not counters.any()
    two = decode_attention(q, k, v, None, group=group, num_splits=splits, block_n=32)
    torch.testing.assert_close(out, two, atol=1e-6 if dtype == torch.float32 else 1e-3, rtol=0)
    if group == 1:
        lengths = torch.randint(0, 201, (b,), device=device)
        k_new, v_new = torch.randn(2, b, h, 40, device=device).to(dtype)
        k_ref, v_ref = k.clone(), v.clone()
        lengths = lengths.clamp(min=1)
        gold = decode_attention_ref(q, k_ref, v_ref, lengths, k_new=k_new, v_new=v_new)
        out = decode_attention(q, k, v, lengths, k_new=k_new, v_new=v_new, num_splits=splits,
                               block_n=32, counters=counters)  # fmt: skip
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), gold.float(), atol=tol, rtol=tol)
        assert not counters.any() and torch.equal(k, k_ref)


def test_counters_are_checked(device):
    q, k, v = _inputs(2, 2, 100, 16, 1, torch.float32, device)
    for bad in (torch.zeros(3, dtype=torch.int32), torch.zeros(4, dtype=torch.int64)):
        with pytest.raises(ValueError, match="counters"):
            decode_attention(q, k, v, num_splits=2, block_n=32, counters=bad.to(device))


def test_strided_query_and_cache_slice(device):
    """q as a slice of a fused (B, 3 * H * D) projection; the cache a row slice of a bigger one."""
    b, h, d, length = 3, 2, 16, 40
    qkv = torch.randn(b, 3 * h * d, device=device)
    q = qkv[:, : h * d].view(b, h, d)  # (B, H, D) with row stride 3 * H * D
    k_big, v_big = torch.randn(2, 5, h, 64, d, device=device)
    k, v = k_big[:b, :, :length], v_big[:b, :, :length]  # (B, H, 40, D) views
    lengths = torch.tensor([40, 3, 17], device=device)
    out = torch.full((b, h, d), float("nan"), device=device)
    decode_attention(q, k, v, lengths, out=out)
    torch.testing.assert_close(out, decode_attention_ref(q, k, v, lengths), atol=2e-5, rtol=2e-5)


def test_default_splits_depend_on_static_shapes_only():
    cpu = torch.device("cpu")
    assert default_num_splits(1, 1500, 64, cpu) > 1  # long cross-attention, few programs
    assert default_num_splits(4096, 1500, 64, cpu) == 1  # enough programs already
    assert default_num_splits(1, 64, 64, cpu) == 1  # one tile


def test_errors(device):
    q, k, v = _inputs(4, 2, 10, 16, 1, torch.float32, device)
    with pytest.raises(ValueError, match="groups of 3"):
        decode_attention(q, k[:1], v[:1], group=3)
    with pytest.raises(ValueError, match="need group == 1"):
        decode_attention(q, k[:2], v[:2], group=2, k_new=q, v_new=q)
    with pytest.raises(UnsupportedOptionError, match="float32/float16/bfloat16"):
        decode_attention(q, k.double(), v.double())
    with pytest.raises(ValueError, match="lengths must be"):
        decode_attention(q, k, v, torch.ones(3, dtype=torch.long, device=device))


# ------------------------------------------------------------------------------ int8 caches
def _int8_cache(rows, h, length, d, device):
    """(float k, float v) (rows, H, L, D) and their quantize_kv (int8, scale) pairs; k has a
    row of zeros (scale 1, dequantized exactly 0)."""
    k, v = 2 * torch.randn(2, rows, h, length, d, device=device)
    k[0, 0, 3] = 0
    return (k, v), quantize_kv(k), quantize_kv(v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_kv_round_trip(dtype, device):
    x = (3 * torch.randn(2, 3, 17, 40, device=device)).to(dtype)
    x[1, 2, 5] = 0  # a row of zeros
    x[0, 0, 0, 7] = 1e-30 if dtype == torch.float32 else 0  # a tiny row: no overflow
    q, scale = quantize_kv(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    assert int(q.abs().max()) <= 127 and (q.abs().amax(-1) == 127).sum() == scale.numel() - 1
    err = (dequantize_kv(q, scale) - x.float()).abs()
    assert (err <= scale[..., None] * (0.5 + 1e-6)).all()
    assert torch.isfinite(scale).all() and scale[1, 2, 5] > 0 and not q[1, 2, 5].any()
    assert torch.equal(dequantize_kv(q, scale, dtype), (q.float() * scale[..., None]).to(dtype))
    # out= into rows of bigger static buffers (the decoder's caches)
    q_buf = torch.full((4, 3, 17, 40), 99, dtype=torch.int8, device=device)
    s_buf = torch.full((4, 3, 17), -1.0, device=device)
    got = quantize_kv(x, out=(q_buf[:2], s_buf[:2]))
    assert got[0].data_ptr() == q_buf.data_ptr() and got[1].data_ptr() == s_buf.data_ptr()
    assert torch.equal(q_buf[:2], q) and torch.equal(s_buf[:2], scale)
    assert (q_buf[2:] == 99).all() and (s_buf[2:] == -1).all()
    with pytest.raises(ValueError, match="out must be"):
        quantize_kv(x, out=(q_buf[:2].float(), s_buf[:2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "b, group, splits, combine_in_kernel",
    [(1, 1, 1, False), (4, 1, 3, True), (6, 3, 4, True), (5, 2, None, False)],
)
def test_int8_cache_matches_reference(b, group, splits, combine_in_kernel, dtype, device,
                                      check_output):  # fmt: skip
    """int8 caches + scales: the kernel against the reference on the same dequantized values,
    all keys (the preloaded first tile) and ragged lengths, split or not, in-kernel combine or
    the combine kernel."""
    h, length, d = 3, 150, 40
    q = torch.randn(b, h, d, device=device).to(dtype)
    _, (kq, ks), (vq, vs) = _int8_cache(-(-b // group), h, length, d, device)
    counters = torch.zeros(-(-b // group) * h, dtype=torch.int32, device=device)
    kw = dict(group=group, k_scale=ks, v_scale=vs)
    lengths = torch.randint(0, length + 1, (b,), device=device)
    for lens in (None, lengths):
        out = decode_attention(q, kq, vq, lens, num_splits=splits, block_n=32,
                               counters=counters if combine_in_kernel else None, **kw)  # fmt: skip
        gold = decode_attention_ref(q, kq, vq, lens, **kw)
        check_output(out, gold, decode_attention_ref(q, kq, vq, lens, upcast=False, **kw), dtype,
                     atol=2e-5, rtol=2e-5)  # fmt: skip
        assert out.dtype == dtype and not counters.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_cache_close_to_the_float_cache(dtype, device):
    """Against attention over the float cache the int8 one came from: within a few value
    quantisation steps (|dv| <= v_scale / 2; the keys' error moves the weights a little),
    far below the outputs' own size."""
    b, h, length, d = 4, 2, 300, 64
    q = torch.randn(b, h, d, device=device).to(dtype)
    (k, v), (kq, ks), (vq, vs) = _int8_cache(b, h, length, d, device)
    out = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, num_splits=2)
    gold = decode_attention_ref(q, k, v)
    err = float((out.float() - gold.float()).abs().max())
    assert err < 2 * float(vs.max()) < 0.5 * float(gold.abs().max())


@pytest.mark.parametrize("low, high", [(-4.0, 1.5), (-6.0, -4.0)])
def test_int8_float16_value_scales_far_apart(low, high, device, max_err):
    """float16 queries over int8 caches whose value rows span 10^low .. 10^high inside one
    tile -- all of them tiny in the second case, where value scales times probabilities would
    be float16 subnormals (so the scales must not ride on the float16 probabilities) -- and
    keys that spread the scores. Relative to the output's size, within twice torch's own
    float16 error."""
    b, h, length, d = 3, 2, 96, 64
    (k, v), _, _ = _int8_cache(b, h, length, d, device)
    sizes = torch.logspace(low, high, length, device=device)
    v = v * sizes[torch.randperm(length, device=device)][:, None]
    k[:, :, : length // 2] *= 3.0
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    q = torch.randn(b, h, d, device=device).half()
    kw = dict(k_scale=ks, v_scale=vs)
    gold = decode_attention_ref(q, kq, vq, **kw)
    size = float(gold.abs().max())
    torch_err = max_err(decode_attention_ref(q, kq, vq, upcast=False, **kw), gold) / size
    for splits in (1, 3):
        out = decode_attention(q, kq, vq, num_splits=splits, block_n=32, **kw)
        assert max_err(out, gold) / size <= 2 * torch_err + 1e-3, splits


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("stages", [1, 4])
def test_pipeline_stages_match_reference(stages, int8, device, check_output):
    """``num_stages`` (the key/value loop's software-pipeline depth; the interpreter ignores
    it) does not change results: ragged lengths ending mid-tile and at 0, several tiles per
    split, float16 and int8 caches."""
    b, h, length, d = 5, 2, 150, 64
    q = torch.randn(b, h, d, device=device).half()
    if int8:
        _, (k, ks), (v, vs) = _int8_cache(b, h, length, d, device)
        kw = dict(k_scale=ks, v_scale=vs)
    else:
        _, k, v = _inputs(b, h, length, d, 1, torch.float16, device)
        kw = {}
    lengths = torch.tensor([150, 1, 77, 0, 129], device=device)
    gold = decode_attention_ref(q, k, v, lengths, **kw)
    loose = decode_attention_ref(q, k, v, lengths, upcast=False, **kw)
    for splits in (1, 2):
        out = decode_attention(q, k, v, lengths, num_splits=splits, block_n=32,
                               num_stages=stages, **kw)  # fmt: skip
        check_output(out, gold, loose, torch.float16)
    with pytest.raises(UnsupportedOptionError, match="num_stages"):
        decode_attention(q, k, v, lengths, num_stages=0, **kw)


def test_int8_bad_inputs(device):
    q = torch.randn(2, 2, 16, device=device)
    (k, v), (kq, ks), (vq, vs) = _int8_cache(2, 2, 10, 16, device)
    with pytest.raises(ValueError, match="need k_scale and v_scale"):
        decode_attention(q, kq, vq)
    with pytest.raises(ValueError, match=r"k_scale must be a float32 \(2, 2, 10\)"):
        decode_attention(q, kq, vq, k_scale=ks[:, :, :9], v_scale=vs)
    with pytest.raises(ValueError, match="v_scale must be a float32"):
        decode_attention(q, kq, vq, k_scale=ks, v_scale=vs.half())
    with pytest.raises(ValueError, match="go with int8 caches"):
        decode_attention(q, k, v, k_scale=ks, v_scale=vs)
    with pytest.raises(UnsupportedOptionError, match="int8 k, v"):
        decode_attention(q, kq, v, k_scale=ks, v_scale=vs)
    lengths = torch.tensor([3, 10], device=device)
    with pytest.raises(UnsupportedOptionError, match="append"):
        decode_attention(q, kq, vq, lengths, k_new=q, v_new=q, k_scale=ks, v_scale=vs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 5])
def test_int8_whisper_cross_attention_shape(dtype, group, device, check_output):
    """Whisper large-v3 cross-attention: 16 rows, 20 heads of 64, 1500 audio keys in int8,
    default splits and block, in-kernel combine and the combine kernel."""
    b, h, length, d = 16, 20, 1500, 64
    rows = -(-b // group)
    q = torch.randn(b, h, d, device=device).to(dtype)
    (k, v), (kq, ks), (vq, vs) = _int8_cache(rows, h, length, d, device)
    kw = dict(group=group, k_scale=ks, v_scale=vs)
    gold = decode_attention_ref(q, kq, vq, **kw)
    loose = decode_attention_ref(q, kq, vq, upcast=False, **kw)
    counters = torch.zeros(rows * h, dtype=torch.int32, device=device)
    for c, stages in ((counters, None), (None, None), (counters, 4)):
        out = decode_attention(q, kq, vq, counters=c, num_stages=stages, **kw)
        check_output(out, gold, loose, dtype)
    float_cache = decode_attention_ref(q, k, v, group=group).float()
    assert float((out.float() - float_cache).abs().max()) < 2 * float(vs.max())
