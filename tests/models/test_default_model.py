"""The bundled default model (recipes/synthetic_en, trained on an H200) transcribes the bundled
held-out clips to their reference transcripts (the sentences the clips were synthesised from)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import speechrt
from speechrt.cli.main import main
from speechrt.errors import ModelFormatError
from speechrt.models.registry import DEFAULT_MODEL, bundled_model_dir

REPO = Path(__file__).resolve().parents[2]
CLIPS = REPO / "examples" / "audio"


def _references() -> dict[str, str]:
    lines = (CLIPS / "text").read_text(encoding="utf-8").splitlines()
    return dict(line.split(" ", 1) for line in lines)


@pytest.fixture(scope="module")
def model():
    return speechrt.load_model(device="cpu")  # no path: the bundled default


def test_bundled_model_is_small_and_wenet_format():
    d = bundled_model_dir()
    assert {p.name for p in d.iterdir()} >= {"final.pt", "train.yaml", "units.txt", "global_cmvn"}
    assert (d / "final.pt").stat().st_size < 20e6
    sd = torch.load(d / "final.pt", map_location="cpu", weights_only=True)
    n_params = sum(t.numel() for k, t in sd.items() if not k.endswith(".pe"))
    assert n_params < 10e6
    # FP16 weights; the CMVN statistics stay float32 (they scale raw fbank, up to ~1e1..1e2).
    assert {k for k, t in sd.items() if t.is_floating_point() and t.dtype != torch.float16} == {
        "encoder.global_cmvn.mean", "encoder.global_cmvn.istd"}


@pytest.mark.parametrize("method", ["attention_rescoring", "ctc_greedy_search"])
def test_transcribes_bundled_clips_to_their_reference(model, method):
    refs = _references()
    keys = sorted(refs)
    results = model.transcribe([str(CLIPS / f"{k}.wav") for k in keys], method=method,
                               reverse_weight=0.3 if method == "attention_rescoring" else 0.0)
    assert [r.text for r in results] == [refs[k] for k in keys]


def test_by_name_equals_default(model):
    named = speechrt.load_model(DEFAULT_MODEL, device="cpu")
    wav = str(CLIPS / "syn_test_0000094.wav")
    assert named.transcribe(wav).text == model.transcribe(wav).text
    with pytest.raises(ModelFormatError, match="no bundled model"):
        bundled_model_dir("nonexistent")


def test_cli_transcribe_without_model_uses_it(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    refs = _references()
    wav = "examples/audio/syn_test_0000026.wav"
    assert main(["transcribe", wav]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{wav}\t{refs['syn_test_0000026']}", err


def test_a_local_folder_named_like_it_that_is_no_model_does_not_hide_it(tmp_path, monkeypatch):
    """``recipes/`` holds a ``synthetic_en`` folder (the recipe): the name still means the
    bundled model there; a local folder of that name that *is* a model wins."""
    from speechrt.models.registry import resolve_model_path

    (tmp_path / "synthetic_en").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("synthetic_en") == bundled_model_dir()
    assert resolve_model_path("synthetic_en/") == bundled_model_dir()
    (tmp_path / "synthetic_en" / "train.yaml").write_text("{}")
    assert resolve_model_path("synthetic_en") == Path("synthetic_en")
