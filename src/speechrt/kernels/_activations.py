"""Activations fused into GEMM epilogues (shared by the MoE expert and linear_act kernels).

``ACTIVATIONS`` maps names to the ``ACT`` constexpr code of :func:`activate`, a ``@triton.jit``
helper applied to a float32 tile inside a kernel.
"""

from __future__ import annotations

from speechrt.kernels._utils import MISSING_TL, MISSING_TRITON

try:  # Triton is optional: importing this module must not need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton, tl = MISSING_TRITON, MISSING_TL

ACTIVATIONS = {"identity": 0, "swish": 1, "silu": 1, "relu": 2, "gelu": 3}


@triton.jit
def activate(h, ACT: tl.constexpr):
    """Elementwise activation of a float32 tile (ACT: see :data:`ACTIVATIONS`; gelu: erf form)."""
    if ACT == 1:
        h = h * tl.sigmoid(h)
    elif ACT == 2:
        h = tl.maximum(h, 0.0)
    elif ACT == 3:
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    return h
