"""Programmatic dependent launch switches: off wherever it cannot apply (CPU tensors, the
interpreter, SPEECHRT_PDL=0), on for a Hopper GPU (GPU test)."""

from __future__ import annotations

import pytest
import torch

from speechrt.kernels import _pdl


def test_off_for_cpu_tensors_and_interpreter(monkeypatch):
    assert _pdl.pdl_kwargs(torch.device("cpu")) == {"USE_PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _pdl.pdl_supported(torch.device("cuda", 0))  # never queries the device


def _graph_with_pdl_equals_eager_without(monkeypatch, chain, x0: torch.Tensor) -> None:
    """``chain(x)`` (which updates x in place) captured with PDL in one CUDA graph and replayed
    from x0 three times equals the chain run eagerly without PDL, bit for bit."""
    monkeypatch.setenv("SPEECHRT_PDL", "0")
    want = chain(x0.clone())
    monkeypatch.setenv("SPEECHRT_PDL", "1")
    x = x0.clone()
    chain(x.clone())  # compile the PDL variants outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(x)
    for _ in range(3):  # replays restart from x0: the chain updates x in place
        x.copy_(x0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_env_switch_on_hopper(monkeypatch):
    dev = torch.device("cuda")
    if torch.cuda.get_device_capability() < (9, 0):
        assert not _pdl.pdl_supported(dev)
        return
    assert _pdl.pdl_kwargs(dev) == {"USE_PDL": True, "launch_pdl": True}
    monkeypatch.setenv("SPEECHRT_PDL", "0")
    assert _pdl.pdl_kwargs(dev) == {"USE_PDL": False}


@pytest.mark.gpu
def test_pdl_chain_in_a_graph_matches_eager_without_pdl(monkeypatch):
    """A dependent chain (LN-prologue GEMV -> residual GEMV -> LN GEMV, 40 launches) captured
    with PDL in one CUDA graph equals the same chain run eagerly without PDL, bit for bit."""
    from speechrt.kernels.skinny_linear import skinny_linear

    gen = torch.Generator(device="cuda").manual_seed(0)
    d, layers = 512, 10
    ws = [
        (torch.randn(4 * d, d, device="cuda", generator=gen) / d**0.5).half() for _ in range(layers)
    ]
    w2 = [
        (torch.randn(d, 4 * d, device="cuda", generator=gen) / (4 * d) ** 0.5).half()
        for _ in range(layers)
    ]
    ln = (torch.ones(d, device="cuda"), torch.zeros(d, device="cuda"), 1e-5)
    x0 = torch.randn(1, d, device="cuda", generator=gen)

    def chain(x):
        for w_up, w_down in zip(ws, w2):
            h = skinny_linear(x, w_up, ln=ln, activation="gelu")
            skinny_linear(h, w_down, residual=x)
        return skinny_linear(x, ws[0], ln=ln, out_dtype=torch.float32)

    _graph_with_pdl_equals_eager_without(monkeypatch, chain, x0)


@pytest.mark.gpu
def test_encoder_chain_in_a_graph_matches_eager_without_pdl(monkeypatch):
    """The Conformer encoder's many-wave kernels launched with PDL (pdl_enter: LayerNorm,
    linear_act on both kernels, GLU epilogue, depthwise conv, attention), 4 blocks captured in
    one CUDA graph, equal the same chain run eagerly without PDL, bit for bit."""
    from speechrt.kernels.attention import attention
    from speechrt.kernels.conv_module import glu_depthwise_conv
    from speechrt.kernels.layer_norm import add_double_layer_norm, add_layer_norm, layer_norm
    from speechrt.kernels.linear_act import interleave_glu, linear_act

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, t, d, h = 16, 250, 256, 4

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).half()

    w1, w2, wqkv, wo = rnd(4 * d, d, scale=d**-0.5), rnd(d, 4 * d), rnd(3 * d, d), rnd(d, d)
    w2 = w2 * (4 * d) ** -0.5
    wo = wo * d**-0.5
    wqkv = wqkv * d**-0.5
    wg, bg = interleave_glu(rnd(2 * d, d, scale=d**-0.5), rnd(2 * d))
    dw, dwb = rnd(d, 15, scale=0.25), rnd(d)
    ln = (torch.ones(d, device="cuda"), torch.zeros(d, device="cuda"), 1e-5)
    lens = torch.full((b,), t, device="cuda")
    x0 = torch.randn(b, t, d, device="cuda", generator=gen)

    def chain(x):
        y = layer_norm(x, ln[0], ln[1], y_dtype=torch.float16)
        for _ in range(4):
            hid = linear_act(y, w1, None, "swish")
            x, y = add_layer_norm(torch.nn.functional.linear(hid, w2), x, *ln, h_out=x)
            q, k, v = linear_act(y, wqkv, None, "identity").view(b, t, 3, h, d // h).unbind(2)
            att = attention(q, k, v, lens).reshape(b, t, d)
            x, y = add_layer_norm(linear_act(att, wo, None, "identity"), x, *ln, h_out=x)
            u = linear_act(y, wg, bg, "glu")
            g = glu_depthwise_conv(u, dw, dwb, lens, causal=False, glu=False)
            x, y = add_double_layer_norm(g, x, ln, ln, s_out=x)
        return y

    _graph_with_pdl_equals_eager_without(monkeypatch, chain, x0)
