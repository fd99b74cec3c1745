"""The one-launch decoder step kernel against its plain-torch reference (Triton interpreter on
CPU, phase-by-phase launches; the persistent launch with grid barriers runs in the GPU tests):
residual stream and the self-attention cache entries written, at awkward sizes, several row and
program counts, every float dtype."""

from __future__ import annotations

import copy

import pytest
import torch

from speechrt.errors import UnsupportedOptionError

pytest.importorskip("triton")

from speechrt.kernels.decoder_step import (  # noqa: E402
    DecoderStack,
    StepConfig,
    StepState,
    decoder_step,
    decoder_step_ref,
)


def make_stack(
    n_layer=2,
    d=48,
    h=3,
    f=192,
    vocab=50,
    n_pos=None,
    rows=4,
    t=16,
    s=24,
    dtype=torch.float32,
    activation="gelu",
    seed=0,
    device="cpu",
) -> DecoderStack:
    """Random stack of trained-like scale (matrices N(0, 1/fan_in), LN weights near 1)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        scale = shape[-1] ** -0.5 if scale is None else scale
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    dh = d // h
    return DecoderStack(
        ln_w=(1 + 0.1 * torch.randn(n_layer, 3, d, generator=g)).to(device),
        ln_b=(0.1 * torch.randn(n_layer, 3, d, generator=g)).to(device), eps=1e-5,
        qkv_w=rnd(n_layer, 3 * d, d), qkv_b=rnd(n_layer, 3 * d, scale=0.1),
        o_w=rnd(n_layer, d, d), o_b=rnd(n_layer, d, scale=0.1),
        cq_w=rnd(n_layer, d, d), cq_b=rnd(n_layer, d, scale=0.1),
        co_w=rnd(n_layer, d, d), co_b=rnd(n_layer, d, scale=0.1),
        fc1_w=rnd(n_layer, f, d), fc1_b=rnd(n_layer, f, scale=0.1),
        fc2_w=rnd(n_layer, d, f), fc2_b=rnd(n_layer, d, scale=0.1),
        tok_emb=rnd(vocab, d, scale=1.0), pos_emb=rnd(n_pos or t, d, scale=0.5),
        self_k=rnd(n_layer, rows, h, t, dh, scale=1.0),
        self_v=rnd(n_layer, rows, h, t, dh, scale=1.0),
        cross_k=rnd(n_layer, rows, h, s, dh, scale=1.0),
        cross_v=rnd(n_layer, rows, h, s, dh, scale=1.0),
        n_head=h, activation=activation,
    )  # fmt: skip


def _run(stack, tokens, positions, config=None):
    """(kernel x, kernel caches) and (reference x, reference caches), from the same stack (on
    CUDA the kernel is the persistent launch)."""
    dev = stack.qkv_w.device
    tokens, positions = tokens.to(dev), positions.to(dev)
    ref = copy.deepcopy(stack)
    state = StepState(stack, tokens.shape[0], config)
    x = decoder_step(stack, tokens, positions, state).clone()
    x_ref = decoder_step_ref(ref, tokens, positions)
    return (x, stack.self_k, stack.self_v), (x_ref, ref.self_k, ref.self_v)


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.gpu)  # the interpreter truncates bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_matches_reference(dtype, rows, device):
    stack = make_stack(dtype=dtype, seed=rows, device=device)
    tokens = torch.tensor([3, 7, 49][:rows])
    positions = torch.tensor([5, 0, 15][:rows])  # first, middle and last cache entry
    (x, k, v), (x_ref, k_ref, v_ref) = _run(stack, tokens, positions)
    tol = TOL[dtype]
    scale = x_ref.abs().max()
    assert scale > 1.0  # the layers moved the stream
    torch.testing.assert_close(x, x_ref, atol=tol * scale, rtol=tol)
    torch.testing.assert_close(k.float(), k_ref.float(), atol=tol * 4, rtol=tol)
    torch.testing.assert_close(v.float(), v_ref.float(), atol=tol * 4, rtol=tol)


@pytest.mark.parametrize(
    "dims",
    [
        dict(d=64, h=4, f=256, t=40, s=100),  # several key tiles per split
        dict(d=32, h=2, f=96, t=8, s=7),  # F not a power of two, fewer keys than splits x 16
        dict(n_layer=3, d=80, h=5, f=320, t=16, s=33),  # odd head count, K padded 80 -> 128
    ],
    ids=["long-keys", "short-keys", "five-heads"],
)
@pytest.mark.parametrize("programs", [1, 2, 7])
def test_shapes_and_programs(dims, programs, device):
    stack = make_stack(**dims, seed=programs, device=device)
    tokens = torch.tensor([1, 2])
    positions = torch.tensor([dims["t"] - 1, 3])
    config = StepConfig(programs=programs)
    (x, k, _), (x_ref, k_ref, _) = _run(stack, tokens, positions, config)
    torch.testing.assert_close(x, x_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_activations(activation, device):
    stack = make_stack(activation=activation, device=device)
    tokens, positions = torch.tensor([4]), torch.tensor([2])
    (x, _, _), (x_ref, _, _) = _run(stack, tokens, positions)
    torch.testing.assert_close(x, x_ref, atol=1e-4, rtol=1e-4)


def test_block_n_configs_agree(device):
    """Forced GEMV tile widths (several tiles per program, double-buffered) give the same x."""
    stack = make_stack(device=device)
    tokens = torch.tensor([4, 9], device=device)
    positions = torch.tensor([2, 6], device=device)
    outs = []
    for bn in ((0, 0, 0, 0), (1, 2, 4, 1), (16, 8, 32, 4)):
        s = copy.deepcopy(stack)
        outs.append(decoder_step(s, tokens, positions, StepState(s, 2, StepConfig(block_n=bn))))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=1e-5)


def test_reference_detects_a_wrong_kernel_input(device):
    """The comparison can fail: a stack whose cross-attention memory differs gives another x."""
    stack = make_stack(device=device)
    ref = copy.deepcopy(stack)
    ref.cross_v[1, 0, 2, 5] += 1.0  # one value of one head of the last layer
    tokens = torch.tensor([4], device=device)
    positions = torch.tensor([2], device=device)
    x = decoder_step(stack, tokens, positions, StepState(stack, 1))
    assert (x - decoder_step_ref(ref, tokens, positions)).abs().max() > 1e-3


def test_errors(device):
    stack = make_stack(device=device)
    state = StepState(stack, 2)
    with pytest.raises(ValueError, match="positions must be"):
        decoder_step(stack, torch.tensor([1, 2]), torch.tensor([1.0, 2.0]), state)
    with pytest.raises(ValueError, match="tokens must be"):
        decoder_step(stack, torch.tensor([1, 2, 3]), torch.tensor([1, 2]), state)
    with pytest.raises(ValueError, match="tokens must be"):
        decoder_step(stack, torch.tensor([[1, 2], [3, 4]])[:, 0], torch.tensor([1, 2]), state)
    if device == "cpu":
        with pytest.raises(UnsupportedOptionError, match="interpreter"):
            decoder_step(stack, torch.tensor([1, 2]), torch.tensor([1, 2]), state, sync=True)
    with pytest.raises(UnsupportedOptionError, match="1..4 rows"):
        StepState(stack, 5)
    bad = make_stack(d=48, h=4)  # head dim 12
    with pytest.raises(UnsupportedOptionError, match="power-of-two head dim"):
        bad.check()
    bad = make_stack()
    bad.o_w = bad.o_w[:, :, :40]
    with pytest.raises(ValueError, match="o_w must be"):
        bad.check()
    bad = make_stack()
    bad.ln_w = bad.ln_w.half()
    with pytest.raises(ValueError, match="ln_w must be torch.float32"):
        bad.check()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_persistent_launch_on_gpu(dtype, rows):
    """One launch with grid barriers and L2 prefetch equals the phase-by-phase launches and the
    reference; repeated launches (self-resetting barrier) and a CUDA graph replay agree too."""
    stack = make_stack(n_layer=4, d=256, h=4, f=1024, t=64, s=300, dtype=dtype, device="cuda")
    tokens = torch.tensor([3, 7, 11, 13][:rows], device="cuda")
    positions = torch.tensor([5, 0, 63, 20][:rows], device="cuda")
    ref = copy.deepcopy(stack)
    eager = copy.deepcopy(stack)
    state = StepState(stack, rows)
    x = decoder_step(stack, tokens, positions, state).clone()
    x_eager = decoder_step(eager, tokens, positions, StepState(eager, rows), sync=False)
    x_ref = decoder_step_ref(ref, tokens, positions)
    assert not state.failed()
    tol = TOL[dtype]
    torch.testing.assert_close(x, x_eager, atol=tol, rtol=tol)
    torch.testing.assert_close(x, x_ref, atol=tol * x_ref.abs().max(), rtol=tol)
    for _ in range(3):  # same inputs again: the barrier reset itself
        torch.testing.assert_close(decoder_step(stack, tokens, positions, state), x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decoder_step(stack, tokens, positions, state)
    state.x.zero_()
    graph.replay()
    torch.testing.assert_close(state.x, x)
    assert not state.failed()
