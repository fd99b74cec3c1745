"""End-to-end CLI tests on real audio, including every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechrt.cli.main import main

REPO = Path(__file__).resolve().parents[2]

MODEL = "tests/data/wenet/u2pp_bidecoder"
WAV1 = "tests/data/audio/BAC009S0764W0121.wav"
WAV2 = "tests/data/audio/BAC009S0764W0122.wav"
FLAC = "tests/data/audio/jfk.flac"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str, *needles: str):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert any(
        ln.startswith("speechrt: error:") and all(n in ln for n in needles) for ln in lines
    ), err
    assert "Traceback" not in err


def test_transcribe_text_and_json(capsys):
    code, out, err = run(
        capsys,
        "transcribe",
        "--model",
        MODEL,
        "--method",
        "ctc_prefix_beam_search",
        "--beam-size",
        "4",
        WAV1,
        FLAC,
    )
    assert code == 0, err
    lines = out.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [WAV1, FLAC]
    code, out, _ = run(capsys, "transcribe", "--model", MODEL, "--format", "json", WAV1, WAV2)
    records = json.loads(out)
    assert [r["path"] for r in records] == [WAV1, WAV2]
    for r in records:
        assert set(r) >= {"path", "text", "tokens", "score", "timings"}
        assert isinstance(r["tokens"], list) and r["timings"]["audio_s"] > 4.0


def test_batched_equals_single(capsys):
    _, out_batch, _ = run(
        capsys, "transcribe", "--model", MODEL, "--format", "jsonl", WAV1, WAV2, FLAC
    )
    singles = []
    for f in (WAV1, WAV2, FLAC):
        _, out, _ = run(
            capsys, "transcribe", "--model", MODEL, "--format", "jsonl", "--batch-size", "1", f
        )
        singles.append(json.loads(out))
    batch = [json.loads(ln) for ln in out_batch.splitlines()]
    assert [b["tokens"] for b in batch] == [s["tokens"] for s in singles]
    for b, s in zip(batch, singles):
        assert b["score"] == pytest.approx(s["score"], abs=1e-3)


def test_wav_scp_and_streaming(tmp_path, capsys):
    """Streaming through the CLI gives the API's simulate_streaming tokens."""
    import speechrt

    scp = tmp_path / "wav.scp"
    scp.write_text(f"utt1 {REPO / WAV1}\nutt2 {REPO / WAV2}\n")
    args = [
        "--chunk-size",
        "8",
        "--simulate-streaming",
        "--method",
        "attention",
        "--beam-size",
        "3",
    ]
    code, out, err = run(
        capsys, "transcribe", "--model", MODEL, "--format", "jsonl", *args, str(scp)
    )
    assert code == 0, err
    recs = [json.loads(ln) for ln in out.splitlines()]
    assert [r["key"] for r in recs] == ["utt1", "utt2"]
    model = speechrt.load_model(MODEL, device="cpu")
    api = model.transcribe(
        [WAV1, WAV2],
        method="attention",
        beam_size=3,
        decoding_chunk_size=8,
        simulate_streaming=True,
    )
    assert [r["tokens"] for r in recs] == [list(t.tokens) for t in api]
    full = model.transcribe(WAV1, method="attention", beam_size=3)
    assert recs[0]["tokens"] != list(full.tokens) or recs[0]["score"] != full.score


