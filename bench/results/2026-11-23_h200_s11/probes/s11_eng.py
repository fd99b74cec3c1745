import torch
from speechrt.benchmark.conformer import build_models
from speechrt.benchmark.common import graph_ms_per_call, strict_fp32, error_stats, valid_rows
from speechrt.engine.precision import Precision
from speechrt.engine.runner import ConformerEngine
net = build_models(0, "cuda")
eng = ConformerEngine(net, Precision.of("fp16"), cuda_graphs=True)
enc = eng.encoder
shapes = [(64,256),(16,1024),(64,1024),(16,256),(64,64),(4,1024),(1,1024)]
with torch.inference_mode():
    for b, t in shapes:
        feats = torch.randn(b, t, 80, device="cuda"); lens = torch.full((b,), t, dtype=torch.long, device="cuda")
        res = {}
        if (b, t) in [(64,256),(16,1024)]:
            with strict_fp32():
                ref, rl = net.encoder(feats, lens)
            for v in (False, None):
                enc.ln_prologue = v
                out, ol = enc.forward(feats, lens)
                res[f"a0r0_{v}"] = [round(z, 5) for z in error_stats(valid_rows(out.float(), ol), valid_rows(ref, rl))]
        for rep in range(3):
            for v in (False, None):
                enc.ln_prologue = v
                res.setdefault(str(v), []).append(round(graph_ms_per_call([lambda: enc.forward(feats, lens)], reps=20), 4))
        print(f"{b}x{t}", res, flush=True)
