"""CPU smoke run of ``speechrt bench whisper`` on a toy Whisper (2 layers, width 64).

The decode loops of the other providers double as an independent check of speechrt's
static-cache step: with the same weights (copied through the checkpoint key maps) their last
logits must agree with speechrt's to FP32 rounding.
"""

from __future__ import annotations

import csv
import importlib.util
import math

import pytest

from speechrt.benchmark.whisper import WhisperBench, WhisperBenchConfig
from speechrt.cli.main import main
from speechrt.models.whisper.config import WhisperDims

TOY = WhisperDims(80, 1500, 64, 2, 2, 51865, 32, 64, 2, 2)
INSTALLED = {
    p: importlib.util.find_spec(m) is not None
    for p, m in (("openai", "whisper"), ("hf", "transformers"))
}


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("whisper_bench")
    cfg = WhisperBenchConfig(
        custom_dims={"toy": TOY},
        enc_batches=(1,),
        batches=(1, 2),
        steps=4,
        dtypes=("fp32",),
        device="cpu",
        out=out,
    )
    result = WhisperBench(cfg).run()
    with open(out / "whisper.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows, result


def test_rows_per_installed_provider(bench_out):
    _, rows, result = bench_out
    expected = ["speechrt"] + [p for p, ok in INSTALLED.items() if ok]
    for provider in expected:
        enc = [r for r in rows if r["provider"] == provider and r["part"] == "encoder"]
        dec = [r for r in rows if r["provider"] == provider and r["part"] == "decode"]
        assert [int(r["B"]) for r in enc] == [1], (provider, result["notes"])
        assert sorted(int(r["B"]) for r in dec) == [1, 2], (provider, result["notes"])
        for r in enc:
            assert float(r["latency_ms"]) > 0 and float(r["audio_s_per_s"]) > 0
        for r in dec:
            assert float(r["ms_per_token"]) > 0 and float(r["tokens_per_s"]) > 0
    for provider, ok in INSTALLED.items():
        if not ok:
            assert any(n.startswith(f"{provider}: skipped") for n in result["notes"])
    assert not [n for n in result["notes"] if "skipped" not in n], result["notes"]


@pytest.mark.skipif(not INSTALLED["openai"], reason="openai-whisper is not installed")
def test_openai_logits_agree_with_speechrt(bench_out):
    _, rows, _ = bench_out
    diffs = [float(r["logit_diff"]) for r in rows if r["provider"] == "openai" and r["logit_diff"]]
    assert len(diffs) == 2
    assert max(diffs) < 1e-3


def test_markdown_report(bench_out):
    out, _, _ = bench_out
    md = (out / "whisper.md").read_text()
    assert "## Encoder" in md and "## Decode" in md and '"torch"' in md


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--presets", "tiny,huge"], "huge"),
        (["--providers", "speechrt,onnx"], "onnx"),
        (["--steps", "446"], "--steps"),
        (["--dtypes", "fp8"], "fp8"),
        (["--e2e-preset", "huge"], "huge"),
        (["--e2e-only"], "--e2e-only"),
    ],
)
def test_cli_rejects_bad_options(capsys, tmp_path, argv, needle):
    code = main(["bench", "whisper", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("speechrt: error:") and needle in err


@pytest.mark.gpu
def test_gpu_graph_step_matches_eager(tmp_path):
    cfg = WhisperBenchConfig(
        custom_dims={"toy": TOY},
        enc_batches=(1,),
        batches=(1, 4),
        steps=8,
        dtypes=("fp16",),
        providers=("speechrt", "openai"),
        device="cuda",
        out=tmp_path,
    )
    result = WhisperBench(cfg).run()
    assert not [n for n in result["notes"] if "skipped" not in n], result["notes"]
    for provider in ("speechrt_graph", "speechrt_engine", "speechrt_window"):
        assert [r["B"] for r in result["rows"] if r["provider"] == provider] == [1, 4]
    for r in result["rows"]:
        if r["part"] == "decode" and r["provider"] not in ("speechrt", "speechrt_window"):
            assert r["logit_diff"] < 0.1, r
            # measured (a toy model's few MiB can net below the baseline as earlier buffers free)
            assert isinstance(r["peak_mem_MiB"], float), r
        if r["provider"] == "speechrt_engine":  # the window rows reuse its graphs
            assert r["captures"] >= 1 and r["capture_s"] > 0, r
            assert 0 < r["step_ms"] < r["ms_per_token"], r  # the window's fixed cost is gone


def test_e2e_rtfx_on_a_saved_checkpoint(shared, tmp_path):
    import shutil

    import torch

    from speechrt.benchmark.whisper import build_speechrt
    from speechrt.models.whisper.convert import key_map

    net = build_speechrt(TOY, torch.float32, "cpu", seed=1)
    ours = net.state_dict()
    state = {src: ours[dst] for src, dst in key_map(TOY, "openai").items()}
    ckpt = tmp_path / "toy.pt"
    torch.save({"dims": TOY.to_dict(), "model_state_dict": state}, ckpt)
    audio = tmp_path / "audio"
    audio.mkdir()
    shutil.copy(shared / "assets" / "whisper_assets" / "jfk.flac", audio / "jfk.flac")
    cfg = WhisperBenchConfig(e2e_dir=str(audio), e2e_model=str(ckpt), device="cpu", out=tmp_path)
    (row,) = WhisperBench(cfg).e2e_rows()
    assert row["files"] == 1 and abs(row["audio_s"] - 11.0) < 0.1
    assert row["RTFx"] > 0 and row["seconds"] > 0


def test_engine_rows_agree_with_eager(bench_out):
    """On CPU the transcribe-path engine runs the same step eagerly: same last logits; its rows
    carry the steady-state step time and the window's fixed cost."""
    out, rows, _ = bench_out
    for provider in ("speechrt_engine", "speechrt_window"):
        dec = [r for r in rows if r["provider"] == provider and r["part"] == "decode"]
        assert sorted(int(r["B"]) for r in dec) == [1, 2]
        assert all(float(r["ms_per_token"]) > 0 for r in dec)
    for r in rows:
        has_step = r["provider"] == "speechrt_engine"
        assert (r.get("step_ms") not in (None, "")) == has_step, r
        if has_step:
            assert float(r["step_ms"]) > 0 and math.isfinite(float(r["fixed_ms"]))
    assert "step_ms" in (out / "whisper.md").read_text()
    diffs = [float(r["logit_diff"]) for r in rows if r["provider"] == "speechrt_engine"]
    assert len(diffs) == 2 and max(diffs) < 1e-4


def test_forced_e2e_with_random_weights(shared, tmp_path):
    """--e2e-dir without --e2e-model: random weights, token counts forced to trans.txt."""
    import shutil

    from speechrt.models.whisper.tokenizer import get_tokenizer

    audio = tmp_path / "audio"
    audio.mkdir()
    for stem in ("a", "b", "c"):
        shutil.copy(shared / "assets" / "whisper_assets" / "jfk.flac", audio / f"{stem}.flac")
    (audio / "trans.txt").write_text("a AND SO MY FELLOW\nb ASK NOT\nc WHAT YOUR COUNTRY CAN DO\n")
    cfg = WhisperBenchConfig(
        custom_dims={"toy": TOY},
        e2e_dir=str(audio),
        e2e_batches=(1, 2),
        dtypes=("fp32",),
        providers=("speechrt", "openai"),
        device="cpu",
        out=tmp_path,
        e2e_only=True,
    )
    bench = WhisperBench(cfg)
    result = bench.run()
    rows = result["e2e"]
    assert not result["rows"] and "## End to end" in (tmp_path / "whisper.md").read_text()
    tok = get_tokenizer(True, TOY.num_languages)
    expected = sum(
        len(tok.encode(" " + t))
        for t in ("and so my fellow", "ask not", "what your country can do")
    )
    speechrt = [r for r in rows if r["provider"] == "speechrt"]
    assert [r["B"] for r in speechrt] == [1, 2]
    for r in rows:
        assert r["files"] == 3 and abs(r["audio_s"] - 33.0) < 0.3 and r["tokens"] == expected
        assert r["RTFx"] > 0 and r["seconds"] > 0
    if INSTALLED["openai"]:
        assert [r["provider"] for r in rows] == ["speechrt", "speechrt", "openai"]
        assert all(r["vs_openai"] > 0 for r in rows)
    assert not bench.notes, bench.notes
