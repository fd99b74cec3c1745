import math, sys, copy
import torch
from speechrt.benchmark.moe import MoEBenchConfig, build_net, input_frames
from speechrt.benchmark.common import error_stats, valid_rows, strict_fp32
from speechrt.kernels.moe import moe_route_ref
from speechrt.kernels.linear_act import _TORCH_ACT
T_OUT = 206
cfg = MoEBenchConfig(device="cpu")
net = build_net(cfg)
names = [n for n, p in net.encoder.named_parameters()]
groups = {}
for n in names:
    parts = n.split(".")
    key = ".".join(p for p in parts[:3] if not p.isdigit())
    groups.setdefault(key, []).append(n)
for k, v in groups.items(): print(k, len(v), v[:3])

t_in = input_frames(net, T_OUT)
gen = torch.Generator().manual_seed(1 * 10007 + T_OUT)
feats = torch.randn(1, t_in, cfg.input_dim, generator=gen)
lens = torch.full((1,), t_in, dtype=torch.long)
ROUTES = []; MODE = {"record": True}
def make(ff, i):
    def forward(x, embed=None):
        r = moe_route_ref(x, ff.router_weight, ff.router_bias, embed, ff.top_k)
        if MODE["record"]: ROUTES.append(r.gate_idx.clone()); idx = r.gate_idx
        else: idx = ROUTES[i]
        gate = torch.softmax(r.logits, dim=-1).gather(-1, idx.long())
        x2d = x.reshape(-1, x.shape[-1]); g = gate.reshape(-1)
        out = torch.zeros(x2d.shape[0], ff.w2.shape[1])
        for e in range(ff.w1.shape[0]):
            rows = torch.where(idx.reshape(-1) == e)[0]
            if rows.numel() == 0: continue
            h = _TORCH_ACT[ff.activation](x2d[rows] @ ff.w1[e].T + ff.b1[e])
            out[rows] = (h @ ff.w2[e].T + ff.b2[e]) * g[rows, None]
        return out.reshape(x.shape)
    return forward
for i, ff in enumerate(net.moe_layers()): ff.forward = make(ff, i)
orig = {n: p.detach().clone() for n, p in net.encoder.named_parameters()}
cats = {
 "every_param": lambda n: True,
 "norms": lambda n: "norm" in n,
 "conv_bn_and_biases": lambda n: (".conv." in n and "weight" not in n) or n.endswith("bias") or ".b1" in n or ".b2" in n,
 "router": lambda n: "router" in n,
 "pos_bias_uv": lambda n: "pos_bias" in n,
 "small_params": lambda n: not (("weight" in n and "norm" not in n) or n.endswith(".w1") or n.endswith(".w2")),
 "experts": lambda n: ".ff.w1" in n or ".ff.w2" in n and not n.startswith("embed"),
 "mac_ffn": lambda n: n.startswith("layers") and "ff_macaron.w" in n,
 "attn": lambda n: n.startswith("layers") and ".attn." in n and "weight" in n,
 "conv": lambda n: n.startswith("layers") and ".conv." in n and "weight" in n,
 "embed_net": lambda n: n.startswith("embed") and "weight" in n and "norm" not in n,
 "front": lambda n: n.startswith("subsampling") and "weight" in n,
 "all_weights": lambda n: ("weight" in n or ".ff.w" in n) and "norm" not in n and "router" not in n,
}
with torch.inference_mode(), strict_fp32():
    ref, rl = net.encoder(feats, lens); MODE["record"] = False
    refv = valid_rows(ref, rl)
    for cname, pred in cats.items():
        sel = [n for n in orig if pred(n)]
        params = dict(net.encoder.named_parameters())
        for n in sel: params[n].copy_(orig[n].half().float())
        out, ol = net.encoder(feats, lens)
        a0, r0 = error_stats(valid_rows(out, ol), refv)
        print(f"{cname:12s} {len(sel):4d} params  a0 {a0:.4f} r0 {r0:.5f}", flush=True)
        for n in sel: params[n].copy_(orig[n])
