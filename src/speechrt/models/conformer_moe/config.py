"""3M-ASR ``config.yaml`` (``job_type: moe``) -> frozen, validated configs.

The main encoder and the embedding network become :class:`EncoderConfig` s of our Conformer with
3M-ASR's conventions: LayerNorm eps 1e-12 (``norm_eps``), the first-frame subsampling mask, and
the embedding network sharing the main encoder's chunk mask (3M-ASR passes it ``given_chunk_mask``).
Every key of ``model_conf`` is understood, known to be training-only, or an error naming it.

Expert count: 3M-ASR trains ``moe_conf.num_experts`` experts *per expert worker* and saves
``num_experts x world_size`` of them (its ``state_dict_comm``), so the checkpoint decides; a count
that is not a multiple of ``num_experts`` is a :class:`ModelFormatError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from speechrt.errors import ModelFormatError, UnsupportedOptionError
from speechrt.models.conformer.config import DecoderConfig, EncoderConfig, ModelConfig

logger = logging.getLogger(__name__)

# nnet_proto -> prefix of the encoder's keys in the checkpoint (the CTC-only model has none).
PROTOS = {"conformer_aed_moe_catEmbed": "encoder.", "conformer_moe_catEmbed": ""}

LN_EPS = 1e-12  # 3M-ASR's encoder and decoder LayerNorms

# 3M-ASR encoder argument -> EncoderConfig field.
_ENCODER_FIELDS = {
    "attention_heads": "attention_heads",
    "attention_dim": "output_size",
    "linear_units": "linear_units",
    "num_blocks": "num_blocks",
    "input_layer": "input_layer",
    "pos_enc_layer_type": "pos_enc_layer_type",
    "normalize_before": "normalize_before",
    "static_chunk_size": "static_chunk_size",
    "use_dynamic_chunk": "use_dynamic_chunk",
    "macaron_style": "macaron_style",
    "activation_type": "activation_type",
    "use_cnn_module": "use_cnn_module",
    "cnn_module_kernel": "cnn_module_kernel",
    "causal": "causal",
    "cnn_module_norm": "cnn_module_norm",
}
# Accepted only with these (default) values.
_ENCODER_FIXED = {"conv_subsample_in_ch": 1, "concat_after": False}
# Training-only, or ignored by 3M-ASR itself (selfattention_layer_type: rel-pos attention unless
# no_pos; blank_idx is read separately).
_ENCODER_IGNORED = {
    "dropout_rate",
    "positional_dropout_rate",
    "attention_dropout_rate",
    "use_dynamic_left_chunk",
    "selfattention_layer_type",
    "blank_idx",
}
_MOE_ENCODER_EXTRA = {"embed_conf", "moe_conf", "embed_scale", "aux_scale"}
_MOE_FIELDS = {"num_experts", "hidden_units", "router_with_bias", "keep_expert_output"}
_MOE_IGNORED = {
    "dropout_rate",
    "capacity_factor",
    "router_regularization",
    "rand_init_router",
    "rank",
    "world_size",
    "comm",
    "activation",
}
_DECODER_FIELDS = {
    "attention_heads",
    "linear_units",
    "num_blocks",
    "r_num_blocks",
    "normalize_before",
}
_DECODER_FIXED = {"input_layer": "embed", "use_output_layer": True, "concat_after": False}
_DECODER_IGNORED = {
    "dropout_rate",
    "positional_dropout_rate",
    "self_attention_dropout_rate",
    "src_attention_dropout_rate",
}
_MODEL_IGNORED = {"ignore_id", "lsm_weight", "length_normalize_loss"}


@dataclass(frozen=True)
class MoEConfig:
    """The MoE feed-forward of every block.

    num_experts: experts per layer in the checkpoint (E_total, router width).
    experts_per_worker: ``moe_conf.num_experts``; ``num_experts / experts_per_worker`` is the
    training run's expert world size.
    """

    num_experts: int
    hidden_units: int
    experts_per_worker: int
    router_with_bias: bool = False
    keep_expert_output: bool = False

    def __post_init__(self):
        for name in ("num_experts", "hidden_units", "experts_per_worker"):
            if getattr(self, name) < 1:
                raise ModelFormatError(f"moe_conf: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_experts % self.experts_per_worker:
            raise ModelFormatError(
                f"the checkpoint holds {self.num_experts} experts per MoE layer, not a multiple "
                f"of config.yaml's moe_conf.num_experts={self.experts_per_worker} "
                "(expected num_experts x training world size)"
            )

    @property
    def expert_world_size(self) -> int:
        return self.num_experts // self.experts_per_worker


@dataclass(frozen=True)
class ConformerMoEConfig(ModelConfig):
    """A WeNet-style :class:`ModelConfig` (main encoder, decoder, tokens, fbank) plus the
    embedding network and the MoE. ``encoder.linear_units`` is the macaron FFN's width, which
    3M-ASR takes from ``moe_conf.hidden_units``."""

    embed_encoder: EncoderConfig | None = None
    moe: MoEConfig | None = None
    proto: str = "conformer_aed_moe_catEmbed"

    def __post_init__(self):
        super().__post_init__()
        if self.embed_encoder is None or self.moe is None:
            raise ModelFormatError("a Conformer-MoE config needs embed_conf and moe_conf")
        if self.proto not in PROTOS:
            raise UnsupportedOptionError(f"nnet_proto '{self.proto}' is not supported")
        if self.embed_encoder.input_layer != self.encoder.input_layer:
            raise ModelFormatError(
                f"embed_conf.input_layer '{self.embed_encoder.input_layer}' differs from the "
                f"encoder's '{self.encoder.input_layer}': the router inputs would not align"
            )

    @property
    def key_prefix(self) -> str:
        """Prefix of the encoder's keys in ``final.nnet``."""
        return PROTOS[self.proto]


