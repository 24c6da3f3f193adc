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
chosen expert per step.

Dedup path (up to DEDUP_MAX_PAIRS pairs, when the decode path below would re-read too many experts):
`_moe_gemm_kernel` with DEDUP, grid (P, cdiv(N, BLOCK_N)), BLOCK_M >= P, no moe_align: program p scans
topk_ids, returns unless p is the first pair of its expert, and otherwise serves every pair of that expert
as the rows of one block (the others masked). Each chosen expert is read once, in five launches (router
matmul, route_topk, two GEMMs, the k-term sum) instead of the sort's ~25.

Decode path (few token-expert pairs, use_gemv_path): moe_decode.py, GEMV kernels over the unsorted pairs with
the routing fused; three launches per MoE layer with the router matmul.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe_decode import fused_moe_decode, fused_moe_decode_routed


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


@triton.jit(do_not_specialize=["num_pairs"])  # a bound only: one compile for every batch size
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, weights_ptr,
                     num_pairs, N, K, stride_am, stride_we, stride_wn, stride_om,
                     TOP_K: tl.constexpr, A_BY_TOKEN: tl.constexpr, GATE_UP: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, DEDUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if DEDUP:
        # Unsorted (sorted_ids_ptr: topk_ids, flat): program pid_m serves the expert of pair pid_m with every pair
        # that chose it, if pid_m is that expert's first pair; the others return at once.
        pair = tl.arange(0, BLOCK_M)
        ids = tl.load(sorted_ids_ptr + pair, mask=pair < num_pairs, other=-1)
        expert = tl.load(sorted_ids_ptr + pid_m)
        if tl.min(tl.where(ids == expert, pair, BLOCK_M), 0) != pid_m:
            return
        valid = ids == expert
    else:
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


