"""Micro-benchmark: the skinny linear kernel at Whisper decode shapes, and whole decode steps.

Run on a CUDA machine from the repository root (about a minute on an H200 with a cold Triton
cache; the config sweep stops at ``--time-limit`` and a second run, with compiled kernels
cached, completes more of it)::

    PYTHONPATH=src python bench/skinny_micro.py [--rows 1 4 16] [--models large-v3 tiny]
        [--dtype float16] [--time-limit 50] [--configs dot split] [--no-step] [--out skinny.csv]

Part "gemm": the decode GEMMs of one layer at M rows (one token per row), as the step runs them:

* ``qkv``: LN1(x) @ Wqkv^T + b (N = 3D, K = D, x the float32 residual stream);
* ``wo``: x += attn @ Wo^T + b (N = K = D, in place on the float32 stream);
* ``fc1``: GELU(LN3(x) @ W1^T + b1) (N = 4D, K = D);
* ``fc2``: x += hid @ W2^T + b2 (N = D, K = 4D);
* ``logits``: LN(x) @ E^T, float32 out (N = vocab, K = D, no bias).

Providers: ``torch`` (unfused: ``F.layer_norm`` to the weight dtype, ``F.linear``, ``F.gelu``,
``add_`` into the stream; what an unfused step launches), ``skinny_nopdl`` (default config
without programmatic dependent launch, ``SPEECHRT_PDL=0``), ``skinny`` at its default config and
(large-v3 shapes, until the time limit) at every entry of ``CONFIGS``. Times: 20 calls captured
in one CUDA graph, median replay time / 20 from CUDA events. The 20 calls rotate over copies of
the weights totalling >= 256 MiB, so weights come from HBM as in a real step (not from the
50 MiB L2). ``GB/s`` = weight (+ bias) bytes / time; ``max_err`` = max |out - float32
reference| (``skinny_linear_ref`` with ``upcast``; for ``wo``/``fc2`` the updated stream).

Part "step": one ``WhisperNet.step`` of a random-weight decoder of the model's dims (B rows of B
audios at position 64, caches of 448 positions) replayed from a CUDA graph: ``torch`` (torch
path, ``kv_len`` = 65), ``fused_old`` (kernel path, GEMM + fused add/LayerNorm per sublayer),
``fused_skinny`` (kernel path, 8-9 launches per layer, with programmatic dependent launch on
Hopper; ``fused_skinny_nopdl`` without it; ``fused_skinny_pP`` with P persistent GEMV programs
per SM, ``skinny_linear.DEFAULT_PERSIST``; ``fused_skinny_combine2``: cross-attention's split
partials combined by a second kernel, ``DecoderLayer.combine_in_kernel`` off;
``fused_skinny_int8``: int8 weight-only copies of the step GEMMs,
``TextDecoder.quantize_step_int8``, up to 4 rows; ``fused_skinny_dot`` / ``_split``: the
GEMMs on the K-loop tensor-core kernel / the split-K kernel, ``skinny_linear.MANY_ROWS``, also
at 1-4 rows; ``fused_stages4`` / ``fused_kvint8_stages4``: the default kernel-path step
(float16 / int8 cross K/V) with ``decode_attention.NUM_STAGES = 4``; ``fused_kvint8``: the default
kernel-path step with int8 cross-attention K/V, ``WhisperNet.cross_kv_int8``, and
``fused_skinny_kvint8`` the same with the skinny step forced).
``gpu_ops`` = CUDA kernels (and memsets/copies) of one eager step (torch profiler); ``max_err``
= max |logits - torch path logits|.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
try:
    import speechrt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

from speechrt.benchmark.common import (  # noqa: E402
    environment,
    graph_ms_per_call,
    kernel_profile,
    markdown_table,
    write_csv,
)

CALLS = 20  # calls per captured graph
ROTATE_BYTES = 256 * 2**20  # weight copies per shape: at least this much, to defeat L2
STEP_POSITION = 64
# name: (N as a multiple of D or "vocab", K multiple of D, LayerNorm prologue, act, residual)
GEMMS = {
    "qkv": (3, 1, True, "identity", False),
    "wo": (1, 1, False, "identity", True),
    "fc1": (4, 1, True, "gelu", False),
    "fc2": (1, 4, False, "identity", True),
    "logits": ("vocab", 1, True, "identity", False),
}


class GemmCase:
    """Inputs of one decode GEMM at M rows, with weight copies to rotate over."""

    def __init__(self, name: str, d: int, vocab: int, m: int, dtype: torch.dtype) -> None:
        n_mult, k_mult, self.has_ln, self.act, self.has_res = GEMMS[name]
        self.n = vocab if n_mult == "vocab" else n_mult * d
        self.k = k_mult * d
        self.name, self.m, self.dtype = name, m, dtype
        self.has_bias = name != "logits"
        self.out_dtype = torch.float32 if name == "logits" else None
        dev, n, k = "cuda", self.n, self.k
        self.nbytes = (n * k + (n if self.has_bias else 0)) * torch.finfo(dtype).bits // 8
        copies = max(1, min(CALLS, math.ceil(ROTATE_BYTES / self.nbytes)))
        w = (torch.randn(n, k, device=dev) / k**0.5).to(dtype)
        self.weights = [w] + [w.clone() for _ in range(copies - 1)]
        self.bias = (0.5 * torch.randn(n, device=dev)).to(dtype) if self.has_bias else None
        self.ln = None
        if self.has_ln:
            self.ln = (1 + 0.1 * torch.randn(k, device=dev), 0.1 * torch.randn(k, device=dev), 1e-5)
            self.x = 4 * torch.randn(m, k, device=dev) + 1  # float32 residual stream
        else:
            self.x = torch.randn(m, k, device=dev).to(dtype)
        self.r0 = 4 * torch.randn(m, n, device=dev) if self.has_res else None
        self.r = self.r0.clone() if self.has_res else None
        # what a decoder keeps per weight for the tensor-core kernels: the LayerNorm fold (the
        # weight copies are equal) and the split-K counters
        self.extra: dict = {"counters": torch.zeros(1 << 16, dtype=torch.int32, device=dev)}
        if self.has_ln:
            from speechrt.kernels.skinny_split import fold_layer_norm

            self.extra["ln_fold"] = fold_layer_norm(w, self.bias, self.ln[0], self.ln[1])

    @property
    def shape(self) -> str:
        return f"{self.m}x{self.k} @ {self.n}x{self.k}"

    def kwargs(self) -> dict:
        return {"ln": self.ln, "activation": self.act, "out_dtype": self.out_dtype}

    def gold(self) -> torch.Tensor:
        from speechrt.kernels.skinny_linear import skinny_linear_ref

        r = self.r0.clone() if self.has_res else None
        kw = self.kwargs() if not self.has_res else {"activation": self.act}
        w = self.weights[0]
        return skinny_linear_ref(self.x, w, self.bias, residual=r, upcast=True, **kw)

    def skinny(self, w: torch.Tensor, config, residual: torch.Tensor | None) -> torch.Tensor:
        from speechrt.kernels.skinny_linear import skinny_linear

        if self.has_res:
            return skinny_linear(self.x, w, self.bias, residual=residual, config=config,
                                 **self.extra)  # fmt: skip
        return skinny_linear(self.x, w, self.bias, config=config, **self.kwargs(), **self.extra)

    def torch_op(self, w: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        h = self.x
        if self.has_ln:
            lw, lb, eps = self.ln
            h = F.layer_norm(self.x, (self.k,), lw, lb, eps).to(self.dtype)
        y = F.linear(h, w, self.bias)
        if self.act == "gelu":
            y = F.gelu(y)
        if self.has_res:
            return residual.add_(y)
        return y.float() if self.out_dtype == torch.float32 else y


def _gemm_row(case: GemmCase, model: str, provider: str, config, run) -> dict[str, object]:
    """Error of one call on fresh inputs, then the rotated-weights graph time."""
    row = {"part": "gemm", "model": model, "gemm": case.name, "M": case.m, "shape": case.shape,
           "provider": provider, "config": config, "us": math.nan, "GB/s": math.nan,
           "speedup": math.nan, "max_err": math.nan, "error": ""}  # fmt: skip
    try:
        fresh = case.r0.clone() if case.has_res else None
        out = run(case.weights[0], fresh)
        row["max_err"] = float((out.float() - case.gold().float()).abs().max())
        weights = [case.weights[i % len(case.weights)] for i in range(CALLS)]
        ms = graph_ms_per_call([functools.partial(run, w, case.r) for w in weights])
        row["us"], row["GB/s"] = 1000 * ms, case.nbytes / ms / 1e6
    except Exception as e:  # noqa: BLE001 - a config that cannot launch is a row, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    torch.cuda.synchronize()
    return row


def gemm_rows(
    model: str, rows: list[int], dtype: torch.dtype, configs: list, deadline: float | None = None
) -> tuple[list[dict[str, object]], int]:
    """Rows for every GEMM and M: ``torch`` and the default config when ``configs`` is empty,
    else each config until ``deadline`` (perf_counter); returns the rows and the number of rows
    skipped at the deadline."""
    from speechrt.models.whisper.config import preset

    dims = preset(model)
    out, skipped = [], 0
    for m in rows:
        for name in GEMMS:
            if deadline is not None and time.perf_counter() > deadline:
                skipped += len(configs)
                continue
            case = GemmCase(name, dims.n_text_state, dims.n_vocab, m, dtype)
            if not configs:
                out.append(_gemm_row(case, model, "torch", "", case.torch_op))
                os.environ["SPEECHRT_PDL"] = "0"
                run = lambda w, r, case=case: case.skinny(w, None, r)  # noqa: E731
                out.append(_gemm_row(case, model, "skinny_nopdl", "default", run))
                os.environ["SPEECHRT_PDL"] = "1"
            for cfg in configs or [None]:
                if deadline is not None and time.perf_counter() > deadline:
                    skipped += 1
                    continue
                run = lambda w, r, case=case, cfg=cfg: case.skinny(w, cfg, r)  # noqa: E731
                out.append(_gemm_row(case, model, "skinny", str(cfg or "default"), run))
            del case
        print(f"done gemm {model} M={m} ({len(configs)} configs)", file=sys.stderr, flush=True)
    return out, skipped


def _speedups(rows: list[dict[str, object]]) -> None:
    """speedup = torch us / own us for the same model, GEMM and M."""
    base = {(r["model"], r["gemm"], r["M"]): r["us"] for r in rows if r["provider"] == "torch"}
    for r in rows:
        r["speedup"] = base.get((r["model"], r["gemm"], r["M"]), math.nan) / r["us"]


# ------------------------------------------------------------------------------------- steps
def step_rows(
    model: str, rows: list[int], dtype: torch.dtype, sweep: tuple = ()
) -> list[dict[str, object]]:
    """One decode step of a random-weight decoder: torch path, old and new kernel paths, the
    persistent one-launch step (default config, then each of ``sweep``, StepConfigs)."""
    from speechrt.benchmark.whisper import build_speechrt
    from speechrt.kernels import skinny_linear
    from speechrt.models.whisper.config import preset
    from speechrt.models.whisper.model import DecoderLayer

    dims = preset(model)
    default_persist = skinny_linear.DEFAULT_PERSIST
    many_rows = skinny_linear.MANY_ROWS, skinny_linear.MANY_ROWS_FROM
    net = build_speechrt(dims, dtype, "cuda", seed=0)
    out = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    for b in rows:
        feats = torch.randn(b, dims.n_audio_ctx, dims.n_text_state, device="cuda", generator=gen)
        tokens = torch.randint(0, dims.n_vocab, (b, STEP_POSITION + 1), device="cuda")
        results = {}
        for provider, kernels, skinny, pdl, persist in (
            ("torch", False, False, "0", 0),
            ("fused_old", True, False, "0", 0),
            ("fused_skinny_nopdl", True, True, "0", 0),
            ("fused_skinny", True, True, "1", 0),
            ("fused_skinny_p2", True, True, "1", 2),
            ("fused_skinny_p3", True, True, "1", 3),
        ):
            net.kernels, net.decoder.skinny_step = kernels, skinny
            net.decoder.persistent_step = False
            os.environ["SPEECHRT_PDL"], skinny_linear.DEFAULT_PERSIST = pdl, persist
            results[provider] = _step(net, feats.to(dtype), tokens)
        os.environ["SPEECHRT_PDL"], skinny_linear.DEFAULT_PERSIST = "1", default_persist
        DecoderLayer.combine_in_kernel = False  # cross-attention's combine as a second kernel
        results["fused_skinny_combine2"] = _step(net, feats.to(dtype), tokens)
        DecoderLayer.combine_in_kernel = True
        net.kernels, net.decoder.skinny_step = True, True
        for kind in ("dot", "split"):  # the many-rows kernels, also where whole-row runs
            if kind == skinny_linear.MANY_ROWS and b > skinny_linear.MAX_ROW_ROWS:
                continue  # that is fused_skinny
            skinny_linear.MANY_ROWS, skinny_linear.MANY_ROWS_FROM = kind, 1
            results[f"fused_skinny_{kind}"] = _step(net, feats.to(dtype), tokens)
        skinny_linear.MANY_ROWS, skinny_linear.MANY_ROWS_FROM = many_rows
        from speechrt.kernels import decode_attention

        net.kernels, net.decoder.skinny_step = True, None
        stages = decode_attention.NUM_STAGES
        decode_attention.NUM_STAGES = 4  # every decode attention's K/V loop 4 stages deep
        results["fused_stages4"] = _step(net, feats.to(dtype), tokens)
        net.cross_kv_int8 = True
        results["fused_kvint8_stages4"] = _step(net, feats.to(dtype), tokens)
        decode_attention.NUM_STAGES = stages
        results["fused_kvint8"] = _step(net, feats.to(dtype), tokens)  # caches set up int8
        if b > 2:  # beyond the automatic skinny step
            net.decoder.skinny_step = True
            results["fused_skinny_kvint8"] = _step(net, feats.to(dtype), tokens)
            net.decoder.skinny_step = None
        net.cross_kv_int8 = False
        if b <= 4:  # the persistent one-launch step (kernels.decoder_step)
            net.kernels, net.decoder.persistent_step = True, True
            for cfg in (None, *sweep):
                net.decoder.persistent.config = cfg
                name = "persistent" if cfg is None else f"persistent_{cfg}"
                try:
                    results[name] = _step(net, feats.to(dtype), tokens)
                except Exception as exc:  # noqa: BLE001 - a config that fails is reported
                    print(f"{name}: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
                if net.decoder.persistent.failed():
                    print(f"{name}: a grid barrier timed out", file=sys.stderr)
                    net.decoder.persistent = type(net.decoder.persistent)(net.decoder)
            net.decoder.persistent.config = None
            net.decoder.persistent_step = False
        if b <= 4 and dtype != torch.float32:  # int8 weight-only copies of the step GEMMs
            net.kernels, net.decoder.skinny_step = True, True
            net.decoder.quantize_step_int8()
            results["fused_skinny_int8"] = _step(net, feats.to(dtype), tokens)
            net.decoder.int8_logits = None
            for layer in net.decoder.layers:
                layer.int8 = None
        ref = results["torch"][0]
        for provider, (logits, ms, n_kernels) in results.items():
            out.append({
                "part": "step", "model": model, "M": b, "provider": provider,
                "layers": dims.n_text_layer, "step_ms": ms,
                "us_per_layer": 1000 * ms / dims.n_text_layer, "gpu_ops": n_kernels,
                "speedup": results["fused_old"][1] / ms,
                "max_err": float((logits - ref).abs().max()),
            })  # fmt: skip
        print(f"done step {model} B={b}", file=sys.stderr, flush=True)
    del net
    torch.cuda.empty_cache()
    return out


def _step(net, feats: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(logits (B, V), graph ms, CUDA kernels of one eager step) of a step at STEP_POSITION."""
    b = tokens.shape[0]
    with torch.inference_mode():
        net.setup_caches(b, net.dims.n_text_ctx, b)
        net.set_audio(feats)
        net.prefill(tokens[:, :STEP_POSITION])
        tok = tokens[:, STEP_POSITION:].clone()  # (B, 1)
        pos = torch.full((b,), STEP_POSITION, device=tokens.device)
        kv = STEP_POSITION + 1

        def step() -> torch.Tensor:
            return net.step(tok, pos, kv_len=kv)

        logits = step().clone()
        ms = graph_ms_per_call([step], reps=50)
        n_kernels = sum(r["calls"] for r in kernel_profile(step, warmup=1)[0])
    return logits, ms, n_kernels


