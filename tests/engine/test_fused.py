"""The fused-kernel engine equals the torch modules (the reference), on the WeNet fixtures.

CPU runs the Triton kernels under TRITON_INTERPRET=1 (set by tests/conftest.py) in float32; the
``gpu`` tests check fp16/bf16 against the float32 reference at the hackathon gates and CUDA graphs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from speechrt.engine.batching import Buckets, pad_to
from speechrt.models.conformer import load_wenet

FIXTURES = ["conformer_ctc_aed", "u2pp_bidecoder"]
DEVICE = "cuda" if os.environ.get("SPEECHRT_TEST_DEVICE") == "cuda" else "cpu"
# On CUDA both paths use cuBLAS/cuDNN (TF32 convolutions by default) in different orders.
ATOL = 2e-4 if DEVICE == "cuda" else 2e-5


def _load(shared, name, **kw):
    d = shared / "fixtures" / "wenet" / name
    ref = dict(np.load(d / "reference.npz"))
    feats = torch.from_numpy(ref["feats"])
    lens = torch.from_numpy(ref["feats_lengths"]).long()
    return d, feats, lens


@pytest.fixture(autouse=True)
def _no_tf32():
    """Compare true float32 paths: cuDNN convolutions default to TF32 on CUDA."""
    with torch.backends.cudnn.flags(
        enabled=True, benchmark=False, deterministic=False, allow_tf32=False
    ):
        yield


@pytest.mark.parametrize("name", FIXTURES)
def test_fused_fp32_equals_torch(shared, name):
    d, feats, lens = _load(shared, name)
    ref = load_wenet(d, device=DEVICE, engine="torch")
    fast = load_wenet(d, device=DEVICE, engine="fused", cuda_graphs=False)
    a, al = ref.encode(feats, lens)
    b, bl = fast.encode(feats, lens)
    assert al.tolist() == bl.tolist()
    for i, n in enumerate(al.tolist()):
        torch.testing.assert_close(b[i, :n], a[i, :n], atol=ATOL, rtol=1e-5)
    kw = dict(
        method="attention_rescoring", beam_size=4, reverse_weight=0.3 if "u2pp" in name else 0.0
    )
    for x, y in zip(ref.decode(feats, lens, **kw), fast.decode(feats, lens, **kw)):
        assert [h for h, _ in x] == [h for h, _ in y]
        np.testing.assert_allclose([s for _, s in x], [s for _, s in y], atol=1e-4)


def test_streaming_chunk_mask_fused(shared):
    d, feats, lens = _load(shared, "u2pp_bidecoder")
    ref = load_wenet(d, device=DEVICE, engine="torch")
    fast = load_wenet(d, device=DEVICE, engine="fused", cuda_graphs=False)
    for left in (-1, 1):
        a, al = ref.encode(feats, lens, decoding_chunk_size=4, num_decoding_left_chunks=left)
        b, _ = fast.encode(feats, lens, decoding_chunk_size=4, num_decoding_left_chunks=left)
        for i, n in enumerate(al.tolist()):
            torch.testing.assert_close(b[i, :n], a[i, :n], atol=ATOL, rtol=1e-5)


def test_buckets_and_padding():
    bk = Buckets(batch_sizes=(1, 4, 16), length_step=64, max_length=256)
    assert bk.key(3, 100) == (4, 128)
    assert bk.key(17, 300) == (32, 512)  # above the largest size: multiples of it
    assert [bk.batch(b) for b in (16, 17, 32, 33, 48)] == [16, 32, 32, 48, 48]
    feats, lens = torch.randn(3, 100, 80), torch.tensor([100, 50, 7])
    pf, pl = pad_to(feats, lens, 4, 128)
    assert pf.shape == (4, 128, 80) and pl.tolist() == [100, 50, 7, 0]
    assert torch.equal(pf[:3, :100], feats) and pf[:, 100:].abs().sum() == 0


def _check_gates(a, al, b, dtype):
    """a0 (max |b - a|) and r0 (median relative error) over valid frames, against the gates."""
    diffs, rels = [], []
    for i, n in enumerate(al.tolist()):
        diff = (b[i, :n] - a[i, :n]).abs()
        diffs.append(float(diff.max()))
        rels.append((diff / a[i, :n].abs().clamp_min(1e-6)).flatten())
    a0_max, r0_max = (3.5e-2, 2e-3) if dtype == "fp16" else (0.1, 1e-2)
    assert max(diffs) < a0_max
    assert float(torch.cat(rels).median()) < r0_max


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("name", FIXTURES)
def test_half_precision_gates_and_graphs(shared, name, dtype):
    """Hackathon gates against FP32 (encoder a0 < 3.5e-2, r0 < 2e-3) for FP16. BF16 keeps 8
    mantissa bits (FP16: 11): its median relative error measured ~7e-3 on the H200, over the
    r0 gate, so it is held to a0 < 0.1 and r0 < 1e-2 here and reported as failing the gate in
    BENCHMARKS.md."""
    d, feats, lens = _load(shared, name)
    ref = load_wenet(d, device="cuda", engine="torch")
    fast = load_wenet(d, device="cuda", dtype=dtype, engine="fused", cuda_graphs=True)
    a, al = ref.encode(feats, lens)
    for _ in range(2):  # capture, then replay
        b, _ = fast.encode(feats, lens)
    _check_gates(a, al, b, dtype)
    assert fast.engine._enc_graphs.stats.replays >= 1


def test_graph_keys_are_bucketed(shared):
    """Utterances of nearby lengths share one captured graph per stage (no capture per length)."""
    d, feats, lens = _load(shared, "u2pp_bidecoder")
    model = load_wenet(d, device=DEVICE, engine="fused", cuda_graphs=False)
    eng = model.engine
    keys: dict[str, set] = {"enc": set(), "ctc": set(), "resc": set()}
    for name, attr in (("enc", "_enc_graphs"), ("ctc", "_ctc_graphs"), ("resc", "_dec_graphs")):
        runner = getattr(eng, attr)

        def record(key, *inputs, _runner=runner, _name=name):
            keys[_name].add(key)
            return _runner.fn(*inputs)

        setattr(eng, attr, record)
    for n in (130, 150, 170):  # three lengths inside one 64-frame bucket (129..192)
        model.decode(feats[:1, :n], torch.tensor([n]), method="attention_rescoring", beam_size=4)
    assert len(keys["enc"]) == len(keys["ctc"]) == len(keys["resc"]) == 1
    (resc,) = keys["resc"]
    assert resc[1] in eng.buckets.batch_sizes and resc[4] % 16 == 0


@pytest.mark.parametrize(
    "triton_front, triton_ffn, triton_glu, triton_linear",
    [(True, False, True, True), (False, True, False, False)],
)
def test_kernel_switches_equal_torch(shared, triton_front, triton_ffn, triton_glu, triton_linear):
    """The encoder with its conv subsampling front on the Triton kernel (CMVN + both convs in
    one launch) or on cuDNN/ATen convs, with the FFN activation fused into the first FFN GEMM
    or not, with the conv module's GLU in pw1's epilogue or in the depthwise-conv kernel, and
    with the Q/K/V, attention-output and pw2 GEMMs on linear_act or cuBLAS, against the torch
    modules (float32; triton_linear is off by default)."""
    d, feats, lens = _load(shared, "conformer_ctc_aed")
    ref = load_wenet(d, device=DEVICE, engine="torch")
    fast = load_wenet(d, device=DEVICE, engine="fused", cuda_graphs=False)
    enc = fast.engine.encoder
    # The defaults: on with CUDA + Triton (measured faster on the H200), off elsewhere.
    on = DEVICE == "cuda"
    assert (enc.triton_front, enc.triton_ffn, enc.triton_glu) == (on, on, on)
    assert not enc.triton_linear
    enc.triton_front, enc.triton_ffn, enc.triton_glu = triton_front, triton_ffn, triton_glu
    enc.triton_linear = triton_linear
    a, al = ref.encode(feats, lens)
    b, bl = fast.encode(feats, lens)
    assert al.tolist() == bl.tolist()
    for i, n in enumerate(al.tolist()):
        torch.testing.assert_close(b[i, :n], a[i, :n], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("name", FIXTURES)
def test_linear_add_layer_norm_switch_equals_torch(shared, name, monkeypatch):
    """The four GEMM -> residual add + LayerNorm sites of every block as one fused kernel each
    (triton_add_ln, off by default) against the torch modules; all four sites take the kernel."""
    import speechrt.models.conformer.fused as fused_mod

    kernel, calls = fused_mod.linear_add_layer_norm, []

    def spy(*args, **kw):
        calls.append(args[1].shape)
        return kernel(*args, **kw)

    monkeypatch.setattr(fused_mod, "linear_add_layer_norm", spy)
    d, feats, lens = _load(shared, name)
    ref = load_wenet(d, device=DEVICE, engine="torch")
    fast = load_wenet(d, device=DEVICE, engine="fused", cuda_graphs=False)
    enc = fast.engine.encoder
    assert not enc.triton_add_ln  # the default in float32: off
    enc.triton_add_ln = True
    a, al = ref.encode(feats, lens)
    b, bl = fast.encode(feats, lens)
    assert len(calls) == 4 * len(enc.blocks)
    assert al.tolist() == bl.tolist()
    for i, n in enumerate(al.tolist()):
        torch.testing.assert_close(b[i, :n], a[i, :n], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("dtype, default", [("bf16", True), ("fp16", False)])
def test_fp32_branches_switch(shared, dtype, default, monkeypatch):
    """fp32_branches (default on for bf16 only): the four residual-branch GEMMs of every block
    and the front's projection hand float32 accumulators to the float32 stream. The output stays
    within the half-precision bounds of the FP32 torch reference either way. (Its accuracy gain
    is measured on the trained model, bench/precision_probe.py: on this small random fixture the
    input roundings dominate.)"""
    import speechrt.models.conformer.fused as fused_mod

    kernel, calls = fused_mod.linear_fp32_out, []

    def spy(*args, **kw):
        calls.append(args[1].shape)
        return kernel(*args, **kw)

    monkeypatch.setattr(fused_mod, "linear_fp32_out", spy)
    d, feats, lens = _load(shared, "conformer_ctc_aed")
    ref = load_wenet(d, device=DEVICE, engine="torch")
    fast = load_wenet(d, device=DEVICE, dtype=dtype, engine="fused", cuda_graphs=False)
    enc = fast.engine.encoder
    assert enc.fp32_branches is default and not enc.tf32_attention
    enc.triton_add_ln = False  # on CUDA bf16 defaults to the fused GEMM + add + LN sites instead
    a, al = ref.encode(feats, lens)
    for on in (True, False):
        enc.fp32_branches = on
        calls.clear()
        b, _ = fast.encode(feats, lens)
        assert b.dtype == torch.float32
        assert len(calls) == (4 * len(enc.blocks) + 1 if on else 0)
        _check_gates(a, al, b, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_triton_add_ln_half_precision_graphs(shared, dtype):
    """The fused GEMM + add + LayerNorm sites with the other CUDA defaults, captured in a graph:
    same gates as test_half_precision_gates_and_graphs."""
    d, feats, lens = _load(shared, "conformer_ctc_aed")
    ref = load_wenet(d, device="cuda", engine="torch")
    fast = load_wenet(d, device="cuda", dtype=dtype, engine="fused", cuda_graphs=True)
    fast.engine.encoder.triton_add_ln = True
    a, al = ref.encode(feats, lens)
    for _ in range(2):  # capture, then replay
        b, _ = fast.encode(feats, lens)
    _check_gates(a, al, b, dtype)
    assert fast.engine._enc_graphs.stats.replays >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_triton_ffn_half_precision_graphs(shared, dtype):
    """FFN activation fused into the first GEMM (and the Triton conv front, the CUDA default),
    captured in a graph: same gates as test_half_precision_gates_and_graphs."""
    d, feats, lens = _load(shared, "conformer_ctc_aed")
    ref = load_wenet(d, device="cuda", engine="torch")
    fast = load_wenet(d, device="cuda", dtype=dtype, engine="fused", cuda_graphs=True)
    assert fast.engine.encoder.triton_front
    fast.engine.encoder.triton_ffn = True
    a, al = ref.encode(feats, lens)
    for _ in range(2):  # capture, then replay
        b, _ = fast.encode(feats, lens)
    _check_gates(a, al, b, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_fused_ffn_switch(shared, dtype, monkeypatch):
    """fused_ffn (off by default): the macaron and the second FFN of every block, each with its
    residual add and LayerNorm, as one ffn_add_layer_norm kernel. On gives the output of off
    (float32: and of the torch modules) within tolerance; off never calls the kernel. The row
    threshold is lifted: the fixture's few frames would keep the two-kernel path on a GPU."""
    import speechrt.models.conformer.fused as fused_mod

    kernel, calls = fused_mod.ffn_add_layer_norm, []

    def spy(*args, **kw):
        calls.append(args[1].shape)
        return kernel(*args, **kw)

    monkeypatch.setattr(fused_mod, "ffn_add_layer_norm", spy)
    monkeypatch.setattr(fused_mod, "FUSED_FFN_ROWS_PER_SM", 0)
    d, feats, lens = _load(shared, "conformer_ctc_aed")
    ref = load_wenet(d, device=DEVICE, engine="torch")
    fast = load_wenet(d, device=DEVICE, dtype=dtype, engine="fused", cuda_graphs=False)
    enc = fast.engine.encoder
    assert not enc.fused_ffn
    a, al = ref.encode(feats, lens)
    off, _ = fast.encode(feats, lens)
    assert not calls
    enc.fused_ffn = True
    on, ol = fast.encode(feats, lens)
    assert len(calls) == 2 * len(enc.blocks)
    assert al.tolist() == ol.tolist()
    for i, n in enumerate(al.tolist()):
        if dtype == "fp32":
            torch.testing.assert_close(on[i, :n], a[i, :n], atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(on[i, :n], off[i, :n], atol=ATOL, rtol=1e-5)
        else:  # off rounds each FFN branch to float16 before the float32 add, on does not
            torch.testing.assert_close(on[i, :n], off[i, :n], atol=1e-2, rtol=1e-2)
    if dtype == "fp16":
        _check_gates(a, al, on, dtype)
