"""The ShareGPT-like trace's floor when every kernel runs at its roofline, one after another (no GPU needed).

    PYTHONPATH=. python3 benchmarks/trace_floor.py [--model llama-3.1-8b] [--num-requests 1000] \
        [--matmul-tflops 787] [--copy-tbps 4.22]

`bench` prints "limit / measured" against the trace's FLOPs alone (every token's linear layers at the matmul
rate). That limit ignores two costs no schedule avoids: a decode step reads every weight once, however few
requests it carries, and decode attention reads every request's K/V once per step. This floor counts them, with
every request admitted at the start (the default 1024 / 16384 settings admit all 1000 within the first steps):

- prefill: the prompts' linear-layer FLOPs at the matmul rate;
- decode step t (requests with more than t output tokens left): max(weight bytes / copy rate, FLOPs / matmul
  rate) for the linear layers and LM head, plus the K/V bytes of their contexts (prompt + t) / copy rate.

Defaults: the rates `throughput_targets.py` measured on one H200 (throughput_targets_h200_s8.log). Prints the
floor in seconds, the output tok/s it allows, and the share of that floor a given throughput reaches.
"""
from __future__ import annotations

import argparse

import numpy as np

from engine.model.presets import preset_config
from engine.model.spec import ModelSpec
from workbench.workloads import make_workload


def trace_floor(spec: ModelSpec, prompt_lens: np.ndarray, output_lens: np.ndarray, flops: float, bandwidth: float,
                dtype_bytes: int = 2) -> dict:
    """Seconds of the floor's parts (see the module docstring) for requests of these prompt / output lengths."""
    head = spec.vocab_size * spec.hidden_size
    per_token = 2.0 * (spec.num_active_params() - spec.hidden_size)  # linear layers + LM head, FLOPs
    weight_s = spec.active_weight_bytes(dtype_bytes) / bandwidth
    kv_per_token = spec.kv_bytes_per_token(dtype_bytes)
    prefill = float(prompt_lens.sum()) * (per_token - 2.0 * head) / flops  # the LM head only on the last token
    gemm = attention = 0.0
    for t in range(int(output_lens.max())):
        alive = output_lens > t
        gemm += max(weight_s, int(alive.sum()) * per_token / flops)
        attention += float((prompt_lens[alive] + t).sum()) * kv_per_token / bandwidth
    return {"prefill_s": prefill, "decode_linear_s": gemm, "decode_attention_s": attention,
            "floor_s": prefill + gemm + attention, "output_tokens": int(output_lens.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--matmul-tflops", type=float, default=787.0)
    ap.add_argument("--copy-tbps", type=float, default=4.22)
    ap.add_argument("--target", type=float, default=20000.0, help="an output tok/s to compare with the floor")
    args = ap.parse_args()
    if args.matmul_tflops <= 0 or args.copy_tbps <= 0:
        ap.error("--matmul-tflops and --copy-tbps must be > 0")
    spec = ModelSpec.from_hf_config(preset_config(args.model))
    wl = make_workload("sharegpt-like", num_requests=args.num_requests, vocab_size=spec.vocab_size, seed=0)
    prompts = np.array([r.prompt_len for r in wl])
    outputs = np.array([r.max_tokens for r in wl])
    f = trace_floor(spec, prompts, outputs, args.matmul_tflops * 1e12, args.copy_tbps * 1e12)
    best = f["output_tokens"] / f["floor_s"]
    print(f"{args.model}, {len(wl)} ShareGPT-like requests ({prompts.sum()} prompt, {f['output_tokens']} output "
          f"tokens), {args.matmul_tflops:g} TFLOP/s, {args.copy_tbps:g} TB/s:")
    print(f"  prefill {f['prefill_s']:.2f} s + decode linear layers {f['decode_linear_s']:.2f} s + decode attention "
          f"{f['decode_attention_s']:.2f} s = floor {f['floor_s']:.2f} s, {best:,.0f} out tok/s")
    print(f"  {args.target:,.0f} out tok/s takes {f['output_tokens'] / args.target:.2f} s: "
          f"{f['floor_s'] * args.target / f['output_tokens']:.3f} of the floor's speed")


if __name__ == "__main__":
    main()
