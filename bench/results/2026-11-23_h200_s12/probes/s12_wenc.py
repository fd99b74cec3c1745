"""Session 12 probe: Whisper large-v3 encoder B=16 -- gaps, fc1 variants, SDPA backends, GEMM rates."""
import json, statistics, subprocess, sys, time, os
import torch, torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.nn.attention import sdpa_kernel, SDPBackend
from speechrt.benchmark.common import cuda_time_ms, environment
from speechrt.benchmark.whisper import build_speechrt
from speechrt.models.whisper.config import preset
from speechrt.models.whisper import model as wm
from speechrt.kernels.linear_act import linear_act

print(environment(), flush=True)
net = build_speechrt(preset("large-v3"), torch.float16, "cuda", 0)
B = int(os.environ.get("B", "16"))
mel = torch.randn(B, net.dims.n_mels, 3000, device="cuda", dtype=torch.float16)
orig_ff = wm.FeedForward.forward_fused

def ff_lt(self, x):
    x2 = x.reshape(-1, x.shape[-1])
    h = torch._addmm_activation(self.fc1.bias, x2, self.fc1.weight.t(), use_gelu=True)
    return self.fc2(h.view(*x.shape[:-1], -1))

def run():
    return net.embed_audio(mel)

variants = {}
def v_default():
    wm.FeedForward.forward_fused = orig_ff; net.encoder.options = wm.EncoderOptions()
def v_lt():
    wm.FeedForward.forward_fused = ff_lt; net.encoder.options = wm.EncoderOptions()
def v_cublas_gelu():
    wm.FeedForward.forward_fused = orig_ff; net.encoder.options = wm.EncoderOptions(fc1_epilogue=False)
cfgs = {"default": (v_default, None), "fc1_lt_gelu": (v_lt, None), "fc1_cublas+gelu": (v_cublas_gelu, None),
        "default+flash": (v_default, SDPBackend.FLASH_ATTENTION), "default+cudnn": (v_default, SDPBackend.CUDNN_ATTENTION),
        "fc1_lt+flash": (v_lt, SDPBackend.FLASH_ATTENTION)}
res = {k: [] for k in cfgs}
with torch.inference_mode():
    ref = None
    for rep in range(3):
        for name, (setup, backend) in cfgs.items():
            setup()
            if backend is None:
                ms = cuda_time_ms(run, warmup=2, min_iters=5, budget_s=0.3)
                out = run()
            else:
                with sdpa_kernel([backend]):
                    ms = cuda_time_ms(run, warmup=2, min_iters=5, budget_s=0.3)
                    out = run()
            if ref is None: ref = out.float()
            err = (out.float() - ref).abs().max().item()
            res[name].append(ms)
            print(f"rep{rep} {name:20s} {ms:8.2f} ms  maxdiff_vs_default {err:.4g}", flush=True)
    print("\n| variant | median ms |\n|---|---|")
    for k, v in res.items():
        print(f"| {k} | {statistics.median(v):.2f} |")

    # gap analysis of the default path
    v_default()
    run(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(); torch.cuda.synchronize()
    prof.export_chrome_trace("/tmp/trace.json")
    ev = json.load(open("/tmp/trace.json"))["traceEvents"]
    ks = sorted([e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")], key=lambda e: e["ts"])
    busy = sum(e["dur"] for e in ks)
    span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
    gaps = []
    for a, b in zip(ks, ks[1:]):
        g = b["ts"] - (a["ts"] + a["dur"])
        gaps.append((g, a["name"][:50], b["name"][:50]))
    gaps.sort(reverse=True)
    print(f"\nkernels {len(ks)} busy {busy/1000:.2f} ms span {span/1000:.2f} ms gaps total {sum(g for g,_,_ in gaps)/1000:.2f} ms")
    print("median gap us", statistics.median([g for g, _, _ in gaps]))
    for g in gaps[:12]:
        print(f"  gap {g[0]:.1f} us after {g[1]} before {g[2]}")
    from collections import defaultdict
    agg = defaultdict(lambda: [0.0, 0])
    for e in ks:
        agg[e["name"][:70]][0] += e["dur"]; agg[e["name"][:70]][1] += 1
    for n, (d, c) in sorted(agg.items(), key=lambda x: -x[1][0])[:10]:
        print(f"  {d/1000:7.2f} ms {c:4d} {n}")

    # clocks during a sustained loop
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active", "--format=csv,noheader", "-lms", "250"], stdout=subprocess.PIPE, text=True)
    t0 = time.time(); ts = []
    while time.time() - t0 < 4:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); run(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
    smi.terminate(); print("\nsustained loop ms:", [round(t, 1) for t in ts])
    print("smi:", smi.stdout.read().strip().replace("\n", " | ")[:1500])

    # GEMM rates at M = B * 1500
    M = B * 1500
    x = torch.randn(M, 1280, device="cuda", dtype=torch.float16)
    xh = torch.randn(M, 5120, device="cuda", dtype=torch.float16)
    for name, (n, k) in {"qkv": (3840, 1280), "out": (1280, 1280), "fc1": (5120, 1280), "fc2": (1280, 5120)}.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5
        b = torch.randn(n, device="cuda", dtype=torch.float16)
        a = x if k == 1280 else xh
        fl = 2 * M * n * k
        t = cuda_time_ms(lambda: F.linear(a, w, b))
        line = f"{name} M={M} N={n} K={k}: F.linear {t*1000:.0f} us {fl/t/1e9:.0f} TFLOP/s"
        if name == "fc1":
            t2 = cuda_time_ms(lambda: torch._addmm_activation(b, a, w.t(), use_gelu=True))
            t3 = cuda_time_ms(lambda: linear_act(a, w, b, "gelu"))
            ref_ = F.gelu(F.linear(a.float(), w.float(), b.float()))
            e2 = (torch._addmm_activation(b, a, w.t(), use_gelu=True).float() - ref_).abs().max().item()
            e3 = (linear_act(a, w, b, "gelu").float() - ref_).abs().max().item()
            line += f"; lt+gelu {t2*1000:.0f} us (err {e2:.3g}); linear_act gelu {t3*1000:.0f} us (err {e3:.3g})"
        print(line, flush=True)
