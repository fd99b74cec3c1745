"""MoEFeedForward's torch path against per-frame float64 oracles of 3M-ASR's and WeNet's MoE."""

from __future__ import annotations

import pytest
import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.layers.moe import MoEFeedForward, moe_ffn_ref, router_aux_losses

ACT64 = {"swish": lambda h: h * torch.sigmoid(h), "relu": torch.relu}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _expert64(layer: MoEFeedForward, e: int, x: torch.Tensor) -> torch.Tensor:
    h = layer.w1[e].double() @ x
    if layer.b1 is not None:
        h = h + layer.b1[e].double()
    y = layer.w2[e].double() @ ACT64[layer.activation](h)
    return y + layer.b2[e].double() if layer.b2 is not None else y


def _oracle_3m(layer: MoEFeedForward, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """SpeechMoE, frame by frame: p = softmax([e, x] W); k = argmax p; y = p_k * expert_k(x)."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        r = torch.cat([emb[t].double(), x[t].double()])
        z = r @ layer.router_weight.double()
        if layer.router_bias is not None:
            z = z + layer.router_bias.double()
        p = torch.softmax(z, dim=0)
        k = int(torch.argmax(p))
        gate = float(p[k]) if layer.scale_by_gate else 1.0
        out[t] = gate * _expert64(layer, k, x[t].double())
    return out


def _oracle_wenet(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """WeNet's MoEFFNLayer, frame by frame: top-k of the logits, softmax over those k."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        z = x[t].double() @ layer.router_weight.double()
        top = torch.topk(z, layer.top_k)
        w = torch.softmax(top.values, dim=0)
        for s in range(layer.top_k):
            out[t] += float(w[s]) * _expert64(layer, int(top.indices[s]), x[t].double())
    return out


@torch.no_grad()
@pytest.mark.parametrize("act", ["swish", "relu"])
@pytest.mark.parametrize("scale_by_gate, router_bias", [(True, False), (False, True)])
def test_3m_routing_matches_oracle(act, scale_by_gate, router_bias):
    layer = MoEFeedForward(20, 36, 5, d_embed=12, activation=act, router_bias=router_bias,
                           scale_by_gate=scale_by_gate, backend="torch")
    with torch.no_grad():  # a sharper router, so no two experts are near a tie
        layer.router_weight.mul_(8)
    x, emb = torch.randn(2, 9, 20), torch.randn(2, 9, 12)
    y = layer(x, emb)
    assert y.shape == (2, 9, 20) and not layer.uses_kernel(x)
    gold = _oracle_3m(layer, x.reshape(-1, 20), emb.reshape(-1, 12))
    torch.testing.assert_close(y.reshape(-1, 20).double(), gold, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_wenet_topk_renormalised_matches_oracle(top_k):
    layer = MoEFeedForward(16, 24, 6, top_k=top_k, renormalize=True, bias=False,
                           activation="relu", backend="torch")
    x = torch.randn(3, 7, 16)
    gold = _oracle_wenet(layer, x.reshape(-1, 16))
    torch.testing.assert_close(layer(x).reshape(-1, 16).double(), gold, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_empty_and_single_expert_batches():
    layer = MoEFeedForward(8, 16, 4, d_embed=4, backend="torch")
    with torch.no_grad():  # the embedding alone decides: rows 0..3 route expert e to e
        layer.router_weight.zero_()
        layer.router_weight[:4] = torch.eye(4) * 50
    emb = torch.zeros(1, 5, 4)
    emb[..., 2] = 1.0  # every frame to expert 2; experts 0, 1, 3 stay empty
    x = torch.randn(1, 5, 8)
    gold = _oracle_3m(layer, x[0], emb[0])
    torch.testing.assert_close(layer(x, emb)[0].double(), gold, atol=1e-6, rtol=1e-6)
    r = layer.route(x, emb)
    assert r.gate_idx.flatten().tolist() == [2] * 5


def test_half_precision_keeps_dtype():
    layer = MoEFeedForward(16, 32, 4, d_embed=8, backend="torch").half()
    x, emb = torch.randn(2, 3, 16).half(), torch.randn(2, 3, 8).half()
    with torch.no_grad():
        y = layer(x, emb)
        gold = layer.float()(x.float(), emb.float())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), gold, atol=2e-2, rtol=2e-2)


def test_moe_ffn_ref_is_the_layer_formula():
    layer = MoEFeedForward(8, 12, 3, d_embed=5, backend="torch")
    x, emb = torch.randn(4, 8), torch.randn(4, 5)
    with torch.no_grad():
        y = moe_ffn_ref(x, emb, layer.router_weight, None, layer.w1, layer.b1, layer.w2,
                        layer.b2)
        torch.testing.assert_close(y, layer(x, emb))


def test_router_aux_losses_match_3m_definitions():
    logits = torch.randn(7, 4) * 2
    p = torch.softmax(logits.double(), dim=-1)
    l1 = sum(float((p[t] / p[t].norm()).abs().sum()) for t in range(7)) / 7
    imp = 4 * sum(float(p[:, e].mean()) ** 2 for e in range(4))
    got = router_aux_losses(logits)
    assert float(got[0]) == pytest.approx(l1, abs=1e-6)
    assert float(got[1]) == pytest.approx(imp, abs=1e-6)


def test_bad_arguments():
    with pytest.raises(UnsupportedOptionError, match="top_k"):
        MoEFeedForward(8, 8, 2, top_k=3)
    with pytest.raises(UnsupportedOptionError, match="backend"):
        MoEFeedForward(8, 8, 2, backend="cuda")
    layer = MoEFeedForward(8, 8, 2, d_embed=4)
    with pytest.raises(ValueError, match="embed"):
        layer(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="embed"):
        layer(torch.randn(1, 3, 8), torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="no side input"):
        MoEFeedForward(8, 8, 2)(torch.randn(1, 3, 8), torch.randn(1, 3, 4))
