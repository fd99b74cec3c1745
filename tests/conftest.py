"""Shared test fixtures: paths to ../shared, the bundled data, and the gpu marker policy.

CUDA is never queried at import time; GPU tests carry ``@pytest.mark.gpu`` and are deselected by
default (pyproject addopts); run them on the device machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import os

# Triton decides interpreter vs compiler when a kernel is defined: set the mode before anything
# imports speechrt.kernels. CPU runs interpret; SPEECHRT_TEST_DEVICE=cuda runs compiled kernels.
if os.environ.get("SPEECHRT_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


def _shared_dir() -> Path:
    env = os.environ.get("SPEECHRT_SHARED")
    if env:
        return Path(env)
    for cand in (REPO.parent / "shared", REPO / "shared"):
        if cand.is_dir():
            return cand
    return REPO.parent / "shared"


SHARED = _shared_dir()


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        if os.environ.get("CI"):  # CI always has shared/ beside the checkout: never skip there
            pytest.fail(f"shared assets not found at {SHARED}")
        pytest.skip(f"shared assets not found at {SHARED} (set SPEECHRT_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA
