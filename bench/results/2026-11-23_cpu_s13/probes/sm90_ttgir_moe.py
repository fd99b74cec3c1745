"""Session 13 probe (CPU): compile the MoE grouped-GEMM kernels for sm_90 with the device's
Triton (3.6, in a torch-free venv: python3 -m venv /tmp/tr36 && /tmp/tr36/bin/pip install
triton==3.6.0) and report shared memory, registers/spills (ptxas -v) and how many async copies
(pipelined loads) and wgmma ops the TTGIR has. Run from the repository root:

    python3 - <<'X'   # torch-free copy of the kernels: activations + moe.py's Triton section
    a = open("src/speechrt/kernels/_activations.py").read()
    m = open("src/speechrt/kernels/moe.py").read()
    act = a[a.index("@triton.jit\ndef fast_sigmoid"):a.index("def fast_epilogue")]
    ker = m[m.index("@triton.jit\ndef _route_kernel"):m.index("# ----" + "-" * 88 + "\n# Launchers")]
    open("/tmp/moek.py", "w").write("import triton\nimport triton.language as tl\n" + act + ker)
    X
    PTXAS=$(ls /tmp/tr36/lib/python3*/site-packages/triton/backends/nvidia/bin/ptxas) \
        /tmp/tr36/bin/python bench/results/2026-11-23_cpu_s13/probes/sm90_ttgir_moe.py
"""
import sys, time, os, subprocess
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, "/tmp"); import moek as moe
target = GPUTarget("cuda", 90, 32)
def comp(fn, sig, consts, opts):
    attrs = {}
    for i, (k, v) in enumerate(sig.items()):
        if v.startswith("*") or k.startswith("stride") or k in ("D", "HID"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=target, options=opts)
    return k.metadata.shared, k.asm
def report(name, asm):
    open(f"/tmp/k_{name}.ptx","w").write(asm["ptx"]); open(f"/tmp/k_{name}.ttgir","w").write(asm["ttgir"])
    r = subprocess.run([os.environ["PTXAS"], "-v", "--gpu-name", "sm_90a", f"/tmp/k_{name}.ptx", "-o", "/tmp/k.cubin"], capture_output=True, text=True)
    lines = [l for l in r.stderr.splitlines() if "spill" in l or "registers" in l]
    return " | ".join(l.strip() for l in lines)
up_sig = {"X":"*fp16","ORDER":"*i32","OFFS":"*i32","W1":"*fp16","B1":"*fp16","H":"*fp16","D":"i32","HID":"i32","E":"i32","top_k":"i32",
  "stride_x":"i32","stride_we":"i32","stride_wn":"i32","stride_be":"i32","stride_h":"i32",
  "HAS_BIAS":"constexpr","ACT":"constexpr","UPCAST":"constexpr","INPUT_PRECISION":"constexpr","BLOCK_M":"constexpr","BLOCK_N":"constexpr","BLOCK_K":"constexpr","BLOCK_E":"constexpr","PROGRAMS":"constexpr"}
dn_sig = {"HS":"*fp16","ORDER":"*i32","OFFS":"*i32","GATE":"*fp32","W2":"*fp16","B2":"*fp16","Y":"*fp16","D":"i32","HID":"i32","E":"i32",
  "stride_h":"i32","stride_we":"i32","stride_wn":"i32","stride_be":"i32","stride_y":"i32",
  "HAS_BIAS":"constexpr","HAS_GATE":"constexpr","UPCAST":"constexpr","INPUT_PRECISION":"constexpr","BLOCK_M":"constexpr","BLOCK_N":"constexpr","BLOCK_K":"constexpr","BLOCK_E":"constexpr","PROGRAMS":"constexpr"}
cfgs = [(128,128,64,8,3),(128,256,64,8,3),(64,128,64,4,3),(128,128,64,4,3),(256,128,64,8,3)]
for which, fn, sig in (("up", moe._expert_up_kernel, up_sig), ("dn", moe._expert_down_kernel, dn_sig)):
    for (bm,bn,bk,w,st) in cfgs:
        for programs in (0, 132):
            c = dict(HAS_BIAS=True, UPCAST=False, INPUT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=32, PROGRAMS=programs)
            c.update(ACT=1) if which == "up" else c.update(HAS_GATE=True)
            try:
                sh, asm = comp(fn, sig, c, {"num_warps": w, "num_stages": st})
                g = asm["ttgir"]
                name = f"{which}{bm}x{bn}w{w}s{st}p{programs}"
                print(name, f"smem={sh}", report(name, asm), "async_copy:", g.count("async_copy_global_to_local"), "wgmma:", g.count("warp_group_dot "), flush=True)
            except Exception as e:
                print(which, bm, bn, programs, "ERR", type(e).__name__, str(e)[:300], flush=True)