def test_bad_files_are_reported_and_the_rest_transcribed(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 10)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    text = tmp_path / "notes.txt"
    text.write_text("not audio")
    too_long = tmp_path / "too_long.wav"  # the demo model (conv2d6) accepts at most 300 s
    noise = np.random.default_rng(0).integers(-3000, 3000, 16000 * 301, dtype=np.int16)
    sf.write(too_long, noise, 16000, subtype="PCM_16")
    missing = tmp_path / "missing.wav"
    code, out, err = run(
        capsys,
        "transcribe",
        "--model",
        MODEL,
        "--method",
        "ctc_greedy_search",
        str(corrupt),
        WAV1,
        str(empty),
        str(silent),
        str(text),
        str(missing),
        str(too_long),
    )
    assert code == 1
    assert [ln.split("\t")[0] for ln in out.splitlines()] == [WAV1]
    for f in (corrupt, empty, silent, text, missing, too_long):
        _one_error_line(err, f.name)
    assert "silent" in err and "empty" in err and "limit is 300.0 s" in err


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--model", "tests/data/audio", WAV1], ["not a model directory"]),
        (["--model", "tests/data/nope", WAV1], ["not found"]),
        (["--model", MODEL, "--beam-size", "0", WAV1], ["beam_size"]),
        (["--model", MODEL, "--reverse-weight", "1.5", WAV1], ["reverse_weight"]),
        (["--model", MODEL, "--simulate-streaming", WAV1], ["simulate_streaming"]),
        (["--model", MODEL, "--method", "nope", WAV1], ["invalid choice"]),
        (["--model", MODEL, "--dtype", "int3", WAV1], ["invalid choice"]),
        (["--model", MODEL, "--batch-size", "0", WAV1], ["batch-size"]),
    ],
)
def test_bad_options(capsys, argv, needles):
    try:
        code = main(["transcribe", *argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    _, err = capsys.readouterr()
    assert code == 2
    _one_error_line(err, *needles)


def test_method_the_model_cannot_do(capsys, shared):
    non_streaming = shared / "fixtures" / "wenet" / "conformer_ctc_aed"
    code, _, err = run(
        capsys, "transcribe", "--model", str(non_streaming), "--chunk-size", "8", WAV1
    )
    assert code == 2
    _one_error_line(err, "decoding_chunk_size", "chunks")
    code, _, err = run(
        capsys, "transcribe", "--model", str(non_streaming), "--reverse-weight", "0.3", WAV1
    )
    assert code == 2
    _one_error_line(err, "reverse_weight", "bidirectional")


def test_eval_reports_cer(tmp_path, capsys):
    scp = tmp_path / "wav.scp"
    scp.write_text(f"a {REPO / WAV1}\nb {REPO / WAV2}\n")
    text = tmp_path / "text"
    text.write_text("a 甚至出现交易几乎停滞的情况\nb 一二线城市虽然也处于调整中\n")
    report = tmp_path / "report.json"
    code, out, err = run(
        capsys,
        "eval",
        "--model",
        MODEL,
        "--data",
        str(scp),
        "--text",
        str(text),
        "--method",
        "ctc_greedy_search",
        "--report",
        str(report),
    )
    assert code == 0, err
    rep = json.loads(report.read_text())
    totals = rep["totals"]
    assert totals["ref_len"] == 13 + 13
    assert totals["errors"] > 0  # random weights: errors guaranteed
    assert totals["rate_percent"] == pytest.approx(100 * totals["errors"] / 26)
    assert len(rep["utterances"]) == 2
    assert "%" in err


def test_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "speechrt.cli.main", "transcribe", "--model", str(tmp_path), WAV1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("speechrt: error:") and "Traceback" not in proc.stderr


def test_short_audio_device_and_option_errors(tmp_path, capsys):
    short = tmp_path / "short.wav"
    sf.write(short, 0.1 * np.random.default_rng(0).standard_normal(800).astype(np.float32), 16000)
    code, out, err = run(capsys, "transcribe", "--model", MODEL, str(short), WAV1)
    assert code == 1 and out.startswith(WAV1)
    _one_error_line(err, "short.wav", "at least")
    for argv, needles in (
        (["--device", "gpu"], ["device"]),
        (["--device", "cuda:7"], ["cuda:7"]),
        (["--language", "en"], ["--language", "Whisper"]),
        (["--method", "attention", "--beam-size", "61"], ["beam_size", "vocabulary"]),
    ):
        code, _, err = run(capsys, "transcribe", "--model", MODEL, *argv, WAV1)
        assert code == 2
        _one_error_line(err, *needles)


def test_scp_relative_to_list_and_output_dir(tmp_path, capsys, monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.wav").write_bytes((REPO / WAV1).read_bytes())
    (tmp_path / "a.wav").write_bytes(b"not audio: must not be picked from the cwd")
    (lists / "rel.scp").write_text("utt a.wav\n")
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "out"
    code, out, err = run(
        capsys,
        "transcribe",
        "--model",
        str(REPO / MODEL),
        "--format",
        "jsonl",
        "--output-dir",
        str(out_dir),
        str(lists / "rel.scp"),
    )
    assert code == 0, err
    assert out == ""
    rec = json.loads((out_dir / "a.jsonl").read_text())
    assert rec["key"] == "utt" and rec["path"] == str(lists / "a.wav")


def test_eval_bad_options_and_report_path(tmp_path, capsys):
    scp = tmp_path / "wav.scp"
    scp.write_text(f"a {REPO / WAV1}\n")
    text = tmp_path / "text"
    text.write_text("a 甚至出现交易几乎停滞的情况\n")
    try:
        code = main(
            ["eval", "--model", MODEL, "--data", str(scp), "--text", str(text), "--batch-size", "0"]
        )
    except SystemExit as e:
        code = e.code
    assert code == 2
    _one_error_line(capsys.readouterr().err, "--batch-size")
    code, _, err = run(
        capsys,
        "eval",
        "--model",
        MODEL,
        "--data",
        str(scp),
        "--text",
        str(text),
        "--report",
        str(tmp_path / "no" / "such" / "dir" / "r.json"),
    )
    assert code == 2
    _one_error_line(err, "report")
    bad = tmp_path / "latin1"
    bad.write_bytes("a caf\xe9\n".encode("latin-1"))
    code, _, err = run(capsys, "eval", "--model", MODEL, "--data", str(scp), "--text", str(bad))
    assert code == 2
    _one_error_line(err, "UTF-8")
