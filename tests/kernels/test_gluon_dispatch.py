"""Where the Hopper Gluon kernels are (not) taken: the dispatch checks, on any machine.

The kernels themselves run only on compute capability 9.x (GPU tests in test_conv_subsampling.py
and test_linear_act.py); here the CPU side: nothing Gluon is chosen off a Hopper GPU, and the
dispatching launchers keep their Triton kernels' results there.
"""

from __future__ import annotations

import pytest
import torch

from speechrt.kernels import _gluon, conv_front_wgmma, linear_act_pingpong
from speechrt.kernels.conv_subsampling import (
    _gluon_front,
    conv_subsampling,
    conv_subsampling_ref,
    pack_conv_subsampling,
)
from speechrt.kernels.linear_act import linear_act, linear_act_ref


def test_no_gluon_kernel_off_a_hopper_gpu(device):
    dev = torch.device(device)
    if _gluon.hopper(dev):
        pytest.skip("on Hopper the Gluon kernels are taken (GPU tests)")
    assert not _gluon.hopper(dev)
    assert not conv_front_wgmma.supported(256, torch.float16, dev)
    assert not _gluon_front(1 << 20, 256, torch.float16, dev)
    x = torch.zeros(16384, 256, dtype=torch.float16, device=dev)
    w = torch.zeros(2048, 256, dtype=torch.float16, device=dev)
    y = torch.empty(16384, 2048, dtype=torch.float16, device=dev)
    assert not linear_act_pingpong.supported(x, w, y)


def test_cpu_is_never_hopper():
    assert not _gluon.hopper(torch.device("cpu"))


def test_dispatching_launchers_keep_their_results_off_hopper(device, check_output):
    """K = 256 linear_act and a conv front with C = 64 (the sizes the Gluon kernels take on
    Hopper) still equal their references where the Triton kernels run them."""
    if _gluon.hopper(torch.device(device)):
        pytest.skip("on Hopper the Gluon kernels are taken (GPU tests)")
    x = torch.randn(40, 256, device=device).half()
    w = (torch.randn(96, 256, device=device) / 16).half()
    b = torch.randn(96, device=device).half()
    y = linear_act(x, w, b, "relu")
    check_output(y, linear_act_ref(x, w, b, "relu", upcast=True), linear_act_ref(x, w, b, "relu"),
                 torch.float16, atol=1e-5, rtol=1e-5)  # fmt: skip
    c = 64
    convs = (torch.randn(c, 1, 3, 3, device=device) / 3, torch.randn(c, device=device) * 0.1,
             torch.randn(c, c, 3, 3, device=device) / (3 * c**0.5),
             torch.randn(c, device=device) * 0.1)  # fmt: skip
    feats = torch.randn(2, 19, 15, device=device) * 3
    out = conv_subsampling(feats, pack_conv_subsampling(*convs, torch.float16))
    gold = conv_subsampling_ref(feats, *convs, upcast=True)
    low = conv_subsampling_ref(feats, *(t.half() for t in convs))
    check_output(out, gold, low, torch.float16, atol=2e-5, rtol=1e-5)


def test_hopper_check_and_its_switch(monkeypatch):
    """hopper(): compute capability 9.x only (8.x and 10.x say no), and SPEECHRT_GLUON=0 turns
    the Gluon kernels off on a Hopper GPU too (capabilities faked; no GPU needed)."""
    if not _gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    dev = torch.device("cuda", 0)
    for cap, want in (((9, 0), True), ((8, 0), False), ((10, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        monkeypatch.delenv("SPEECHRT_GLUON", raising=False)
        assert _gluon.hopper(dev) is want
        monkeypatch.setenv("SPEECHRT_GLUON", "0")
        assert _gluon.hopper(dev) is False
