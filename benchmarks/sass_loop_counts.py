"""Instructions per weight code in the K loop of the quantized GEMV/GEMM kernels, from sm_90 SASS, no GPU.

Each kernel is compiled for Hopper with Triton's bundled ptxas (as tests/engine/test_quant_sm90_compile.py
does), disassembled with nvdisasm, and the largest loop body (a backward branch to a label) is counted
by opcode; dividing by the weight codes one thread handles per loop trip gives the instruction cost of
a code. A decode GEMV moving int4 weights at the H200's ~4.8 TB/s needs ~9.6e12 codes/s, so at ~33e12
thread instructions/s (132 SMs x 4 x 32 lanes x 1.98 GHz) it must stay near 3 instructions per code at
full issue; this is how the kernel variants were compared before any GPU run.

    PYTHONPATH=. python benchmarks/sass_loop_counts.py [NAME]     # one line per kernel config (NAME in its name)
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

INT4_ARGS = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "out_ptr": "*fp32",
             "res_ptr": "*bf16", "lock_ptr": "*i32"}
INT4_SIZES = {"K": "i32", "k_per_split": "i32", "split_k": "i32", "stride_xm": "i32", "stride_wn": "i32",
              "stride_ws": "i32", "stride_sn": "i32", "stride_os": "i32", "stride_om": "i32"}
INT8_ARGS = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": "*fp32", "res_ptr": "*bf16",
             "lock_ptr": "*i32"}
INT8_SIZES = {"N": "i32", "K": "i32", "split_k": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_os": "i32",
              "stride_om": "i32"}

DP4A_SIG = {"q_ptr": "*i32", "xs_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "out_ptr": "*fp32",
            "res_ptr": "*bf16", "lock_ptr": "*i32", "N": "i32", "K": "i32", "k_per_split": "i32", "split_k": "i32",
            "stride_qm": "i32", "stride_qp": "i32", "stride_xsm": "i32", "stride_wn": "i32", "stride_ws": "i32",
            "stride_sn": "i32", "stride_os": "i32", "stride_om": "i32"}
PAIRS_SIG = {"x_ptr": "*bf16", "h_ptr": "*i16", "s_ptr": "*bf16", "z_ptr": "*u8", "out_ptr": "*fp32",
             "res_ptr": "*bf16", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32",
             "split_k": "i32",
             "stride_xm": "i32", "stride_hn": "i32", "stride_hs": "i32", "stride_sn": "i32", "stride_os": "i32",
             "stride_om": "i32"}


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int):
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items())
             if v != "constexpr" and k != "split_k"}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 64), options=dict(num_warps=num_warps, num_stages=3))


def loop_opcodes(kernel) -> collections.Counter:
    """Opcode counts of the largest loop body in the kernel's SASS."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "k.cubin")
        path.write_bytes(kernel.asm["cubin"])
        nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
        text = subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    labels, instrs = {}, []
    for line in text.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instrs)
        elif re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):
            instrs.append(line)
    loops = [(i - labels[m.group(1)], labels[m.group(1)], i) for i, line in enumerate(instrs)
             if (m := re.search(r"BRA\s.*(\.L_x_\d+)", line)) and m.group(1) in labels and labels[m.group(1)] <= i]
    if not loops:
        return collections.Counter()
    _, start, end = max(loops)
    return collections.Counter(re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", line).split()[0].split(".")[0]
                               for line in instrs[start:end + 1])


