"""Train speechrt's U2++ Conformer (CTC + bidirectional attention decoder) on the synthetic corpus.

Usage (from the repository root)::

    python -m recipes.synthetic_en.train --data data/synthetic_en --exp exp/synthetic_en \\
        [--preset default] [--steps 6000] [--time-budget-min 9] [--device cuda]

What it does, U2++ style (WeNet's recipe, our own code):

* the model is :class:`speechrt.models.conformer.model.ConformerASR`, built from the WeNet
  ``train.yaml`` this recipe writes (causal conv, ``use_dynamic_chunk``, ``bitransformer``); global
  CMVN from the training features; dropout added by forward hooks (the modules have none);
* loss = ``ctc_weight * CTC + (1 - ctc_weight) * ((1 - r) * L2R + r * R2L)`` with label-smoothed
  attention losses (KL to the smoothed targets, summed, divided by the batch size, as WeNet);
* dynamic chunk training: each batch uses full attention with probability 1/2, else a chunk of
  1..25 encoder frames (the encoder's ``decoding_chunk_size`` argument builds the chunk mask);
* SpecAugment (time and frequency masks, filled with the CMVN mean, i.e. 0 after CMVN);
* AdamW, linear warm-up then cosine decay; bf16 autocast on CUDA; gradient clipping;
* batches of similar lengths up to ``max_frames_in_batch`` padded frames, features resident on the
  device (float16) so no loader is needed;
* progress = max(step / steps, elapsed / time budget): the schedule and the end of training follow
  whichever comes first, and the last ``--average`` snapshots are taken evenly over the final
  ``--average-span`` of progress (for checkpoint averaging by ``export.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from speechrt.audio.cmvn import load_global_cmvn
from speechrt.decoding.ctc import ctc_greedy_search
from speechrt.decoding.rescoring import decoder_inputs
from speechrt.layers.attention import MultiHeadAttention
from speechrt.layers.conv_module import ConvModule
from speechrt.layers.ffn import FeedForward
from speechrt.layers.subsampling import Subsampling
from speechrt.metrics import cer
from speechrt.models.conformer.decoder import TransformerDecoder
from speechrt.models.conformer.model import ConformerASR
from speechrt.models.conformer.tokenizer import SymbolTable

from .wenet_dir import (
    PRESETS,
    UNITS,
    TrainingConf,
    build_model,
    build_train_yaml,
    tokenize,
    unit_ids,
    write_units,
)

MAX_CHUNK = 25


# ------------------------------------------------------------------ data
@dataclass
class Batch:
    """A padded batch on the device (lengths also on the host, for CTC without a sync)."""

    feats: torch.Tensor  # (B, T, 80) float32, zero padded
    lengths: torch.Tensor  # (B,)
    tokens: torch.Tensor  # (B, L) int64, -1 padded
    token_lengths: torch.Tensor  # (B,)
    lengths_cpu: torch.Tensor  # (B,)
    token_lengths_cpu: torch.Tensor  # (B,)


@dataclass
class SplitData:
    """One split resident on the device: fbank rows of all utterances and padded token ids."""

    keys: list[str]
    texts: list[str]
    feats: torch.Tensor  # (total frames, 80) float16
    offsets: torch.Tensor  # (N,) first row of each utterance
    lengths: torch.Tensor  # (N,) frames
    lengths_cpu: np.ndarray  # (N,)
    tokens: torch.Tensor  # (N, Lmax) int64, -1 padding
    token_lengths: torch.Tensor  # (N,)
    token_lengths_cpu: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, idx: np.ndarray) -> Batch:
        """Utterances ``idx`` as a padded batch, gathered on the device without a host sync."""
        dev = self.feats.device
        t_max = int(self.lengths_cpu[idx].max())
        i = torch.from_numpy(idx)
        i = (i.pin_memory() if dev.type == "cuda" else i).to(dev, non_blocking=True)
        lengths = self.lengths[i]
        pos = torch.arange(t_max, device=dev)
        rows = (self.offsets[i, None] + pos[None, :]).clamp(max=self.feats.shape[0] - 1)  # (B, T)
        valid = pos[None, :] < lengths[:, None]  # (B, T)
        return Batch(
            feats=self.feats[rows].float() * valid[..., None],  # (B, T, 80)
            lengths=lengths,
            tokens=self.tokens[i, : int(self.token_lengths_cpu[idx].max())],
            token_lengths=self.token_lengths[i],
            lengths_cpu=torch.from_numpy(self.lengths_cpu[idx]),
            token_lengths_cpu=torch.from_numpy(self.token_lengths_cpu[idx]),
        )


def read_kv(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split(maxsplit=1)
        if parts:
            out[parts[0]] = parts[1] if len(parts) > 1 else ""
    return out


def load_split(split_dir: Path, device: torch.device, max_utts: int | None = None,
               max_frames: int = 1500) -> SplitData:
    """Read ``feats.idx`` + shards + ``text`` of a split (utterances over max_frames dropped)."""
    texts = read_kv(split_dir / "text")
    index = [line.split() for line in (split_dir / "feats.idx").read_text().splitlines()]
    index = [r for r in index if 10 <= int(r[3]) <= max_frames][: max_utts or None]
    shards: dict[str, np.ndarray] = {}
    pieces, keys = [], []
    for key, shard, offset, frames in index:
        if shard not in shards:
            shards[shard] = np.load(split_dir / "shards" / f"{shard}.npy", mmap_mode="r")
        pieces.append(shards[shard][int(offset) : int(offset) + int(frames)])
        keys.append(key)
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ids = unit_ids()
    toks = [tokenize(texts[k], ids) for k in keys]
    tok_lens = np.array([len(t) for t in toks], dtype=np.int64)
    tokens = np.full((len(toks), max(tok_lens)), -1, dtype=np.int64)
    for r, t in enumerate(toks):
        tokens[r, : len(t)] = t
    return SplitData(
        keys=keys,
        texts=[texts[k] for k in keys],
        feats=torch.from_numpy(np.concatenate(pieces)).to(device),
        offsets=torch.from_numpy(offsets).to(device),
        lengths=torch.from_numpy(lengths).to(device),
        lengths_cpu=lengths,
        tokens=torch.from_numpy(tokens).to(device),
        token_lengths=torch.from_numpy(tok_lens).to(device),
        token_lengths_cpu=tok_lens,
    )


def make_batches(lengths: np.ndarray, max_frames: int, rng: np.random.Generator,
                 max_batch: int = 512) -> list[np.ndarray]:
    """One epoch of batches: near-sorted by length (10 % jitter), B * T_max <= max_frames,
    in random order."""
    jitter = lengths * rng.uniform(0.9, 1.1, size=len(lengths))
    order = np.argsort(jitter, kind="stable")
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        longest = lengths[order[start]]
        while end < len(order) and end - start < max_batch:
            longest = max(longest, lengths[order[end]])
            if longest * (end - start + 1) > max_frames:
                break
            end += 1
        batches.append(order[start:end])
        start = end
    rng.shuffle(batches)
    return batches


def spec_augment(feats: torch.Tensor, lengths: torch.Tensor, fill: torch.Tensor,
                 conf: TrainingConf, gen: torch.Generator) -> torch.Tensor:
    """Time and frequency masks on raw fbank (B, T, F); masked values become ``fill`` (F,).

    A time mask spans at most ``max_t`` frames and 10 % of the utterance; a frequency mask at
    most ``max_f`` bins."""
    b, t, f = feats.shape
    dev = feats.device
    mask = torch.zeros(b, t, f, dtype=torch.bool, device=dev)
    pos_t = torch.arange(t, device=dev)[None, :]
    pos_f = torch.arange(f, device=dev)[None, :]
    for _ in range(conf.num_t_mask):
        limit = torch.minimum(lengths // 10, torch.full_like(lengths, conf.max_t))
        width = (torch.rand(b, device=dev, generator=gen) * (limit + 1)).long()
        start = (torch.rand(b, device=dev, generator=gen) * (lengths - width + 1)).long()
        mask |= ((pos_t >= start[:, None]) & (pos_t < (start + width)[:, None]))[:, :, None]
    for _ in range(conf.num_f_mask):
        width = (torch.rand(b, device=dev, generator=gen) * (conf.max_f + 1)).long()
        start = (torch.rand(b, device=dev, generator=gen) * (f - width + 1)).long()
        mask |= ((pos_f >= start[:, None]) & (pos_f < (start + width)[:, None]))[:, None, :]
    return torch.where(mask, fill.to(feats.dtype), feats)


# ------------------------------------------------------------------ model pieces
def add_dropout(net: nn.Module, p: float) -> list:
    """Dropout by forward hooks, where WeNet has it: after the input layer and the decoder
    embedding, on the FFN hidden layer, and on each sublayer's output before the residual add
    (attention output projection, FFN, conv module). Not on attention weights."""
    if p <= 0:
        return []

    def hook(module, inputs, output):
        return F.dropout(output, p, module.training)

    targets = []
    for m in net.modules():
        if isinstance(m, FeedForward):
            targets += [m.act, m.w2]
        elif isinstance(m, MultiHeadAttention):
            targets.append(m.out)
        elif isinstance(m, ConvModule):
            targets.append(m.pw2)
        elif isinstance(m, Subsampling):
            targets.append(m)
        elif isinstance(m, TransformerDecoder):
            targets.append(m.embed)
    return [t.register_forward_hook(hook) for t in targets]


def label_smoothing_loss(log_probs: torch.Tensor, targets: torch.Tensor, smoothing: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """WeNet's LabelSmoothingLoss (KL to the smoothed one-hot), summed over valid positions.

    log_probs (B, L, V) float32, targets (B, L) with -1 ignored. Returns (loss sum, correct count).
    """
    v = log_probs.shape[-1]
    valid = targets >= 0
    tgt = targets.clamp(min=0)
    low = smoothing / (v - 1)
    conf = 1.0 - smoothing
    # KL(q || p) = sum_v q_v log q_v - sum_v q_v log p_v, q = low everywhere but conf at target.
    entropy = conf * math.log(conf) + (v - 1) * low * math.log(low) if smoothing > 0 else 0.0
    target_lp = log_probs.gather(-1, tgt[..., None]).squeeze(-1)  # (B, L)
    cross = -(low * log_probs.sum(-1) + (conf - low) * target_lp)  # (B, L)
    loss = torch.where(valid, cross + entropy, 0.0).sum()
    correct = ((log_probs.argmax(-1) == tgt) & valid).sum()
    return loss, correct


def decoder_targets(tokens: torch.Tensor, lengths: torch.Tensor, eos: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) tokens (-1 padded) -> L2R and R2L targets (B, L+1): [y..., eos, -1...]."""
    b, l = tokens.shape
    pos = torch.arange(l + 1, device=tokens.device)[None, :]
    n = lengths[:, None]
    padded = torch.cat([tokens.clamp(min=0), tokens.new_zeros(b, 1)], dim=1)  # (B, L+1)
    rev_idx = (n - 1 - pos).clamp(min=0)
    rev = torch.gather(padded, 1, rev_idx)
    fill = torch.where(pos == n, eos, -1)
    l2r = torch.where(pos < n, padded, fill)
    r2l = torch.where(pos < n, rev, fill)
    return l2r, r2l


