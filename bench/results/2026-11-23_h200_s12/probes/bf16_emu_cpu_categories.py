import sys, torch, torch.nn.functional as F
from torch.overrides import TorchFunctionMode
sys.path.insert(0, "/work/main/src")
from speechrt.benchmark.conformer import build_models
from speechrt.benchmark.common import error_stats, valid_rows
def rb(t): return t.bfloat16().float() if t is not None and t.is_floating_point() else t
class Emu(TorchFunctionMode):
    # policy: name -> (round_act, round_w)
    def __init__(self, pol): super().__init__(); self.pol = pol
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None
        if func in (F.linear, torch._C._nn.linear): name = "linear"
        elif func in (F.conv1d, torch.conv1d):
            groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
            name = "dwconv" if groups != 1 else "pwconv"
        elif func in (F.conv2d, torch.conv2d): name = "conv2d_1" if args[1].shape[1] == 1 else "conv2d_2"
        elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__): name = "matmul"
        if name is None: return func(*args, **kwargs)
        ra, rw = self.pol.get(name, (True, True))
        a = list(args)
        if ra: a[0] = rb(a[0])
        if rw: a[1] = rb(a[1])
        return func(*a, **kwargs)
net = build_models(0, "cpu"); enc = net.encoder
B, T = 4, 256
feats = torch.randn(B, T, 80); lens = torch.full((B,), T)
N = (False, False)
pols = {
 "lin+pw exact, front exact": {"linear": N, "pwconv": N, "conv2d_1": N, "conv2d_2": N},
 "lin+pw exact, conv1 exact only": {"linear": N, "pwconv": N, "conv2d_1": N},
 "lin+pw exact, conv2 exact only": {"linear": N, "pwconv": N, "conv2d_2": N},
 "lin+pw weights only rounded, front exact": {"linear": (False, True), "pwconv": (False, True), "conv2d_1": N, "conv2d_2": N},
 "lin+pw acts only rounded, front exact": {"linear": (True, False), "pwconv": (True, False), "conv2d_1": N, "conv2d_2": N},
 "front exact only": {"conv2d_1": N, "conv2d_2": N},
 "conv1 exact only": {"conv2d_1": N},
}
with torch.inference_mode():
    ref, rl = enc(feats, lens); refv = valid_rows(ref, rl)
    for k, p in pols.items():
        with Emu(p):
            out, ol = enc(feats, lens)
        print(k, "a0 %.4f r0 %.5f" % error_stats(valid_rows(out, ol), refv), flush=True)
