"""MoE routing and grouped-GEMM kernels against a slow per-row float64 oracle and the ``_ref``s.

Routing: every row's experts and gates match the oracle (float64 softmax of the logits, top-k,
optional renormalisation); large logits stay finite. Experts: random, skewed, all-to-one-expert
and empty-expert assignments, odd sizes, k = 1 and 2, three activations and three dtypes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels.moe import (
    GemmConfig,
    moe_experts,
    moe_experts_ref,
    moe_route,
    moe_route_ref,
    moe_sort,
    moe_sort_ref,
)
from speechrt.layers.moe import MoEFeedForward

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
ACT64 = {
    "swish": lambda h: h * torch.sigmoid(h),
    "relu": torch.relu,
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / 2**0.5)),
}


def _oracle_route(x, w, b, emb, top_k, renorm):
    """Row by row in float64: softmax over all experts, the top_k largest, optional renorm."""
    idx, val = [], []
    for t in range(x.shape[0]):
        r = x[t].double() if emb is None else torch.cat([emb[t].double(), x[t].double()])
        z = r @ w.double() + (b.double() if b is not None else 0)
        p = torch.exp(z - z.max())
        p = p / p.sum()
        order = sorted(range(z.numel()), key=lambda e: (-float(z[e]), e))[:top_k]
        g = p[order]
        idx.append(order)
        val.append((g / g.sum() if renorm else g).tolist())
    return torch.tensor(idx), torch.tensor(val, dtype=torch.float64)


def _oracle_experts(x, idx, gate, w1, b1, w2, b2, act):
    """Row by row in float64: sum over the row's slots of gate * expert(x)."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for s in range(idx.shape[1]):
            e = int(idx[t, s])
            h = ACT64[act](w1[e].double() @ x[t].double() + b1[e].double())
            y = w2[e].double() @ h + b2[e].double()
            out[t] += (1.0 if gate is None else float(gate[t, s])) * y
    return out


def _router(n, d, de, e, device, scale=0.3, bias=True):
    x = torch.randn(n, d, device=device)
    emb = torch.randn(n, de, device=device) if de else None
    w = torch.randn(de + d, e, device=device) * scale
    b = torch.randn(e, device=device) if bias else None
    return x, emb, w, b


def _experts(e, d, h, device, dtype=torch.float32):
    w1 = torch.randn(e, h, d, device=device) / d**0.5
    b1 = torch.randn(e, h, device=device) * 0.1
    w2 = torch.randn(e, d, h, device=device) / h**0.5
    b2 = torch.randn(e, d, device=device) * 0.1
    return [t.to(dtype) for t in (w1, b1, w2, b2)]


@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("e, top_k, renorm", [(1, 1, False), (4, 1, False), (8, 2, True),
                                              (33, 3, False), (5, 2, False)])