@triton.jit
def _route_topk_kernel(logits_ptr, weights_ptr, ids_ptr, routing_ptr, num_experts, stride_l,
                       TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
                       RENORMALIZE: tl.constexpr, HAS_ROUTING: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < num_experts
    x = tl.load(logits_ptr + t * stride_l + offs, mask=mask, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    p = tl.where(mask, p, -1.0)
    offs_k = tl.arange(0, K_PAD)
    vals = tl.zeros([K_PAD], dtype=tl.float32)
    idxs = tl.zeros([K_PAD], dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, offs, BLOCK_E), 0)  # the lowest index among equals, as torch.topk
        vals = tl.where(offs_k == j, best, vals)
        idxs = tl.where(offs_k == j, idx.to(tl.int64), idxs)
        p = tl.where(offs == idx, -1.0, p)
    if RENORMALIZE:
        vals = vals / tl.sum(tl.where(offs_k < TOP_K, vals, 0.0), 0)
    kmask = offs_k < TOP_K
    tl.store(weights_ptr + t * TOP_K + offs_k, vals, mask=kmask)
    tl.store(ids_ptr + t * TOP_K + offs_k, idxs, mask=kmask)
    if HAS_ROUTING:
        tl.store(routing_ptr + t * TOP_K + offs_k, idxs, mask=kmask)


def route_topk_triton(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                      routing_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """route_topk (moe_reference.py) in one kernel; the ids are also written to routing_out ([T, k] int64) if given."""
    t, e = router_logits.shape
    weights = torch.empty(t, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=router_logits.device)
    _route_topk_kernel[(t,)](router_logits, weights, ids, routing_out if routing_out is not None else ids, e,
                             router_logits.stride(0), TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k),
                             BLOCK_E=triton.next_power_of_2(e), RENORMALIZE=renormalize,
                             HAS_ROUTING=routing_out is not None)
    return weights, ids


# The decode path runs while T * k <= GEMV_MAX_PAIRS and the expected re-reads of experts chosen by several
# tokens (each pair reads its expert) cost less than GEMV_MAX_EXTRA_BYTES: about what the dedup path's two
# extra launches (route_topk, the k-term sum: ~6-8 us) would read at ~4.3 TB/s. Qwen3-30B-A3B (9.4 MB experts,
# k = 8): T <= 4; Mixtral (352 MB experts, k = 2 of 8): T = 1 only. benchmarks/moe_bench.py measures every path
# at T = 1..16 (its layer part), which is where to re-tune these from.
GEMV_MAX_PAIRS = 64
GEMV_MAX_EXTRA_BYTES = 32 * 2**20
# Above the decode path and up to this many pairs, the dedup path (each chosen expert read once, no sort: five
# launches with the router matmul, route_topk and the k-term sum); beyond, moe_align's sort (~25 small launches)
# pays for the grouped path's BLOCK_M-row blocks. One block of 128 rows holds them all.
DEDUP_MAX_PAIRS = 128
PATHS = ("auto", "gemv", "dedup", "grouped")
# The decode path routes inside its gate_up kernel (one launch fewer; every program ranks its token's experts
# first, ~1k instructions before its weight loads) rather than in route_topk_triton. moe_bench's layer part
# times both ("gemv" and "gemv_unrouted"); set False if the separate launch is the faster.
DECODE_FUSED_ROUTING = True


def expected_distinct_experts(num_tokens: int, top_k: int, num_experts: int) -> float:
    """Experts chosen by at least one of num_tokens tokens under even routing: E (1 - (1 - k/E)^T)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def use_gemv_path(num_tokens: int, top_k: int, num_experts: int, expert_bytes: int) -> bool:
    """Whether fused_moe's "auto" takes the unsorted decode path (see GEMV_MAX_PAIRS)."""
    pairs = num_tokens * top_k
    if pairs > GEMV_MAX_PAIRS:
        return False
    extra = pairs - expected_distinct_experts(num_tokens, top_k, num_experts)
    return extra * expert_bytes <= GEMV_MAX_EXTRA_BYTES


def _expert_bytes(w13: torch.Tensor, w2: torch.Tensor) -> int:
    return (w13[0].numel() + w2[0].numel()) * w13.element_size()


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, path: str) -> None:
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_moe needs x, w13 and w2 with a contiguous last dimension")
    if path not in PATHS:
        raise ValueError(f"path={path!r} is not allowed: choose one of {PATHS}")


def fused_moe_from_logits(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                          top_k: int, renormalize: bool, routing_out: torch.Tensor | None = None,
                          path: str = "auto") -> torch.Tensor:
    """The MoE layer after its router matmul: out [T, H]. The decode path (path "gemv", or "auto" and
    use_gemv_path) routes inside its gate_up kernel (two launches; DECODE_FUSED_ROUTING); otherwise
    route_topk_triton then fused_moe (path "dedup" or "grouped", or "auto": pick_path)."""
    _check(x, w13, w2, path)
    gemv = path == "gemv" or (path == "auto" and use_gemv_path(x.shape[0], top_k, w13.shape[0], _expert_bytes(w13, w2)))
    if gemv and DECODE_FUSED_ROUTING:
        return fused_moe_decode_routed(x, router_logits, w13, w2, top_k, renormalize, routing_out)[0]
    weights, ids = route_topk_triton(router_logits, top_k, renormalize, routing_out)
    return fused_moe(x, w13, w2, weights, ids, path="gemv" if gemv else path)


def _block_n(n: int, active_experts: int, min_programs: int) -> int:
    """The widest column tile that still gives at least min_programs programs doing work."""
    for bn in (64, 32):  # 128 would need ~210 KB of shared memory for the gate + up tiles at 3 stages
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


def dedup_config(num_tokens: int, top_k: int, num_experts: int, n: int, on_gpu: bool) -> dict:
    """Tiles of the dedup path: BLOCK_M covers every pair (>= 16, tl.dot's smallest), the column tile narrowed
    until the expected distinct experts fill the SMs twice, K tiles short enough for 3 stages of shared memory."""
    pairs = num_tokens * top_k
    block_m = max(16, triton.next_power_of_2(pairs))
    if not on_gpu:
        return dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    active = max(1, round(expected_distinct_experts(num_tokens, top_k, num_experts)))
    return dict(BLOCK_M=block_m, BLOCK_N=_block_n(n, active, 264), BLOCK_K=128 if block_m <= 32 else 64,
                num_warps=4, num_stages=3)


