"""WeNet ``final.pt`` state dict -> speechrt state dict, by an explicit key map.

Every WeNet key is either mapped to exactly one of our parameters (shape checked), or listed as a
derived buffer we recompute (positional tables, BatchNorm's batch counter). Anything else, and any
of our parameters left without a source, is a :class:`ModelFormatError` naming the key.

Most keys map one to one (a ``str`` in the key map). WeNet's MoE FFN keeps one Linear per expert
and a router ``Linear(D, E)``; ours stacks the experts into (E, ...) tensors and stores the router
as (D, E), so those keys map to a :class:`Part` of one of our tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from speechrt.errors import ModelFormatError
from speechrt.models.conformer.config import MlpConfig, ModelConfig

# Derived buffers that WeNet saves but we recompute: the sinusoid tables.
_DERIVED = (re.compile(r".*\.pe$"),)

_LINEAR = ("weight", "bias")
_NORM = ("weight", "bias")
_BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class Part:
    """A WeNet tensor that is one slice of, or the transpose of, our tensor ``target``.

    index: the expert slot in our stacked (E, ...) tensor; transpose: WeNet's (E, D) router
    weight is our (D, E) ``router_weight``.
    """

    target: str
    index: int | None = None
    transpose: bool = False

    def source_shape(self, target_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the WeNet tensor must have for our tensor of ``target_shape``."""
        shape = target_shape[1:] if self.index is not None else target_shape
        return tuple(reversed(shape)) if self.transpose else tuple(shape)


def _ffn_map(src: str, dst: str, mlp: MlpConfig) -> dict[str, str | Part]:
    """One WeNet feed-forward (``src`` e.g. ``encoder.encoders.0.feed_forward``) -> ``dst``."""
    names = _LINEAR if mlp.bias else ("weight",)
    m: dict[str, str | Part] = {}
    if mlp.kind == "moe":
        m[f"{src}.gate.weight"] = Part(f"{dst}.router_weight", transpose=True)
        for e in range(mlp.n_expert):
            for wenet, ours in (("w_1", "1"), ("w_2", "2")):
                m[f"{src}.experts.{e}.{wenet}.weight"] = Part(f"{dst}.w{ours}", index=e)
                if mlp.bias:
                    m[f"{src}.experts.{e}.{wenet}.bias"] = Part(f"{dst}.b{ours}", index=e)
        return m
    pairs = (("w_1", "w1"), ("w_2", "w2"))
    if mlp.kind == "gated":
        m[f"{src}.gate.weight"] = f"{dst}.gate.weight"
        pairs = (("w_1", "up"), ("w_2", "down"))
    for wenet, ours in pairs:
        for n in names:
            m[f"{src}.{wenet}.{n}"] = f"{dst}.{ours}.{n}"
    return m


def _encoder_block_map(cfg: ModelConfig, i: int) -> dict[str, str | Part]:
    src, dst = f"encoder.encoders.{i}.", f"encoder.layers.{i}."
    enc = cfg.encoder
    m: dict[str, str | Part] = {}

    def add(a: str, b: str, names=_LINEAR):
        for n in names:
            m[f"{src}{a}.{n}"] = f"{dst}{b}.{n}"

    for a, b in (("linear_q", "q"), ("linear_k", "k"), ("linear_v", "v"), ("linear_out", "out")):
        add(f"self_attn.{a}", f"attn.{b}")
    if enc.rel_attention:
        m[f"{src}self_attn.linear_pos.weight"] = f"{dst}attn.pos.weight"
        m[f"{src}self_attn.pos_bias_u"] = f"{dst}attn.pos_bias_u"
        m[f"{src}self_attn.pos_bias_v"] = f"{dst}attn.pos_bias_v"
    m.update(_ffn_map(f"{src}feed_forward", f"{dst}ff", enc.mlp))
    if enc.kind == "transformer":
        add("norm1", "norm_attn", _NORM)
        add("norm2", "norm_ff", _NORM)
        return m
    add("norm_mha", "norm_attn", _NORM)
    add("norm_ff", "norm_ff", _NORM)
    if enc.macaron:
        m.update(_ffn_map(f"{src}feed_forward_macaron", f"{dst}ff_macaron", enc.mlp))
        add("norm_ff_macaron", "norm_ff_macaron", _NORM)
    if enc.conv:
        add("conv_module.pointwise_conv1", "conv.pw1")
        add("conv_module.depthwise_conv", "conv.dw")
        add("conv_module.pointwise_conv2", "conv.pw2")
        norm = _BATCH_NORM if enc.cnn_module_norm == "batch_norm" else _NORM
        add("conv_module.norm", "conv.norm", norm)
        add("norm_conv", "norm_conv", _NORM)
        add("norm_final", "norm_final", _NORM)
    return m


def _decoder_map(prefix: str, dst: str, num_blocks: int, mlp: MlpConfig) -> dict[str, str | Part]:
    m: dict[str, str | Part] = {
        f"{prefix}embed.0.weight": f"{dst}embed.weight",
        f"{prefix}after_norm.weight": f"{dst}final_norm.weight",
        f"{prefix}after_norm.bias": f"{dst}final_norm.bias",
        f"{prefix}output_layer.weight": f"{dst}out.weight",
        f"{prefix}output_layer.bias": f"{dst}out.bias",
    }
    for i in range(num_blocks):
        s, d = f"{prefix}decoders.{i}.", f"{dst}layers.{i}."
        for att_src, att_dst in (("self_attn", "self_attn"), ("src_attn", "cross_attn")):
            for a, b in (
                ("linear_q", "q"),
                ("linear_k", "k"),
                ("linear_v", "v"),
                ("linear_out", "out"),
            ):
                for n in _LINEAR:
                    m[f"{s}{att_src}.{a}.{n}"] = f"{d}{att_dst}.{b}.{n}"
        m.update(_ffn_map(f"{s}feed_forward", f"{d}ff", mlp))
        for a, b in (
            ("norm1", "norm1"),
            ("norm2", "norm2"),
            ("norm3", "norm3"),
        ):
            for n in _LINEAR:
                m[f"{s}{a}.{n}"] = f"{d}{b}.{n}"
    return m


