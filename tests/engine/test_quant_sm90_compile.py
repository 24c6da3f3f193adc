"""The quantized matmul kernels (and the decode GEMV of engine/kernels/triton_gemv.py) compile for Hopper
(sm_90) without a GPU (Triton's bundled ptxas), and
the compiled code has the properties their speed rests on: tensor-core wgmma in the tl.dot kernels
(e4m3 operands for fp8, float16 for the int8 mma kernel), 16-byte asynchronous copies of the int4 weight
words, the int4 "pairs" kernel unpacking in the wgmma operand's registers (two codes per LOP3), the
split-K counter's acquire-release atomic. Skipped where Triton has no CUDA backend or ptxas.

Each test compiles in a subprocess: the other kernel tests put this one in Triton's interpreter
(TRITON_INTERPRET=1), whose kernels cannot be compiled; with SM90_COMPILE_PYTHONS also in other Pythons, such
as one with the GPU machine's Triton (tests/engine/sm90_compile.py).
"""
from __future__ import annotations

import re
import sys

import pytest
from sm90_compile import run_check

triton = pytest.importorskip("triton")

def _run(check: str) -> None:
    """Run `check` of this file in fresh interpreters (sm90_compile.run_check: also with SM90_COMPILE_PYTHONS)."""
    run_check(__file__, check)


