"""CPU emulation: which fp16 roundings make the MoE encoder's r0 (same routing)."""
import math, sys, itertools
import torch
import torch.nn.functional as F
import speechrt.layers.attention as att_mod
from speechrt.benchmark.moe import MoEBenchConfig, build_net, input_frames
from speechrt.benchmark.common import error_stats, valid_rows, strict_fp32
from speechrt.kernels.moe import moe_route_ref
from speechrt.kernels.linear_act import _TORCH_ACT
torch.manual_seed(0)
T_OUT = int(sys.argv[1]) if len(sys.argv) > 1 else 206
cfg = MoEBenchConfig(device="cpu")
net = build_net(cfg)
t_in = input_frames(net, T_OUT)
gen = torch.Generator().manual_seed(1 * 10007 + T_OUT)
feats = torch.randn(1, t_in, cfg.input_dim, generator=gen)
lens = torch.full((1,), t_in, dtype=torch.long)
H = lambda t: t.half().float()
FLAGS = set()
orig_linear, orig_attend = F.linear, att_mod.attend
orig_conv1d, orig_conv2d = F.conv1d, F.conv2d
def linear(x, w, b=None):
    if "X" in FLAGS: x = H(x)
    if "W" in FLAGS: w = H(w)
    if "B" in FLAGS and b is not None: b = H(b)
    y = orig_linear(x, w, b)
    return y
def conv1d(x, w, b=None, *a, **k):
    if "X" in FLAGS: x = H(x)
    if "W" in FLAGS: w = H(w)
    return orig_conv1d(x, w, b, *a, **k)
def conv2d(x, w, b=None, *a, **k):
    if "XC" in FLAGS: x = H(x)
    if "W" in FLAGS: w = H(w)
    return orig_conv2d(x, w, b, *a, **k)
def attend(q, k, v, spec, key_bias=None):
    if "ATT" in FLAGS:
        q, k, v = H(q), H(k), H(v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1))
    if key_bias is not None: scores = scores + key_bias.float()
    scores = scores * scale
    visible = spec.dense(q.shape[-2], k.shape[-2]).unsqueeze(1)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)
    if "P" in FLAGS: probs = H(probs)
    return torch.matmul(probs, v.float()).to(q.dtype)
F.linear, F.conv1d, F.conv2d, att_mod.attend = linear, conv1d, conv2d, attend
ROUTES = []
MODE = {"record": True}
def make(ff, i):
    def forward(x, embed=None):
        xr, er = x, embed
        r = moe_route_ref(xr, ff.router_weight, ff.router_bias, er, ff.top_k)
        if MODE["record"]:
            ROUTES.append(r.gate_idx.clone()); idx = r.gate_idx
        else:
            idx = ROUTES[i]
        gate = torch.softmax(r.logits, dim=-1).gather(-1, idx.long())
        x2d = x.reshape(-1, x.shape[-1]); g = gate.reshape(-1)
        out = torch.zeros(x2d.shape[0], ff.w2.shape[1])
        for e in range(ff.w1.shape[0]):
            rows = torch.where(idx.reshape(-1) == e)[0]
            if rows.numel() == 0: continue
            xe, w1, w2 = x2d[rows], ff.w1[e], ff.w2[e]
            if "X" in FLAGS: xe = H(xe)
            if "W" in FLAGS: w1, w2 = H(w1), H(w2)
            h = _TORCH_ACT[ff.activation](xe @ w1.T + ff.b1[e])
            if "X" in FLAGS: h = H(h)
            out[rows] = (h @ w2.T + ff.b2[e]) * g[rows, None]
        return out.reshape(x.shape)
    return forward
for i, ff in enumerate(net.moe_layers()):
    ff.forward = make(ff, i)
with torch.inference_mode(), strict_fp32():
    ref, rl = net.encoder(feats, lens)
    MODE["record"] = False
    refv = valid_rows(ref, rl)
    cats = ["W", "X", "ATT", "P", "XC", "B"]
    runs = [("all",) + tuple(cats)] + [(c, c) for c in cats] + [("all-W",) + tuple(c for c in cats if c != "W"), ("all-X",) + tuple(c for c in cats if c != "X"), ("all-ATT-P",) + tuple(c for c in cats if c not in ("ATT", "P"))]
    for name, *flags in runs:
        FLAGS.clear(); FLAGS.update(flags)
        out, ol = net.encoder(feats, lens)
        a0, r0 = error_stats(valid_rows(out, ol), refv)
        print(f"{name:12s} a0 {a0:.4f} r0 {r0:.5f}", flush=True)
