"""CPU emulation: how much of BF16's CTC prefix-beam text change comes from rounding the CTC
logits to BF16 (the engine's nn.Linear in BF16) vs the encoder's BF16 GEMM operands."""
import sys, json, torch, torch.nn.functional as F
from torch.overrides import TorchFunctionMode
sys.path.insert(0, "/work/main")
import speechrt
from recipes.synthetic_en.evaluate import read_list, transcribe
from recipes.synthetic_en.augment import read_wav, resample

def rb(t): return t.bfloat16().float() if t is not None and t.is_floating_point() else t

class Emu(TorchFunctionMode):
    """Round both operands of every GEMM-like op to BF16 (float32 accumulation, outputs kept),
    as an ideal BF16 engine with float32 accumulators does."""
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, torch._C._nn.linear, F.conv1d, torch.conv1d, F.conv2d, torch.conv2d,
                    torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
                    torch.einsum):
            if func is torch.einsum:
                a = [args[0]] + [rb(t) for t in args[1:]]
            else:
                a = list(args); a[0] = rb(a[0]); a[1] = rb(a[1])
            return func(*a, **kwargs)
        return func(*args, **kwargs)

model = speechrt.load_model(None, device="cpu")
net = model.net if hasattr(model, "net") else model.recognizer.net
items = read_list(__import__("pathlib").Path("/tmp/syn/data/test/wav.scp"))
N = int(sys.argv[1]) if len(sys.argv) > 1 else len(items)
items = items[:N]
wavs = []
for _, path in items:
    x, rate = read_wav(path)
    wavs.append(torch.from_numpy(resample(x, rate, model.sample_rate)))
orig = net.ctc_log_probs
def head(mode):
    def f(enc):
        if mode == "fp32":
            return orig(enc)
        z = F.linear(rb(enc.float()), rb(net.ctc.weight.float()), rb(net.ctc.bias.float()))
        if mode == "bf16_out":
            z = rb(z)
        return torch.log_softmax(z.float(), dim=-1)
    return f
res = {}
for method in ("ctc_prefix_beam_search", "ctc_greedy_search"):
    for enc_mode in ("fp32", "bf16"):
        if enc_mode == "fp32":
            heads = ("fp32", "bf16_out")
        else:
            heads = ("bf16_out", "bf16_in_fp32_out")
        for head_mode in heads:
            net.ctc_log_probs = head(head_mode)
            with torch.inference_mode():
                if enc_mode == "bf16":
                    with Emu():
                        texts = transcribe(model, wavs, 32, method=method, beam_size=10)
                else:
                    texts = transcribe(model, wavs, 32, method=method, beam_size=10)
            res[(method, enc_mode, head_mode)] = texts
            ref = res[(method, "fp32", "fp32")]
            same = sum(a == b for a, b in zip(texts, ref))
            print(f"{method:24s} encoder {enc_mode:5s} ctc head {head_mode:17s} same text {same}/{len(ref)}", flush=True)
