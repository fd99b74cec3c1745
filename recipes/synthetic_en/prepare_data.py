"""Synthesise the corpus: sentences -> espeak-ng -> 16 kHz -> augmentation -> fbank / WAV lists.

Usage (from the repository root)::

    python -m recipes.synthetic_en.prepare_data --out data/synthetic_en --num-train 40000 \\
        --num-test 500 --workers 16 [--deb-dir .carry/debs] [--heldout-text trans.txt ...]

Output (WeNet-style lists; keys ``syn_<split>_<index>``)::

    train/ dev/   text, utt2voice, feats.idx ("<key> <shard> <row offset> <frames>"),
                  shards/NNNNN.npy (float16 (frames, 80) fbank, rows of consecutive utterances)
    train/global_cmvn   WeNet JSON statistics of the training features
    test/         text, utt2voice, wav.scp (absolute paths), wav/<key>.wav (16 kHz 16-bit mono)
    meta.json     sizes, seeds, sources, timings

Features are ``speechrt.audio.fbank.wenet_fbank`` (80 bins, 25/10 ms, no dither), exactly what
speechrt computes at inference. The test split is fixed by ``--test-seed`` and never depends on
``--num-train``; dev and train sentences exclude it, and all of them exclude the held-out
transcripts (``--heldout-text``, e.g. LibriSpeech's) as whole-word runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import augment as aug
from . import textgen
from .espeak import (
    Espeak,
    EspeakNotFound,
    VoiceParams,
    find_espeak,
    find_word_list,
    list_voices,
    run_espeak,
)

SAMPLE_RATE = 16000
SPLIT_IDS = {"train": 0, "dev": 1, "test": 2}
REPO = Path(__file__).resolve().parents[2]

# espeak-ng English voices (language names) and their sampling weights.
VOICES = {
    "en-us": 0.30, "en": 0.14, "en-gb-x-rp": 0.08, "en-gb-scotland": 0.08,
    "en-gb-x-gbclan": 0.07, "en-gb-x-gbcwmd": 0.07, "en-029": 0.08, "en-us-nyc": 0.08,
}
# Variants (files of espeak-ng-data/voices/!v); "" is the voice's own default.
BASIC_VARIANTS = ["", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]
EXTRA_VARIANTS = [
    "klatt", "klatt2", "klatt3", "klatt4", "Andy", "Annie", "anika", "aunty", "belinda",
    "benjamin", "caleb", "david", "ed", "edward", "grandma", "grandpa", "iven", "john", "linda",
    "max", "michel", "norbert", "paul", "pedro", "quincy", "rob", "robert", "steph", "travis",
    "victor", "zac",
]


@dataclass(frozen=True)
class VoiceSampler:
    """Draws espeak-ng settings: voice, variant, speed (wpm), pitch and word gap."""

    voices: tuple[str, ...]
    voice_weights: tuple[float, ...]
    variants: tuple[str, ...]
    extra_variants: tuple[str, ...]
    p_extra: float = 0.35
    speed: tuple[int, int, int] = (115, 170, 235)  # min, mode, max (triangular)
    pitch: tuple[int, int] = (20, 80)
    p_gap: float = 0.25

    def sample(self, rng: np.random.Generator) -> VoiceParams:
        voice = self.voices[rng.choice(len(self.voices), p=np.asarray(self.voice_weights))]
        pool = self.extra_variants if self.extra_variants and rng.random() < self.p_extra else (
            self.variants)
        return VoiceParams(
            voice=voice,
            variant=pool[rng.integers(len(pool))],
            speed=int(rng.triangular(*self.speed)),
            pitch=int(rng.integers(self.pitch[0], self.pitch[1] + 1)),
            gap=int(rng.integers(1, 4)) if rng.random() < self.p_gap else 0,
        )


def make_voice_sampler(espeak: Espeak) -> VoiceSampler:
    """Keep the voices and variants this espeak-ng has (warn about the others)."""
    have = list_voices(espeak)
    voices = [v for v in VOICES if v in have]
    missing = sorted(set(VOICES) - set(voices))
    if missing:
        print(f"prepare_data: espeak-ng lacks voices {missing}; using {voices}", file=sys.stderr)
    if not voices:
        raise EspeakNotFound(f"espeak-ng has none of the English voices {sorted(VOICES)}")
    data = Path(espeak.env["ESPEAK_DATA_PATH"]) if "ESPEAK_DATA_PATH" in espeak.env else None
    variant_dir = _variant_dir(espeak, data)
    known = {p.name for p in variant_dir.iterdir()} if variant_dir else set()
    weights = np.array([VOICES[v] for v in voices])
    return VoiceSampler(
        voices=tuple(voices),
        voice_weights=tuple((weights / weights.sum()).tolist()),
        variants=tuple(v for v in BASIC_VARIANTS if v == "" or v in known),
        extra_variants=tuple(v for v in EXTRA_VARIANTS if v in known),
    )


def _variant_dir(espeak: Espeak, data: Path | None) -> Path | None:
    roots = [data] if data else []
    roots += [Path(espeak.binary).resolve().parents[1] / "lib", Path("/usr/lib"),
              Path("/usr/share")]
    for root in roots:
        for cand in root.rglob("espeak-ng-data/voices/!v"):
            return cand
    return None


def synthesize(text: str, params: VoiceParams, espeak: Espeak, rng: np.random.Generator,
               cfg: aug.AugmentConfig | None) -> np.ndarray:
    """One utterance: espeak-ng -> 16 kHz float32 (N,) -> augmentation (unless cfg is None)."""
    pcm, rate = run_espeak(text, params, espeak)
    x = aug.resample(pcm.astype(np.float32) / 32768.0, rate, SAMPLE_RATE)
    return aug.augment(x, SAMPLE_RATE, rng, cfg) if cfg is not None else x


# ------------------------------------------------------------------ workers
_STATE: dict = {}


def _init_worker(espeak: Espeak, sampler: VoiceSampler, cfg: aug.AugmentConfig, seed: int):
    import torch

    torch.set_num_threads(1)
    _STATE.update(espeak=espeak, sampler=sampler, cfg=cfg, seed=seed)


def _utterance(split: str, index: int, text: str) -> tuple[np.ndarray, VoiceParams]:
    rng = np.random.default_rng([_STATE["seed"], SPLIT_IDS[split], index])
    params = _STATE["sampler"].sample(rng)
    return synthesize(text, params, _STATE["espeak"], rng, _STATE["cfg"]), params


def _fbank(wavs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """WeNet fbank of each waveform: list of (N_i,) -> (sum T_i, 80) float32 rows, (B,) frames.

    One call per utterance: batching pads every row to the longest and costs more than it saves.
    """
    import torch

    from speechrt.audio.fbank import wenet_fbank

    feats = [wenet_fbank(torch.from_numpy(w))[0][0] for w in wavs]  # each (T_i, 80)
    return torch.cat(feats).numpy(), np.array([len(f) for f in feats])


def _work(task: tuple) -> dict:
    """Synthesise one shard. Features (train/dev) or WAV files (test)."""
    split, shard, start, texts, out_dir = task
    wavs, voices = [], []
    for i, text in enumerate(texts):
        x, params = _utterance(split, start + i, text)
        wavs.append(x)
        voices.append(params.name + f" s{params.speed} p{params.pitch} g{params.gap}")
    keys = [f"syn_{split}_{start + i:07d}" for i in range(len(texts))]
    seconds = float(sum(len(w) for w in wavs)) / SAMPLE_RATE
    result = {"split": split, "shard": shard, "keys": keys, "voices": voices, "seconds": seconds}
    if split == "test":
        for key, x in zip(keys, wavs):
            aug.write_wav(Path(out_dir) / "wav" / f"{key}.wav", x, SAMPLE_RATE)
        return result
    rows, frames = _fbank(wavs)
    rows16 = rows.astype(np.float16)  # stored, and the CMVN statistics describe these values
    np.save(Path(out_dir) / "shards" / f"{shard:05d}.npy", rows16)
    x64 = rows16.astype(np.float64)
    result.update(frames=frames.tolist(), sum=x64.sum(0), sumsq=(x64**2).sum(0))
    return result


# ------------------------------------------------------------------ main
def build_sentences(args, words: Path, heldout: list[str]) -> dict[str, list[str]]:
    dictionary = textgen.load_dictionary(words)
    test = textgen.generate_sentences(args.num_test, args.test_seed, dictionary,
                                      forbidden_lines=heldout)
    dev = textgen.generate_sentences(args.num_dev, args.seed + 1, dictionary,
                                     exclude=set(test), forbidden_lines=heldout)
    train = textgen.generate_sentences(args.num_train, args.seed, dictionary,
                                       exclude=set(test) | set(dev), forbidden_lines=heldout)
    return {"train": train, "dev": dev, "test": test}


def _tasks(split: str, sentences: list[str], shard_size: int, out: Path):
    for shard, start in enumerate(range(0, len(sentences), shard_size)):
        yield split, shard, start, sentences[start : start + shard_size], str(out / split)


def _write_lists(out: Path, split: str, sentences: list[str], results: list[dict]) -> dict:
    results.sort(key=lambda r: r["shard"])
    d = out / split
    keys = [k for r in results for k in r["keys"]]
    voices = [v for r in results for v in r["voices"]]
    (d / "text").write_text("".join(f"{k} {s}\n" for k, s in zip(keys, sentences)))
    (d / "utt2voice").write_text("".join(f"{k} {v}\n" for k, v in zip(keys, voices)))
    info = {"utterances": len(keys), "hours": sum(r["seconds"] for r in results) / 3600}
    if split == "test":
        (d / "wav.scp").write_text(
            "".join(f"{k} {(d / 'wav' / f'{k}.wav').resolve()}\n" for k in keys))
        return info
    lines = []
    for r in results:
        offset = 0
        for k, n in zip(r["keys"], r["frames"]):
            lines.append(f"{k} {r['shard']:05d} {offset} {n}\n")
            offset += n
    (d / "feats.idx").write_text("".join(lines))
    if split == "train":
        stats = {
            "mean_stat": np.sum([r["sum"] for r in results], axis=0).tolist(),
            "var_stat": np.sum([r["sumsq"] for r in results], axis=0).tolist(),
            "frame_num": int(sum(sum(r["frames"]) for r in results)),
        }
        (d / "global_cmvn").write_text(json.dumps(stats) + "\n")
    return info


def default_heldout() -> list[Path]:
    """LibriSpeech transcripts of the shared assets, if this checkout has them."""
    env = os.environ.get("SPEECHRT_SHARED")
    roots = [Path(env)] if env else [REPO.parent / "shared", REPO / "shared"]
    rel = Path("assets/librispeech_test_clean_subset/trans.txt")
    return [r / rel for r in roots if (r / rel).is_file()][:1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-train", type=int, default=40000)
    p.add_argument("--num-dev", type=int, default=300)
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--shard-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--test-seed", type=int, default=777)
    p.add_argument("--deb-dir", type=Path, default=REPO / ".carry" / "debs")
    p.add_argument("--no-system-espeak", action="store_true",
                   help="use the unpacked .deb files even where espeak-ng is installed")
    p.add_argument("--words", type=Path, default=None,
                   help="word list (default: /usr/share/dict/words, else the wamerican .deb)")
    p.add_argument("--heldout-text", type=Path, nargs="*", default=None,
                   help="transcript files never to be used in training text "
                        "(default: the shared LibriSpeech subset if present)")
    p.add_argument("--no-augment", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out: Path = args.out
    unpack_dir = out / "espeak_root"
    espeak = find_espeak(args.deb_dir, unpack_dir, use_system=not args.no_system_espeak)
    words = args.words or find_word_list(["/usr/share/dict/words", unpack_dir])
    if words is None and args.deb_dir.is_dir():  # system espeak but no word list: unpack debs
        find_espeak(args.deb_dir, unpack_dir, use_system=False)
        words = find_word_list([unpack_dir])
    if words is None:
        raise SystemExit("prepare_data: no word list (install wamerican or pass --words)")
    heldout_files = default_heldout() if args.heldout_text is None else args.heldout_text
    heldout = [s for f in heldout_files for s in textgen.read_transcripts(f)]
    sentences = build_sentences(args, words, heldout)
    t_text = time.perf_counter() - t0
    for split in sentences:
        (out / split / ("wav" if split == "test" else "shards")).mkdir(parents=True, exist_ok=True)
    sampler = make_voice_sampler(espeak)
    cfg = None if args.no_augment else aug.AugmentConfig()
    tasks = [t for s in ("test", "dev", "train")
             for t in _tasks(s, sentences[s], args.shard_size, out)]
    results: dict[str, list[dict]] = {s: [] for s in sentences}
    t1 = time.perf_counter()
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(args.workers, _init_worker, (espeak, sampler, cfg, args.seed)) as pool:
        for n, r in enumerate(pool.imap_unordered(_work, tasks), 1):
            results[r["split"]].append(r)
            if n % max(1, len(tasks) // 10) == 0 or n == len(tasks):
                done = sum(len(x["keys"]) for rs in results.values() for x in rs)
                print(f"prepare_data: {done} utterances, {time.perf_counter() - t1:.1f} s",
                      flush=True)
    info = {s: _write_lists(out, s, sentences[s], results[s]) for s in sentences}
    t_synth = time.perf_counter() - t1
    meta = {
        "splits": info,
        "seed": args.seed,
        "test_seed": args.test_seed,
        "espeak": espeak.source,
        "word_list": str(words),
        "word_list_sha1": hashlib.sha1(Path(words).read_bytes()).hexdigest(),
        "heldout_text": [str(f) for f in heldout_files],
        "voices": asdict(sampler),
        "augment": asdict(cfg) if cfg else None,
        "workers": args.workers,
        "seconds": {"text": round(t_text, 2), "synthesis": round(t_synth, 2)},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    hours = sum(v["hours"] for v in info.values())
    print(f"prepare_data: {sum(len(s) for s in sentences.values())} utterances ({hours:.2f} h) "
          f"in {t_synth:.1f} s with {args.workers} workers (text {t_text:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
