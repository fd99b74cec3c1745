"""Helpers shared by the Triton kernel files: availability checks and launch-size arithmetic.

Importing this module never imports Triton or queries CUDA; the checks run when a launcher is
called. Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before the kernel files are imported).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from speechrt.errors import UnsupportedOptionError


@functools.cache
def triton_importable() -> bool:
    """True when the ``triton`` package can be imported (cached; imports nothing)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton's interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when Triton kernels can run here: importable, and a CUDA device or the interpreter."""
    return triton_importable() and (interpreting() or torch.cuda.is_available())


def check_launch(kernel: object, *tensors: torch.Tensor) -> None:
    """Raise a one-line error when ``kernel`` cannot run on the device of ``tensors``.

    ``kernel`` is a ``@triton.jit`` function, or None when Triton failed to import.
    """
    if kernel is None:
        raise UnsupportedOptionError(
            "Triton kernels need the 'triton' package (pip install 'speechrt[triton]')"
        )
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    on_cpu = any(not t.is_cuda for t in tensors)
    if on_cpu and not interpreted:
        raise UnsupportedOptionError(
            "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
            "speechrt.kernels is imported to run them on CPU"
        )
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"kernel inputs are on several devices: {sorted(map(str, devices))}")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive b."""
    return -(-a // b)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` (..., D) as (rows, D) with a unit last stride, copying only when needed."""
    x2d = x.reshape(-1, x.shape[-1])  # (rows, D)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    return x2d


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise when ``t`` is not float32/float16/bfloat16."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def out_or_empty(
    out: torch.Tensor | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    name: str = "out",
) -> torch.Tensor:
    """Return ``out`` after checking it is a contiguous (shape, dtype) tensor, or a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {tuple(shape)} {dtype} tensor, "
            f"got {tuple(out.shape)} {out.dtype}"
        )
    return out


class _MissingTriton:
    """Stand-in for ``triton`` when it is not installed: ``@jit`` yields None, so the
    kernel files still import and their launchers raise through :func:`check_launch`."""

    @staticmethod
    def jit(fn: object) -> None:
        return None


class _MissingTritonLanguage:
    """Stand-in for ``triton.language``: only what kernel signatures touch at definition."""

    constexpr = object


MISSING_TRITON = _MissingTriton()
MISSING_TL = _MissingTritonLanguage()


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device; queried on first use)."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> dict:
    """``UPCAST`` / ``INPUT_PRECISION`` launch constants for ``tl.dot`` on ``dtype`` operands.

    float32 operands get IEEE float32 products (no TF32); bfloat16 under ``TRITON_INTERPRET`` is
    upcast too (the interpreter's bf16 dot is wrong; bf16 products are exact in float32); float16
    and bfloat16 otherwise run on tensor cores with float32 accumulation.
    """
    upcast = dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16)
    return {"UPCAST": upcast, "INPUT_PRECISION": "ieee" if upcast else "tf32"}


def check_counters(counters: torch.Tensor, need: int, device: torch.device) -> None:
    """A kernel's counter workspace: a contiguous int32 tensor of at least ``need`` elements
    on ``device`` (zeros, which the kernels leave zeroed)."""
    if (
        counters.dtype != torch.int32
        or not counters.is_contiguous()
        or counters.numel() < need
        or counters.device != device
    ):
        raise ValueError(
            f"counters must be a contiguous int32 tensor of >= {need} zeros on {device}"
        )