def _compile(fn, signature: dict, constexprs: dict, num_warps: int = 4, what: str = "ptx") -> str:
    """The kernel's PTX, or with what="sass" its sm_90 SASS (the bundled nvdisasm on the cubin)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    # What the JIT assumes of real launches: 16-aligned pointers, strides and sizes.
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items())
             if v != "constexpr" and k != "split_k" and not v.startswith("tensordesc")}
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=3))
    except CompilationError:  # the kernel's own fault: fail
        raise
    except Exception as exc:  # noqa: BLE001 - no CUDA backend or ptxas on this machine
        print(f"SKIP: cannot compile for sm_90 here: {exc!r}"[:200])
        sys.exit(0)
    if what == "sass":
        import subprocess
        import tempfile
        from pathlib import Path
        with tempfile.TemporaryDirectory() as d:
            Path(d, "k.cubin").write_bytes(kernel.asm["cubin"])
            nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
            return subprocess.run([str(nvdisasm), "-c", str(Path(d, "k.cubin"))], capture_output=True, text=True,
                                  check=True).stdout
    return kernel.asm[what]


INT4_ARGS = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "out_ptr": "*fp32",
             "res_ptr": "*bf16", "lock_ptr": "*i32"}
INT4_SIZES = {"K": "i32", "k_per_split": "i32", "split_k": "i32", "stride_xm": "i32", "stride_wn": "i32",
              "stride_ws": "i32", "stride_sn": "i32", "stride_os": "i32", "stride_om": "i32"}


def _pdl_variants(compile_with, loads_before_wait: bool = False) -> str:
    """Compile a GEMV without and with programmatic dependent launch (engine.kernels.pdl); return the PTX
    without. With: each program waits for the kernels before it, runs its main loop, and only then lets the
    next kernel launch; unless loads_before_wait (the bf16 GEMV loads its first weight tile first) it loads
    nothing from global memory before the wait. Without: none of it."""
    off, on = compile_with(PDL=False), compile_with(PDL=True)
    assert "griddepcontrol" not in off
    wait, release = on.find("griddepcontrol.wait"), on.find("griddepcontrol.launch_dependents")
    assert 0 <= wait < release, (wait, release)
    assert re.search(r"fma\.rn\.f32", on[wait:release])  # the main loop in between
    if not loads_before_wait:
        assert not re.search(r"ld\.global|cp\.async\.cg", on[:wait])
    return off


def check_int4_gemv():
    from engine.quant.triton_int4 import _int4_gemv_kernel
    for prefetch in (False, True):  # the scale and zero loaded in the step or a step ahead
        ptx = _pdl_variants(lambda **pdl: _compile(
            _int4_gemv_kernel, {**INT4_ARGS, "N": "i32", **INT4_SIZES},
            dict(RUN=16, GROUP=128, BLOCK_N=64, CHUNKS=4, ONE_GROUP=True, EVEN_K=True, SERIAL=True, STAGES=3,
                 PREFETCH=prefetch, **pdl)))
        assert re.search(r"cp\.async\.cg\.shared\.global \[[^\]]*\], \[[^\]]*\], 0x10", ptx)
        assert "atom.global.gpu.acq_rel.add" in ptx
        # the codes are float32 denormals: an FMA that flushed them to zero would multiply x by 0
        assert "fma.rn.f32" in ptx and not re.search(r"\.ftz\.f32", ptx)


def check_int4_dp4a():
    """The integer-dot GEMV: 16-byte asynchronous copies of the weight words, the products by dp4a; the kernel
    that packs x's limbs waits for the kernel before it (PDL) before it reads x."""
    from engine.quant.triton_int4_dp4a import _int4_dp4a_kernel, _x_limbs_kernel
    sig = {"q_ptr": "*i32", "xs_ptr": "*fp32", **{k: v for k, v in INT4_ARGS.items() if k != "x_ptr"}, "N": "i32",
           **{k: v for k, v in INT4_SIZES.items() if k != "stride_xm"}, "stride_qm": "i32", "stride_qp": "i32",
           "stride_xsm": "i32"}
    sig = {k: sig[k] for k in _int4_dp4a_kernel.arg_names if k in sig}
    ptx = _pdl_variants(lambda **pdl: _compile(_int4_dp4a_kernel, sig, dict(
        RUN=16, GROUP=128, BLOCK_N=128, CHUNKS=4, SERIAL=True, STAGES=3, ASM=True, **pdl)))
    assert re.search(r"cp\.async\.cg\.shared\.global \[[^\]]*\], \[[^\]]*\], 0x10", ptx)
    # four a word (both limbs, both nibble halves): 128 x 16 words over 128 threads
    assert len(re.findall(r"dp4a\.u32\.s32", ptx)) == 4 * 128 * 16 // 128
    assert "atom.global.gpu.acq_rel.add" in ptx
    limbs = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp32", "stride_xm": "i32",
             "stride_qm": "i32", "stride_qp": "i32", "stride_sm": "i32"}
    ptx = _compile(_x_limbs_kernel, limbs, dict(CHUNKS=4, PDL=True), num_warps=1)
    wait = ptx.find("griddepcontrol.wait")
    assert 0 <= wait < ptx.find("ld.global")
    # the fused producer (SwiGLU) that writes the limbs itself, act-order sources or not
    from engine.quant.triton_int4_dp4a import _silu_and_mul_int8x2_kernel
    out = {"q_ptr": "*i32", "s_ptr": "*fp32", "stride_qm": "i32", "stride_qp": "i32", "stride_sm": "i32"}
    for sources in (False, True):
        ptx = _compile(_silu_and_mul_int8x2_kernel, {
            "h_ptr": "*bf16", "src_ptr": "*i64", **{k: out[k] for k in ("q_ptr", "s_ptr")}, "inter": "i32",
            "stride_hm": "i32", **{k: out[k] for k in ("stride_qm", "stride_qp", "stride_sm")}},
            dict(CHUNKS=4, SOURCES=sources, RELEASE=True), num_warps=1)
        assert "griddepcontrol.launch_dependents" in ptx and "st.global" in ptx
    # and the decode attention's reduce (o_proj's input), 1 and 2 steps a head
    from engine.quant.triton_int4_dp4a import _decode_reduce_int8x2_kernel
    sig = {"acc_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", **{k: out[k] for k in ("q_ptr", "s_ptr")},
           "num_splits": "i32", **{k: "i32" for k in ("stride_acc_b", "stride_acc_h", "stride_acc_s", "stride_lse_b",
                                                      "stride_lse_h", "stride_ot", "stride_oh")},
           **{k: out[k] for k in ("stride_qm", "stride_qp", "stride_sm")}}
    for chunks in (4, 2):
        ptx = _compile(_decode_reduce_int8x2_kernel, sig, dict(HEAD_DIM=128, SPLITS_PAD=16, CHUNKS=chunks,
                                                                  RELEASE=True))
        assert "griddepcontrol.launch_dependents" in ptx and "st.global" in ptx