def _check(section: str, conf: dict, known: set[str], fixed: dict[str, Any]) -> None:
    for key, value in conf.items():
        if key in known:
            continue
        if key in fixed:
            if value != fixed[key]:
                raise UnsupportedOptionError(
                    f"{section}.{key}={value!r} is not supported by speechrt (only {fixed[key]!r})"
                )
            continue
        raise ModelFormatError(f"unknown key {section}.{key} in config.yaml")


def _section(conf: dict, key: str, section: str) -> dict:
    value = conf.get(key) or {}
    if not isinstance(value, dict):
        raise ModelFormatError(f"{section}.{key} must be a mapping, got {type(value).__name__}")
    return dict(value)


def encoder_config(conf: dict, section: str, **overrides) -> EncoderConfig:
    """A 3M-ASR Conformer encoder's arguments -> :class:`EncoderConfig` (3M conventions)."""
    _check(section, conf, set(_ENCODER_FIELDS) | _ENCODER_IGNORED, _ENCODER_FIXED)
    kwargs = {_ENCODER_FIELDS[k]: v for k, v in conf.items() if k in _ENCODER_FIELDS}
    pos = kwargs.get("pos_enc_layer_type", "rel_pos")
    kwargs.update(
        kind="conformer",
        selfattention_layer_type="selfattn" if pos == "no_pos" else "rel_selfattn",
        norm_eps=LN_EPS,
        subsampling_mask="first_frame",
    )
    kwargs.update(overrides)
    try:
        return EncoderConfig(**kwargs)
    except TypeError as e:
        raise ModelFormatError(f"{section}: {e}") from None


def _moe_config(conf: dict, num_experts_total: int | None) -> MoEConfig:
    _check("moe_conf", conf, _MOE_FIELDS | _MOE_IGNORED, {})
    per_worker = int(conf.get("num_experts", 4))
    total = per_worker if num_experts_total is None else int(num_experts_total)
    cfg = MoEConfig(
        num_experts=total,
        hidden_units=int(conf.get("hidden_units", 1024)),
        experts_per_worker=per_worker,
        router_with_bias=bool(conf.get("router_with_bias", False)),
        keep_expert_output=bool(conf.get("keep_expert_output", False)),
    )
    if cfg.expert_world_size > 1:
        logger.info(
            "3M-ASR checkpoint: %d experts per MoE layer = moe_conf.num_experts %d x %d expert "
            "workers; using all %d",
            total,
            per_worker,
            cfg.expert_world_size,
            total,
        )
    return cfg


