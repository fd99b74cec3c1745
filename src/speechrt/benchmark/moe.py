"""``speechrt bench moe``: issue 5's table -- the 3M-ASR Conformer-MoE encoder on one GPU.

Model (random weights of trained-like scale, :func:`build_net`): the seed's Conformer-MoE, 18 MoE
blocks (d=512, 8 heads, conv kernel 15, 32 experts of hidden 1024, top-1 routing on
``[embedding, x]`` scaled by the gate), 40-dim fbank, and the recipe's embedding network
(``3m-asr_wenetspeech_moe_config.yaml``: 6 dense blocks, d=512, FFN 2048). Routers are drawn so
that routing is sharp (gate values mostly 0.4-0.9), as SpeechMoE's sparsity loss trains it.

Order: FP16 first (the goals' dtype: encoder and memory rows, GEMM table, torch.compile rows),
then the other dtypes the same way; the report files are rewritten after every step, so a
time-out keeps all that was measured.

Encoder, for each B x T' (encoder frames; input 4 T' + 3 fbank frames, all valid) and dtype:

* ``speechrt_<dt>``: the fused engine (embedding network + MoE blocks on Triton kernels, one CUDA
  graph per bucket; buckets of 4 input frames, so each shape runs at its own size), built on
  the ``<dt>`` network and reading its expert weights in place;
* ``eager_<dt>``: the torch modules, the MoE as the usual loop over experts
  (:func:`~speechrt.layers.moe.moe_ffn_ref`); ``eager_fp32`` (TF32 off) is the reference of
  a0 (max abs error) / r0 (median relative error), gate a0 < 3.5e-2 and r0 < 2e-3;
* ``compile_<dt>``: ``torch.compile`` of that eager encoder (mode ``compile_mode``, static
  shapes; the expert loop graph-breaks), its compile seconds reported, a failure reported per
  shape.

Top-1 routing is discontinuous: a frame whose two best experts nearly tie may pick the other
one in FP16 and move by a whole expert's output, far beyond a0's gate. So speechrt rows also
give ``routing_flips`` (decisions that differ from the FP32 reference's, of
``routing_decisions``) and ``a0/r0_same_routing``: the errors against the FP32 reference run
with speechrt's own routing decisions (:func:`forced_routing`), i.e. the numeric error alone;
the routing table gives the reference's near-tie rate (top-2 probability margin < 1e-3).

Memory (speechrt, per dtype and shape, above what was allocated before that dtype's model was
built): weights (the network's parameters + the engine's private tensors, accounted from storages
by :meth:`~speechrt.engine.runner.ConformerEngine.weight_report` and measured as the allocation
growth while building), activations (transient peak of one eager step), the bucket's graph pool
and the positional cache, against the measured peak of capture + replay; ``experts_private`` is
the bytes of expert weights held twice (0: the kernel reads the module's (E, H, D) parameters).

Grouped GEMM (16 x 1024 rows, D=512, H=1024, E=32, top-1; uniform and skewed routing, half the
rows on one expert): the up and down grouped GEMMs (bias, swish, gate fused) alone for each tile
config of a sweep (FP16; other dtypes: the default config), their best sum against one dense FFN
of equal FLOPs (``F.linear`` x2 + SiLU), the sort and router alone, and the whole
``moe_experts`` (sort + both GEMMs) with the best and the default configs. ``ms`` is GPU time per
call: a CUDA graph of :data:`GRAPH_CALLS` back-to-back calls replayed, as the engine runs these
kernels (inside its graphs); ``ms_events`` is the median of single calls between CUDA events,
which also counts the host's launch work (Python, argument binding) while the GPU waits.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from speechrt.benchmark.common import (
    PeakMemory,
    cuda_time_ms,
    environment,
    error_stats,
    free_cuda_cache,
    graph_ms_per_call,
    graph_pool_bytes,
    kernel_profile,
    markdown_table,
    set_encoder_options,
    strict_fp32,
    sync_cuda,
    valid_rows,
    write_csv,
)
from speechrt.benchmark.conformer import ENC_GATE, trained_like_
from speechrt.engine.batching import DEFAULT_BATCH_BUCKETS, Buckets, pad_to
from speechrt.engine.precision import Precision, cast_keeping_norms, parse_dtype

SHAPES = ((1, 206), (1, 1024), (1, 2048), (16, 1024))
MIB = 2**20
# Buckets of 4 input frames: every benchmark shape runs at its own encoder length.
EXACT_BUCKETS = Buckets(DEFAULT_BATCH_BUCKETS, length_step=4, max_length=1 << 30)


@dataclass
class MoEBenchConfig:
    shapes: tuple[tuple[int, int], ...] = SHAPES  # (B, T') encoder frames
    dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")
    compile_dtypes: tuple[str, ...] = ("fp16",)
    compile_shapes: tuple[tuple[int, int], ...] | None = None  # None: every shape
    compile_mode: str = "default"
    gemm: bool = True
    gemm_rows: int = 16 * 1024
    gemm_configs: tuple | None = None  # GemmConfigs (None: sweep_configs() for fp16, else default)
    profile_shape: tuple[int, int] | None = (16, 1024)
    out: Path = field(default_factory=lambda: Path("bench_out"))
    device: str = "cuda"
    seed: int = 0
    num_blocks: int = 18
    num_experts: int = 32
    d_model: int = 512
    hidden: int = 1024
    heads: int = 8
    embed_blocks: int = 6
    embed_hidden: int = 2048
    input_dim: int = 40
    vocab: int = 5000
    router_gain: float = 4.0
    encoder_options: tuple[tuple[str, bool], ...] = ()  # fused-encoder switches


def seed_config(cfg: MoEBenchConfig):
    """The seed's Conformer-MoE (CTC-only 3M-ASR layout) with the recipe's embedding network."""
    from speechrt.models.conformer_moe.config import parse_3m_config

    layer = dict(
        attention_heads=cfg.heads,
        attention_dim=cfg.d_model,
        input_layer="conv2d",
        pos_enc_layer_type="rel_pos",
        normalize_before=True,
        activation_type="swish",
        use_cnn_module=True,
        cnn_module_kernel=15,
        cnn_module_norm="layer_norm",
        causal=False,
    )
    model_conf = dict(
        num_blocks=cfg.num_blocks,
        embed_conf=dict(num_blocks=cfg.embed_blocks, linear_units=cfg.embed_hidden, **layer),
        moe_conf=dict(num_experts=cfg.num_experts, hidden_units=cfg.hidden),
        **layer,
    )
    raw = {
        "job_type": "moe",
        "nnet_proto": "conformer_moe_catEmbed",
        "model_conf": model_conf,
        "dataset_conf": {"fbank_conf": {"num_mel_bins": cfg.input_dim}},
    }
    return parse_3m_config(raw, vocab_size=cfg.vocab)


def build_net(cfg: MoEBenchConfig):
    """Random FP32 network on ``cfg.device``: :func:`trained_like_` scales, then experts at
    ``randn / sqrt(fan_in)`` per expert and routers at ``router_gain * randn / sqrt(DE + D)``."""
    from speechrt.models.conformer_moe.model import ConformerMoEASR

    with torch.device(cfg.device):  # built and randomised on the device: seconds, not minutes
        net = trained_like_(ConformerMoEASR(seed_config(cfg), backend="torch"), cfg.seed)
    with torch.no_grad():
        for ff in net.moe_layers():  # trained_like_ took fan_in = p[0].numel()
            ff.w1.mul_(math.sqrt(ff.d_hidden))  # was 1 / sqrt(H * D)
            ff.w2.mul_(math.sqrt(ff.d_model))  # was 1 / sqrt(D * H)
            fan = ff.router_weight.shape[0]  # was 1 / sqrt(E)
            ff.router_weight.mul_(cfg.router_gain * math.sqrt(ff.num_experts / fan))
    return net.eval().requires_grad_(False)


def input_frames(net, t_out: int) -> int:
    """Fbank frames that give exactly ``t_out`` encoder frames (all of them valid)."""
    sub = net.encoder.subsampling
    return sub.rate * (t_out - 1) + sub.right_context + 1


def _allocated(device: str) -> int:
    if torch.device(device).type != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _mib(n: float | None) -> float | None:
    return None if n is None else n / MIB


# ------------------------------------------------------------------------------ encoder


class MoEBench:
    """Runs every table of the module docstring; :meth:`run` writes moe.md/.csv/.json."""

    def __init__(self, cfg: MoEBenchConfig):
        self.cfg = cfg
        self.dev = cfg.device
        self.base = _allocated(self.dev)
        t0 = time.perf_counter()
        self.net32 = build_net(cfg)
        self.build_s = time.perf_counter() - t0
        self.fp32_weights = _allocated(self.dev) - self.base
        d_in = cfg.input_dim
        self.cmvn = (torch.zeros(d_in, device=self.dev), torch.ones(d_in, device=self.dev))
        self.rows: list[dict] = []
        self.mem_rows: list[dict] = []
        self.gemm_rows: list[dict] = []
        self.route_rows: list[dict] = []
        self.notes: list[str] = []
        self.weights: dict[str, dict] = {}
        self.nets: dict[str, torch.nn.Module] = {}
        self._inputs: dict[tuple[int, int], tuple] = {}

    # -------------------------------------------------------------- inputs and reference
    def inputs(self, b: int, t_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random fbank (B, T, F) on the device, lengths (B,) and the FP32 reference's valid
        rows (sum(T'), D); the first call per shape also times the reference (``eager_fp32``)."""
        key = (b, t_out)
        if key not in self._inputs:
            t_in = input_frames(self.net32, t_out)
            gen = torch.Generator().manual_seed(b * 10007 + t_out)
            feats = torch.randn(b, t_in, self.cfg.input_dim, generator=gen).to(self.dev)
            lens = torch.full((b,), t_in, dtype=torch.long, device=self.dev)
            with torch.inference_mode(), strict_fp32():
                ref, ref_lens = self.net32.encoder(feats, lens)
                ref_v = valid_rows(ref, ref_lens)
                self._inputs[key] = (feats, lens, ref_v)
                self.route_rows.append(self._routing(feats, lens, b, t_out))
                self.rows.append(self._time("eager_fp32", "fp32", self.net32, b, t_out))
        return self._inputs[key]

    def _routing(self, feats, lens, b, t_out) -> dict:
        """Routing statistics of the FP32 reference: mean gate, load imbalance, near-ties."""
        seen = []
        hooks = [
            ff.register_forward_hook(lambda m, a, o: seen.append((m, a)))
            for ff in self.net32.moe_layers()
        ]
        try:
            self.net32.encoder(feats, lens)
        finally:
            for h in hooks:
                h.remove()
        gates, loads, ties = [], [], []
        for ff, (x, emb) in seen:
            r = ff.route(x, emb)
            p = torch.softmax(r.logits, dim=-1).topk(2, dim=-1).values  # (N, 2)
            counts = torch.bincount(r.gate_idx[:, 0], minlength=ff.num_experts).float()
            gates.append(r.gate_val.mean())
            loads.append(counts.max() / counts.mean())
            ties.append(((p[:, 0] - p[:, 1]) < 1e-3).float().mean())
        return {
            "B": b,
            "T_enc": t_out,
            "mean_gate": float(torch.stack(gates).mean()),
            "max_load_over_mean": float(torch.stack(loads).max()),
            "near_tie_frac": float(torch.stack(ties).mean()),
        }

    # -------------------------------------------------------------- per dtype
    def _net(self, dt: str):
        if dt == "fp32":
            return self.net32
        # As load_conformer_moe stores a half-precision network: norms stay float32.
        return cast_keeping_norms(copy.deepcopy(self.net32), parse_dtype(dt))

    def run_dtype(self, dt: str) -> None:
        """Build the ``dt`` network and engine, then memory and latency rows for every shape."""
        from speechrt.models.conformer_moe.load import build_engine

        for b, t in self.cfg.shapes:
            self.inputs(b, t)  # the FP32 reference (and its timing) first
        # Memory of this dtype's model: above what is allocated now, net32 counted for fp32.
        base = _allocated(self.dev) - (self.fp32_weights if dt == "fp32" else 0)
        net = self._net(dt)
        t0 = time.perf_counter()
        eng = build_engine(net, Precision.of(dt), self.cmvn, buckets=EXACT_BUCKETS)
        set_encoder_options(eng.encoder, self.cfg.encoder_options)
        build_s = time.perf_counter() - t0
        measured = _allocated(self.dev) - base
        rep = eng.weight_report()
        self.weights[dt] = {
            "engine_build_s": build_s,
            "weights_measured_MiB": _mib(measured),
            "params_MiB": _mib(rep.param_bytes),
            "engine_private_MiB": _mib(rep.private_bytes),
            "experts_private_MiB": _mib(rep.private_bytes_of("moe_")),
            "shared_MiB": _mib(rep.shared_bytes),
            "private_by_part_MiB": {k: v / MIB for k, v in rep.private_by_part.items()},
        }
        for b, t in self.cfg.shapes:
            mem_row = self._memory_row(dt, eng, b, t, base)
            self.mem_rows.append(mem_row)
            row = self._time(f"speechrt_{dt}", dt, net, b, t, eng)
            row["peak_MiB"] = mem_row.get("peak_MiB")
            row.update(self._same_routing(eng, b, t))
            self.rows.append(row)
            if dt != "fp32":
                self.rows.append(self._time(f"eager_{dt}", dt, net, b, t))
            print(f"done {dt} {b}x{t}", flush=True)
        if dt == "fp16" and self.cfg.profile_shape and self.dev == "cuda":
            self.profile = self._profile(eng, *self.cfg.profile_shape)
        if dt in self.cfg.compile_dtypes and self.cfg.compile_shapes != ():
            self.nets[dt] = net  # kept for the compile rows
        del eng, net
        free_cuda_cache(self.dev)

    def _memory_row(self, dt: str, eng, b: int, t: int, base: int) -> dict:
        feats, lens, _ = self.inputs(b, t)
        row = {"dtype": dt, "B": b, "T_enc": t}
        if self.dev != "cuda":
            return row
        padded, plens = pad_to(feats, lens, *eng.buckets.key(b, feats.shape[1]))
        with torch.inference_mode():
            eng.encoder.forward(padded, plens)  # compile kernels, fill the positional cache
            mem = PeakMemory(self.dev)
            mem.reset()
            eng.encoder.forward(padded, plens)
            activations = mem.peak_mib()
            pools = graph_pool_bytes()
            mem.reset()
            eng.encode(feats, lens)  # capture (warm-up included), replay
            peak = (torch.cuda.max_memory_allocated() - base) / MIB
        rep = eng.weight_report()
        weights = (rep.param_bytes + rep.private_bytes) / MIB
        row.update(
            weights_MiB=weights,
            activations_MiB=activations,
            graph_pool_MiB=(graph_pool_bytes() - pools) / MIB,
            pos_cache_MiB=rep.cache_bytes / MIB,
            peak_MiB=peak,
            experts_private_MiB=rep.private_bytes_of("moe_") / MIB,
        )
        row["peak_over_weights_act_cache"] = peak / (weights + activations + row["pos_cache_MiB"])
        return row

    def _time(self, provider: str, dt: str, net, b: int, t: int, eng=None) -> dict:
        """One encoder row: latency, errors against the reference and, for the torch modules,
        peak memory (their parameters + the forward's activations)."""
        feats, lens, ref_v = self._inputs[(b, t)]
        if eng is not None:
            fn = lambda: eng.encode(feats, lens)  # noqa: E731
        else:
            x = feats.to(parse_dtype(dt))
            fn = lambda: net.encoder(x, lens)  # noqa: E731
        strict = strict_fp32() if provider == "eager_fp32" else contextlib.nullcontext()
        with torch.inference_mode(), strict:
            mem = PeakMemory(self.dev)
            mem.reset()
            out, out_lens = fn()
            act = mem.peak_mib()
            ms = cuda_time_ms(fn, warmup=2, min_iters=5, budget_s=0.5, max_iters=50)
            row = self._row(provider, dt, b, t, ms, valid_rows(out.float(), out_lens), ref_v)
        if eng is None and act is not None:
            params = sum(p.numel() * p.element_size() for p in net.parameters())
            row["peak_MiB"] = act + params / MIB
        return row

    def _row(self, provider, dt, b, t, ms, out_v, ref_v) -> dict:
        a0, r0 = error_stats(out_v, ref_v)
        per_frame = (out_v.double() - ref_v.double()).abs().amax(dim=-1)  # (frames,)
        return {
            "part": "encoder",
            "provider": provider,
            "dtype": dt,
            "B": b,
            "T_enc": t,
            "latency_ms": ms,
            "frames_per_s": b * t / (ms / 1000.0),
            "a0": a0,
            "r0": r0,
            "frames_over_a0_gate": int((per_frame >= ENC_GATE[0]).sum()),
            "gate": "pass" if (a0 < ENC_GATE[0] and r0 < ENC_GATE[1]) else "FAIL",
        }

    def _same_routing(self, eng, b: int, t: int) -> dict:
        """Errors of the engine against the FP32 reference run with the engine's own routing
        decisions (top-1 flips at near-ties make a0 jump by a whole expert's output; this
        separates them from the numeric error), and the number of flipped decisions."""
        feats, lens, _ = self._inputs[(b, t)]
        padded, plens = pad_to(feats, lens, *eng.buckets.key(b, feats.shape[1]))
        eng.encoder.routing_log = []
        try:
            with torch.inference_mode():
                out, out_lens = eng.encoder.forward(padded, plens)
            log = eng.encoder.routing_log
        finally:
            eng.encoder.routing_log = None
        valid = (torch.arange(out.shape[1], device=out.device) < out_lens[:, None]).flatten()
        flips: list[int] = []
        with torch.inference_mode(), strict_fp32(), forced_routing(self.net32, log, valid, flips):
            ref, ref_lens = self.net32.encoder(padded, plens)
        a0, r0 = error_stats(valid_rows(out, out_lens), valid_rows(ref, ref_lens))
        return {
            "a0_same_routing": a0,
            "r0_same_routing": r0,
            "routing_flips": sum(flips),
            "routing_decisions": int(valid.sum()) * len(flips),
        }

    def _profile(self, eng, b: int, t: int) -> str:
        feats, lens, _ = self.inputs(b, t)
        with torch.inference_mode():
            rows, total_ms = kernel_profile(lambda: eng.encoder.forward(feats, lens))
        head = f"One fused encoder forward, {b}x{t} encoder frames, fp16, eager (no graph): "
        head += f"{total_ms:.3f} ms of GPU time in {sum(r['calls'] for r in rows)} kernels.\n\n"
        return head + markdown_table(rows[:25], ["kernel", "calls", "total_us", "share_%"])

    # -------------------------------------------------------------- torch.compile
    def compile_rows(self, dt: str) -> None:
        """torch.compile of the eager ``dt`` encoder, per shape (static shapes); each row is
        added to the report as soon as it is measured."""
        import torch._dynamo

        torch._dynamo.reset()
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        net = self.nets.pop(dt)
        enc = torch.compile(net.encoder, mode=self.cfg.compile_mode, dynamic=False)
        for b, t in self.cfg.compile_shapes or self.cfg.shapes:
            try:
                self.rows.append(self._compiled_row(enc, dt, b, t))
            except Exception as e:  # graph breaks are fine; a failure is reported, not fatal
                self.notes.append(f"compile_{dt} {b}x{t} failed: {type(e).__name__}: {e}"[:400])
            self.report()
        del net, enc
        torch._dynamo.reset()
        free_cuda_cache(self.dev)

    def _compiled_row(self, enc, dt: str, b: int, t: int) -> dict:
        feats, lens, ref_v = self.inputs(b, t)
        x = feats.to(parse_dtype(dt))
        with torch.inference_mode():
            t0 = time.perf_counter()
            out, out_lens = enc(x, lens)  # compiles this shape
            sync_cuda()
            compile_s = time.perf_counter() - t0
            ms = cuda_time_ms(lambda: enc(x, lens), warmup=2, min_iters=5, budget_s=0.5)
            row = self._row(f"compile_{dt}", dt, b, t, ms, valid_rows(out.float(), out_lens), ref_v)
        row["compile_s"] = compile_s
        print(f"compiled {dt} {b}x{t}: {ms:.2f} ms, {compile_s:.0f} s", flush=True)
        return row

    # -------------------------------------------------------------- run and report
    def run(self) -> dict:
        """The goals' dtype first (fp16: encoder and memory rows, GEMM table, torch.compile
        rows), then the other dtypes the same way; the report is rewritten after every step,
        so a time-out keeps all that was measured."""
        cfg = self.cfg
        cfg.out.mkdir(parents=True, exist_ok=True)
        self.profile = "(no profile)"
        dtypes = sorted(cfg.dtypes, key=lambda d: ("fp16", "bf16", "fp32").index(d))
        for group in (dtypes[:1], dtypes[1:]):
            for dt in group:
                self.run_dtype(dt)
                self.report()
            for dt in group if cfg.gemm else ():
                self.gemm_rows += gemm_rows(cfg, dt)
                self.report()
            for dt in (d for d in group if d in self.nets):
                self.compile_rows(dt)
        return self.report()

    def report(self) -> dict:
        cfg = self.cfg
        env = {**environment(), "encoder_options": dict(cfg.encoder_options)}
        _speedups(self.rows)
        goals = goal_summary(self.rows, self.gemm_rows, f"{cfg.gemm_rows} rows")
        result = {
            "env": env,
            "config": {k: str(v) for k, v in asdict(cfg).items()},
            "goals": goals,
            "encoder": self.rows,
            "memory": self.mem_rows,
            "weights": self.weights,
            "gemm": self.gemm_rows,
            "routing": self.route_rows,
            "notes": self.notes,
        }
        write_csv(cfg.out / "moe.csv", self.rows + self.mem_rows + self.gemm_rows)
        (cfg.out / "moe.json").write_text(json.dumps(result, indent=1, default=str))
        (cfg.out / "moe.md").write_text(self._markdown(env, goals))
        return result

    def _markdown(self, env: dict, goals: list[dict]) -> str:
        cfg = self.cfg
        enc_cols = [
            "provider", "dtype", "B", "T_enc", "latency_ms", "frames_per_s", "a0", "r0", "gate",
            "frames_over_a0_gate", "a0_same_routing", "r0_same_routing", "routing_flips",
            "routing_decisions", "x_eager_fp32", "x_eager_same_dtype", "x_compile_same_dtype",
            "compile_s", "peak_MiB",
        ]  # fmt: skip
        mem_cols = [
            "dtype", "B", "T_enc", "weights_MiB", "activations_MiB", "graph_pool_MiB",
            "pos_cache_MiB", "peak_MiB", "peak_over_weights_act_cache", "experts_private_MiB",
        ]  # fmt: skip
        gemm_cols = [
            "dtype", "routing", "case", "config", "ms", "TFLOPs", "x_dense", "ms_events",
            "x_dense_events", "error",
        ]  # fmt: skip
        model = (
            f"{cfg.num_blocks} MoE blocks, d={cfg.d_model}, {cfg.heads} heads, {cfg.num_experts} "
            f"experts x hidden {cfg.hidden}, embedding network {cfg.embed_blocks} blocks (FFN "
            f"{cfg.embed_hidden}), {cfg.input_dim}-dim fbank, random trained-like weights, "
            f"router gain {cfg.router_gain}"
        )
        md = [
            "# speechrt Conformer-MoE benchmark (issue 5)\n",
            f"`{json.dumps(env)}`\n",
            f"Model: {model}. Network built in {self.build_s:.1f} s.\n",
            "## Goals\n",
            markdown_table(goals, ["goal", "shape", "value", "target", "status"]),
            "\n## Encoder latency and accuracy (vs eager FP32, TF32 off)\n",
            markdown_table(self.rows, enc_cols),
            "\n## Memory (speechrt, above the allocation before that dtype's model)\n",
            markdown_table(self.mem_rows, mem_cols),
            "\nWeights held, per dtype (MiB; experts_private must be 0):\n",
            "```\n" + json.dumps(self.weights, indent=1) + "\n```\n",
            "## Routing of the FP32 reference (per shape, over all MoE blocks)\n",
            markdown_table(
                self.route_rows,
                ["B", "T_enc", "mean_gate", "max_load_over_mean", "near_tie_frac"],
            ),
            f"\n## Grouped expert GEMM vs dense GEMM of equal FLOPs ({cfg.gemm_rows} rows)\n",
            markdown_table(self.gemm_rows, gemm_cols),
            "\n## Profile\n\n" + self.profile,
        ]
        if self.notes:
            md.append("\n## Notes\n\n" + "\n".join(f"* {n}" for n in self.notes))
        return "\n".join(md) + "\n"


