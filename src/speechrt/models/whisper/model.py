"""The Whisper network: audio encoder and text decoder with static, preallocated caches.

Decoding runs in three calls, all free of host syncs (graph-safe once caches exist):

* ``set_audio(features)`` computes every layer's cross-attention K/V ONCE per audio window
  (int8 with per-position scales when ``WhisperNet.cross_kv_int8``);
* ``prefill(tokens)`` runs the initial tokens and writes the self-attention cache [0, T);
* ``step(tokens, positions)`` runs one token per row at ``positions`` and writes the cache there.

Batch rows are grouped by audio: row ``b`` belongs to audio ``b // group`` (beams or samples of
one audio are adjacent), so cross-attention folds a group into the query axis instead of copying
the audio K/V per beam. LayerNorm runs in FP32 whatever the weight dtype.

Two paths compute the same network. The torch path (CPU, or ``kernels=False``) uses
``F.layer_norm`` and ``scaled_dot_product_attention`` with a ``(B, 1, 1, kv_len)`` mask in steps.
The kernel path (CUDA by default, ``kernels=True`` forces it, e.g. under ``TRITON_INTERPRET=1``)
keeps the residual stream in FP32 and fuses each residual add with the next LayerNorm
(``kernels.layer_norm``), projects q/k/v with one GEMM, and in steps attends with
``kernels.decode_attention``: self-attention writes the new key/value and reads exactly
``positions + 1`` cache entries (``kv_len`` is then irrelevant), cross-attention reads the audio's
K/V once per group of rows. A kernel-path step of one or two rows (``TextDecoder.skinny_step``)
launches 8-9 kernels per layer instead: its GEMMs are ``kernels.skinny_linear`` calls that take
the LayerNorm in their prologue and the residual add in their epilogue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechrt.errors import AudioError, UnsupportedOptionError
from speechrt.kernels._utils import cdiv, triton_importable
from speechrt.models.whisper.config import WhisperDims
from speechrt.models.whisper.stacked import PersistentStep


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in FP32, returned in the input dtype."""

    def forward(self, x: Tensor) -> Tensor:  # (..., D)
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def _norm_fused(x: Tensor, norm: LayerNorm, dtype: torch.dtype) -> Tensor:
    """LayerNorm kernel: FP32 statistics of x (..., D), output in ``dtype``."""
    from speechrt.kernels.layer_norm import layer_norm

    return layer_norm(x, norm.weight, norm.bias, norm.eps, y_dtype=dtype)


def _add_norm_fused(branch: Tensor, residual: Tensor, norm: LayerNorm) -> tuple[Tensor, Tensor]:
    """residual (..., D) += branch (..., D), summed in float32 and stored in residual's dtype;
    returns (residual, LayerNorm(residual) in branch's dtype) from one kernel (the residual is
    updated in place)."""
    from speechrt.kernels.layer_norm import add_layer_norm

    return add_layer_norm(branch, residual, norm.weight, norm.bias, norm.eps, h_out=residual)


