import torch, time
from speechrt.benchmark.conformer import build_models
from speechrt.benchmark.common import kernel_profile, markdown_table, graph_ms_per_call, cuda_time_ms
from speechrt.engine.precision import Precision
from speechrt.engine.runner import ConformerEngine
net = build_models(0, "cuda")
eng = ConformerEngine(net, Precision.of("fp16"), cuda_graphs=True)
for b, t in [(64, 256), (16, 1024)]:
    feats = torch.randn(b, t, 80, device="cuda"); lens = torch.full((b,), t, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        rows, total = kernel_profile(lambda: eng.encoder.forward(feats, lens))
        g = graph_ms_per_call([lambda: eng.encoder.forward(feats, lens)], reps=20)
        eng.encode(feats, lens)
        entry = next(iter(eng._enc_graphs.graphs.values()))
        out = entry.output[0]
        def cp_replay():
            entry.inputs[0].copy_(feats); entry.inputs[1].copy_(lens); entry.graph.replay()
        res = {}
        for rep in range(2):
            res.setdefault("encode", []).append(cuda_time_ms(lambda: eng.encode(feats, lens), budget_s=1.0))
            res.setdefault("replay", []).append(cuda_time_ms(lambda: entry.graph.replay(), budget_s=1.0))
            res.setdefault("copy+replay", []).append(cuda_time_ms(cp_replay, budget_s=1.0))
            res.setdefault("replay+clone", []).append(cuda_time_ms(lambda: (entry.graph.replay(), out.clone()), budget_s=1.0))
        # host time of encode (no sync)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(50): eng.encode(feats, lens)
        host = (time.perf_counter() - t0) / 50 * 1e3
        torch.cuda.synchronize()
    print(f"## {b}x{t}: {total:.3f} ms GPU, graph {g:.3f} ms, {sum(r['calls'] for r in rows)} kernels")
    print({k: [round(x, 4) for x in v] for k, v in res.items()}, f"host per encode call {host:.3f} ms")
    print(markdown_table(rows[:30], ["kernel", "calls", "total_us", "share_%"]), flush=True)