@contextlib.contextmanager
def forced_routing(net, gate_idx: list[torch.Tensor], valid: torch.Tensor, flips: list[int]):
    """Run ``net``'s MoE layers (torch path) with the given expert choices (one (N, K) tensor
    per layer) instead of their own, gates taken from their own softmax at those experts; each
    layer appends to ``flips`` how many ``valid`` (N,) rows it would have routed differently."""
    from speechrt.kernels.moe import moe_experts_ref, moe_route_ref

    def make(ff, idx: torch.Tensor):
        def forward(x: torch.Tensor, embed: torch.Tensor | None = None) -> torch.Tensor:
            r = moe_route_ref(x, ff.router_weight, ff.router_bias, embed, ff.top_k)
            idx64 = idx.long()
            flips.append(int(((r.gate_idx != idx64).any(-1) & valid).sum()))
            gate = torch.softmax(r.logits, dim=-1).gather(-1, idx64)  # (N, K)
            if ff.renormalize:
                gate = gate / gate.sum(dim=-1, keepdim=True)
            gate = gate if ff.scale_by_gate else None
            return moe_experts_ref(x, idx64, gate, ff.w1, ff.b1, ff.w2, ff.b2, ff.activation)

        return forward

    layers = net.moe_layers()
    for ff, idx in zip(layers, gate_idx, strict=True):
        ff.forward = make(ff, idx)
    try:
        yield
    finally:
        for ff in layers:
            vars(ff).pop("forward", None)


