"""The model in WeNet's own directory format: units, ``train.yaml``, ``final.pt``, ``global_cmvn``.

``final.pt`` uses WeNet's key names: speechrt's key map
(:func:`speechrt.models.conformer.convert.wenet_key_map`) inverted, plus the derived buffers WeNet
saves and speechrt recomputes: the sinusoid tables ``*.pe`` (1, 5000, d) of the encoder's and each
decoder's positional encoding, and (with BatchNorm) ``num_batches_tracked``. Keys follow WeNet's
module order (cmvn, embed, after_norm, encoder blocks, decoders, ctc). ``train.yaml`` has WeNet's
layout and sorted keys, as WeNet writes it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from speechrt.layers.positional import sinusoid_table
from speechrt.models.conformer.config import ModelConfig, parse_train_yaml
from speechrt.models.conformer.convert import wenet_key_map
from speechrt.models.conformer.model import ConformerASR

SPACE = "\u2581"  # word boundary unit: WeNet's char tokenizer maps " " to it, speechrt back to " "
UNITS = ["<blank>", "<unk>", "'", *"abcdefghijklmnopqrstuvwxyz", SPACE, "<sos/eos>"]
PE_ROWS = 5000  # WeNet's positional tables (max_len)


def unit_ids() -> dict[str, int]:
    return {u: i for i, u in enumerate(UNITS)}


def tokenize(text: str, ids: dict[str, int] | None = None) -> list[int]:
    """Normalised text -> unit ids (space -> the word-boundary unit, unknown -> <unk>)."""
    ids = ids or unit_ids()
    return [ids.get(SPACE if ch == " " else ch, ids["<unk>"]) for ch in text.strip()]


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of the U2++ Conformer (encoder and bidirectional decoder)."""

    output_size: int
    attention_heads: int
    linear_units: int
    num_blocks: int
    cnn_module_kernel: int
    decoder_blocks: int
    r_decoder_blocks: int
    decoder_linear_units: int
    cnn_module_norm: str = "layer_norm"
    input_layer: str = "conv2d"


PRESETS = {
    # ~7.0 M parameters; the FP16 final.pt (with the three fp16 *.pe tables) is ~18 MB.
    "default": ModelPreset(144, 4, 576, 10, 15, 3, 1, 576),
    # CPU smoke tests.
    "tiny": ModelPreset(32, 2, 64, 2, 7, 1, 1, 64),
}


@dataclass(frozen=True)
class TrainingConf:
    """Training settings recorded in train.yaml (WeNet's names)."""

    dropout: float = 0.1
    ctc_weight: float = 0.3
    reverse_weight: float = 0.3
    lsm_weight: float = 0.1
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 600
    max_frames_in_batch: int = 150000
    grad_clip: float = 5.0
    num_t_mask: int = 2
    num_f_mask: int = 2
    max_t: int = 40
    max_f: int = 10
    amp_dtype: str = "fp32"  # fp32 | bf16


