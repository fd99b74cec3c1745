"""Which precision policy keeps a trained WeNet model's text? Same-text rate and CER per variant.

    python3 bench/precision_probe.py --data D/wav.scp --text D/text [--model DIR] [--out DIR]

Loads the model (default: the bundled ``synthetic_en``) once per dtype on CUDA, transcribes the
set with CTC greedy search and attention rescoring (beam 10, ctc_weight 0.5, reverse_weight 0.3)
for each encoder variant, and compares every text with the FP32 engine's. Variants flip the fused
encoder's switches before the first capture (the graph key includes them):

* ``default``: the engine as loaded (for bf16: ``triton_add_ln``; for fp16: neither);
* ``branches_on`` / ``branches_off``: ``fp32_branches`` forced -- the residual-branch GEMMs
  (and the conv front's projection) hand their float32 accumulators to the float32 residual
  stream (cuBLAS), or round the branch to the compute dtype first (``triton_add_ln`` off);
* ``add_ln``: ``triton_add_ln`` on (the same float32 branches, from the Triton GEMM + add +
  LayerNorm kernel);
* ``tf32_attention``: attention's products in TF32 on float32 ``k + p`` and probabilities
  (``tf32_attention`` on; default off).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from speechrt.benchmark.common import (
    environment,
    markdown_table,
    set_encoder_options,
    sync_cuda,
    write_csv,
)

METHODS = {
    "ctc_greedy_search": {},
    "ctc_prefix_beam_search": {},
    "attention_rescoring": {"ctc_weight": 0.5, "reverse_weight": 0.3},
}
VARIANTS = {
    "default": {},
    "branches_on": {"triton_add_ln": False, "fp32_branches": True},
    "branches_off": {"triton_add_ln": False, "fp32_branches": False},
    "add_ln": {"triton_add_ln": True},
    "tf32_attention": {"tf32_attention": True},
}


def _run(model, wavs, method: str) -> tuple[list[str], float]:
    sync_cuda()
    t0 = time.perf_counter()
    res = model.recognize(wavs, 16, method=method, beam_size=10, **METHODS[method])
    sync_cuda()
    return [r.text for r in res], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    import speechrt
    from speechrt.cli.common import read_scp
    from speechrt.cli.eval import read_text
    from speechrt.metrics import report

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"])
    p.add_argument(
        "--variants", nargs="+", default=["default", "branches_on", "branches_off"],
        choices=list(VARIANTS),
    )  # fmt: skip
    p.add_argument("--device", default="cuda")
    p.add_argument("--limit", type=int, default=0, help="first N utterances only (0: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    items = read_scp(args.data)[: args.limit or None]
    refs = read_text(args.text)
    keys = [k for k, _ in items]
    base = speechrt.load_model(args.model, device=args.device, dtype="fp32")
    wavs = [base.load_audio(path) for _, path in items]
    gold, rows = {}, []

    def row(dtype: str, variant: str, method: str, texts: list[str], secs: float) -> None:
        rep = report(keys, [refs[k] for k in keys], texts, unit="char")["totals"]
        same = sum(a == b for a, b in zip(texts, gold[method]))
        rows.append({"dtype": dtype, "variant": variant, "method": method,
                     "cer_percent": round(rep["rate_percent"], 3),
                     "same_text": f"{same}/{len(texts)}", "seconds": round(secs, 2)})  # fmt: skip
        print(rows[-1], file=sys.stderr, flush=True)

    for method in METHODS:
        gold[method], secs = _run(base, wavs, method)
        row("fp32", "default", method, gold[method], secs)
    del base
    for dtype in args.dtypes:
        for variant in args.variants:
            model = speechrt.load_model(args.model, device=args.device, dtype=dtype)
            if VARIANTS[variant] and model.engine is None:
                raise SystemExit(f"variant {variant} needs the fused engine (CUDA)")
            if VARIANTS[variant]:
                set_encoder_options(model.engine.encoder, tuple(VARIANTS[variant].items()))
            for method in METHODS:
                texts, secs = _run(model, wavs, method)
                row(dtype, variant, method, texts, secs)
            del model
    print(f"`{environment()}`\n")
    print(markdown_table(rows, list(rows[0])))
    if args.out:
        write_csv(Path(args.out) / "precision_probe.csv", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
