"""Static sm_90 checks of the int4 changes of 2026-12-07 (no GPU; Triton's bundled ptxas and nvdisasm, as
tests/engine/test_quant_sm90_compile.py compiles):

1. builds: the tc kernel (`_int4_tc_kernel`) for groups 32 / 64 / 128 over steps of 128 and 256 features that span
   several groups (ONE_GROUP=False), dequant scale / asm_scaled, x gathered / natural / permuted, both orientations,
   K whole steps or not: 120 variants, "ok" or the failure, with the running Triton (run it with 3.6 and 3.9);
2. sass: instructions, shared-memory accesses and barriers a warp of the decode reduce (head_dim 128, 16 slices),
   plain and storing o_proj's limbs (4 and 1 warps), and of the `_x_limbs_kernel` program it replaces.

    PYTHONPATH=. python benchmarks/int4_sm90_builds.py [builds|sass]
"""
from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))

import triton  # noqa: E402
from test_quant_sm90_compile import INT4_ARGS, INT4_SIZES, _compile  # noqa: E402


def builds() -> None:
    from engine.quant.triton_int4_tc import _int4_tc_kernel
    sig = {**INT4_ARGS, "M": "i32", "N": "i32", **INT4_SIZES}
    counts = {}
    for group, dequant, xmode, swap, chunks, even in itertools.product(
            (32, 64, 128), (0, 3), ("gather", "xnat", "xperm"), (False, True), (4, 8), (True, False)):
        if group == 128 and chunks == 4:  # (one group a step)
            continue
        consts = dict(RUN=16, GROUP=group, ONE_GROUP=False, EVEN_K=even, SERIAL=True, STAGES=3, PRECISION="tf32",
                      XNAT=xmode == "xnat", PREFETCH=False, XPERM=xmode == "xperm", BLOCK_M=16 if swap else 64,
                      BLOCK_N=128, CHUNKS=chunks, SWAP=swap, DEQUANT=dequant)
        try:
            _compile(_int4_tc_kernel, sig, consts)
            result = "ok"
        except SystemExit:  # _compile's "cannot compile here" (a pass failure included)
            result = "failed"
        except Exception as exc:  # noqa: BLE001
            result = f"failed: {type(exc).__name__}"
        counts[result] = counts.get(result, 0) + 1
        print(f"group {group:3d} dequant {dequant} x {xmode:6s} swap {swap!s:5s} chunks {chunks} even_k {even!s:5s} "
              f"{result}", flush=True)
    print(f"triton {triton.__version__}: {counts}")


def sass() -> None:
    from engine.kernels.triton_decode import _decode_reduce_kernel
    from engine.quant.triton_int4_dp4a import _decode_reduce_int8x2_kernel, _x_limbs_kernel
    strides = {k: "i32" for k in ("stride_acc_b", "stride_acc_h", "stride_acc_s", "stride_lse_b", "stride_lse_h",
                                  "stride_ot", "stride_oh")}
    plain = {"acc_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "num_splits": "i32", **strides}
    limbs = {"acc_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp32",
             "num_splits": "i32", **strides, "stride_qm": "i32", "stride_qp": "i32", "stride_sm": "i32"}
    packing = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp32", "stride_xm": "i32", "stride_qm": "i32",
               "stride_qp": "i32", "stride_sm": "i32"}
    kernels = [("reduce, 4 warps", _decode_reduce_kernel, plain,
                dict(HEAD_DIM=128, BLOCK_D=128, SPLITS_PAD=16, RELEASE=True), 4)]
    kernels += [(f"reduce + limbs, {w} warp(s)", _decode_reduce_int8x2_kernel, limbs,
                 dict(HEAD_DIM=128, SPLITS_PAD=16, CHUNKS=4, RELEASE=True), w) for w in (4, 1)]
    kernels += [("_x_limbs_kernel, 1 warp", _x_limbs_kernel, packing, dict(CHUNKS=4, PDL=True), 1)]
    for name, fn, sig, consts, warps in kernels:
        code = [line for line in _compile(fn, sig, consts, num_warps=warps, what="sass").splitlines()
                if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
        print(f"{name:28s} instructions {len(code):4d}  shared {sum(('LDS' in c or 'STS' in c) for c in code):3d}"
              f"  barriers {sum('BAR' in c for c in code):3d}  local {sum(('LDL' in c or 'STL' in c) for c in code)}")


if __name__ == "__main__":
    parts = sys.argv[1:] or ["sass", "builds"]
    for part in parts:
        {"builds": builds, "sass": sass}[part]()
