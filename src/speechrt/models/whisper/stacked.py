"""The one-launch decode step of the Whisper text decoder (``kernels.decoder_step``).

The persistent kernel reaches every layer through one pointer per weight kind, so the decoder's
weights are re-homed (once, on first use) into tensors with the layer index first, and each
layer's parameters become views of them: the weights still exist once, the module API and
``state_dict`` are unchanged, and the other step paths read the same memory. The self- and
cross-attention caches are allocated stacked by ``WhisperNet.setup_caches`` for the same reason.
If parameters are replaced later (``.to()``, ``load_state_dict(assign=True)``), the next step
notices and stacks again.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from speechrt.errors import UnsupportedOptionError


def _rehome(params: list[tuple[nn.Module, str, Tensor]]) -> None:
    """Point each module attribute at its view (keeping requires_grad)."""
    for module, name, view in params:
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(view, requires_grad=old.requires_grad))


class PersistentStep:
    """Stacked views of a ``TextDecoder``'s weights and the kernel state per row count.

    ``config``: a :class:`speechrt.kernels.decoder_step.StepConfig` (benchmarks sweep it);
    changing it drops the per-row states (capture graphs after)."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder
        self._stack = None
        self._views: list[tuple[nn.Module, str, Tensor]] = []
        self._states: dict[int, object] = {}
        self._config = None

    @property
    def config(self):
        return self._config

    @config.setter
    def config(self, value) -> None:
        self._config = value
        self._states.clear()

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens (B,) at positions (B,), one audio per row -> the (B, D) float32 residual
        stream after the last layer (the decoder's final LayerNorm + logits follow)."""
        from speechrt.kernels.decoder_step import StepState, decoder_step

        stack = self.stack()
        tokens, positions = tokens.contiguous(), positions.contiguous()
        rows = tokens.shape[0]
        state = self._states.get(rows)
        if state is None:
            state = self._states[rows] = StepState(stack, rows, self._config)
        return decoder_step(stack, tokens, positions, state)

    def failed(self) -> bool:
        """True when a grid barrier of a launch so far timed out (host sync; see kernels._grid)."""
        return any(s.failed() for s in self._states.values())

    # ------------------------------------------------------------------ stacking
    def stack(self):
        """The :class:`~speechrt.kernels.decoder_step.DecoderStack` of the decoder, (re)built
        when a parameter is no longer the view it was made."""
        caches = self.decoder.stacked_caches
        if caches is None:
            raise UnsupportedOptionError("the persistent step needs caches (setup_caches)")
        if caches[2].dtype == torch.int8:
            raise UnsupportedOptionError("the persistent step needs float cross caches, not int8")
        first = self.decoder.layers[0]
        if first.cache.k.data_ptr() != caches[0].data_ptr() or (
            first.cross_cache.v.data_ptr() != caches[3].data_ptr()
        ):
            raise UnsupportedOptionError(
                "the layers' caches are no longer views of the stacked caches (moved with "
                ".to()?): call setup_caches again"
            )
        s = self._stack
        if s is None or not self._weights_alive():
            self._stack = self._build(caches)
            self._states.clear()
        elif any(a is not b for a, b in zip(caches, (s.self_k, s.self_v, s.cross_k, s.cross_v))):
            self._stack = replace(s, self_k=caches[0], self_v=caches[1], cross_k=caches[2],
                                  cross_v=caches[3])  # fmt: skip
            self._stack.check()
            self._states.clear()
        return self._stack

    def forget_caches(self) -> None:
        """Drop the stack's references to the caches (before new ones are allocated)."""
        if self._stack is not None:
            none = torch.empty(0)
            self._stack = replace(self._stack, self_k=none, self_v=none, cross_k=none,
                                  cross_v=none)  # fmt: skip
            self._states.clear()

    def _weights_alive(self) -> bool:
        s, dec = self._stack, self.decoder
        if s.tok_emb is not dec.tok_emb.weight or s.pos_emb is not dec.pos_emb:
            return False
        return all(getattr(m, name).data_ptr() == view.data_ptr() for m, name, view in self._views)

    def _build(self, caches: tuple[Tensor, ...]):
        from speechrt.kernels.decoder_step import DecoderStack

        dec = self.decoder
        layers = list(dec.layers)
        views: list[tuple[nn.Module, str, Tensor]] = []

        def linears(mods: list[nn.Linear]) -> tuple[Tensor, Tensor]:
            w = torch.stack([m.weight.detach() for m in mods])  # (L, N, K)
            b = torch.stack([m.bias.detach() for m in mods])  # (L, N)
            for i, m in enumerate(mods):
                views.extend([(m, "weight", w[i]), (m, "bias", b[i])])
            return w, b

        with torch.inference_mode(False), torch.no_grad():
            d = dec.tok_emb.weight.shape[1]
            qkv_w = torch.stack([torch.cat(
                [l_.self_attn.wq.weight, l_.self_attn.wk.weight, l_.self_attn.wv.weight]
            ) for l_ in layers])  # fmt: skip
            qkv_b = torch.stack([torch.cat(
                [l_.self_attn.wq.bias, torch.zeros_like(l_.self_attn.wq.bias), l_.self_attn.wv.bias]
            ) for l_ in layers])  # fmt: skip
            for i, l_ in enumerate(layers):
                a = l_.self_attn
                views.extend([
                    (a.wq, "weight", qkv_w[i, :d]), (a.wk, "weight", qkv_w[i, d : 2 * d]),
                    (a.wv, "weight", qkv_w[i, 2 * d :]), (a.wq, "bias", qkv_b[i, :d]),
                    (a.wv, "bias", qkv_b[i, 2 * d :]),
                ])  # fmt: skip
            o_w, o_b = linears([l_.self_attn.wo for l_ in layers])
            cq_w, cq_b = linears([l_.cross_attn.wq for l_ in layers])
            co_w, co_b = linears([l_.cross_attn.wo for l_ in layers])
            fc1_w, fc1_b = linears([l_.ffn.fc1 for l_ in layers])
            fc2_w, fc2_b = linears([l_.ffn.fc2 for l_ in layers])
            norms = [(l_.self_attn_norm, l_.cross_attn_norm, l_.ffn_norm) for l_ in layers]
            ln_w = torch.stack([torch.stack([n.weight.detach() for n in ns]) for ns in norms])
            ln_b = torch.stack([torch.stack([n.bias.detach() for n in ns]) for ns in norms])
            for i, ns in enumerate(norms):
                for j, n in enumerate(ns):
                    views.extend([(n, "weight", ln_w[i, j]), (n, "bias", ln_b[i, j])])
            _rehome(views)
        for i, l_ in enumerate(layers):
            l_.self_attn._packed = (qkv_w[i], qkv_b[i])
        self._views = views
        first = layers[0]
        stack = DecoderStack(
            ln_w=ln_w, ln_b=ln_b, eps=first.self_attn_norm.eps, qkv_w=qkv_w, qkv_b=qkv_b,
            o_w=o_w, o_b=o_b, cq_w=cq_w, cq_b=cq_b, co_w=co_w, co_b=co_b, fc1_w=fc1_w,
            fc1_b=fc1_b, fc2_w=fc2_w, fc2_b=fc2_b, tok_emb=dec.tok_emb.weight,
            pos_emb=dec.pos_emb, self_k=caches[0], self_v=caches[1], cross_k=caches[2],
            cross_v=caches[3], n_head=first.self_attn.n_head, activation="gelu",
        )  # fmt: skip
        stack.check()
        return stack
