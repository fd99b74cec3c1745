"""WeNet ``train.yaml`` -> frozen, validated configs.

Every key of ``encoder_conf``/``decoder_conf`` is either understood (and validated), or a known
training-only knob (dropout rates, checkpointing, ...), or an error that names it. Options WeNet
offers that speechrt does not implement yet are errors too, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from speechrt.errors import ModelFormatError, UnsupportedOptionError

# Keys that only matter for training; accepted and ignored.
_TRAINING_ONLY = {
    "dropout_rate",
    "positional_dropout_rate",
    "attention_dropout_rate",
    "self_attention_dropout_rate",
    "src_attention_dropout_rate",
    "gradient_checkpointing",
    "use_sdpa",
    "use_dynamic_left_chunk",
    "global_cmvn",
    "input_size",
}

# Keys WeNet knows whose non-default values we do not implement (value shown is the default).
_UNIMPLEMENTED_DEFAULTS: dict[str, Any] = {
    "concat_after": False,
    "query_bias": True,
    "key_bias": True,
    "value_bias": True,
    "conv_bias": True,
    "layer_norm_type": "layer_norm",
    "norm_eps": 1e-5,
    "n_kv_head": None,
    "head_dim": None,
    "selfattention_layer_type_decoder": "selfattn",
    "tie_word_embedding": False,
    "src_attention": True,
    "use_output_layer": True,
    "conv_norm_eps": 1e-5,
    "conv_inner_factor": 2,
    "final_norm": True,
    "positional_encoding_layer_type": "abs_pos",
}


MLP_TYPES = ("position_wise_feed_forward", "moe", "gated")
# Activations the MoE experts run (speechrt.kernels.moe); WeNet also offers tanh, selu, hardtanh.
_MOE_ACTIVATIONS = ("swish", "silu", "relu", "gelu")


@dataclass(frozen=True)
class MlpConfig:
    """WeNet's feed-forward choice (``mlp_type`` and its knobs), shared by encoder and decoder.

    position_wise_feed_forward: ``w_2(act(w_1 x))``; gated: ``w_2(act(gate x) * w_1 x)`` (gate
    without bias); moe: ``n_expert`` position-wise experts, ``n_expert_activated`` per frame,
    weighted by the softmax of their router logits. ``bias``: WeNet's ``mlp_bias`` (w_1, w_2).
    """

    kind: str = "position_wise_feed_forward"
    bias: bool = True
    n_expert: int = 8
    n_expert_activated: int = 2
    activation: str = "swish"

    def __post_init__(self):
        if self.kind not in MLP_TYPES:
            raise UnsupportedOptionError(
                f"mlp_type '{self.kind}' is not supported ({', '.join(MLP_TYPES)})"
            )
        if self.kind != "moe":
            return
        if not 1 <= self.n_expert_activated <= self.n_expert:
            raise ModelFormatError(
                f"mlp_type moe needs 1 <= n_expert_activated ({self.n_expert_activated}) "
                f"<= n_expert ({self.n_expert})"
            )
        if self.activation not in _MOE_ACTIVATIONS:
            raise UnsupportedOptionError(
                f"mlp_type moe with activation '{self.activation}' is not supported "
                f"({', '.join(_MOE_ACTIVATIONS)})"
            )


def _check_keys(section: str, conf: dict, known: set[str]) -> None:
    for key, value in conf.items():
        if key in known or key in _TRAINING_ONLY:
            continue
        if key in _UNIMPLEMENTED_DEFAULTS:
            if value != _UNIMPLEMENTED_DEFAULTS[key] and not (
                key == "positional_encoding_layer_type" and value == "abs_pos"
            ):
                raise UnsupportedOptionError(
                    f"{section}.{key}={value!r} is not supported by speechrt yet"
                )
            continue
        raise ModelFormatError(f"unknown key {section}.{key} in train.yaml")


@dataclass(frozen=True)
class EncoderConfig:
    kind: str = "conformer"  # conformer | transformer
    output_size: int = 256
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 6
    input_layer: str = "conv2d"
    pos_enc_layer_type: str = "rel_pos"  # rel_pos | abs_pos | no_pos
    selfattention_layer_type: str = "rel_selfattn"  # rel_selfattn | selfattn
    normalize_before: bool = True
    static_chunk_size: int = 0
    use_dynamic_chunk: bool = False
    macaron_style: bool = True
    activation_type: str = "swish"
    use_cnn_module: bool = True
    cnn_module_kernel: int = 15
    causal: bool = False
    cnn_module_norm: str = "batch_norm"
    # eps of the block and final LayerNorms (WeNet's norm_eps; 3M-ASR uses 1e-12). The conv
    # module's norm keeps PyTorch's 1e-5.
    norm_eps: float = 1e-5
    # Which subsampled frames of a padded batch count as valid (see layers.subsampling):
    # "full_window" (WeNet) or "first_frame" (3M-ASR).
    subsampling_mask: str = "full_window"
    # The feed-forward of every block (macaron and second FFN alike): see MlpConfig.
    mlp_type: str = "position_wise_feed_forward"
    mlp_bias: bool = True
    n_expert: int = 8
    n_expert_activated: int = 2

    def __post_init__(self):
        _ = self.mlp  # validates the feed-forward options
        if self.kind not in ("conformer", "transformer"):
            raise UnsupportedOptionError(
                f"encoder '{self.kind}' is not supported (conformer, transformer)"
            )
        if self.output_size % self.attention_heads:
            raise ModelFormatError(
                f"encoder output_size {self.output_size} not divisible by "
                f"{self.attention_heads} heads"
            )
        if self.pos_enc_layer_type not in ("rel_pos", "abs_pos", "no_pos"):
            raise UnsupportedOptionError(
                f"pos_enc_layer_type '{self.pos_enc_layer_type}' is not supported "
                "(rel_pos, abs_pos, no_pos)"
            )
        if self.selfattention_layer_type not in ("rel_selfattn", "selfattn"):
            raise UnsupportedOptionError(
                f"selfattention_layer_type '{self.selfattention_layer_type}' is not supported"
            )
        if self.cnn_module_norm not in ("batch_norm", "layer_norm"):
            raise UnsupportedOptionError(f"cnn_module_norm '{self.cnn_module_norm}' unsupported")
        if self.subsampling_mask not in ("full_window", "first_frame"):
            raise UnsupportedOptionError(
                f"subsampling_mask '{self.subsampling_mask}' unsupported (full_window, first_frame)"
            )
        if self.conv and not self.causal and self.cnn_module_kernel % 2 == 0:
            raise ModelFormatError(
                f"a non-causal conv module needs an odd cnn_module_kernel, got "
                f"{self.cnn_module_kernel}"
            )

    @property
    def mlp(self) -> MlpConfig:
        return _mlp(self)

    @property
    def macaron(self) -> bool:
        return self.kind == "conformer" and self.macaron_style

    @property
    def conv(self) -> bool:
        return self.kind == "conformer" and self.use_cnn_module

    @property
    def rel_attention(self) -> bool:
        return self.selfattention_layer_type == "rel_selfattn"

    @property
    def streamable(self) -> bool:
        """Trained with chunk masks, so chunked / streaming decoding is meaningful."""
        return self.use_dynamic_chunk or self.static_chunk_size > 0


@dataclass(frozen=True)
class DecoderConfig:
    kind: str = "transformer"  # transformer | bitransformer
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 6
    r_num_blocks: int = 0
    normalize_before: bool = True
    activation_type: str = "relu"
    mlp_type: str = "position_wise_feed_forward"
    mlp_bias: bool = True
    n_expert: int = 8
    n_expert_activated: int = 2

    @property
    def mlp(self) -> MlpConfig:
        return _mlp(self)

    def __post_init__(self):
        _ = self.mlp  # validates the feed-forward options
        if self.kind not in ("transformer", "bitransformer"):
            raise UnsupportedOptionError(
                f"decoder '{self.kind}' is not supported (transformer, bitransformer)"
            )
        if self.kind == "bitransformer" and self.r_num_blocks <= 0:
            raise ModelFormatError("bitransformer decoder needs r_num_blocks > 0")


def _mlp(cfg: EncoderConfig | DecoderConfig) -> MlpConfig:
    return MlpConfig(
        cfg.mlp_type, cfg.mlp_bias, cfg.n_expert, cfg.n_expert_activated, cfg.activation_type
    )


@dataclass(frozen=True)
class ModelConfig:
    input_dim: int
    vocab_size: int
    encoder: EncoderConfig
    decoder: DecoderConfig | None
    sos: int
    eos: int
    blank: int = 0
    ctc_weight: float = 0.5
    reverse_weight: float = 0.0
    num_mel_bins: int = 80
    frame_length: float = 25.0
    frame_shift: float = 10.0
    sample_rate: int = 16000
    cmvn_file: str | None = None
    symbol_table: str | None = None
    bpe_model: str | None = None

    def __post_init__(self):
        for name in ("sos", "eos", "blank"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ModelFormatError(f"{name} id {value} outside vocab of {self.vocab_size}")


def _build(cls, section: str, conf: dict, extra: dict | None = None):
    names = {f.name for f in fields(cls)} - {"kind"}
    _check_keys(section, conf, names)
    kwargs = {k: v for k, v in conf.items() if k in names}
    kwargs.update(extra or {})
    return cls(**kwargs)


def _special_tokens(raw: dict, vocab: int) -> tuple[int, int, int]:
    tok = (raw.get("tokenizer_conf") or {}).get("special_tokens") or {}
    sos = tok.get("<sos>", tok.get("<sos/eos>", vocab - 1))
    eos = tok.get("<eos>", tok.get("<sos/eos>", vocab - 1))
    blank = tok.get("<blank>", (raw.get("ctc_conf") or {}).get("ctc_blank_id", 0))
    return int(sos), int(eos), int(blank)


def parse_train_yaml(raw: dict) -> ModelConfig:
    """Build a :class:`ModelConfig` from a loaded WeNet ``train.yaml`` dict."""
    if not isinstance(raw, dict) or "encoder" not in raw:
        raise ModelFormatError("train.yaml has no 'encoder' key: not a WeNet model config")
    model = raw.get("model", "asr_model")
    if model not in ("asr_model", None):
        raise UnsupportedOptionError(f"model '{model}' is not supported (asr_model)")
    try:
        vocab = int(raw.get("output_dim") or raw["vocab_size"])
        input_dim = int(raw["input_dim"])
    except KeyError as e:
        raise ModelFormatError(f"train.yaml lacks {e.args[0]}") from None
    enc_conf = dict(raw.get("encoder_conf") or {})
    if raw["encoder"] == "transformer":  # WeNet's TransformerEncoder defaults differ
        enc_conf.setdefault("activation_type", "relu")
        enc_conf.setdefault("pos_enc_layer_type", "abs_pos")
        enc_conf.setdefault("selfattention_layer_type", "selfattn")
    encoder = _build(EncoderConfig, "encoder_conf", enc_conf, {"kind": raw["encoder"]})
    decoder = None
    if raw.get("decoder"):
        decoder = _build(
            DecoderConfig,
            "decoder_conf",
            dict(raw.get("decoder_conf") or {}),
            {"kind": raw["decoder"]},
        )
    sos, eos, blank = _special_tokens(raw, vocab)
    mconf = raw.get("model_conf") or {}
    fb = ((raw.get("dataset_conf") or {}).get("fbank_conf")) or {}
    resample = ((raw.get("dataset_conf") or {}).get("resample_conf")) or {}
    cmvn_conf = raw.get("cmvn_conf") or {}
    tok_conf = raw.get("tokenizer_conf") or {}
    return ModelConfig(
        input_dim=input_dim,
        vocab_size=vocab,
        encoder=encoder,
        decoder=decoder,
        sos=sos,
        eos=eos,
        blank=blank,
        ctc_weight=float(mconf.get("ctc_weight", 0.5)),
        reverse_weight=float(mconf.get("reverse_weight", 0.0)),
        num_mel_bins=int(fb.get("num_mel_bins", input_dim)),
        frame_length=float(fb.get("frame_length", 25)),
        frame_shift=float(fb.get("frame_shift", 10)),
        sample_rate=int(resample.get("resample_rate", 16000)),
        cmvn_file=cmvn_conf.get("cmvn_file") or raw.get("cmvn_file"),
        symbol_table=tok_conf.get("symbol_table_path"),
        bpe_model=tok_conf.get("bpe_path"),
    )