def quantize_int8(weight: Tensor, bias: Tensor | None) -> dict[str, Tensor]:
    """``skinny_linear`` keywords of an int8 weight-only copy of ``weight`` (N, K): symmetric
    per-output-channel scales max|w| / 127 (float32); the bias stays in the activation dtype
    (zeros when None: the int8 kernel takes its dtype from it)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return {"weight": q, "bias": bias.detach(), "weight_scale": scale}


def _ln(norm: LayerNorm) -> tuple[Tensor, Tensor, float]:
    """(weight, bias, eps) of a LayerNorm, for a ``skinny_linear`` prologue."""
    return norm.weight, norm.bias, norm.eps


def _folded(
    cache: dict[str, tuple[tuple, tuple[Tensor, Tensor]]],
    name: str,
    weight: Tensor,
    bias: Tensor | None,
    norm: LayerNorm,
) -> tuple[Tensor, Tensor]:
    """``skinny_split.fold_layer_norm`` of (weight, bias, norm), kept in ``cache[name]`` until
    one of the four tensors is replaced or written (its data pointer or version changes; an
    inference tensor has no version: created in inference mode, it is not written after)."""
    from speechrt.kernels.skinny_split import fold_layer_norm

    def ident(t: Tensor | None) -> tuple | None:
        if t is None:
            return None
        return t.data_ptr(), t.dtype, 0 if t.is_inference() else t._version

    key = tuple(ident(t) for t in (weight, bias, norm.weight, norm.bias))
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, fold_layer_norm(weight, bias, norm.weight, norm.bias))
    return hit[1]


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Sinusoidal positions, (length, channels): sin over the first half, cos over the second."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))  # (C/2,)
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]  # (length, C/2)
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class FeedForward(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        return self.fc2(F.gelu(self.fc1(x)))

    @staticmethod
    def cublaslt_applies(x: Tensor) -> bool:
        """Whether fc1 can run through cuBLASLt's bias + GELU epilogue: float16/bfloat16 on
        CUDA."""
        return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)

    def forward_fused(self, x: Tensor, cublaslt: bool = False) -> Tensor:  # (B, T, D)
        """Kernel path: GELU in fc1's GEMM epilogue (one write of the (B, T, 4D) hidden).

        ``cublaslt`` (only where :meth:`cublaslt_applies`): fc1 through cuBLASLt with its bias +
        GELU epilogue (``torch._addmm_activation``), whose GELU is the tanh form: it differs
        from the exact GELU by at most 4.7e-4 (near x = 2.7), under half of float16's rounding
        step there (2^-9); otherwise the Triton kernel with the exact GELU."""
        if cublaslt:
            h = torch._addmm_activation(
                self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), use_gelu=True
            )
            return self.fc2(h.view(*x.shape[:-1], h.shape[-1]))
        from speechrt.kernels.linear_act import linear_act

        return self.fc2(linear_act(x, self.fc1.weight, self.fc1.bias, "gelu"))


class Attention(nn.Module):
    """Projections of multi-head attention (the key projection has no bias)."""

    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim)
        self.wo = nn.Linear(dim, dim)
        self._packed: tuple[Tensor, Tensor] | None = None

    def packed_qkv(self) -> tuple[Tensor, Tensor]:
        """(3D, D) weight and (3D,) bias projecting q, k, v in one GEMM (k's bias is 0).

        The first call re-points wq/wk/wv's parameters to views of the packed tensors (no copy
        kept); it packs again if they were replaced since (e.g. by ``.to()``)."""
        if self._packed is None or not self._packed_views_alive():
            self._packed = self._pack()
        return self._packed

    def _packed_views_alive(self) -> bool:
        w, b = self._packed
        d, size = self.wq.weight.shape[0], w.element_size()
        ptrs = (self.wq.weight, self.wk.weight, self.wv.weight, self.wq.bias, self.wv.bias)
        want = (0, d * d, 2 * d * d, 0, 2 * d)
        bases = (w, w, w, b, b)
        return all(
            p.dtype == base.dtype and p.data_ptr() == base.data_ptr() + off * size
            for p, base, off in zip(ptrs, bases, want)
        )

    def _pack(self) -> tuple[Tensor, Tensor]:
        d = self.wq.weight.shape[0]
        with torch.inference_mode(False), torch.no_grad():
            w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])  # (3D, D)
            zeros = torch.zeros_like(self.wq.bias)
            b = torch.cat([self.wq.bias, zeros, self.wv.bias])  # (3D,)
            for i, lin in enumerate((self.wq, self.wk, self.wv)):
                grad = lin.weight.requires_grad
                lin.weight = nn.Parameter(w[i * d : (i + 1) * d], requires_grad=grad)
            for i, lin in ((0, self.wq), (2, self.wv)):
                grad = lin.bias.requires_grad
                lin.bias = nn.Parameter(b[i * d : (i + 1) * d], requires_grad=grad)
        return w, b

    def heads(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, H, T, D/H) (a view)."""
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, -1).permute(0, 2, 1, 3)

    def merge(self, x: Tensor) -> Tensor:
        """(B, H, T, D/H) -> output projection of (B, T, D)."""
        return self.wo(x.permute(0, 2, 1, 3).flatten(start_dim=2))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: self-attention then feed-forward."""

    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.attn_norm = LayerNorm(dim)
        self.attn = Attention(dim, n_head)
        self.ffn_norm = LayerNorm(dim)
        self.ffn = FeedForward(dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        x = x + self.attend(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))

    def attend(self, h: Tensor, packed: bool = False) -> Tensor:
        """Self-attention of normalised h (B, T, D) -> (B, T, D) (output projection included);
        ``packed``: q, k, v from one GEMM over the packed (3D, D) projection."""
        a = self.attn
        if packed:
            q, k, v = F.linear(h, *a.packed_qkv()).split(h.shape[-1], dim=-1)
        else:
            q, k, v = a.wq(h), a.wk(h), a.wv(h)
        return a.merge(F.scaled_dot_product_attention(a.heads(q), a.heads(k), a.heads(v)))

    def forward_fused(
        self, x: Tensor, h: Tensor, next_norm: LayerNorm, options: EncoderOptions
    ) -> tuple[Tensor, Tensor]:
        """Kernel path: residual x (B, T, D) and h = attn_norm(x) -> (x', next_norm(x'))."""
        branch = self.attend(h, packed=options.packed_qkv)
        x, h = _add_norm_fused(branch, x, self.ffn_norm)
        lt = options.fc1_cublaslt and self.ffn.cublaslt_applies(h)
        if lt or options.fc1_epilogue:
            branch = self.ffn.forward_fused(h, cublaslt=lt)
        else:
            branch = self.ffn(h)
        return _add_norm_fused(branch, x, next_norm)


@dataclass
class EncoderOptions:
    """Switches of the encoder's kernel path (benchmarks compare them in one run).

    ``packed_qkv``: q, k, v from one GEMM; ``fc1_epilogue``: GELU in fc1's GEMM epilogue
    (:func:`~speechrt.kernels.linear_act.linear_act`) instead of cuBLAS + a GELU kernel;
    ``fc1_cublaslt``: in float16/bfloat16 on CUDA, fc1 with bias + GELU (tanh form) in cuBLASLt's
    epilogue instead (takes precedence over ``fc1_epilogue`` where it applies, which decides
    elsewhere; large-v3 16 x 30 s on the H200:
    76.4 vs 80.5 ms, BENCHMARKS.md session 12); ``residual_fp32``: the residual stream in
    float32 (default) or, off, in the compute dtype as openai-whisper keeps it in float16 --
    half the bytes of the 2 x 32 + 1 add + LayerNorm kernels (about 1.9 of large-v3's 5.9 ms
    at 16 x 30 s, session 12's profile) for float16's rounding of the stream at every layer."""

    packed_qkv: bool = True
    fc1_epilogue: bool = True
    fc1_cublaslt: bool = True
    residual_fp32: bool = True


class AudioEncoder(nn.Module):
    """Two conv1d + GELU (the second with stride 2), sinusoid positions, pre-LN blocks, LN."""

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        d = dims.n_audio_state
        self.n_ctx = dims.n_audio_ctx
        self.conv1 = nn.Conv1d(dims.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("pos_emb", sinusoids(dims.n_audio_ctx, d))
        self.layers = nn.ModuleList(
            EncoderLayer(d, dims.n_audio_head) for _ in range(dims.n_audio_layer)
        )
        self.norm = LayerNorm(d)
        self.options = EncoderOptions()

    def forward(self, mel: Tensor, fused: bool = False) -> Tensor:
        """mel: (B, n_mels, 2 * n_audio_ctx) -> audio features (B, n_audio_ctx, n_audio_state);
        ``fused``: the kernel path (fused add + LayerNorm; FP32 residual unless
        ``options.residual_fp32`` is off)."""
        if mel.ndim != 3 or mel.shape[-1] != 2 * self.n_ctx:
            raise AudioError(
                f"encoder expects (B, n_mels, {2 * self.n_ctx}) mel, got {tuple(mel.shape)}"
            )
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x))
        x = x.permute(0, 2, 1)  # (B, T, D)
        x = (x + self.pos_emb).to(x.dtype)
        if fused:
            return self._layers_fused(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def _layers_fused(self, x: Tensor) -> Tensor:
        """Blocks and final LN with an FP32 residual stream (or x's dtype, ``residual_fp32``
        off); (B, T, D) -> (B, T, D) x.dtype."""
        dtype = x.dtype
        x = x.float() if self.options.residual_fp32 else x
        x = x.contiguous()  # (B, T, D) residual stream, updated in place
        h = _norm_fused(x, self.layers[0].attn_norm, dtype)
        norms = [layer.attn_norm for layer in self.layers[1:]] + [self.norm]
        for layer, next_norm in zip(self.layers, norms):
            x, h = layer.forward_fused(x, h, next_norm, self.options)
        return h


class KVCache(nn.Module):
    """Static key/value buffers, (max_batch, H, max_len, D/H) each (views of the decoder's
    stacked caches, see :meth:`WhisperNet.setup_caches`); ``counters``: the zeroed int32
    workspace of decode attention's in-kernel combine (cross-attention caches); ``k_scale``,
    ``v_scale``: float32 (max_batch, H, max_len) scales of int8 k, v (``quantize_kv``), None
    for float caches."""

    def __init__(
        self,
        k: Tensor,
        v: Tensor,
        counters: Tensor | None = None,
        k_scale: Tensor | None = None,
        v_scale: Tensor | None = None,
    ):
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.register_buffer("counters", counters, persistent=False)
        self.register_buffer("k_scale", k_scale, persistent=False)
        self.register_buffer("v_scale", v_scale, persistent=False)

    @property
    def quantized(self) -> bool:
        """True for int8 k, v with scales."""
        return self.k_scale is not None

    def write(self, k: Tensor, v: Tensor) -> None:
        """Rows [0, A) <- k, v (A, H, L, D/H) float (quantised when the cache is int8)."""
        n = k.shape[0]
        if not self.quantized:
            self.k[:n].copy_(k)
            self.v[:n].copy_(v)
            return
        from speechrt.kernels.decode_attention import quantize_kv

        quantize_kv(k, out=(self.k[:n], self.k_scale[:n]))
        quantize_kv(v, out=(self.v[:n], self.v_scale[:n]))

    def read(self, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """k, v of rows [0, n), (n, H, L, D/H) each: views of a float cache, or an int8 one
        dequantized to ``dtype`` (new tensors: for prefill and the torch path, not the steps)."""
        if not self.quantized:
            return self.k[:n], self.v[:n]
        from speechrt.kernels.decode_attention import dequantize_kv

        return (
            dequantize_kv(self.k[:n], self.k_scale[:n], dtype),
            dequantize_kv(self.v[:n], self.v_scale[:n], dtype),
        )

    def scales(self, n: int) -> dict[str, Tensor]:
        """``decode_attention`` keywords of rows [0, n): their k_scale, v_scale (int8 caches)."""
        if not self.quantized:
            return {}
        return {"k_scale": self.k_scale[:n], "v_scale": self.v_scale[:n]}


@dataclass
class _Pass:
    """How a decoder pass reads its context.

    kind: "full" (no cache; ``audio`` given), "prefill" (write [0, T)) or "step" (write at
    ``positions`` (B,); the torch path attends under ``mask`` (B, 1, 1, L), the kernel path to
    ``lengths`` = positions + 1 entries); ``n_audio``: audios (cross-attention rows) the batch
    is grouped into (default: those set); ``fused``: the kernel path; ``cross_qk`` collects
    pre-softmax cross-attention scores per layer in "full" passes when not None.
    """

    kind: str
    audio: Tensor | None = None
    positions: Tensor | None = None
    mask: Tensor | None = None
    lengths: Tensor | None = None
    n_audio: int | None = None
    fused: bool = False
    cross_qk: list[Tensor] | None = None


class DecoderLayer(nn.Module):
    """Pre-LN block: causal self-attention (cached), cross-attention (cached), feed-forward."""

    # decode steps combine cross-attention's split partials inside the attention kernel (a class
    # attribute: benchmarks turn it off to compare with the two-kernel combine)
    combine_in_kernel = True

    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.self_attn_norm = LayerNorm(dim)
        self.self_attn = Attention(dim, n_head)
        self.cross_attn_norm = LayerNorm(dim)
        self.cross_attn = Attention(dim, n_head)
        self.ffn_norm = LayerNorm(dim)
        self.ffn = FeedForward(dim)
        self.cache: KVCache | None = None
        self.cross_cache: KVCache | None = None
        self.n_audio = 0
        self.int8: dict[str, dict[str, Tensor]] | None = None  # quantize_step_int8
        self._folds: dict[str, tuple[tuple, tuple[Tensor, Tensor]]] = {}  # _fold

    def forward(self, x: Tensor, p: _Pass) -> Tensor:  # (B, T, D)
        x = x + self._self_attend(self.self_attn_norm(x), p)
        x = x + self._cross_attend(self.cross_attn_norm(x), p)
        return x + self.ffn(self.ffn_norm(x))

    def forward_fused(
        self, x: Tensor, h: Tensor, p: _Pass, next_norm: LayerNorm
    ) -> tuple[Tensor, Tensor]:
        """Kernel path: FP32 residual x (B, T, D), h = self_attn_norm(x) -> (x', next_norm(x'))."""
        x, h = _add_norm_fused(self._self_attend(h, p), x, self.cross_attn_norm)
        x, h = _add_norm_fused(self._cross_attend(h, p), x, self.ffn_norm)
        return _add_norm_fused(self.ffn(h), x, next_norm)

    def step_fused(
        self, x: Tensor, p: _Pass, fold: bool = False, counters: Tensor | None = None
    ) -> None:
        """Kernel-path step, 8 launches: FP32 residual x (B, 1, D) updated in place.

        Each LayerNorm runs in the prologue of the GEMM that reads it, each residual add in the
        epilogue of the GEMM that produces it (``kernels.skinny_linear``); the self-attention
        kernel writes the new k/v at ``positions`` and reads ``lengths`` cache entries.
        ``fold``, ``counters``: the GEMMs take the split-K kernel (many rows,
        ``skinny_linear.MANY_ROWS``), which folds each LayerNorm through the GEMM (the folds
        are cached here) and shares the zeroed ``counters`` (:meth:`TextDecoder.split_counters`)."""
        from speechrt.kernels.decode_attention import decode_attention
        from speechrt.kernels.skinny_linear import skinny_linear

        a, c = self.self_attn, self.cross_attn
        b, _, d = x.shape
        w = self._step_weights()
        split = {} if counters is None else {"counters": counters}
        ln = {}  # LayerNorm prologue keywords per GEMM (with the split-K kernel's fold)
        for name, norm in (
            ("qkv", self.self_attn_norm), ("cross_wq", self.cross_attn_norm), ("fc1", self.ffn_norm)
        ):  # fmt: skip
            ln[name] = {"ln": _ln(norm)}
            if fold:
                ln[name]["ln_fold"] = self._fold(name, norm)
        rows = x.view(b, d)  # (B, D) FP32 residual stream
        qkv = skinny_linear(rows, **w["qkv"], **ln["qkv"], **split)  # (B, 3D)
        q, k, v = (t.view(b, a.n_head, -1) for t in qkv.split(d, dim=-1))  # (B, H, Dh) each
        ck, cv = self.cache.k[:b], self.cache.v[:b]  # (B, H, L, Dh)
        out = decode_attention(q, ck, cv, p.lengths, k_new=k, v_new=v, num_splits=1)
        skinny_linear(out.view(b, d), **w["wo"], residual=rows, **split)
        q = skinny_linear(rows, **w["cross_wq"], **ln["cross_wq"], **split)
        n = p.n_audio or self.n_audio
        out = self._cross_attend_step(q.view(b, c.n_head, -1), n)
        skinny_linear(out.view(b, d), **w["cross_wo"], residual=rows, **split)
        hid = skinny_linear(rows, **w["fc1"], **ln["fc1"], activation="gelu", **split)  # (B, 4D)
        skinny_linear(hid, **w["fc2"], residual=rows, **split)

    def _fold(self, name: str, norm: LayerNorm) -> tuple[Tensor, Tensor]:
        """The LayerNorm fold of step GEMM ``name`` (float weights), cached on the layer."""
        kw = self._step_weights()[name]
        return _folded(self._folds, name, kw["weight"], kw["bias"], norm)

    def _step_weights(self) -> dict[str, dict[str, Tensor]]:
        """``skinny_linear`` weight keywords per step GEMM: the int8 copies when quantised."""
        if self.int8 is not None:
            return self.int8
        a, c, f = self.self_attn, self.cross_attn, self.ffn
        pairs = {
            "qkv": a.packed_qkv(), "wo": (a.wo.weight, a.wo.bias),
            "cross_wq": (c.wq.weight, c.wq.bias), "cross_wo": (c.wo.weight, c.wo.bias),
            "fc1": (f.fc1.weight, f.fc1.bias), "fc2": (f.fc2.weight, f.fc2.bias),
        }  # fmt: skip
        return {name: {"weight": w, "bias": b} for name, (w, b) in pairs.items()}

    def quantize_step_int8(self) -> None:
        """Keep int8 copies (symmetric, per output channel) of the step GEMM weights; the
        float weights stay for prefill and wider steps."""
        self.int8 = None
        self.int8 = {name: quantize_int8(**kw) for name, kw in self._step_weights().items()}

    def _self_attend(self, h: Tensor, p: _Pass) -> Tensor:
        if p.fused and p.kind == "step":
            return self._self_attend_step_kernel(h, p)
        a = self.self_attn
        q, k, v = a.heads(a.wq(h)), a.heads(a.wk(h)), a.heads(a.wv(h))  # (B, H, T, Dh)
        b, t = h.shape[0], h.shape[1]
        if p.kind == "full":
            return a.merge(F.scaled_dot_product_attention(q, k, v, is_causal=t > 1))
        ck, cv = self.cache.k[:b], self.cache.v[:b]  # (B, H, L, Dh)
        if p.kind == "prefill":
            ck[:, :, :t].copy_(k)
            cv[:, :, :t].copy_(v)
            out = F.scaled_dot_product_attention(q, ck[:, :, :t], cv[:, :, :t], is_causal=t > 1)
            return a.merge(out)
        index = p.positions.view(b, 1, 1, 1).expand(b, a.n_head, 1, k.shape[-1])  # (B, H, 1, Dh)
        ck.scatter_(2, index, k)
        cv.scatter_(2, index, v)
        n = p.mask.shape[-1]
        out = F.scaled_dot_product_attention(q, ck[:, :, :n], cv[:, :, :n], attn_mask=p.mask)
        return a.merge(out)

    def _self_attend_step_kernel(self, h: Tensor, p: _Pass) -> Tensor:
        """One token per row (B, 1, D): fused q/k/v GEMM, then decode attention that writes
        k/v at ``positions`` and reads ``lengths`` cache entries."""
        from speechrt.kernels.decode_attention import decode_attention

        a = self.self_attn
        b, _, d = h.shape
        qkv = F.linear(h[:, 0], *a.packed_qkv())  # (B, 3D)
        q, k, v = (x.view(b, a.n_head, -1) for x in qkv.split(d, dim=-1))  # (B, H, Dh) each
        ck, cv = self.cache.k[:b], self.cache.v[:b]  # (B, H, L, Dh)
        # one split: a row reads at most n_text_ctx (448) entries, usually far fewer, so
        # splitting would mostly launch empty programs and a combine kernel
        out = decode_attention(q, ck, cv, p.lengths, k_new=k, v_new=v, num_splits=1)
        return a.wo(out.view(b, 1, d))  # out: (B, H, Dh)

    def _cross_attend(self, h: Tensor, p: _Pass) -> Tensor:
        a = self.cross_attn
        n = p.n_audio or self.n_audio
        if p.fused and p.kind == "step":
            b, _, d = h.shape
            q = a.wq(h[:, 0]).view(b, a.n_head, -1)  # (B, H, Dh)
            return a.wo(self._cross_attend_step(q, n).view(b, 1, d))
        if p.kind == "full":
            k, v = a.heads(a.wk(p.audio)), a.heads(a.wv(p.audio))  # (A, H, S, Dh)
        else:
            k, v = self.cross_cache.read(n, h.dtype)  # (A, H, S, Dh)
        b, t, d = h.shape
        n_audio = k.shape[0]
        q = a.heads(a.wq(h).reshape(n_audio, (b // n_audio) * t, d))  # (A, H, G*T, Dh)
        if p.cross_qk is not None:
            scale = (d // a.n_head) ** -0.25
            p.cross_qk.append(((q * scale) @ (k * scale).transpose(-1, -2)).float())
        out = F.scaled_dot_product_attention(q, k, v)  # (A, H, G*T, Dh)
        return a.merge(out).reshape(b, t, d)

    def _cross_attend_step(self, q: Tensor, n_audio: int) -> Tensor:
        """Decode attention of q (B, H, Dh) over the first ``n_audio`` cross caches (rows grouped
        by audio), the split partials combined in the kernel unless ``combine_in_kernel`` is
        off (then a second kernel)."""
        from speechrt.kernels.decode_attention import decode_attention

        c = self.cross_cache
        counters = c.counters if self.combine_in_kernel else None
        group = q.shape[0] // n_audio
        return decode_attention(q, c.k[:n_audio], c.v[:n_audio], None, group=group,
                                counters=counters, **c.scales(n_audio))  # fmt: skip

    def set_audio(self, audio: Tensor) -> None:
        """Compute and store cross-attention K/V of audio features (A, S, D) (int8 with
        per-(audio, head, position) scales when the cross cache is int8)."""
        a = self.cross_attn
        self.cross_cache.write(a.heads(a.wk(audio)), a.heads(a.wv(audio)))  # (A, H, S, Dh)
        self.n_audio = audio.shape[0]

    def reorder(self, source: Tensor, upto: int | None = None) -> None:
        """Self-attention cache rows <- rows ``source`` (B,) (beam search), positions [0, upto)."""
        b = source.shape[0]
        for buf in (self.cache.k, self.cache.v):
            rows = buf[:b, :, :upto]  # (B, H, upto, Dh)
            rows.copy_(rows.index_select(0, source))


# Steps of at most this many rows use the skinny step by default. H200, large-v3 FP16 step
# (bench/skinny_micro.py, session 5): 1.33 vs 2.14 ms at 1 row, 1.97 vs 2.23 at 2, but 3.33 vs
# 3.16 at 16 rows, where the whole-row GEMV gives way to the tl.dot kernel and cuBLAS wins.
SKINNY_AUTO_MAX_ROWS = 2


class TextDecoder(nn.Module):
    """Token + learned position embedding, cross-attending blocks, LN, tied output projection.

    ``skinny_step``: kernel-path steps run :meth:`DecoderLayer.step_fused` (8-9 launches per
    layer: ``kernels.skinny_linear`` with the LayerNorm prologue / residual epilogue around
    decode attention, programmatic dependent launch on Hopper) instead of the GEMM + fused
    add/LayerNorm flow of prefill. None (default): for steps of at most
    :data:`SKINNY_AUTO_MAX_ROWS` rows, where the whole-row GEMV kernel beats cuBLAS (H200,
    BENCHMARKS.md session 5); True/False force it. Set it before CUDA graphs are captured."""

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        d = dims.n_text_state
        self.n_ctx = dims.n_text_ctx
        self.tok_emb = nn.Embedding(dims.n_vocab, d)
        self.pos_emb = nn.Parameter(torch.empty(dims.n_text_ctx, d))
        self.layers = nn.ModuleList(
            DecoderLayer(d, dims.n_text_head) for _ in range(dims.n_text_layer)
        )
        self.norm = LayerNorm(d)
        self.skinny_step: bool | None = None
        self.persistent_step = False  # experimental: see uses_persistent
        self.persistent = PersistentStep(self)
        # (self k, self v, cross k, cross v): (L, B, H, T, Dh) and (L, A, H, S, Dh), whose
        # per-layer views are the layers' caches (set by WhisperNet.setup_caches; cross k, v
        # int8 with WhisperNet.cross_kv_int8, their scales then only in the layers' caches)
        self.stacked_caches: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self.int8_logits: dict[str, Tensor] | None = None  # quantize_step_int8
        self._split_counters: Tensor | None = None  # split_counters
        self._folds: dict[str, tuple[tuple, tuple[Tensor, Tensor]]] = {}  # the logits' fold

    def run(self, x: Tensor, p: _Pass, at: Tensor | None = None) -> Tensor:
        """Embedded tokens (B, T, D) -> logits (B, T, V) in FP32, or (B, K, V) of the
        positions ``at`` (K,) long only (gathered before the output projection)."""
        x = x.to(self.tok_emb.weight.dtype)
        if p.fused and p.kind == "step" and self._skinny(x.shape[0]):
            return self._step_fused(x, p)
        if p.fused:
            x = self._layers_fused(x, p)
        else:
            for layer in self.layers:
                x = layer(x, p)
            x = self.norm(x)
        if at is not None:
            x = x.index_select(1, at)  # (B, K, D)
        return (x @ torch.transpose(self.tok_emb.weight.to(x.dtype), 0, 1)).float()

    def uses_persistent(self, rows: int, n_audio: int, device: torch.device) -> bool:
        """Whether a kernel-path step of ``rows`` rows over ``n_audio`` audios runs the
        persistent one-launch kernel (``models.whisper.stacked``): only when
        ``persistent_step`` is True (experimental: slower than the skinny step on the H200,
        BENCHMARKS.md session 6), for 1-4 rows, one per audio; under the interpreter it runs
        phase by phase. Never over int8 cross caches (``WhisperNet.cross_kv_int8``)."""
        cross = self.layers[0].cross_cache
        if cross is not None and cross.quantized:
            return False
        return bool(self.persistent_step) and rows == n_audio and rows <= 4

    def _skinny(self, rows: int) -> bool:
        if self.skinny_step is None:
            return rows <= SKINNY_AUTO_MAX_ROWS
        return self.skinny_step

    def _layers_fused(self, x: Tensor, p: _Pass) -> Tensor:
        """Blocks and final LN with an FP32 residual stream; (B, T, D) -> (B, T, D) x.dtype."""
        dtype, x = x.dtype, x.float().contiguous()  # (B, T, D) FP32 residual, updated in place
        h = _norm_fused(x, self.layers[0].self_attn_norm, dtype)
        norms = [layer.self_attn_norm for layer in self.layers[1:]] + [self.norm]
        for layer, next_norm in zip(self.layers, norms):
            x, h = layer.forward_fused(x, h, p, next_norm)
        return h

    def _step_fused(self, x: Tensor, p: _Pass) -> Tensor:
        """Kernel-path step: embedded tokens (B, 1, D) -> logits (B, 1, V) FP32; the residual
        stream is the only state between layers, the final LayerNorm is the logits' prologue."""
        x = x.float().contiguous()  # (B, 1, D) FP32 residual, updated in place
        from speechrt.kernels.skinny_linear import default_config

        rows, d = x.shape[0], x.shape[-1]
        cfg = default_config(rows, d, d, x.device)  # the kernel kind of this step's GEMMs
        counters = self.split_counters(rows, x.device) if cfg.split else None
        for layer in self.layers:
            layer.step_fused(x, p, cfg.split, counters)
        return self.stream_logits(x, self.int8_logits, cfg.split, counters)

    def split_counters(self, rows: int, device: torch.device) -> Tensor:
        """The zeroed int32 workspace that every split-K GEMM of a ``rows``-row skinny step
        shares (they run one after another on one stream); allocated on first use (an eager
        call before any graph capture)."""
        d = self.pos_emb.shape[1]
        need = cdiv(rows, 16) * cdiv(max(self.tok_emb.weight.shape[0], 4 * d), 16)
        have = self._split_counters
        if have is None or have.numel() < need or have.device != device:
            self._split_counters = torch.zeros(need, dtype=torch.int32, device=device)
        return self._split_counters

    def stream_logits(
        self,
        x: Tensor,
        weights: dict[str, Tensor] | None = None,
        fold: bool = False,
        counters: Tensor | None = None,
    ) -> Tensor:
        """Final LayerNorm + tied output projection of the FP32 residual stream x (..., D) in
        one skinny GEMV -> logits (..., V) FP32; ``weights``: int8 keywords, else tok_emb;
        ``fold``, ``counters``: as in :meth:`DecoderLayer.step_fused`."""
        from speechrt.kernels.skinny_linear import skinny_linear

        extra = {}
        if weights is None:
            weights = {"weight": self.tok_emb.weight}
            if fold:
                extra["ln_fold"] = _folded(self._folds, "logits", self.tok_emb.weight, None,
                                           self.norm)  # fmt: skip
            if counters is not None:
                extra["counters"] = counters
        return skinny_linear(x, **weights, ln=_ln(self.norm), out_dtype=torch.float32, **extra)

    def quantize_step_int8(self) -> None:
        """Int8 weight-only copies of every GEMM of a skinny step (each layer's six and the
        tied output projection), used by the skinny steps from now on (capture graphs after);
        prefill and wider steps keep the float weights. Measured in BENCHMARKS.md."""
        if self.tok_emb.weight.dtype not in (torch.float16, torch.bfloat16):
            raise UnsupportedOptionError("int8 decode weights need a float16/bfloat16 model")
        for layer in self.layers:
            layer.quantize_step_int8()
        self.int8_logits = quantize_int8(self.tok_emb.weight, None)

    def embed(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """tokens (B, T) at positions [0, T), or (B, 1) at ``positions`` (B,) -> (B, T, D)."""
        if positions is None:
            return self.tok_emb(tokens) + self.pos_emb[: tokens.shape[-1]]
        return self.tok_emb(tokens) + self.pos_emb[positions][:, None]  # (B, 1, D)


class WhisperNet(nn.Module):
    """Encoder + decoder with ``setup_caches`` / ``set_audio`` / ``prefill`` / ``step``.

    ``alignment_heads`` (n_text_layer, n_text_head) bool marks the cross-attention heads used
    for word timestamps (default: every head of the second half of the layers).

    ``kernels``: None (default) takes the kernel path on CUDA when Triton is installed, True
    forces it (CPU only under ``TRITON_INTERPRET=1``), False keeps the torch path everywhere.
    ``cache_version`` changes whenever the caches are reallocated (captured graphs that read
    them are then stale).

    ``cross_kv_int8``: ``setup_caches`` allocates the cross-attention K/V as int8 with a float32
    scale per (audio, head, position) (``kernels.decode_attention.quantize_kv``): decode steps
    read half the bytes (about half of a batch-16 large-v3 step is that read); the
    self-attention caches keep the model dtype, and the persistent one-launch step is not used.
    Call ``setup_caches`` again after changing it (``ensure_caches`` does when it no longer
    matches the caches).
    """

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims)
        self.decoder = TextDecoder(dims)
        heads = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
        heads[dims.n_text_layer // 2 :] = True
        self.register_buffer("alignment_heads", heads, persistent=False)
        self.max_batch = 0
        self.max_audio = 0
        self.cache_version = 0
        self.kernels: bool | None = None
        self.cross_kv_int8 = False

    def uses_kernels(self, device: torch.device) -> bool:
        """Whether passes on ``device`` take the kernel path (see the class docstring)."""
        if self.kernels is None:
            return device.type == "cuda" and triton_importable()
        return self.kernels

    @property
    def cache_len(self) -> int:
        """Positions held by the self-attention caches (0 before ``setup_caches``)."""
        cache = self.decoder.layers[0].cache
        return 0 if cache is None else cache.k.shape[2]

    # --- encoder ------------------------------------------------------------------------
    def embed_audio(self, mel: Tensor) -> Tensor:
        """(B, n_mels, 2 * n_audio_ctx) -> (B, n_audio_ctx, n_audio_state)."""
        return self.encoder(mel, fused=self.uses_kernels(mel.device))

    # --- cached decoding ----------------------------------------------------------------
    def setup_caches(
        self, max_batch: int, max_len: int | None = None, max_audio: int | None = None
    ):
        """Allocate self-attention caches for ``max_batch`` rows of ``max_len`` tokens (default
        n_text_ctx) and cross-attention caches for ``max_audio`` audios (default max_batch),
        int8 with float32 scales when ``cross_kv_int8``."""
        dims, like = self.dims, self.decoder.tok_emb.weight
        max_len = max_len or dims.n_text_ctx
        max_audio = max_audio or max_batch
        head_dim = dims.n_text_state // dims.n_text_head
        n, h = dims.n_text_layer, dims.n_text_head
        opts = {"dtype": like.dtype, "device": like.device}
        self.decoder.stacked_caches = None  # the old ones are freed before the new ones exist
        self.decoder.persistent.forget_caches()
        for layer in self.decoder.layers:
            layer.cache = layer.cross_cache = None
        self_kv = [torch.zeros(n, max_batch, h, max_len, head_dim, **opts) for _ in range(2)]
        int8, cross = self.cross_kv_int8, (n, max_audio, h, dims.n_audio_ctx)  # (L, A, H, S)
        if int8:
            opts["dtype"] = torch.int8
            scales = [torch.ones(cross, device=like.device) for _ in range(2)]  # float32
        cross_kv = [torch.zeros(*cross, head_dim, **opts) for _ in range(2)]
        counters = torch.zeros(n, max_audio * h, dtype=torch.int32, device=like.device)
        for i, layer in enumerate(self.decoder.layers):
            layer.cache = KVCache(self_kv[0][i], self_kv[1][i])
            k_scale, v_scale = (scales[0][i], scales[1][i]) if int8 else (None, None)
            layer.cross_cache = KVCache(cross_kv[0][i], cross_kv[1][i], counters[i], k_scale,
                                        v_scale)  # fmt: skip
        self.decoder.stacked_caches = (*self_kv, *cross_kv)
        self.max_batch, self.max_audio = max_batch, max_audio
        self.cache_version += 1

    def ensure_caches(self, batch: int, n_audio: int, max_len: int | None = None) -> None:
        """(Re)allocate caches if they hold fewer than ``batch`` rows, ``n_audio`` audios or
        ``max_len`` positions (default n_text_ctx), or ``cross_kv_int8`` changed since."""
        max_len = max_len or self.dims.n_text_ctx
        cross = self.decoder.layers[0].cross_cache
        stale = cross is not None and cross.quantized != self.cross_kv_int8
        if stale or batch > self.max_batch or n_audio > self.max_audio or max_len > self.cache_len:
            self.setup_caches(
                max(batch, self.max_batch), max(max_len, self.cache_len),
                max(n_audio, self.max_audio),
            )  # fmt: skip

    def set_audio(self, audio_features: Tensor) -> None:
        """Store cross-attention K/V of (A, n_audio_ctx, D) features; rows then group by audio.

        On the kernel path this also packs the self-attention q/k/v projections (once), so that
        no step (nor a CUDA-graph capture) allocates weights."""
        fused = self.uses_kernels(audio_features.device)
        for layer in self.decoder.layers:
            layer.set_audio(audio_features.to(self.decoder.tok_emb.weight.dtype))
            if fused:
                layer.self_attn.packed_qkv()

    def prefill(
        self, tokens: Tensor, at: Tensor | None = None, n_audio: int | None = None
    ) -> Tensor:
        """tokens (B, T) at positions [0, T) -> logits (B, T, V) FP32; fills the cache [0, T).

        ``at`` (K,) long: only the logits of those positions, (B, K, V) (the hidden states are
        gathered before the output projection, so no (B, T, V) tensor is made); ``n_audio``: as
        in :meth:`step`. No host sync: graph-safe once caches exist."""
        p = _Pass("prefill", n_audio=n_audio, fused=self.uses_kernels(tokens.device))
        return self.decoder.run(self.decoder.embed(tokens), p, at)

    def step(
        self,
        tokens: Tensor,
        positions: Tensor,
        kv_len: int | None = None,
        n_audio: int | None = None,
    ) -> Tensor:
        """tokens (B, 1) at positions (B,) -> logits (B, V) FP32; no host sync.

        The torch path reads the first ``kv_len`` cache entries (default: all), masked per row
        to ``<= positions[b]``; ``kv_len`` must exceed every position. A static ``kv_len``
        bucket keeps the step graph-safe; ``max(positions) + 1`` reproduces an unpadded cache
        exactly. The kernel path reads exactly ``positions[b] + 1`` entries whatever ``kv_len``.
        ``n_audio``: cross-attention rows the B rows are grouped into (default: the audios set;
        more, for a batch padded with rows of audios beyond those set).
        """
        if self.uses_kernels(tokens.device):
            dec, rows = self.decoder, tokens.shape[0]
            if dec.uses_persistent(rows, n_audio or dec.layers[0].n_audio, tokens.device):
                return dec.stream_logits(dec.persistent(tokens[:, 0], positions))
            p = _Pass("step", positions=positions, lengths=positions + 1, n_audio=n_audio,
                      fused=True)  # fmt: skip
        else:
            kv_len = kv_len or self.cache_len
            keys = torch.arange(kv_len, device=tokens.device)
            mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (B, 1, 1, kv_len)
            p = _Pass("step", positions=positions, mask=mask, n_audio=n_audio)
        return self.decoder.run(self.decoder.embed(tokens, positions), p)[:, 0]

    def reorder_cache(self, source: Tensor, upto: int | None = None) -> None:
        """Self-attention caches: row b <- row source[b] (source: (B,) long), for the cache
        positions [0, upto) (default: all)."""
        for layer in self.decoder.layers:
            layer.reorder(source, upto)

    # --- uncached -----------------------------------------------------------------------
    def logits(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V) of tokens (B, T) on features (A, S, D), B % A == 0."""
        audio = audio_features.to(self.decoder.tok_emb.weight.dtype)
        p = _Pass("full", audio=audio, fused=self.uses_kernels(tokens.device))
        return self.decoder.run(self.decoder.embed(tokens), p)

    def cross_attention_scores(
        self, tokens: Tensor, audio_features: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        """Logits (B, T, V) and per-layer pre-softmax cross-attention scores (A, H, B/A*T, S)."""
        scores: list[Tensor] = []
        audio = audio_features.to(self.decoder.tok_emb.weight.dtype)
        p = _Pass("full", audio=audio, fused=self.uses_kernels(tokens.device), cross_qk=scores)
        return self.decoder.run(self.decoder.embed(tokens), p), scores

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        """mel (B, n_mels, 2*n_audio_ctx), tokens (B, T) -> logits (B, T, V)."""
        return self.logits(tokens, self.embed_audio(mel))


def cast_(net: WhisperNet, dtype: torch.dtype) -> WhisperNet:
    """Cast weights to ``dtype`` in place, keeping LayerNorm parameters in FP32."""
    net.to(dtype)
    for module in net.modules():
        if isinstance(module, LayerNorm):
            module.float()
    return net
