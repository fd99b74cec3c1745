"""Session 12 probe 2: Whisper large-v3 encoder B=16 -- batch halves on 2/4 streams, graph-captured."""
import statistics, torch
from speechrt.benchmark.common import environment
from speechrt.benchmark.whisper import build_speechrt
from speechrt.models.whisper.config import preset
from speechrt.models.whisper import model as wm
print(environment(), flush=True)
net = build_speechrt(preset("large-v3"), torch.float16, "cuda", 0)
B = 16
mel = torch.randn(B, net.dims.n_mels, 3000, device="cuda", dtype=torch.float16)
streams = [torch.cuda.Stream() for _ in range(4)]
def split_fn(parts):
    def fn():
        main = torch.cuda.current_stream()
        outs = []
        for i in range(parts):
            s = streams[i]
            s.wait_stream(main)
            with torch.cuda.stream(s):
                outs.append(net.embed_audio(mel[i * B // parts:(i + 1) * B // parts]))
        for i in range(parts):
            main.wait_stream(streams[i])
        return outs
    return fn
def graph(fn):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2): fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out
def t(g, n=6):
    ts = []
    g.replay(); torch.cuda.synchronize()
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)
def heads_contig(self, x):
    b, tt, _ = x.shape
    return x.view(b, tt, self.n_head, -1).permute(0, 2, 1, 3).contiguous()
with torch.inference_mode():
    g1, o1 = graph(lambda: net.embed_audio(mel))
    g2, o2 = graph(split_fn(2))
    g4, o4 = graph(split_fn(4))
    orig_heads = wm.Attention.heads
    wm.Attention.heads = heads_contig
    gc, oc = graph(lambda: net.embed_audio(mel))
    wm.Attention.heads = orig_heads
    print("halves equal:", torch.equal(torch.cat(o2), o1), "quarters equal:", torch.equal(torch.cat(o4), o1), "contig maxdiff", (oc.float()-o1.float()).abs().max().item())
    res = {"one stream": [], "2 streams x 8": [], "4 streams x 4": [], "contiguous heads": []}
    for rep in range(4):
        for name, g in zip(res, (g1, g2, g4, gc)):
            res[name].append(t(g))
    for k, v in res.items():
        print(f"| {k} | {statistics.median(v):.2f} | {[round(x, 1) for x in v]} |")
