"""Session 13 probe (CPU): the skinny K-loop tensor-core kernel (16 rows) for sm_90, with and
without the LayerNorm prologue folded into its K loop; prints the TTGIR async copies. The
torch-free copy /tmp/skk.py: _activations (fast_sigmoid..activate), skinny_split.bias_act_store
and skinny_linear from _row_stats to _row_input."""
import sys, triton
sys.path.insert(0, "/tmp"); import skk
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
names = ["X","W","BIAS","LN_W","LN_B","R","Y","M","N","K","stride_xm","stride_wn","stride_rm","stride_ym","eps"]
types = {"X":"*fp32","W":"*fp16","BIAS":"*fp16","LN_W":"*fp32","LN_B":"*fp32","R":"*fp32","Y":"*fp16","eps":"fp32"}
consts = ["HAS_BIAS","HAS_LN","HAS_LN_W","HAS_LN_B","HAS_RESIDUAL","ACT","USE_DOT","UPCAST","INPUT_PRECISION","BLOCK_M","BLOCK_N","BLOCK_K","USE_PDL"]
for ln in (False, True):
    sig = {n: types.get(n, "i32") for n in names}
    if not ln: sig["X"] = "*fp16"
    for c in consts: sig[c] = "constexpr"
    c = dict(HAS_BIAS=True, HAS_LN=ln, HAS_LN_W=ln, HAS_LN_B=ln, HAS_RESIDUAL=False, ACT=0, USE_DOT=True, UPCAST=False, INPUT_PRECISION="tf32", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, USE_PDL=True)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if sig[n].startswith("*") or n in ("M","N","K","stride_xm","stride_wn","stride_rm","stride_ym")}
    k = triton.compile(ASTSource(fn=skk._skinny_linear_kernel, signature=sig, constexprs=c, attrs=attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    g = k.asm["ttgir"]
    print("HAS_LN", ln, "async", g.count("async_copy_global_to_local"), "smem", k.metadata.shared)
