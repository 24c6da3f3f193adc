"""Triton kernels: paged decode attention, split over the sequence (flash-decoding).

Reference: `paged_attention_reference` in reference.py, for requests with one new token each.

Layouts:
    q:                [T, num_heads, head_dim]; row i is the one new token of decode request i
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous
    block_tables:     [B, max_blocks_per_seq] int32; seq_lens: [B] int32 (context incl. the new token)
    out:              [T, num_heads, head_dim]; rows 0..B-1 are written
Query head j reads KV head j // group (group = num_heads // num_kv_heads), as in the reference.

Two launches:
1. `_decode_split_kernel`, grid (num_kv_heads, B, num_splits) (heads_first=False: (B, num_kv_heads, num_splits)).
   A program owns one KV head of one request and one of num_splits equal slices of its context. With `order` the
   programs take the requests in that order: longest context first (the runner's), so that short requests fill in
   behind the long ones instead of a few long ones running alone at the end.
   It loads each K/V tile once and scores
   all `group` query heads of that KV head against it with one tl.dot (the group is padded to 16
   rows, the smallest dot tile), keeping an online softmax. It writes the slice's normalised
   output and its log-sum-exp (base 2) to float32 scratch.
2. `_decode_reduce_kernel`, grid (B, num_heads), rescales the slices by their log-sum-exp and sums
   them. With one split the first kernel normalises and writes `out` itself, and the reduce is skipped.
The split count is a run-time argument, so batches of different sizes share one compiled kernel.
A tile covers BLOCK_N tokens whatever the block size: each token's physical block comes from the
block table, so block sizes from 1 to 256 take the same code. Splitting the sequence is what lets
a few long requests fill every SM; the split count depends only on shapes (never on device
values), so the launch can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .pdl import pdl_enabled, release

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # what a @triton.jit function may read (the compiler refuses plain float globals)


@triton.jit
def soft_cap(s, softcap):
    """cap * tanh(x / cap) of base-2 scores s = x * log2(e) (tanh from exp, which the interpreter has)."""
    x = s / (_LOG2E * softcap)
    t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    return t * (softcap * _LOG2E)


@triton.jit
def pv_dot(p, v, PRECISE_PV: tl.constexpr):
    """P @ V of a tile in float32 (p: float32 probabilities, v: the tile in the model dtype).

    The tensor-core dot takes both operands in V's dtype and accumulates in float32, so P enters rounded to
    bf16 (8 mantissa bits). PRECISE_PV adds a second dot of P's rounding residue (P - bf16(P)), which gives P
    about 16 bits; V is exact in its own dtype, so the product is then as accurate as with float32 P and the
    kernel's error is the output's own rounding, as in the float32 torch path. It costs one more dot per tile:
    nothing in memory-bound decode, a third more attention FLOPs in prefill.
    """
    p_lo = p.to(v.dtype)
    out = tl.dot(p_lo, v)
    if PRECISE_PV:
        out = out + tl.dot((p - p_lo.to(tl.float32)).to(v.dtype), v)
    return out


def precise_pv_default(dtype: torch.dtype) -> bool:
    """Whether the kernels add P's rounding residue (see pv_dot): for 16-bit models; float32 P is exact already."""
    return dtype in (torch.float16, torch.bfloat16)


