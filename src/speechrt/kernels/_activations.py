"""Activations fused into GEMM epilogues (shared by the MoE expert and linear_act kernels).

``ACTIVATIONS`` maps names to the ``ACT`` constexpr code of :func:`activate`, a ``@triton.jit``
helper applied to a float32 tile inside a kernel. :func:`epilogue_code` swaps swish for
:data:`FAST_SWISH` where the result is rounded to half precision on a GPU.
"""

from __future__ import annotations

import torch

from speechrt.kernels._utils import MISSING_TL, MISSING_TRITON, interpreting

try:  # Triton is optional: importing this module must not need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton, tl = MISSING_TRITON, MISSING_TL

ACTIVATIONS = {"identity": 0, "swish": 1, "silu": 1, "relu": 2, "gelu": 3}
# Swish whose sigmoid is ``0.5 + 0.5 * tanh(x / 2)`` with PTX ``tanh.approx.f32``: one special-
# function instruction per element instead of an exponential and a division (the epilogue of a
# K = 256 GEMM is bound by them: 4,096 x 256 -> 2,048 FP16 on the H200 24.0 -> 20.9 us, the GEMM
# without activation 20.2). tanh.approx's relative error (2^-10.99) is below half an ulp of a
# float16 result, so it is taken only for outputs rounded to float16/bfloat16, and only compiled
# for a GPU (the interpreter runs no PTX).
FAST_SWISH = 4


@triton.jit
def fast_sigmoid(x):
    """sigmoid(x) = 0.5 + 0.5 * tanh(x / 2) with the GPU's one-instruction approximate tanh."""
    t = tl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=r,r", [x * 0.5], dtype=tl.float32, is_pure=True, pack=1
    )
    return 0.5 + 0.5 * t


@triton.jit
def sigmoid(x, FAST: tl.constexpr):
    """sigmoid(x): :func:`fast_sigmoid` when FAST, else ``tl.sigmoid``."""
    if FAST:
        return fast_sigmoid(x)
    return tl.sigmoid(x)


@triton.jit
def activate(h, ACT: tl.constexpr):
    """Elementwise activation of a float32 tile (ACT: see :data:`ACTIVATIONS`; gelu: erf form;
    :data:`FAST_SWISH`: swish through :func:`fast_sigmoid`)."""
    if ACT == 1:
        h = h * sigmoid(h, False)
    elif ACT == 2:
        h = tl.maximum(h, 0.0)
    elif ACT == 3:
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 4:  # FAST_SWISH
        h = h * sigmoid(h, True)
    return h


def fast_epilogue(out_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether an epilogue whose result is rounded to ``out_dtype`` may use the approximate
    special functions (:func:`fast_sigmoid`): half-precision results on a GPU."""
    return (
        out_dtype in (torch.float16, torch.bfloat16)
        and device.type == "cuda"
        and not interpreting()
    )


def epilogue_code(activation: str, out_dtype: torch.dtype, device: torch.device) -> int:
    """The ``ACT`` code for ``activation`` whose result is rounded to ``out_dtype`` on
    ``device``: :data:`FAST_SWISH` for swish where :func:`fast_epilogue` allows it."""
    code = ACTIVATIONS[activation]
    if code == ACTIVATIONS["swish"] and fast_epilogue(out_dtype, device):
        return FAST_SWISH
    return code
