"""The Conformer encoder and attention decoder on speechrt's Triton kernels.

Built from a loaded :class:`~speechrt.models.conformer.model.ConformerASR` at load time: BatchNorm
folded into the depthwise conv, Q/K/V concatenated into one GEMM, biases that a fused
add+LayerNorm can apply kept apart, weights cast to the compute dtype while LayerNorm parameters,
the residual stream and every softmax stay float32. Same function as the torch modules (the
reference); tests compare the two. The step functions allocate nothing that depends on data, so
they can be captured in CUDA graphs (:mod:`speechrt.engine.graphs`).

Each pre-norm Conformer block runs as::

    y = LN_mac(x)                      (from the previous block)
    x, y = add_LN(w2(act(w1 y)), x, LN_attn, bias=b2, scale=0.5)
    x, y = add_LN(out(attn(qkv y)), x, LN_conv, bias=b_out)
    x, y = add_LN(pw2(glu_dwconv_bn_act(pw1 y)), x, LN_ff, bias=b_pw2)
    x, y = add_LN_LN(w2(act(w1 y)), x, LN_final, LN_mac', bias=b2, scale=0.5)

where the last line's first LayerNorm is the block's output (the next block's stream) and the
second is the next block's LN_mac (after the last block: the encoder's final norm), one kernel.
With ``triton_glu`` the conv line's pw1 runs with the GLU in its epilogue. With ``fused_ffn``
each of the two FFN lines runs as one kernel, its hidden activations on chip.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speechrt.engine.precision import Precision
from speechrt.kernels._utils import interpreting, sm_count, triton_importable
from speechrt.kernels.attention import MAX_HEAD_DIM, attention, rel_pos_attention
from speechrt.kernels.conv_module import fold_batch_norm, glu_depthwise_conv
from speechrt.kernels.conv_subsampling import (
    ConvSubsamplingWeights,
    channels_unsupported,
    conv_subsampling,
    pack_conv_subsampling,
)
from speechrt.kernels.fused_ffn import ffn_add_layer_norm
from speechrt.kernels.gemm import linear_fp32_out, mm_fp32_out_supported
from speechrt.kernels.layer_norm import (
    add_double_layer_norm,
    add_layer_norm,
    layer_norm,
    widen_layer_norm,
)
from speechrt.kernels.linear_act import interleave_glu, linear_act
from speechrt.kernels.linear_add_layer_norm import MAX_D as ADD_LN_MAX_D
from speechrt.kernels.linear_add_layer_norm import linear_add_layer_norm
from speechrt.kernels.log_softmax import linear_log_softmax
from speechrt.layers.positional import positions
from speechrt.models.conformer.config import EncoderConfig
from speechrt.models.conformer.encoder import Encoder
from speechrt.models.conformer.model import ConformerASR

_ACT = {"swish": F.silu, "silu": F.silu, "relu": F.relu, "gelu": F.gelu}
_DENSE = ("position_wise_feed_forward", True)
# ``fused_ffn`` runs an FFN as one kernel only with at least this many rows per SM: a program owns
# BLOCK_M (32-128) rows and the whole hidden loop, so fewer rows than 32 a SM leave SMs idle that
# the two-kernel path's (rows, H) GEMM tiles would fill (H200: 132 SMs -> 4224 rows, B x T' after
# subsampling). Even above it the kernel measured slower than the two-kernel path (session 4).
FUSED_FFN_ROWS_PER_SM = 32
# On CUDA the (B,) output lengths (a chain of tiny integer kernels) are computed on a side stream
# while the conv front runs (a parallel branch of the captured graph). Read at each forward.
SIDE_STREAM_LENGTHS = True


def encoder_unsupported(enc: EncoderConfig) -> str | None:
    """None if :class:`FusedEncoder` can run an encoder of this config, else the reason."""
    if enc.kind != "conformer" or not (enc.macaron and enc.conv):
        return "the fused encoder covers Conformer blocks with macaron FFN and conv module"
    if not enc.normalize_before:
        return "the fused encoder needs pre-norm blocks (normalize_before: true)"
    if not enc.rel_attention or enc.pos_enc_layer_type != "rel_pos":
        return "the fused encoder needs rel_pos + rel_selfattn"
    if enc.activation_type not in _ACT:
        return f"activation {enc.activation_type} has no fused path"
    if (enc.mlp_type, enc.mlp_bias) != _DENSE:
        return (
            f"the fused encoder covers biased position-wise FFNs, not mlp_type "
            f"{enc.mlp_type} with mlp_bias {enc.mlp_bias}"
        )
    head_dim = enc.output_size // enc.attention_heads
    if head_dim > MAX_HEAD_DIM:
        return f"the fused attention kernel takes head dims up to {MAX_HEAD_DIM}, not {head_dim}"
    return None


def supports_fused(net: ConformerASR) -> str | None:
    """None if the fused path can run this model, else the reason it cannot.

    Also takes a Conformer-MoE network: its encoder config describes the dense macaron FFN (the
    second FFN is swapped in by the model, see :meth:`FusedEncoder._prepare_ff`)."""
    reason = encoder_unsupported(net.cfg.encoder)
    if reason:
        return reason
    dec = net.cfg.decoder
    if dec is not None and (dec.mlp_type, dec.mlp_bias) != _DENSE:
        return (
            f"the fused decoder covers biased position-wise FFNs, not mlp_type "
            f"{dec.mlp_type} with mlp_bias {dec.mlp_bias}"
        )
    if dec is not None and (not dec.normalize_before or dec.activation_type not in _ACT):
        return "the fused decoder needs pre-norm layers with relu/swish/gelu FFNs"
    if dec is not None and net.cfg.encoder.output_size // dec.attention_heads > MAX_HEAD_DIM:
        return f"the fused decoder's attention kernel takes head dims up to {MAX_HEAD_DIM}"
    return None


@dataclass
class _Norm:
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


def _norm(m: torch.nn.LayerNorm) -> _Norm:
    return _Norm(m.weight.detach().float(), m.bias.detach().float(), m.eps)


def _conv_front_kernel_fits(sub) -> bool:
    """Whether :func:`conv_subsampling` computes this input layer: WeNet's Conv2dSubsampling4
    (two biased, unpadded 3x3 stride-2 convs, one input channel)."""
    convs = list(sub.convs)
    if len(convs) != 2 or convs[0].in_channels != 1:
        return False
    shape = ((3, 3), (2, 2), (0, 0), (1, 1), 1)
    return all(
        (c.kernel_size, c.stride, c.padding, c.dilation, c.groups) == shape and c.bias is not None
        for c in convs
    )


class FusedEncoder:
    """Fused-kernel encoder: ``forward(feats, lengths) -> (out (B, T', D) float32, lengths)``.

    Built from an :class:`~speechrt.models.conformer.encoder.Encoder`. Weights already in the
    compute dtype (and contiguous) are referenced, not copied; the rest is cast once here.
    Subclasses swap the second feed-forward of every block by overriding :meth:`_prepare_ff`
    and :meth:`_second_ffn_add_ln` (the Conformer-MoE does).

    ``triton_front``: run a Conv2dSubsampling4 front (CMVN + both convs + ReLUs) as the single
    Triton kernel :func:`~speechrt.kernels.conv_subsampling.conv_subsampling` instead of cuDNN
    in channels-last. None (default) turns it on when the weights are on CUDA and Triton is
    installed; the attribute of the same name can be flipped later (before graph capture) to
    compare the two paths. The cuDNN path stays the fallback for other input layers.

    ``triton_ffn``: run each FFN's first GEMM with its activation in the epilogue
    (:func:`~speechrt.kernels.linear_act.linear_act`) instead of cuBLAS ``F.linear`` plus a
    separate activation kernel. None (default): on for CUDA weights with Triton installed (1.0-1.4x
    the cuBLAS GEMM + SiLU kernel at every measured size, BENCHMARKS.md); also an attribute.

    ``triton_glu``: run the conv module's pointwise conv 1 with the GLU in its epilogue
    (``linear_act(..., "glu")`` on rows interleaved by
    :func:`~speechrt.kernels.linear_act.interleave_glu`), so the depthwise-conv kernel reads the
    (rows, C) GLU output instead of (rows, 2C) and computes no sigmoid per tap. None (default):
    on for CUDA weights with Triton installed; also an attribute.

    ``triton_linear``: run the block's GEMMs of K = D -- packed Q/K/V, the attention output and
    the conv module's pw2 -- on :func:`~speechrt.kernels.linear_act.linear_act` (no activation;
    the persistent tensor-descriptor kernel at enough rows) instead of cuBLAS. Default off: alone
    the GEMM is faster (H200, fp16, 256 -> 256 at 16,320 rows: 11.2 vs 17.7 us; equal at 4,032),
    but the encoder gained nothing (64 x 1024 frames 4.52 vs 4.54 ms, 64 x 256 1.52 vs 1.49,
    16 x 1024 1.57 vs 1.54); also an attribute.

    ``triton_add_ln``: run the four GEMM -> residual add + LayerNorm sites of every block
    (macaron FFN w2, attention output, conv pw2, FFN w2) as one
    :func:`~speechrt.kernels.linear_add_layer_norm.linear_add_layer_norm` kernel each (bias,
    scale, residual add and LayerNorm in the GEMM epilogue) when D <= 256 and the residual
    stream is float32. None (default): on for bfloat16 CUDA weights only -- it is slower than
    cuBLAS + ``add_layer_norm`` at K=2048 (0.5-0.8x on the H200), but the trained default model
    kept its FP32 text on 495/500 utterances this way (CTC greedy and rescoring) vs 493/492 with
    cuBLAS float32 outputs and 491/490 with rounded branches (BENCHMARKS.md); also an
    attribute. A subclass that overrides :meth:`_second_ffn_add_ln` decides for its own second
    FFN.

    ``fp32_branches``: the GEMMs whose result joins the float32 residual stream (the four sites
    above and the conv front's projection) store their float32 accumulators
    (:func:`~speechrt.kernels.gemm.linear_fp32_out`, cuBLAS) instead of rounding the branch to
    the compute dtype first. None (default): on for bfloat16, whose 8-bit output rounding moved
    a trained model's text on 10 of 500 utterances (BENCHMARKS.md); also an attribute.

    ``tf32_attention``: self-attention's two products run on float32 operands in TF32
    (``rel_pos_attention(tf32_dots=True)``: ``k + p`` and the softmax probabilities keep 10
    mantissa bits instead of being rounded to bfloat16's 7). Default off: on the trained model
    it kept no more text than the bfloat16 dots (493 vs 495 of 500 utterances, CTC greedy) and
    cost up to 6 % (BENCHMARKS.md); also an attribute.

    ``fused_ffn``: run the macaron FFN and the dense second FFN of every block, each with its
    residual add and the next LayerNorm, as one
    :func:`~speechrt.kernels.fused_ffn.ffn_add_layer_norm` kernel (the (rows, H) hidden tensor
    never goes through memory) instead of ``linear_act``/cuBLAS + the add + LayerNorm site. Taken
    where D <= 256, the residual stream is contiguous float32 and Triton can run (CUDA, or the
    interpreter) and, on CUDA, with at least ``FUSED_FFN_ROWS_PER_SM`` rows per SM; other
    shapes keep the two-kernel path. The hidden is rounded to the compute dtype as ``linear_act``
    rounds it, and the branch joins the float32 stream unrounded (as with ``triton_add_ln``).
    Default off: on the H200 it is slower than the two-kernel path (bench/ffn_micro.py, FP16,
    D=256, H=2048: 0.147 vs 0.107 ms at 16,384 rows with its best tiles, 0.067 vs 0.032 ms at
    4,096; the 64x1024 encoder 8.5 vs 5.5 ms with the untuned tiles); also an attribute. A
    subclass that overrides :meth:`_second_ffn_add_ln` decides for its own second FFN.
    """

    def __init__(
        self,
        enc: Encoder,
        precision: Precision,
        pad_mode: str = "zero",
        triton_front: bool | None = None,
        triton_ffn: bool | None = None,
        triton_glu: bool | None = None,
        triton_linear: bool = False,
        triton_add_ln: bool | None = None,
        fp32_branches: bool | None = None,
        tf32_attention: bool = False,
        fused_ffn: bool = False,
    ):
        reason = encoder_unsupported(enc.cfg)
        if reason:
            raise ValueError(reason)
        self.cfg = enc.cfg
        self.dtype = precision.compute
        self.residual_dtype = precision.residual
        self.pad_mode = pad_mode
        self.act = _ACT[self.cfg.activation_type]
        self.act_name = "swish" if self.cfg.activation_type == "silu" else self.cfg.activation_type
        if triton_ffn is None:  # measured faster than cuBLAS + a SiLU kernel on the H200
            triton_ffn = enc.final_norm.weight.is_cuda and triton_importable()
        self.triton_ffn = triton_ffn
        if triton_glu is None:
            triton_glu = enc.final_norm.weight.is_cuda and triton_importable()
        self.triton_glu = triton_glu
        self.triton_linear = triton_linear
        if triton_add_ln is None:
            triton_add_ln = (
                self.dtype == torch.bfloat16
                and self.residual_dtype == torch.float32
                and self.cfg.output_size <= ADD_LN_MAX_D
                and enc.final_norm.weight.is_cuda
                and triton_importable()
            )
        self.triton_add_ln = triton_add_ln
        if fp32_branches is None:
            fp32_branches = self.dtype == torch.bfloat16 and self.residual_dtype == torch.float32
        self.fp32_branches = fp32_branches
        self.tf32_attention = tf32_attention
        self.fused_ffn = fused_ffn
        if fp32_branches and enc.final_norm.weight.is_cuda:
            mm_fp32_out_supported(enc.final_norm.weight.device, self.dtype)  # probe before capture
        self.sub_dtype = self.dtype
        self._front = self._prepare_front(enc.subsampling) if enc.subsampling.convs else None
        self._front_packed, self.triton_front = self._pack_front(enc.subsampling, triton_front)
        self.subsampling = enc.subsampling  # conv fronts: only its length arithmetic is used
        if self._front is None and enc.subsampling.proj.weight.dtype != self.dtype:
            # A linear input layer runs as torch modules in the compute dtype, on a private copy.
            self.subsampling = copy.deepcopy(enc.subsampling).to(self.dtype)
        self.cmvn_mean = enc.cmvn_mean.float()
        self.cmvn_istd = enc.cmvn_istd.float()
        self.final_norm = _norm(enc.final_norm)
        self.blocks = [self._prepare(layer) for layer in enc.layers]
        self.n_head = self.cfg.attention_heads
        self.d = self.cfg.output_size

    def _prepare_front(self, sub) -> dict:
        """Conv front on cuDNN in channels-last (ReLU in place), the projection's columns
        reordered to the NHWC (freq, channel) order and scaled by sqrt(d) (the positional-encoding
        input scale), so neither a transpose copy nor a scale kernel remains.
        """
        convs = [
            copy.deepcopy(c).to(self.dtype).to(memory_format=torch.channels_last) for c in sub.convs
        ]
        c = sub.convs[0].out_channels
        w = sub.proj.weight.detach()  # (D, C * F2), column = c * F2 + f
        d = w.shape[0]
        f2 = w.shape[1] // c
        w = w.view(d, c, f2).transpose(1, 2).reshape(d, f2 * c)  # column = f * C + c
        scale = math.sqrt(self.cfg.output_size)
        return {
            "convs": convs,
            "proj_w": (w * scale).to(self.dtype).contiguous(),
            "proj_b": (sub.proj.bias.detach() * scale).to(self.dtype),
        }

    def _pack_front(self, sub, wanted: bool | None) -> tuple[ConvSubsamplingWeights | None, bool]:
        """(packed conv weights for the Triton front or None if it cannot compute this input
        layer, whether to use it). ``wanted`` None: on for a CUDA model with Triton installed."""
        if not _conv_front_kernel_fits(sub):
            reason = f"the Triton conv front computes conv2d (4x) subsampling, not {sub.kind}"
        else:
            c1 = sub.convs[0]
            reason = channels_unsupported(c1.out_channels, self.dtype, c1.weight.is_cuda)
        if reason:
            if wanted:
                raise ValueError(reason)
            return None, False
        if wanted is None:
            wanted = sub.convs[0].weight.is_cuda and triton_importable()
        c1, c2 = sub.convs
        return pack_conv_subsampling(c1.weight, c1.bias, c2.weight, c2.bias, self.dtype), wanted

    def _embed(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw fbank (B, T, F) -> sqrt(d) * subsampling(CMVN(feats)), (B, T', D) compute dtype."""
        fr = self._front
        if fr is None:
            x = ((feats - self.cmvn_mean) * self.cmvn_istd).to(self.sub_dtype)
            return self.subsampling(x) * math.sqrt(self.d)
        if self.triton_front:
            if self._front_packed is None:
                raise ValueError(f"the Triton conv front cannot compute {self.subsampling.kind}")
            x = conv_subsampling(feats, self._front_packed, self.cmvn_mean, self.cmvn_istd)
            return self._front_proj(x)  # x: (B, T', F2 * C), f * C + c
        x = ((feats - self.cmvn_mean) * self.cmvn_istd).to(self.dtype).unsqueeze(1)  # (B,1,T,F)
        with torch.backends.cudnn.flags(
            enabled=True,
            benchmark=True,
            deterministic=False,
            allow_tf32=self.dtype != torch.float32,
        ):
            for conv in fr["convs"]:
                x = torch.relu_(conv(x))
        b, c, t, f = x.shape
        x = x.permute(0, 2, 3, 1).reshape(b, t, f * c)  # NHWC memory: a view, no copy
        return self._front_proj(x)

    def _front_proj(self, x: torch.Tensor) -> torch.Tensor:
        """The conv front's projection (B, T', F2 * C) -> (B, T', D): in the residual dtype
        straight from the GEMM accumulator when branches join the float32 stream unrounded
        (``triton_add_ln``: the Triton GEMM; ``fp32_branches``: cuBLAS), else in the compute
        dtype."""
        fr = self._front
        if self._branches_in_residual_dtype():
            if self.triton_add_ln:
                return linear_act(
                    x, fr["proj_w"], fr["proj_b"], "identity", out_dtype=self.residual_dtype
                )
            return linear_fp32_out(x, fr["proj_w"]).add_(fr["proj_b"])
        return F.linear(x, fr["proj_w"], fr["proj_b"])

    def _branches_in_residual_dtype(self) -> bool:
        """Whether residual-branch GEMMs store their float32 accumulators (see the class doc)."""
        return (self.triton_add_ln or self.fp32_branches) and (
            self.residual_dtype == torch.float32 != self.dtype
        )

    def _w(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(self.dtype).contiguous()

    def _prepare_ff(self, ff) -> dict:
        """The second (post-conv) feed-forward's weights, as :meth:`_second_ffn_add_ln` reads
        them."""
        return {
            "ff_w1": self._w(ff.w1.weight),
            "ff_b1": self._w(ff.w1.bias),
            "ff_w2": self._w(ff.w2.weight),
            "ff_b2": self._w(ff.w2.bias),
        }

    def _prepare(self, layer) -> dict:
        a, c = layer.attn, layer.conv
        qkv_w = torch.cat([a.q.weight, a.k.weight, a.v.weight], 0)
        qkv_b = torch.cat([a.q.bias, a.k.bias, a.v.bias], 0)
        blk = {
            "norm_mac": _norm(layer.norm_ff_macaron),
            "mac_w1": self._w(layer.ff_macaron.w1.weight),
            "mac_b1": self._w(layer.ff_macaron.w1.bias),
            "mac_w2": self._w(layer.ff_macaron.w2.weight),
            "mac_b2": self._w(layer.ff_macaron.w2.bias),
            "norm_attn": _norm(layer.norm_attn),
            "qkv_w": self._w(qkv_w),
            "qkv_b": self._w(qkv_b),
            "out_w": self._w(a.out.weight),
            "out_b": self._w(a.out.bias),
            "pos_w": self._w(a.pos.weight),
            "u": self._w(a.pos_bias_u),
            "v": self._w(a.pos_bias_v),
            "norm_conv": _norm(layer.norm_conv),
            "pw1_w": self._w(c.pw1.weight.squeeze(-1)),
            "pw1_b": self._w(c.pw1.bias),
            "pw2_w": self._w(c.pw2.weight.squeeze(-1)),
            "pw2_b": self._w(c.pw2.bias),
            "norm_ff": _norm(layer.norm_ff),
            "norm_final": _norm(layer.norm_final),
            **self._prepare_ff(layer.ff),
        }
        blk["pw1_wi"], blk["pw1_bi"] = interleave_glu(blk["pw1_w"], blk["pw1_b"])
        if c.norm_type == "batch_norm":
            bn = c.norm
            w, b = fold_batch_norm(
                c.dw.weight.detach().float(),
                c.dw.bias.detach().float(),
                bn.running_mean.float(),
                bn.running_var.float(),
                bn.weight.detach().float(),
                bn.bias.detach().float(),
                bn.eps,
            )
            blk.update(dw_w=w.to(self.dtype), dw_b=b.to(self.dtype), conv_norm="batch")
        else:
            blk.update(
                dw_w=self._w(c.dw.weight.reshape(c.channels, -1)),
                dw_b=self._w(c.dw.bias),
                conv_norm="layer",
                conv_ln=_norm(c.norm),
            )
        if c.causal:  # a causal module left-pads its *input* with zeros: GLU(bias1) frames
            left = F.glu(c.pw1.bias.detach().float(), dim=0)  # (C,)
            blk["left_context"] = left.to(self.dtype)[:, None].expand(-1, c.kernel_size - 1)
        blk["causal"] = c.causal
        return blk

    def _pos_proj(self, blk: dict, pe: torch.Tensor) -> torch.Tensor:
        """linear_pos(pe) depends on the length only: computed once per length and kept, so a
        captured graph reads it as a constant instead of recomputing it every replay."""
        cache = blk.setdefault("pos_proj", {})
        p = cache.get(pe.shape[0])
        if p is None:
            p = F.linear(pe, blk["pos_w"])
            cache[pe.shape[0]] = p
        return p

    def _ffn_hidden(self, y, w1, b1):
        """y (B, T, D) -> act(w1 y + b1), (B, T, H) compute dtype."""
        if self.triton_ffn:
            return linear_act(y, w1, b1, self.act_name)
        return self.act(F.linear(y, w1, b1))

    @staticmethod
    def _row_epilogue_fits(x: torch.Tensor) -> bool:
        """Whether residual x (B, T, D) can be updated by a kernel owning whole rows (an
        add + LayerNorm epilogue): D <= 256, contiguous float32."""
        return x.shape[-1] <= ADD_LN_MAX_D and x.dtype == torch.float32 and x.is_contiguous()

    def _fuse_add_ln(self, x: torch.Tensor) -> bool:
        """Whether the GEMM -> add + LayerNorm sites run as one kernel for residual x."""
        return self.triton_add_ln and self._row_epilogue_fits(x)

    def _fuse_ffn(self, x: torch.Tensor) -> bool:
        """Whether an FFN -> residual add + LayerNorm site runs as one kernel for residual x
        (B, T, D) (see ``fused_ffn`` in the class doc)."""
        if not (self.fused_ffn and self._row_epilogue_fits(x) and triton_importable()):
            return False
        if not x.is_cuda:
            return interpreting()
        return x.numel() // x.shape[-1] >= FUSED_FFN_ROWS_PER_SM * sm_count(x.device)

    def _ffn_add_ln(self, y, w1, b1, w2, b2, x, n, scale, y_dtype=None):
        """FFN on y (B, T, D): residual ``x + scale * (w2 act(w1 y + b1) + b2)`` and its
        LayerNorm ``n`` -> (x, y in y_dtype, default the compute dtype); one kernel that updates
        x in place when :meth:`_fuse_ffn`, else the hidden (B, T, H) then :meth:`_linear_add_ln`."""
        if self._fuse_ffn(x):
            return ffn_add_layer_norm(
                y, w1, b1, w2, x, n.weight, n.bias, n.eps, b2=b2, scale=scale,
                activation=self.act_name, y_dtype=y_dtype or self.dtype,
            )  # fmt: skip
        z = self._ffn_hidden(y, w1, b1)
        return self._linear_add_ln(z, w2, x, n, b2, scale, y_dtype=y_dtype)

    def _linear_add_ln(self, z, w, x, n, bias, scale=1.0, y_dtype=None, triton=False):
        """z (B, T, K) @ w^T (D, K): residual ``x + scale * (z w^T + bias)`` and its
        LayerNorm ``n`` -> (x (B, T, D), y (B, T, D) in y_dtype, default the compute dtype).
        The fused kernel updates x in place; the unfused path allocates a new x."""
        if self._fuse_add_ln(x):
            return linear_add_layer_norm(
                z, w, x, n.weight, n.bias, n.eps, bias=bias, scale=scale, y_dtype=y_dtype
            )
        branch = self._branch(z, w, triton)
        return add_layer_norm(
            branch, x, n.weight, n.bias, n.eps, x_bias=bias, scale=scale,
            y_dtype=y_dtype or self.dtype,
        )  # fmt: skip

    def _branch(self, z, w, triton=False):
        """z @ w^T, a residual branch without its bias: float32 from the accumulator when
        :meth:`_branches_in_residual_dtype`, else in the compute dtype; ``triton``: on
        ``linear_act`` instead of cuBLAS (``triton_linear``)."""
        fp32 = self._branches_in_residual_dtype()
        if triton:
            return linear_act(z, w, None, "identity", out_dtype=torch.float32 if fp32 else None)
        return linear_fp32_out(z, w) if fp32 else F.linear(z, w)

    def _second_ffn_add_ln(self, x, y, blk, ff_context, nxt):
        """Second FFN of the block on norm_ff's output y (B, T', D), residual add (scale 0.5) and
        norm_final -> (norm_final's output (B, T', D) in the residual dtype: the next block's
        stream; its LayerNorm ``nxt`` = (norm, dtype), see :meth:`_add_final_norm`).
        ff_context: the encoder's side input (unused by the dense FFN)."""
        w1, b1, w2, b2 = blk["ff_w1"], blk["ff_b1"], blk["ff_w2"], blk["ff_b2"]
        if self._fuse_ffn(x) or self._fuse_add_ln(x):  # norm_final in the fused epilogue
            n = blk["norm_final"]
            x = self._ffn_add_ln(y, w1, b1, w2, b2, x, n, 0.5, y_dtype=self.residual_dtype)[1]
            n, dtype = nxt
            return x, layer_norm(x, n.weight, n.bias, n.eps, y_dtype=dtype)
        f = self._branch(self._ffn_hidden(y, w1, b1), w2)
        return self._add_final_norm(f, x, blk, nxt, b2)

    def _add_final_norm(self, f, x, blk, nxt, f_bias=None):
        """(s, y): ``s = norm_final(x + 0.5 * (f + f_bias))`` in the residual dtype (the next
        block's stream) and ``y = n(s)`` in ``dtype`` for ``nxt = (n, dtype)`` (the next block's
        macaron norm, or the encoder's final norm), one kernel; f (B, T', D) the FFN output (a
        subclass's too)."""
        n1, (n2, dtype) = blk["norm_final"], nxt
        return add_double_layer_norm(
            f, x, (n1.weight, n1.bias, n1.eps), (n2.weight, n2.bias, n2.eps),
            x_bias=f_bias, scale=0.5, y_dtype=dtype,
        )  # fmt: skip

    def _block(self, x, y, blk, lengths, chunk, left, pe, nxt, ff_context=None):
        """One block on its stream x (B, T', D) and LN_mac(x) y -> (the block's output, its
        LayerNorm ``nxt`` = (norm, dtype))."""
        b, t, d = x.shape
        h, dk = self.n_head, d // self.n_head
        w1, b1, w2, b2 = blk["mac_w1"], blk["mac_b1"], blk["mac_w2"], blk["mac_b2"]
        x, y = self._ffn_add_ln(y, w1, b1, w2, b2, x, blk["norm_attn"], 0.5)
        if self.triton_linear:
            qkv = linear_act(y, blk["qkv_w"], blk["qkv_b"], "identity")
        else:
            qkv = F.linear(y, blk["qkv_w"], blk["qkv_b"])
        qkv = qkv.view(b, t, 3, h, dk)
        p = self._pos_proj(blk, pe).view(t, h, dk)
        att = rel_pos_attention(
            qkv[:, :, 0],
            qkv[:, :, 1],
            qkv[:, :, 2],
            p,
            blk["u"],
            blk["v"],
            lengths,
            chunk_size=chunk,
            num_left_chunks=left,
            tf32_dots=self.tf32_attention,
        )
        att = att.view(b, t, d)
        tri = self.triton_linear
        x, y = self._linear_add_ln(att, blk["out_w"], x, blk["norm_conv"], blk["out_b"], triton=tri)
        if self.triton_glu:  # (B, T, C) GLU output from the GEMM's epilogue
            x2 = linear_act(y, blk["pw1_wi"], blk["pw1_bi"], "glu")
        else:  # (B, T, 2C) values and gates
            x2 = F.linear(y, blk["pw1_w"], blk["pw1_b"])
        cache = None
        if blk["causal"]:
            cache = blk["left_context"].unsqueeze(0).expand(b, -1, -1)
        conv_kw = {}
        if blk["conv_norm"] == "layer":
            ln = blk["conv_ln"]
            conv_kw = dict(
                ln_weight=ln.weight.to(self.dtype), ln_bias=ln.bias.to(self.dtype), ln_eps=ln.eps
            )
        g = glu_depthwise_conv(
            x2,
            blk["dw_w"],
            blk["dw_b"],
            lengths,
            causal=blk["causal"],
            norm=blk["conv_norm"],
            activation=self.act_name,
            pad_mode=self.pad_mode,
            cache=cache,
            glu=not self.triton_glu,
            **conv_kw,
        )
        x, y = self._linear_add_ln(g, blk["pw2_w"], x, blk["norm_ff"], blk["pw2_b"], triton=tri)
        return self._second_ffn_add_ln(x, y, blk, ff_context, nxt)

    def _side_stream(self, feats: torch.Tensor) -> torch.cuda.Stream | None:
        """The stream for work beside the conv front (``SIDE_STREAM_LENGTHS``), one per encoder
        and device, made at the first CUDA forward; None on CPU or when switched off."""
        if not (SIDE_STREAM_LENGTHS and feats.is_cuda):
            return None
        streams = self.__dict__.setdefault("_side_streams", {})
        if feats.device not in streams:
            streams[feats.device] = torch.cuda.Stream(feats.device)
        return streams[feats.device]

    @torch.inference_mode()
    def forward(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        chunk_size: int = 0,
        num_left_chunks: int = -1,
        ff_context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, F) float32 raw fbank, lengths (B,) -> (B, T', D) float32, (B,) lengths.

        chunk_size/num_left_chunks: the chunk mask to apply (0 = full attention), as returned by
        :meth:`Encoder.chunk_config`. ff_context (B, T', C): side input of every block's second
        FFN (see :meth:`_second_ffn_add_ln`).
        """
        side = self._side_stream(feats)
        if side is None:
            out_lengths = self.subsampling.output_lengths(lengths)
        else:  # the length arithmetic runs beside the conv front
            # Memory allocated on the side stream is safe to use on the main stream: every
            # forward orders the side stream after all earlier main-stream work before it
            # allocates there, so a freed block cannot be reused while main still reads it.
            main = torch.cuda.current_stream(feats.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                out_lengths = self.subsampling.output_lengths(lengths)
        x = self._embed(feats)  # (B, T', D)
        if side is not None:
            main.wait_stream(side)
        pe = positions(0, x.shape[1], self.d, x.device, self.dtype)  # cached table, a view
        n = self.blocks[0]["norm_mac"]
        if x.dtype != self.residual_dtype:  # the residual stream is float32: widened as normalised
            x, y = widen_layer_norm(
                x, n.weight, n.bias, n.eps, dtype=self.residual_dtype, y_dtype=self.dtype
            )
        else:
            y = layer_norm(x, n.weight, n.bias, n.eps, y_dtype=self.dtype)
        # each block also normalises its output for the next (the last: the final norm)
        nexts = [(blk["norm_mac"], self.dtype) for blk in self.blocks[1:]]
        for blk, nxt in zip(self.blocks, [*nexts, (self.final_norm, torch.float32)]):
            x, y = self._block(
                x, y, blk, out_lengths, chunk_size, num_left_chunks, pe, nxt, ff_context
            )
        return y, out_lengths  # the final norm's output


class FusedDecoder:
    """Fused-kernel teacher-forced decoder for attention rescoring (one direction)."""

    def __init__(self, dec, precision: Precision):
        self.dtype = precision.compute
        self.d = dec.d
        self.n_head = dec.layers[0].self_attn.n_head
        self.act = _ACT[dec.layers[0].ff.act.__class__.__name__.lower().replace("silu", "swish")]
        w = lambda t: t.detach().to(self.dtype).contiguous()  # noqa: E731
        self.embed = w(dec.embed.weight)
        self.final_norm = _norm(dec.final_norm)
        self.out_w, self.out_b = w(dec.out.weight), w(dec.out.bias)
        self.layers = []
        for layer in dec.layers:
            s, c = layer.self_attn, layer.cross_attn
            self.layers.append(
                {
                    "norm1": _norm(layer.norm1),
                    "norm2": _norm(layer.norm2),
                    "norm3": _norm(layer.norm3),
                    "qkv_w": w(torch.cat([s.q.weight, s.k.weight, s.v.weight])),
                    "qkv_b": w(torch.cat([s.q.bias, s.k.bias, s.v.bias])),
                    "so_w": w(s.out.weight),
                    "so_b": w(s.out.bias),
                    "cq_w": w(c.q.weight),
                    "cq_b": w(c.q.bias),
                    "ckv_w": w(torch.cat([c.k.weight, c.v.weight])),
                    "ckv_b": w(torch.cat([c.k.bias, c.v.bias])),
                    "co_w": w(c.out.weight),
                    "co_b": w(c.out.bias),
                    "w1": w(layer.ff.w1.weight),
                    "b1": w(layer.ff.w1.bias),
                    "w2": w(layer.ff.w2.weight),
                    "b2": w(layer.ff.w2.bias),
                }
            )

    def memory_kv(self, memory: torch.Tensor) -> list[torch.Tensor]:
        """Cross-attention K/V of every layer, once per utterance: (B, T, 2, H, Dk)."""
        b, t, d = memory.shape
        m = memory.to(self.dtype)
        return [
            F.linear(m, ly["ckv_w"], ly["ckv_b"]).view(b, t, 2, self.n_head, d // self.n_head)
            for ly in self.layers
        ]

    @torch.inference_mode()
    def forward(self, tokens, token_lengths, memory_kv, memory_lengths) -> torch.Tensor:
        """tokens (B, W, L), token_lengths (B, W) -> float32 log-probs (B, W, L, V)."""
        b, w, l = tokens.shape
        d, h = self.d, self.n_head
        dk = d // h
        x = F.embedding(tokens, self.embed).float() * math.sqrt(d)
        x = (x + positions(0, l, d, x.device, torch.float32)).view(b * w, l, d)  # (B*W, L, D)
        lens = token_lengths.reshape(b * w)
        ly0 = self.layers[0]
        y = layer_norm(x.to(self.dtype), ly0["norm1"].weight, ly0["norm1"].bias, ly0["norm1"].eps)
        for i, ly in enumerate(self.layers):
            qkv = F.linear(y, ly["qkv_w"], ly["qkv_b"]).view(b * w, l, 3, h, dk)
            a = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], lens, causal=True)
            a = F.linear(a.view(b * w, l, d), ly["so_w"])
            n = ly["norm2"]
            x, y = add_layer_norm(a, x, n.weight, n.bias, n.eps, x_bias=ly["so_b"])
            # Cross-attention: the W hypotheses of an utterance share its keys.
            q = F.linear(y, ly["cq_w"], ly["cq_b"]).view(b, w * l, h, dk)
            kv = memory_kv[i]
            c = attention(q, kv[:, :, 0], kv[:, :, 1], memory_lengths)
            c = F.linear(c.view(b * w, l, d), ly["co_w"])
            n = ly["norm3"]
            x, y = add_layer_norm(c, x, n.weight, n.bias, n.eps, x_bias=ly["co_b"])
            f = F.linear(self.act(F.linear(y, ly["w1"], ly["b1"])), ly["w2"])
            n = self.layers[i + 1]["norm1"] if i + 1 < len(self.layers) else self.final_norm
            x, y = add_layer_norm(f, x, n.weight, n.bias, n.eps, x_bias=ly["b2"])
        logp = linear_log_softmax(y.reshape(b * w * l, d), self.out_w, self.out_b)
        return logp.view(b, w, l, -1)
