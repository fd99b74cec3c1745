import torch
import speechrt.models.conformer.fused as fm
import speechrt.kernels.layer_norm as lnm
from speechrt.benchmark.conformer import build_models
from speechrt.benchmark.common import graph_ms_per_call, strict_fp32, error_stats, valid_rows, cuda_time_ms
from speechrt.engine.precision import Precision
from speechrt.engine.runner import ConformerEngine
net = build_models(0, "cuda")
eng = ConformerEngine(net, Precision.of("fp16"), cuda_graphs=True)
enc = eng.encoder
widen_new = fm.widen_layer_norm
def widen_old(x, w, b, eps, dtype, y_dtype):
    x = x.to(dtype); return x, lnm.layer_norm(x, w, b, eps, y_dtype=y_dtype)
def setv(name):
    new = name == "new"
    lnm.NARROW_TILE = (4, 4) if (new or name in ("side_off", "widen_off")) else (16, 8)
    fm.SIDE_STREAM_LENGTHS = new or name in ("ln_old", "widen_off")
    fm.widen_layer_norm = widen_new if (new or name in ("ln_old", "side_off")) else widen_old
    if name == "ln_old": lnm.NARROW_TILE = (16, 8)
    if name == "side_off": fm.SIDE_STREAM_LENGTHS = False
    if name == "widen_off": fm.widen_layer_norm = widen_old
variants = ["old", "new", "ln_old", "side_off", "widen_off"]
shapes = [(64,256),(16,1024),(64,1024),(16,256),(4,1024),(1,1024),(64,16)]
with torch.inference_mode():
    for b, t in shapes:
        feats = torch.randn(b, t, 80, device="cuda"); lens = torch.full((b,), t, dtype=torch.long, device="cuda")
        lens2 = lens.clone(); lens2[b // 2:] = t - 37
        res = {}
        for v in ("old", "new"):
            setv(v)
            with strict_fp32():
                ref, rl = net.encoder(feats, lens2)
            out, ol = enc.forward(feats, lens2)
            assert torch.equal(ol, rl)
            res[f"a0r0_{v}"] = [round(z, 5) for z in error_stats(valid_rows(out.float(), ol), valid_rows(ref, rl))]
        for rep in range(3):
            for v in variants:
                setv(v)
                res.setdefault(v, []).append(round(graph_ms_per_call([lambda: enc.forward(feats, lens)], reps=20), 4))
        med = {v: sorted(res[v])[1] for v in variants}
        print(f"{b}x{t}", {k: v for k, v in res.items() if k.startswith("a0")}, "median", med, flush=True)
    setv("new")
    # engine encode (graphs incl. side stream capture) vs replay
    for b, t in [(64,256),(16,1024)]:
        feats = torch.randn(b, t, 80, device="cuda"); lens = torch.full((b,), t, dtype=torch.long, device="cuda")
        o1, l1 = eng.encode(feats, lens); o2, l2 = enc.forward(feats, lens)
        assert torch.equal(l1, l2) and torch.equal(o1, o2[:, :o1.shape[1]]), (o1 - o2).abs().max()
        print(f"encode {b}x{t}", [round(cuda_time_ms(lambda: eng.encode(feats, lens), budget_s=1.0), 4) for _ in range(3)], flush=True)