def check_dot_kernels():
    from engine.quant.triton_int4 import _int4_dot_kernel
    from engine.quant.triton_int8 import _int8_mm_kernel
    ptx = _compile(_int4_dot_kernel, {**INT4_ARGS, "M": "i32", "N": "i32", **INT4_SIZES},
                   dict(RUN=16, GROUP=128, BLOCK_M=16, BLOCK_N=64, CHUNKS=4, ONE_GROUP=True, EVEN_K=True,
                        SERIAL=False, STAGES=3, PRECISION="tf32"))
    assert "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16" in ptx
    int8_sig = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": "*fp32", "res_ptr": "*bf16",
                "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "split_k": "i32", "stride_xm": "i32",
                "stride_wn": "i32", "stride_os": "i32", "stride_om": "i32"}
    ptx = _compile(_int8_mm_kernel, int8_sig, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, EVEN_K=True, SERIAL=False,
                                                   STAGES=3, PRECISION="tf32", SWAP=True, ASM=False))
    assert "wgmma.mma_async" in ptx
    # Many rows, not swapped: x is the 128-row A operand, the converted weights a 128-wide B.
    ptx = _compile(_int8_mm_kernel, int8_sig, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, EVEN_K=True, SERIAL=False,
                                                   STAGES=4, PRECISION="tf32", SWAP=False, ASM=False), num_warps=8)
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n128k16\.f32\.bf16\.bf16", ptx)
    ptx = _compile(_int8_mm_kernel, int8_sig, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, EVEN_K=True, SERIAL=True,
                                                   STAGES=3, PRECISION="tf32", SWAP=False, ASM=True))
    assert "prmt.b32" in ptx and "wgmma.mma_async" in ptx


