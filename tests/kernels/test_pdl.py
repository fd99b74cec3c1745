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
