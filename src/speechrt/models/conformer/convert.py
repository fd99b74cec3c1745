"""WeNet ``final.pt`` state dict -> speechrt state dict, by an explicit key map.

Every WeNet key is either mapped to exactly one of our parameters (shape checked), or listed as a
derived buffer we recompute (positional tables, BatchNorm's batch counter). Anything else, and any
of our parameters left without a source, is a :class:`ModelFormatError` naming the key.
"""

from __future__ import annotations

import re

import torch

from speechrt.errors import ModelFormatError
from speechrt.models.conformer.config import ModelConfig

# Derived buffers that WeNet saves but we recompute: the sinusoid tables.
_DERIVED = (re.compile(r".*\.pe$"),)

_LINEAR = ("weight", "bias")
_NORM = ("weight", "bias")
_BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _encoder_block_map(cfg: ModelConfig, i: int) -> dict[str, str]:
    src, dst = f"encoder.encoders.{i}.", f"encoder.layers.{i}."
    enc = cfg.encoder
    m: dict[str, str] = {}

    def add(a: str, b: str, names=_LINEAR):
        for n in names:
            m[f"{src}{a}.{n}"] = f"{dst}{b}.{n}"

    for a, b in (("linear_q", "q"), ("linear_k", "k"), ("linear_v", "v"), ("linear_out", "out")):
        add(f"self_attn.{a}", f"attn.{b}")
    if enc.rel_attention:
        m[f"{src}self_attn.linear_pos.weight"] = f"{dst}attn.pos.weight"
        m[f"{src}self_attn.pos_bias_u"] = f"{dst}attn.pos_bias_u"
        m[f"{src}self_attn.pos_bias_v"] = f"{dst}attn.pos_bias_v"
    add("feed_forward.w_1", "ff.w1")
    add("feed_forward.w_2", "ff.w2")
    if enc.kind == "transformer":
        add("norm1", "norm_attn", _NORM)
        add("norm2", "norm_ff", _NORM)
        return m
    add("norm_mha", "norm_attn", _NORM)
    add("norm_ff", "norm_ff", _NORM)
    if enc.macaron:
        add("feed_forward_macaron.w_1", "ff_macaron.w1")
        add("feed_forward_macaron.w_2", "ff_macaron.w2")
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


def _decoder_map(prefix: str, dst: str, num_blocks: int) -> dict[str, str]:
    m = {
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
        for a, b in (
            ("feed_forward.w_1", "ff.w1"),
            ("feed_forward.w_2", "ff.w2"),
            ("norm1", "norm1"),
            ("norm2", "norm2"),
            ("norm3", "norm3"),
        ):
            for n in _LINEAR:
                m[f"{s}{a}.{n}"] = f"{d}{b}.{n}"
    return m


def wenet_key_map(cfg: ModelConfig) -> dict[str, str]:
    """The full WeNet -> speechrt key map for a model of this config."""
    m = {
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
            m.update(_decoder_map("decoder.left_decoder.", "decoder.l2r.", dec.num_blocks))
            m.update(_decoder_map("decoder.right_decoder.", "decoder.r2l.", dec.r_num_blocks))
        else:
            m.update(_decoder_map("decoder.", "decoder.l2r.", dec.num_blocks))
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
    for key, value in wenet_sd.items():
        if key not in key_map:
            if any(p.match(key) for p in _DERIVED):
                continue
            raise ModelFormatError(
                f"unexpected key '{key}' in checkpoint (not part of a {cfg.encoder.kind} / "
                f"{cfg.decoder.kind if cfg.decoder else 'no'} decoder model of this train.yaml)"
            )
        ours = key_map[key]
        if ours not in target_shapes:
            raise ModelFormatError(f"checkpoint key '{key}' maps to unknown parameter '{ours}'")
        if tuple(value.shape) != tuple(target_shapes[ours]):
            raise ModelFormatError(
                f"checkpoint key '{key}' has shape {tuple(value.shape)}, "
                f"the config expects {tuple(target_shapes[ours])}"
            )
        out[ours] = value
    missing = [k for k in target_shapes if k not in out and k not in allow_missing]
    if missing:
        inverse = {v: k for k, v in key_map.items()}
        names = [inverse.get(k, k) for k in missing]
        raise ModelFormatError(
            f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. '{names[0]}'"
        )
    return out
