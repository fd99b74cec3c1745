import torch
import speechrt.models.conformer.fused as fm
import speechrt.kernels.linear_act as la
from speechrt.benchmark.conformer import build_models
from speechrt.benchmark.common import graph_ms_per_call, strict_fp32, error_stats, valid_rows
from speechrt.engine.precision import Precision
from speechrt.engine.runner import ConformerEngine
net = build_models(0, "cuda")
eng = ConformerEngine(net, Precision.of("fp16"), cuda_graphs=True)
enc = eng.encoder
NARROW = la.TMA_CONFIG_NARROW
def setv(v):
    la.TMA_CONFIG_NARROW = NARROW if v in ("narrow", "both") else None
    fm.BRANCH_LINEAR_ACT = v in ("branch", "both")
variants = ["base", "narrow", "both", "branch"]
shapes = [(64,256),(16,1024),(64,1024),(16,256),(4,1024),(1,1024),(64,16),(16,64)]
with torch.inference_mode():
    for b, t in shapes:
        feats = torch.randn(b, t, 80, device="cuda"); lens = torch.full((b,), t, dtype=torch.long, device="cuda")
        res = {}
        with strict_fp32():
            ref, rl = net.encoder(feats, lens)
        for v in variants:
            setv(v)
            out, ol = enc.forward(feats, lens)
            res[f"a0r0_{v}"] = [round(z, 5) for z in error_stats(valid_rows(out.float(), ol), valid_rows(ref, rl))]
        for rep in range(3):
            for v in variants:
                setv(v)
                res.setdefault(v, []).append(round(graph_ms_per_call([lambda: enc.forward(feats, lens)], reps=20), 4))
        med = {v: sorted(res[v])[1] for v in variants}
        print(f"{b}x{t}", {k: v for k, v in res.items() if k.startswith("a0")}, "median", med, flush=True)
