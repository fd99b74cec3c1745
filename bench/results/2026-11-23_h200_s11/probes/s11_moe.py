import torch, itertools
import speechrt.kernels._activations as act
import speechrt.kernels.linear_act as la
from speechrt.benchmark.moe import MoEBench, MoEBenchConfig, EXACT_BUCKETS
from speechrt.engine.precision import Precision
from speechrt.models.conformer_moe.load import build_engine
cfg = MoEBenchConfig(device="cuda", shapes=((1, 206), (16, 1024)), dtypes=("fp16",), compile_shapes=(), gemm=False, profile_shape=None)
bench = MoEBench(cfg)
for b, t in cfg.shapes:
    bench.inputs(b, t)
net16 = bench._net("fp16")
eng = build_engine(net16, Precision.of("fp16"), bench.cmvn, buckets=EXACT_BUCKETS)
encs = [eng.encoder, eng.encoder.embedding]
orig_fast = act.fast_epilogue
def set_fast(on):
    f = orig_fast if on else (lambda *a, **k: False)
    act.fast_epilogue = f; la.fast_epilogue = f
def setsw(name, v):
    for e in encs: setattr(e, name, v)
base = {n: [getattr(e, n) for e in encs] for n in ("triton_add_ln", "fp32_branches", "tf32_attention")}
print("defaults", base, flush=True)
variants = {
    "default": {},
    "no_fast_act": {"fast": False},
    "fp32_branches": {"fp32_branches": True},
    "triton_add_ln": {"triton_add_ln": True},
    "tf32_attention": {"tf32_attention": True},
    "all": {"fast": False, "fp32_branches": True, "tf32_attention": True},
}
for vname, opts in variants.items():
    set_fast(opts.get("fast", True))
    for n in ("triton_add_ln", "fp32_branches", "tf32_attention"):
        for e, v0 in zip(encs, base[n]): setattr(e, n, opts.get(n, v0))
    for b, t in cfg.shapes:
        r = bench._same_routing(eng, b, t)
        print(vname, f"{b}x{t}", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
