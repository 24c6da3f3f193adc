"""Triton kernel: prefill and chunked-prefill attention over K/V in the paged cache.

Reference: `paged_attention_reference` in reference.py.

Layouts:
    q, out:           [T, num_heads, head_dim]; request i owns rows query_start_loc[i]:query_start_loc[i+1]
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous; the new
                      tokens' K/V are already written
    block_tables:     [B, max_blocks_per_seq] int32; seq_lens: [B] int32 (cached + new tokens)
The new tokens of a request sit at positions ctx_len .. seq_len - 1 (ctx_len = seq_len - query_len,
the prefix already in the cache, e.g. prefix-cached blocks or earlier chunks) and attend to every
earlier position of their request and to themselves.

Grid (cdiv(max_query_len, BLOCK_Q), B, num_kv_heads), or, given a work list of the (request, query block)
pairs (the runner's, longest request first: AttentionMetadata.prefill_work), (pairs x num_kv_heads,), which runs no
empty program when the requests' lengths differ. A program takes BLOCK_Q new tokens of one
request and all `group` query heads of one KV head, packed as BLOCK_M = BLOCK_Q * group rows (row r is
token r // group, head r % group), so each K/V tile loaded from the cache serves the whole group. It
walks K/V tiles of BLOCK_N tokens with an online softmax (base 2): first the tiles every row may see
in full, without a mask, then the tiles that cross the causal diagonal, and none beyond its last token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_decode import check_paged_layout, precise_pv_default, pv_dot, soft_cap

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table, head_off, tile_start, q_pos, kv_end,
                 qk_scale, stride_cb, stride_cs, mask_d, window, softcap,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 PRECISE_PV: tl.constexpr):
    offs_n = tile_start + tl.arange(0, BLOCK_N)
    if MASKED:
        mask_n = offs_n < kv_end
        block_ids = tl.load(block_table + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    else:
        block_ids = tl.load(block_table + offs_n // BLOCK_SIZE).to(tl.int64)
    kv_off = block_ids[:, None] * stride_cb + (offs_n % BLOCK_SIZE)[:, None] * stride_cs + head_off
    if MASKED:
        if HEAD_DIM == BLOCK_D:
            kv_mask = mask_n[:, None]
        else:
            kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
    elif HEAD_DIM == BLOCK_D:
        k = tl.load(k_cache_ptr + kv_off).to(q.dtype)
        v = tl.load(v_cache_ptr + kv_off).to(q.dtype)
    else:
        k = tl.load(k_cache_ptr + kv_off, mask=mask_d[None, :], other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + kv_off, mask=mask_d[None, :], other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if HAS_SOFTCAP:
        s = soft_cap(s, softcap)
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if HAS_WINDOW:
        # A row may see no key of this tile (its window starts later): keep its max at -inf without NaNs.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + pv_dot(p, v, PRECISE_PV)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
                    work_ptr, out_ptr, qk_scale, window, softcap,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISE_PV: tl.constexpr,
                    WORK: tl.constexpr, NUM_KV_HEADS: tl.constexpr):
    if WORK:  # grid (work items x kv heads,), KV head fastest: item = seq << 16 | query block, in the order given
        kv_head = tl.program_id(0) % NUM_KV_HEADS
        item = tl.load(work_ptr + tl.program_id(0) // NUM_KV_HEADS)
        seq = item >> 16
        q_block = item & 0xFFFF
    else:
        # The last query blocks of a prompt see the most keys: launch them first, so the short ones
        # fill the tail of the grid.
        q_block = tl.num_programs(0) - 1 - tl.program_id(0)
        seq = tl.program_id(1)
        kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_tok = q_block * BLOCK_Q
    if first_tok >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    tok = first_tok + offs_m // GROUP
    heads = kv_head * GROUP + offs_m % GROUP
    mask_m = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    row_off = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + row_off[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q_pos = ctx_len + tok

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head * stride_ch + offs_d[None, :]

    # Keys 0 .. ctx_len + first_tok are visible to every row of this block: no mask. The rest, up to
    # this block's last token, cross the diagonal. Key 0 lies in the first tile either way, so every
    # row's running max is finite after one tile.
    kv_end = tl.minimum(seq_len, ctx_len + first_tok + BLOCK_Q)
    if HAS_WINDOW:
        # Sliding window: from the tile holding the first row's oldest visible key, every tile masked.
        # A row that sees nothing of a tile keeps m_i = -inf (see _attend_tile), and its own position is
        # always visible, so every real row ends with a finite max.
        lo = tl.maximum(ctx_len + first_tok - window + 1, 0)
        for tile_start in range((lo // BLOCK_N) * BLOCK_N, kv_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table, head_off,
                                         tile_start, q_pos, kv_end, qk_scale, stride_cb, stride_cs, mask_d,
                                         window, softcap, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True,
                                         HAS_WINDOW, HAS_SOFTCAP, PRECISE_PV)
    else:
        full_end = ((ctx_len + first_tok + 1) // BLOCK_N) * BLOCK_N
        for tile_start in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table, head_off,
                                         tile_start, q_pos, kv_end, qk_scale, stride_cb, stride_cs, mask_d,
                                         window, softcap, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, False,
                                         HAS_WINDOW, HAS_SOFTCAP, PRECISE_PV)
        for tile_start in range(full_end, kv_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table, head_off,
                                         tile_start, q_pos, kv_end, qk_scale, stride_cb, stride_cs, mask_d,
                                         window, softcap, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True,
                                         HAS_WINDOW, HAS_SOFTCAP, PRECISE_PV)

    out = acc / l_i[:, None]
    tl.store(out_ptr + row_off[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# The tile on CUDA (block_m, block_n, warps, stages; 2 stages above head_dim 128): the fastest of 36 on an H200
# over the 1000-request trace's prefill steps that was not slower on long prompts (prefill_tile_scan_h200.json,
# `python3 benchmarks/prefill_trace_ab.py 3 OUT.json --scan`, 3 interleaved rounds, P @ V with its residue dot):
# 64 x 64, 4 warps, 3 stages, 1.67x the former 128 x 32 (an H100 pick) on the trace's steps, 2.07x on 8 fresh
# prompts of 2048 tokens (245 against 118 TFLOP/s), 2.28x on 2048-token chunks after 6144 cached. On the CPU
# (interpreter): 32 x 16, 4 warps, 1 stage.
GPU_TILE = (64, 64, 4, 3)
CPU_TILE = (32, 16, 4, 1)


def _block_m(group: int, on_gpu: bool, block_m: int | None) -> int:
    if block_m is None:
        block_m = (GPU_TILE if on_gpu else CPU_TILE)[0]
    return max(block_m, triton.next_power_of_2(group), 16)


def prefill_block_q(group: int, on_gpu: bool, block_m: int | None = None) -> int:
    """Query tokens a program of prefill_attention takes: its BLOCK_M rows over `group` query heads."""
    return _block_m(group, on_gpu, block_m) // group


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, out: torch.Tensor, scale: float,
                      max_query_len: int, block_m: int | None = None, block_n: int | None = None,
                      num_warps: int | None = None, num_stages: int | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      precise_pv: bool | None = None, work: torch.Tensor | None = None) -> None:
    """Causal attention of each request's new tokens over its paged context, written into out.

    B = seq_lens.shape[0] requests; query_start_loc ([B + 1], absolute row offsets into q) may be a
    slice of the batch's. max_query_len (tokens) must be at least the longest request's new tokens:
    it sizes the grid, so no device value is read on the host. sliding_window W: a token at position p
    sees keys p - W + 1 .. p; softcap c: scores become c * tanh(score / c). precise_pv: see
    triton_decode.pv_dot (None: precise_pv_default(q.dtype)).
    work: int32 [items], the (request, query block) pairs to run as request << 16 | block, blocks of
    prefill_block_q(...) tokens (metadata.prefill_work builds it): one program a pair and KV head, in that order,
    instead of a grid of every request by the longest request's blocks.
    """
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_query_len == 0:
        return
    head_dim = q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = check_paged_layout("prefill_attention", q, out, k_cache, v_cache)
    block_d = max(16, triton.next_power_of_2(head_dim))
    on_gpu = q.device.type == "cuda"
    block_m = _block_m(group, on_gpu, block_m)
    block_q = block_m // group
    tile = GPU_TILE if on_gpu else CPU_TILE
    if block_n is None:
        block_n = tile[1]
    if num_warps is None:
        num_warps = tile[2]
    if num_stages is None:
        num_stages = min(tile[3], 2) if on_gpu and block_d > 128 else tile[3]
    if work is None:
        grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    else:
        grid = (work.shape[0] * num_kv_heads,)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, seq_lens if work is None else work, out,
        scale * LOG2E,
        sliding_window or 0, float(softcap or 1.0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None,
        PRECISE_PV=precise_pv_default(q.dtype) if precise_pv is None else precise_pv, WORK=work is not None,
        NUM_KV_HEADS=num_kv_heads, num_warps=num_warps, num_stages=num_stages,
    )
