"""decode_attention (split-K flash-decoding over a static cache) against decode_attention_ref.

Awkward shapes: head dims that are not powers of two, cache sizes that are not multiples of the
key tile, lengths of 0 and of the full cache, groups that do not divide the batch, and forced
split counts (one split skips the combine kernel; many splits leave some empty).
"""

import pytest
import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels.decode_attention import (
    decode_attention,
    decode_attention_ref,
    default_num_splits,
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
