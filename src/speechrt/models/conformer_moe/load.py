"""Load a 3M-ASR model directory: config.yaml + final.nnet (+ global_cmvn, + a symbol table).

3M-ASR keeps the vocabulary size and the CMVN outside its config (command-line arguments of its
``recognize.py``), so they come from the checkpoint (``out_linear``) and the directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

from speechrt.engine.precision import Precision, cast_keeping_norms, parse_dtype
from speechrt.errors import ModelFormatError
from speechrt.models.conformer.load import want_fused_engine
from speechrt.models.conformer.tokenizer import SymbolTable
from speechrt.models.conformer_moe.config import PROTOS, ConformerMoEConfig, parse_3m_config
from speechrt.models.conformer_moe.convert import convert_3m_state_dict
from speechrt.models.conformer_moe.fused import FusedMoEEncoder, supports_fused_moe
from speechrt.models.conformer_moe.model import ConformerMoEASR, ConformerMoEModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
CHECKPOINT_NAME = "final.nnet"
CMVN_NAME = "global_cmvn"
UNIT_NAMES = ("units.txt", "words.txt", "tokens.txt", "lang_char.txt")


def is_conformer_moe_dir(path: str | Path) -> bool:
    """True for a directory with 3M-ASR's ``config.yaml`` and ``final.nnet``."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (path / CHECKPOINT_NAME).is_file()


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{path} is not a 3M-ASR config (not a mapping)")
    return raw


def _read_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a broken file
        raise ModelFormatError(f"cannot read checkpoint {ckpt}: {e}") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelFormatError(f"{ckpt} does not hold a state dict of tensors")
    return sd


def _dim0(sd: dict[str, torch.Tensor], key: str, what: str) -> int:
    if key not in sd:
        raise ModelFormatError(
            f"final.nnet lacks '{key}' ({what}): not a 3M-ASR Conformer-MoE checkpoint of this "
            "config's nnet_proto"
        )
    return int(sd[key].shape[0])


def read_config(
    path: Path, sd: dict[str, torch.Tensor], cmvn_dim: int | None
) -> ConformerMoEConfig:
    """Parse config.yaml, taking vocab size and expert count from the checkpoint ``sd``."""
    raw = _read_yaml(path / CONFIG_NAME)
    prefix = PROTOS.get(raw.get("nnet_proto", "conformer_aed_moe_catEmbed"), "encoder.")
    vocab = _dim0(sd, f"{prefix}out_linear.weight", "CTC head")
    experts = _dim0(sd, f"{prefix}blocks.0.feed_forward.experts.w_1.weight", "MoE experts")
    return parse_3m_config(raw, vocab, input_dim=cmvn_dim, num_experts_total=experts)


def _symbols(path: Path, vocab: int) -> SymbolTable:
    for name in UNIT_NAMES:
        if (path / name).is_file():
            table = SymbolTable.load(path / name)
            if len(table) != vocab:
                raise ModelFormatError(
                    f"{name} has {len(table)} units but the checkpoint's vocab is {vocab}"
                )
            return table
    logger.info("%s has no symbol table (%s): text shows token ids", path, ", ".join(UNIT_NAMES))
    return SymbolTable({i: f"[{i}]" for i in range(vocab)})


def load_conformer_moe(
    path: str | Path,
    device=None,
    dtype=None,
    engine: str = "auto",
    cuda_graphs: bool = True,
) -> ConformerMoEModel:
    """Load a 3M-ASR Conformer-MoE directory onto ``device`` (default: CUDA if available).

    engine: as :func:`~speechrt.models.conformer.load.load_wenet` -- ``"auto"`` runs the fused
    Triton encoder (embedding network, MoE blocks with routing + grouped expert GEMMs) and the
    fused rescoring decoder behind CUDA graphs on CUDA; ``"torch"`` the torch modules.

    Memory: the network is kept once, in ``dtype``; the engine reads the expert weights (the
    bulk of the model) and every other weight it can use as stored from the modules' own
    parameters, and holds private copies only of small fused tensors (Q/K/V concatenations, the
    channels-last conv front, float32 LayerNorm parameters): ``model.engine.weight_report()``.
    """
    from speechrt.audio.cmvn import load_global_cmvn

    path = Path(path)
    if not is_conformer_moe_dir(path):
        raise ModelFormatError(
            f"{path} is not a 3M-ASR model directory (needs {CONFIG_NAME} and {CHECKPOINT_NAME})"
        )
    cmvn = None
    if (path / CMVN_NAME).is_file():
        cmvn = load_global_cmvn(path / CMVN_NAME)
    src_sd = _read_state_dict(path / CHECKPOINT_NAME)
    cfg = read_config(path, src_sd, cmvn[0].shape[0] if cmvn is not None else None)
    if cmvn is None:
        logger.info("%s has no %s: features are not normalised", path, CMVN_NAME)
        cmvn = (torch.zeros(cfg.input_dim), torch.ones(cfg.input_dim))
    elif cmvn[0].shape[0] != cfg.input_dim:
        raise ModelFormatError(
            f"{CMVN_NAME} has {cmvn[0].shape[0]} dims but the model takes {cfg.input_dim} mel bins"
        )
    symbols = _symbols(path, cfg.vocab_size)
    net = ConformerMoEASR(cfg)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    net.load_state_dict(convert_3m_state_dict(src_sd, cfg, shapes), strict=True)
    del src_sd
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = parse_dtype(dtype)
    net = cast_keeping_norms(net, dtype, device)
    fast = None
    if want_fused_engine(net, device, engine, supports_fused_moe):
        fast = build_engine(net, Precision.of(dtype), cmvn, cuda_graphs)
    return ConformerMoEModel(net, symbols, path, device, dtype, *cmvn, engine=fast)


def build_engine(net: ConformerMoEASR, precision: Precision, cmvn, cuda_graphs: bool = True, **kw):
    """The :class:`~speechrt.engine.runner.ConformerEngine` of a Conformer-MoE network: its
    fused MoE encoder (global ``cmvn`` = (mean, istd) applied inside) and fused decoders.
    ``kw``: more ConformerEngine options (``buckets``)."""
    from speechrt.engine.runner import ConformerEngine

    encoder = FusedMoEEncoder(net.encoder, precision, cmvn=cmvn)
    return ConformerEngine(net, precision, cuda_graphs=cuda_graphs, encoder=encoder, **kw)