def _speedups(rows: list[dict]) -> None:
    """Add x_eager_fp32, x_eager_same_dtype and x_compile_same_dtype (ratios of latencies)."""
    lat = {(r["provider"], r["B"], r["T_enc"]): r["latency_ms"] for r in rows}
    for r in rows:
        key = (r["B"], r["T_enc"])
        for col, prov in (
            ("x_eager_fp32", "eager_fp32"),
            ("x_eager_same_dtype", f"eager_{r['dtype']}"),
            ("x_compile_same_dtype", f"compile_{r['dtype']}"),
        ):
            if (prov, *key) in lat and r["provider"] != prov:
                r[col] = lat[(prov, *key)] / r["latency_ms"]


def goal_summary(rows: list[dict], gemm: list[dict], gemm_shape: str = "16x1024") -> list[dict]:
    """Issue 5's goals, FP16: >= 10x eager at 1x206, >= 1.5x torch.compile at every shape,
    within the encoder gate; grouped GEMM within 1.5x of the dense GEMM at 16x1024 rows."""
    out = []
    for r in (r for r in rows if r["provider"] == "speechrt_fp16"):
        shape = f"{r['B']}x{r['T_enc']}"
        if (r["B"], r["T_enc"]) == (1, 206):
            for col in ("x_eager_fp32", "x_eager_same_dtype"):
                out.append(_goal(f"speed-up {col}", shape, r.get(col), 10.0))
        out.append(
            _goal("speed-up x_compile_same_dtype", shape, r.get("x_compile_same_dtype"), 1.5)
        )
        value = f"a0 {r['a0']:.3g} r0 {r['r0']:.3g}"
        if "a0_same_routing" in r:
            value += (
                f" (same routing: a0 {r['a0_same_routing']:.3g} r0 {r['r0_same_routing']:.3g};"
                f" {r['routing_flips']} of {r['routing_decisions']} decisions flipped)"
            )
        out.append(
            {"goal": "FP16 encoder gate", "shape": shape, "value": value,
             "target": "a0 < 3.5e-2, r0 < 2e-3", "status": r["gate"]}
        )  # fmt: skip
    for g in (g for g in gemm if g["dtype"] == "fp16" and g["case"].startswith("best")):
        for col, timing in (("x_dense", "GPU time"), ("x_dense_events", "single-call events")):
            out.append(_goal(f"grouped/dense {g['case']} [{g['routing']}, {timing}]", gemm_shape,
                             g.get(col), 1.5, lower=True))  # fmt: skip
    return out


