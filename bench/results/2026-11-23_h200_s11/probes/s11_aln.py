import torch, sys
import torch.nn.functional as F
from speechrt.benchmark.common import graph_ms_per_call
from speechrt.kernels.add_ln_linear import add_ln_linear
from speechrt.kernels.layer_norm import add_layer_norm, add_double_layer_norm
from speechrt.kernels.linear_act import linear_act, interleave_glu
torch.manual_seed(0)
dev = "cuda"; D = 256; h16 = torch.float16
def ln(): return (1 + 0.1*torch.randn(D, device=dev), 0.1*torch.randn(D, device=dev), 1e-5)
L1, L2 = ln(), ln()
def gm(fn, n=10):
    return graph_ms_per_call([fn]*n, reps=15) * 1000
sites = {"qkv": (768, "identity"), "glu": (512, "glu"), "w1": (2048, "swish"), "w1dbl": (2048, "swish")}
blocks = {"qkv": [(64,128,8),(64,256,8),(64,128,16),(64,64,8),(32,128,8)],
          "glu": [(64,128,8),(64,64,8),(32,128,8),(64,256,8)],
          "w1": [(64,256,8),(64,128,8),(64,128,16),(32,128,8)],
          "w1dbl": [(64,256,8),(64,128,8)]}
with torch.inference_mode():
  for rows in [1008, 4032, 4080, 16320]:
    f = torch.randn(rows, D, device=dev).to(h16); x = 3*torch.randn(rows, D, device=dev); xb = (0.1*torch.randn(D, device=dev)).to(h16)
    for site, (n, act) in sites.items():
        w = (torch.randn(n, D, device=dev)/16).to(h16); b = (0.1*torch.randn(n, device=dev)).to(h16)
        if act == "glu": w, b = interleave_glu(w, b)
        dbl = site == "w1dbl"
        def base():
            if dbl:
                s, y = add_double_layer_norm(f, x, L1, L2, x_bias=xb, scale=0.5, y_dtype=h16)
            else:
                s, y = add_layer_norm(f, x, *L1, x_bias=xb, scale=0.5, y_dtype=h16)
            if act == "identity": return F.linear(y, w, b)
            return linear_act(y, w, b, act)
        res = {}
        fns = {"base": base}
        for bl in blocks[site]:
            fns[str(bl)] = (lambda bl=bl: add_ln_linear(f, x, L1, w, b, act, x_bias=xb, scale=0.5, ln2=L2 if dbl else None, block=bl))
        ref = base().float()
        for k, fn in fns.items():
            if k != "base":
                err = (fn()[1].float() - ref).abs().max().item()
                res[k + "_err"] = round(err, 4)
        for rep in range(2):
            for k, fn in fns.items():
                res.setdefault(k, []).append(round(gm(fn), 2))
        print(rows, site, {k: (min(v) if isinstance(v, list) else v) for k, v in res.items()}, flush=True)
