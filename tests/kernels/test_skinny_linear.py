"""skinny_linear (LayerNorm prologue, bias, GELU, in-place residual epilogue) against the torch
reference and a float64 formula.

Few rows (1, 3, 16) and more than one row block (20), K not a multiple of the K tile, odd N;
both inner products (broadcast + sum, tl.dot); float32 held to 1e-5, half precision to twice
PyTorch's own same-dtype error against the float32 reference (bfloat16 only on the GPU: the
interpreter truncates float32 -> bfloat16).
"""

from __future__ import annotations

import pytest
import torch

from speechrt.errors import UnsupportedOptionError
from speechrt.kernels._utils import next_power_of_2
from speechrt.kernels.skinny_linear import (
    CONFIGS,
    MAX_ROW_TILE,
    SkinnyConfig,
    skinny_linear,
    skinny_linear_ref,
    split_config,
)
from speechrt.kernels.skinny_split import fold_layer_norm

K, N = 77, 45  # K: not a multiple of any K tile; N: odd
SUM_CFG = SkinnyConfig(False, 4, 8, 32, 4, 1)  # 3 K steps, 6 column blocks, rows in blocks of 4
DOT_CFG = SkinnyConfig(True, 16, 16, 32, 4, 1)
ROW_CFG = SkinnyConfig(False, 2, 8, 0, 4, 1)  # whole-row kernel, rows in blocks of 2
WALK_CFG = SkinnyConfig(False, 1, 4, 0, 4, 1, 2)  # whole-row, 2 programs walk 12 blocks, 1 row
SPLIT_CFG = split_config(16, 32)  # split-K: 3 chunks of K, 3 column blocks, last chunk combines
CHUNK_CFG = split_config(16, 128)  # split-K kernel with one chunk: no combine
CONFIG_IDS = {
    None: "default", SUM_CFG: "sum", DOT_CFG: "dot", ROW_CFG: "row", WALK_CFG: "walk",
    SPLIT_CFG: "split", CHUNK_CFG: "chunk",
}  # fmt: skip
ALL_CFGS = [None, SUM_CFG, DOT_CFG, ROW_CFG, WALK_CFG, SPLIT_CFG, CHUNK_CFG]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _weights(n, k, device, dtype, bias=True):
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    b = (0.5 * torch.randn(n, device=device)).to(dtype) if bias else None
    return w, b


def _ln(k, device, eps=1e-5):
    return 1 + 0.2 * torch.randn(k, device=device), 0.2 * torch.randn(k, device=device), eps


def _stream(m, k, device):
    """A float32 residual stream with a large mean and spread (as deep decoder layers have)."""
    return 4 * torch.randn(m, k, device=device) + 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ALL_CFGS, ids=CONFIG_IDS.get)
@pytest.mark.parametrize("m", [1, 3, 16, 20])
def test_ln_prologue_bias_gelu(m, config, dtype, device, check_output):
    """hid = GELU(LN(x) @ W^T + b) from the float32 stream, out in the weight dtype."""
    x = _stream(m, K, device)
    w, b = _weights(N, K, device, dtype)
    ln = _ln(K, device)
    y = skinny_linear(x, w, b, ln=ln, activation="gelu", config=config)
    gold = skinny_linear_ref(x, w, b, ln=ln, activation="gelu", upcast=True)
    torch_y = skinny_linear_ref(x, w, b, ln=ln, activation="gelu")
    assert y.dtype == dtype
    check_output(y, gold, torch_y, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ALL_CFGS, ids=CONFIG_IDS.get)