def main() -> None:
    from engine.quant.triton_int4 import _int4_gemv_kernel
    from engine.quant.triton_int4_dp4a import _int4_dp4a_kernel
    from engine.quant.triton_int4_mma import _int4_mma_pairs_kernel
    from engine.quant.triton_int4_tc import _int4_tc_kernel
    from engine.quant.triton_int8 import _int8_gemv_kernel, _int8_mm_kernel
    from engine.quant.triton_int8_words import _int8_gemv_words_kernel
    g4 = dict(RUN=16, GROUP=128, ONE_GROUP=True, EVEN_K=True, SERIAL=True, STAGES=3)
    rows = [  # (name, kernel, signature, constexprs, warps, weight codes a thread handles per loop trip)
        ("int4 GEMV 128x4", _int4_gemv_kernel, {**INT4_ARGS, "N": "i32", **INT4_SIZES},
         dict(g4, BLOCK_N=128, CHUNKS=4, PDL=False, PREFETCH=False), 4, 128 * 128 / 128),
        ("int4 GEMV 256x4 (8 rows a thread)", _int4_gemv_kernel, {**INT4_ARGS, "N": "i32", **INT4_SIZES},
         dict(g4, BLOCK_N=256, CHUNKS=4, PDL=False, PREFETCH=False), 4, 256 * 128 / 128),
        *[(f"int4 dp4a GEMV {bn}x4 {w} warps", _int4_dp4a_kernel, DP4A_SIG,
           dict(RUN=16, GROUP=128, SERIAL=True, STAGES=3, BLOCK_N=bn, CHUNKS=4, ASM=True, PDL=False), w,
           bn * 128 / (32 * w)) for bn, w in ((128, 4), (256, 4), (256, 8))],
        ("int4 tc swap 16x256x4 asm x_natural", _int4_tc_kernel, {**INT4_ARGS, "M": "i32", "N": "i32", **INT4_SIZES},
         dict(g4, BLOCK_M=16, BLOCK_N=256, CHUNKS=4, SWAP=True, DEQUANT=2, XNAT=True, PRECISION="tf32",
              PREFETCH=False, XPERM=False), 4,
         256 * 128 / 128),
        ("int4 tc swap 16x256x4 exact", _int4_tc_kernel, {**INT4_ARGS, "M": "i32", "N": "i32", **INT4_SIZES},
         dict(g4, BLOCK_M=16, BLOCK_N=256, CHUNKS=4, SWAP=True, DEQUANT=1, XNAT=True, PRECISION="tf32",
              PREFETCH=False, XPERM=False), 4,
         256 * 128 / 128),
        ("int4 tc gemm 128x128x4 asm_scaled", _int4_tc_kernel, {**INT4_ARGS, "M": "i32", "N": "i32", **INT4_SIZES},
         dict(g4, BLOCK_M=128, BLOCK_N=128, CHUNKS=4, SWAP=False, DEQUANT=3, XNAT=True, PRECISION="tf32",
              PREFETCH=False, XPERM=False), 8,
         128 * 128 / 256),
        *[(f"int4 tc gemm 64x128x4 asm_scaled prefetch {'x_perm' if perm else 'x_natural'}", _int4_tc_kernel,
           {**INT4_ARGS, "M": "i32", "N": "i32", **INT4_SIZES},
           dict(g4, BLOCK_M=64, BLOCK_N=128, CHUNKS=4, SWAP=False, DEQUANT=3, XNAT=not perm, PRECISION="tf32",
                PREFETCH=True, XPERM=perm), 4, 128 * 128 / 128) for perm in (False, True)],
        *[(f"int4 mma pairs 16x{bn} {w} warps {'fold' if fold else 'unfolded'}{' x_perm' if perm else ''}"
           f"{' prefetch' if pf else ''}", _int4_mma_pairs_kernel, PAIRS_SIG,
           dict(HRUN=32, GROUP=128, BLOCK_M=16, BLOCK_N=bn, CHUNKS=4, SERIAL=True, STAGES=3, MAGIC=128.0, ASM=True,
                FOLD=fold, XPERM=perm, PRECISION="tf32", PREFETCH=pf), w, bn * 128 / (32 * w))
          for bn, w in ((128, 4), (256, 8)) for fold, perm in ((True, False), (True, True), (False, True))
          for pf in (False, True)],
        ("int8 GEMV 64x256", _int8_gemv_kernel, {**INT8_ARGS, **INT8_SIZES},
         dict(BLOCK_N=64, BLOCK_K=256, EVEN_K=True, SERIAL=True, STAGES=3), 4, 64 * 256 / 128),
        *[(f"int8 word GEMV {bn}x{bk}x{w}", _int8_gemv_words_kernel, {**INT8_ARGS, **INT8_SIZES},
           dict(BLOCK_N=bn, BLOCK_K=bk, EVEN_K=True, SERIAL=True, STAGES=3, PDL=False), w, bn * bk / (32 * w))
          for bn, bk, w in ((32, 512, 4), (64, 512, 4), (128, 256, 8))],
        ("int8 gemm 64x128x128 asm", _int8_mm_kernel, {**INT8_ARGS, "M": "i32", **INT8_SIZES},
         dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, EVEN_K=True, SERIAL=True, STAGES=3, PRECISION="tf32",
              SWAP=False, ASM=True), 4, 128 * 128 / 128),
    ]
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    for name, fn, sig, cons, warps, codes in rows:
        if only not in name:
            continue
        ops = loop_opcodes(compile_sm90(fn, sig, cons, warps))
        total = sum(ops.values())
        top = ", ".join(f"{op} {c}" for op, c in ops.most_common(8))
        print(f"{name:<40} {total / codes:5.2f} instr/code ({total} per trip, {codes:.0f} codes/thread): {top}")


if __name__ == "__main__":
    main()