def chunk_size(rng: np.random.Generator) -> int:
    """U2++ dynamic chunk: full attention (-1) half the time, else a chunk of 1..25 frames."""
    return -1 if rng.random() < 0.5 else int(rng.integers(1, MAX_CHUNK + 1))


def compute_loss(net: ConformerASR, batch: Batch, chunk: int, conf: TrainingConf
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """U2++ loss of one batch: ({loss, ctc, att, acc} 0-dim float32, encoder out, its lengths)."""
    cfg = net.cfg
    b = batch.feats.shape[0]
    enc, enc_lens = net.encoder(batch.feats, batch.lengths, decoding_chunk_size=chunk)
    ctc_lp = net.ctc_log_probs(enc)  # (B, T', V) float32
    enc_lens_cpu = net.encoder.subsampling.output_lengths(batch.lengths_cpu)
    ctc = F.ctc_loss(ctc_lp.transpose(0, 1), batch.tokens.clamp(min=0), enc_lens_cpu,
                     batch.token_lengths_cpu, blank=cfg.blank, reduction="sum",
                     zero_infinity=True) / b
    tokens, tok_lens = batch.tokens, batch.token_lengths
    l2r_in, r2l_in, in_lens = decoder_inputs(tokens[:, None], tok_lens[:, None], cfg.sos, cfg.eos)
    l2r_t, r2l_t = decoder_targets(tokens, tok_lens, cfg.eos)  # (B, L+1) each
    dec = net.decoder
    l2r_lp = dec.l2r(l2r_in, in_lens, dec.l2r.project_memory(enc), enc_lens)[:, 0]
    l2r, correct = label_smoothing_loss(l2r_lp, l2r_t, conf.lsm_weight)
    att = l2r / b
    if dec.r2l is not None and conf.reverse_weight > 0:
        r2l_lp = dec.r2l(r2l_in, in_lens, dec.r2l.project_memory(enc), enc_lens)[:, 0]
        r2l, _ = label_smoothing_loss(r2l_lp, r2l_t, conf.lsm_weight)
        att = (1 - conf.reverse_weight) * att + conf.reverse_weight * r2l / b
    loss = conf.ctc_weight * ctc + (1 - conf.ctc_weight) * att
    acc = correct.float() / (tok_lens.sum() + b).float()
    return {"loss": loss, "ctc": ctc, "att": att, "acc": acc}, enc, enc_lens


def autocast(device: torch.device, amp: torch.dtype | None):
    """bf16 autocast on the device, or nothing."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp)


def lr_at(progress: float, conf: TrainingConf, warmup_frac: float) -> float:
    """Linear warm-up over ``warmup_frac`` of training, then cosine decay to 2 % of the peak."""
    if progress < warmup_frac:
        return conf.lr * max(progress / warmup_frac, 1e-3)
    x = min((progress - warmup_frac) / max(1 - warmup_frac, 1e-9), 1.0)
    return conf.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * x)))


@torch.no_grad()
def evaluate(net: ConformerASR, data: SplitData, conf: TrainingConf, max_frames: int,
             amp: torch.dtype | None) -> dict[str, float]:
    """Dev loss (full attention) and CTC greedy CER."""
    net.eval()
    symbols = SymbolTable(dict(enumerate(UNITS)))
    totals = {"loss": 0.0, "ctc": 0.0, "att": 0.0}
    hyps, refs, n = [], [], 0
    for idx in make_batches(data.lengths_cpu, max_frames, np.random.default_rng(0)):
        batch = data.batch(idx)
        with autocast(batch.feats.device, amp):
            out, enc, enc_lens = compute_loss(net, batch, -1, conf)
            res = ctc_greedy_search(net.ctc_log_probs(enc), enc_lens, net.cfg.blank)
        for k in totals:
            totals[k] += float(out[k]) * len(idx)
        toks, lens = res.tokens.cpu(), res.token_lengths.cpu()
        hyps += [symbols.detokenize(toks[i, : lens[i]].tolist()) for i in range(len(idx))]
        refs += [data.texts[i] for i in idx]
        n += len(idx)
    net.train()
    return {**{k: v / n for k, v in totals.items()}, "cer": cer(refs, hyps)}


# ------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--exp", required=True, type=Path)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=6000, help="maximum optimizer steps")
    p.add_argument("--time-budget-min", type=float, default=0.0,
                   help="stop (with the schedule completed) after this many minutes; 0: none")
    p.add_argument("--device", default="auto")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-frac", type=float, default=0.08)
    p.add_argument("--max-frames", type=int, default=None, help="padded frames per batch")
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--max-train-utts", type=int, default=None)
    p.add_argument("--average", type=int, default=5, help="snapshots kept for averaging")
    p.add_argument("--average-span", type=float, default=0.2,
                   help="fraction of training (at its end) over which snapshots are taken")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pause-after-min", type=float, default=0.0,
                   help="save exp/resume.pt and exit after this many training minutes (for "
                        "machines with a per-command time limit); 0: never")
    p.add_argument("--pause-after-steps", type=int, default=0,
                   help="as --pause-after-min, after this many steps of this run; 0: never")
    p.add_argument("--resume", action="store_true",
                   help="continue from exp/resume.pt (same data, settings and budget)")
    return p.parse_args(argv)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup(args) -> tuple:
    device = _device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    conf = TrainingConf(amp_dtype="bf16" if amp else "fp32")
    overrides = {k: v for k, v in (("lr", args.lr), ("max_frames_in_batch", args.max_frames),
                                   ("dropout", args.dropout)) if v is not None}
    conf = replace(conf, **overrides)
    raw = build_train_yaml(PRESETS[args.preset], conf)
    cfg, net = build_model(raw)
    mean, istd = load_global_cmvn(args.data / "train" / "global_cmvn")
    net.encoder.cmvn_mean.copy_(mean)
    net.encoder.cmvn_istd.copy_(istd)
    return device, amp, conf, raw, net.to(device)


def _optimizer(net: nn.Module, conf: TrainingConf, fused: bool | None = None
               ) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only; fused (one kernel per step) on CUDA by default."""
    if fused is None:
        fused = next(net.parameters()).is_cuda
    decay = [p for p in net.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in net.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": conf.weight_decay},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=conf.lr, betas=(0.9, 0.98), eps=1e-8, fused=fused)


def _snapshot_points(n: int, span: float) -> list[float]:
    return [1.0 - span * i / max(n - 1, 1) for i in reversed(range(n))] if n > 1 else [1.0]


def train_step(net: ConformerASR, opt: torch.optim.Optimizer, batch: Batch, lr: float,
               conf: TrainingConf, fill: torch.Tensor, gen: torch.Generator, chunk: int,
               amp: torch.dtype | None) -> dict[str, torch.Tensor]:
    """SpecAugment, forward, backward, clip, AdamW step (no host sync); returns the losses."""
    batch.feats = spec_augment(batch.feats, batch.lengths, fill, conf, gen)
    for g in opt.param_groups:
        g["lr"] = lr
    with autocast(batch.feats.device, amp):
        out, _, _ = compute_loss(net, batch, chunk, conf)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    nn.utils.clip_grad_norm_(net.parameters(), conf.grad_clip)
    opt.step()
    return out


def _save_resume(exp: Path, net: nn.Module, opt: torch.optim.Optimizer,
                 rng: np.random.Generator, gen: torch.Generator, **state) -> None:
    """Everything needed to continue this run bit-for-bit: weights, optimizer, RNGs, batches."""
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": cuda_rng, **state}, exp / "resume.pt")


def _load_resume(exp: Path, device: torch.device) -> dict | None:
    path = exp / "resume.pt"
    if not path.exists():
        sys.exit(f"train: --resume given but {path} does not exist")
    return torch.load(path, map_location=device, weights_only=False)


def _prepare_exp(exp: Path, raw: dict, data: Path) -> None:
    (exp / "snapshots").mkdir(parents=True, exist_ok=True)
    for old in (exp / "snapshots").glob("*.pt"):
        old.unlink()
    (exp / "train.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    write_units(exp / "units.txt")
    shutil.copyfile(data / "train" / "global_cmvn", exp / "global_cmvn")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device, amp, conf, raw, net = setup(args)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    exp: Path = args.exp
    resume = _load_resume(exp, device) if args.resume else None
    if resume is None:
        _prepare_exp(exp, raw, args.data)
    t0 = time.perf_counter()
    train = load_split(args.data / "train", device, args.max_train_utts)
    dev = load_split(args.data / "dev", device)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"train: {len(train)} utts ({int(train.lengths_cpu.sum()) / 360000:.2f} h), "
          f"dev {len(dev)}; {n_params / 1e6:.2f} M parameters on {device}; "
          f"data load {time.perf_counter() - t0:.1f} s", flush=True)
    add_dropout(net, conf.dropout)
    net.train()
    opt = _optimizer(net, conf)
    fill = net.encoder.cmvn_mean.detach().float()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    budget = args.time_budget_min * 60.0
    snaps = _snapshot_points(args.average, args.average_span)
    batches: list[np.ndarray] = []
    step, progress, frames_seen, done_s = 0, 0.0, 0, 0.0
    if resume is not None:
        net.load_state_dict(resume["net"])
        opt.load_state_dict(resume["opt"])
        rng.bit_generator.state = resume["rng"]
        gen.set_state(resume["gen"].cpu())
        torch.set_rng_state(resume["torch_rng"].cpu())  # dropout draws from the global RNGs
        if resume["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all([t.cpu() for t in resume["cuda_rng"]])
        step, progress, frames_seen, done_s = (resume[k] for k in ("step", "progress",
                                                                   "frames_seen", "train_s"))
        snaps, batches = resume["snaps"], resume["batches"]
        print(f"resumed at step {step} after {done_s:.1f} s of training", flush=True)
    log = (exp / "train_log.jsonl").open("a" if resume is not None else "w")
    t_start = time.perf_counter() - done_s  # elapsed time counts the paused runs too
    t_session, session_step = time.perf_counter(), step
    last_log = {"time": time.perf_counter(), "frames": frames_seen}
    while progress < 1.0:
        session_s = time.perf_counter() - t_session
        if (args.pause_after_min and session_s > args.pause_after_min * 60) or (
                args.pause_after_steps and step - session_step >= args.pause_after_steps):
            _save_resume(exp, net, opt, rng, gen, step=step, progress=progress,
                         frames_seen=frames_seen, train_s=time.perf_counter() - t_start,
                         snaps=snaps, batches=batches)
            log.close()
            print(f"paused at step {step} (progress {progress:.3f}); resume with --resume",
                  flush=True)
            return 0
        if not batches:
            batches = make_batches(train.lengths_cpu, conf.max_frames_in_batch, rng)
        idx = batches.pop()
        lr = lr_at(progress, conf, args.warmup_frac)
        out = train_step(net, opt, train.batch(idx), lr, conf, fill, gen, chunk_size(rng), amp)
        step += 1
        frames_seen += int(train.lengths_cpu[idx].sum())
        elapsed = time.perf_counter() - t_start
        progress = max(step / args.steps, elapsed / budget if budget > 0 else 0.0)
        if step % args.log_every == 0 or progress >= 1.0 or step == 1:
            now = time.perf_counter()
            rate = (frames_seen - last_log["frames"]) / 100 / max(now - last_log["time"], 1e-9)
            last_log = {"time": now, "frames": frames_seen}
            rec = {"step": step, "progress": round(progress, 4), "lr": lr,
                   "elapsed_s": round(elapsed, 1), "audio_s_per_s": round(rate, 1),
                   "epoch": round(frames_seen / train.lengths_cpu.sum(), 2),
                   **{k: round(float(v.detach()), 4) for k, v in out.items()}}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(" ".join(f"{k} {v}" for k, v in rec.items()), flush=True)
        if step % args.eval_every == 0 or progress >= 1.0:
            res = evaluate(net, dev, conf, conf.max_frames_in_batch, amp)
            log.write(json.dumps({"step": step, "dev": res}) + "\n")
            print(f"step {step} dev " + " ".join(f"{k} {v:.4f}" for k, v in res.items()),
                  flush=True)
        while snaps and progress >= snaps[0] - 1e-9:
            snaps.pop(0)
            path = exp / "snapshots" / f"step_{step:07d}.pt"
            torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, path)
    log.close()
    (exp / "resume.pt").unlink(missing_ok=True)
    info = {"steps": step, "train_seconds": round(time.perf_counter() - t_start, 1),
            "epochs": round(frames_seen / train.lengths_cpu.sum(), 2),
            "train_utterances": len(train), "parameters": n_params, "device": str(device),
            "preset": args.preset, "training": asdict(conf), "seed": args.seed}
    (exp / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"trained {step} steps ({info['epochs']} epochs) in {info['train_seconds']} s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
