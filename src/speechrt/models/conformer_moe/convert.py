"""3M-ASR ``final.nnet`` state dict -> speechrt state dict, by an explicit key map.

3M-ASR layout (``encoder.`` prefix for the AED model, none for the CTC-only encoder)::

    encoder.subsampling.conv.{0,2[,4]}.*, .out[.0].*    input layer
    encoder.blocks.N.*                                  MoE Conformer blocks
    encoder.blocks.N.feed_forward.router_weights        (DE + D, E)
    encoder.blocks.N.feed_forward.experts.w_{1,2}.*     (E, H, D) / (E, D, H) and biases
    encoder.after_norm.*, encoder.out_linear.*          final norm, CTC head
    encoder.embed.*                                     the dense embedding network (same layout)
    decoder.*                                           WeNet-v1 transformer decoder

Every key maps to exactly one of our tensors with its shape checked, or is one of the modules
3M-ASR creates but never uses (``concat_linear*`` without ``concat_after``). Unknown, missing
and mis-shaped keys are a :class:`ModelFormatError` naming the key. The CMVN buffers of our two
encoders are identity: 3M-ASR applies CMVN outside the network (our facade does too).
"""

from __future__ import annotations

import re

import torch

from speechrt.errors import ModelFormatError
from speechrt.models.conformer.config import EncoderConfig
from speechrt.models.conformer_moe.config import ConformerMoEConfig

_WB = ("weight", "bias")
_BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Created by 3M-ASR's layers in every model, used only with concat_after (which we reject).
_UNUSED = (
    re.compile(r"(.*\.)?blocks\.\d+\.concat_linear\.(weight|bias)$"),
    re.compile(r"(.*\.)?decoders\.\d+\.concat_linear[12]\.(weight|bias)$"),
)
_IDENTITY_BUFFERS = (
    "encoder.cmvn_mean",
    "encoder.cmvn_istd",
    "encoder.embed.cmvn_mean",
    "encoder.embed.cmvn_istd",
)


def _add(m: dict[str, str], src: str, dst: str, names=_WB) -> None:
    for n in names:
        m[f"{src}.{n}"] = f"{dst}.{n}"


def _subsampling_map(enc: EncoderConfig, src: str, dst: str) -> dict[str, str]:
    m: dict[str, str] = {}
    if enc.input_layer == "linear":
        _add(m, f"{src}out.0", f"{dst}proj")
        _add(m, f"{src}out.1", f"{dst}norm")
        return m
    for j in range(3 if enc.input_layer == "conv2d8" else 2):
        _add(m, f"{src}conv.{2 * j}", f"{dst}convs.{j}")
    # Conv2dSubsampling4's projection is a Sequential (out.0); the 6x and 8x ones a Linear (out).
    _add(m, f"{src}out.0" if enc.input_layer == "conv2d" else f"{src}out", f"{dst}proj")
    return m


def _block_map(enc: EncoderConfig, src: str, dst: str, moe: bool, router_bias: bool):
    m: dict[str, str] = {}
    for a, b in (("linear_q", "q"), ("linear_k", "k"), ("linear_v", "v"), ("linear_out", "out")):
        _add(m, f"{src}self_attn.{a}", f"{dst}attn.{b}")
    if enc.rel_attention:
        m[f"{src}self_attn.linear_pos.weight"] = f"{dst}attn.pos.weight"
        m[f"{src}self_attn.pos_bias_u"] = f"{dst}attn.pos_bias_u"
        m[f"{src}self_attn.pos_bias_v"] = f"{dst}attn.pos_bias_v"
    if moe:
        m[f"{src}feed_forward.router_weights"] = f"{dst}ff.router_weight"
        if router_bias:
            m[f"{src}feed_forward.router_bias"] = f"{dst}ff.router_bias"
        for i in (1, 2):
            m[f"{src}feed_forward.experts.w_{i}.weight"] = f"{dst}ff.w{i}"
            m[f"{src}feed_forward.experts.w_{i}.bias"] = f"{dst}ff.b{i}"
    else:
        _add(m, f"{src}feed_forward.w_1", f"{dst}ff.w1")
        _add(m, f"{src}feed_forward.w_2", f"{dst}ff.w2")
    _add(m, f"{src}norm_ff", f"{dst}norm_ff")
    _add(m, f"{src}norm_mha", f"{dst}norm_attn")
    if enc.macaron:
        _add(m, f"{src}feed_forward_macaron.w_1", f"{dst}ff_macaron.w1")
        _add(m, f"{src}feed_forward_macaron.w_2", f"{dst}ff_macaron.w2")
        _add(m, f"{src}norm_ff_macaron", f"{dst}norm_ff_macaron")
    if enc.conv:
        _add(m, f"{src}conv_module.pointwise_conv1", f"{dst}conv.pw1")
        _add(m, f"{src}conv_module.depthwise_conv", f"{dst}conv.dw")
        _add(m, f"{src}conv_module.pointwise_conv2", f"{dst}conv.pw2")
        norm = _BATCH_NORM if enc.cnn_module_norm == "batch_norm" else _WB
        _add(m, f"{src}conv_module.norm", f"{dst}conv.norm", norm)
        _add(m, f"{src}norm_conv", f"{dst}norm_conv")
        _add(m, f"{src}norm_final", f"{dst}norm_final")
    return m


