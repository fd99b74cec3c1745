"""``speechrt bench conformer``: the seed's encoder/decoder table, extended, on one GPU.

For each B x T (input frames): latency (median of CUDA events), throughput (B*T / latency), and
accuracy against our FP32 reference (a0 = max abs error, r0 = median relative error) with the
hackathon gates (encoder a0 < 3.5e-2, r0 < 2e-3; decoder a0 < 0.4, r0 < 2e-4), side by side for
PyTorch eager FP32 and FP16 (speechrt's torch modules: WeNet's layer code, reimplemented),
torch.compile max-autotune (FP16, a subset of shapes, compile time reported) and speechrt's fused
Triton kernels + CUDA graphs (FP16, BF16). Random weights of trained-like scale, WeNet AISHELL
Conformer shapes (d=256, 4 heads, FFN 2048, 12 blocks, conv2d, rel_pos, kernel 15; 6-block
decoder, vocab 4233).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from speechrt.benchmark.common import (  # noqa: I001
    audio_files,
    cuda_time_ms,
    environment,
    error_stats,
    kernel_profile,
    markdown_table,
    set_encoder_options,
    strict_fp32,
    sync_cuda,
    valid_rows,
    write_csv,
)

ENC_GATE = (3.5e-2, 2e-3)
DEC_GATE = (0.4, 2e-4)


@dataclass
class BenchConfig:
    batches: tuple[int, ...] = (1, 4, 16, 64)
    lengths: tuple[int, ...] = (16, 64, 256, 1024)
    compile_shapes: tuple[tuple[int, int], ...] = ()
    hyps: int = 10
    dtypes: tuple[str, ...] = ("fp16", "bf16")
    seed: int = 0
    e2e_dir: str | None = None
    profile_shape: tuple[int, int] = (16, 256)
    out: Path = field(default_factory=lambda: Path("bench_out"))
    device: str = "cuda"
    num_blocks: int = 12  # smaller only for CPU smoke tests
    encoder_options: tuple[tuple[str, bool], ...] = ()  # fused-encoder switches, e.g. triton_add_ln
    decoder_blocks: int = 6


def aishell_config(num_blocks: int = 12, decoder_blocks: int = 6):
    """The WeNet AISHELL Conformer of the seed (random weights)."""
    from speechrt.models.conformer.config import DecoderConfig, EncoderConfig, ModelConfig

    enc = EncoderConfig(
        output_size=256,
        attention_heads=4,
        linear_units=2048,
        num_blocks=num_blocks,
        input_layer="conv2d",
        cnn_module_kernel=15,
        cnn_module_norm="batch_norm",
    )
    dec = DecoderConfig(attention_heads=4, linear_units=2048, num_blocks=decoder_blocks)
    return ModelConfig(input_dim=80, vocab_size=4233, encoder=enc, decoder=dec, sos=4232, eos=4232)


def trained_like_(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Randomise weights at trained-like scale: unit-ish activations, non-trivial norms.

    Drawn on the parameters' device (a CPU module gets the same numbers as ever)."""
    dev = next(net.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, device=dev)

    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(randn(p.shape) / fan_in**0.5)
            elif name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * randn(p.shape))
            else:
                p.copy_(0.05 * randn(p.shape))
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * randn(b.shape))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g, device=dev))
    return net


def build_models(seed: int, device: str = "cuda", num_blocks: int = 12, decoder_blocks: int = 6):
    from speechrt.models.conformer.model import ConformerASR

    net = ConformerASR(aishell_config(num_blocks, decoder_blocks))
    net = trained_like_(net, seed).eval().requires_grad_(False)
    return net.to(device)