@pytest.mark.parametrize("de", [0, 24])
def test_route_matches_oracle(n, e, top_k, renorm, de, device):
    x, emb, w, b = _router(n, 40, de, e, device)
    res = moe_route(x, w, b, emb, top_k, renorm, return_logits=True)
    ref = moe_route_ref(x, w, b, emb, top_k, renorm)
    idx, val = _oracle_route(x.cpu(), w.cpu(), b.cpu(), None if emb is None else emb.cpu(),
                             top_k, renorm)
    assert res.gate_idx.dtype == torch.int32 and res.gate_val.dtype == torch.float32
    assert torch.equal(res.gate_idx.long().cpu(), idx)
    assert torch.equal(ref.gate_idx.cpu(), idx)
    torch.testing.assert_close(res.gate_val.double().cpu(), val, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ref.gate_val.double().cpu(), val, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.logits, ref.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_half_inputs_accumulate_in_fp32(dtype, device):
    x, emb, w, b = _router(50, 64, 48, 6, device)
    x, emb, w = x.to(dtype), emb.to(dtype), w.to(dtype)
    res = moe_route(x, w, b, emb, return_logits=True)
    ref = moe_route_ref(x, w, b, emb)  # float32 math on the same half values
    torch.testing.assert_close(res.logits, ref.logits, atol=1e-4, rtol=1e-5)
    assert torch.equal(res.gate_idx.long(), ref.gate_idx)


def test_route_large_logits_stay_finite(device):
    """Logits of +-1e4 overflow a softmax that does not subtract the row max first."""
    x, emb, w, b = _router(33, 16, 8, 6, device, scale=2e3, bias=False)
    res = moe_route(x, w, None, emb, top_k=2, return_logits=True)
    assert res.logits.abs().max() > 1e3
    assert torch.isfinite(res.gate_val).all()
    idx, val = _oracle_route(x.cpu(), w.cpu(), None, emb.cpu(), 2, False)
    assert torch.equal(res.gate_idx.long().cpu(), idx)
    torch.testing.assert_close(res.gate_val.double().cpu(), val, atol=1e-6, rtol=0)


def test_route_ties_pick_lowest_expert(device):
    """An untrained (all-zero) router: every logit ties, torch.max picks expert 0 at 1/E."""
    x = torch.randn(9, 16, device=device)
    res = moe_route(x, torch.zeros(16, 5, device=device), top_k=2)
    assert res.gate_idx.cpu().tolist() == [[0, 1]] * 9
    torch.testing.assert_close(res.gate_val, torch.full((9, 2), 0.2, device=device))


def test_moe_sort(device):
    idx = torch.tensor([[3, 0], [3, 1], [0, 3], [1, 0], [3, 2]], device=device)
    for sort in (moe_sort, moe_sort_ref):
        order, offsets = sort(idx, 6)
        assert order.dtype == offsets.dtype == torch.int32
        assert offsets.cpu().tolist() == [0, 3, 5, 6, 10, 10, 10]
        assert order.cpu().tolist() == [1, 4, 7, 3, 6, 9, 0, 2, 5, 8]


@pytest.mark.parametrize("n, e", [
    (1, 1), (37, 5), (3000, 33), (1500, 200),
    pytest.param(100_000, 32, marks=pytest.mark.gpu),  # 391 blocks
    pytest.param(200_000, 64, marks=pytest.mark.gpu),  # torch fallback
])
def test_moe_sort_is_a_stable_counting_sort(n, e, device):
    """Several blocks of the single-program sort, skewed ids, empty experts."""
    idx = torch.randint(0, e, (n,), device=device)
    idx[: n // 2] = e // 2  # half on one expert
    order, offsets = moe_sort(idx.view(-1, 1), e)
    ref_order, ref_offsets = moe_sort_ref(idx.view(-1, 1), e)
    assert torch.equal(offsets.cpu(), ref_offsets.cpu())
    assert torch.equal(order.cpu(), ref_order.cpu())


def _assignment(kind, n, e, k, device):
    if kind == "random":
        idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    elif kind == "skewed":  # ~90% of rows on expert 1
        idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
        hot = torch.rand(n) < 0.9
        idx[hot, 0] = 1
        idx[hot, 1:] = torch.where(idx[hot, 1:] == 1, 0, idx[hot, 1:])
    elif kind == "one_expert":  # every row (and slot) on the last expert
        idx = torch.full((n, k), e - 1)
    else:  # "empty": experts 0 and 2 never chosen
        pool = torch.tensor([1, 3, 4])
        idx = torch.stack([pool[torch.randperm(3)[:k]] for _ in range(n)])
    gate = torch.rand(n, k)
    return idx.to(device), gate.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "skewed", "one_expert", "empty"])
@pytest.mark.parametrize("n, k", [(1, 1), (67, 1), (40, 2)])
def test_experts(n, k, kind, dtype, device, check_output):
    e, d, h = 5, 40, 48
    w1, b1, w2, b2 = _experts(e, d, h, device)
    x = torch.randn(n, d, device=device)
    idx, gate = _assignment(kind, n, e, k, device)
    half = [t.to(dtype) for t in (x, w1, b1, w2, b2)]
    y = moe_experts(half[0], idx, gate, *half[1:], "swish")
    assert y.shape == (n, d) and y.dtype == dtype
    gold = moe_experts_ref(x, idx, gate, w1, b1, w2, b2, "swish", upcast=True)
    check_output(y, gold, moe_experts_ref(half[0], idx, gate, *half[1:], "swish"), dtype,
                 atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["random", "skewed", "one_expert", "empty"])
@pytest.mark.parametrize("n, k", [(67, 1), (40, 2)])
def test_experts_persistent(n, k, kind, dtype, device, check_output):
    """The persistent grouped GEMMs (a few programs walking every (row, column) tile; two under
    the interpreter) equal the reference on the same assignments as the tiled kernels."""
    e, d, h = 5, 40, 48
    w1, b1, w2, b2 = _experts(e, d, h, device)
    x = torch.randn(n, d, device=device)
    idx, gate = _assignment(kind, n, e, k, device)
    half = [t.to(dtype) for t in (x, w1, b1, w2, b2)]
    cfg = GemmConfig(16, 32, 32, 4, 2, per_sm=1)
    y = moe_experts(half[0], idx, gate, *half[1:], "swish", _config=cfg)
    gold = moe_experts_ref(x, idx, gate, w1, b1, w2, b2, "swish", upcast=True)
    check_output(y, gold, moe_experts_ref(half[0], idx, gate, *half[1:], "swish"), dtype,
                 atol=2e-5, rtol=1e-5)


