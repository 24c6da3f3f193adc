"""The tuned-config disk cache across processes: run it twice with the same ENGINE_TUNING_CACHE folder; the second
process reads the first's choices (its "seconds" drop, its errors against the float weight stay the same).

    for p in first second; do ENGINE_TUNING_CACHE=/tmp/tc PYTHONPATH=. python3 benchmarks/tuning_cache_check.py $p; done

One H200 (data/benchmarks/gpu_checks_h200_s7.log): 13.16 s, then 0.66 s, 4 entries, the same errors.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from engine.quant import tuning
from engine.quant.int4 import pack_int4_kernel, quantize_int4
from engine.quant.int8 import quantize_int8
from engine.quant.triton_int4 import int4_matmul
from engine.quant.triton_int8 import int8_matmul


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def main() -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    w = torch.randn(6144, 4096, device=dev, dtype=torch.bfloat16) * 0.02
    q8, s8 = quantize_int8(w)
    q4, sc4, z4 = quantize_int4(w)
    p4 = pack_int4_kernel(q4)
    t0 = time.perf_counter()
    errors = []
    for m in (1, 16):
        x = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16)
        ref = x.float() @ w.float().t()
        errors.append((m, rel_err(int8_matmul(x, q8, s8), ref), rel_err(int4_matmul(x, p4, sc4, z4, 128), ref)))
    torch.cuda.synchronize()
    path = tuning.cache_file(dev)
    print(json.dumps({"process": sys.argv[1] if len(sys.argv) > 1 else "", "seconds": round(time.perf_counter() - t0, 2),
                      "rel_err": errors, "cache_file": str(path),
                      "entries": len(json.loads(path.read_text())) if path is not None and path.exists() else 0}))


if __name__ == "__main__":
    main()