def _goal(name: str, shape: str, value, target: float, lower: bool = False) -> dict:
    if value is None:
        status = "not measured"
    else:
        status = "pass" if (value <= target if lower else value >= target) else "FAIL"
    return {
        "goal": name,
        "shape": shape,
        "value": value,
        "target": f"{'<=' if lower else '>='} {target}",
        "status": status,
    }


# ------------------------------------------------------------------------------ grouped GEMM


GRAPH_CALLS = 10  # calls per CUDA graph in the GEMM table's GPU times


def sweep_configs(dt: str) -> tuple:
    """Tile configs the GEMM table sweeps (float32 takes smaller K tiles: IEEE dots); ``p<n>``:
    the persistent kernel, n programs per SM."""
    from speechrt.kernels.moe import GemmConfig as G

    if dt == "fp32":
        return (G(64, 64, 32, 4, 2), G(64, 128, 32, 4, 2), G(128, 64, 32, 4, 2),
                G(128, 128, 32, 8, 2), G(128, 128, 16, 8, 3), G(64, 64, 16, 4, 3))  # fmt: skip
    return (G(64, 128, 64, 4, 3), G(128, 64, 64, 4, 3), G(128, 128, 64, 4, 3),
            G(128, 128, 64, 8, 3), G(128, 256, 64, 8, 3), G(256, 128, 64, 8, 3),
            G(64, 128, 64, 4, 3, 1), G(64, 128, 64, 4, 5, 1), G(64, 128, 64, 4, 3, 2),
            G(64, 128, 64, 4, 4, 2), G(64, 256, 64, 8, 3, 1), G(128, 128, 64, 8, 3, 1),
            G(128, 128, 64, 8, 4, 1), G(128, 256, 64, 8, 3, 1),
            G(256, 128, 64, 8, 3, 1))  # fmt: skip


