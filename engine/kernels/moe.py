"""Fused mixture-of-experts in Triton: token-expert pairs sorted by expert, one grouped GEMM per projection.

Reference: `fused_moe_reference` in moe_reference.py (same layouts, see there).

1. `moe_align` (torch ops, no host sync, shapes from T and k only, so a decode step can be captured in a
   CUDA graph) sorts the P = T * k token-expert pairs by expert and pads each expert's run to a multiple
   of BLOCK_M: sorted_pair_ids[r] is the pair in sorted row r (P marks padding), block_expert[b] the
   expert of rows b*BLOCK_M .. (b+1)*BLOCK_M-1 (-1: an unused block past the last expert). A pair p is
   token p // k's j = p % k-th choice.
2. `_moe_gemm_kernel` with GATE_UP: grid (blocks, cdiv(I, BLOCK_N)). A program gathers its BLOCK_M rows of
   x (by token) and multiplies them with the gate and the up rows of its expert's w13 (two accumulators
   over the same A tile), and writes silu(gate) * up to act[pair] ([P, I]): the activation is fused.
3. `_moe_gemm_kernel` with MUL_WEIGHT: grid (blocks, cdiv(H, BLOCK_N)). Rows of act times w2[e]^T, scaled
   by the pair's routing weight in the epilogue, written to out_pairs[pair] ([P, H], in pair order).
4. out = out_pairs.view(T, k, H).sum(1): the weighted combine's k-term sum, deterministic (no atomics).
Each block reads its expert's weight tiles once for all its rows, so weight traffic is one read of each
chosen expert per step: at decode, the bytes of the k chosen experts, which is the speed-of-light bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pair_ids [num_blocks * block_m] int32, block_expert [num_blocks] int32), see the module doc.

    num_blocks = P // block_m + min(E, P) + 1 bounds sum over experts of cdiv(count_e, block_m).
    """
    flat = topk_ids.flatten()
    p = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    first = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    dest = starts[sorted_e] + torch.arange(p, device=device) - first[sorted_e]
    num_blocks = p // block_m + min(num_experts, p) + 1
    sorted_ids = torch.full((num_blocks * block_m,), p, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(ends, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, weights_ptr,
                     num_pairs, N, K, stride_am, stride_we, stride_wn, stride_om,
                     TOP_K: tl.constexpr, A_BY_TOKEN: tl.constexpr, GATE_UP: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    if A_BY_TOKEN:
        a_row = pair // TOP_K
    else:
        a_row = pair
    a_row = tl.where(valid, a_row, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        if GATE_UP:
            w_up = tl.load(w_ptrs + N * stride_wn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc_up = tl.dot(a, w_up, acc_up)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    if GATE_UP:
        # Rounded as the reference: gate and up to the model dtype, silu rounded, then the product.
        g = acc.to(dtype).to(tl.float32)
        u = acc_up.to(dtype).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        acc = act * u
    if MUL_WEIGHT:
        acc = acc.to(dtype).to(tl.float32) * tl.load(weights_ptr + pair, mask=valid, other=0.0)[:, None]
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(dtype), mask=valid[:, None] & mask_n[None, :])


def _block_n(n: int, active_experts: int, min_programs: int) -> int:
    """The widest column tile that still gives at least min_programs programs doing work."""
    for bn in (128, 64, 32):
        if active_experts * triton.cdiv(n, bn) >= min_programs:
            return bn
    return 16


def moe_config(num_tokens: int, top_k: int, num_experts: int, n: int, on_gpu: bool) -> dict:
    """Tile sizes from shapes only. Few tokens (decode): 16-row blocks (the smallest tl.dot) and long K
    tiles, the column tile narrowed until the chosen experts fill the SMs twice (the weights are the
    traffic). Many tokens: 64 x 64 tiles."""
    pairs = num_tokens * top_k
    if not on_gpu:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if pairs <= 4 * num_experts:
        active = min(pairs, num_experts)
        return dict(BLOCK_M=16, BLOCK_N=_block_n(n, active, 264), BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """The MoE output [T, H] in x's dtype (see fused_moe_reference); config overrides the tile sizes
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), for benchmarks and tests."""
    t, h = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_moe needs x, w13 and w2 with a contiguous last dimension")
    on_gpu = x.device.type == "cuda"
    cfg1 = dict(config or moe_config(t, top_k, num_experts, inter, on_gpu))
    cfg2 = dict(config or moe_config(t, top_k, num_experts, h, on_gpu))
    block_m = cfg1["BLOCK_M"]
    if cfg2["BLOCK_M"] != block_m:
        raise ValueError("both projections must use the same BLOCK_M (they share the sorted layout)")
    sorted_ids, block_expert = moe_align(topk_ids, num_experts, block_m)
    num_pairs = t * top_k
    weights = topk_weights.to(torch.float32).flatten().contiguous()
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    nb = block_expert.shape[0]

    def launch(a, w, out, n, k, by_token, gate_up, mul_weight, cfg):
        c = dict(cfg)
        bm, bn, bk = c.pop("BLOCK_M"), c.pop("BLOCK_N"), c.pop("BLOCK_K")
        _moe_gemm_kernel[(nb, triton.cdiv(n, bn))](
            a, w, out, sorted_ids, block_expert, weights, num_pairs, n, k, a.stride(0), w.stride(0), w.stride(1),
            out.stride(0), TOP_K=top_k, A_BY_TOKEN=by_token, GATE_UP=gate_up, MUL_WEIGHT=mul_weight,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **c)

    launch(x, w13, act, inter, h, True, True, False, cfg1)
    out_pairs = torch.empty(num_pairs, h, dtype=x.dtype, device=x.device)
    launch(act, w2, out_pairs, h, inter, False, False, True, cfg2)
    return out_pairs.view(t, top_k, h).sum(dim=1)