def check_int4_tc_kernel():
    """The one-dot-per-step kernel: its K = 32 * CHUNKS step is one dot (CHUNKS * 2 k16 wgmmas in the
    loop), swapped for few rows (n16) and plain for many (n128)."""
    from engine.quant.triton_int4_tc import _int4_tc_kernel
    sig = {**INT4_ARGS, "M": "i32", "N": "i32", **INT4_SIZES}
    common = dict(RUN=16, GROUP=128, ONE_GROUP=True, EVEN_K=True, SERIAL=True, STAGES=3, PRECISION="tf32", XNAT=False,
                  PREFETCH=False, XPERM=False)
    ptx = _compile(_int4_tc_kernel, sig, dict(common, BLOCK_M=16, BLOCK_N=64, CHUNKS=4, SWAP=True, DEQUANT=0))
    assert "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16" in ptx
    assert "atom.global.gpu.acq_rel.add" in ptx
    ptx = _compile(_int4_tc_kernel, sig, dict(common, BLOCK_M=128, BLOCK_N=128, CHUNKS=2, SWAP=False, DEQUANT=1),
                   num_warps=8)
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in ptx
    # PREFETCH: the next step's scale and zero loaded a step ahead (loop-carried), still one dot a step
    ptx = _compile(_int4_tc_kernel, sig, dict(common, BLOCK_M=64, BLOCK_N=128, CHUNKS=4, SWAP=False, DEQUANT=0,
                                              PREFETCH=True))
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in ptx
    # dequant="asm" / "asm_scaled": ptxas accepts the inline PTX (bf16x2 and f16x2), two codes per LOP3
    # and per FMA; with x loaded in feature order (XNAT) and permuted in registers.
    for dt, fma, mma in (("bf16", "fma.rn.bf16x2", "bf16.bf16"), ("fp16", "fma.rn.f16x2", "f16.f16")):
        types = dict(sig, x_ptr=f"*{dt}", s_ptr=f"*{dt}", res_ptr=f"*{dt}")
        for swap, block_m, dequant in ((True, 16, 2), (False, 64, 3)):
            ptx = _compile(_int4_tc_kernel, types, dict(common, BLOCK_M=block_m, BLOCK_N=128, CHUNKS=4, SWAP=swap,
                                                        DEQUANT=dequant, XNAT=True))
            assert "lop3.b32" in ptx and fma in ptx and f"f32.{mma}" in ptx, (dt, swap)
    # XPERM (x permuted before the launch): the step's x tile goes from its pipelined copy to the MMA without the
    # XNAT permutation's round trip through registers and shared memory (fewer shared-memory loads).
    shared_loads = {}
    for xnat, xperm in ((True, False), (False, True)):
        ptx = _compile(_int4_tc_kernel, sig, dict(common, BLOCK_M=64, BLOCK_N=128, CHUNKS=4, SWAP=False, DEQUANT=3,
                                                  XNAT=xnat, XPERM=xperm, PREFETCH=True))
        assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in ptx
        shared_loads[xperm] = len(re.findall(r"ld\.shared", ptx))
    assert shared_loads[True] < shared_loads[False], shared_loads
    # Swapped, the dequantized weights are the wgmma's A operand in registers: the loop leaves wgmma groups in
    # flight (wait_group > 0) while it dequantizes the next step; plain, they go through shared memory and the
    # loop waits for every wgmma (wait_group 0 only). The 256-row swapped tiles of TC_ROWS256.
    waits = {}
    for swap, block_m, block_n, warps in ((True, 256, 128, 8), (True, 256, 64, 4), (False, 128, 128, 8)):
        ptx = _compile(_int4_tc_kernel, sig, dict(common, BLOCK_M=block_m, BLOCK_N=block_n, CHUNKS=2, SWAP=swap,
                                                  DEQUANT=3, XPERM=True, PREFETCH=True), num_warps=warps)
        assert f"wgmma.mma_async.sync.aligned.m64n{block_m if swap else block_n}k16" in ptx, (swap, block_m)
        waits[swap, block_n] = {int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)}
    assert max(waits[True, 128]) > 0 and max(waits[True, 64]) > 0 and waits[False, 128] == {0}, waits
    # steps of several groups (group 32 / 64: GPTQ checkpoints), the tiles of many rows: Triton 3.6 failed to build
    # them from a group gathered per word (TritonGPUOptimizeDotOperands)
    for group, dequant in ((32, 0), (64, 3)):
        ptx = _compile(_int4_tc_kernel, sig, dict(common, GROUP=group, ONE_GROUP=False, BLOCK_M=64, BLOCK_N=128,
                                                  CHUNKS=4, SWAP=False, DEQUANT=dequant, XPERM=True))
        assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in ptx