def _decoder_config(kind: str, conf: dict) -> DecoderConfig:
    if kind not in ("transformer", "bitransformer"):
        raise UnsupportedOptionError(f"decoder_type '{kind}' is not supported")
    _check("decoder_conf", conf, _DECODER_FIELDS | _DECODER_IGNORED, _DECODER_FIXED)
    kwargs = {k: v for k, v in conf.items() if k in _DECODER_FIELDS}
    return DecoderConfig(kind=kind, activation_type="relu", **kwargs)


def parse_3m_config(
    raw: dict,
    vocab_size: int,
    input_dim: int | None = None,
    num_experts_total: int | None = None,
) -> ConformerMoEConfig:
    """Build a :class:`ConformerMoEConfig` from a loaded 3M-ASR ``config.yaml``.

    vocab_size: output units (3M-ASR takes it from the symbol table; the loader reads it from the
    checkpoint). input_dim: fbank bins when ``dataset_conf`` does not say. num_experts_total: the
    checkpoint's experts per layer (default: ``moe_conf.num_experts``).
    """
    if not isinstance(raw, dict) or "model_conf" not in raw:
        raise ModelFormatError("config.yaml has no 'model_conf': not a 3M-ASR config")
    if raw.get("job_type", "moe") != "moe":
        raise UnsupportedOptionError(
            f"3M-ASR job_type '{raw.get('job_type')}' is not supported (only 'moe')"
        )
    proto = raw.get("nnet_proto", "conformer_aed_moe_catEmbed")
    if proto not in PROTOS:
        raise UnsupportedOptionError(f"nnet_proto '{proto}' is not supported ({', '.join(PROTOS)})")
    mconf = _section(raw, "model_conf", "config")
    if PROTOS[proto]:  # the AED model: encoder_conf + decoder
        _check(
            "model_conf",
            mconf,
            {"encoder_conf", "decoder_type", "decoder_conf", "ctc_weight", "reverse_weight"}
            | _MODEL_IGNORED,
            {},
        )
        enc_conf = _section(mconf, "encoder_conf", "model_conf")
        decoder = _decoder_config(
            mconf.get("decoder_type", "transformer"), _section(mconf, "decoder_conf", "model_conf")
        )
        enc_section = "model_conf.encoder_conf"
    else:  # the CTC-only encoder: its arguments directly
        enc_conf, decoder, enc_section = mconf, None, "model_conf"
    moe = _moe_config(_section(enc_conf, "moe_conf", enc_section), num_experts_total)
    main_conf = {k: v for k, v in enc_conf.items() if k not in _MOE_ENCODER_EXTRA}
    main_conf.pop("linear_units", None)  # unused by the MoE encoder
    encoder = encoder_config(main_conf, enc_section, linear_units=moe.hidden_units)
    embed = encoder_config(
        _section(enc_conf, "embed_conf", enc_section),
        f"{enc_section}.embed_conf",
        # 3M-ASR hands the main encoder's chunk mask to the embedding network.
        use_dynamic_chunk=encoder.use_dynamic_chunk,
        static_chunk_size=encoder.static_chunk_size,
    )
    data = _section(raw, "dataset_conf", "config")
    fbank = _section(data, "fbank_conf", "dataset_conf")
    resample = _section(data, "resample_conf", "dataset_conf")
    mel = int(fbank.get("num_mel_bins", input_dim or 80))
    blank = int(enc_conf.get("blank_idx", 0))
    return ConformerMoEConfig(
        input_dim=mel,
        vocab_size=vocab_size,
        encoder=encoder,
        decoder=decoder,
        sos=vocab_size - 1,
        eos=vocab_size - 1,
        blank=blank,
        ctc_weight=float(mconf.get("ctc_weight", 0.3)),
        reverse_weight=float(mconf.get("reverse_weight", 0.0)),
        num_mel_bins=mel,
        frame_length=float(fbank.get("frame_length", 25)),
        frame_shift=float(fbank.get("frame_shift", 10)),
        sample_rate=int(resample.get("resample_rate", 16000)),
        embed_encoder=embed,
        moe=moe,
        proto=proto,
    )