def test_gemm_config_grid(device):
    tiled = GemmConfig(64, 128, 64, 4, 3)
    assert tiled.grid(10, 4, torch.device(device)) == ((10, 4), 0)
    assert str(tiled) == "m64n128k64w4s3"
    persistent = GemmConfig(64, 128, 64, 4, 3, per_sm=2)
    assert str(persistent) == "m64n128k64w4s3p2"
    # one grid whatever the tile count: PROGRAMS (compile-time) never changes with the batch
    grids = {persistent.grid(r, c, torch.device(device)) for r, c in ((1, 1), (10, 4), (999, 8))}
    assert len(grids) == 1
    (programs,), constant = grids.pop()
    assert programs == constant >= 1


@pytest.mark.parametrize("act", ["swish", "relu", "gelu"])
def test_experts_and_ref_match_oracle(act, device):
    e, d, h, n = 4, 24, 40, 13
    w1, b1, w2, b2 = _experts(e, d, h, device)
    x = torch.randn(n, d, device=device)
    idx, gate = _assignment("empty" if act == "relu" else "random", n, 5, 2, device)
    idx = idx.clamp(max=e - 1)
    gold = _oracle_experts(x.cpu(), idx.cpu(), gate.cpu(), w1.cpu(), b1.cpu(), w2.cpu(),
                           b2.cpu(), act)
    for y in (moe_experts(x, idx, gate, w1, b1, w2, b2, act),
              moe_experts_ref(x, idx, gate, w1, b1, w2, b2, act)):
        torch.testing.assert_close(y.double().cpu(), gold, atol=2e-5, rtol=1e-5)