def check_int4_mma_kernels():
    """triton_int4_mma: the "pairs" kernel loads the weight half-words straight into the wgmma A operand's
    register layout (the unpack is elementwise there: no shared-memory round trip of the unpacked tile),
    unpacks two codes per LOP3 (inline PTX, bf16 and fp16) and multiplies by wgmma; the "tile" kernel
    compiles in both orientations."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.quant.triton_int4_mma import _int4_mma_kernel, _int4_mma_pairs_kernel
    sig = {**INT4_ARGS, "M": "i32", "N": "i32", **INT4_SIZES}
    renamed = {"w_ptr": "h_ptr", "stride_wn": "stride_hn", "stride_ws": "stride_hs"}
    pairs_sig = {renamed.get(k, k): ("*i16" if k == "w_ptr" else v) for k, v in sig.items()}
    for dt, mma, magic in (("bf16", "bf16.bf16", "0x43004300"), ("fp16", "f16.f16", "0x64006400")):
        types = dict(pairs_sig, x_ptr=f"*{dt}", s_ptr=f"*{dt}", res_ptr=f"*{dt}")
        consts = dict(HRUN=32, GROUP=128, BLOCK_M=16, BLOCK_N=256, CHUNKS=4, SERIAL=True, STAGES=3, MAGIC=128.0,
                      ASM=True, FOLD=True, XPERM=False, PRECISION="tf32", PREFETCH=False)
        for prefetch in (True, False):  # (the last one's PTX checked below)
            ptx = _compile(_int4_mma_pairs_kernel, types, dict(consts, PREFETCH=prefetch), num_warps=8)
            assert f"wgmma.mma_async.sync.aligned.m64n16k16.f32.{mma}" in ptx and "0x000F000F" in ptx
            assert magic in ptx
        # unfolded with x permuted first: x's tiles are pipelined copies and every wgmma stays in flight
        # (one wait for all of them, after the loop; folded, each of the 4 dots a step waits for its result)
        unfolded = _compile(_int4_mma_pairs_kernel, types, dict(consts, FOLD=False, XPERM=True, BLOCK_M=64,
                                                                BLOCK_N=128), num_warps=8)
        waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", unfolded)
        assert waits.count("0") == 1 and len(waits) > 1, waits
        assert re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx).count("0") >= 4
        assert f"fma.rn.{mma.split('.')[0]}x2" in unfolded and "cp.async.cg.shared.global" in unfolded
        # and ptxas keeps them in flight: in sm_90 SASS one full wait (after the loop), not one after each wgmma
        # (ptxas serializes them, C7515, when copies of the accumulators sit on a path around the loop)
        for prefetch in (False, True):
            sass = _compile(_int4_mma_pairs_kernel, types, dict(consts, FOLD=False, XPERM=True, BLOCK_M=16,
                                                                BLOCK_N=128, PREFETCH=prefetch), 4, what="sass")
            assert len(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0", sass)) == 1, prefetch
            assert len(re.findall(r"HGMMA\.64x16x16", sass)) >= 16
        try:
            sig_all = dict(types, **{k: "constexpr" for k in consts})
            attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig_all.items())
                     if v != "constexpr" and k not in ("split_k", "M")}
            kernel = triton.compile(ASTSource(fn=_int4_mma_pairs_kernel, signature=sig_all, constexprs=consts,
                                              attrs=attrs), target=GPUTarget("cuda", 90, 32),
                                    options=dict(num_warps=8, num_stages=3))
        except Exception as exc:  # noqa: BLE001
            print(f"SKIP: {exc!r}"[:200])
            sys.exit(0)
        ttgir = kernel.asm["ttgir"]
        assert re.search(r"ttg\.local_load [^\n]*-> tensor<256x32xi16, #ttg\.dot_op<\{opIdx = 0", ttgir), dt
        assert not re.search(r"ttg\.local_alloc %\S+ : \(tensor<256x32x(bf16|f16)", ttgir), dt
    for swap, block_m in ((True, 16), (False, 128)):
        constants = dict(RUN=16, GROUP=128, BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64, SERIAL=True, STAGES=3,
                         SWAP=swap, FOLD=swap, MAGIC=128.0, PRECISION="tf32")
        ptx = _compile(_int4_mma_kernel, sig, constants,
                       num_warps=4 if swap else 8)
        assert "wgmma.mma_async" in ptx and "atom.global.gpu.acq_rel.add" in ptx


def check_int8_mma_kernel():
    """triton_int8_mma: float16 wgmma with the codes unpacked by one PRMT per two codes (inline PTX), the
    half-words loaded straight into the A operand's register layout; bfloat16 and float16 x."""
    from engine.quant.triton_int8_mma import _int8_mma_planes_kernel
    for dt in ("bf16", "fp16"):
        sig = {"x_ptr": f"*{dt}", "h_ptr": "*i16", "s_ptr": "*fp32", "out_ptr": "*fp32", "res_ptr": f"*{dt}",
               "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32", "split_k": "i32",
               "stride_xm": "i32", "stride_hn": "i32", "stride_os": "i32", "stride_om": "i32"}
        ptx = _compile(_int8_mma_planes_kernel, sig, dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, SERIAL=True, STAGES=3,
                                                          ASM=True, PRECISION="tf32"), num_warps=8)
        assert "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16" in ptx, dt
        assert "0x64646464" in ptx and "prmt.b32" in ptx and "atom.global.gpu.acq_rel.add" in ptx, dt


