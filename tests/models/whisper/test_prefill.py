"""The decode engine's prefill (and set_audio) as CUDA graphs use them: rows padded to a batch
bucket, the length padded to a power of two, the tokens read in place from the step's buffer,
only the asked positions' logits returned.

CPU runs the padded path eagerly (``pad=True``); the references are openai-whisper's
teacher-forced logits and ``decode`` (independent of speechrt) and the bare network. GPU tests
replay the graphs against the same padded path run eagerly.
"""

from __future__ import annotations

import math

import pytest
import torch

from speechrt.audio.log_mel import N_FRAMES, N_SAMPLES, log_mel_spectrogram
from speechrt.decoding.whisper import WhisperDecodeOptions, detect_language
from speechrt.engine.batching import Buckets
from speechrt.engine.decode_graphs import DecodeEngine

whisper = pytest.importorskip("whisper")

GROUP = 2  # rows per audio: 3 audios -> 6 rows, padded to 4 audios -> 8 rows


@pytest.fixture(scope="module")
def mels(long_audio) -> torch.Tensor:
    """(3, 80, 3000): three windows of real audio at different offsets."""
    mel = log_mel_spectrogram(long_audio, 80, padding=N_SAMPLES)
    return torch.stack([mel[:, s : s + N_FRAMES] for s in (0, 700, 2500)])


@pytest.fixture(scope="module")
def features(model, mels) -> torch.Tensor:
    return model.embed_audio(mels)  # (3, 1500, 64)


def _padded_engine(model) -> DecodeEngine:
    return DecodeEngine(model.net, buckets=Buckets((1, 4)), kv_step=8, pad=True)


def _tokens(length: int, seed: int) -> torch.Tensor:
    """(3 * GROUP, length) random text tokens after SOT."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50257, (3 * GROUP, length), generator=gen)
    tokens[:, 0] = 50258
    return tokens


@pytest.mark.parametrize("length", [1, 4, 5, 9, 23, 70])
def test_padded_prefill_and_steps_match_openai(model, reference, features, length):
    """Prefill of ``length`` tokens padded to its power-of-two bucket (rows 6 -> 8), then two
    steps on the padded cache (kv_len buckets of 8 read the padded prefill's entries beyond the
    position, masked): the logits openai-whisper computes teacher-forced."""
    tokens = _tokens(length + 2, seed=length)
    with torch.no_grad():
        ref = reference.logits(tokens, features.repeat_interleave(GROUP, dim=0))  # (B, T, V)
    engine = _padded_engine(model)
    with torch.inference_mode():
        session = engine.session(features, GROUP)
        buffer, positions = session.token_buffers(3 * GROUP, 449)
        buffer[:, : length + 2].copy_(tokens)
        at = (0, length // 2, -1)
        out = session.prefill(buffer[:, :length], at)  # (B, 3, V)
        assert out.shape == (3 * GROUP, 3, ref.shape[-1])
        expected = ref[:, [0, length // 2, length - 1]]
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        for pos in (length, length + 1):
            positions.fill_(pos)
            logits = session.step(kv_len=pos + 1)
            torch.testing.assert_close(logits, ref[:, pos], atol=1e-4, rtol=1e-4)
    # read in place from the step's token buffer: no staging copy was made
    assert not [k for k in engine._static if k[0] == "prefill_tokens"]


def test_padded_prefill_on_the_kernel_path(pt_path, features):
    """Triton kernels (interpreted): after a padded prefill (5 -> 8 positions) a kernel-path
    step reads positions + 1 cache entries; logits as the bare torch-path network's."""
    from speechrt.models.whisper import load_whisper

    model = load_whisper(pt_path, device="cpu")
    tokens = _tokens(7, seed=11)
    with torch.inference_mode():
        model.net.ensure_caches(3 * GROUP, 3)
        model.net.set_audio(features)
        ref = [model.net.prefill(tokens[:, :5])[:, [1, 4]]]
        for pos in (5, 6):
            step = model.net.step(tokens[:, pos : pos + 1], torch.full((6,), pos), pos + 1)
            ref.append(step[:, None])
        model.configure(kernels=True)
        session = _padded_engine(model).session(features, GROUP)
        buffer, positions = session.token_buffers(3 * GROUP, 449)
        buffer[:, :7].copy_(tokens)
        ours = [session.prefill(buffer[:, :5], (1, -1)).clone()]
        for pos in (5, 6):
            positions.fill_(pos)
            ours.append(session.step(kv_len=pos + 1)[:, None].clone())
    torch.testing.assert_close(torch.cat(ours, 1), torch.cat(ref, 1), atol=2e-4, rtol=2e-4)


