"""speechrt.audio.fbank against kaldi-native-fbank on real speech and against the WeNet fixtures."""

from __future__ import annotations

import dataclasses
import json
import math

import kaldi_native_fbank as knf
import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from speechrt.audio.fbank import FbankOptions, fbank, num_frames, wenet_fbank
from speechrt.errors import AudioError, UnsupportedOptionError

# A bin "within 40 dB of its frame's peak": natural-log power >= max - 40 * ln(10) / 10.
LOG_40DB_POWER = 40 * math.log(10) / 10
LOG_40DB_MAGNITUDE = 40 * math.log(10) / 20  # use_power=False: log of |X|, 20 log10 per dB
ATOL = 1e-3

AUDIO = {
    "aishell_0121": "assets/aishell1_samples/BAC009S0764W0121.wav",
    "aishell_0122": "assets/aishell1_samples/BAC009S0764W0122.wav",
    "wenet_aishell": "assets/wenet_test_resources/aishell-BAC009S0724W0121.wav",
    "wenet_libri": "assets/wenet_test_resources/librispeech-1995-1837-0001.wav",
    "wenet_long": "assets/wenet_test_resources/long.wav",
    "wenet_mid": "assets/wenet_test_resources/mid.wav",
    "libri_1089": "assets/librispeech_test_clean_subset/audio/1089-134686-0000.flac",
    "libri_1089b": "assets/librispeech_test_clean_subset/audio/1089-134691-0000.flac",
    "libri_121": "assets/librispeech_test_clean_subset/audio/121-121726-0000.flac",
    "jfk_44k": "assets/whisper_assets/jfk.flac",
}

# Options other than sample_frequency (WeNet's defaults are checked on every file above).
COMBO_FILES = ("aishell_0121", "wenet_libri", "libri_1089b", "jfk_44k")
COMBOS = {
    "hamming_40bins": dict(window_type="hamming", num_mel_bins=40),
    "hanning_no_snip": dict(window_type="hanning", snip_edges=False),
    "rectangular_20ms_5ms": dict(window_type="rectangular", frame_length=20.0, frame_shift=5.0),
    "blackman_no_snip_40": dict(window_type="blackman", snip_edges=False, num_mel_bins=40),
    "sine": dict(window_type="sine"),
    "hann_periodic": dict(window_type="hann"),
    "energy_floor": dict(use_energy=True, energy_floor=1e8),
    "energy_windowed": dict(use_energy=True, raw_energy=False, snip_edges=False),
    "fft_400": dict(round_to_power_of_two=False),
    "frame_50ms_12_5ms": dict(frame_length=50.0, frame_shift=12.5),
    "short_frame_long_shift": dict(frame_length=8.0, frame_shift=10.0, num_mel_bins=23),
    "band_64_minus400": dict(low_freq=64.0, high_freq=-400.0, num_mel_bins=64),
    "band_abs_high": dict(low_freq=0.0, high_freq=5000.0, num_mel_bins=23),
    "no_preemph_no_dc": dict(preemphasis_coefficient=0.0, remove_dc_offset=False),
    "magnitude": dict(use_power=False),
}


def knf_fbank(samples: np.ndarray, opts: FbankOptions) -> np.ndarray:
    """kaldi-native-fbank features (T, D) of one utterance, dither 0."""
    k = knf.FbankOptions()
    f = k.frame_opts
    f.samp_freq = opts.sample_frequency
    f.frame_length_ms, f.frame_shift_ms = opts.frame_length, opts.frame_shift
    f.dither, f.preemph_coeff = opts.dither, opts.preemphasis_coefficient
    f.remove_dc_offset, f.window_type = opts.remove_dc_offset, opts.window_type
    f.round_to_power_of_two, f.blackman_coeff = opts.round_to_power_of_two, opts.blackman_coeff
    f.snip_edges = opts.snip_edges
    m = k.mel_opts
    m.num_bins, m.low_freq, m.high_freq = opts.num_mel_bins, opts.low_freq, opts.high_freq
    k.use_energy, k.energy_floor, k.raw_energy = opts.use_energy, opts.energy_floor, opts.raw_energy
    k.use_log_fbank, k.use_power = opts.use_log_fbank, opts.use_power
    online = knf.OnlineFbank(k)
    online.accept_waveform(opts.sample_frequency, np.ascontiguousarray(samples, np.float32))
    online.input_finished()
    frames = [online.get_frame(i) for i in range(online.num_frames_ready)]
    return np.stack(frames) if frames else np.zeros((0, opts.feature_dim), np.float32)


