"""``speechrt bench whisper``: encoder latency, decode ms/token and peak memory per preset.

Random weights (device-side normal init, trained-like scale) with each preset's real dims, built
directly with :class:`WhisperNet` (no download). The same weights are copied into the other
providers through the checkpoint key maps, so their logits can be compared (``logit_diff``: max
absolute difference of the last step's logits against speechrt eager, same dtype).

Providers (each skipped with a note if its package is missing or it fails):

* ``speechrt`` eager and ``speechrt_graph`` (the static-cache ``step`` captured in one CUDA
  graph per batch with a static ``kv_len`` = prefix + steps), both on the torch path
  (``kernels=False``: torch LayerNorm and SDPA); eager passes ``kv_len = position + 1``;
* ``speechrt_engine``: the transcribe path's engine (``DecodeEngine``: bucketed CUDA graphs of
  set_audio, prefill and step, the Triton kernel path) stepping the same forced tokens,
  ``capture_s`` its capture time;
  ``speechrt_window``: the whole window loop of ``transcribe`` on that engine (greedy with the
  timestamp rules and suppression filters, stop checks), forced to ``steps`` tokens;
  the encoder rows of ``speechrt`` take the kernel path replayed from a CUDA graph per batch
  (as ``transcribe`` runs it), ``speechrt_torch`` the torch path (eager);
* ``openai``: openai-whisper's ``model.decoder(tokens, features, kv_cache=...)`` with its
  kv-cache hooks (weights cast to the dtype, LayerNorm kept in FP32 as speechrt does);
* ``hf``: transformers ``WhisperForConditionalGeneration`` (SDPA) with an
  ``EncoderDecoderCache``.

Decode timing, for every provider: one window of forced tokens (cross-attention K/V of random
features, prefill of ``prefix`` tokens, then ``steps`` single-token steps); ``ms_per_token`` is
that total over ``steps`` (the conservative per-window figure: it carries the window's fixed
cost). ``speechrt_engine`` rows add the steady-state decode step: ``step_ms`` is the median time
of the ``steps`` steps alone (positions ``prefix`` .. ``prefix + steps - 1``, each step's
position write included) replayed on one window prepared beforehand (set_audio and prefill done
once, not timed), over ``steps``; ``fixed_ms`` = window time - ``steps`` x ``step_ms``, the
per-window cost of opening the session (cross-attention K/V) and the prefill.
``peak_mem_MiB``: ``torch.cuda.max_memory_allocated`` during the measurement minus what was
allocated before the provider's model was built (its weights, caches and activations). On CPU
(smoke runs) times come from the host clock and memory is empty.

End to end (``e2e_dir`` without ``e2e_model``): every audio file of the folder (first 30 s
window; files decoded once beforehand), random weights of ``e2e_preset``, the sampled token count
of each file forced to the length of its reference transcript (``trans.txt``/``*.trans.txt``
lines ``<file stem> <TEXT>``, tokenised with the model's tokenizer). speechrt: log-mel on the
device, encoder and window decoding (language "en", no timestamps, greedy) batched
``e2e_batches`` files at a time through the engine, i.e. ``transcribe``'s path for one-window
files; openai-whisper: per file as its ``transcribe`` does (log-mel on the CPU, encoder,
``DecodingTask`` with the forced length appended to its logit filters); transformers: per file,
``generate`` with ``min_new_tokens = max_new_tokens`` = the count. RTFx = audio seconds / wall
seconds. With ``e2e_model`` (a real checkpoint) speechrt's ``transcribe`` runs unforced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from speechrt.audio.log_mel import N_FRAMES, N_SAMPLES, SAMPLE_RATE
from speechrt.benchmark.common import (
    PeakMemory,
    audio_files,
    cuda_time_ms,
    environment,
    free_cuda_cache,
    markdown_table,
    write_csv,
)
from speechrt.models.whisper.config import WhisperDims, preset

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROVIDERS = ("speechrt", "openai", "hf")


@dataclass
class WhisperBenchConfig:
    presets: tuple[str, ...] = ("tiny", "large-v3-turbo", "large-v3")
    enc_batches: tuple[int, ...] = (1, 16)
    batches: tuple[int, ...] = (1, 16, 64)
    steps: int = 64
    prefix: int = 3
    dtypes: tuple[str, ...] = ("fp16", "bf16")
    providers: tuple[str, ...] = PROVIDERS
    cuda_graphs: bool = True
    compile: bool = False  # torch.compile of each provider's encoder (slow)
    seed: int = 0
    e2e_dir: str | None = None
    e2e_model: str | None = None  # a real checkpoint (path or name) for the end-to-end RTFx
    e2e_preset: str | None = None  # random weights of these dims (default: the last model)
    e2e_batches: tuple[int, ...] = (1, 16)  # speechrt files per batch in the forced e2e
    e2e_only: bool = False  # skip the encoder/decode rows
    out: Path = field(default_factory=lambda: Path("bench_out"))
    device: str = "cuda"
    custom_dims: dict[str, WhisperDims] | None = None  # name -> dims instead of presets (tests)

    def models(self) -> dict[str, WhisperDims]:
        """Benchmark name -> dims (presets by exact name unless ``custom_dims`` is given)."""
        if self.custom_dims is not None:
            return dict(self.custom_dims)
        return {name: preset(name) for name in self.presets}


# ---------------------------------------------------------------------------------- models
def random_weights_(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Trained-like random weights, generated on the parameters' device: matrices
    N(0, 1/fan_in), norm weights 1 + N(0, 0.1), other vectors N(0, 0.05). Buffers untouched."""
    gen = None
    with torch.no_grad():
        for name, p in net.named_parameters():
            if gen is None:
                gen = torch.Generator(device=p.device).manual_seed(seed)
            if p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
            elif name.endswith("norm.weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.05, generator=gen)
    return net


def build_speechrt(dims: WhisperDims, dtype: torch.dtype, device: str, seed: int):
    """WhisperNet with random weights in ``dtype`` (LayerNorm FP32) on ``device``."""
    from speechrt.models.whisper.model import WhisperNet, cast_

    with torch.device(device):
        net = WhisperNet(dims)
    return cast_(random_weights_(net, seed), dtype).eval().requires_grad_(False)


def _keep_norms_fp32(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.float()


def build_openai(net, dtype: torch.dtype):
    """openai-whisper's ``Whisper`` holding ``net``'s weights (import is lazy)."""
    from whisper.model import ModelDimensions, Whisper

    from speechrt.models.whisper.convert import key_map

    ours = net.state_dict()
    state = {src: ours[dst] for src, dst in key_map(net.dims, "openai").items()}
    with torch.device(ours["decoder.tok_emb.weight"].device):
        model = Whisper(ModelDimensions(**net.dims.to_dict()))
    model.load_state_dict(state, strict=True)
    model.to(dtype)
    _keep_norms_fp32(model)
    return model.eval().requires_grad_(False)


def build_hf(net, dtype: torch.dtype):
    """transformers' ``WhisperForConditionalGeneration`` (SDPA) with ``net``'s weights."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from speechrt.models.whisper.convert import key_map

    d = net.dims
    cfg = WhisperConfig(
        vocab_size=d.n_vocab,
        num_mel_bins=d.n_mels,
        d_model=d.n_audio_state,
        encoder_layers=d.n_audio_layer,
        encoder_attention_heads=d.n_audio_head,
        decoder_layers=d.n_text_layer,
        decoder_attention_heads=d.n_text_head,
        encoder_ffn_dim=4 * d.n_audio_state,
        decoder_ffn_dim=4 * d.n_text_state,
        max_source_positions=d.n_audio_ctx,
        max_target_positions=d.n_text_ctx,
    )
    cfg._attn_implementation = "sdpa"
    ours = net.state_dict()
    state = {"model." + src: ours[dst] for src, dst in key_map(d, "hf").items()}
    state["proj_out.weight"] = ours["decoder.tok_emb.weight"]
    with torch.device(ours["decoder.tok_emb.weight"].device):
        model = WhisperForConditionalGeneration(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise RuntimeError(f"HF weights: missing {missing}, unexpected {unexpected}")
    return model.to(dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------- decode loops
def speechrt_decode(net, feats: Tensor, tokens: Tensor, prefix: int) -> Callable[[], Tensor]:
    """Eager loop on the torch path: set_audio, prefill ``prefix`` tokens, one step per
    remaining token. feats (B, S, D), tokens (B, prefix + steps) -> callable returning the
    last logits (B, V)."""
    b, n = tokens.shape
    net.setup_caches(b, n, b)
    positions = torch.empty(b, dtype=torch.long, device=tokens.device)

    def run() -> Tensor:
        net.kernels = False
        net.set_audio(feats)
        logits = net.prefill(tokens[:, :prefix])[:, -1]
        for j in range(prefix, n):
            positions.fill_(j)
            logits = net.step(tokens[:, j : j + 1], positions, kv_len=j + 1)
        return logits

    return run


def speechrt_graph_decode(net, feats: Tensor, tokens: Tensor, prefix: int):
    """As :func:`speechrt_decode`, with ``step`` (static kv_len = prefix + steps) replayed from
    one CUDA graph; the returned callable also returns the last logits (B, V)."""
    b, n = tokens.shape
    net.kernels = False
    net.setup_caches(b, n, b)
    tok_buf = tokens[:, prefix : prefix + 1].clone()  # (B, 1)
    pos_buf = torch.full((b,), prefix, dtype=torch.long, device=tokens.device)
    net.set_audio(feats)
    net.prefill(tokens[:, :prefix])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            net.step(tok_buf, pos_buf, kv_len=n)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = net.step(tok_buf, pos_buf, kv_len=n)

    def run() -> Tensor:
        net.kernels = False
        net.set_audio(feats)
        net.prefill(tokens[:, :prefix])
        for j in range(prefix, n):
            tok_buf.copy_(tokens[:, j : j + 1])
            pos_buf.fill_(j)
            graph.replay()
        return out

    return run, graph


def speechrt_engine_decode(model, feats: Tensor, tokens: Tensor, prefix: int):
    """The transcribe path's engine (``model.engine``: bucketed CUDA graphs, kernel path)
    stepping the forced tokens: the session's own token buffer holds them, the prefill reads
    its first ``prefix`` columns and each step its position. Returns the callable (one window:
    last logits (B, V)); ``run.extra()`` gives capture stats and ``run.steps_only()`` runs the
    steps alone on a window opened (set_audio, prefill) at its first call."""
    b, n = tokens.shape
    width = model.dims.n_text_ctx + 1

    def open_window() -> tuple:
        model.net.kernels = None
        session = model.engine.session(feats, 1)
        buffer, positions = session.token_buffers(b, width)
        buffer[:, :n].copy_(tokens)
        return session, positions, session.prefill(buffer[:, :prefix], (prefix - 1,))[:, 0]

    def steps(session, positions: Tensor, logits: Tensor) -> Tensor:
        for j in range(prefix, n):
            positions.fill_(j)
            logits = session.step(kv_len=j + 1)
        return logits

    def run() -> Tensor:
        return steps(*open_window())

    prepared: list = []

    def steps_only() -> Tensor:
        """Rewrites positions [prefix, n) with the same tokens: every call does the same."""
        if not prepared:
            prepared.extend(open_window())
        return steps(*prepared)

    run.extra = _engine_extra(model.engine)  # type: ignore[attr-defined]
    run.steps_only = steps_only  # type: ignore[attr-defined]
    return run


def speechrt_window_decode(model, feats: Tensor, tokens: Tensor, prefix: int):
    """``transcribe``'s window loop on the engine: greedy decoding (language "en", timestamp
    rules and suppression filters, stop checks) forced to ``steps`` sampled tokens per row.
    The callable returns None (its tokens are the model's, not the forced ones)."""
    from speechrt.decoding.whisper import WhisperDecodeOptions

    b, n = tokens.shape
    options = WhisperDecodeOptions(language="en", sample_len=n - prefix + 1)
    lengths = torch.full((b,), n - prefix, dtype=torch.long)

    def run() -> None:
        model.net.kernels = None
        model.decode_features(feats, options, forced_lengths=lengths)

    run.extra = _engine_extra(model.engine)  # type: ignore[attr-defined]
    return run


def _engine_extra(engine) -> Callable[[], dict]:
    """A callable giving the graph captures (count, seconds) made since this call."""
    before = engine.stats()

    def extra() -> dict:
        stats = engine.stats()
        out = {
            "captures": stats["captures"] - before["captures"],
            "capture_s": stats["capture_s"] - before["capture_s"],
        }
        if stats["capture_failure"]:
            out["note"] = stats["capture_failure"]
        return out

    return extra


def openai_decode(model, feats: Tensor, tokens: Tensor, prefix: int) -> Callable[[], Tensor]:
    """openai-whisper: ``model.decoder`` per token with its kv-cache hooks (cache rebuilt per
    call: cross K/V at the prefill, self K/V grown by concatenation)."""
    cache, hooks = model.install_kv_cache_hooks()
    n = tokens.shape[1]

    def run() -> Tensor:
        cache.clear()
        logits = model.decoder(tokens[:, :prefix], feats, kv_cache=cache)[:, -1]
        for j in range(prefix, n):
            logits = model.decoder(tokens[:, j : j + 1], feats, kv_cache=cache)[:, -1]
        return logits

    run.hooks = hooks  # type: ignore[attr-defined]
    return run


def hf_decode(model, feats: Tensor, tokens: Tensor, prefix: int) -> Callable[[], Tensor]:
    """transformers: ``model.model.decoder`` with an ``EncoderDecoderCache`` per call."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    dec, n = model.model.decoder, tokens.shape[1]

    def forward(ids: Tensor, cache) -> Tensor:
        h = dec(
            input_ids=ids, encoder_hidden_states=feats, past_key_values=cache, use_cache=True
        ).last_hidden_state
        return model.proj_out(h[:, -1]).float()  # (B, V)

    def run() -> Tensor:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        logits = forward(tokens[:, :prefix], cache)
        for j in range(prefix, n):
            logits = forward(tokens[:, j : j + 1], cache)
        return logits

    return run


def _kernel_path(net) -> Callable[[Tensor], Tensor]:
    """net.embed_audio on the default path (kernels on CUDA), replayed from a CUDA graph per
    input shape there, as :meth:`WhisperModel.embed_audio` runs it."""
    from speechrt.engine.graphs import GraphRunner

    def eager(mel: Tensor) -> Tensor:
        net.kernels = None
        return net.embed_audio(mel)

    graphs = GraphRunner(eager)

    def encode(mel: Tensor) -> Tensor:
        return graphs((tuple(mel.shape), mel.dtype), mel)

    return encode


def _torch_path(net) -> Callable[[Tensor], Tensor]:
    """net.embed_audio on the torch path (torch LayerNorm, unfused residual)."""

    def encode(mel: Tensor) -> Tensor:
        net.kernels = False
        return net.embed_audio(mel)

    return encode


# ---------------------------------------------------------------------------------- e2e
E2E_NOTE = (
    "Random weights; every file's sampled token count forced to its reference transcript's "
    "token count (`tokens`: total); first 30 s window of each file; audio decoded beforehand. "
    "speechrt: log-mel, encoder and window decoding (greedy, no timestamps) `B` files at a "
    "time (after a warm-up pass; `capture_s`: CUDA-graph captures); openai-whisper and "
    "transformers: one file at a time. RTFx = audio_s / seconds."
)


def e2e_inputs(folder: Path) -> tuple[list[Tensor], list[str]]:
    """Audio (16 kHz mono (N,) each, decoded once) and reference texts of the files of
    ``folder`` that a ``*trans.txt`` line (``<file stem> <TEXT>``) describes, sorted by name."""
    from speechrt.audio.io import load_audio

    texts: dict[str, str] = {}
    for trans in sorted(folder.glob("*trans.txt")):
        for line in trans.read_text().splitlines():
            stem, _, text = line.strip().partition(" ")
            if stem:
                texts[stem] = text
    files = [f for f in audio_files(folder) if f.stem in texts]
    if not files:
        raise FileNotFoundError(f"no audio files with a trans.txt line in {folder}")
    return [load_audio(f) for f in files], [texts[f.stem] for f in files]


def speechrt_forced(model, wavs: list[Tensor], counts: list[int], batch: int) -> None:
    """transcribe's path for one-window files, ``batch`` files at a time: log-mel on the model's
    device, encoder, window decoding (greedy, "en", no timestamps) of exactly ``counts`` tokens."""
    from speechrt.decoding.whisper import WhisperDecodeOptions

    options = WhisperDecodeOptions(language="en", without_timestamps=True)
    for i in range(0, len(wavs), batch):
        mels = [model.log_mel(w, padding=N_SAMPLES)[:, :N_FRAMES] for w in wavs[i : i + batch]]
        features = model.embed_audio(torch.stack(mels))  # (b, S, D)
        lengths = torch.tensor(counts[i : i + batch])
        model.decode_features(features, options, forced_lengths=lengths)


class _OpenAIForcedLength:
    """An openai-whisper logit filter: EOT forbidden before ``n`` sampled tokens, forced at n."""

    def __init__(self, n: int, sample_begin: int, eot: int) -> None:
        self.n, self.sample_begin, self.eot = n, sample_begin, eot

    def apply(self, logits: Tensor, tokens: Tensor) -> None:
        if tokens.shape[1] - self.sample_begin < self.n:
            logits[:, self.eot] = float("-inf")
        else:
            eot = logits[:, self.eot].clone()
            logits.fill_(float("-inf"))
            logits[:, self.eot] = eot


def openai_forced(oa, wavs: list[Tensor], counts: list[int], dtype: torch.dtype) -> None:
    """openai-whisper, one file at a time as its ``transcribe`` does for a one-window file:
    log-mel on the CPU, then ``DecodingTask`` (greedy, "en", no timestamps) with the forced
    length appended to its logit filters."""
    from whisper.audio import log_mel_spectrogram
    from whisper.decoding import DecodingOptions, DecodingTask

    device = next(oa.parameters()).device
    options = DecodingOptions(
        language="en", without_timestamps=True, fp16=dtype == torch.float16, temperature=0.0
    )
    for wav, n in zip(wavs, counts):
        mel = log_mel_spectrogram(wav, oa.dims.n_mels, padding=N_SAMPLES)[:, :N_FRAMES]
        task = DecodingTask(oa, options)
        task.logit_filters.append(_OpenAIForcedLength(n, task.sample_begin, task.tokenizer.eot))
        task.run(mel[None].to(device))


def hf_forced(hf, dims: WhisperDims, wavs: list[Tensor], counts: list[int], dtype) -> None:
    """transformers, one file at a time: its feature extractor, then the generic ``generate``
    (greedy, decoder prompt <|startoftranscript|><|en|><|transcribe|><|notimestamps|>) with
    ``min_new_tokens = counts[i]`` and ``max_new_tokens = counts[i] + 1``."""
    from transformers import GenerationMixin, WhisperFeatureExtractor

    from speechrt.models.whisper.tokenizer import get_tokenizer

    tok = get_tokenizer(dims.is_multilingual, dims.num_languages).with_options("en", "transcribe")
    device = next(hf.parameters()).device
    prompt = torch.tensor([[*tok.sot_sequence, tok.no_timestamps]], device=device)
    extractor = WhisperFeatureExtractor(feature_size=dims.n_mels)
    for wav, n in zip(wavs, counts):
        feats = extractor(wav.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt")
        GenerationMixin.generate(
            hf,
            input_features=feats.input_features.to(device, dtype),
            decoder_input_ids=prompt,
            min_new_tokens=n,
            max_new_tokens=n + 1,
            do_sample=False,
            num_beams=1,
        )


# ---------------------------------------------------------------------------------- memory
# ---------------------------------------------------------------------------------- bench
class WhisperBench:
    def __init__(self, cfg: WhisperBenchConfig) -> None:
        self.cfg = cfg
        self.dev = cfg.device
        self.rows: list[dict] = []
        self.notes: list[str] = []

    # -------------------------------------------------------------- one provider
    def _encoder_rows(self, name, dims, dt, provider, encode, mem) -> list[dict]:
        rows = []
        for b in self.cfg.enc_batches:
            gen = torch.Generator().manual_seed(self.cfg.seed + b)
            mel = torch.randn(b, dims.n_mels, 2 * dims.n_audio_ctx, generator=gen)
            mel = mel.to(self.dev, DTYPES[dt])
            mem.reset()
            with torch.inference_mode():
                ms = cuda_time_ms(lambda m=mel: encode(m), warmup=2, min_iters=5, budget_s=0.3)
            row = self._row("encoder", name, dt, provider, b, ms, mem.peak_mib())
            row["audio_s_per_s"] = b * 30.0 / (ms / 1000.0)
            rows.append(row)
        return rows

    def _decode_rows(self, name, dims, dt, provider, make, mem, ref) -> list[dict]:
        rows = []
        for b in self.cfg.batches:
            feats, tokens = self._decode_inputs(dims, dt, b)
            mem.reset()
            try:
                last, ms, extra = self._time_decode(make, feats, tokens)
            except Exception as e:  # noqa: BLE001 - report and go on (e.g. capture fails)
                self.notes.append(f"{name} {dt} {provider} B={b}: {type(e).__name__}: {e}")
                continue
            row = self._row("decode", name, dt, provider, b, ms / self.cfg.steps, mem.peak_mib())
            row["ms_per_token"] = row.pop("latency_ms")
            row["tokens_per_s"] = b * 1000.0 / row["ms_per_token"]
            steps_ms = extra.pop("steps_ms", None)
            if steps_ms is not None:
                row["step_ms"] = steps_ms / self.cfg.steps
                row["fixed_ms"] = ms - steps_ms
            note = extra.pop("note", None)
            if note:
                self.notes.append(f"{name} {dt} {provider} B={b}: {note}")
            row.update(extra)
            key = (name, dt, b)
            if provider == "speechrt":
                ref[key] = last
            elif key in ref and last is not None:
                row["logit_diff"] = float((last - ref[key]).abs().max())
            rows.append(row)
        return rows

    @staticmethod
    def _time_decode(make, feats: Tensor, tokens: Tensor) -> tuple[Tensor | None, float, dict]:
        """(last logits (B, V) FP32 or None, ms of one decode window, extra row fields such
        as the engine's capture time) of the loop ``make`` builds (its first call captures);
        ``steps_ms``: ms of the steps alone, where the loop offers ``steps_only``."""
        graph = None
        with torch.inference_mode():
            run = make(feats, tokens)
            if isinstance(run, tuple):  # (callable, CUDA graph)
                run, graph = run
            try:
                last = run()
                last = None if last is None else last.float().clone()
                extra = getattr(run, "extra", dict)()
                ms = cuda_time_ms(run, warmup=1, min_iters=3, budget_s=0.5, max_iters=20)
                if hasattr(run, "steps_only"):
                    extra["steps_ms"] = cuda_time_ms(
                        run.steps_only, warmup=1, min_iters=3, budget_s=0.5, max_iters=20
                    )
            finally:
                for h in getattr(run, "hooks", ()):  # openai-whisper's kv-cache hooks
                    h.remove()
                del graph
        return last, ms, extra

    def _decode_inputs(self, dims: WhisperDims, dt: str, b: int) -> tuple[Tensor, Tensor]:
        """Random features (B, S, D) in ``dt`` and forced tokens (B, prefix + steps)."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + b)
        feats = torch.randn(b, dims.n_audio_ctx, dims.n_audio_state, generator=gen)
        n = self.cfg.prefix + self.cfg.steps
        if n > dims.n_text_ctx:
            raise ValueError(f"prefix + steps = {n} exceeds n_text_ctx {dims.n_text_ctx}")
        tokens = torch.randint(0, 50257, (b, n), generator=gen)
        return feats.to(self.dev, DTYPES[dt]), tokens.to(self.dev)

    def _row(self, part, name, dt, provider, b, ms, peak) -> dict:
        return {
            "part": part,
            "model": name,
            "dtype": dt,
            "provider": provider,
            "B": b,
            "latency_ms": ms,
            "peak_mem_MiB": peak,
        }

    # -------------------------------------------------------------- providers
    def _run_provider(self, provider, name, dims, dt, net, ref) -> list[dict]:
        mem = self._speechrt_mem if provider == "speechrt" else PeakMemory(self.dev)
        encode, makers = self._setup(provider, net, DTYPES[dt])
        rows = self._encoder_rows(name, dims, dt, provider, encode, mem)
        if provider == "speechrt" and torch.device(self.dev).type == "cuda":
            rows += self._encoder_rows(name, dims, dt, "speechrt_torch", _torch_path(net), mem)
        if self.cfg.compile:
            rows += self._compile_rows(name, dims, dt, provider, encode, mem)
        for label, make in makers.items():
            rows += self._decode_rows(name, dims, dt, label, make, mem, ref)
        return rows

    def _setup(self, provider: str, net, dtype: torch.dtype) -> tuple[Callable, dict]:
        """(encoder callable: mel (B, n_mels, 3000) -> (B, S, D), {label: decode-loop maker})."""
        prefix = self.cfg.prefix
        with torch.inference_mode():
            if provider == "speechrt":
                from speechrt.models.whisper.runtime import WhisperModel

                model = WhisperModel(net, cuda_graphs=self.cfg.cuda_graphs)
                makers = {"speechrt": lambda f, t: speechrt_decode(net, f, t, prefix)}
                if self.cfg.cuda_graphs and torch.device(self.dev).type == "cuda":
                    makers["speechrt_graph"] = lambda f, t: speechrt_graph_decode(net, f, t, prefix)
                makers["speechrt_engine"] = lambda f, t: speechrt_engine_decode(model, f, t, prefix)
                makers["speechrt_window"] = lambda f, t: speechrt_window_decode(model, f, t, prefix)
                return _kernel_path(net), makers
            if provider == "openai":
                oa = build_openai(net, dtype)
                return oa.encoder, {"openai": lambda f, t: openai_decode(oa, f, t, prefix)}
            hf = build_hf(net, dtype)

            def hf_encode(mel: Tensor) -> Tensor:
                return hf.model.encoder(input_features=mel).last_hidden_state

            return hf_encode, {"hf": lambda f, t: hf_decode(hf, f, t, prefix)}

    def _compile_rows(self, name, dims, dt, provider, encode, mem) -> list[dict]:
        compiled = torch.compile(encode, dynamic=False)
        mel = torch.randn(1, dims.n_mels, 2 * dims.n_audio_ctx, device=self.dev)
        with torch.inference_mode():
            t0 = time.perf_counter()
            compiled(mel.to(DTYPES[dt]))
            compile_s = time.perf_counter() - t0
        rows = self._encoder_rows(name, dims, dt, provider + "+compile", compiled, mem)
        for r in rows:
            r["compile_s"] = compile_s
        return rows

    def _available(self, provider: str) -> bool:
        import importlib.util

        module = {"speechrt": "speechrt", "openai": "whisper", "hf": "transformers"}[provider]
        if importlib.util.find_spec(module) is None:
            note = f"{provider}: skipped ({module} is not installed)"
            if note not in self.notes:
                self.notes.append(note)
            return False
        return True

    # -------------------------------------------------------------- run
    def run_model(self, name: str, dims: WhisperDims) -> None:
        """Every dtype x provider of one model; appends rows."""
        for dt in self.cfg.dtypes:
            ref: dict = {}
            self._speechrt_mem = PeakMemory(self.dev)
            net = build_speechrt(dims, DTYPES[dt], self.dev, self.cfg.seed)
            for provider in self.cfg.providers:
                if not self._available(provider):
                    continue
                try:
                    self.rows += self._run_provider(provider, name, dims, dt, net, ref)
                except Exception as e:  # noqa: BLE001 - one provider failing must not stop all
                    self.notes.append(f"{name} {dt} {provider}: {type(e).__name__}: {e}")
                free_cuda_cache(self.dev)
                print(f"done {name} {dt} {provider}", flush=True)
            del net
            free_cuda_cache(self.dev)

    def e2e_rows(self) -> list[dict]:
        """RTFx of speechrt's ``transcribe`` (greedy, temperature 0) over a folder of audio."""
        from speechrt.audio.io import load_audio
        from speechrt.models.whisper.runtime import load_whisper

        wavs = [load_audio(f) for f in audio_files(self.cfg.e2e_dir)]  # (N,) 16 kHz each
        audio_s = sum(w.shape[-1] for w in wavs) / 16000.0
        model = load_whisper(self.cfg.e2e_model, device=self.dev)
        model.transcribe(wavs[0], temperature=0.0, language="en")  # warm-up
        if torch.device(self.dev).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for w in wavs:
            model.transcribe(w, temperature=0.0, language="en")
        if torch.device(self.dev).type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        return [
            {
                "part": "e2e",
                "model": self.cfg.e2e_model,
                "provider": "speechrt",
                "files": len(wavs),
                "audio_s": audio_s,
                "seconds": sec,
                "RTFx": audio_s / sec,
            }
        ]

    # -------------------------------------------------------------- e2e, forced lengths
    def forced_e2e_rows(self) -> list[dict]:
        """RTFx of every provider over ``e2e_dir`` with random weights and forced token counts
        (see the module docstring); one row per provider (speechrt: per ``e2e_batches``)."""
        from speechrt.models.whisper.runtime import WhisperModel

        cfg = self.cfg
        models = cfg.models()
        name = cfg.e2e_preset or list(models)[-1]
        dims = models[name] if name in models else preset(name)
        dt = cfg.dtypes[0]
        wavs, texts = e2e_inputs(Path(cfg.e2e_dir))
        net = build_speechrt(dims, DTYPES[dt], self.dev, cfg.seed)
        model = WhisperModel(net, cuda_graphs=cfg.cuda_graphs)
        max_count = dims.n_text_ctx // 2 - 1
        counts = [
            max(1, min(len(model.tokenizer.encode(" " + t.lower())), max_count)) for t in texts
        ]
        audio_s = sum(min(w.shape[-1], N_SAMPLES) for w in wavs) / SAMPLE_RATE
        base = {"part": "e2e", "model": name, "dtype": dt, "files": len(wavs)}
        base.update(audio_s=audio_s, tokens=sum(counts))
        rows: list[dict] = []
        for b in cfg.e2e_batches:
            rows.append(self._e2e_speechrt(base, model, wavs, counts, b))
            write_csv(cfg.out / "whisper_partial.csv", self.rows + rows)  # survives a time-out
        for provider in ("openai", "hf"):
            if provider in cfg.providers and self._available(provider):
                rows += self._e2e_reference(provider, base, net, dims, wavs, counts)
                write_csv(cfg.out / "whisper_partial.csv", self.rows + rows)
        ref = next((r["RTFx"] for r in rows if r["provider"] == "openai"), None)
        for r in rows:
            if ref:
                r["vs_openai"] = r["RTFx"] / ref
        return rows

    def _e2e_speechrt(self, base, model, wavs, counts, batch: int) -> dict:
        """speechrt over all files, ``batch`` at a time (warm-up pass first: graph captures)."""

        def run() -> None:
            speechrt_forced(model, wavs, counts, batch)

        row = self._e2e_row(base, "speechrt", batch, run, run)
        row["capture_s"] = model.engine.stats()["capture_s"]
        return row

    def _e2e_reference(self, provider, base, net, dims, wavs, counts) -> list[dict]:
        """openai-whisper or transformers over the same files, one file at a time."""
        dtype = DTYPES[base["dtype"]]
        try:
            if provider == "openai":
                oa = build_openai(net, dtype)

                def run(n: int = len(wavs)) -> None:
                    openai_forced(oa, wavs[:n], counts[:n], dtype)

            else:
                hf = build_hf(net, dtype)

                def run(n: int = len(wavs)) -> None:
                    hf_forced(hf, dims, wavs[:n], counts[:n], dtype)

            return [self._e2e_row(base, provider, 1, run, lambda: run(1))]
        except Exception as e:  # noqa: BLE001 - one provider failing must not stop all
            self.notes.append(f"e2e {provider}: {type(e).__name__}: {e}")
            return []
        finally:
            free_cuda_cache(self.dev)

    def _e2e_row(self, base: dict, provider: str, batch: int, run, warmup) -> dict:
        """Time ``run`` (all files) once after ``warmup``; a row with seconds and RTFx."""
        cuda = torch.device(self.dev).type == "cuda"
        with torch.inference_mode():
            warmup()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        print(f"done e2e {provider} B={batch}", flush=True)
        return {
            **base,
            "provider": provider,
            "B": batch,
            "seconds": sec,
            "RTFx": base["audio_s"] / sec,
        }

    def run(self) -> dict:
        cfg = self.cfg
        cfg.out.mkdir(parents=True, exist_ok=True)
        for name, dims in cfg.models().items() if not cfg.e2e_only else ():
            self.run_model(name, dims)
            write_csv(cfg.out / "whisper_partial.csv", self.rows)  # survives a time-out
        e2e = []
        if cfg.e2e_dir:
            e2e = self.e2e_rows() if cfg.e2e_model else self.forced_e2e_rows()
        return self.report(e2e)

    def report(self, e2e: list[dict]) -> dict:
        cfg, env = self.cfg, environment()
        write_csv(cfg.out / "whisper.csv", self.rows + e2e)
        enc = [r for r in self.rows if r["part"] == "encoder"]
        dec = [r for r in self.rows if r["part"] == "decode"]
        base = ["model", "dtype", "provider", "B"]
        md = [f"# speechrt Whisper benchmark\n\n`{json.dumps(env)}`\n"]
        if self.rows:
            md += [
                f"Random weights, real dims; decode: {cfg.prefix}-token prefill + {cfg.steps} "
                "forced steps per window, ms_per_token = total / steps (cross K/V included). "
                "speechrt_engine: step_ms = the steps alone (one window prepared beforehand, "
                "set_audio and prefill not timed) / steps, the steady-state step; fixed_ms = "
                "total - steps x step_ms (set_audio + prefill per window).\n",
                "## Encoder (30 s windows)\n",
                markdown_table(
                    enc, [*base, "latency_ms", "audio_s_per_s", "peak_mem_MiB", "compile_s"]
                ),
                "\n## Decode\n",
                markdown_table(
                    dec,
                    [*base, "ms_per_token", "step_ms", "fixed_ms", "tokens_per_s"]
                    + ["peak_mem_MiB", "logit_diff", "capture_s"],
                ),
            ]
        if e2e:
            columns = list(dict.fromkeys(k for r in e2e for k in r if k != "part"))
            md += ["\n## End to end\n", E2E_NOTE if "tokens" in e2e[0] else "", ""]
            md += [markdown_table(e2e, columns)]
        if self.notes:
            md += ["\n## Notes\n", "\n".join(f"- {n}" for n in self.notes)]
        (cfg.out / "whisper.md").write_text("\n".join(md) + "\n")
        return {"env": env, "rows": self.rows, "e2e": e2e, "notes": self.notes}