def test_unpadded_prefill_is_the_bare_networks(model, features):
    """CPU without padding: exactly the bare network's logits at the asked positions."""
    tokens = _tokens(6, seed=3)
    with torch.inference_mode():
        session = DecodeEngine(model.net).session(features, GROUP)
        ours = session.prefill(tokens, (2, -1))
        model.net.set_audio(features)
        ref = model.net.prefill(tokens)
    assert torch.equal(ours, ref[:, [2, 5]])


def test_network_prefill_gathers_positions(model, features):
    """``WhisperNet.prefill(at=...)``: the full logits at those positions, nothing else."""
    tokens = _tokens(9, seed=5)
    with torch.inference_mode():
        model.net.ensure_caches(3 * GROUP, 3)
        model.net.set_audio(features)
        full = model.net.prefill(tokens)
        picked = model.net.prefill(tokens, at=torch.tensor([8, 0, 3]))
    torch.testing.assert_close(picked, full[:, [8, 0, 3]], atol=1e-5, rtol=1e-5)


def test_detect_language_through_a_padded_session(model, features):
    """One SOT row per audio (3 rows: not the session's 6) is staged and padded to 4 rows."""
    tokenizer = model.tokenizer.with_options("en", "transcribe")
    with torch.inference_mode():
        model.net.set_audio(features)
        ref_tokens, ref_probs = detect_language(model.net, tokenizer, 3, model.device)
        session = _padded_engine(model).session(features, GROUP)
        tokens, probs = detect_language(session, tokenizer, 3, model.device)
    assert tokens.tolist() == ref_tokens.tolist()
    for ours, ref in zip(probs, ref_probs):
        for code in ref:
            assert math.isclose(ours[code], ref[code], rel_tol=1e-4, abs_tol=1e-7)


def test_prefill_rejects_bad_positions_and_rows(model, features):
    with torch.inference_mode():
        session = _padded_engine(model).session(features, GROUP)
        with pytest.raises(IndexError):
            session.prefill(_tokens(4, seed=0), (4,))
        with pytest.raises(ValueError, match="audios"):
            session.prefill(_tokens(4, seed=0)[:4], (0,))


DECODE_OPTIONS = [
    {"prompt": list(range(400, 440)), "sample_len": 48},  # 43 tokens -> 64; detect language
    {"language": "en", "without_timestamps": True},  # 4 tokens -> bucket 4
    {"language": "en", "prompt": "hello there, general", "prefix": "ok so"},
    {"language": "en", "beam_size": 3, "patience": 1.5, "prompt": [400, 11, 1770] * 3},
]


