import torch
import torch.nn.functional as F
from speechrt.benchmark.common import graph_ms_per_call
from speechrt.kernels.conv_module import glu_depthwise_conv
from speechrt.kernels import layer_norm as LN
from speechrt.kernels.linear_act import linear_act, LinearConfig, TMA_CONFIG_SMALL_K
from speechrt.kernels._pdl import pdl_kwargs
from speechrt.kernels._utils import cdiv
torch.manual_seed(0)
dev = "cuda"; h16 = torch.float16
def gm(fn, n=10): return round(graph_ms_per_call([fn]*n, reps=15) * 1000, 2)
def best(fns, reps=2):
    res = {}
    for _ in range(reps):
        for k, fn in fns.items():
            res.setdefault(k, []).append(gm(fn))
    return {k: min(v) for k, v in res.items()}
with torch.inference_mode():
    # 1. depthwise conv
    for b, t in [(64, 63), (16, 255), (64, 255)]:
        x = torch.randn(b, t, 256, device=dev).to(h16); w = (0.1*torch.randn(256, 15, device=dev)).to(h16); bb = torch.randn(256, device=dev).to(h16)
        lens = torch.full((b,), t, device=dev, dtype=torch.long)
        fns = {}
        for blk in [None, (2,256),(8,256),(16,256),(4,128),(8,128),(16,128),(32,128),(16,64),(32,64),(64,64)]:
            fns[str(blk)] = (lambda blk=blk: glu_depthwise_conv(x, w, bb, lens, causal=False, glu=False, block=blk))
        ref = fns["None"]()
        errs = {k: (fn() - ref).abs().max().item() for k, fn in fns.items()}
        assert max(errs.values()) == 0, errs
        print("dwconv", b, t, best(fns), flush=True)
    # 2. add_layer_norm block sizes
    for rows in [4032, 4080, 16320]:
        f = torch.randn(rows, 256, device=dev).to(h16); x = torch.randn(rows, 256, device=dev)
        lw = torch.randn(256, device=dev); lb = torch.randn(256, device=dev); xb = torch.randn(256, device=dev).to(h16)
        h = torch.empty_like(x); y = torch.empty(rows, 256, device=dev, dtype=h16)
        def run(bm, warps, pdl=True):
            grid = cdiv(rows, bm)
            kw = pdl_kwargs(x.device, grid) if pdl else {"USE_PDL": False}
            LN._layer_norm_kernel[(grid,)](f, x, xb, lw, lb, lw, lb, h, y, 256, 256, 256, 256, rows, 256, 1e-5, 1e-5, 0.5,
                HAS_RESIDUAL=True, HAS_XBIAS=True, HAS_W=True, HAS_B=True, HAS_LN2=False, HAS_W2=False, HAS_B2=False,
                BLOCK_M=bm, BLOCK_D=256, num_warps=warps, **kw)
        fns = {"default": lambda: LN.add_layer_norm(f, x, lw, lb, 1e-5, x_bias=xb, scale=0.5, y_dtype=h16)}
        for bm in (4, 8, 16, 32, 64):
            for wp in (2, 4, 8, 16):
                if bm * 256 // (wp * 32) >= 4:
                    fns[f"m{bm}w{wp}"] = (lambda bm=bm, wp=wp: run(bm, wp))
        print("add_ln", rows, best(fns), flush=True)
    # 3. K=256 GEMMs: qkv (768), out/pw2 (256), and w2 (2048->256)
    for rows in [4032, 4080, 16320]:
        a = torch.randn(rows, 256, device=dev).to(h16)
        for n in (768, 256):
            w = (torch.randn(n, 256, device=dev)/16).to(h16); bias = torch.randn(n, device=dev).to(h16)
            fns = {"cublas": lambda: F.linear(a, w, bias), "cublas_nobias": lambda: F.linear(a, w),
                   "linear_act": lambda: linear_act(a, w, bias, "identity"),
                   "tma_small": lambda: linear_act(a, w, bias, "identity", config=TMA_CONFIG_SMALL_K),
                   "tma_128x128": lambda: linear_act(a, w, bias, "identity", config=LinearConfig(128, 128, 64, 8, 4, 4, tma=True)),
                   "tma_64x256": lambda: linear_act(a, w, bias, "identity", config=LinearConfig(64, 256, 64, 8, 4, 4, tma=True)),
                   "tma_64x128": lambda: linear_act(a, w, bias, "identity", config=LinearConfig(64, 128, 64, 8, 4, 4, tma=True))}
            print("gemm", rows, n, best(fns), flush=True)
        z = torch.randn(rows, 2048, device=dev).to(h16); w2 = (torch.randn(256, 2048, device=dev)/45).to(h16)
        print("w2", rows, best({"cublas": lambda: F.linear(z, w2)}), flush=True)