def _encoder_map(enc, src, dst, head_dst, moe: bool, router_bias: bool) -> dict[str, str]:
    m = _subsampling_map(enc, f"{src}subsampling.", f"{dst}subsampling.")
    _add(m, f"{src}after_norm", f"{dst}final_norm")
    _add(m, f"{src}out_linear", head_dst)
    for i in range(enc.num_blocks):
        m.update(_block_map(enc, f"{src}blocks.{i}.", f"{dst}layers.{i}.", moe, router_bias))
    return m


def _decoder_map(src: str, dst: str, num_blocks: int) -> dict[str, str]:
    m = {f"{src}embed.0.weight": f"{dst}embed.weight"}
    _add(m, f"{src}after_norm", f"{dst}final_norm")
    _add(m, f"{src}output_layer", f"{dst}out")
    for i in range(num_blocks):
        s, d = f"{src}decoders.{i}.", f"{dst}layers.{i}."
        for att_src, att_dst in (("self_attn", "self_attn"), ("src_attn", "cross_attn")):
            for a, b in (
                ("linear_q", "q"),
                ("linear_k", "k"),
                ("linear_v", "v"),
                ("linear_out", "out"),
            ):
                _add(m, f"{s}{att_src}.{a}", f"{d}{att_dst}.{b}")
        _add(m, f"{s}feed_forward.w_1", f"{d}ff.w1")
        _add(m, f"{s}feed_forward.w_2", f"{d}ff.w2")
        for n in ("norm1", "norm2", "norm3"):
            _add(m, f"{s}{n}", f"{d}{n}")
    return m


def key_map(cfg: ConformerMoEConfig) -> dict[str, str]:
    """The full 3M-ASR -> speechrt key map for a model of this config."""
    p = cfg.key_prefix
    m = _encoder_map(cfg.encoder, p, "encoder.", "ctc", True, cfg.moe.router_with_bias)
    m.update(
        _encoder_map(
            cfg.embed_encoder, f"{p}embed.", "encoder.embed.", "encoder.embed_ctc", False, False
        )
    )
    dec = cfg.decoder
    if dec is not None:
        if dec.kind == "bitransformer":
            m.update(_decoder_map("decoder.left_decoder.", "decoder.l2r.", dec.num_blocks))
            m.update(_decoder_map("decoder.right_decoder.", "decoder.r2l.", dec.r_num_blocks))
        else:
            m.update(_decoder_map("decoder.", "decoder.l2r.", dec.num_blocks))
    return m


def convert_3m_state_dict(
    src_sd: dict[str, torch.Tensor],
    cfg: ConformerMoEConfig,
    target_shapes: dict[str, torch.Size],
) -> dict[str, torch.Tensor]:
    """Map a 3M-ASR state dict onto our names, checking every shape against ``target_shapes``.

    Returns a complete state dict for ``ConformerMoEASR(cfg)`` (identity CMVN buffers added).
    """
    kmap = key_map(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in src_sd.items():
        if key not in kmap:
            if any(p.match(key) for p in _UNUSED):
                continue
            raise ModelFormatError(
                f"unexpected key '{key}' in final.nnet (not part of the model config.yaml "
                f"describes: {cfg.proto}, {cfg.encoder.num_blocks} MoE blocks, "
                f"{cfg.embed_encoder.num_blocks} embedding blocks)"
            )
        ours = kmap[key]
        if ours not in target_shapes:
            raise ModelFormatError(f"final.nnet key '{key}' maps to unknown parameter '{ours}'")
        if tuple(value.shape) != tuple(target_shapes[ours]):
            raise ModelFormatError(
                f"final.nnet key '{key}' has shape {tuple(value.shape)}, "
                f"config.yaml implies {tuple(target_shapes[ours])}"
            )
        out[ours] = value
    for name in _IDENTITY_BUFFERS:
        if name in target_shapes:
            fill = 0.0 if name.endswith("mean") else 1.0
            out[name] = torch.full(tuple(target_shapes[name]), fill)
    missing = [k for k in target_shapes if k not in out]
    if missing:
        inverse = {v: k for k, v in kmap.items()}
        names = [inverse.get(k, k) for k in missing]
        raise ModelFormatError(
            f"final.nnet lacks {len(missing)} tensor(s) the config needs, e.g. '{names[0]}'"
        )
    return out