@pytest.mark.parametrize("options", DECODE_OPTIONS)
def test_padded_engine_decodes_like_openai(model, reference, mels, features, options):
    """Greedy and beam search through padded prefills (rows and length buckets): openai-whisper's
    tokens, log-probabilities and no-speech probabilities."""
    beams = "beam_size" in options
    n = 1 if beams else 3  # openai-whisper decodes one audio at a time with groups > 1
    ref = whisper.decode(reference, mels[:n], whisper.DecodingOptions(fp16=False, **options))
    saved = model.engine
    model.engine = _padded_engine(model)
    try:
        ours = model.decode_features(features[:n], WhisperDecodeOptions(**options))
    finally:
        model.engine = saved
    for r, o in zip(ref, ours):
        assert o.tokens == r.tokens and o.language == r.language
        assert math.isclose(o.avg_logprob, r.avg_logprob, rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(o.no_speech_prob, r.no_speech_prob, rel_tol=1e-3, abs_tol=1e-7)


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [True, False])
def test_cuda_prefill_graphs_equal_eager(pt_path, long_audio, kernels):
    """set_audio and prefill replayed from graphs give the padded eager path's logits exactly;
    captures per bucket: prompts in one length bucket share a graph, another bucket captures."""
    from speechrt.models.whisper import load_whisper

    model = load_whisper(pt_path, device="cuda", dtype=torch.float16)
    model.configure(kernels=kernels)
    mel = model.log_mel(long_audio.numpy(), padding=N_SAMPLES)
    feats = model.embed_audio(torch.stack([mel[:, :N_FRAMES], mel[:, 700 : 700 + N_FRAMES]]))
    tokens = _tokens(40, seed=2)[:4].cuda()  # 2 audios x 2 rows

    def window(length: int) -> torch.Tensor:
        session = model.engine.session(feats, GROUP)
        buffer, positions = session.token_buffers(4, 449)
        buffer[:, :40].copy_(tokens)
        out = [session.prefill(buffer[:, :length], (0, -1)).clone()]
        positions.fill_(length)
        return torch.cat([*out, session.step(kv_len=length + 1)[:, None].clone()], 1)

    with torch.inference_mode():
        model.configure(cuda_graphs=False)
        eager = {t: window(t) for t in (9, 12, 20)}
        model.configure(cuda_graphs=True)
        for t in (9, 12, 20, 9):
            assert torch.equal(window(t), eager[t]), t
    stats = model.engine.stats()
    assert stats["capture_failure"] is None
    assert stats["by_pass"]["set_audio"] == (1, 4)  # one audio bucket, 4 windows
    assert stats["by_pass"]["prefill"] == (2, 4)  # buckets 16 (9, 12, 9) and 32 (20)


@pytest.mark.gpu
@pytest.mark.parametrize("options", DECODE_OPTIONS)
def test_cuda_graph_decoding_like_eager(pt_path, mels, options, monkeypatch):
    """Window decoding (language detection, prompts, beams) with every pass replayed from
    graphs == the same padded passes run eagerly; prefills replay once captured."""
    from speechrt.engine.decode_graphs import DecodeEngine
    from speechrt.models.whisper import load_whisper

    model = load_whisper(pt_path, device="cuda", dtype=torch.float16)
    n = 1 if "beam_size" in options else 3
    monkeypatch.setattr(DecodeEngine, "POST_GRAPHS", True)  # the default; pinned here
    opts = WhisperDecodeOptions(**options)
    model.configure(cuda_graphs=False)
    feats = model.embed_audio(mels[:n].cuda())
    eager = model.decode_features(feats, opts)
    model.configure(cuda_graphs=True)
    for _ in range(2):
        graphed = model.decode_features(feats, opts)
        assert [r.tokens for r in graphed] == [r.tokens for r in eager]
        assert [r.sum_logprob for r in graphed] == [r.sum_logprob for r in eager]
        assert [r.no_speech_prob for r in graphed] == [r.no_speech_prob for r in eager]
    stats = model.engine.stats()
    captures, replays = stats["by_pass"]["prefill"]
    detects = "language" not in options
    assert captures == 1 + detects and replays == 2 * captures
    assert stats["capture_failure"] is None
    if "beam_size" not in options:  # greedy: the step tail replayed as its own graph
        post_captures, post_replays = stats["by_pass"]["post"]
        assert post_captures >= 1 and post_replays > post_captures
