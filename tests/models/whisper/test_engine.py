"""The transcribe-path engine: padded/bucketed decode sessions, forced lengths, the kernel path,
and (GPU) CUDA-graph replay against eager decoding.

The references are independent of the engine: the bare network driven by
``decoding.whisper.EagerSession`` (unpadded, exact ``kv_len``), and the torch path of the same
network (``kernels=False``) for the Triton kernel path.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from speechrt.audio.log_mel import N_FRAMES, N_SAMPLES
from speechrt.decoding.whisper import WhisperDecodeOptions, WindowDecoder
from speechrt.engine.batching import Buckets
from speechrt.engine.decode_graphs import DecodeEngine
from speechrt.models.whisper import load_whisper
from speechrt.models.whisper.model import EncoderOptions

OPTIONS = [
    {"language": "en", "sample_len": 48},
    {"language": "en", "beam_size": 3, "patience": 2.0, "sample_len": 48},
    {"language": "en", "prompt": [400, 11, 1770], "without_timestamps": True},
]


@pytest.fixture(scope="module")
def features(model, long_audio, jfk) -> torch.Tensor:
    """(3, 1500, 64): three different windows."""
    mel = model.log_mel(long_audio, padding=N_SAMPLES)
    windows = [mel[:, :N_FRAMES], mel[:, 700 : 700 + N_FRAMES]]
    windows.append(model.log_mel(jfk, padding=N_SAMPLES)[:, :N_FRAMES])
    return model.embed_audio(torch.stack(windows))


def _bare(model, features, options) -> list:
    """The reference: the bare network through EagerSession (no engine)."""
    decoder = WindowDecoder(model.tokenizer, options, 448, 1500)
    with torch.inference_mode():
        model.net.ensure_caches(features.shape[0] * decoder.group, features.shape[0])
        model.net.set_audio(features)
        return decoder.run(model.net, features.shape[0], model.device)


def _same(ours, ref) -> None:
    assert [r.tokens for r in ours] == [r.tokens for r in ref]
    for o, r in zip(ours, ref):
        assert math.isclose(o.sum_logprob, r.sum_logprob, rel_tol=1e-4, abs_tol=1e-4)


@pytest.mark.parametrize("options", OPTIONS)
def test_padded_buckets_decode_like_the_bare_network(model, features, options):
    """Audios padded 3 -> 4 and cache lengths bucketed by 8, eagerly on CPU (the padding and
    buckets CUDA graphs use): same tokens as the bare network."""
    opts = WhisperDecodeOptions(**options)
    ref = _bare(model, features, opts)
    engine = model.engine
    model.engine = DecodeEngine(model.net, buckets=Buckets((1, 4)), kv_step=8, pad=True)
    try:
        ours = model.decode_features(features, opts)
        ours_one = model.decode_features(features[2:], opts)  # 1 audio: bucket 1
    finally:
        model.engine = engine
    _same(ours, ref)
    _same(ours_one, ref[2:])


def test_forced_lengths(model, features):
    opts = WhisperDecodeOptions(language="en", without_timestamps=True)
    for options in (opts, WhisperDecodeOptions(language="en", beam_size=2)):
        lengths = torch.tensor([5, 1, 17])  # >= 1: suppress_blank forbids EOT first
        results = model.decode_features(features, options, forced_lengths=lengths)
        assert [len(r.tokens) for r in results] == lengths.tolist()


def test_kernel_path_matches_torch_path(pt_path, features):
    """Triton kernels (interpreted on CPU): fused LayerNorm/residual, decode attention over the
    static cache with its in-kernel cache write; logits and greedy tokens as the torch path."""
    torch_model = load_whisper(pt_path, device="cpu")
    kernel_model = load_whisper(pt_path, device="cpu")
    kernel_model.configure(kernels=True)
    feats = features[1:]  # (2, S, D)
    tokens = torch.tensor([[50258, 50259, 50359, 50364, 400, 11]] * 4)  # 2 audios x 2 rows
    outs = []
    with torch.inference_mode():
        for m in (torch_model, kernel_model):
            m.net.setup_caches(4, 64, 2)
            m.net.set_audio(feats)
            logits = [m.net.prefill(tokens[:, :4])[:, -1]]
            for pos in (4, 5):
                positions = torch.full((4,), pos)
                logits.append(m.net.step(tokens[:, pos : pos + 1], positions, kv_len=pos + 1))
            outs.append(torch.stack(logits))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-4, rtol=2e-4)
    opts = WhisperDecodeOptions(language="en", sample_len=6)
    assert [r.tokens for r in kernel_model.decode_features(feats, opts)] == [
        r.tokens for r in torch_model.decode_features(feats, opts)
    ]
    with torch.inference_mode():
        mel = torch.randn(1, 80, N_FRAMES, generator=torch.Generator().manual_seed(3))
        gold = torch_model.embed_audio(mel)
        encoder = kernel_model.net.encoder
        for packed, epilogue in ((True, True), (False, False)):  # default, then all off
            encoder.options = EncoderOptions(packed, epilogue, fc1_cublaslt=epilogue)
            torch.testing.assert_close(kernel_model.embed_audio(mel), gold, atol=2e-4, rtol=2e-4)
        encoder.options = EncoderOptions()


def test_kernel_encoder_half_residual(pt_path):
    """``residual_fp32`` off (float16): the kernel encoder keeps its residual stream in float16
    as openai-whisper (our torch path) does, and lands as close to the float32 encoder as that
    torch path; the float32 stream (default) is closer still."""
    ref = load_whisper(pt_path, device="cpu", dtype=torch.float32)
    ref.configure(kernels=False)
    model = load_whisper(pt_path, device="cpu", dtype=torch.float16)
    mel = torch.randn(1, 80, N_FRAMES, generator=torch.Generator().manual_seed(5))
    errs = {}
    with torch.inference_mode():
        gold = ref.embed_audio(mel).float()
        model.configure(kernels=False)
        errs["torch"] = (model.embed_audio(mel.half()).float() - gold).abs()
        model.configure(kernels=True)
        encoder = model.net.encoder
        for name, fp32 in (("half", False), ("fp32", True)):
            encoder.options = EncoderOptions(residual_fp32=fp32)
            errs[name] = (model.embed_audio(mel.half()).float() - gold).abs()
        encoder.options = EncoderOptions()
    assert errs["half"].max() <= 1.5 * errs["torch"].max(), {k: v.max() for k, v in errs.items()}
    assert errs["half"].mean() <= 1.2 * errs["torch"].mean()
    assert errs["fp32"].mean() < errs["half"].mean()


# ------------------------------------------------------------------------------------- GPU
CUDA_CASES = [
    ({"temperature": 0.0}, 1),
    ({"temperature": 0.0}, 3),
    ({"temperature": 0.0, "beam_size": 3}, 1),
    ({"temperature": 0.0, "beam_size": 3, "word_timestamps": True}, 3),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("options, batch", CUDA_CASES)
def test_cuda_graphs_transcribe_like_eager(pt_path, long_audio, jfk, options, batch, dtype):
    """Graph-replayed transcription == eager transcription (same kernels, same padding), with
    the capture time printed (pytest -s)."""
    model = load_whisper(pt_path, device="cuda", dtype=dtype)
    audios = [long_audio.numpy(), jfk.numpy(), 0.5 * long_audio.numpy()][:batch]
    model.configure(cuda_graphs=False)
    eager = model.transcribe(audios, batch_size=batch, **options)
    model.configure(cuda_graphs=True)
    t0 = time.perf_counter()
    graphed = model.transcribe(audios, batch_size=batch, **options)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = model.transcribe(audios, batch_size=batch, **options)
    replay_s = time.perf_counter() - t0
    stats = model.engine.stats()
    print(
        f"\n[cuda graphs] {dtype} batch={batch} {options}: {stats['captures']} captures "
        f"in {stats['capture_s']:.3f} s, {stats['replays']} replays; transcribe "
        f"{first_s:.3f} s with captures, {replay_s:.3f} s replaying"
    )
    assert stats["capture_failure"] is None and stats["captures"] > 0 and stats["replays"] > 0
    for e, g, a in zip(eager, graphed, again):
        assert g.tokens == e.tokens and a.tokens == e.tokens
        assert [(s.start, s.end, s.text) for s in g.segments] == [
            (s.start, s.end, s.text) for s in e.segments
        ]


@pytest.mark.gpu
def test_cuda_kernel_path_close_to_torch_path(pt_path, long_audio):
    """fp16 on CUDA: the kernel path's step logits stay close to the torch path's."""
    models = [load_whisper(pt_path, device="cuda", dtype=torch.float16) for _ in range(2)]
    models[0].configure(kernels=False)
    mel = models[0].log_mel(long_audio.numpy(), padding=N_SAMPLES)[:, :N_FRAMES]
    tokens = torch.tensor([[50258, 50259, 50359, 50364, 400, 11, 1770, 13]] * 3, device="cuda")
    outs = []
    with torch.inference_mode():
        for m in models:
            m.net.setup_caches(3, 448, 1)
            m.net.set_audio(m.embed_audio(mel[None]))
            m.net.prefill(tokens[:, :4])
            steps = [
                m.net.step(tokens[:, p : p + 1], torch.full((3,), p, device="cuda"), kv_len=p + 1)
                for p in range(4, 8)
            ]
            outs.append(torch.stack(steps))
    torch.testing.assert_close(outs[1], outs[0], atol=0.05, rtol=0.02)


@pytest.mark.gpu
def test_cuda_encoder_fc1_variants_as_accurate(pt_path, long_audio):
    """fp16 on CUDA: each fc1 path of the kernel encoder (cuBLASLt bias + tanh-GELU epilogue,
    the Triton epilogue with the exact GELU, cuBLAS + GELU kernel) stays as close to the float32
    torch encoder as the others: the tanh form's error is under float16's rounding."""
    ref_model = load_whisper(pt_path, device="cuda", dtype=torch.float32)
    ref_model.configure(kernels=False)
    mel = ref_model.log_mel(long_audio.numpy(), padding=N_SAMPLES)[:, :N_FRAMES][None]
    model = load_whisper(pt_path, device="cuda", dtype=torch.float16)
    model.configure(kernels=True, cuda_graphs=False)
    errs = {}
    with torch.inference_mode():
        gold = ref_model.embed_audio(mel)
        for name, opts in {
            "cublaslt": EncoderOptions(),
            "triton": EncoderOptions(fc1_cublaslt=False),
            "cublas": EncoderOptions(fc1_epilogue=False, fc1_cublaslt=False),
        }.items():
            model.net.encoder.options = opts
            diff = (model.embed_audio(mel.half()).float() - gold).abs()
            errs[name] = (diff.max().item(), diff.mean().item())
        model.net.encoder.options = EncoderOptions()
    worst = max(errs["triton"][0], errs["cublas"][0])
    assert errs["cublaslt"][0] <= 1.5 * worst, errs
    assert errs["cublaslt"][1] <= 1.2 * max(errs["triton"][1], errs["cublas"][1]), errs


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [True, False])
def test_cuda_encoder_graphs_equal_eager(pt_path, long_audio, jfk, kernels):
    """The encoder replayed from its batch-bucket graph (3 windows -> bucket 4, padded with
    silence) gives exactly the eager encoder's features, window by window."""
    model = load_whisper(pt_path, device="cuda", dtype=torch.float16)
    model.configure(kernels=kernels)
    mel = model.log_mel(long_audio.numpy(), padding=N_SAMPLES)
    windows = torch.stack(
        [
            mel[:, :N_FRAMES],
            mel[:, 500 : 500 + N_FRAMES],
            model.log_mel(jfk.numpy(), padding=N_SAMPLES)[:, :N_FRAMES],
        ]
    )
    model.configure(cuda_graphs=False)
    eager = model.embed_audio(windows)
    model.configure(cuda_graphs=True)
    for _ in range(2):  # capture, then replay
        graphed = model.embed_audio(windows)
        assert torch.equal(graphed, eager)
    one = model.embed_audio(windows[1:2])
    torch.testing.assert_close(one, eager[1:2], rtol=0, atol=0)
    stats = model.encoder_graphs.stats
    assert stats.capture_failure is None and stats.captures == 2 and stats.replays == 3
