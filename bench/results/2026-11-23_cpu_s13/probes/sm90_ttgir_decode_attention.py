"""Session 13 probe (CPU): compile decode attention's kernel for sm_90 with Triton 3.6 (see
sm90_ttgir_moe.py for the venv) -- cross-attention shapes (one query row, 64-dim heads), float16
and int8 caches, with and without the hand prefetch -- and report shared memory, registers and
the TTGIR's async copies. The torch-free copy of the kernel:

    python3 - <<'X'
    m = open("src/speechrt/kernels/decode_attention.py").read()
    ker = m[m.index("@triton.jit\ndef _dot("):m.index("@triton.jit\ndef _combine_kernel(")]
    open("/tmp/dak.py", "w").write("import triton\nimport triton.language as tl\nfrom "
        "triton.language.extra.cuda import gdc_launch_dependents, gdc_wait\n" + ker)
    X
"""
import sys, os, subprocess, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, "/tmp"); import dak
names = ["Q","K","V","KN","VN","LENS","O","LSE","FINAL","COUNT","KS","VS",
 "stride_qb","stride_qh","stride_kb","stride_kh","stride_kl","stride_vb","stride_vh","stride_vl",
 "stride_ksb","stride_ksh","stride_ksl","stride_vsb","stride_vsh","stride_vsl",
 "stride_knb","stride_knh","stride_vnb","stride_vnh","stride_ob","stride_oh","stride_os","stride_fb","stride_fh",
 "B","H","L","D","chunk","qk_scale","n_splits"]
def sig(int8):
    t = {"Q":"*fp16","K":"*i8" if int8 else "*fp16","V":"*i8" if int8 else "*fp16","KN":"*fp16","VN":"*fp16","LENS":"*i64","O":"*fp32","LSE":"*fp32","FINAL":"*fp16","COUNT":"*i32","KS":"*fp32","VS":"*fp32"}
    s = {}
    for n in names:
        s[n] = t.get(n, "fp32" if n == "qk_scale" else "i32")
    return s
consts = ["GROUP","BLOCK_G","BLOCK_N","BLOCK_D","HAS_LENS","APPEND","KV_INT8","PRELOAD","PREFETCH","SPLIT","FUSE_COMBINE","BLOCK_S","UPCAST","PRECISION","USE_PDL"]
for int8 in (True, False):
    for pf in (False, True):
        for bn in (64, 128):
            s = sig(int8)
            c = dict(GROUP=1, BLOCK_G=16, BLOCK_N=bn, BLOCK_D=64, HAS_LENS=False, APPEND=False, KV_INT8=int8, PRELOAD=True, PREFETCH=pf, SPLIT=True, FUSE_COMBINE=True, BLOCK_S=8, UPCAST=False, PRECISION="tf32", USE_PDL=True)
            for k in consts: s[k] = "constexpr"
            attrs = {}
            for i, (k, v) in enumerate(s.items()):
                if v.startswith("*") or (k.startswith("stride") and k not in ("stride_kl","stride_vl","stride_ksl","stride_vsl")) or k in ("stride_kl","stride_vl"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
            src = ASTSource(fn=dak._decode_attention_kernel, signature=s, constexprs=c, attrs=attrs)
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
            name = f"da_i8{int8}_pf{pf}_bn{bn}"
            open(f"/tmp/{name}.ptx","w").write(k.asm["ptx"]); open(f"/tmp/{name}.ttgir","w").write(k.asm["ttgir"])
            r = subprocess.run([os.environ["PTXAS"], "-v", "--gpu-name", "sm_90a", f"/tmp/{name}.ptx", "-o", "/tmp/k.cubin"], capture_output=True, text=True)
            regs = [l.strip() for l in r.stderr.splitlines() if "registers" in l or "spill" in l]
            g = k.asm["ttgir"]
            print(name, "smem", k.metadata.shared, regs, "async:", g.count("async_copy_global_to_local"), "ld.global in ptx:", k.asm["ptx"].count("ld.global"), flush=True)