def pick_path(num_tokens: int, top_k: int, num_experts: int, expert_bytes: int) -> str:
    """The path fused_moe's "auto" takes: "gemv" while use_gemv_path, "dedup" up to DEDUP_MAX_PAIRS pairs,
    "grouped" beyond (sorting pays for itself once the pairs fill many BLOCK_M-row blocks)."""
    if use_gemv_path(num_tokens, top_k, num_experts, expert_bytes):
        return "gemv"
    return "dedup" if num_tokens * top_k <= DEDUP_MAX_PAIRS else "grouped"


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: dict | None = None, path: str = "auto") -> torch.Tensor:
    """The MoE output [T, H] in x's dtype (see fused_moe_reference). path: "gemv" (the unsorted decode path),
    "dedup" (unsorted, one program per distinct expert and column tile), "grouped" (sorted, grouped GEMMs) or
    "auto" (pick_path); config overrides the GEMM paths' tile sizes (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages; dedup takes BLOCK_M >= T * k), for benchmarks and tests."""
    t, h = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    _check(x, w13, w2, path)
    if path == "auto":
        path = pick_path(t, top_k, num_experts, _expert_bytes(w13, w2))
    if path == "gemv":
        return fused_moe_decode(x, w13, w2, topk_weights, topk_ids)
    on_gpu = x.device.type == "cuda"
    make = dedup_config if path == "dedup" else moe_config
    cfg1 = dict(config or make(t, top_k, num_experts, inter, on_gpu))
    cfg2 = dict(config or make(t, top_k, num_experts, h, on_gpu))
    block_m = cfg1["BLOCK_M"]
    if cfg2["BLOCK_M"] != block_m:
        raise ValueError("both projections must use the same BLOCK_M (they share the sorted layout)")
    num_pairs = t * top_k
    if path == "dedup":
        if num_pairs > DEDUP_MAX_PAIRS:
            raise ValueError(f"the dedup path takes at most DEDUP_MAX_PAIRS = {DEDUP_MAX_PAIRS} token-expert pairs, "
                             f"got T * k = {num_pairs}: use path 'grouped' or 'auto'")
        if block_m < num_pairs:
            raise ValueError(f"the dedup path needs BLOCK_M >= T * k = {num_pairs}, got {block_m}")
        sorted_ids = block_expert = topk_ids.flatten().contiguous()
        nb = num_pairs
    else:
        sorted_ids, block_expert = moe_align(topk_ids, num_experts, block_m)
        nb = block_expert.shape[0]
    weights = topk_weights.to(torch.float32).flatten().contiguous()
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)

    def launch(a, w, out, n, k, by_token, gate_up, mul_weight, cfg):
        c = dict(cfg)
        bm, bn, bk = c.pop("BLOCK_M"), c.pop("BLOCK_N"), c.pop("BLOCK_K")
        _moe_gemm_kernel[(nb, triton.cdiv(n, bn))](
            a, w, out, sorted_ids, block_expert, weights, num_pairs, n, k, a.stride(0), w.stride(0), w.stride(1),
            out.stride(0), TOP_K=top_k, A_BY_TOKEN=by_token, GATE_UP=gate_up, MUL_WEIGHT=mul_weight,
            DEDUP=path == "dedup", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **c)

    launch(x, w13, act, inter, h, True, True, False, cfg1)
    out_pairs = torch.empty(num_pairs, h, dtype=x.dtype, device=x.device)
    launch(act, w2, out_pairs, h, inter, False, False, True, cfg2)
    return out_pairs.view(t, top_k, h).sum(dim=1)