def check_int8_word_gemv():
    """The word GEMV: 16-byte asynchronous copies of the weight words, codes as denormals kept unflushed."""
    from engine.quant.triton_int8_words import _int8_gemv_words_kernel
    sig = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": "*fp32", "res_ptr": "*bf16",
           "lock_ptr": "*i32", "N": "i32", "K": "i32", "split_k": "i32", "stride_xm": "i32", "stride_wn": "i32",
           "stride_os": "i32", "stride_om": "i32"}
    ptx = _pdl_variants(lambda **pdl: _compile(
        _int8_gemv_words_kernel, sig, dict(BLOCK_N=32, BLOCK_K=512, EVEN_K=True, SERIAL=True, STAGES=3, **pdl)))
    assert re.search(r"cp\.async\.cg\.shared\.global \[[^\]]*\], \[[^\]]*\], 0x10", ptx)
    # the codes are denormals: their FMAs must keep denormal operands (no flush to zero)
    assert "fma.rn.f32" in ptx and not re.search(r"\.ftz\.f32", ptx)


def check_fp8_gemm():
    from engine.quant.triton_fp8_gemm import _fp8_dot_kernel
    sig = {"x_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "out_ptr": "*fp32",
           "res_ptr": "*bf16", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32",
           "split_k": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_os": "i32", "stride_om": "i32"}
    tile = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, EVEN_K=True, SERIAL=True, STAGES=3, PRECISION="tf32",
                LIMBS=False)
    ptx = _compile(_fp8_dot_kernel, sig, dict(tile, TMA=False))
    assert "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3" in ptx
    # kernel="tma": the same MMA fed by bulk tensor copies (host tensor descriptors of the x and weight boxes; a
    # Triton without them never tunes that kernel).
    from engine.quant.triton_fp8_gemm import HAS_TMA
    if HAS_TMA:
        descs = dict(x_ptr="tensordesc<fp8e4nv[16, 128]>", w_ptr="tensordesc<fp8e4nv[64, 128]>")
        ptx = _compile(_fp8_dot_kernel, dict(sig, **descs), dict(tile, TMA=True))
        assert "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3" in ptx and "cp.async.bulk.tensor" in ptx
    from engine.quant.triton_fp8 import _fp8_per_token_kernel
    from engine.quant.triton_fp8 import _add_rms_norm_fp8_kernel, _quantize_chunk_kernel, _silu_and_mul_amax_kernel
    _compile(_silu_and_mul_amax_kernel, {"h_ptr": "*bf16", "a_ptr": "*bf16", "amax_ptr": "*fp32", "inter": "i32",
                                         "num_chunks": "i32", "stride_hm": "i32", "stride_am": "i32"}, dict(BLOCK=1024))
    for single in (True, False):
        ptx = {hw: _compile(_fp8_per_token_kernel, {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                                                    "K": "i32", "stride_xm": "i32", "stride_qm": "i32"},
                            dict(BLOCK_K=16384, FP8_MAX=448.0, SINGLE=single, HW_CAST=hw), num_warps=16)
               for hw in (False, True)}
        assert "div.rn.f32" in ptx[True]  # the codes' division correctly rounded, as torch's
        # HW_CAST (what a GPU runs): the conversion instruction rounds (to nearest even, saturating), and the
        # interpreter's rounding to the e4m3 grid (its bit shifts) is not compiled in.
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx[True]
        assert ptx[True].count("shr.u32") < ptx[False].count("shr.u32")
        for hw in (False, True):
            if single:
                _compile(_quantize_chunk_kernel, {"a_ptr": "*bf16", "amax_ptr": "*fp32", "q_ptr": "*fp8e4nv",
                                                  "s_ptr": "*fp32", "n": "i32", "num_chunks": "i32",
                                                  "stride_am": "i32", "stride_qm": "i32"},
                         dict(BLOCK=1024, CHUNKS=16, FP8_MAX=448.0, HW_CAST=hw))
            for residual in (True, False):
                _compile(_add_rms_norm_fp8_kernel, {"x_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*bf16",
                                                    "ro_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                                                    "N": "i32", "eps": "fp32", "stride_xm": "i32", "stride_rm": "i32",
                                                    "stride_om": "i32", "stride_qm": "i32"},
                         dict(HAS_RESIDUAL=residual, BLOCK=4096, FP8_MAX=448.0, SINGLE=single, HW_CAST=hw),
                         num_warps=8)