def _hyps(b: int, w: int, t_out: int, vocab: int, gen: torch.Generator, device):
    """Random n-best lists of plausible lengths: (B, W, L) tokens, (B, W) lengths."""
    max_len = max(2, t_out // 2)
    lens = torch.randint(1, max_len + 1, (b, w), generator=gen)
    toks = torch.randint(1, vocab - 1, (b, w, max_len), generator=gen)
    return toks.to(device), lens.to(device)


class ConformerBench:
    def __init__(self, cfg: BenchConfig):
        from speechrt.engine.precision import Precision
        from speechrt.engine.runner import ConformerEngine

        self.cfg = cfg
        self.dev = cfg.device
        self.net = build_models(cfg.seed, cfg.device, cfg.num_blocks, cfg.decoder_blocks)
        self.net16 = copy.deepcopy(self.net).half()
        self.engines = {}
        self.warmup_s = {}
        for dt in cfg.dtypes:
            t0 = time.perf_counter()
            self.engines[dt] = ConformerEngine(self.net, Precision.of(dt), cuda_graphs=True)
            set_encoder_options(self.engines[dt].encoder, cfg.encoder_options)
            self.warmup_s[dt] = time.perf_counter() - t0
        self.rows: list[dict] = []

    # ------------------------------------------------------------------ encoder
    def encoder_rows(self, b: int, t: int) -> list[dict]:
        gen = torch.Generator().manual_seed(b * 10007 + t)
        feats = torch.randn(b, t, 80, generator=gen).to(self.dev)
        lens = torch.full((b,), t, dtype=torch.long, device=self.dev)
        rows = []
        with torch.inference_mode():
            with strict_fp32():
                ref, ref_lens = self.net.encoder(feats, lens)
            ref_v = valid_rows(ref, ref_lens)
            providers = {
                "eager_fp32": lambda: self.net.encoder(feats, lens),
                "eager_fp16": lambda: self.net16.encoder(feats.half(), lens),
            }
            for dt, eng in self.engines.items():
                t0 = time.perf_counter()
                eng.encode(feats, lens)  # capture this bucket
                sync_cuda()
                self.warmup_s[f"{dt}_bucket_{b}x{t}"] = time.perf_counter() - t0
                providers[f"speechrt_{dt}"] = lambda e=eng: e.encode(feats, lens)
            for name, fn in providers.items():
                out, out_lens = fn()
                a0, r0 = error_stats(valid_rows(out.float(), out_lens), ref_v)
                ms = cuda_time_ms(fn)
                rows.append(self._row("encoder", name, b, t, ms, a0, r0, ENC_GATE))
        return rows

    def compile_rows(self, b: int, t: int) -> list[dict]:
        feats = torch.randn(b, t, 80, device=self.dev).half()
        lens = torch.full((b,), t, dtype=torch.long, device=self.dev)
        with torch.inference_mode():
            with strict_fp32():
                ref, ref_lens = self.net.encoder(feats.float(), lens)
            enc = torch.compile(self.net16.encoder, mode="max-autotune", dynamic=False)
            t0 = time.perf_counter()
            out, out_lens = enc(feats, lens)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            a0, r0 = error_stats(valid_rows(out.float(), out_lens), valid_rows(ref, ref_lens))
            ms = cuda_time_ms(lambda: enc(feats, lens))
        row = self._row("encoder", "compile_fp16", b, t, ms, a0, r0, ENC_GATE)
        row["compile_s"] = compile_s
        return [row]

    # ------------------------------------------------------------------ decoder
    def decoder_rows(self, b: int, t: int) -> list[dict]:
        from speechrt.decoding.rescoring import decoder_inputs

        gen = torch.Generator().manual_seed(b * 7919 + t)
        feats = torch.randn(b, t, 80, generator=gen).to(self.dev)
        lens = torch.full((b,), t, dtype=torch.long, device=self.dev)
        rows = []
        with torch.inference_mode():
            mem, mem_lens = self.net.encoder(feats, lens)
            hyps, hyp_lens = _hyps(b, self.cfg.hyps, mem.shape[1], 4233, gen, self.dev)
            l2r_in, r2l_in, in_lens = decoder_inputs(hyps, hyp_lens, 4232, 4232)
            with strict_fp32():
                ref, _ = self.net.rescoring_log_probs(mem, mem_lens, hyps, hyp_lens, False)
            valid = torch.arange(ref.shape[2], device=self.dev) < in_lens.unsqueeze(-1)
            ref_v = ref[valid]
            mem16 = mem.half()
            providers = {
                "eager_fp32": lambda: self.net.rescoring_log_probs(
                    mem, mem_lens, hyps, hyp_lens, False
                )[0],
                "eager_fp16": lambda: self.net16.rescoring_log_probs(
                    mem16, mem_lens, hyps, hyp_lens, False
                )[0],
            }
            for dt, eng in self.engines.items():
                providers[f"speechrt_{dt}"] = lambda e=eng: e.rescoring_log_probs(
                    mem, mem_lens, l2r_in, r2l_in, in_lens, False
                )[0]
            for name, fn in providers.items():
                out = fn()
                a0, r0 = error_stats(out.float()[valid], ref_v)
                ms = cuda_time_ms(fn)
                rows.append(self._row("decoder", name, b, t, ms, a0, r0, DEC_GATE))
        return rows

    @staticmethod
    def _row(part, provider, b, t, ms, a0, r0, gate) -> dict:
        return {
            "part": part,
            "provider": provider,
            "B": b,
            "T": t,
            "latency_ms": ms,
            "throughput_frames_per_s": b * t / (ms / 1000.0),
            "a0": a0,
            "r0": r0,
            "gate": "pass" if (a0 < gate[0] and r0 < gate[1]) else "FAIL",
        }

    # ------------------------------------------------------------------ profile
    def profile(self) -> str:
        """Per-kernel CUDA time of one eager fused encoder forward (FP16) at the profile shape."""
        if self.dev != "cuda":
            return "(no profile: not on CUDA)"

        b, t = self.cfg.profile_shape
        eng = self.engines[self.cfg.dtypes[0]]
        feats = torch.randn(b, t, 80, device=self.dev)
        lens = torch.full((b,), t, dtype=torch.long, device=self.dev)
        with torch.inference_mode():
            rows, total_ms = kernel_profile(lambda: eng.encoder.forward(feats, lens))
        head = (
            f"One fused encoder forward, {b}x{t} frames, {self.cfg.dtypes[0]}, eager (no graph): "
        )
        head += f"{total_ms:.3f} ms of GPU time in {sum(r['calls'] for r in rows)} kernels.\n\n"
        return head + markdown_table(rows[:25], ["kernel", "calls", "total_us", "share_%"])

    # ------------------------------------------------------------------ end to end
    def e2e_rows(self) -> list[dict]:
        """Audio files -> text: fbank (GPU), encoder, CTC prefix beam 10, rescoring; RTF."""
        from speechrt.audio.io import load_audio
        from speechrt.models.conformer.recognizer import WenetModel
        from speechrt.models.conformer.tokenizer import SymbolTable

        wavs = [load_audio(f) for f in audio_files(self.cfg.e2e_dir)]  # (N,) 16 kHz each
        audio_s = sum(w.shape[-1] for w in wavs) / 16000.0
        symbols = SymbolTable({i: f"u{i}" for i in range(4233)})
        variants = {"eager_fp32": None, **{f"speechrt_{k}": v for k, v in self.engines.items()}}
        rows = []
        for name, eng in variants.items():
            model = WenetModel(self.net, symbols, Path("."), self.dev, torch.float32, engine=eng)
            order = sorted(range(len(wavs)), key=lambda i: -wavs[i].shape[-1])

            def run_all(model=model, order=order):
                for s in range(0, len(order), 16):
                    model.transcribe_waveforms(
                        [wavs[i] for i in order[s : s + 16]],
                        method="attention_rescoring",
                        beam_size=10,
                    )

            run_all()  # warm-up: captures the buckets
            sync_cuda()
            t0 = time.perf_counter()
            run_all()
            sync_cuda()
            sec = time.perf_counter() - t0
            rows.append(
                {
                    "part": "e2e",
                    "provider": name,
                    "files": len(wavs),
                    "audio_s": audio_s,
                    "seconds": sec,
                    "RTF": sec / audio_s,
                    "RTFx": audio_s / sec,
                }
            )
        return rows

    # ------------------------------------------------------------------ run all
    def run(self) -> dict:
        cfg = self.cfg
        cfg.out.mkdir(parents=True, exist_ok=True)
        for t in cfg.lengths:
            for b in cfg.batches:
                self.rows += self.encoder_rows(b, t)
                self.rows += self.decoder_rows(b, t)
                print(f"done {b}x{t}", flush=True)
        for b, t in cfg.compile_shapes:
            self.rows += self.compile_rows(b, t)
            write_csv(cfg.out / "conformer_partial.csv", self.rows)  # survives a time-out
            print(f"compiled {b}x{t}: {self.rows[-1]}", flush=True)
        e2e = self.e2e_rows() if cfg.e2e_dir else []
        prof = self.profile()
        return self.report(e2e, prof)

    def report(self, e2e: list[dict], prof: str) -> dict:
        cfg = self.cfg
        env = {**environment(), "encoder_options": dict(self.cfg.encoder_options)}
        base = {
            (r["part"], r["B"], r["T"]): r["latency_ms"]
            for r in self.rows
            if r["provider"] == "eager_fp32"
        }
        comp = {
            (r["B"], r["T"]): r["latency_ms"] for r in self.rows if r["provider"] == "compile_fp16"
        }
        for r in self.rows:
            r["speedup_vs_eager_fp32"] = base[(r["part"], r["B"], r["T"])] / r["latency_ms"]
            if r["part"] == "encoder" and (r["B"], r["T"]) in comp:
                r["speedup_vs_compile"] = comp[(r["B"], r["T"])] / r["latency_ms"]
        write_csv(cfg.out / "conformer.csv", self.rows + e2e)
        cols = [
            "part",
            "provider",
            "B",
            "T",
            "latency_ms",
            "throughput_frames_per_s",
            "a0",
            "r0",
            "gate",
            "speedup_vs_eager_fp32",
            "speedup_vs_compile",
            "compile_s",
        ]
        md = [
            f"# speechrt Conformer benchmark\n\n`{json.dumps(env)}`\n",
            f"Engine build (weights prepared) per dtype, s: {json.dumps(self.warmup_s)}\n",
            markdown_table(self.rows, cols),
        ]
        if e2e:
            md.append(
                "\n## End to end\n\n"
                + markdown_table(e2e, ["provider", "files", "audio_s", "seconds", "RTF", "RTFx"])
            )
        md.append("\n## Profile\n\n" + prof)
        (cfg.out / "conformer.md").write_text("\n".join(md) + "\n")
        self._plot()
        return {"env": env, "rows": self.rows, "e2e": e2e}

    def _plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
        for ax, part in zip(axes, ("encoder", "decoder")):
            rows = [r for r in self.rows if r["part"] == part]
            shapes = sorted({(r["B"], r["T"]) for r in rows}, key=lambda s: (s[1], s[0]))
            provs = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != "eager_fp32"]
            width = 0.8 / max(len(provs), 1)
            for i, p in enumerate(provs):
                vals = [
                    next(
                        (
                            r["speedup_vs_eager_fp32"]
                            for r in rows
                            if r["provider"] == p and (r["B"], r["T"]) == s
                        ),
                        0,
                    )
                    for s in shapes
                ]
                ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=p)
            ax.set_xticks([j + 0.4 for j in range(len(shapes))])
            ax.set_xticklabels([f"{b}x{t}" for b, t in shapes], rotation=60, fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("speed-up vs eager FP32")
            ax.set_title(part)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(self.cfg.out / "conformer_speedup.png", dpi=110)
