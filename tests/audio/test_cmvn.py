"""speechrt.audio.cmvn against the float32 values stored in the WeNet fixtures' final.pt."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from speechrt.audio.cmvn import apply_cmvn, cmvn_from_stats, load_global_cmvn
from speechrt.audio.fbank import wenet_fbank
from speechrt.errors import ModelFormatError

from .test_fbank import LOG_40DB_POWER, _fixture_batch

WENET_FIXTURES = ["wenet/conformer_ctc_aed", "wenet/u2pp_bidecoder"]


def _stats(path) -> tuple[list[float], list[float], float]:
    obj = json.loads(path.read_text())
    return obj["mean_stat"], obj["var_stat"], obj["frame_num"]


def _wenet_oracle(mean_stat, var_stat, n) -> tuple[torch.Tensor, torch.Tensor]:
    """WeNet's _load_json_cmvn loop, in Python floats, then float32."""
    mean = [s / n for s in mean_stat]
    istd = [1.0 / math.sqrt(max(q / n - m * m, 1.0e-20)) for q, m in zip(var_stat, mean)]
    return torch.tensor(mean, dtype=torch.float64).float(), torch.tensor(istd).float()


def _kaldi_text(mean_stat, var_stat, n, one_line: bool = False) -> str:
    row0 = " ".join(repr(float(v)) for v in [*mean_stat, n])
    row1 = " ".join(repr(float(v)) for v in [*var_stat, 0.0])
    return f"[ {row0} {row1} ]" if one_line else f" [\n  {row0}\n  {row1} ]\n"


def _kaldi_binary(mean_stat, var_stat, n, kind: bytes = b"DM ") -> bytes:
    fmt = "<d" if kind == b"DM " else "<f"
    values = [*mean_stat, n, *var_stat, 0.0]
    head = b"\0B" + kind + b"\x04" + struct.pack("<i", 2) + b"\x04"
    head += struct.pack("<i", len(mean_stat) + 1)
    return head + b"".join(struct.pack(fmt, v) for v in values)


@pytest.mark.parametrize("fixture", WENET_FIXTURES)
def test_json_gives_the_float32_values_in_final_pt(shared, fixture):
    mean, istd = load_global_cmvn(shared / "fixtures" / fixture / "global_cmvn")
    state = torch.load(shared / "fixtures" / fixture / "final.pt", map_location="cpu")
    assert mean.dtype == istd.dtype == torch.float32
    assert torch.equal(mean, state["encoder.global_cmvn.mean"])
    assert torch.equal(istd, state["encoder.global_cmvn.istd"])


def test_large_stats_match_wenet_python_loop(shared):
    path = shared / "assets" / "wenet_test_resources" / "global_cmvn"
    mean, istd = load_global_cmvn(path)
    exp_mean, exp_istd = _wenet_oracle(*_stats(path))
    assert torch.equal(mean, exp_mean) and torch.equal(istd, exp_istd)


@pytest.mark.parametrize("one_line", [False, True], ids=["two_lines", "one_line"])
def test_kaldi_text_equals_json(shared, tmp_path, one_line):
    src = shared / "fixtures" / WENET_FIXTURES[0] / "global_cmvn"
    path = tmp_path / "cmvn.ark"
    path.write_text(_kaldi_text(*_stats(src), one_line=one_line))
    for got, want in zip(load_global_cmvn(path), load_global_cmvn(src)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", [b"DM ", b"FM "], ids=["double", "float"])
def test_kaldi_binary_equals_stats(shared, tmp_path, kind):
    mean_stat, var_stat, n = _stats(shared / "assets" / "wenet_test_resources" / "global_cmvn")
    path = tmp_path / "cmvn.bin"
    path.write_bytes(_kaldi_binary(mean_stat, var_stat, n, kind))
    if kind == b"FM ":  # the file holds float32 stats
        mean_stat, var_stat, n = (np.float32(v).tolist() for v in (mean_stat, var_stat, n))
    for got, want in zip(load_global_cmvn(path), _wenet_oracle(mean_stat, var_stat, n)):
        assert torch.equal(got, want)


def test_variance_floor():
    mean, istd = cmvn_from_stats([4.0, 2.0], [8.0, 3.0], 2.0)  # var = [0, 0.5]
    assert mean.tolist() == [2.0, 1.0]
    assert istd.tolist() == [torch.tensor(1e10).item(), torch.tensor(2**0.5).item()]


def test_apply_cmvn_reproduces_conformer_moe_encoder_input(shared):
    """fbank -> CMVN, end to end, against the Conformer-MoE fixture's feats_cmvn (padding too)."""
    waves, lengths, ref = _fixture_batch(shared, "conformer_moe")
    mean, istd = load_global_cmvn(shared / "fixtures" / "conformer_moe" / "global_cmvn")
    feats, counts = wenet_fbank(waves, lengths)
    out = apply_cmvn(feats, mean, istd)
    expected = torch.from_numpy(ref["feats_cmvn"])
    assert out.shape == expected.shape and counts.tolist() == ref["feats_lengths"].tolist()
    raw = expected / istd + mean  # the fbank the fixture normalised
    keep = raw >= raw.amax(-1, keepdim=True) - LOG_40DB_POWER
    keep &= torch.arange(out.shape[1])[None, :, None] < counts[:, None, None]
    assert ((out - expected).abs() / istd)[keep].max() <= 1e-3
    torch.testing.assert_close(out[1, counts[1] :], expected[1, counts[1] :], atol=0, rtol=0)


def test_apply_cmvn_follows_feats_device_and_dtype():
    feats = torch.randn(2, 5, 3, dtype=torch.float64)
    mean, istd = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 2.0, 4.0])
    out = apply_cmvn(feats, mean, istd)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[..., 2], (feats[..., 2] - 3.0) * 4.0)
    with pytest.raises(ModelFormatError, match="dimension 3 but the features have 4"):
        apply_cmvn(torch.zeros(1, 4), mean, istd)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello", "not a CMVN file"),
        (b'{"mean_stat": [1.0], "var_stat": [2.0]}', "frame_num"),
        (b'{"mean_stat": [1.0', "not a WeNet JSON CMVN file"),
        (b'{"mean_stat": [1.0, 2.0], "var_stat": [2.0], "frame_num": 3}', "must be equal"),
        (b'{"mean_stat": [1.0], "var_stat": [2.0], "frame_num": 0}', "frame count must be > 0"),
        (b"[ 1 2 3 ]", r"2 x \(D\+1\) values, got 3"),
        (b"[ 1 2 x 0 ]", "bad Kaldi text matrix"),
        (b"[ 1 2 3 4 ", r"enclosed in '\[ ... \]'"),
        (b"\0BXM \x04", "unsupported Kaldi binary matrix header"),
        (_kaldi_binary([1.0], [2.0], 3.0)[:-4], "got 2 x 2 in 28 bytes"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_files_raise_model_format_error(tmp_path, content, message):
    path = tmp_path / "global_cmvn"
    path.write_bytes(content)
    with pytest.raises(ModelFormatError, match=message) as info:
        load_global_cmvn(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFormatError, match="CMVN file not found: .*nope"):
        load_global_cmvn(tmp_path / "nope")