def check_int8_limbs():
    """triton_int8_limbs: the W8A8 kernel with LIMBS multiplies int8 codes on s8 wgmma (int32 sums), pointer
    and tensor-descriptor loads; the limbs' quantization divides correctly rounded, as int8_limbs_reference."""
    from engine.quant.triton_fp8_gemm import HAS_TMA, _fp8_dot_kernel
    sig = {"x_ptr": "*i8", "xs_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*fp32", "out_ptr": "*fp32",
           "res_ptr": "*bf16", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32",
           "split_k": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_os": "i32", "stride_om": "i32"}
    tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, EVEN_K=True, SERIAL=True, STAGES=3, PRECISION="tf32",
                LIMBS=True)
    ptx = _compile(_fp8_dot_kernel, sig, dict(tile, TMA=False), num_warps=8)
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n128k32\.s32\.s8\.s8", ptx)
    if HAS_TMA:
        descs = dict(x_ptr="tensordesc<i8[128, 128]>", w_ptr="tensordesc<i8[128, 128]>")
        ptx = _compile(_fp8_dot_kernel, dict(sig, **descs), dict(tile, TMA=True), num_warps=8)
        assert "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8" in ptx and "cp.async.bulk.tensor" in ptx
    from engine.quant.triton_int8_limbs import _limbs_kernel
    for single in (True, False):
        ptx = _compile(_limbs_kernel, {"x_ptr": "*bf16", "l_ptr": "*i8", "s_ptr": "*fp32", "K": "i32",
                                       "stride_xm": "i32"}, dict(BLOCK=4096, SINGLE=single), num_warps=16)
        assert "div.rn.f32" in ptx


def check_decode_attention_fp8_cache():
    from engine.kernels.triton_decode import _decode_split_kernel
    sig = {"q_ptr": "*bf16", "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv", "block_tables_ptr": "*i32",
           "seq_lens_ptr": "*i32", "acc_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "qk_scale": "fp32",
           "num_splits": "i32", "window": "i32", "softcap": "fp32", **{f"stride_{s}": "i32" for s in (
               "qt", "qh", "ot", "oh", "cb", "cs", "ch", "bt", "acc_b", "acc_h", "acc_s", "lse_b", "lse_h")},
           "order_ptr": "*i32"}
    for ordered in (False, True):  # the decode rows in batch order, or in the runner's (longest context first)
        ptx = _compile(_decode_split_kernel, sig, dict(
            GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=128, SINGLE_SPLIT=True,
            HAS_WINDOW=False, HAS_SOFTCAP=False, PRECISE_PV=True, FP8_KV=True, RELEASE=True, HEADS_FIRST=True,
            ORDERED=ordered))
        # it lets a PDL GEMV after it launch at its start (engine.kernels.pdl), and waits for nothing itself
        assert "griddepcontrol.launch_dependents" in ptx and "griddepcontrol.wait" not in ptx
        # e4m3 pairs to float16 in one conversion each, and the MMAs in float16 (_q_as_float16).
        assert "cvt.rn.f16x2.e4m3x2" in ptx and "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx
        assert ".bf16.bf16" not in ptx


