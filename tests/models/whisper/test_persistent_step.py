"""The one-launch decode step (``kernels.decoder_step`` over the decoder's stacked weights)
against the torch path of the same random network, under Triton's interpreter on CPU (where it
runs phase by phase); plus the stacking itself: weights held once, as views, and re-stacked
when parameters are replaced."""

from __future__ import annotations

import pytest
import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.models.whisper.model import WhisperNet, cast_

pytest.importorskip("triton")

from tests.models.whisper.test_skinny_step import DIMS, _decode, _random_net  # noqa: E402


@pytest.mark.parametrize("rows, ragged", [(1, False), (2, True)], ids=["B1", "B2-ragged"])
def test_persistent_step_matches_torch_path(rows, ragged):
    """Same logits (FP32 tolerance) and cache entries as the torch path over several steps, one
    audio per row; ragged rows re-write an earlier position."""
    torch.manual_seed(0)
    feats = torch.randn(rows, DIMS.n_audio_ctx, DIMS.n_text_state)
    tokens = torch.randint(0, DIMS.n_vocab, (rows, 7))
    starts = torch.full((rows,), 3)
    if ragged:
        starts[::2] = 2
    outs = []
    with torch.inference_mode():
        for kernels, persistent in ((False, False), (True, True)):
            net = _random_net(seed=1)
            net.kernels = kernels
            net.decoder.persistent_step = persistent
            outs.append(_decode(net, feats, tokens, starts))
            if persistent:
                assert net.decoder.persistent._stack is not None  # the kernel did run
    (ref_logits, ref_k), (logits, k) = outs
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k, ref_k, atol=1e-5, rtol=1e-5)


def test_stacking_keeps_weights_once_and_follows_replacements():
    net = _random_net(seed=2)
    net.setup_caches(1, 8, 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stack = net.decoder.persistent.stack()
    after = net.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    layer = net.decoder.layers[1]
    # the layers' parameters and caches are views of the stacked tensors (no second copy)
    assert layer.ffn.fc2.weight.data_ptr() == stack.fc2_w[1].data_ptr()
    assert layer.self_attn.wk.weight.data_ptr() == stack.qkv_w[1, DIMS.n_text_state].data_ptr()
    assert layer.cross_attn_norm.bias.data_ptr() == stack.ln_b[1, 1].data_ptr()
    assert layer.cache.v.data_ptr() == stack.self_v[1].data_ptr()
    assert layer.self_attn.packed_qkv()[0].data_ptr() == stack.qkv_w[1].data_ptr()
    # an in-place load writes through the views; the stack stays
    with torch.no_grad():
        layer.ffn.fc1.bias.add_(1.0)
    assert net.decoder.persistent.stack() is stack
    assert stack.fc1_b[1].eq(layer.ffn.fc1.bias).all()
    # new caches alone: the same weights, the new caches
    net.setup_caches(2, 8, 2)
    same = net.decoder.persistent.stack()
    assert same.qkv_w is stack.qkv_w and same.self_k is net.decoder.stacked_caches[0]
    # caches moved out of the stacked tensors: a clear error, not a read of stale memory
    layer0 = net.decoder.layers[0]
    layer0.cache.k = layer0.cache.k.clone()
    with pytest.raises(UnsupportedOptionError, match="setup_caches again"):
        net.decoder.persistent.stack()
    # replaced parameters (a dtype cast) are stacked again
    cast_(net, torch.float16)
    net.setup_caches(1, 8, 1)
    restacked = net.decoder.persistent.stack()
    assert restacked is not stack and restacked.qkv_w.dtype == torch.float16
    assert layer.ffn.fc2.weight.data_ptr() == restacked.fc2_w[1].data_ptr()


def test_choice():
    net = WhisperNet(DIMS)
    dec = net.decoder
    cpu = torch.device("cpu")
    assert not dec.uses_persistent(1, 1, cpu)  # off by default (experimental)
    dec.persistent_step = True
    assert dec.uses_persistent(2, 2, cpu)
    assert not dec.uses_persistent(2, 1, cpu)  # two rows of one audio (beams): not supported
    assert not dec.uses_persistent(5, 5, cpu)
    dec.persistent_step = False
    assert not dec.uses_persistent(1, 1, cpu)