def build_train_yaml(preset: ModelPreset, train: TrainingConf) -> dict:
    """A WeNet ``train.yaml`` (as a dict) describing the model and how it was trained."""
    vocab = len(UNITS)
    d = train.dropout
    return {
        "accum_grad": 1,
        "cmvn": "global_cmvn",
        "cmvn_conf": {"cmvn_file": "global_cmvn", "is_json_cmvn": True},
        "ctc": "ctc",
        "ctc_conf": {"ctc_blank_id": 0},
        "dataset": "asr",
        "dataset_conf": {
            "batch_conf": {"batch_type": "dynamic",
                           "max_frames_in_batch": train.max_frames_in_batch},
            # The recipe adds the equivalent of dither 1.0 (int16 scale) to the waveforms.
            "fbank_conf": {"dither": 1.0, "frame_length": 25, "frame_shift": 10,
                           "num_mel_bins": 80},
            "filter_conf": {"max_length": 1500, "min_length": 10, "token_max_length": 200,
                            "token_min_length": 1},
            "resample_conf": {"resample_rate": 16000},
            "shuffle": True,
            "shuffle_conf": {"shuffle_size": 10000},
            "sort": True,
            "sort_conf": {"sort_size": 2000},
            "spec_aug": True,
            "spec_aug_conf": {"max_f": train.max_f, "max_t": train.max_t,
                              "num_f_mask": train.num_f_mask, "num_t_mask": train.num_t_mask},
            "spec_sub": False,
            "spec_sub_conf": {"max_t": 30, "num_t_sub": 3},
            "spec_trim": False,
            "spec_trim_conf": {"max_t": 50},
            "speed_perturb": False,
        },
        "decoder": "bitransformer",
        "decoder_conf": {
            "attention_heads": preset.attention_heads,
            "dropout_rate": d,
            "linear_units": preset.decoder_linear_units,
            "num_blocks": preset.decoder_blocks,
            "positional_dropout_rate": d,
            "r_num_blocks": preset.r_decoder_blocks,
            "self_attention_dropout_rate": 0.0,
            "src_attention_dropout_rate": 0.0,
        },
        "dtype": train.amp_dtype,
        "encoder": "conformer",
        "encoder_conf": {
            "activation_type": "swish",
            "attention_dropout_rate": 0.0,
            "attention_heads": preset.attention_heads,
            "causal": True,
            "cnn_module_kernel": preset.cnn_module_kernel,
            "cnn_module_norm": preset.cnn_module_norm,
            "dropout_rate": d,
            "input_layer": preset.input_layer,
            "linear_units": preset.linear_units,
            "macaron_style": True,
            "normalize_before": True,
            "num_blocks": preset.num_blocks,
            "output_size": preset.output_size,
            "pos_enc_layer_type": "rel_pos",
            "positional_dropout_rate": d,
            "selfattention_layer_type": "rel_selfattn",
            "use_cnn_module": True,
            "use_dynamic_chunk": True,
            "use_dynamic_left_chunk": False,
        },
        "grad_clip": train.grad_clip,
        "input_dim": 80,
        "log_interval": 100,
        "max_epoch": 100,
        "model": "asr_model",
        "model_conf": {
            "ctc_weight": train.ctc_weight,
            "length_normalized_loss": False,
            "lsm_weight": train.lsm_weight,
            "reverse_weight": train.reverse_weight,
        },
        "model_dir": "exp/synthetic_en",
        "optim": "adamw",
        "optim_conf": {"lr": train.lr, "weight_decay": train.weight_decay},
        "output_dim": vocab,
        "save_states": "model_only",
        "scheduler": "warmuplr",
        "scheduler_conf": {"warmup_steps": train.warmup_steps},
        "tokenizer": "char",
        "tokenizer_conf": {
            "bpe_path": None,
            "is_multilingual": False,
            "non_lang_syms_path": None,
            "num_languages": 1,
            "special_tokens": {"<blank>": 0, "<eos>": vocab - 1, "<sos>": vocab - 1,
                               "<unk>": 1},
            "split_with_space": False,
            "symbol_table_path": "units.txt",
        },
        "train_engine": "torch_ddp",
        "use_amp": train.amp_dtype != "fp32",
        "vocab_size": vocab,
    }


def build_model(raw_yaml: dict) -> tuple[ModelConfig, ConformerASR]:
    cfg = parse_train_yaml(raw_yaml)
    return cfg, ConformerASR(cfg)


# Order of a WeNet Conformer block's tensors (module creation order in WeNet).
_BLOCK_ORDER = (
    "self_attn.pos_bias_u", "self_attn.pos_bias_v", "self_attn.linear_q.", "self_attn.linear_k.",
    "self_attn.linear_v.", "self_attn.linear_out.", "self_attn.linear_pos.", "feed_forward.",
    "feed_forward_macaron.", "conv_module.pointwise_conv1.", "conv_module.depthwise_conv.",
    "conv_module.norm.", "conv_module.pointwise_conv2.", "norm_ff.", "norm_mha.",
    "norm_ff_macaron.", "norm_conv.", "norm_final.", "norm1.", "norm2.",
)


