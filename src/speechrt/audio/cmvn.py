"""WeNet's global CMVN: load the statistics file, derive (mean, istd), normalise features.

Statistics are sums over ``n`` training frames: ``s = sum(x)`` and ``q = sum(x^2)`` per feature.
As WeNet (``wenet/utils/cmvn.py``) does, in float64::

    mean = s / n
    var  = max(q / n - mean^2, 1e-20)
    istd = 1 / sqrt(var)

then both are cast to float32 (the values WeNet stores as ``encoder.global_cmvn.mean/istd``).

File formats (detected from the content):

* WeNet JSON: ``{"mean_stat": [s...], "var_stat": [q...], "frame_num": n}``.
* Kaldi text matrix (``copy-matrix --binary=false``): ``[ s_1 .. s_D n`` / ``q_1 .. q_D 0 ]``.
* Kaldi binary matrix (``compute-cmvn-stats`` default): ``\\0B`` then ``FM``/``DM``, the row and
  column counts and the (2, D+1) values, same layout as the text form.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from speechrt.errors import ModelFormatError

__all__ = ["apply_cmvn", "cmvn_from_stats", "load_global_cmvn"]

_VAR_FLOOR = 1.0e-20


def load_global_cmvn(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a CMVN statistics file; return ``(mean, istd)``, each (D,) float32 on the CPU.

    Raises :class:`~speechrt.errors.ModelFormatError` for a missing, unparsable or inconsistent
    file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"CMVN file not found: {path}")
    data = path.read_bytes()
    if data.startswith(b"\0B"):
        stats = _parse_kaldi_binary(data, path)
    elif data.lstrip().startswith(b"{"):
        stats = _parse_json(data, path)
    elif data.lstrip().startswith(b"["):
        stats = _parse_kaldi_text(data, path)
    else:
        raise ModelFormatError(
            f"{path}: not a CMVN file (expected WeNet JSON or a Kaldi matrix '[ ... ]')"
        )
    return cmvn_from_stats(*stats, source=str(path))


def cmvn_from_stats(
    mean_stat: torch.Tensor, var_stat: torch.Tensor, frame_num: float, source: str = "CMVN stats"
) -> tuple[torch.Tensor, torch.Tensor]:
    """WeNet's derivation (float64, then float32) from sums ``mean_stat``/``var_stat`` (D,)."""
    s = torch.as_tensor(mean_stat, dtype=torch.float64).reshape(-1)
    q = torch.as_tensor(var_stat, dtype=torch.float64).reshape(-1)
    if s.numel() == 0 or s.shape != q.shape:
        raise ModelFormatError(
            f"{source}: mean_stat has {s.numel()} values and var_stat {q.numel()}; "
            "they must be equal and non-zero"
        )
    if not frame_num > 0:
        raise ModelFormatError(f"{source}: frame count must be > 0, got {frame_num}")
    mean = s / frame_num
    var = (q / frame_num - mean * mean).clamp(min=_VAR_FLOOR)
    istd = 1.0 / var.sqrt()
    return mean.float(), istd.float()


def apply_cmvn(feats: torch.Tensor, mean: torch.Tensor, istd: torch.Tensor) -> torch.Tensor:
    """``(feats - mean) * istd`` over the last dim, as WeNet's ``GlobalCMVN``.

    feats (..., D); mean, istd (D,) (moved to feats' device/dtype). Padding rows are normalised too,
    as WeNet does.
    """
    if feats.shape[-1] != mean.shape[-1] or mean.shape != istd.shape:
        raise ModelFormatError(
            f"CMVN has dimension {mean.shape[-1]} but the features have {feats.shape[-1]}"
        )
    mean = mean.to(device=feats.device, dtype=feats.dtype)
    istd = istd.to(device=feats.device, dtype=feats.dtype)
    return (feats - mean) * istd


def _parse_json(data: bytes, path: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    try:
        obj = json.loads(data)
        stats = (obj["mean_stat"], obj["var_stat"], obj["frame_num"])
        mean_stat, var_stat = (torch.tensor(v, dtype=torch.float64) for v in stats[:2])
        frame_num = float(stats[2])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ModelFormatError(
            f"{path}: not a WeNet JSON CMVN file (needs mean_stat, var_stat, frame_num): {err}"
        ) from None
    return mean_stat, var_stat, frame_num


def _split_stats(mat: torch.Tensor, path: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Kaldi stats matrix (2, D+1) -> (sums (D,), sums of squares (D,), count)."""
    if mat.dim() != 2 or mat.shape[0] != 2 or mat.shape[1] < 2:
        raise ModelFormatError(
            f"{path}: Kaldi CMVN stats must be a 2 x (D+1) matrix, got {tuple(mat.shape)}"
        )
    return mat[0, :-1], mat[1, :-1], float(mat[0, -1])


def _parse_kaldi_text(data: bytes, path: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``[ s_1 .. s_D n`` / ``q_1 .. q_D 0 ]`` (line breaks optional, as WeNet reads it)."""
    body = data.decode("ascii", errors="replace").strip()
    if not body.startswith("[") or not body.endswith("]"):
        raise ModelFormatError(f"{path}: Kaldi text matrix must be enclosed in '[ ... ]'")
    try:
        values = torch.tensor([float(v) for v in body[1:-1].split()], dtype=torch.float64)
    except ValueError as err:
        raise ModelFormatError(f"{path}: bad Kaldi text matrix: {err}") from None
    if values.numel() % 2:
        n = values.numel()
        raise ModelFormatError(f"{path}: Kaldi CMVN stats need 2 x (D+1) values, got {n}")
    return _split_stats(values.reshape(2, -1), path)  # (2, D+1)


def _parse_kaldi_binary(data: bytes, path: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``\\0B`` + ``FM ``/``DM `` + ``\\4 rows`` + ``\\4 cols`` + little-endian values."""
    sizes = {b"FM ": (4, torch.float32), b"DM ": (8, torch.float64)}
    if data[2:5] not in sizes or len(data) < 15 or data[5] != 4 or data[10] != 4:
        raise ModelFormatError(f"{path}: unsupported Kaldi binary matrix header {data[:5]!r}")
    width, dtype = sizes[data[2:5]]
    rows, cols = struct.unpack("<i", data[6:10])[0], struct.unpack("<i", data[11:15])[0]
    payload = data[15:]
    if rows != 2 or cols < 2 or len(payload) != rows * cols * width:
        raise ModelFormatError(
            f"{path}: Kaldi CMVN stats must be a 2 x (D+1) matrix; got {rows} x {cols} "
            f"in {len(payload)} bytes"
        )
    mat = torch.frombuffer(bytearray(payload), dtype=dtype).reshape(rows, cols)  # (2, D+1)
    return _split_stats(mat.double(), path)
