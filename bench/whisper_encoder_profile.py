"""Profile the Whisper encoder (large-v3 dims, random FP16 weights) on the kernel path vs the torch
path at batch 1 and 16: GPU time per kernel from torch.profiler. Run on a CUDA machine:

    PYTHONPATH=src python3 bench/whisper_encoder_profile.py
"""
import torch
from torch.profiler import ProfilerActivity, profile

from speechrt.benchmark.whisper import build_speechrt
from speechrt.models.whisper.config import preset

net = build_speechrt(preset("large-v3-turbo"), torch.float16, "cuda", 0)
for b in (1, 16):
    mel = torch.randn(b, net.dims.n_mels, 3000, device="cuda", dtype=torch.float16)
    for kernels in (True, False):
        net.kernels = kernels
        with torch.inference_mode():
            for _ in range(3):
                net.embed_audio(mel)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                net.embed_audio(mel)
                torch.cuda.synchronize()
        ka = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:8]
        tot = sum(e.self_device_time_total for e in prof.key_averages()) / 1000
        print(f"B={b} kernels={kernels}: {tot:.2f} ms GPU")
        for e in ka:
            print(f"   {e.self_device_time_total/1000:8.3f} ms {e.count:4d}x {e.key[:90]}")