def _block_rank(inner: str) -> tuple[int, int]:
    block, rest = inner.split(".", 1)
    ranks = [i for i, p in enumerate(_BLOCK_ORDER) if rest.startswith(p)]
    return int(block), ranks[0] if ranks else len(_BLOCK_ORDER)


def _wenet_rank(key: str) -> tuple:
    """Module order of WeNet's ASRModel state dict (stable sort keeps order inside a group)."""
    if key.startswith("encoder.encoders."):
        return (0, 3, *_block_rank(key[len("encoder.encoders."):]))
    groups = ("encoder.global_cmvn.", "encoder.embed.", "encoder.after_norm.")
    for rank, prefix in enumerate(groups):
        if key.startswith(prefix):
            return (0, rank, int(key.endswith(".pe")), 0)
    for side, prefix in enumerate(("decoder.left_decoder.", "decoder.right_decoder.")):
        if key.startswith(prefix):
            return (1, side, *_decoder_rank(key[len(prefix):]))
    if key.startswith("decoder."):
        return (1, 0, *_decoder_rank(key[len("decoder."):]))
    return (2,)


def _decoder_rank(inner: str) -> tuple[int, int]:
    for rank, prefix in enumerate(("embed.0.", "embed.1.", "after_norm.", "output_layer.")):
        if inner.startswith(prefix):
            return rank, 0
    return 4, int(inner.split(".")[1])  # decoders.<i>.


def wenet_state_dict(net: ConformerASR, dtype: torch.dtype = torch.float32
                     ) -> dict[str, torch.Tensor]:
    """Our parameters under WeNet's names, with WeNet's derived buffers, in WeNet's order.

    Floating tensors are cast to ``dtype`` except the CMVN statistics (kept float32).
    """
    cfg = net.cfg
    ours = net.state_dict()
    inverse = {v: k for k, v in wenet_key_map(cfg).items()}
    missing = [k for k in ours if k not in inverse]
    if missing:
        raise KeyError(f"no WeNet name for parameter '{missing[0]}'")
    out = {inverse[k]: v.detach().cpu().clone() for k, v in ours.items()}
    d = cfg.encoder.output_size
    pe = sinusoid_table(PE_ROWS, d).unsqueeze(0)  # (1, 5000, d)
    if cfg.encoder.pos_enc_layer_type != "no_pos":
        out["encoder.embed.pos_enc.pe"] = pe.clone()
    if cfg.decoder is not None:
        prefixes = (["decoder.left_decoder.", "decoder.right_decoder."]
                    if cfg.decoder.kind == "bitransformer" else ["decoder."])
        for p in prefixes:
            out[f"{p}embed.1.pe"] = pe.clone()
    for k, v in out.items():
        if v.is_floating_point() and not k.startswith("encoder.global_cmvn."):
            out[k] = v.to(dtype)
    return {k: out[k] for k in sorted(out, key=_wenet_rank)}


def average_state_dicts(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Mean of float tensors over checkpoints (float64 accumulation); others from the last."""
    total: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}
    for p in paths:
        last = torch.load(p, map_location="cpu", weights_only=True)
        for k, v in last.items():
            if v.is_floating_point():
                total[k] = total.get(k, 0) + v.double()
    return {k: (total[k] / len(paths)).to(v.dtype) if k in total else v for k, v in last.items()}


def write_units(path: Path) -> None:
    path.write_text("".join(f"{u} {i}\n" for i, u in enumerate(UNITS)), encoding="utf-8")


def export_model_dir(out: Path, raw_yaml: dict, state: dict[str, torch.Tensor],
                     cmvn_file: Path, dtype: torch.dtype = torch.float16,
                     info: dict | None = None) -> Path:
    """Write a WeNet model directory from our state dict; returns ``out``."""
    cfg, net = build_model(raw_yaml)
    net.load_state_dict(state, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(wenet_state_dict(net, dtype), out / "final.pt")
    (out / "train.yaml").write_text(yaml.safe_dump(raw_yaml, allow_unicode=True),
                                    encoding="utf-8")
    write_units(out / "units.txt")
    shutil.copyfile(cmvn_file, out / "global_cmvn")
    if info is not None:
        (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
