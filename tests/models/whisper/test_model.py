"""The network against openai-whisper's: encoder output, teacher-forced and cached logits."""

from __future__ import annotations

import pytest
import torch

from speechrt.audio.log_mel import N_FRAMES, log_mel_spectrogram
from speechrt.models.whisper.model import sinusoids

whisper = pytest.importorskip("whisper")

TOKENS = [50258, 50261, 50359, 50364, 400, 11, 1770, 50414, 50414, 502, 13]


@pytest.fixture(scope="module")
def mel(jfk) -> torch.Tensor:
    """(2, 80, 3000): jfk and a random window."""
    first = log_mel_spectrogram(jfk, 80, padding=480000)[:, :N_FRAMES]
    return torch.stack(
        [first, torch.randn(80, N_FRAMES, generator=torch.Generator().manual_seed(1))]
    )


@pytest.fixture(scope="module")
def features(reference, mel):
    with torch.no_grad():
        return reference.encoder(mel)


def test_encoder_matches(model, mel, features):
    ours = model.embed_audio(mel)
    torch.testing.assert_close(ours, features, atol=1e-4, rtol=1e-4)


def test_sinusoids_match():
    torch.testing.assert_close(sinusoids(1500, 64), whisper.model.sinusoids(1500, 64))


def test_teacher_forced_logits_match(model, reference, features):
    tokens = torch.tensor([TOKENS, TOKENS[:3] + TOKENS[4:] + [50257]])
    with torch.inference_mode():
        ref = reference.logits(tokens, features)
        ours = model.net.logits(tokens, features)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_cached_prefill_and_steps_match(model, reference, features):
    """prefill + step (with kv_len = position + 1) give the teacher-forced logits, per row."""
    tokens = torch.tensor([TOKENS, TOKENS[:3] + TOKENS[4:] + [50257]])
    net = model.net
    with torch.inference_mode():
        ref = reference.logits(tokens, features)
        net.setup_caches(max_batch=4)
        net.set_audio(features)
        torch.testing.assert_close(net.prefill(tokens[:, :4]), ref[:, :4], atol=1e-4, rtol=1e-4)
        for pos in range(4, tokens.shape[1]):
            positions = torch.full((2,), pos)
            exact = net.step(tokens[:, pos : pos + 1], positions, kv_len=pos + 1)
            torch.testing.assert_close(exact, ref[:, pos], atol=1e-4, rtol=1e-4)
        # the full static cache (graph-safe bucket) masks the unwritten tail
        net.prefill(tokens[:, :4])
        for pos in range(4, tokens.shape[1]):
            full = net.step(tokens[:, pos : pos + 1], torch.full((2,), pos))
            torch.testing.assert_close(full, ref[:, pos], atol=1e-4, rtol=1e-4)


def test_ragged_positions_and_beam_groups(model, reference, features):
    """Rows at different positions in one step; 3 beams per audio share one cross K/V."""
    net = model.net
    a = torch.tensor(TOKENS[:8])
    b = torch.tensor(TOKENS[:3] + TOKENS[5:10])
    with torch.inference_mode():
        ref_a = reference.logits(a[None], features[:1])[0]
        ref_b = reference.logits(b[None], features[1:])[0]
        net.setup_caches(max_batch=6, max_audio=2)
        net.set_audio(features)
        rows = torch.stack([a, a, a, b, b, b])  # (6, 8): audio 0 x3, audio 1 x3
        net.prefill(rows[:, :5])
        # rows 0-2 step at position 5, rows 3-5 re-feed position 4 then 5 (ragged)
        positions = torch.tensor([5, 5, 5, 4, 4, 4])
        out = net.step(rows.gather(1, positions[:, None]), positions)
        torch.testing.assert_close(out[:3], ref_a[5].expand(3, -1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[3:], ref_b[4].expand(3, -1), atol=1e-4, rtol=1e-4)
        # reorder: beams take row 3's history (audio 1); step again at position 5
        net.reorder_cache(torch.tensor([0, 1, 2, 3, 3, 3]))
        out = net.step(rows[:, 5:6], torch.tensor([5, 5, 5, 5, 5, 5]), kv_len=6)
        torch.testing.assert_close(out[3:], ref_b[5].expand(3, -1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 0.5), (torch.float16, 0.1)])
def test_half_precision_close(pt_path, reference, mel, dtype, atol):
    from speechrt.models.whisper import load_whisper

    model = load_whisper(pt_path, device="cpu", dtype=dtype)
    tokens = torch.tensor([TOKENS])
    with torch.inference_mode():
        ref = reference(mel[:1], tokens)
        ours = model.net(mel[:1].to(dtype), tokens)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0.05)


@pytest.mark.gpu
def test_step_replays_in_a_cuda_graph(pt_path, mel):
    """The decode step has no host sync: capture it in a CUDA graph and replay it."""
    from speechrt.models.whisper import load_whisper

    model = load_whisper(pt_path, device="cuda", dtype=torch.float16)
    net = model.net
    with torch.inference_mode():
        net.setup_caches(max_batch=2)
        net.set_audio(model.embed_audio(mel))
        tokens = torch.tensor([TOKENS[:4]] * 2, device="cuda")
        net.prefill(tokens)
        step_tokens = torch.tensor([[400], [11]], device="cuda")
        positions = torch.tensor([4, 4], device="cuda")
        eager = net.step(step_tokens, positions, kv_len=64)
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            net.step(step_tokens, positions, kv_len=64)  # warm-up on the side stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = net.step(step_tokens, positions, kv_len=64)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, eager, atol=1e-3, rtol=1e-3)
