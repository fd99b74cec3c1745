"""Micro-benchmark: ``kernels.decode_attention`` at Whisper decode shapes, per split and key tile.

Run on a CUDA machine from the repository root::

    PYTHONPATH=src python bench/decode_attention_micro.py [--heads 20] [--dim 64]
        [--splits 0 2 4 6 8 12 16 24] [--blocks 32 64 128] [--stages 2 3 4] [--out attn.csv]

Cases (large-v3 by default: 20 heads of 64): ``cross`` (1500 audio keys, rows of distinct
audios; ``beam5``: 5 rows on one audio, ``group`` 5; ``_int8``: int8 K/V with float32 scales,
``quantize_kv``) and ``self`` (a 448-entry cache read up to a position, writing the new
key/value as a step does). Split 0 is the launcher's default (:func:`default_num_splits`).
Times: 20 calls captured in one CUDA graph, median replay / 20; the calls rotate over cache
copies of >= 256 MiB, so the keys come from HBM (not the 50 MiB L2). ``GB/s`` = key + value
bytes read per call (int8 caches: the int8 entries and their scales) / time. ``max_err`` = max
|out - the float32 reference| (int8: on the dequantized cache).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import speechrt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

from speechrt.benchmark.common import (  # noqa: E402
    environment,
    graph_ms_per_call,
    markdown_table,
    write_csv,
)
from speechrt.kernels.decode_attention import NUM_STAGES  # noqa: E402

ROTATE_BYTES = 256 * 2**20
CALLS = 20
# name: (rows, audios (cache rows), cache length, keys read or None for all, append)
CASES = {
    "cross_b1": (1, 1, 1500, None, False),
    "cross_b16": (16, 16, 1500, None, False),
    "cross_beam5": (5, 1, 1500, None, False),
    "cross_b1_int8": (1, 1, 1500, None, False),
    "cross_b16_int8": (16, 16, 1500, None, False),
    "self_b1_pos40": (1, 1, 448, 41, True),
    "self_b1_pos200": (1, 1, 448, 201, True),
    "self_b16_pos40": (16, 16, 448, 41, True),
}


def _caches(shape: tuple[int, ...], int8: bool) -> tuple[dict, int]:
    """decode_attention keywords of one random fp16 (or int8 + scales) K/V cache copy, and the
    bytes per cache position (K and V, one head)."""
    k, v = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(2))
    if not int8:
        return {"k": k, "v": v}, 2 * 2 * shape[-1]
    from speechrt.kernels.decode_attention import quantize_kv

    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    return {"k": kq, "v": vq, "k_scale": ks, "v_scale": vs}, 2 * (shape[-1] + 4)


def case_rows(
    name: str, heads: int, dim: int, splits: list[int], blocks: list[int], stages: list[int]
) -> list:
    from speechrt.kernels.decode_attention import decode_attention, decode_attention_ref

    rows_n, audios, length, keys, append = CASES[name]
    dev, dtype = "cuda", torch.float16
    shape = (audios, heads, length, dim)
    int8 = name.endswith("_int8")
    first, per_pos = _caches(shape, int8)
    per_copy = math.prod(shape[:3]) * per_pos
    copies = max(1, min(CALLS, math.ceil(ROTATE_BYTES / per_copy)))
    caches = [first] + [_caches(shape, int8)[0] for _ in range(copies - 1)]
    q = torch.randn(rows_n, heads, dim, device=dev, dtype=dtype)
    lengths = torch.full((rows_n,), keys, device=dev) if keys else None
    new = (torch.randn_like(q), torch.randn_like(q)) if append else (None, None)
    read = (keys or length) * heads * per_pos * audios
    scales = {key: first[key] for key in ("k_scale", "v_scale") if key in first}
    gold = decode_attention_ref(
        q.float(), first["k"].float().clone(), first["v"].float().clone(), lengths,
        k_new=None if new[0] is None else new[0].float(),
        v_new=None if new[1] is None else new[1].float(), group=rows_n // audios, **scales,
    )  # fmt: skip
    out = []
    for block_n, split, stages_n in itertools.product(blocks, splits, stages):
        row = {"case": name, "block_n": block_n, "splits": split or "default",
               "stages": stages_n, "us": math.nan, "GB/s": math.nan, "max_err": math.nan,
               "error": ""}  # fmt: skip
        try:

            def call(k, v, split=split, block_n=block_n, stages=stages_n, **scales):
                return decode_attention(
                    q, k, v, lengths, k_new=new[0], v_new=new[1], group=rows_n // audios,
                    num_splits=split or None, block_n=block_n, num_stages=stages,
                    **scales,
                )  # fmt: skip

            res = call(first["k"].clone(), first["v"].clone(), **scales)
            row["max_err"] = float((res.float() - gold).abs().max())
            calls = [lambda i=i: call(**caches[i % copies]) for i in range(CALLS)]
            ms = graph_ms_per_call(calls)
            row["us"], row["GB/s"] = 1000 * ms, read / ms / 1e6
        except Exception as e:  # noqa: BLE001 - a variant that cannot launch is a row
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        out.append(row)
    caches.clear()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--splits", nargs="+", type=int, default=[0, 2, 4, 6, 8, 12, 16, 24])
    parser.add_argument("--blocks", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument(
        "--stages", nargs="+", type=int, default=[2], help="num_stages of the K/V loop"
    )
    parser.add_argument("--out", type=Path, help="also write the rows to this CSV file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_attention_micro.py needs a CUDA GPU")
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for name in args.cases:
            rows += case_rows(name, args.heads, args.dim, args.splits, args.blocks, args.stages)
            print(f"done {name}", file=sys.stderr, flush=True)
    print(f"`{json.dumps(environment())}`\n")
    print(markdown_table(rows, list(rows[0])))
    print("\nFastest per case:\n")
    for name in args.cases:
        ok = [r for r in rows if r["case"] == name and not r["error"]]
        dflt = [r for r in ok if r["splits"] == "default" and r["block_n"] == 64
                and r["stages"] == NUM_STAGES]  # fmt: skip
        if ok:
            best = min(ok, key=lambda r: r["us"])
            base = f"{dflt[0]['us']:.3g}" if dflt else "-"
            print(
                f"- {name}: default (block 64, {NUM_STAGES} stages) {base} us; best block "
                f"{best['block_n']} "
                f"splits {best['splits']} stages {best['stages']}: {best['us']:.3g} us, "
                f"{best['GB/s']:.4g} GB/s"
            )
    if args.out:
        write_csv(args.out, rows)


if __name__ == "__main__":
    main()
