"""Run espeak-ng: the system binary if there is one, else one unpacked from .deb files.

The training machine has no apt and no internet; ``fetch_debs.sh`` downloads espeak-ng's .deb files
(with its whole runtime library closure) on a machine that has both. :func:`find_espeak` unpacks
them with ``dpkg -x`` into a private folder once and points ``LD_LIBRARY_PATH`` (every folder of
the unpacked tree that holds a shared library) and ``ESPEAK_DATA_PATH`` (the folder that holds
``espeak-ng-data``) at it.

espeak-ng writes 16-bit mono WAV at 22050 Hz to stdout (``--stdout``); its header carries a
placeholder size, so :func:`parse_wav_bytes` reads the ``data`` chunk to the end of the stream.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

UNPACKED_MARK = ".unpacked"


class EspeakNotFound(RuntimeError):
    """Neither a system espeak-ng nor usable .deb files."""


@dataclass(frozen=True)
class Espeak:
    """How to start espeak-ng: the binary and the environment variables it needs."""

    binary: str
    env: dict[str, str] = field(default_factory=dict)
    source: str = "system"  # system | debs

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}


@dataclass(frozen=True)
class VoiceParams:
    """espeak-ng settings of one utterance (``-v voice+variant -s speed -p pitch -g gap``)."""

    voice: str
    variant: str
    speed: int  # words per minute
    pitch: int  # 0..99
    gap: int  # extra pause between words, units of 10 ms

    @property
    def name(self) -> str:
        return f"{self.voice}+{self.variant}" if self.variant else self.voice

    def args(self) -> list[str]:
        return ["-v", self.name, "-s", str(self.speed), "-p", str(self.pitch), "-g", str(self.gap)]


def unpack_debs(deb_dir: str | Path, dest: str | Path) -> Path:
    """``dpkg -x`` every .deb of ``deb_dir`` into ``dest`` (once; later calls reuse it)."""
    deb_dir, dest = Path(deb_dir), Path(dest)
    if (dest / UNPACKED_MARK).is_file():
        return dest
    debs = sorted(deb_dir.glob("*.deb"))
    if not debs:
        raise EspeakNotFound(f"no .deb files in {deb_dir} (run recipes/synthetic_en/fetch_debs.sh)")
    if shutil.which("dpkg") is None:
        raise EspeakNotFound("dpkg is needed to unpack the .deb files and is not installed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    for deb in debs:
        subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
    (tmp / UNPACKED_MARK).write_text("\n".join(d.name for d in debs) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def _library_dirs(root: Path) -> list[str]:
    dirs = {str(p.parent) for p in root.rglob("*.so*") if p.is_file() or p.is_symlink()}
    return sorted(dirs)


def espeak_from_tree(root: str | Path) -> Espeak:
    """An :class:`Espeak` running the binary of an unpacked .deb tree."""
    root = Path(root)
    binary = root / "usr" / "bin" / "espeak-ng"
    data = sorted(root.rglob("espeak-ng-data"))
    if not binary.is_file() or not data:
        raise EspeakNotFound(f"{root} holds no usr/bin/espeak-ng and espeak-ng-data")
    libs = _library_dirs(root)
    ld = ":".join(libs + [os.environ["LD_LIBRARY_PATH"]] if os.environ.get("LD_LIBRARY_PATH")
                  else libs)
    env = {"LD_LIBRARY_PATH": ld, "ESPEAK_DATA_PATH": str(data[0].parent)}
    return Espeak(str(binary), env, "debs")


def find_espeak(deb_dir: str | Path | None, unpack_dir: str | Path, use_system: bool = True
                ) -> Espeak:
    """The system espeak-ng if present (and ``use_system``), else the one of ``deb_dir``."""
    system = shutil.which("espeak-ng")
    if use_system and system:
        return Espeak(system)
    if deb_dir is None or not Path(deb_dir).is_dir():
        raise EspeakNotFound(
            "espeak-ng is not installed and no .deb folder was given (apt-get install espeak-ng, "
            "or run recipes/synthetic_en/fetch_debs.sh where apt works and pass --deb-dir)"
        )
    return espeak_from_tree(unpack_debs(deb_dir, unpack_dir))


def find_word_list(candidates: list[str | Path]) -> Path | None:
    """The first existing word list among ``candidates`` (files, or unpacked trees)."""
    for cand in candidates:
        p = Path(cand)
        if p.is_file():
            return p
        tree = p / "usr" / "share" / "dict" / "american-english"
        if tree.is_file():
            return tree
    return None


def parse_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV bytes (sizes in the header may be placeholders) -> (int16 (N,), rate)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("espeak-ng output is not a WAV stream")
    pos, rate, channels, bits = 12, None, 1, 16
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if cid == b"fmt ":
            _, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[body : body + 16])
        elif cid == b"data":
            pcm = data[body:]
            pcm = pcm[: len(pcm) - len(pcm) % 2]
            if rate is None or bits != 16 or channels != 1:
                raise ValueError(f"unexpected WAV format: {channels} ch, {bits} bit")
            return np.frombuffer(pcm, dtype="<i2").copy(), rate
        pos = body + size + (size & 1)
    raise ValueError("WAV stream has no data chunk")


def run_espeak(text: str, params: VoiceParams, espeak: Espeak, timeout: float = 60.0
               ) -> tuple[np.ndarray, int]:
    """Synthesise ``text``; returns (int16 samples (N,), sample rate). Text goes in on stdin."""
    cmd = [espeak.binary, *params.args(), "--stdout"]
    proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True,
                          env=espeak.environ(), timeout=timeout, check=False)
    if proc.returncode != 0 or not proc.stdout:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(
            f"espeak-ng {params.name} failed (exit {proc.returncode}): {err[-1] if err else ''}")
    return parse_wav_bytes(proc.stdout)


def list_voices(espeak: Espeak) -> set[str]:
    """Language names of espeak-ng's English voices (``--voices=en``), e.g. {'en-us', ...}."""
    out = subprocess.run([espeak.binary, "--voices=en"], capture_output=True, text=True,
                         env=espeak.environ(), check=True).stdout
    return {line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1}