def main() -> None:
    from speechrt.kernels.skinny_linear import CONFIGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16], help="decode rows M")
    parser.add_argument("--models", nargs="+", default=["large-v3", "tiny"])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument(
        "--time-limit", type=float, default=50.0,
        help="seconds after which the CONFIGS sweep is cut short (defaults are always timed)",
    )  # fmt: skip
    parser.add_argument(
        "--configs", nargs="*", default=[""],
        help="sweep only the CONFIGS whose name starts with one of these (e.g. dot split)",
    )  # fmt: skip
    parser.add_argument("--no-step", action="store_true", help="skip the whole-step part")
    parser.add_argument(
        "--persistent-sweep", action="store_true",
        help="also time the persistent step at every decoder_step.SWEEP config",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the rows to this CSV file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("skinny_micro.py needs a CUDA GPU")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 references without TF32
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    gemm, steps, skipped = [], [], 0
    with torch.inference_mode():
        for model in args.models:  # torch and default rows of every model first
            gemm += gemm_rows(model, args.rows, dtype, [])[0]
    if not args.no_step:
        from speechrt.kernels.decoder_step import SWEEP

        sweep = SWEEP if args.persistent_sweep else ()
        for model in args.models:
            steps += step_rows(model, args.rows, dtype, sweep if model == args.models[0] else ())
    with torch.inference_mode():  # the first model's config sweep, until the time limit
        configs = [c for c in CONFIGS if str(c).startswith(tuple(args.configs))]
        rows, skipped = gemm_rows(args.models[0], args.rows, dtype, configs, t0 + args.time_limit)
    gemm += rows
    _speedups(gemm)
    print(f"`{json.dumps(environment())}`\n")
    cols = ["model", "gemm", "M", "shape", "provider", "config", "us", "GB/s", "speedup",
            "max_err", "error"]  # fmt: skip
    print(markdown_table(gemm, cols))
    _best(gemm)
    if steps:
        print("\nWhole decode step (CUDA graph replay):\n")
        print(markdown_table(steps, list(steps[0])))
    if skipped:
        print(f"\n{skipped} sweep rows skipped at the {args.time_limit:.0f} s time limit")
    print(f"\ntotal {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.out:
        write_csv(args.out, gemm + steps)


def _best(rows: list[dict[str, object]]) -> None:
    """Per model/GEMM/M: the fastest config against the default and torch."""
    print("\nFastest skinny config per shape:\n")
    print("| model | gemm | M | torch us | default us | best config | best us | best GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[object, object, object], list[dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["gemm"], r["M"]), []).append(r)
    for (model, name, m), rs in groups.items():
        ok = [r for r in rs if r["provider"] == "skinny" and not r["error"]]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["us"])
        base = next((r["us"] for r in rs if r["provider"] == "torch"), math.nan)
        dflt = next((r["us"] for r in rs if r["config"] == "default"), math.nan)
        print(f"| {model} | {name} | {m} | {base:.3g} | {dflt:.3g} | {best['config']} | "
              f"{best['us']:.3g} | {best['GB/s']:.4g} |")  # fmt: skip


if __name__ == "__main__":
    main()
