"""The kernel-path decode step (8 skinny-linear / decode-attention launches per layer, final
LayerNorm + logits in one) against the torch path of the same random network, under Triton's
interpreter on CPU: logits of several steps and the self-attention caches they write."""

from __future__ import annotations

import pytest
import torch

from speechrt.models.whisper.config import WhisperDims
from speechrt.models.whisper.model import WhisperNet

pytest.importorskip("triton")

DIMS = WhisperDims(
    n_mels=8, n_audio_ctx=24, n_audio_state=48, n_audio_head=3, n_audio_layer=1,
    n_vocab=51865, n_text_ctx=32, n_text_state=48, n_text_head=3, n_text_layer=2,
)  # fmt: skip


def _random_net(seed: int, dims: WhisperDims = DIMS) -> WhisperNet:
    """Random weights of trained-like scale: matrices N(0, 1/fan_in), LN weights near 1."""
    gen = torch.Generator().manual_seed(seed)
    net = WhisperNet(dims).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return net


def _decode(net: WhisperNet, feats: torch.Tensor, tokens: torch.Tensor, starts: torch.Tensor):
    """Prefill 3 tokens, then step the rest; row b's steps start at ``starts[b]`` (ragged rows
    re-feed earlier positions). Returns the step logits (steps, B, V) and the first layer's
    self-attention keys (B, H, T, Dh)."""
    b, t = tokens.shape
    net.setup_caches(b, t, feats.shape[0])
    net.set_audio(feats)
    net.prefill(tokens[:, :3])
    logits = []
    for j in range(t - 3):
        positions = starts + j  # (B,)
        step_tokens = tokens.gather(1, positions[:, None])  # (B, 1)
        logits.append(net.step(step_tokens, positions, kv_len=int(positions.max()) + 1))
    return torch.stack(logits), net.decoder.layers[0].cache.k[:b, :, : t - 1].clone()


@pytest.mark.parametrize(
    "rows, n_audio, ragged, many_rows",
    [(1, 1, False, "dot"), (3, 1, False, "dot"), (4, 2, True, "dot"), (6, 3, True, "dot"),
     (6, 3, True, "split")],
    ids=["B1", "B3-one-audio", "B4-two-audios-ragged", "B6-ragged-K-loop", "B6-ragged-split-K"],
)  # fmt: skip
def test_skinny_step_matches_torch_path(rows, n_audio, ragged, many_rows, monkeypatch):
    """Same logits (FP32 tolerance) and cache entries as the torch path, several steps; rows
    grouped by audio (beams) read one cross-attention K/V; more than 4 rows take the
    tensor-core GEMMs with the LayerNorm folded (K loop, or split-K with its counters)."""
    from speechrt.kernels import skinny_linear

    monkeypatch.setattr(skinny_linear, "MANY_ROWS", many_rows)
    torch.manual_seed(0)
    feats = torch.randn(n_audio, DIMS.n_audio_ctx, DIMS.n_text_state)
    tokens = torch.randint(0, DIMS.n_vocab, (rows, 7))
    starts = torch.full((rows,), 3)
    if ragged:
        starts[::2] = 2  # even rows re-write position 2, then walk one behind
    outs = []
    with torch.inference_mode():
        for kernels, skinny in ((False, False), (True, True), (True, False)):
            net = _random_net(seed=1)
            net.kernels = kernels
            net.decoder.skinny_step = skinny
            outs.append(_decode(net, feats, tokens, starts))
            if skinny:
                counters = net.decoder._split_counters
    (ref_logits, ref_k), (logits, k), (old_logits, _) = outs
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k, ref_k, atol=1e-5, rtol=1e-5)
    # the previous kernel-path step agrees too (the benchmarks' baseline)
    torch.testing.assert_close(logits, old_logits, atol=1e-4, rtol=1e-4)
    if rows > 4 and many_rows == "split":  # the split-K GEMMs left their counters zeroed
        assert counters is not None and counters.count_nonzero() == 0


def _int8_representable(net: WhisperNet) -> WhisperNet:
    """Round every step GEMM weight (and the tied embedding) to what int8 per-row quantisation
    keeps, in float16: the int8 copies are then (nearly) lossless."""
    from speechrt.models.whisper.model import cast_, quantize_int8

    net = cast_(net, torch.float16)
    with torch.no_grad():
        mods = [net.decoder.tok_emb]
        for layer in net.decoder.layers:
            a, c, f = layer.self_attn, layer.cross_attn, layer.ffn
            mods += [a.wq, a.wk, a.wv, a.wo, c.wq, c.wo, f.fc1, f.fc2]
        for mod in mods:
            kw = quantize_int8(mod.weight, None)
            mod.weight.copy_((kw["weight"].float() * kw["weight_scale"][:, None]).half())
    return net


@pytest.mark.parametrize("rows", [1, 2])
def test_int8_step_matches_float_torch_path(rows):
    """``quantize_step_int8``: the skinny step on int8 weights gives the logits of the float16
    torch path on the same (int8-representable) weights, and prefill still uses the float ones."""
    torch.manual_seed(0)
    feats = torch.randn(1, DIMS.n_audio_ctx, DIMS.n_text_state).half()
    tokens = torch.randint(0, DIMS.n_vocab, (rows, 6))
    starts = torch.full((rows,), 3)
    outs = []
    with torch.inference_mode():
        for int8 in (False, True):
            net = _int8_representable(_random_net(seed=2))
            net.kernels = int8
            net.decoder.skinny_step = int8
            if int8:
                net.decoder.quantize_step_int8()
                assert net.decoder.layers[0].int8["fc1"]["weight"].dtype == torch.int8
            outs.append(_decode(net, feats, tokens, starts))
    (ref_logits, ref_k), (logits, k) = outs
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits, atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(k.float(), ref_k.float(), atol=3e-3, rtol=3e-3)
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() >= 0.9


def test_int8_needs_half_model():
    from speechrt.errors import UnsupportedOptionError

    with pytest.raises(UnsupportedOptionError, match="float16"):
        _random_net(seed=0).decoder.quantize_step_int8()
