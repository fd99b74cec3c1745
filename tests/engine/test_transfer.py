"""engine.transfer.as_device_tensor: the values of torch.tensor, without a host sync on CUDA."""

import pytest
import torch

from speechrt.engine.transfer import as_device_tensor

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _need(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.float32])
def test_like_torch_tensor(dtype, device):
    _need(device)
    data = [[1, 2, 3], [4, 5, 6]]
    got = as_device_tensor(data, device, dtype)
    want = torch.tensor(data, dtype=dtype)
    assert got.device.type == torch.device(device).type and got.dtype == dtype
    assert torch.equal(got.cpu(), want)
    from_tensor = as_device_tensor(torch.tensor([7, 8]), device, dtype)
    assert from_tensor.dtype == dtype and from_tensor.tolist() == [7, 8]
    assert as_device_tensor([], device).shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_source_may_change_after_the_call(device):
    _need(device)
    src = torch.arange(5)
    got = as_device_tensor(src, device)
    src.fill_(-1)
    assert got.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    """Under CUDA sync debugging a blocking host-to-device copy raises; ours does not, while
    the GPU is still busy (the copy is ordered after the queued work)."""
    _need("cuda")
    big = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            big = big @ big / 64  # keep the stream busy
        got = as_device_tensor([[1, 2], [3, 4]], "cuda")
        with pytest.raises(RuntimeError):
            torch.tensor([1, 2], device="cuda")  # the blocking copy this helper avoids
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert got.tolist() == [[1, 2], [3, 4]]
