import importlib.util, torch
import speechrt.kernels.conv_module as new
import speechrt.models.conformer.fused as fm
spec = importlib.util.spec_from_file_location("cm_old", ".carry/cm_old.py"); old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
from speechrt.benchmark.conformer import build_models
from speechrt.benchmark.common import graph_ms_per_call
from speechrt.engine.precision import Precision
from speechrt.engine.runner import ConformerEngine
mods = {"old": old, "new": new}
torch.manual_seed(0)
with torch.inference_mode():
    for b, t in [(64, 63), (16, 255), (64, 255), (4, 255)]:
        x = torch.randn(b, t, 256, device="cuda").half(); w = (0.1 * torch.randn(256, 15, device="cuda")).half(); bb = torch.randn(256, device="cuda").half()
        lens = torch.full((b,), t, device="cuda", dtype=torch.long); lens[::3] = t - 9
        outs = {k: m.glu_depthwise_conv(x, w, bb, lens, causal=False, glu=False) for k, m in mods.items()}
        res = {"equal": torch.equal(outs["old"], outs["new"])}
        for rep in range(3):
            for k, m in mods.items():
                res.setdefault(k, []).append(round(graph_ms_per_call([lambda: m.glu_depthwise_conv(x, w, bb, lens, causal=False, glu=False)] * 10, reps=15) * 1000, 2))
        print("dwconv", b, t, res, flush=True)
    net = build_models(0, "cuda")
    eng = ConformerEngine(net, Precision.of("fp16"), cuda_graphs=True)
    enc = eng.encoder
    for b, t in [(64,256),(16,1024),(64,1024),(16,256)]:
        feats = torch.randn(b, t, 80, device="cuda"); lens = torch.full((b,), t, dtype=torch.long, device="cuda")
        res = {}
        for rep in range(3):
            for k, m in mods.items():
                fm.glu_depthwise_conv = m.glu_depthwise_conv
                res.setdefault(k, []).append(round(graph_ms_per_call([lambda: enc.forward(feats, lens)], reps=20), 4))
        print("engine", f"{b}x{t}", res, {k: sorted(v)[1] for k, v in res.items()}, flush=True)
    fm.glu_depthwise_conv = new.glu_depthwise_conv
