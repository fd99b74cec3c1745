"""Kernel-test setup: Triton's CPU interpreter unless SPEECHRT_TEST_DEVICE=cuda.

``TRITON_INTERPRET=1`` must be set before ``@triton.jit`` runs, i.e. before any
``speechrt.kernels`` file is imported, so it is set here at conftest import. On the GPU
machine run ``SPEECHRT_TEST_DEVICE=cuda pytest tests/kernels -m "gpu or not gpu"``; tests marked
``gpu`` (bfloat16: the interpreter truncates float32 -> bfloat16 instead of rounding, and its
bfloat16 ``tl.dot`` is wrong; Conformer-size shapes) run only there.
"""

import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType

if os.environ.get("SPEECHRT_TEST_DEVICE", "cpu") != "cuda":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")


@pytest.fixture(scope="session")
def device() -> str:
    """The test device: cuda with SPEECHRT_TEST_DEVICE=cuda (skips without a GPU), else cpu."""
    if os.environ.get("SPEECHRT_TEST_DEVICE", "cpu") == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("SPEECHRT_TEST_DEVICE=cuda but no CUDA device")
        return "cuda"
    return "cpu"


@pytest.fixture(autouse=True)
def _gpu_tests_need_cuda(request: pytest.FixtureRequest, device: str) -> None:
    if request.node.get_closest_marker("gpu") is not None and device != "cuda":
        pytest.skip("needs SPEECHRT_TEST_DEVICE=cuda and a CUDA device")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _max_err(out: torch.Tensor, gold: torch.Tensor) -> float:
    """Largest |out - gold| in float64; equal infinities count 0, a NaN in out counts inf."""
    out, gold = out.double().cpu(), gold.double().cpu()
    if torch.isnan(out).any():
        return float("inf")
    same = out == gold  # also covers matching infinities
    diff = torch.where(same, torch.zeros_like(out), (out - gold).abs())
    return float(diff.max()) if diff.numel() else 0.0


def _check_output(
    out: torch.Tensor,
    gold: torch.Tensor,
    torch_out: torch.Tensor,
    dtype: torch.dtype,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> None:
    """Float32: |out - gold| <= atol + rtol * |gold|. Half: the kernel's worst error against
    the float32 ``gold`` is at most twice PyTorch's own same-dtype error (``torch_out``) plus a
    small epsilon."""
    assert out.shape == gold.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), gold.cpu(), atol=atol, rtol=rtol)
        return
    err, torch_err = _max_err(out, gold), _max_err(torch_out, gold)
    assert err <= 2 * torch_err + 1e-4, f"kernel error {err:.3g}, torch {dtype} {torch_err:.3g}"


@pytest.fixture(scope="session")
def max_err() -> Callable[[torch.Tensor, torch.Tensor], float]:
    return _max_err


@pytest.fixture(scope="session")
def check_output() -> Callable[..., None]:
    return _check_output


@pytest.fixture
def import_without_triton(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """Execute a fresh copy of a kernels module as if triton were not installed."""

    def load(name: str) -> ModuleType:
        monkeypatch.setitem(sys.modules, "triton", None)
        monkeypatch.setitem(sys.modules, "triton.language", None)
        spec = importlib.util.find_spec(name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
