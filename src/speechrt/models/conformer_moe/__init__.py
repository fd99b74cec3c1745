"""3M-ASR Conformer-MoE (SpeechMoE routing with an embedding network), inference only."""

from speechrt.models.conformer_moe.load import is_conformer_moe_dir, load_conformer_moe

__all__ = ["is_conformer_moe_dir", "load_conformer_moe"]
