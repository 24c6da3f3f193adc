"""triton_int8_mma with bfloat16 activations far beyond float16's range, on the GPU (the kernel runs its MMA in
float16 with x scaled by 2^-4; a scaling the compiler reordered turned |x| >= 65520 into NaN outputs).

    PYTHONPATH=. python3 benchmarks/int8_mma_large_x.py

Prints, per rows m and activation scale, the relative error against the float32 int8 reference and whether
any output is NaN. data/benchmarks/int8_mma_large_x_h200.log is the run that chose the exponent-bits scaling
(xmode=2 there; xmode=0, the reordered multiply, gave NaN from x * 2e4 on); the kernel now has only that one.
"""
import torch

from engine.quant.int8 import Int8Linear, int8_linear_reference
from engine.quant.triton_int8 import num_sms
from engine.quant.triton_int8_mma import _launch_mma, mma8_candidates


def rel(a, b):
    return ((a.float() - b).norm() / b.norm()).item()


torch.manual_seed(0)
lin = torch.nn.Linear(4096, 1000, bias=False, device="cuda", dtype=torch.bfloat16)
torch.nn.init.normal_(lin.weight, 0.0, 0.02)
q = Int8Linear.from_linear(lin)
for m in (1, 16, 64):
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    ref = int8_linear_reference(x.float(), q.weight_int8, q.scales)
    cfg = {k: v for k, v in mma8_candidates(m, 1000, 4096, num_sms(x.device), asm=True)[0].items()
           if k not in ("gemv", "kernel")}
    for scale in (1.0, 1e3, 2e4, 1e5):
        out = _launch_mma(x * scale, q.weight_int8, q.scales, **cfg)
        print(f"m={m} x*{scale:g}: rel err {rel(out, ref * scale):.2e}, nan {out.isnan().any().item()}, "
              f"max|x| {(x * scale).abs().max().item():.0f}", flush=True)