def check_decode_gemv():
    from engine.kernels.triton_gemv import PROLOGUES, _gemv_kernel
    for name, code in PROLOGUES.items():
        ptx = _pdl_variants(lambda **pdl: _compile(
            _gemv_kernel, {"x_ptr": "*bf16", "res_ptr": "*bf16", "nw_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16",
                           "out_ptr": "*bf16", "res_out_ptr": "*bf16", "N": "i32", "K": "i32", "eps": "fp32",
                           "stride_xm": "i32", "stride_wn": "i32"},
            dict(PROLOGUE=code, HAS_RESIDUAL=True, HAS_BIAS=False, BLOCK_N=8, BLOCK_K=512,
                 ROW_BLOCK=4096 if name == "norm" else 1, EVEN_K=True, **pdl)), loads_before_wait=True)
        # The weight tiles stream as 16-byte vector loads (its prefetch included): what its bandwidth rests on.
        assert len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx)) >= 2, name


def check_int4_dequant():
    from engine.quant.dequant_mm import _int4_dequant_kernel
    ptx = _compile(_int4_dequant_kernel, {"p_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "w_ptr": "*bf16",
                                          "N": "i32", "K": "i32", "stride_p": "i32", "stride_ps": "i32",
                                          "stride_s": "i32", "stride_w": "i32"}, dict(RUN=16, GROUP=128, BLOCK_N=32,
                                                                                      CHUNKS=4))
    # A pass over memory: words read as vectors, the float weights written as 16-byte vectors, and one scale and
    # zero load per row and chunk (4 x 2 here), not one per weight.
    assert re.search(r"ld\.global(?:\.\w+)*\.v[24]\.b32", ptx) and re.search(r"st\.global(?:\.\w+)*\.v4\.b32", ptx)
    assert len(re.findall(r"ld\.global(?:\.\w+)*\.b(?:8|16) ", ptx)) <= 8
    from engine.quant.dequant_mm import _int8_dequant_kernel
    ptx = _compile(_int8_dequant_kernel, {"q_ptr": "*i8", "s_ptr": "*fp32", "w_ptr": "*bf16", "N": "i32", "K": "i32",
                                          "stride_q": "i32", "stride_w": "i32"}, dict(BLOCK_N=8, BLOCK_K=1024))
    assert re.search(r"ld\.global(?:\.\w+)*\.v[24]\.b32", ptx) and re.search(r"st\.global(?:\.\w+)*\.v4\.b32", ptx)


def test_dequant_kernels_read_and_write_vectors():
    _run("check_int4_dequant")


def test_int4_gemv_streams_16_byte_words_and_reduces_split_k_in_the_kernel():
    _run("check_int4_gemv")


def test_int4_dp4a_gemv_streams_16_byte_words_into_integer_dot_products():
    _run("check_int4_dp4a")


def test_int4_and_int8_dot_kernels_use_wgmma():
    _run("check_dot_kernels")


def test_int4_tc_kernel_uses_wgmma_in_both_orientations():
    _run("check_int4_tc_kernel")


def test_int4_mma_kernels_unpack_in_the_mma_operand_registers():
    _run("check_int4_mma_kernels")


def test_int8_mma_kernel_uses_float16_wgmma_and_its_byte_permute():
    _run("check_int8_mma_kernel")


def test_int8_word_gemv_assembles_its_byte_permute():
    _run("check_int8_word_gemv")


def test_fp8_gemm_uses_e4m3_wgmma():
    _run("check_fp8_gemm")


def test_int8_limbs_gemm_uses_s8_wgmma():
    _run("check_int8_limbs")


def test_decode_attention_converts_an_fp8_cache_to_float16():
    _run("check_decode_attention_fp8_cache")


def test_decode_gemv_streams_16_byte_weight_loads_with_every_prologue():
    _run("check_decode_gemv")


if __name__ == "__main__":
    globals()[sys.argv[1]]()
