"""Session 13 probe (CPU): compile decode attention's kernel for sm_90 with Triton 3.6 (see
sm90_ttgir_moe.py for the venv) -- cross-attention shapes (one query row, 64-dim heads), float16
and int8 caches, 2 and 4 pipeline stages -- and report shared memory, registers and the TTGIR's
async copies (pipelined loads). ``spec16`` marks every integer argument whose value at the
Whisper large-v3 16-row cross-attention launch (RUNTIME below) is a multiple of 16, as Triton's
JIT specializes them at launch; without it (pointers aligned, nothing else known) the
head-dim mask ``d < D`` and the row/head offsets are not provably vector-uniform/aligned and
no K/V load is pipelined -- the mistake of this session's first reading. The torch-free copy
of the kernel:

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
# int arguments at Whisper large-v3 cross-attention, 16 audios, 20 heads of 64, 1500 keys, int8
# or float16 caches (B, H, L, D) contiguous, scales (B, H, L), 4 splits of 384 keys
RUNTIME = dict(stride_qb=20 * 64, stride_qh=64, stride_kb=20 * 1500 * 64, stride_kh=1500 * 64,
               stride_kl=64, stride_vb=20 * 1500 * 64, stride_vh=1500 * 64, stride_vl=64,
               stride_ksb=20 * 1500, stride_ksh=1500, stride_ksl=1, stride_vsb=20 * 1500,
               stride_vsh=1500, stride_vsl=1, stride_knb=20 * 64, stride_knh=64,
               stride_vnb=20 * 64, stride_vnh=64, stride_ob=20 * 4 * 64, stride_oh=4 * 64,
               stride_os=64, stride_fb=20 * 64, stride_fh=64, B=16, H=20, L=1500, D=64,
               chunk=384, n_splits=4)
consts = ["GROUP","BLOCK_G","BLOCK_N","BLOCK_D","HAS_LENS","APPEND","KV_INT8","PRELOAD","SPLIT","FUSE_COMBINE","BLOCK_S","UPCAST","PRECISION","USE_PDL"]
for int8 in (True, False):
  for spec16 in (False, True):
    for stages in (2, 4):
        for bn in (64,):
            s = sig(int8)
            c = dict(GROUP=1, BLOCK_G=16, BLOCK_N=bn, BLOCK_D=64, HAS_LENS=False, APPEND=False, KV_INT8=int8, PRELOAD=True, SPLIT=True, FUSE_COMBINE=True, BLOCK_S=8, UPCAST=False, PRECISION="tf32", USE_PDL=True)
            for k in consts: s[k] = "constexpr"
            attrs = {}
            for i, (k, v) in enumerate(s.items()):
                if v.startswith("*") or (spec16 and RUNTIME.get(k, 1) % 16 == 0):
                    attrs[(i,)] = [["tt.divisibility", 16]]
            src = ASTSource(fn=dak._decode_attention_kernel, signature=s, constexprs=c, attrs=attrs)
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages})
            name = f"da_int8={int8}_spec16={spec16}_stages={stages}_bn{bn}"
            open(f"/tmp/{name}.ptx","w").write(k.asm["ptx"]); open(f"/tmp/{name}.ttgir","w").write(k.asm["ttgir"])
            r = subprocess.run([os.environ["PTXAS"], "-v", "--gpu-name", "sm_90a", f"/tmp/{name}.ptx", "-o", "/tmp/k.cubin"], capture_output=True, text=True)
            regs = [l.strip() for l in r.stderr.splitlines() if "registers" in l or "spill" in l]
            g = k.asm["ttgir"]
            print(name, "smem", k.metadata.shared, regs, "async:", g.count("async_copy_global_to_local"), "ld.global in ptx:", k.asm["ptx"].count("ld.global"), flush=True)