def _timed(fn) -> tuple[float, float]:
    """(GPU ms per call from a CUDA graph of GRAPH_CALLS calls, median single-call ms between
    CUDA events, host launch work included); both the host clock's without CUDA."""
    events = cuda_time_ms(fn)
    if not torch.cuda.is_available():
        return events, events
    return graph_ms_per_call([fn] * GRAPH_CALLS), events


def _gemm_inputs(cfg: MoEBenchConfig, dtype: torch.dtype) -> dict:
    n, d, h, e = cfg.gemm_rows, cfg.d_model, cfg.hidden, cfg.num_experts
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=cfg.device) * scale).to(dtype)

    uniform = torch.randint(0, e, (n, 1), generator=g, device=cfg.device)
    skewed = uniform.clone()
    skewed[::2] = 0  # half the rows on expert 0
    return dict(
        x=rand(n, d), w1=rand(e, h, d, scale=d**-0.5), b1=rand(e, h, scale=0.05),
        w2=rand(e, d, h, scale=h**-0.5), b2=rand(e, d, scale=0.05),
        gate=torch.rand(n, 1, generator=g, device=cfg.device), router=rand(2 * d, e, scale=0.05),
        routing={"uniform": uniform, "skewed": skewed},
    )  # fmt: skip


def gemm_rows(cfg: MoEBenchConfig, dt: str) -> list[dict]:
    """The grouped GEMM table of one dtype (see the module docstring)."""
    from speechrt.kernels.moe import moe_experts, moe_route, moe_sort

    dtype = parse_dtype(dt)
    t = _gemm_inputs(cfg, dtype)
    x, w1, b1, w2, b2 = t["x"], t["w1"], t["b1"], t["w2"], t["b2"]
    flops = 4 * cfg.gemm_rows * cfg.d_model * cfg.hidden
    with torch.inference_mode():  # float32 matmuls: IEEE (torch's default, no TF32)
        dense = _timed(lambda: F.linear(F.silu(F.linear(x, w1[0], b1[0])), w2[0], b2[0]))
        rows = [_gemm_row(dt, "-", "dense_equal_flops", "cuBLAS", dense, flops, dense)]
        hd = F.silu(F.linear(x, w1[0], b1[0]))  # (N, H)
        parts = {
            "up": _timed(lambda: F.linear(x, w1[0], b1[0])),
            "down": _timed(lambda: F.linear(hd, w2[0], b2[0])),
        }
        for part, ms in parts.items():
            rows.append(_gemm_row(dt, "-", f"dense_{part}", "cuBLAS", ms, flops / 2, ms))
        ms = _timed(lambda: moe_route(x, t["router"], None, x))
        rows.append(_gemm_row(dt, "-", "router[E,k=1]", "default", ms, 0, None))
        for routing, idx in t["routing"].items():
            order, offsets = moe_sort(idx, cfg.num_experts)
            ms = _timed(lambda i=idx: moe_sort(i, cfg.num_experts))
            rows.append(_gemm_row(dt, routing, "sort", "-", ms, 0, None))
            best = _sweep(cfg, dt, x, order, offsets, t, rows, routing, flops, dense, parts)
            cases = [("default_full", None)] + ([("best_full", best)] if None not in best else [])
            for case, conf in cases:
                ms = _timed(
                    lambda i=idx, c=conf: moe_experts(x, i, t["gate"], w1, b1, w2, b2, _config=c)
                )
                label = "default" if conf is None else f"{conf[0]}/{conf[1]}"
                rows.append(_gemm_row(dt, routing, case, label, ms, flops, dense))
    return rows


