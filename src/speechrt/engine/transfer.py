"""Host data to a device without a host sync.

``torch.tensor(data, device="cuda")`` copies from pageable memory and waits for the copy, which
waits for everything already queued on the stream (a whole encoder forward, say): the GPU can then
idle while the host prepares the next work. :func:`as_device_tensor` builds the tensor in
pinned memory and copies it asynchronously; PyTorch's caching host allocator keeps that pinned
block until the copy has run, so the source may go out of scope at once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_device_tensor(data, device: torch.device | str, dtype: torch.dtype = torch.long) -> Tensor:
    """``data`` (nested lists of numbers, or a tensor) as a ``dtype`` tensor on ``device``; a
    host-to-CUDA copy is queued without a host sync (a tensor already on the device is only
    copied)."""
    device = torch.device(device)
    if isinstance(data, Tensor):  # a copy, as torch.tensor makes
        if data.device.type != "cpu":
            return data.to(device, dtype, copy=True)
        host = data.to(dtype, copy=True)
    else:
        host = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