def assert_close_within_40db(ours: np.ndarray, ref: np.ndarray, use_power: bool = True) -> None:
    """|ours - ref| <= 1e-3 on every log-fbank bin within 40 dB of its frame's peak."""
    assert ours.shape == ref.shape
    span = LOG_40DB_POWER if use_power else LOG_40DB_MAGNITUDE
    keep = ref >= ref.max(axis=-1, keepdims=True) - span
    err = np.abs(ours - ref)[keep]
    assert err.size and err.max() <= ATOL, f"max error {err.max():.3g} on {err.size} bins"


@pytest.fixture(scope="module")
def speech(shared) -> dict[str, tuple[np.ndarray, int]]:
    """Real speech as int16-scale float32 mono samples with their rate (jfk stays at 44.1 kHz)."""
    out = {}
    for key, rel in AUDIO.items():
        x, rate = sf.read(shared / rel, dtype="float32", always_2d=True)
        out[key] = (x.mean(axis=1) * 32768.0, rate)
    return out


def _opts(rate: int, **kw) -> FbankOptions:
    return FbankOptions(sample_frequency=float(rate), **kw)


def _check_against_knf(x: np.ndarray, opts: FbankOptions, key: str) -> None:
    feats, count = fbank(torch.from_numpy(x), opts=opts)
    ref = knf_fbank(x, opts)
    assert int(count[0]) == ref.shape[0] == num_frames(len(x), opts), key
    assert_close_within_40db(feats[0].numpy(), ref, opts.use_power)


@pytest.mark.parametrize("key", list(AUDIO))
def test_wenet_options_match_knf_on_every_file(speech, key):
    x, rate = speech[key]
    _check_against_knf(x, _opts(rate), key)


@pytest.mark.parametrize("combo", list(COMBOS), ids=list(COMBOS))
def test_option_combinations_match_knf(speech, combo):
    for key in COMBO_FILES:
        x, rate = speech[key]
        _check_against_knf(x, _opts(rate, **COMBOS[combo]), key)


@pytest.mark.parametrize("snip_edges", [True, False])
@pytest.mark.parametrize("num_mel_bins", [23, 40])
def test_matches_knf_at_8khz(speech, snip_edges, num_mel_bins):
    opts = _opts(8000, snip_edges=snip_edges, num_mel_bins=num_mel_bins)
    for key in ("aishell_0121", "wenet_libri", "libri_1089b"):
        x, rate = speech[key]
        x8 = soxr.resample(x, rate, 8000, quality="HQ")
        feats, _ = fbank(torch.from_numpy(x8), opts=opts)
        assert_close_within_40db(feats[0].numpy(), knf_fbank(x8, opts))


def test_linear_fbank_matches_knf(speech):
    """use_log_fbank=False: relative error 1e-3 on bins within 40 dB of the frame peak."""
    x, rate = speech["wenet_mid"]
    opts = _opts(rate, use_log_fbank=False)
    ours = fbank(torch.from_numpy(x), opts=opts)[0][0].numpy()
    ref = knf_fbank(x, opts)
    keep = ref >= ref.max(axis=-1, keepdims=True) * 1e-4
    assert keep.sum() > ref.size // 2
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=1e-3)


def test_energy_floor_is_applied(speech):
    x, rate = speech["aishell_0121"]
    opts = _opts(rate, use_energy=True, energy_floor=1e8)
    energy = fbank(torch.from_numpy(x), opts=opts)[0][0, :, 0]
    floored = energy == torch.tensor(math.log(1e8))
    assert 0 < int(floored.sum()) < energy.numel()  # the floor matters for some frames only


@pytest.mark.parametrize("snip_edges", [True, False])
@pytest.mark.parametrize(
    ("frame_length", "frame_shift"), [(25.0, 10.0), (5.0, 10.0), (32.0, 8.0)], ids=str
)
def test_short_inputs_and_edges_match_knf(snip_edges, frame_length, frame_shift):
    """Tiny signals exercise Kaldi's repeated reflection and the frame-count rule."""
    opts = FbankOptions(
        snip_edges=snip_edges, frame_length=frame_length, frame_shift=frame_shift, num_mel_bins=23
    )
    gen = np.random.default_rng(0)
    for n in (1, 2, 79, 80, 81, 159, 160, 199, 200, 399, 400, 401, 560, 1601):
        x = (gen.standard_normal(n) * 3000).astype(np.float32)
        feats, count = fbank(torch.from_numpy(x), opts=opts)
        ref = knf_fbank(x, opts)
        assert int(count[0]) == ref.shape[0] == num_frames(n, opts) == feats.shape[1], n
        if ref.shape[0]:
            assert_close_within_40db(feats[0].numpy(), ref)