@triton.jit
def _q_as_float16(q, qk_scale):
    """An fp8 cache's tiles convert to float16 in one instruction per pair (to bfloat16 it takes four, and the
    conversions bounded the kernel: 0.38 of the copy bandwidth on the H200). q joins them in float16, scaled by the
    power of two 2^-e that puts its largest magnitude in [2^14, 2^15), in float16's range with 10 mantissa bits
    (bfloat16 keeps 7); 2^e moves into qk_scale, so the scores are unchanged. Returns (q, qk_scale)."""
    qf = q.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(qf), 1), 0)
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - 14  # floor(log2(amax)) - 14
    e = tl.minimum(tl.maximum(e, -100), 120)  # an all-zero q (padding) gives -141: any power will do
    q = (qf * ((127 - e) << 23).to(tl.float32, bitcast=True)).to(tl.float16)
    return q, qk_scale * ((127 + e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
                         acc_ptr, lse_ptr, out_ptr, qk_scale, num_splits, window, softcap,
                         stride_qt, stride_qh, stride_ot, stride_oh,
                         stride_cb, stride_cs, stride_ch, stride_bt,
                         stride_acc_b, stride_acc_h, stride_acc_s, stride_lse_b, stride_lse_h,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                         SINGLE_SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         PRECISE_PV: tl.constexpr, FP8_KV: tl.constexpr, RELEASE: tl.constexpr,
                         HEADS_FIRST: tl.constexpr = False, order_ptr=None, ORDERED: tl.constexpr = False):
    release(RELEASE)  # a decode GEMV after it (o_proj) may launch now (engine.kernels.pdl)
    if HEADS_FIRST:  # grid (num_kv_heads, B, num_splits): a request's KV heads run side by side
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
    if ORDERED:  # the programs take the requests in the order given (longest context first)
        seq = tl.load(order_ptr + seq)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    # A sliding window: the new token (position seq_len - 1) sees keys seq_len - window .. seq_len - 1 only.
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    # Equal slices rounded to whole tiles, so only the last tile of a slice is ragged.
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if FP8_KV:
        q, qk_scale = _q_as_float16(q, qk_scale)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head * stride_ch + offs_d[None, :]
    # Every tile starts below `end`, so each holds at least one real token and m_i turns finite
    # on the first tile (no -inf - -inf).
    for tile_start in range(start, end, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        block_ids = tl.load(block_table + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        kv_off = block_ids[:, None] * stride_cb + (offs_n % BLOCK_SIZE)[:, None] * stride_cs + head_off
        if HEAD_DIM == BLOCK_D:
            kv_mask = mask_n[:, None]  # rows only: keeps the loads vectorised along head_dim
        else:
            kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)

        s = tl.dot(q, tl.trans(k)) * qk_scale
        if HAS_SOFTCAP:
            s = soft_cap(s, softcap)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + pv_dot(p, v, PRECISE_PV)
        m_i = m_new

    out_mask = mask_g[:, None] & mask_d[None, :]
    if SINGLE_SPLIT:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Each slice stores its own softmax-normalised output and log2-sum-exp; the reduce weighs
        # slice s by 2^(lse_s - max lse). An empty slice (start >= seq_len) has l_i = 0: it stores
        # lse = -inf and zeros, and gets weight 0.
        empty = l_i == 0.0
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(lse_ptr + seq * stride_lse_b + heads * stride_lse_h + split, lse, mask=mask_g)
        tl.store(acc_ptr + seq * stride_acc_b + heads[:, None] * stride_acc_h + split * stride_acc_s
                 + offs_d[None, :], acc, mask=out_mask)


@triton.jit
def _reduced_head(acc_ptr, lse_ptr, seq, head, num_splits, stride_acc_b, stride_acc_h, stride_acc_s, stride_lse_b,
                  stride_lse_h, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """Head `head` of request `seq`, float32 [BLOCK_D] (0 from HEAD_DIM on): its slices' outputs rescaled by their
    log-sum-exp and summed."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(lse_ptr + seq * stride_lse_b + head * stride_lse_h + offs_s, mask=mask_s, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # Guard a request with no context at all (a padding slot): every slice empty gives zeros, not NaN.
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)
    acc = tl.load(acc_ptr + seq * stride_acc_b + head * stride_acc_h + offs_s[:, None] * stride_acc_s
                  + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    denom = tl.sum(weights, 0)
    denom = tl.where(denom == 0.0, 1.0, denom)
    return tl.sum(acc * weights[:, None], 0) / denom


@triton.jit
def _decode_reduce_kernel(acc_ptr, lse_ptr, out_ptr, num_splits,
                          stride_acc_b, stride_acc_h, stride_acc_s, stride_lse_b, stride_lse_h,
                          stride_ot, stride_oh,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr,
                          RELEASE: tl.constexpr):
    release(RELEASE)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    out = _reduced_head(acc_ptr, lse_ptr, seq, head, num_splits, stride_acc_b, stride_acc_h, stride_acc_s,
                        stride_lse_b, stride_lse_h, HEAD_DIM, BLOCK_D, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      min_tokens_per_split: int = 256, max_splits: int = 16) -> int:
    """How many slices to cut each request's context into: enough programs for two per SM, but no
    slice shorter than `min_tokens_per_split` tokens. Shapes only, no device values.

    On the H100 (benchmarks/bench_attention.py, batch 64 x 8 KV heads = 512 programs, context 4096)
    1 split ran 371 us, 2 splits 381 us, 16 splits 399 us: past two programs per SM more slices
    only add reduce traffic."""
    programs = max(num_seqs * num_kv_heads, 1)
    want = triton.cdiv(2 * num_sms, programs)
    most = max(triton.cdiv(max_seq_len, min_tokens_per_split), 1)
    return max(1, min(want, most, max_splits))


def decode_tile(num_seqs: int, block_d: int, on_cuda: bool) -> tuple[int, int, int]:
    """(block_n, num_warps, num_stages) of the split kernel by default, the same for bf16 and fp8 caches. Measured on
    the H200 (bench_attention.py):
    - From 256 requests, head_dim <= 128: 64-token tiles, 2 warps, 2 stages (more programs per SM, which short
      contexts lack): 2 warps beat 4 by 1.0-1.3% at 1000 requests of median context 406, 1.5-1.9% at 192 and 3.5-11%
      at 256 requests of 71 (decode_trace_like, two runs). 128-token tiles with 4 warps there cost the 1000-request
      trace 1.6% (17,574 against 17,862 out tok/s, 3 interleaved runs each; trace_decode_tile_ab_tiles128_h200.json).
    - 32 to 255 requests, head_dim <= 128: 128-token tiles, 4 warps, 2 stages. fp8 cache (decode_batches,
      attention_batches_h200_run2.json): 12.2 against 14.3 us at context 80 and 225 against 308 us at 4096 (64
      requests); 22.2 against 26.1 and 444 against 599 us at 128; 6.0 against 7.0 and 123 against 183 us at 32; the
      1000-request trace with an fp8 cache 17,355 against 17,013 out tok/s with 64-token tiles, 3 interleaved runs
      each (trace_decode_tile_ab_fp8_h200.json). bf16 cache: 258 against 334 us at 64 x 4096 (0.98 of copy
      bandwidth); the 1000-request trace 17,912 (17,903-17,912) against 17,862 (17,826-17,868) out tok/s with
      64-token tiles, its steps with 32-255 requests 5.89 against 5.97 s (trace_decode_tile_ab_tiles128_h200.json).
      32-token tiles and 3 stages, faster at equal contexts of 64 requests (10.4 against 14.4 us at 80), cost the
      trace 2% (17,108 against 17,458, trace_decode_tile_ab_h200.json).
    - Otherwise 64-token tiles (32 above head_dim 128), 4 warps, 2 stages.
    - Several requests a program, in one loop whose pipelined copies run on from one request into the next (a
      packed kernel, commit 08ed79b, reverted): 316.5 against 318.9 us at 1000 requests of median context 192, 0.744
      against 0.739 of the copy bandwidth, and never better at 256-1000 requests (attention_packed_h200.json). Each
      program's start is not what holds short contexts below long ones' 0.87.
    The interpreter (not CUDA) runs one stage."""
    if block_d <= 128 and num_seqs >= 256:
        block_n, warps, stages = 64, 2, 2
    elif block_d <= 128 and num_seqs >= 32:
        block_n, warps, stages = 128, 4, 2
    else:
        block_n, warps, stages = (64 if block_d <= 128 else 32), 4, 2
    return block_n, warps, (stages if on_cuda and block_d <= 128 else 1)


def check_paged_layout(op: str, q, out, k_cache, v_cache) -> int:
    """Check the layouts both attention kernels assume; returns the GQA group (query heads per KV head)."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if q.stride(2) != 1 or out.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError(f"{op} needs q, out and the caches with a contiguous head_dim")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"{op} needs k_cache and v_cache with the same strides")
    return num_heads // num_kv_heads


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, out: torch.Tensor, scale: float, max_seq_len: int,
                     num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, sliding_window: int | None = None,
                     softcap: float | None = None, precise_pv: bool | None = None, heads_first: bool = True,
                     order: torch.Tensor | None = None, reduce=None) -> int:
    """Decode attention of q[:B] (one token per request) over the paged cache, written into out[:B].

    B = seq_lens.shape[0]. max_seq_len (tokens) only picks the split count; any seq_len is computed
    correctly. num_splits / block_n / num_warps / num_stages override the defaults (benchmarks, tests).
    sliding_window W: only the last W positions are read; softcap c: scores become c * tanh(score / c).
    precise_pv: see pv_dot (None: precise_pv_default(q.dtype)). heads_first (the default): the split kernel's
    programs ordered KV head fastest, so that a request's heads run together and read its tokens' whole K/V
    rows (num_kv_heads x head_dim contiguous) side by side; False runs each head across all requests first and
    reads head_dim of every row at a time. On the H200 heads_first took 1000 requests of median context 192
    from 319.6 to 288.8 us (0.737 -> 0.816 of copy bandwidth), 1000 x 406 from 562.0 to 542.8 us, 300 x 557
    from 266.8 to 261.1 us, and left 256 x 71 even (39.6 against 39.4-40.2 us; attention_heads_first_h200.json).
    order: int32 [B], a permutation of 0..B-1: the requests in the order their programs start (None: 0..B-1). Longest
    context first took ragged log-normal contexts on the H200 from 0.83-0.94 to 0.92-0.99 of copy bandwidth, 1.05-1.14x
    (1000 requests of median 190 and 400, 300 of 560; even at 256 x 72, decode_order_ab_h200.json): with the batch's
    order a few long requests' programs ran alone at the kernel's end. On the 1000-request trace: 17,881 against
    17,625 out tok/s in the batch's order, +1.5%, 3 interleaved runs each (trace_decode_order_ab_h200.json).
    reduce: what launches the reduce in place of `_decode_reduce_kernel`, called as reduce(acc, lse, out, num_splits)
    with the slices' float32 outputs [B, num_heads, num_splits, head_dim] and log-sum-exps [B, num_heads,
    num_splits] (triton_int4_dp4a.decode_reduce_limbs: the output also as an int4 layer's input limbs).
    Returns the split count: the reduce runs when it is above 1 (with 1 the split kernel writes out itself).
    """
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0:
        return 0
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = check_paged_layout("decode_attention", q, out, k_cache, v_cache)
    if num_splits is None:
        sms = _num_sms(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
            if q.device.type == "cuda" else 8
        num_splits = decode_num_splits(num_seqs, num_kv_heads, min(max_seq_len, sliding_window or max_seq_len), sms)
    block_d = max(16, triton.next_power_of_2(head_dim))
    tile = decode_tile(num_seqs, block_d, q.device.type == "cuda")
    block_n, num_warps, num_stages = (given if given is not None else default
                                      for given, default in zip((block_n, num_warps, num_stages), tile))

    if num_splits == 1:
        acc = lse = out  # unused by the kernel with a single split
        acc_strides = (0, 0, 0)
        lse_strides = (0, 0)
    else:
        acc = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
        acc_strides = acc.stride()[:3]
        lse_strides = lse.stride()[:2]
    grid = (num_kv_heads, num_seqs, num_splits) if heads_first else (num_seqs, num_kv_heads, num_splits)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, acc, lse, out, scale * LOG2E, num_splits,
        sliding_window or 0, float(softcap or 1.0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        *acc_strides, *lse_strides,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SINGLE_SPLIT=num_splits == 1,
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None,
        PRECISE_PV=precise_pv_default(q.dtype) if precise_pv is None else precise_pv,
        FP8_KV=k_cache.element_size() == 1, RELEASE=pdl_enabled(q.device), HEADS_FIRST=heads_first,
        order_ptr=seq_lens if order is None else order, ORDERED=order is not None,  # (any pointer unless ORDERED)
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1 and reduce is not None:
        reduce(acc, lse, out, num_splits)
    elif num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            acc, lse, out, num_splits, *acc_strides, *lse_strides, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS_PAD=triton.next_power_of_2(num_splits),
            RELEASE=pdl_enabled(q.device), num_warps=4,
        )
    return num_splits
