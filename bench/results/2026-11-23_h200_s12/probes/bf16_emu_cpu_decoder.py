import sys, torch, torch.nn.functional as F
sys.path.insert(0, "/work/main/src"); 
from speechrt.benchmark.conformer import build_models, _hyps
from speechrt.benchmark.common import error_stats
from speechrt.decoding.rescoring import decoder_inputs
from torch.overrides import TorchFunctionMode
exec(open(__import__("os").path.join(__import__("os").path.dirname(__file__), "bf16_emu_cpu_categories.py")).read().split("net = build_models")[0].split("from speechrt.benchmark.common import error_stats, valid_rows")[1])
net = build_models(0, "cpu")
b, t = 4, 64
gen = torch.Generator().manual_seed(b * 7919 + t)
feats = torch.randn(b, t, 80, generator=gen); lens = torch.full((b,), t)
N = (False, False)
with torch.inference_mode():
    mem, ml = net.encoder(feats, lens)
    hyps, hl = _hyps(b, 10, mem.shape[1], 4233, gen, "cpu")
    _, _, in_lens = decoder_inputs(hyps, hl, 4232, 4232)
    ref, _ = net.rescoring_log_probs(mem, ml, hyps, hl, False)
    valid = torch.arange(ref.shape[2]) < in_lens.unsqueeze(-1)
    for k, p in {"all bf16": {}, "linear exact": {"linear": N}, "linear+matmul exact": {"linear": N, "matmul": N}}.items():
        with Emu(p):
            out, _ = net.rescoring_log_probs(mem, ml, hyps, hl, False)
        print(k, "a0 %.4f r0 %.6f" % error_stats(out[valid], ref[valid]), flush=True)
