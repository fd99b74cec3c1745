"""WeNet Conformer / Transformer (U2, U2++) models."""

from speechrt.models.conformer.load import is_wenet_dir, load_wenet

__all__ = ["is_wenet_dir", "load_wenet"]
