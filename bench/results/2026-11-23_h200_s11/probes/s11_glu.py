import torch
import speechrt.kernels.linear_act as la
import speechrt.kernels.layer_norm as lnm
from speechrt.kernels._utils import cdiv, sm_count, interpreting
from speechrt.benchmark.conformer import build_models
from speechrt.benchmark.common import graph_ms_per_call
from speechrt.engine.precision import Precision
from speechrt.engine.runner import ConformerEngine
orig = la._default_config
def relaxed(m, n, k, dtype, device, tma=None):
    cfg = la.TMA_CONFIG_SMALL_K
    if k < la.TMA_MIN_K and dtype != torch.float32 and cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n) >= 60:
        return cfg
    return orig(m, n, k, dtype, device, tma)
torch.manual_seed(0)
with torch.inference_mode():
    for rows in (4032, 4080, 8160):
        y = torch.randn(rows, 256, device="cuda").half(); w = (torch.randn(512, 256, device="cuda") / 16).half(); b = torch.randn(512, device="cuda").half()
        wi, bi = la.interleave_glu(w, b)
        res = {}
        for rep in range(3):
            for name, f in (("orig", orig), ("relaxed", relaxed)):
                la._default_config = f
                res.setdefault(name, []).append(round(graph_ms_per_call([lambda: la.linear_act(y, wi, bi, "glu")] * 10, reps=15) * 1000, 2))
        la._default_config = orig
        print("glu", rows, res, flush=True)
    for rows in (16320, 4032):
        f = torch.randn(rows, 256, device="cuda").half(); x = torch.randn(rows, 256, device="cuda"); lw = torch.randn(256, device="cuda"); lb = torch.randn(256, device="cuda")
        res = {}
        for rep in range(3):
            for tile in ((4, 4), (4, 2), (8, 4), (2, 2)):
                lnm.NARROW_TILE = tile
                res.setdefault(str(tile), []).append(round(graph_ms_per_call([lambda: lnm.add_layer_norm(f, x, lw, lb, 1e-5, scale=0.5, y_dtype=torch.float16)] * 10, reps=15) * 1000, 2))
        lnm.NARROW_TILE = (4, 4)
        print("ln", rows, res, flush=True)
    net = build_models(0, "cuda")
    eng = ConformerEngine(net, Precision.of("fp16"), cuda_graphs=True)
    enc = eng.encoder
    for b, t in [(64,256),(16,1024)]:
        feats = torch.randn(b, t, 80, device="cuda"); lens = torch.full((b,), t, dtype=torch.long, device="cuda")
        res = {}
        for rep in range(3):
            for name, f in (("orig", orig), ("relaxed", relaxed)):
                la._default_config = f
                res.setdefault(name, []).append(round(graph_ms_per_call([lambda: enc.forward(feats, lens)], reps=20), 4))
        la._default_config = orig
        print("engine", f"{b}x{t}", res, flush=True)