@pytest.mark.parametrize("snip_edges", [True, False])
def test_num_frames_matches_knf_and_accepts_tensors(snip_edges):
    opts = FbankOptions(snip_edges=snip_edges, num_mel_bins=23)
    sizes = list(range(0, 1300, 37)) + [16000, 16001, 16079, 16080, 16081]
    expected = []
    for n in sizes:
        online = knf.OnlineFbank(_knf_opts_for_count(opts))
        online.accept_waveform(16000, np.ones(n, np.float32))
        online.input_finished()
        expected.append(online.num_frames_ready)
    assert [num_frames(n, opts) for n in sizes] == expected
    assert num_frames(torch.tensor(sizes), opts).tolist() == expected


def _knf_opts_for_count(opts: FbankOptions) -> knf.FbankOptions:
    k = knf.FbankOptions()
    k.frame_opts.dither = 0.0
    k.frame_opts.snip_edges = opts.snip_edges
    k.mel_opts.num_bins = opts.num_mel_bins
    return k


def _fixture_batch(shared, fixture: str) -> tuple[torch.Tensor, torch.Tensor, np.lib.npyio.NpzFile]:
    """[-1, 1] waveforms (B, N) and lengths (B,) of the sample ranges listed by a fixture."""
    ref = np.load(shared / "fixtures" / fixture / "reference.npz")
    rows = []
    for item in json.loads(str(ref["meta_json"]))["inputs"]:
        x, _ = sf.read(shared / item["wav"].removeprefix("shared/"), dtype="float32")
        start = item["start_sample"]
        rows.append(torch.from_numpy(x[start : start + item["num_samples"]]))
    lengths = torch.tensor([len(r) for r in rows])
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths, ref


@pytest.mark.parametrize("fixture", ["wenet/conformer_ctc_aed", "wenet/u2pp_bidecoder"])
def test_wenet_fbank_reproduces_fixture_feats(shared, fixture):
    waves, lengths, ref = _fixture_batch(shared, fixture)
    feats, counts = wenet_fbank(waves, lengths)
    expected = ref["feats"]  # (B, T, 80), zero beyond each length
    assert counts.tolist() == ref["feats_lengths"].tolist()
    assert feats.shape == expected.shape
    for b, n in enumerate(counts.tolist()):
        assert_close_within_40db(feats[b, :n].numpy(), expected[b, :n])
        assert not feats[b, n:].any()


@pytest.mark.parametrize("snip_edges", [True, False])
@pytest.mark.parametrize("window_type", ["povey", "hamming"])
def test_padded_batch_equals_each_utterance_alone(speech, snip_edges, window_type):
    """Frames depend only on each row's valid samples, whatever the padding holds."""
    opts = FbankOptions(snip_edges=snip_edges, window_type=window_type)
    x = speech["wenet_libri"][0]
    lengths = torch.tensor([16000, 7919, 401, 150, 24001])
    gen = torch.Generator().manual_seed(0)
    waves = 20000.0 * torch.randn(len(lengths), int(lengths.max()), generator=gen)  # loud padding
    for b, n in enumerate(lengths.tolist()):
        waves[b, :n] = torch.from_numpy(x[1000 * b : 1000 * b + n])
    feats, counts = fbank(waves, lengths, opts)
    assert counts.tolist() == [num_frames(n, opts) for n in lengths.tolist()]
    for b, n in enumerate(lengths.tolist()):
        alone, count = fbank(waves[b, :n], opts=opts)
        assert int(count[0]) == int(counts[b])
        torch.testing.assert_close(feats[b, : counts[b]], alone[0], atol=1e-5, rtol=0)
        assert not feats[b, counts[b] :].any()


def test_rows_without_frames_and_empty_batch():
    opts = FbankOptions()
    feats, counts = fbank(torch.ones(2, 300), torch.tensor([300, 0]), opts)
    assert feats.shape == (2, 0, 80) and counts.tolist() == [0, 0]
    feats, counts = fbank(torch.ones(2, 800) * 100, torch.tensor([800, 399]), opts)
    assert counts.tolist() == [3, 0] and not feats[1].any()