def test_experts_without_bias_or_gate_and_leading_dims(device):
    e, d, h = 3, 17, 33
    w1, _, w2, _ = _experts(e, d, h, device)
    x = torch.randn(2, 9, d, device=device)  # (B, T, D)
    idx = torch.randint(0, e, (18, 1), device=device)
    y = moe_experts(x, idx, None, w1, None, w2, None, "relu")
    assert y.shape == (2, 9, d)
    torch.testing.assert_close(y, moe_experts_ref(x, idx, None, w1, None, w2, None, "relu"),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_experts_float32_output(k, device):
    """out_dtype=float32 from half inputs: the gated down-projection accumulator unrounded,
    equal to the float32 computation on the same half inputs (hidden rounded to half)."""
    e, d, h, n = 4, 24, 40, 21
    w1, b1, w2, b2 = _experts(e, d, h, device)
    idx, gate = _assignment("random", n, e, k, device)
    half = [t.to(torch.float16) for t in (torch.randn(n, d, device=device), w1, b1, w2, b2)]
    y = moe_experts(half[0], idx, gate, *half[1:], "swish", out_dtype=torch.float32)
    assert y.dtype == torch.float32
    up = torch.einsum("nd,nhd->nh", half[0].float().repeat_interleave(k, 0),
                      half[1].float()[idx.reshape(-1)]) + half[2].float()[idx.reshape(-1)]
    hid = torch.nn.functional.silu(up).half().float()  # (N*K, H), rounded as the kernel does
    down = torch.einsum("nh,ndh->nd", hid, half[3].float()[idx.reshape(-1)])
    down = (down + half[4].float()[idx.reshape(-1)]) * gate.reshape(-1, 1)
    gold = down.view(n, k, d).sum(1)
    torch.testing.assert_close(y, gold, atol=2e-4, rtol=1e-4)


def test_experts_empty_input(device):
    w1, b1, w2, b2 = _experts(3, 8, 16, device)
    x = torch.zeros(0, 8, device=device)
    y = moe_experts(x, torch.zeros(0, 1, dtype=torch.long, device=device), None, w1, b1, w2, b2)
    assert y.shape == (0, 8)


def test_bad_inputs(device):
    w1, b1, w2, b2 = _experts(3, 8, 16, device)
    x = torch.randn(4, 8, device=device)
    idx = torch.zeros(4, 1, dtype=torch.long, device=device)
    with pytest.raises(UnsupportedOptionError, match="activation"):
        moe_experts(x, idx, None, w1, b1, w2, b2, "tanh")
    with pytest.raises(ValueError, match="W1 expects"):
        moe_experts(torch.randn(4, 9, device=device), idx, None, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(x, torch.randn(8, 3, device=device), top_k=4)
    with pytest.raises(ValueError, match="router weight"):
        moe_route(x, torch.randn(9, 3, device=device))


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["3m", "wenet"])
def test_layer_kernel_path_equals_torch_path(style, dtype, device, check_output):
    kw = (dict(d_embed=12, top_k=1) if style == "3m" else dict(top_k=2, renormalize=True))
    layer = MoEFeedForward(20, 36, 6, activation="swish", backend="torch", **kw).to(device)
    x = torch.randn(3, 11, 20, device=device)
    emb = torch.randn(3, 11, 12, device=device) if style == "3m" else None
    gold = layer(x, emb)
    layer = layer.to(dtype)
    torch_half = layer(x.to(dtype), None if emb is None else emb.to(dtype))
    layer.backend = "triton"
    assert layer.uses_kernel(x)
    y = layer(x.to(dtype), None if emb is None else emb.to(dtype))
    check_output(y, gold, torch_half, dtype, atol=2e-5, rtol=1e-5)


def test_conformer_moe_fixture_through_kernels(shared, device, monkeypatch):
    """The 3M-ASR fixture's encoder with the Triton MoE path, at the fixture's tolerances."""
    import speechrt

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convs on CUDA
    d = shared / "fixtures" / "conformer_moe"
    ref = dict(np.load(d / "reference.npz"))
    atol = json.loads(str(ref.pop("meta_json")))["atol"]
    model = speechrt.load_model(d, device=device)
    for ff in model.net.moe_layers():
        ff.backend = "triton"
    feats = torch.from_numpy(ref["feats_cmvn"]).to(device)
    lens = torch.from_numpy(ref["feats_lengths"]).long().to(device)
    with torch.inference_mode():
        out, out_lens = model.net.encoder(feats, lens, pad_mode="wenet")
        out, logits = out.cpu(), model.net.ctc(out).cpu()
    assert out_lens.tolist() == ref["out_lens"].tolist()
    for b, n in enumerate(out_lens.tolist()):
        np.testing.assert_allclose(out[b, :n], ref["encoder_hidden"][b, :n],
                                   atol=atol["encoder_hidden"], rtol=0)
        np.testing.assert_allclose(logits[b, :n], ref["encoder_out_nosm"][b, :n],
                                   atol=atol["encoder_out_nosm"], rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [206, 4096])
@pytest.mark.parametrize("config", [None, GemmConfig(64, 128, 64, 4, 3, per_sm=1),
                                    GemmConfig(128, 128, 64, 8, 3, per_sm=1)])
def test_conformer_size_experts(n, config, dtype, device, check_output):
    """Seed-sized experts, default and persistent tiles (at 4096 rows the persistent programs
    walk several tiles each)."""
    if config is not None and dtype == torch.float32:
        pytest.skip("persistent tiles are a half-precision choice")
    e, d, h = 32, 512, 1024
    w1, b1, w2, b2 = _experts(e, d, h, device)
    x, emb, w, _ = _router(n, d, d, e, device, scale=0.05, bias=False)
    r = moe_route(x, w, None, emb)
    half = [t.to(dtype) for t in (x, w1, b1, w2, b2)]
    y = moe_experts(half[0], r.gate_idx, r.gate_val, *half[1:], _config=config)
    gold = moe_experts_ref(x, r.gate_idx, r.gate_val, w1, b1, w2, b2, upcast=True)
    torch_half = moe_experts_ref(half[0], r.gate_idx, r.gate_val, *half[1:])
    check_output(y, gold, torch_half, dtype, atol=1e-4, rtol=1e-4)


def test_import_without_triton(import_without_triton):
    mod = import_without_triton("speechrt.kernels.moe")
    x = torch.randn(6, 8)
    w1, b1, w2, b2 = _experts(3, 8, 16, "cpu")
    r = mod.moe_route_ref(x, torch.randn(8, 3))
    assert mod.moe_experts_ref(x, r.gate_idx, r.gate_val, w1, b1, w2, b2).shape == (6, 8)
    with pytest.raises(UnsupportedOptionError, match="triton"):
        mod.moe_route(x, torch.randn(8, 3))
    with pytest.raises(UnsupportedOptionError, match="triton"):
        mod.moe_experts(x, r.gate_idx, None, w1, b1, w2, b2)