def wenet_key_map(cfg: ModelConfig) -> dict[str, str | Part]:
    """The full WeNet -> speechrt key map for a model of this config.

    Values are our key (one to one) or a :class:`Part` (MoE experts and router).
    """
    m: dict[str, str | Part] = {
        "encoder.global_cmvn.mean": "encoder.cmvn_mean",
        "encoder.global_cmvn.istd": "encoder.cmvn_istd",
        "ctc.ctc_lo.weight": "ctc.weight",
        "ctc.ctc_lo.bias": "ctc.bias",
    }
    if cfg.encoder.input_layer == "linear":
        m.update(
            {
                "encoder.embed.out.0.weight": "encoder.subsampling.proj.weight",
                "encoder.embed.out.0.bias": "encoder.subsampling.proj.bias",
                "encoder.embed.out.1.weight": "encoder.subsampling.norm.weight",
                "encoder.embed.out.1.bias": "encoder.subsampling.norm.bias",
            }
        )
    else:
        n_convs = 3 if cfg.encoder.input_layer == "conv2d8" else 2
        for j in range(n_convs):
            for n in _LINEAR:
                m[f"encoder.embed.conv.{2 * j}.{n}"] = f"encoder.subsampling.convs.{j}.{n}"
        # WeNet names the projection out.0 in Conv2dSubsampling4, linear in the 6x and 8x ones.
        proj = "out.0" if cfg.encoder.input_layer == "conv2d" else "linear"
        for n in _LINEAR:
            m[f"encoder.embed.{proj}.{n}"] = f"encoder.subsampling.proj.{n}"
    # WeNet always creates after_norm; it is applied only when normalize_before.
    m["encoder.after_norm.weight"] = "encoder.final_norm.weight"
    m["encoder.after_norm.bias"] = "encoder.final_norm.bias"
    for i in range(cfg.encoder.num_blocks):
        m.update(_encoder_block_map(cfg, i))
    dec = cfg.decoder
    if dec is not None:
        if dec.kind == "bitransformer":
            m.update(_decoder_map("decoder.left_decoder.", "decoder.l2r.", dec.num_blocks, dec.mlp))
            m.update(
                _decoder_map("decoder.right_decoder.", "decoder.r2l.", dec.r_num_blocks, dec.mlp)
            )
        else:
            m.update(_decoder_map("decoder.", "decoder.l2r.", dec.num_blocks, dec.mlp))
    return m


def convert_wenet_state_dict(
    wenet_sd: dict[str, torch.Tensor],
    cfg: ModelConfig,
    target_shapes: dict[str, torch.Size],
    allow_missing: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Map ``wenet_sd`` onto our names; check every shape against ``target_shapes``.

    ``allow_missing``: our keys that may lack a source (e.g. CMVN buffers when ``global_cmvn`` is
    loaded from the file instead of the checkpoint).
    """
    key_map = wenet_key_map(cfg)
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int | None, torch.Tensor]] = {}
    for key, value in wenet_sd.items():
        if key not in key_map:
            if any(p.match(key) for p in _DERIVED):
                continue
            raise ModelFormatError(
                f"unexpected key '{key}' in checkpoint (not part of a {cfg.encoder.kind} / "
                f"{cfg.decoder.kind if cfg.decoder else 'no'} decoder model of this train.yaml)"
            )
        entry = key_map[key]
        part = entry if isinstance(entry, Part) else Part(entry)
        if part.target not in target_shapes:
            raise ModelFormatError(
                f"checkpoint key '{key}' maps to unknown parameter '{part.target}'"
            )
        expected = part.source_shape(tuple(target_shapes[part.target]))
        if tuple(value.shape) != expected:
            raise ModelFormatError(
                f"checkpoint key '{key}' has shape {tuple(value.shape)}, "
                f"the config expects {expected}"
            )
        value = value.t() if part.transpose else value
        if part.index is None:
            out[part.target] = value
        else:
            parts.setdefault(part.target, {})[part.index] = value
    for target, pieces in parts.items():
        n = target_shapes[target][0]
        if len(pieces) == n:  # all experts present (a missing one is reported below)
            out[target] = torch.stack([pieces[e] for e in range(n)])  # (E, ...)
    missing = [k for k in target_shapes if k not in out and k not in allow_missing]
    if missing:
        raise ModelFormatError(
            f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. "
            f"'{_source_name(key_map, missing[0], parts.get(missing[0], {}))}'"
        )
    return out


def _source_name(
    key_map: dict[str, str | Part], ours: str, present: dict[int | None, torch.Tensor]
) -> str:
    """The WeNet key that would have provided (a missing piece of) our tensor ``ours``."""
    for wenet, entry in key_map.items():
        target, index = (entry.target, entry.index) if isinstance(entry, Part) else (entry, None)
        if target == ours and (index is None or index not in present):
            return wenet
    return ours
