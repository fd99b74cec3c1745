import torch, time, sys
from speechrt.benchmark.conformer import build_models
from speechrt.benchmark.common import graph_ms_per_call, cuda_time_ms
from speechrt.engine.precision import Precision
from speechrt.engine.runner import ConformerEngine
net = build_models(0, "cuda")
eng = ConformerEngine(net, Precision.of("fp16"), cuda_graphs=True)
enc = eng.encoder
streams = [torch.cuda.Stream() for _ in range(4)]
def split_fwd(feats, lens, parts):
    b = feats.shape[0]; n = b // parts
    cur = torch.cuda.current_stream()
    outs = []
    for i in range(parts):
        s = streams[i]; s.wait_stream(cur)
        with torch.cuda.stream(s):
            outs.append(enc.forward(feats[i*n:(i+1)*n], lens[i*n:(i+1)*n])[0])
    for i in range(parts):
        cur.wait_stream(streams[i])
    return torch.cat(outs)
shapes = [(64,256),(16,1024),(64,1024),(16,256),(64,64),(4,1024),(64,16)]
with torch.inference_mode():
    for b, t in shapes:
        feats = torch.randn(b, t, 80, device="cuda"); lens = torch.full((b,), t, dtype=torch.long, device="cuda")
        ref = enc.forward(feats, lens)[0]
        res = {}
        variants = {"base": lambda: enc.forward(feats, lens)}
        for p in (2, 4):
            if b % p == 0 and b >= p:
                d = (split_fwd(feats, lens, p) - ref).abs().max().item()
                res[f"diff{p}"] = d
                variants[f"split{p}"] = (lambda p=p: split_fwd(feats, lens, p))
        for rep in range(3):
            for k, fn in variants.items():
                res.setdefault(k, []).append(round(graph_ms_per_call([fn], reps=20), 4))
        print(f"{b}x{t}", res, flush=True)
    # encode() overhead breakdown at 64x256 and 16x1024
    for b, t in [(64,256),(16,1024)]:
        feats = torch.randn(b, t, 80, device="cuda"); lens = torch.full((b,), t, dtype=torch.long, device="cuda")
        eng.encode(feats, lens)
        key = [k for k in eng._enc_graphs.graphs if k[0] == b and k[1] == t][0]
        entry = eng._enc_graphs.graphs[key]
        out = entry.output[0]
        def cp_replay():
            entry.inputs[0].copy_(feats); entry.inputs[1].copy_(lens); entry.graph.replay()
        def replay10():
            for _ in range(10): entry.graph.replay()
        res = {}
        for rep in range(3):
            res.setdefault("encode", []).append(round(cuda_time_ms(lambda: eng.encode(feats, lens), budget_s=1.0), 4))
            res.setdefault("replay", []).append(round(cuda_time_ms(lambda: entry.graph.replay(), budget_s=1.0), 4))
            res.setdefault("replay10/10", []).append(round(cuda_time_ms(replay10, budget_s=1.0) / 10, 4))
            res.setdefault("copy+replay", []).append(round(cuda_time_ms(cp_replay, budget_s=1.0), 4))
            res.setdefault("replay+clone", []).append(round(cuda_time_ms(lambda: (entry.graph.replay(), out.clone()), budget_s=1.0), 4))
        hs = {}
        for name, fn in [("encode", lambda: eng.encode(feats, lens)), ("replay", lambda: entry.graph.replay()),
                         ("copy", lambda: entry.inputs[0].copy_(feats)), ("clone", lambda: out.clone())]:
            torch.cuda.synchronize(); t0 = time.perf_counter()
            for _ in range(50): fn()
            hs[name] = round((time.perf_counter() - t0) / 50 * 1e3, 4)
            torch.cuda.synchronize()
        print(f"overhead {b}x{t}", res, "host ms", hs, flush=True)
