"""Every autotune candidate of the MoE decode kernels, and the dedup path's tiles, compile for Hopper (sm_90a)
without a GPU (Triton's bundled ptxas), for top-k 8 of 128 experts (Qwen3-MoE) and 2 of 8 (Mixtral), the
routing fused or not, in bf16; the decode kernels stream the weights in 16-byte loads.
A candidate that fails to compile would only show on the GPU, at the autotuner's first call.
Skipped where Triton has no CUDA backend or ptxas. Compiles in a subprocess: the other kernel tests put this
process in Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import sys

import pytest
from sm90_compile import run_check

triton = pytest.importorskip("triton")

DOWN_ARGS = {"act_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "ids_ptr": "*i64", "weights_ptr": "*fp32",
             "num_tokens": "i32", "N": "i32", "K": "i32", "stride_we": "i32", "stride_wn": "i32", "stride_o": "i32"}
GATE_UP_ARGS = {"x_ptr": "*bf16", "w_ptr": "*bf16", "act_ptr": "*bf16", "ids_ptr": "*i64", "logits_ptr": "*bf16",
                "weights_ptr": "*fp32", "routing_ptr": "*i64", "num_pairs": "i32", "N": "i32", "K": "i32",
                "num_experts": "i32", "stride_x": "i32", "stride_l": "i32", "stride_we": "i32", "stride_wn": "i32"}


GEMM_ARGS = {"a_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "sorted_ids_ptr": "*i64",
             "block_expert_ptr": "*i64", "weights_ptr": "*fp32", "num_pairs": "i32", "N": "i32", "K": "i32",
             "stride_am": "i32", "stride_we": "i32", "stride_wn": "i32", "stride_om": "i32"}
SM90_SHARED_BYTES = 232448


def _compile(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int = 3):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items())
             if v != "constexpr" and k not in ("num_pairs", "num_tokens")}
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
    except CompilationError:
        raise
    except Exception as exc:  # noqa: BLE001 - no CUDA backend or ptxas on this machine
        print(f"SKIP: cannot compile for sm_90 here: {exc!r}"[:200])
        sys.exit(0)
    return kernel


def check_all_candidates():
    from engine.kernels import moe_decode as moe
    for top_k, num_experts in ((8, 128), (2, 8)):
        k_pad = max(2, triton.next_power_of_2(top_k))
        for cfg in moe._prune_down(moe._down_tuned.configs, {}, K_PAD=k_pad):
            ptx = _compile(moe._moe_gemv_down_kernel, DOWN_ARGS, dict(TOP_K=top_k, K_PAD=k_pad, **cfg.kwargs),
                           cfg.num_warps).asm["ptx"]
            assert "ld.global" in ptx and ".v4." in ptx, (top_k, cfg)
        # The routing fused (the model's decode) with every candidate for top-k 8; the first candidate otherwise.
        for i, cfg in enumerate(moe._gate_up_tuned.configs[:None if top_k == 8 else 1]):
            for route in (True, False)[:1 if i else 2]:
                meta = dict(TOP_K=top_k, ROUTE=route, RENORMALIZE=True, HAS_ROUTING=route, BLOCK_E=num_experts)
                ptx = _compile(moe._moe_gemv_gate_up_kernel, GATE_UP_ARGS, dict(**meta, **cfg.kwargs),
                               cfg.num_warps).asm["ptx"]
                assert ".v4." in ptx, (top_k, route, cfg)


def check_dedup_tiles():
    """The dedup path's tiles for Qwen3-30B-A3B (T = 8, 16) and Mixtral (T = 2, 64) compile, with tensor-core
    wgmma or mma, in the shared memory of an SM."""
    from engine.kernels import moe
    for t, k, e, h, i in ((8, 8, 128, 2048, 768), (16, 8, 128, 2048, 768), (2, 2, 8, 4096, 14336),
                          (64, 2, 8, 4096, 14336)):
        for n, gate_up in ((i, True), (h, False)):
            cfg = dict(moe.dedup_config(t, k, e, n, on_gpu=True))
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            meta = dict(TOP_K=k, A_BY_TOKEN=gate_up, GATE_UP=gate_up, MUL_WEIGHT=not gate_up, DEDUP=True, **cfg)
            kernel = _compile(moe._moe_gemm_kernel, GEMM_ARGS, meta, warps, stages)
            assert "mma" in kernel.asm["ptx"], (t, k, cfg)
            assert kernel.metadata.shared <= SM90_SHARED_BYTES, (t, k, cfg, kernel.metadata.shared)


def check_all():
    check_all_candidates()
    check_dedup_tiles()


def test_decode_candidates_compile_for_sm90():
    run_check(__file__)


if __name__ == "__main__":
    check_all()
