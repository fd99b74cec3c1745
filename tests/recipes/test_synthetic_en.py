"""The synthetic English recipe: text splits, espeak-ng (system or unpacked .deb), audio helpers,
WeNet export (against WeNet-written fixtures) and a tiny end-to-end run on CPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
import yaml

import speechrt
from speechrt.audio.cmvn import cmvn_from_stats
from speechrt.models.conformer import load_wenet

REPO = Path(__file__).resolve().parents[2]
# The recipe lives in <repo>/recipes/synthetic_en (relative imports inside). It is imported here
# as the top-level package ``synthetic_en``: the name ``recipes`` is this test folder's package.
if str(REPO / "recipes") not in sys.path:
    sys.path.insert(0, str(REPO / "recipes"))

from synthetic_en import augment, espeak, lexicon, textgen  # noqa: E402
from synthetic_en import wenet_dir as wd  # noqa: E402

DEB_DIR = REPO / ".carry" / "debs"
LIBRI = "assets/librispeech_test_clean_subset/trans.txt"


def _system_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def _debs() -> bool:
    return any(DEB_DIR.glob("espeak-ng_*.deb")) and shutil.which("dpkg") is not None


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    """A word list: the system dictionary, else wamerican from the .deb files, else the lexicon."""
    for cand in (Path("/usr/share/dict/words"),):
        if cand.is_file():
            return cand
    if _debs():
        root = espeak.unpack_debs(DEB_DIR, tmp_path_factory.mktemp("debs") / "root")
        found = espeak.find_word_list([root])
        if found:
            return found
    path = tmp_path_factory.mktemp("words") / "words"
    extra = ["Boston", "quietly", "marvelous", "jumped", "singing", "teacher's", "xylophone"]
    path.write_text("\n".join(lexicon.NOUNS + lexicon.ADJECTIVES + extra) + "\n")
    return path


# ---------------------------------------------------------------- text
def test_inflections():
    assert [textgen.plural(w) for w in ("box", "city", "day", "child")] == [
        "boxes", "cities", "days", "children"]
    assert [textgen.past(w) for w in ("stop", "carry", "bake", "go")] == [
        "stopped", "carried", "baked", "went"]
    assert [textgen.gerund(w) for w in ("make", "run", "see", "play")] == [
        "making", "running", "seeing", "playing"]
    assert textgen.third_person("watch") == "watches"


def test_normalize_and_contains_line():
    assert textgen.normalize("HE COULD, wait! No-longer 'twas") == "he could wait no longer twas"
    lines = ["he could wait no longer"]
    assert textgen.contains_line("so he could wait no longer today", lines)
    assert textgen.contains_line("he could wait no longer", lines)
    assert not textgen.contains_line("she could wait no longers", lines)


def test_sentences_use_only_units_and_are_deterministic(words):
    d = textgen.load_dictionary(words)
    a = textgen.generate_sentences(300, 11, d)
    assert a == textgen.generate_sentences(300, 11, d)
    assert len(set(a)) == 300
    allowed = set("abcdefghijklmnopqrstuvwxyz' ")
    assert all(set(s) <= allowed and "  " not in s and s == s.strip() for s in a)
    ids = wd.unit_ids()
    assert all(ids["<unk>"] not in wd.tokenize(s, ids) for s in a)


def test_exclusions_remove_test_sentences_and_heldout_lines(words, shared):
    d = textgen.load_dictionary(words)
    plain = textgen.generate_sentences(400, 3, d)
    # Plant exclusions the generator does produce: whole sentences, and short word runs.
    exclude = set(plain[:50])
    runs = sorted({" ".join(s.split()[:2]) for s in plain[50:80] if len(s.split()) > 3})
    libri = textgen.read_transcripts(shared / LIBRI)
    assert len(libri) == 87 and libri[1] == "he could wait no longer"
    kept = textgen.generate_sentences(400, 3, d, exclude=exclude, forbidden_lines=runs + libri)
    assert not exclude & set(kept)
    assert not any(textgen.contains_line(s, runs + libri) for s in kept)
    assert kept != plain


# ---------------------------------------------------------------- audio helpers
def test_resample_matches_soxr():
    rate = 22050
    t = np.arange(rate * 2) / rate
    x = sum(np.sin(2 * np.pi * f * t + f) for f in (110.0, 950.0, 3100.0, 6000.0)) / 4
    ours = augment.resample(x.astype(np.float32), rate, 16000)
    ref = soxr.resample(x.astype(np.float32), rate, 16000, "VHQ")
    n = min(len(ours), len(ref))
    assert abs(len(ours) - len(ref)) <= 1
    assert np.abs(ours[200 : n - 200] - ref[200 : n - 200]).max() < 2e-3


def test_wav_io_matches_soundfile(tmp_path):
    x = (np.random.default_rng(0).standard_normal(1601) * 0.2).clip(-1, 1).astype(np.float32)
    augment.write_wav(tmp_path / "a.wav", x, 16000)
    ref, rate = sf.read(tmp_path / "a.wav", dtype="float32")
    ours, rate2 = augment.read_wav(tmp_path / "a.wav")
    assert rate == rate2 == 16000
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_allclose(ours, x, rtol=0, atol=0.5 / 32768 + 1e-7)


def test_augment_is_reproducible_and_bounded():
    x = np.sin(np.arange(16000) / 10).astype(np.float32) * 0.5
    cfg = augment.AugmentConfig(p_reverb=1.0, p_noise=1.0, p_low_pass=1.0)
    a = augment.augment(x, 16000, np.random.default_rng(5), cfg)
    b = augment.augment(x, 16000, np.random.default_rng(5), cfg)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() <= 1.0 and len(a) >= len(x) and np.std(a) > 0.005


# ---------------------------------------------------------------- espeak-ng
def test_espeak_from_unpacked_debs(tmp_path):
    """fetch_debs.sh output, unpacked with dpkg -x, runs without the system's libraries."""
    if not _debs():
        pytest.skip(f"no espeak-ng .deb files in {DEB_DIR} (recipes/synthetic_en/fetch_debs.sh)")
    eng = espeak.find_espeak(DEB_DIR, tmp_path / "root", use_system=False)
    assert eng.source == "debs" and eng.binary.startswith(str(tmp_path))
    ldd = subprocess.run(["ldd", eng.binary], env=eng.environ(), capture_output=True, text=True)
    assert "not found" not in ldd.stdout
    for line in ldd.stdout.splitlines():  # everything but the C runtime comes from the debs
        if "=>" in line and not any(c in line for c in ("libc.so", "libm.so", "linux-vdso")):
            assert str(tmp_path) in line, line
    params = espeak.VoiceParams("en-us", "f2", 160, 50, 0)
    pcm, rate = espeak.run_espeak("the quick brown fox", params, eng)
    assert rate == 22050 and pcm.dtype == np.int16 and 0.6 < len(pcm) / rate < 3.0
    if _system_espeak():  # same program and data: identical samples
        ref, _ = espeak.run_espeak("the quick brown fox", params, espeak.Espeak("espeak-ng"))
        np.testing.assert_array_equal(pcm, ref)


