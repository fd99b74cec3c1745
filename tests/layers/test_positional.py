"""Sinusoid positions: equal to WeNet's stored tables; a table first built under inference mode
still serves autograd (training after inference in one process)."""

from __future__ import annotations

import torch

from speechrt.layers import positional
from speechrt.layers.positional import positions


def test_equals_wenet_checkpoint_table(shared):
    sd = torch.load(shared / "fixtures" / "wenet" / "conformer_ctc_aed" / "final.pt",
                    map_location="cpu")
    stored = sd["encoder.embed.pos_enc.pe"][0]  # (5000, 64)
    torch.testing.assert_close(positions(0, 5000, 64), stored, atol=0, rtol=0)
    torch.testing.assert_close(positions(1234, 7, 64), stored[1234:1241], atol=0, rtol=0)


def test_cached_table_usable_by_autograd():
    positional._CACHE.clear()
    with torch.inference_mode():
        positions(0, 10, 6)
    lin = torch.nn.Linear(6, 3)
    lin(positions(0, 10, 6)).sum().backward()
    assert lin.weight.grad is not None
