"""Triton kernel: the int8 decode GEMV reading the weight as 32-bit words, four codes converted per word.

Reference: `int8_linear_reference` in int8.py. Layouts as triton_int8.py (q [N, K] int8, K contiguous,
scale [N] float32, x [M, K], out [M, N] in x's dtype), with K % 4 == 0 and the rows 4-byte aligned, so
that a row is K // 4 int32 words whose byte i is feature 4w + i.

Why: triton_int8's GEMV converts each int8 code on its own (a byte extract with sign, an integer add
of the float 2^23's bits, a float subtract: ~5 instructions per code with the FMA, counted in sm_90
SASS), which leaves it bound by instruction issue, not by memory, at one or two rows. Here a word is
XOR-ed with 0x80808080 once (q + 128, unsigned) and each byte masked in place is a float32 denormal
(one AND a code, folded with the XOR into one LOP3; no subtract), as triton_int4's GEMV does with its
nibbles; the 128 comes off once per row as 128 * sum x. x is read once per step in feature order and
split in registers into its four byte planes (tl.split: x[4w + i] for plane i). 3.0-3.4 sm_90 SASS
instructions a code (benchmarks/sass_loop_counts.py) against 3.7-3.9 for the byte permute (PRMT) under
2^23's exponent bits it replaced, which measured 0.99-1.02x as fast per layer on the H200
(data/benchmarks/int8_gemv_ab_h200.json, at commit 59b612d): the GEMV is not issue-bound any more.
grid (M, cdiv(N, BLOCK_N), SPLIT_K), rows of x fastest; split-K partials as the other GEMVs
(a float32 [SPLIT_K, M, N] scratch summed by torch.sum, or serial: by the tile's last slice).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.pdl import release, wait_for_inputs
from .triton_int8 import _gemv_store

# A byte under no exponent bits is a float32 denormal, (q + 128) * 2^(8j) * 2^-149 exactly for bytes
# j = 0, 1 of a word (bytes 2, 3 the same from the word >> 16); x scaled by 2^(E - 8j) (exact) makes each
# product (q + 128) * x * 2^(E - 149), a normal float for |x| >= 2^-59; x overflows only from |x| >= 2^38.
# As triton_int4's GEMV (its DENORMAL_E).
DENORMAL_E = tl.constexpr(90)


@triton.jit
def _int8_gemv_words_kernel(x_ptr, w_ptr, s_ptr, out_ptr, res_ptr, lock_ptr, N, K, split_k, stride_xm, stride_wn,
                            stride_os, stride_om, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            EVEN_K: tl.constexpr, SERIAL: tl.constexpr, STAGES: tl.constexpr,
                            PDL: tl.constexpr = False):
    WORDS: tl.constexpr = BLOCK_K // 4
    E: tl.constexpr = DENORMAL_E
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_per_split = tl.cdiv(tl.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    wait_for_inputs(PDL)  # programmatic dependent launch (engine.kernels.pdl)
    w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n.to(tl.int64)[:, None] * (stride_wn // 4)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    offs_w = tl.arange(0, WORDS)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    x_sum = tl.zeros([WORDS], dtype=tl.float32)  # the x met, for the codes' offset of 128
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        kw = tl.multiple_of(k0 // 4, WORDS)  # steps start on whole tiles
        if EVEN_K:  # masks constant along K: the loads stay 16-byte vectors
            mask_w = tl.full([WORDS], 1, tl.int1)
            mask_k = tl.full([BLOCK_K], 1, tl.int1)
        else:  # K % 4 == 0: a word is wholly inside or outside the slice
            mask_w = 4 * (kw + offs_w) < k_end
            mask_k = k0 + offs_k < k_end
        w = tl.load(w_rows + (kw + offs_w)[None, :], mask=mask_n[:, None] & mask_w[None, :], other=0)
        x = tl.load(x_row + k0 + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(x, (WORDS, 2, 2)))  # x[4w + 2a], x[4w + 2a + 1]
        x0, x2 = tl.split(x_even)
        x1, x3 = tl.split(x_odd)
        t = w ^ -2139062144  # 0x80808080: q + 128 in each byte
        t16 = t >> 16
        acc += (t & 0xFF).to(tl.float32, bitcast=True) * (x0 * (2.0 ** E))[None, :]
        acc += (t & 0xFF00).to(tl.float32, bitcast=True) * (x1 * (2.0 ** (E - 8)))[None, :]
        acc += (t16 & 0xFF).to(tl.float32, bitcast=True) * (x2 * (2.0 ** E))[None, :]
        acc += (t16 & 0xFF00).to(tl.float32, bitcast=True) * (x3 * (2.0 ** (E - 8)))[None, :]
        x_sum += (x0 + x1) + (x2 + x3)
    release(PDL)
    # sum (q + 128) x, in units of 2^(149 - E), less 128 sum x
    dot = tl.sum(acc, 1) * (2.0 ** (149 - E)) - 128.0 * tl.sum(x_sum, 0)
    out = dot * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
    _gemv_store(out, out_ptr, res_ptr, lock_ptr, m, pid_n, pid_k, offs_n, mask_n, split_k, stride_os, stride_om, SERIAL)