@pytest.mark.parametrize("m", [1, 3, 16, 20])
def test_residual_epilogue(m, config, dtype, device, check_output):
    """x += z @ W^T + b in place on the float32 stream (z in the weight dtype)."""
    z = torch.randn(m, K, device=device).to(dtype)
    w, b = _weights(N, K, device, dtype)
    r0 = _stream(m, N, device)
    r = r0.clone()
    out = skinny_linear(z, w, b, residual=r, config=config)
    assert out is r and r.dtype == torch.float32
    gold = skinny_linear_ref(z, w, b, residual=r0.clone(), upcast=True)
    torch_r = skinny_linear_ref(z, w, b, residual=r0.clone())
    check_output(r, gold, torch_r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", ALL_CFGS, ids=CONFIG_IDS.get)
def test_logits_float32_out_no_bias(config, dtype, device, check_output):
    """logits = LN_final(x) @ E^T, float32 out, no bias, (B, 1, D) input."""
    x = _stream(3, K, device).view(3, 1, K)
    w, _ = _weights(301, K, device, dtype, bias=False)
    ln = _ln(K, device)
    out = torch.full((3, 1, 301), float("nan"), device=device)
    y = skinny_linear(x, w, ln=ln, out=out, out_dtype=torch.float32, config=config)
    assert y is out and y.shape == (3, 1, 301)
    gold = skinny_linear_ref(x, w, ln=ln, out_dtype=torch.float32, upcast=True)
    torch_y = skinny_linear_ref(x, w, ln=ln, out_dtype=torch.float32)
    check_output(y, gold, torch_y, dtype)


@pytest.mark.parametrize("m", [1, 5])
def test_float64_formula(m, device):
    """LayerNorm, GEMM, bias and erf GELU against their float64 definitions (float32 kernel)."""
    x = _stream(m, K, device)
    w, b = _weights(N, K, device, torch.float32)
    (lw, lb, eps) = _ln(K, device)
    xd = x.double()
    mean = xd.mean(dim=-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(dim=-1, keepdim=True)
    h = (xd - mean) / torch.sqrt(var + eps) * lw.double() + lb.double()
    pre = h @ w.double().T + b.double()
    gold = 0.5 * pre * (1 + torch.erf(pre / 2**0.5))
    y = skinny_linear(x, w, b, ln=(lw, lb, eps), activation="gelu")
    torch.testing.assert_close(y.double(), gold, atol=2e-5, rtol=1e-5)


def test_ln_without_affine_and_strided_rows(device):
    """LN weight/bias None; x rows with a stride (a slice of a wider tensor); no bias."""
    wide = _stream(4, K + 11, device)
    x = wide[:, 5 : 5 + K]  # (4, K), row stride K + 11
    w, _ = _weights(N, K, device, torch.float32, bias=False)
    ln = (None, None, 1e-6)
    y = skinny_linear(x, w, ln=ln, config=SUM_CFG)
    torch.testing.assert_close(y, skinny_linear_ref(x, w, ln=ln), atol=1e-5, rtol=1e-5)


def test_half_rows_need_no_ln(device):
    """Float16 x without LN: the multiply reads x as is."""
    x = torch.randn(2, K, device=device).half()
    w, b = _weights(N, K, device, torch.float16)
    gold = skinny_linear_ref(x, w, b, upcast=True).half()
    torch.testing.assert_close(skinny_linear(x, w, b), gold, atol=2e-3, rtol=2e-3)


def test_default_configs_are_valid(monkeypatch):
    """The GPU defaults (the interpreter never runs them here) fit the kernels' rules: up to 4
    rows the whole-row kernel within its tile and with >= 4 programs per SM where N allows."""
    import speechrt.kernels.skinny_linear as sl

    monkeypatch.setattr(sl, "interpreting", lambda: False)
    for m in (1, 2, 4, 8, 16, 64):
        for n, k in ((1280, 1280), (3840, 1280), (5120, 1280), (1280, 5120), (51866, 1280)):
            cfg = sl.default_config(m, n, k, torch.device("cpu"))
            assert cfg.use_dot == (m > 4) and not cfg.split
            if cfg.use_dot:
                assert cfg.block_n in (16, 32, 64) and 16 <= cfg.block_k <= 512
            else:
                assert cfg.block_k == 0 and cfg.block_m == sl.MAX_ROW_ROWS
                assert cfg.block_n * sl.next_power_of_2(k) <= sl.MAX_ROW_TILE
                assert cfg.block_n == 1 or sl.cdiv(n, cfg.block_n) >= 4 * 132
    monkeypatch.setattr(sl, "MANY_ROWS", "split")
    for m in (8, 16, 64):
        for n, k in ((1280, 1280), (3840, 1280), (5120, 1280), (1280, 5120), (51866, 1280)):
            cfg = sl.default_config(m, n, k, torch.device("cpu"))
            assert cfg.split and cfg.block_n in (16, 32, 64) and cfg.block_k in (256, 512)
            programs = sl.cdiv(n, cfg.block_n) * sl.cdiv(k, cfg.block_k)
            assert cfg.block_n == 16 or programs >= 2 * 132  # >= 2 programs per SM
    monkeypatch.setattr(sl, "MANY_ROWS", "dot")
    k_long = 2 * sl.MAX_ROW_TILE  # too long for one tile: the tl.dot kernel
    assert sl.default_config(1, 64, k_long, torch.device("cpu")).use_dot
    assert all(not c.use_dot or c.block_n >= 16 for c in CONFIGS)
    assert all(c.block_k or not c.use_dot for c in CONFIGS)


@pytest.mark.parametrize("m", [2, 16, 33])
def test_split_counters_left_zeroed_and_reused(m, device):
    """One caller-owned counter workspace serves several split-K launches in a row (different
    shapes), the LayerNorm fold given precomputed, and is zero after each; the wide config's
    combining program sums its 5 chunks' partials 2 at a time."""
    counters = torch.zeros(64, dtype=torch.int32, device=device)
    x = _stream(m, K, device)
    ln = _ln(K, device)
    for n, cfg in ((N, SPLIT_CFG), (20, SPLIT_CFG), (N, split_config(256, 16))):
        w, b = _weights(n, K, device, torch.float32)
        fold = fold_layer_norm(w, b, ln[0], ln[1])
        y = skinny_linear(x, w, b, ln=ln, config=cfg, ln_fold=fold, counters=counters)
        gold = skinny_linear_ref(x, w, b, ln=ln, upcast=True)
        torch.testing.assert_close(y, gold, atol=2e-5, rtol=2e-5)
        assert counters.count_nonzero() == 0
    with pytest.raises(ValueError, match="counters"):
        skinny_linear(x, w, b, ln=ln, config=SPLIT_CFG, counters=counters[:1])
    with pytest.raises(ValueError, match="counters"):
        skinny_linear(x, w, b, ln=ln, config=SPLIT_CFG, counters=counters.long())


def test_fold_layer_norm_formula(device):
    """LN(x) @ W^T + b == rstd * ((x * g) @ W^T - mean * c) + d, in float64."""
    x = _stream(3, K, device).double()
    w, b = _weights(N, K, device, torch.float64)
    g, beta, eps = (t.double() if torch.is_tensor(t) else t for t in _ln(K, device))
    c, d = fold_layer_norm(w, b, g, beta)
    assert c.dtype == d.dtype == torch.float32 and c.shape == d.shape == (N,)
    mean = x.mean(dim=1, keepdim=True)
    rstd = 1 / torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + eps)
    folded = rstd * ((x * g) @ w.T - mean * c.double()) + d.double()
    gold = torch.nn.functional.layer_norm(x, (K,), g, beta, eps) @ w.T + b
    torch.testing.assert_close(folded, gold, atol=1e-5, rtol=1e-5)
    c0, d0 = fold_layer_norm(w, None, None, None)
    torch.testing.assert_close(c0.double(), w.sum(dim=1), atol=1e-5, rtol=1e-5)
    assert d0.count_nonzero() == 0


def test_split_rejects_int8_weights(device):
    x = _stream(5, K, device)
    w, _ = _weights(N, K, device, torch.float16)
    q, scale = quantize_rows(w)
    with pytest.raises(UnsupportedOptionError, match="split-K"):
        skinny_linear(x, q, torch.zeros(N, device=device).half(), ln=_ln(K, device),
                      weight_scale=scale, config=SPLIT_CFG)  # fmt: skip


def test_whole_row_rejects_oversized_tiles(device):
    x = torch.randn(1, 3000, device=device).half()
    w = torch.randn(32, 3000, device=device).half()
    big = SkinnyConfig(False, 1, 16, 0, 4, 1)  # 16 x 4096 > MAX_ROW_TILE
    with pytest.raises(UnsupportedOptionError, match="whole-row"):
        skinny_linear(x, w, config=big)
    with pytest.raises(UnsupportedOptionError, match="whole-row"):
        skinny_linear(x, w, config=SkinnyConfig(False, 8, 1, 0, 4, 1))


def test_rejects_bad_inputs(device):
    x = torch.randn(2, 8, device=device)
    w, b = _weights(6, 8, device, torch.float32)
    ln = _ln(8, device)
    with pytest.raises(UnsupportedOptionError, match="tanh"):
        skinny_linear(x, w, b, activation="tanh")
    with pytest.raises(ValueError, match="weight"):
        skinny_linear(x, w[:, :7], b)
    with pytest.raises(ValueError, match="bias"):
        skinny_linear(x, w, b[:5])
    with pytest.raises(ValueError, match="float32 x needs ln"):
        skinny_linear(x, w.half(), b.half())
    with pytest.raises(ValueError, match="ln weight"):
        skinny_linear(x, w, b, ln=(ln[0].half(), ln[1], 1e-5))
    with pytest.raises(ValueError, match="ln must be"):
        skinny_linear(x, w, b, ln=(ln[0], ln[1]))
    with pytest.raises(ValueError, match="residual must be"):
        skinny_linear(x, w, b, residual=torch.zeros(2, 6, device=device).half())
    with pytest.raises(ValueError, match="residual must be"):
        skinny_linear(x, w, b, residual=torch.zeros(3, 6, device=device))
    with pytest.raises(ValueError, match="exclusive"):
        skinny_linear(x, w, b, residual=torch.zeros(2, 6, device=device), out_dtype=torch.float32)
    with pytest.raises(ValueError, match="share memory"):
        stream = torch.zeros(2, 8, device=device)
        skinny_linear(stream, torch.randn(8, 8, device=device), ln=ln, residual=stream)
    with pytest.raises(ValueError, match="out must be"):
        skinny_linear(x, w, b, out=torch.empty(2, 6, device=device).half())
    with pytest.raises(TypeError, match="x must be"):
        skinny_linear(x.long(), w, b)


def test_imports_without_triton(import_without_triton):
    module = import_without_triton("speechrt.kernels.skinny_linear")
    x = torch.randn(2, 8)
    w, b = _weights(6, 8, "cpu", torch.float32)
    with pytest.raises(UnsupportedOptionError, match="triton"):
        module.skinny_linear(x, w, b)
    torch.testing.assert_close(module.skinny_linear_ref(x, w, b), x @ w.T + b)


# ------------------------------------------------------------------------------------- GPU
WHISPER_SHAPES = [  # (N, K, ln, activation, residual): large-v3 decode GEMMs
    (3840, 1280, True, "identity", False),
    (1280, 1280, False, "identity", True),
    (5120, 1280, True, "gelu", False),
    (1280, 5120, False, "identity", True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, *CONFIGS], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_whisper_shapes_every_config(m, dtype, config, device, check_output):
    """Every benchmarked config at the large-v3 decode shapes (no timing)."""
    for n, k, has_ln, act, has_res in WHISPER_SHAPES:
        w, b = _weights(n, k, device, dtype)
        if config is not None and not config.block_k:
            if config.block_n * next_power_of_2(k) > MAX_ROW_TILE:
                with pytest.raises(UnsupportedOptionError, match="whole-row"):
                    skinny_linear(_stream(m, k, device), w, b, ln=_ln(k, device), config=config)
                continue
        ln = _ln(k, device) if has_ln else None
        x = _stream(m, k, device) if has_ln else torch.randn(m, k, device=device).to(dtype)
        kwargs = {"ln": ln, "activation": act}
        if has_res:
            r0 = _stream(m, n, device)
            y = skinny_linear(x, w, b, residual=r0.clone(), config=config, **kwargs)
            gold = skinny_linear_ref(x, w, b, residual=r0.clone(), upcast=True, **kwargs)
            torch_y = skinny_linear_ref(x, w, b, residual=r0.clone(), **kwargs)
        else:
            y = skinny_linear(x, w, b, config=config, **kwargs)
            gold = skinny_linear_ref(x, w, b, upcast=True, **kwargs)
            torch_y = skinny_linear_ref(x, w, b, **kwargs)
        if config is not None and config.split and has_ln and dtype == torch.bfloat16:
            # the folded LayerNorm rounds (x - x[0]) * g, not LN(x), to bfloat16: the result
            # may round to the neighbouring bfloat16 output (H200: one ulp where PyTorch's
            # own error was smaller); allow that one ulp, no more
            ulp = float(gold.float().abs().max()) * 2.0**-7
            err = float((y.float() - gold.float()).abs().max())
            torch_err = float((torch_y.float() - gold.float()).abs().max())
            assert err <= 2 * torch_err + ulp, (err, torch_err, ulp)
            continue
        check_output(y, gold, torch_y, dtype)


@pytest.mark.gpu
def test_cuda_graph_replay(device):
    """A captured call replays with new inputs (no allocation depends on data)."""
    w, b = _weights(1280, 1280, device, torch.float16)
    ln = _ln(1280, device)
    x = _stream(4, 1280, device)
    skinny_linear(x, w, b, ln=ln)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = skinny_linear(x, w, b, ln=ln)
    x.copy_(_stream(4, 1280, device))
    graph.replay()
    torch.cuda.synchronize()
    gold = skinny_linear_ref(x, w, b, ln=ln, upcast=True)
    torch.testing.assert_close(y.float(), gold.float(), atol=4e-3, rtol=4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 40])
def test_split_cuda_graph_replays_with_its_counters(m, device):
    """A captured split-K call (shared counters, LayerNorm fold) replays with new inputs, twice,
    and leaves its counters zeroed."""
    w, b = _weights(5120, 1280, device, torch.float16)
    ln = _ln(1280, device)
    fold = fold_layer_norm(w, b, ln[0], ln[1])
    counters = torch.zeros(4096, dtype=torch.int32, device=device)
    x = _stream(m, 1280, device)
    kwargs = {"ln": ln, "activation": "gelu", "ln_fold": fold, "counters": counters}
    skinny_linear(x, w, b, config=split_config(32, 256), **kwargs)  # compile outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = skinny_linear(x, w, b, config=split_config(32, 256), **kwargs)
    for _ in range(2):
        x.copy_(_stream(m, 1280, device))
        graph.replay()
        torch.cuda.synchronize()
        gold = skinny_linear_ref(x, w, b, ln=ln, activation="gelu", upcast=True)
        torch.testing.assert_close(y.float(), gold.float(), atol=4e-3, rtol=4e-3)
        assert counters.count_nonzero() == 0


# ------------------------------------------------------------------------------ int8 weights
def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: (q (N, K) int8, scale (N,) float32), a slow oracle."""
    amax = w.float().abs().amax(dim=1).clamp_min(1e-12)
    scale = amax / 127.0
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@pytest.mark.parametrize("config", [None, ROW_CFG, WALK_CFG], ids=CONFIG_IDS.get)
@pytest.mark.parametrize("m", [1, 3])
def test_int8_weights_ln_gelu_and_residual(m, config, device):
    """int8 weights + per-row scales equal the float32 math on the dequantised weights (the
    LayerNorm output rounded to the bias dtype, float16): LN + GELU out, and residual add."""
    w, b = _weights(N, K, device, torch.float16)
    q, scale = quantize_rows(w)
    ln = _ln(K, device)
    x = _stream(m, K, device)
    y = skinny_linear(x, q, b, ln=ln, activation="gelu", weight_scale=scale, config=config)
    gold = skinny_linear_ref(x, q, b, ln=ln, activation="gelu", weight_scale=scale, upcast=True)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), gold.float(), atol=2e-3, rtol=2e-3)
    deq = (q.float() * scale[:, None]).half()  # the quantisation error itself is small
    assert (deq.float() - w.float()).abs().max() <= scale.max() / 2 + 1e-3
    z = torch.randn(m, K, device=device).half()
    r0 = _stream(m, N, device)
    r = skinny_linear(z, q, b, residual=r0.clone(), weight_scale=scale, config=config)
    gold = skinny_linear_ref(z, q, b, residual=r0.clone(), weight_scale=scale, upcast=True)
    torch.testing.assert_close(r, gold, atol=1e-4, rtol=1e-4)


def test_int8_weights_reject_bad_inputs(device):
    w, b = _weights(N, K, device, torch.float16)
    q, scale = quantize_rows(w)
    x = torch.randn(2, K, device=device).half()
    with pytest.raises(ValueError, match="weight_scale"):
        skinny_linear(x, q, b)
    with pytest.raises(ValueError, match="weight_scale"):
        skinny_linear(x, q, b, weight_scale=scale[:-1])
    with pytest.raises(ValueError, match="bias"):
        skinny_linear(x, q, None, weight_scale=scale)
    with pytest.raises(ValueError, match="x is"):
        skinny_linear(x.float(), q, b, weight_scale=scale)
    with pytest.raises(UnsupportedOptionError, match="whole-row"):
        skinny_linear(x, q, b, weight_scale=scale, config=DOT_CFG)