def _sweep(cfg, dt, x, order, offsets, t, rows, routing, flops, dense_ffn, dense) -> tuple:
    """Time the up and down GEMMs alone for every config (x_dense against the dense GEMM of that
    part, ``dense``: {part: (GPU ms, events ms)}); add rows; return (best up, best down) by GPU
    time and add a ``best_gemms`` row (their sum: the grouped GEMM without the sort, against
    the whole dense FFN's times ``dense_ffn``)."""
    from speechrt.kernels.moe import _expert_down, _expert_up, _gemm_config

    default = _gemm_config(order.numel(), cfg.num_experts, x.dtype)
    gate = t["gate"].reshape(-1).float().contiguous()
    y = torch.empty_like(x)
    h = _expert_up(x, order, offsets, t["w1"], t["b1"], "swish", 1, default)
    configs = cfg.gemm_configs or (sweep_configs(dt) if dt == "fp16" else (default,))
    best = {"up": ((math.inf, math.inf), None), "down": ((math.inf, math.inf), None)}
    for conf in configs:
        fns = {
            "up": lambda c=conf: _expert_up(x, order, offsets, t["w1"], t["b1"], "swish", 1, c),
            "down": lambda c=conf: _expert_down(h, order, offsets, gate, t["w2"], t["b2"], y, c),
        }
        for part, fn in fns.items():
            try:
                ms = _timed(fn)
            except Exception as e:  # e.g. a tile that does not fit in shared memory
                rows.append({**_gemm_row(dt, routing, part, str(conf), None, 0, None),
                             "error": f"{type(e).__name__}: {e}"[:120]})  # fmt: skip
                continue
            rows.append(_gemm_row(dt, routing, part, str(conf), ms, flops / 2, dense[part]))
            if ms[0] < best[part][0][0]:
                best[part] = (ms, conf)
    (up_ms, up), (down_ms, down) = best["up"], best["down"]
    if up is not None and down is not None:
        label = f"{up}/{down}"
        both = (up_ms[0] + down_ms[0], up_ms[1] + down_ms[1])
        rows.append(_gemm_row(dt, routing, "best_gemms", label, both, flops, dense_ffn))
    return up, down


def _gemm_row(dt, routing, case, config, ms, flops, dense_ms) -> dict:
    """One GEMM-table row; ``ms`` and ``dense_ms`` are (GPU ms, events ms) pairs or None."""
    gpu, events = ms if ms else (None, None)
    ref_gpu, ref_events = dense_ms if dense_ms else (None, None)
    return {
        "part": "gemm",
        "dtype": dt,
        "routing": routing,
        "case": case,
        "config": config,
        "ms": gpu,
        "TFLOPs": flops / gpu / 1e9 if gpu and flops else None,
        "x_dense": gpu / ref_gpu if gpu and ref_gpu else None,
        "ms_events": events,
        "x_dense_events": events / ref_events if events and ref_events else None,
    }
