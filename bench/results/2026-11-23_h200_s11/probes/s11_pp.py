import importlib.util, torch
import speechrt.kernels.linear_act as la
import speechrt.kernels.linear_act_pingpong as new
spec = importlib.util.spec_from_file_location("pp_old", ".carry/pp_old.py"); old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
from speechrt.benchmark.conformer import build_models
from speechrt.benchmark.common import graph_ms_per_call
from speechrt.engine.precision import Precision
from speechrt.engine.runner import ConformerEngine
mods = {"old": old, "new": new}
torch.manual_seed(0)
with torch.inference_mode():
    for rows in (4032, 4080, 16320, 2048):
        x = torch.randn(rows, 256, device="cuda").half(); w = (torch.randn(2048, 256, device="cuda") / 16).half(); b = torch.randn(2048, device="cuda").half()
        outs = {}
        for k, m in mods.items():
            la.linear_act_pingpong = m
            outs[k] = la.linear_act(x, w, b, "swish")
        res = {"equal": torch.equal(outs["old"], outs["new"])}
        for rep in range(3):
            for k, m in mods.items():
                la.linear_act_pingpong = m
                res.setdefault(k, []).append(round(graph_ms_per_call([lambda: la.linear_act(x, w, b, "swish")] * 10, reps=15) * 1000, 2))
        print("w1", rows, res, flush=True)
    net = build_models(0, "cuda")
    eng = ConformerEngine(net, Precision.of("fp16"), cuda_graphs=True)
    enc = eng.encoder
    for b, t in [(64,256),(16,1024),(64,1024),(16,256)]:
        feats = torch.randn(b, t, 80, device="cuda"); lens = torch.full((b,), t, dtype=torch.long, device="cuda")
        res = {}
        for rep in range(3):
            for k, m in mods.items():
                la.linear_act_pingpong = m
                res.setdefault(k, []).append(round(graph_ms_per_call([lambda: enc.forward(feats, lens)], reps=20), 4))
        print("engine", f"{b}x{t}", res, {k: sorted(v)[1] for k, v in res.items()}, flush=True)
    la.linear_act_pingpong = new
