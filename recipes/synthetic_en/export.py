"""Average the last training snapshots and write a WeNet model directory.

Usage (from the repository root)::

    python -m recipes.synthetic_en.export --exp exp/synthetic_en --out exp/synthetic_en/model \\
        [--average 5] [--dtype fp16]

The directory (``train.yaml``, ``final.pt`` with WeNet's key names, ``units.txt``, ``global_cmvn``,
``train_info.json``) loads with ``speechrt.load_model(dir)`` and with WeNet's own loader.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from .wenet_dir import average_state_dicts, export_model_dir

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def snapshots(exp: Path, n: int) -> list[Path]:
    """The last ``n`` snapshots of a training run (by step)."""
    paths = sorted((exp / "snapshots").glob("step_*.pt"))
    if not paths:
        raise SystemExit(f"export: no snapshots in {exp / 'snapshots'}")
    return paths[-n:]


def export(exp: Path, out: Path, average: int = 5, dtype: str = "fp16") -> Path:
    """Average the last ``average`` snapshots of ``exp`` and write the model directory ``out``."""
    paths = snapshots(exp, average)
    state = average_state_dicts(paths)
    raw = yaml.safe_load((exp / "train.yaml").read_text(encoding="utf-8"))
    info_path = exp / "train_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info["averaged_snapshots"] = [p.name for p in paths]
    info["checkpoint_dtype"] = dtype
    return export_model_dir(out, raw, state, exp / "global_cmvn", DTYPES[dtype], info)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exp", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--average", type=int, default=5)
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    out = export(args.exp, args.out, args.average, args.dtype)
    size = (out / "final.pt").stat().st_size / 1e6
    print(f"export: {out} (final.pt {size:.1f} MB, {args.dtype}, "
          f"average of {min(args.average, len(snapshots(args.exp, args.average)))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
