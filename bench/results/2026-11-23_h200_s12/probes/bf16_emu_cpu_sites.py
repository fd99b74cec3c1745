import sys, itertools, torch, torch.nn.functional as F
from torch import nn
sys.path.insert(0, "/work/main/src")
from speechrt.benchmark.conformer import build_models
from speechrt.benchmark.common import error_stats, valid_rows
from torch.overrides import TorchFunctionMode
def rb(t): return t.bfloat16().float()
net = build_models(0, "cpu"); enc = net.encoder
names = [n for n, m in enc.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
def site(n):
    for key in ["ff_macaron.w1","ff_macaron.w2","attn.q","attn.k","attn.v","attn.out","attn.pos","pw1","pw2","dw","ff.w1","ff.w2","convs.0","convs.1","proj"]:
        if key in n: return key
    return n
print(sorted(set(site(n) for n in names)))
EXACT = set()
class RoundMM(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and "matmul" not in EXACT:
            args = (rb(args[0]), rb(args[1]), *args[2:])
        return func(*args, **kwargs)
orig = {}
for n, m in enc.named_modules():
    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        s = site(n)
        f0 = m.forward
        def fw(x, m=m, s=s, f0=f0):
            if s in EXACT: return f0(x)
            w = m.weight.data; ws = w.clone(); m.weight.data = rb(w)
            try: return f0(rb(x))
            finally: m.weight.data = ws
        m.forward = fw
torch.manual_seed(1)
B, T = 4, 256
feats = torch.randn(B, T, 80); lens = torch.full((B,), T)
with torch.inference_mode():
    EXACT.update(['ff_macaron.w1','ff_macaron.w2','attn.q','attn.k','attn.v','attn.out','attn.pos','pw1','pw2','ff.w1','ff.w2','convs.0','convs.1','proj','dw','matmul'])
    ref, rl = enc(feats, lens); refv = valid_rows(ref, rl)
    def run(ex):
        EXACT.clear(); EXACT.update(ex)
        with RoundMM():
            out, ol = enc(feats, lens)
        return error_stats(valid_rows(out, ol), refv)
    allg = {"ff_macaron.w1","ff_macaron.w2","attn.q","attn.k","attn.v","attn.out","attn.pos","pw1","pw2","ff.w1","ff.w2","convs.0","convs.1","proj"}
    print("none exact", run(set()))
    print("all gemm exact", run(allg))
    for s in sorted(allg):
        print("all but", s, "%.4f %.5f" % run(allg - {s}), flush=True)
    resid = {"ff_macaron.w2","attn.out","pw2","ff.w2","proj"}
    print("residual-side only", run(resid))
    print("hidden-side only", run(allg - resid))