def test_dither_is_seeded_and_matches_knf_noise_level():
    """dither > 0 changes the output, is reproducible with a seeded generator, and adds the same
    noise power as Kaldi (mean log-mel of dithered silence agrees with knf's)."""
    x = torch.zeros(16000 * 20)
    opts = FbankOptions(dither=1.0, num_mel_bins=40)
    a = fbank(x, opts=opts, generator=torch.Generator().manual_seed(1))[0]
    b = fbank(x, opts=opts, generator=torch.Generator().manual_seed(1))[0]
    c = fbank(x, opts=opts, generator=torch.Generator().manual_seed(2))[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)
    plain = fbank(x, opts=dataclasses.replace(opts, dither=0.0))[0]
    assert (a - plain).abs().min() > 1.0  # silence is at log(FLT_EPSILON) without dither
    ref = knf_fbank(x.numpy(), opts)
    np.testing.assert_allclose(a[0].mean(0).numpy(), ref.mean(0), atol=0.15)


def test_wenet_fbank_scales_by_32768(speech):
    x, _ = speech["wenet_mid"]
    ours, _ = wenet_fbank(torch.from_numpy(x / 32768.0))
    direct, _ = fbank(torch.from_numpy(x), opts=FbankOptions(window_type="povey"))
    torch.testing.assert_close(ours, direct, atol=0, rtol=0)


def test_integer_and_float64_inputs_are_accepted(speech):
    x = np.round(speech["aishell_0122"][0]).astype(np.int16)
    as_int, _ = fbank(torch.from_numpy(x))
    as_f64, _ = fbank(torch.from_numpy(x.astype(np.float64)))
    assert as_int.dtype == torch.float32
    torch.testing.assert_close(as_int, as_f64, atol=0, rtol=0)
    assert_close_within_40db(as_int[0].numpy(), knf_fbank(x.astype(np.float32), FbankOptions()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(window_type="kaiser"), "window_type 'kaiser'"),
        (dict(num_mel_bins=2), "num_mel_bins must be >= 3"),
        (dict(num_mel_bins=200, sample_frequency=8000.0), "covers no FFT bin"),
        (dict(low_freq=8000.0), "low_freq"),
        (dict(low_freq=-1.0), "low_freq"),
        (dict(high_freq=8001.0), "high_freq"),
        (dict(high_freq=-8000.0), "high_freq"),
        (dict(low_freq=4000.0, high_freq=3000.0), "low_freq < high_freq"),
        (dict(frame_length=0.1), "frame_length"),
        (dict(frame_shift=0.0), "frame_shift"),
        (dict(sample_frequency=0.0), "sample_frequency"),
        (dict(round_to_power_of_two=False, frame_length=25.0625), "must be even"),
        (dict(preemphasis_coefficient=1.5), "preemphasis_coefficient"),
        (dict(dither=-1.0), "dither"),
        (dict(energy_floor=-1.0), "energy_floor"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_options_raise(kwargs, message):
    with pytest.raises(UnsupportedOptionError, match=message):
        FbankOptions(**kwargs)


@pytest.mark.parametrize(
    ("waves", "lengths", "message"),
    [
        (torch.zeros(2, 3, 400), None, "shape"),
        (torch.zeros(2, 400), torch.tensor([400]), "1 lengths for 2"),
        (torch.zeros(2, 400), torch.tensor([400, 401]), r"\[0, 400\]"),
        (torch.zeros(2, 400), torch.tensor([-1, 400]), r"\[0, 400\]"),
    ],
)
def test_bad_inputs_raise(waves, lengths, message):
    with pytest.raises(AudioError, match=message):
        fbank(waves, lengths)


@pytest.mark.gpu
@pytest.mark.parametrize("snip_edges", [True, False])
def test_cuda_matches_cpu(speech, snip_edges):
    opts = FbankOptions(snip_edges=snip_edges)
    rows = [torch.from_numpy(speech[k][0]) for k in ("aishell_0121", "wenet_libri", "libri_1089")]
    lengths = torch.tensor([len(r) for r in rows])
    waves = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    cpu, cpu_counts = fbank(waves, lengths, opts)
    gpu, gpu_counts = fbank(waves.cuda(), lengths.cuda(), opts)
    assert gpu.is_cuda and torch.equal(gpu_counts.cpu(), cpu_counts)
    for b, n in enumerate(cpu_counts.tolist()):
        assert_close_within_40db(gpu[b, :n].cpu().numpy(), cpu[b, :n].numpy())
