"""``speechrt transcribe`` on a Whisper checkpoint: text, json and subtitle formats, bad files."""

from __future__ import annotations

import json
import re

import numpy as np
import soundfile as sf

from speechrt.cli.main import main


def test_whisper_cli_formats(pt_path, shared, tmp_path, capsys):
    jfk = str(shared / "assets" / "whisper_assets" / "jfk.flac")
    assert main(["transcribe", "--model", str(pt_path), "--format", "json", jfk]) == 0
    rec = json.loads(capsys.readouterr().out)[0]
    assert rec["path"] == jfk and rec["segments"] and "language" in rec
    assert main(["transcribe", "--model", str(pt_path), "--format", "srt", jfk]) == 0
    srt = capsys.readouterr().out
    assert re.search(r"^1\n\d\d:\d\d:\d\d,\d\d\d --> \d\d:\d\d:\d\d,\d\d\d\n", srt)
    assert srt.count(" --> ") == len(rec["segments"])
    assert main(["transcribe", "--model", str(pt_path), "--format", "vtt", jfk]) == 0
    assert capsys.readouterr().out.startswith("WEBVTT\n\n")
    out = tmp_path / "subs"
    assert main(["transcribe", "--model", str(pt_path), "--format", "tsv", "--output-dir",
                 str(out), jfk, jfk]) == 0
    assert (out / "jfk.tsv").read_text().startswith("start\tend\ttext\n")


def test_whisper_cli_bad_file_and_options(pt_path, shared, tmp_path, capsys):
    jfk = str(shared / "assets" / "whisper_assets" / "jfk.flac")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    assert main(["transcribe", "--model", str(pt_path), str(empty), jfk]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(jfk) and "empty.wav" in err and "Traceback" not in err
    assert main(["transcribe", "--model", str(pt_path), "--language", "xx", jfk]) == 2
    assert "xx" in capsys.readouterr().err
    assert main(["transcribe", "--model", str(pt_path), "--format", "srt", jfk, jfk]) == 2
    assert "--output-dir" in capsys.readouterr().err