# ---------------------------------------------------------------- WeNet export
@pytest.mark.parametrize("name", ["u2pp_bidecoder", "conformer_ctc_aed"])
def test_export_reproduces_wenet_checkpoints(shared, name):
    """speechrt's model -> our WeNet state dict == the final.pt WeNet itself wrote."""
    fixture = shared / "fixtures" / "wenet" / name
    ref = torch.load(fixture / "final.pt", map_location="cpu", weights_only=True)
    model = load_wenet(fixture, device="cpu")
    ours = wd.wenet_state_dict(model.net, torch.float32)
    assert list(ours) == list(ref)  # same names, same order (pe tables, BatchNorm counter)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=k)


def test_train_yaml_has_wenet_layout(shared):
    ref = yaml.safe_load((shared / "fixtures/wenet/u2pp_bidecoder/train.yaml").read_text())
    ours = wd.build_train_yaml(wd.PRESETS["default"], wd.TrainingConf())
    assert set(ours) == set(ref)
    for section, conf in ref.items():
        if isinstance(conf, dict):
            assert set(conf) <= set(ours[section]), section
    assert ours["output_dim"] == ours["vocab_size"] == len(wd.UNITS)
    assert ours["tokenizer_conf"]["special_tokens"]["<sos>"] == len(wd.UNITS) - 1


