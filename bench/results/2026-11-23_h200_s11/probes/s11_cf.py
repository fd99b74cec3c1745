import os, time, tempfile
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
import torch
import speechrt.kernels.conv_front_wgmma as cf
from speechrt.kernels.conv_subsampling import conv_subsampling, pack_conv_subsampling
from speechrt.benchmark.conformer import build_models
from speechrt.benchmark.common import graph_ms_per_call
from speechrt.engine.precision import Precision
from speechrt.engine.runner import ConformerEngine
torch.manual_seed(0)
dev = "cuda"
c = 256
w1 = torch.randn(c, 1, 3, 3, device=dev) / 3; b1 = torch.randn(c, device=dev) * 0.1
w2 = torch.randn(c, c, 3, 3, device=dev) / 48; b2 = torch.randn(c, device=dev) * 0.1
packed = pack_conv_subsampling(w1, b1, w2, b2, torch.float16)
mean = torch.randn(80, device=dev); istd = torch.rand(80, device=dev) + 0.5
with torch.inference_mode():
    x = torch.randn(16, 1024, 80, device=dev)
    for v in (True, False):
        cf.CONV1_K16 = v
        torch.cuda.synchronize(); t0 = time.perf_counter()
        conv_subsampling(x, packed, mean, istd); torch.cuda.synchronize()
        print("first call (compile)", "k16" if v else "k64", round(time.perf_counter() - t0, 2), "s", flush=True)
    for b, t in [(64, 256), (16, 1024), (64, 1024), (16, 256), (1, 1024)]:
        x = torch.randn(b, t, 80, device=dev)
        res = {}
        outs = {}
        for v in (False, True):
            cf.CONV1_K16 = v
            outs[v] = conv_subsampling(x, packed, mean, istd)
        d = (outs[True].float() - outs[False].float()).abs()
        res["maxdiff"] = d.max().item(); res["ndiff"] = int((d > 0).sum()); res["n"] = d.numel()
        for rep in range(3):
            for v in (False, True):
                cf.CONV1_K16 = v
                res.setdefault(str(v), []).append(round(graph_ms_per_call([lambda: conv_subsampling(x, packed, mean, istd)] * 5, reps=10) * 1000, 1))
        print("front", b, t, res, flush=True)
    net = build_models(0, "cuda")
    eng = ConformerEngine(net, Precision.of("fp16"), cuda_graphs=True)
    enc = eng.encoder
    for b, t in [(64,256),(16,1024),(64,1024),(16,256),(4,1024),(1,1024)]:
        feats = torch.randn(b, t, 80, device="cuda"); lens = torch.full((b,), t, dtype=torch.long, device="cuda")
        res = {}
        for rep in range(3):
            for v in (False, True):
                cf.CONV1_K16 = v
                res.setdefault(str(v), []).append(round(graph_ms_per_call([lambda: enc.forward(feats, lens)], reps=20), 4))
        print("engine", f"{b}x{t}", res, {k: sorted(v)[1] for k, v in res.items()}, flush=True)
    cf.CONV1_K16 = True
