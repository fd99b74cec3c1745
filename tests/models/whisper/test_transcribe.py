"""Long-form transcription against openai-whisper's ``transcribe``; API and error cases."""

from __future__ import annotations

import math

import pytest
import torch

from speechrt.errors import AudioError, UnsupportedOptionError
from speechrt.models.whisper import load_whisper
from speechrt.results import Segment, Transcript

whisper = pytest.importorskip("whisper")


def _compare(ref: dict, ours: Transcript) -> None:
    assert ours.text == ref["text"]
    assert ours.language == ref["language"]
    assert len(ours.segments) == len(ref["segments"])
    for o, r in zip(ours.segments, ref["segments"]):
        assert isinstance(o, Segment)
        assert (o.id, o.seek, o.start, o.end, o.text) == (
            r["id"],
            r["seek"],
            r["start"],
            r["end"],
            r["text"],
        )
        assert list(o.tokens) == r["tokens"]
        assert math.isclose(o.avg_logprob, r["avg_logprob"], rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(o.no_speech_prob, r["no_speech_prob"], rel_tol=1e-4, abs_tol=1e-9)
        assert o.compression_ratio == r["compression_ratio"]


CASES = [
    ("long_audio", {}),
    ("long_audio", {"condition_on_previous_text": False, "temperature": 0.0}),
    # beam search at T=0; the third window falls back to best-of-2 sampling at T=0.6
    (
        "long_audio",
        {"beam_size": 3, "best_of": 2, "logprob_threshold": -0.25, "temperature": (0, 0.6)},
    ),
    # repetitive-text fallback with a prompt; T=0.6 > 0.5 resets the prompt for the next window
    (
        "long_audio",
        {
            "initial_prompt": "hello world",
            "compression_ratio_threshold": 1.3,
            "best_of": 2,
            "temperature": (0, 0.6),
            "sample_len": 64,
        },
    ),
    ("jfk", {"beam_size": 3, "best_of": 3, "logprob_threshold": -0.2, "temperature": (0, 0.4)}),
    ("long_audio", {"initial_prompt": "so it goes", "carry_initial_prompt": True}),
    # the first window looks silent (no-speech probability and log-prob) and is skipped
    ("long_audio", {"no_speech_threshold": 1e-21, "logprob_threshold": -0.21, "temperature": 0}),
    ("long_audio", {"without_timestamps": True, "language": "de", "task": "translate"}),
]


@pytest.mark.parametrize("audio, options", CASES)
def test_matches_openai_whisper(model, reference, request, audio, options):
    audio = request.getfixturevalue(audio).numpy()
    torch.manual_seed(5)
    ref = whisper.transcribe(reference, audio, fp16=False, **options)
    torch.manual_seed(5)
    ours = model.transcribe(audio, **{"best_of": None, **options})
    _compare(ref, ours)
    assert ours.tokens == tuple(t for s in ours.segments for t in s.tokens if t < 50257)


def test_openai_and_hf_checkpoints_agree(hf_path, model, jfk):
    hf_model = load_whisper(hf_path, device="cpu")
    a, b = model.transcribe(jfk, temperature=0.0), hf_model.transcribe(jfk, temperature=0.0)
    assert a == b and a.segments


def test_paths_lists_and_language_detection(model, reference, shared, jfk):
    path = shared / "assets" / "whisper_assets" / "jfk.flac"
    from_path = model.transcribe(str(path), temperature=0.0)
    both = model.transcribe([path, jfk.numpy()], temperature=0.0, batch_size=1)
    assert isinstance(both, list) and both == [from_path, from_path]
    code, probs = model.detect_language(path)
    mel = whisper.pad_or_trim(whisper.log_mel_spectrogram(jfk, 80, padding=480000), 3000)
    _, ref_probs = reference.detect_language(mel)
    assert code == max(ref_probs, key=ref_probs.get) == from_path.language
    assert math.isclose(probs[code], ref_probs[code], rel_tol=1e-4)
    assert len(model.detect_language([jfk, jfk])) == 2


def test_errors(model, tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    for audio in (corrupt, empty, torch.zeros(0), torch.full((16000,), float("nan"))):
        with pytest.raises(AudioError):
            model.transcribe(audio)
    with pytest.raises(AudioError, match="mono"):
        model.transcribe(torch.zeros(2, 16000))
    with pytest.raises(UnsupportedOptionError, match="klingon"):
        model.transcribe(torch.zeros(16000), language="klingon")
    with pytest.raises(UnsupportedOptionError, match="initial_prompt is .* tokens"):
        model.transcribe(torch.zeros(16000), initial_prompt="word " * 300)
    with pytest.raises(UnsupportedOptionError, match="patience"):
        model.transcribe(torch.zeros(16000), beam_size=2, patience=-1.0)
    with pytest.raises(UnsupportedOptionError, match="task"):
        model.transcribe(torch.zeros(16000), task="summarize")


@pytest.mark.gpu
def test_cuda_matches_openai_whisper_up_to_near_ties(pt_path, reference, long_audio):
    """CUDA, FP32, three windows of greedy decoding against openai-whisper on CUDA.

    Both run float32 with different kernels (and so summation orders), and random weights meet
    near-tie tokens: on the H200 the long-form texts matched for ~280 characters, then a tie
    went the other way. So: the tokens must be openai-whisper's exactly up to the first
    difference, and there the two chosen tokens must be a tie in openai-whisper's own logits
    (|gap| < 1e-3; float32 reordering moves logits by ~1e-5). Exact long-form parity is tested
    on CPU, where both run the same kernels.
    """
    import copy

    from speechrt.audio.log_mel import N_FRAMES, log_mel_spectrogram
    from speechrt.decoding.whisper import WhisperDecodeOptions

    ref = copy.deepcopy(reference).cuda()
    model = load_whisper(pt_path, device="cuda", dtype=torch.float32)
    model.configure(cuda_graphs=False, kernels=False)
    mel = log_mel_spectrogram(long_audio, 80, padding=480000)
    mels = torch.stack([mel[:, s : s + N_FRAMES] for s in (0, 700, 2500)]).cuda()
    ours = model.decode(mels, WhisperDecodeOptions(language="en"))
    tokenizer = whisper.tokenizer.get_tokenizer(
        ref.is_multilingual, num_languages=ref.num_languages, language="en", task="transcribe"
    )
    for mel_i, mine in zip(mels, ours):
        theirs = whisper.decode(ref, mel_i, whisper.DecodingOptions(fp16=False, language="en"))
        a, b = list(theirs.tokens), list(mine.tokens)
        if a == b:
            assert mine.text == theirs.text
            assert math.isclose(mine.avg_logprob, theirs.avg_logprob, rel_tol=1e-4)
            continue
        n = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix = torch.tensor([list(tokenizer.sot_sequence) + a[:n]], device="cuda")
        with torch.no_grad():
            logits = ref.logits(prefix, ref.embed_audio(mel_i[None]))[0, -1]  # (V,)
        pick_a = a[n] if n < len(a) else tokenizer.eot
        pick_b = b[n] if n < len(b) else tokenizer.eot
        gap = float(logits[pick_a] - logits[pick_b])
        assert abs(gap) < 1e-3, f"token {n}: openai {pick_a}, ours {pick_b}, logit gap {gap}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_runs(pt_path, long_audio, dtype):
    model = load_whisper(pt_path, device="cuda", dtype=dtype)
    out = model.transcribe(long_audio.numpy(), beam_size=2, word_timestamps=True)
    assert out.segments and all(math.isfinite(s.avg_logprob) for s in out.segments)
    assert out.language == model.transcribe(long_audio.numpy(), temperature=0.0).language