def test_default_model_size(tmp_path):
    raw = wd.build_train_yaml(wd.PRESETS["default"], wd.TrainingConf())
    cfg, net = wd.build_model(raw)
    assert sum(p.numel() for p in net.parameters()) < 10_000_000
    cmvn = tmp_path / "cmvn"
    cmvn.write_text(json.dumps({"mean_stat": [1.0] * 80, "var_stat": [2.0] * 80,
                                "frame_num": 1}))
    out = wd.export_model_dir(tmp_path / "m", raw, net.state_dict(), cmvn)
    assert (out / "final.pt").stat().st_size < 20_000_000
    sd = torch.load(out / "final.pt", weights_only=True)
    assert sd["encoder.embed.pos_enc.pe"].shape == (1, 5000, 144)
    assert sd["decoder.right_decoder.embed.1.pe"].dtype == torch.float16
    assert speechrt.load_model(out, device="cpu").cfg.decoder.kind == "bitransformer"


# ---------------------------------------------------------------- end to end
def _read_text(path: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in path.read_text().splitlines())


def test_tiny_pipeline(tmp_path, shared, words, capsys):
    if not _system_espeak() and not _debs():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng) and no .deb files "
                    f"in {DEB_DIR} (recipes/synthetic_en/fetch_debs.sh)")
    from synthetic_en import export, prepare_data, train

    data, exp = tmp_path / "data", tmp_path / "exp"
    prepare_data.main([
        "--out", str(data), "--num-train", "12", "--num-dev", "3", "--num-test", "3",
        "--workers", "2", "--shard-size", "6", "--deb-dir", str(DEB_DIR), "--words", str(words),
        "--heldout-text", str(shared / LIBRI),
    ])
    texts = {s: _read_text(data / s / "text") for s in ("train", "dev", "test")}
    assert [len(t) for t in texts.values()] == [12, 3, 3]
    assert not set(texts["test"].values()) & (set(texts["train"].values())
                                              | set(texts["dev"].values()))
    libri = textgen.read_transcripts(shared / LIBRI)
    assert not any(textgen.contains_line(s, libri) for s in texts["train"].values())
    # global_cmvn holds the statistics of exactly the training features.
    rows = np.concatenate([np.load(p).astype(np.float64)
                           for p in sorted((data / "train" / "shards").glob("*.npy"))])
    stats = json.loads((data / "train" / "global_cmvn").read_text())
    assert stats["frame_num"] == len(rows)
    np.testing.assert_allclose(stats["mean_stat"], rows.sum(0), rtol=1e-9)

    train.main(["--data", str(data), "--exp", str(exp), "--preset", "tiny", "--steps", "20",
                "--device", "cpu", "--max-frames", "20000", "--lr", "4e-3", "--warmup-frac",
                "0.1", "--log-every", "1", "--eval-every", "100", "--average", "3"])
    log = [json.loads(x) for x in (exp / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 20 and np.mean(losses[-3:]) < 0.85 * np.mean(losses[:2])

    # A run paused after 7 steps and resumed (the per-command limit of the GPU machine) ends
    # with the same weights as the uninterrupted run.
    exp2 = tmp_path / "exp_resumed"
    args = ["--data", str(data), "--exp", str(exp2), "--preset", "tiny", "--steps", "20",
            "--device", "cpu", "--max-frames", "20000", "--lr", "4e-3", "--warmup-frac", "0.1",
            "--log-every", "1", "--eval-every", "100", "--average", "3"]
    train.main(args + ["--pause-after-steps", "7"])
    assert (exp2 / "resume.pt").exists() and not (exp2 / "train_info.json").exists()
    train.main(args + ["--resume"])
    assert not (exp2 / "resume.pt").exists()
    for snap in sorted((exp / "snapshots").glob("*.pt")):
        a = torch.load(snap, weights_only=True)
        b = torch.load(exp2 / "snapshots" / snap.name, weights_only=True)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    model_dir = export.export(exp, tmp_path / "model", average=3)
    sd = torch.load(model_dir / "final.pt", weights_only=True)
    mean, istd = cmvn_from_stats(torch.tensor(stats["mean_stat"]),
                                 torch.tensor(stats["var_stat"]), stats["frame_num"])
    torch.testing.assert_close(sd["encoder.global_cmvn.mean"], mean)
    model = speechrt.load_model(model_dir, device="cpu")
    wav = sorted((data / "test" / "wav").glob("*.wav"))[0]
    result = model.transcribe(str(wav), method="attention_rescoring", reverse_weight=0.3)
    assert isinstance(result.text, str) and set(result.text) <= set("abcdefghijklmnopqrstuvwxyz' ")
