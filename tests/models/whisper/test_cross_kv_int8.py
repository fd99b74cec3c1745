"""``WhisperNet.cross_kv_int8``: int8 cross-attention K/V with per-(audio, head, position) scales.

The reference is the float torch path of the same random network with the DEQUANTIZED int8
values written into its (float) cross caches: the kernel path (skinny and GEMM steps, kernel
prefill) and the torch path over int8 caches must give its logits at FP32 tolerance. Against
the float caches the int8 ones came from, greedy decoding stays close (quantisation error).
Under Triton's interpreter on CPU.
"""

from __future__ import annotations

import pytest
import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.models.whisper.config import WhisperDims
from speechrt.models.whisper.model import WhisperNet

pytest.importorskip("triton")

from tests.models.whisper.test_skinny_step import _random_net  # noqa: E402

DIMS = WhisperDims(
    n_mels=8, n_audio_ctx=40, n_audio_state=48, n_audio_head=3, n_audio_layer=1,
    n_vocab=51865, n_text_ctx=32, n_text_state=48, n_text_head=3, n_text_layer=2,
)  # fmt: skip
PREFILL = 3


def _run(net: WhisperNet, feats: torch.Tensor, tokens: torch.Tensor, cross=None) -> torch.Tensor:
    """Prefill PREFILL tokens, then step the rest -> logits (1 + steps, B, V): the prefill's
    last position, then each step. ``cross``: per-layer (k, v) (A, H, S, Dh) written over the
    cross caches after ``set_audio``."""
    b, t = tokens.shape
    net.setup_caches(b, t, feats.shape[0])
    net.set_audio(feats)
    for layer, kv in zip(net.decoder.layers, cross or ()):
        layer.cross_cache.k[: feats.shape[0]].copy_(kv[0])
        layer.cross_cache.v[: feats.shape[0]].copy_(kv[1])
    logits = [net.prefill(tokens[:, :PREFILL])[:, -1]]
    for pos in range(PREFILL, t):
        positions = torch.full((b,), pos)
        logits.append(net.step(tokens[:, pos : pos + 1], positions, kv_len=pos + 1))
    return torch.stack(logits)


def _dequantized(net: WhisperNet, n_audio: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [layer.cross_cache.read(n_audio, torch.float32) for layer in net.decoder.layers]


@pytest.mark.parametrize(
    "rows, n_audio, skinny", [(1, 1, None), (4, 2, None), (2, 2, False)],
    ids=["B1-skinny", "B4-two-audios-gemm", "B2-gemm"],
)  # fmt: skip
def test_int8_cross_cache_matches_torch_path_on_dequantized_values(rows, n_audio, skinny):
    """Kernel-path prefill and steps (skinny auto at 1 row, GEMM steps otherwise) over int8
    cross caches, and the torch path over them too == the float torch path on the dequantized
    values."""
    torch.manual_seed(0)
    feats = torch.randn(n_audio, DIMS.n_audio_ctx, DIMS.n_text_state)
    tokens = torch.randint(0, DIMS.n_vocab, (rows, 6))
    with torch.inference_mode():
        net = _random_net(1, DIMS)
        net.kernels, net.cross_kv_int8, net.decoder.skinny_step = True, True, skinny
        logits = _run(net, feats, tokens)
        cache = net.decoder.layers[1].cross_cache
        assert cache.k.dtype == torch.int8 and cache.v_scale.dtype == torch.float32
        assert cache.k_scale.shape == (n_audio, DIMS.n_text_head, DIMS.n_audio_ctx)
        cross = _dequantized(net, n_audio)
        ref = _run(_random_net(1, DIMS), feats, tokens, cross)  # float torch path
        torch_int8 = _random_net(1, DIMS)
        torch_int8.cross_kv_int8 = True
        torch_logits = _run(torch_int8, feats, tokens)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch_logits, ref, atol=1e-4, rtol=1e-4)
    # the reference saw the quantisation error (at most half a step), not the float keys
    first = net.decoder.layers[0]
    float_k = first.cross_attn.heads(first.cross_attn.wk(feats))  # (A, H, S, Dh)
    err = (cross[0][0] - float_k).abs()
    assert err.max() > 0 and (err <= first.cross_cache.k_scale[:n_audio, ..., None] * 0.501).all()


def test_greedy_decoding_int8_close_to_float_caches():
    """Greedy steps on the kernel path (4 rows of 2 audios), int8 vs float cross caches of
    the same audio: logits within a small fraction of their spread, the same tokens."""
    torch.manual_seed(0)
    feats = torch.randn(2, DIMS.n_audio_ctx, DIMS.n_text_state)
    rows, steps = 4, 5
    tokens = torch.randint(0, DIMS.n_vocab, (rows, PREFILL))
    outs = []
    with torch.inference_mode():
        for int8 in (False, True):
            net = _random_net(3, DIMS)
            net.kernels, net.cross_kv_int8 = True, int8
            net.setup_caches(rows, PREFILL + steps, 2)
            net.set_audio(feats)
            logits = [net.prefill(tokens)[:, -1]]
            for pos in range(PREFILL, PREFILL + steps):
                token = logits[-1].argmax(-1, keepdim=True)  # (B, 1) greedy
                logits.append(net.step(token, torch.full((rows,), pos), kv_len=pos + 1))
            outs.append(torch.stack(logits))
    ref, got = outs
    spread = float(ref.std())
    assert float((got - ref).abs().max()) < 0.05 * spread
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_int8_caches_follow_the_flag_and_skip_the_persistent_step():
    net = _random_net(2, DIMS)
    net.setup_caches(1, 8, 1)
    assert net.decoder.layers[0].cross_cache.k_scale is None
    version = net.cache_version
    net.ensure_caches(1, 1, 8)
    assert net.cache_version == version  # nothing changed
    net.cross_kv_int8 = True
    net.ensure_caches(1, 1, 8)  # the flag changed: reallocated as int8
    assert net.cache_version == version + 1
    cache = net.decoder.layers[0].cross_cache
    assert cache.k.dtype == cache.v.dtype == torch.int8 and cache.quantized
    assert net.decoder.stacked_caches[2].dtype == torch.int8
    net.decoder.persistent_step = True
    assert not net.decoder.uses_persistent(1, 1, torch.device("cpu"))
    with pytest.raises(UnsupportedOptionError, match="not int8"):
        net.decoder.persistent.stack()
    net.cross_kv_int8 = False
    net.ensure_caches(1, 1, 8)
    assert not net.decoder.layers[0].cross_cache.quantized
    assert net.decoder.uses_persistent(1, 1, torch.device("cpu"))
