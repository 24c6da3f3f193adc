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

Decode path (few token-expert pairs, use_gemv_path): sorting costs a dozen tiny kernels per layer, more than
the GEMMs at batch 1, so pairs are not sorted at all. `_moe_gemv_gate_up_kernel`, grid (P, cdiv(I, BLOCK_N)),
has each pair read its own expert's gate and up rows (a GEMV reading the expert id from topk_ids on the
device, fused silu * up); `_moe_gemv_down_kernel`, grid (T, cdiv(H, BLOCK_N)), has each token load its k
experts' down rows as one [k, BLOCK_N, BLOCK_K] tile and sum weight * (w2[e] @ act[pair]) in registers: the
weighted combine is fused, deterministic, with no atomics. Two tokens choosing one expert read it twice, which
use_gemv_path bounds. The routing (softmax, top-k, renormalisation: `route_topk_triton` on the grouped path) is
fused into the gate_up kernel (`fused_moe_from_logits`, `_route_pair`): every program ranks its token's experts
from the router logits and takes its pair's expert; column tile 0 stores the ids and weights for the down kernel
and the expert-load counters. Three launches per MoE layer at decode: the router matmul, gate_up, down; nothing
reads the device from the host, so the path is CUDA-graph capturable.
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


@triton.jit
def _route_pair(logits_row, j, num_experts, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, RENORMALIZE: tl.constexpr):
    """(expert, weight) of a token's j-th choice from its router logits, as _route_topk_kernel: softmax in float32,
    the j-th largest probability (the lowest index among equals, as torch.topk), renormalised over the top k.
    One pass: each expert's rank is the count of experts ahead of it, so no loop over the k choices."""
    offs = tl.arange(0, BLOCK_E)
    mask = offs < num_experts
    x = tl.load(logits_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    p = tl.where(mask, p, -1.0)
    p_other = p[None, :]
    ahead = (p_other > p[:, None]) | ((p_other == p[:, None]) & (offs[None, :] < offs[:, None]))
    rank = tl.sum(ahead.to(tl.int32), 1)
    expert = tl.sum(tl.where(rank == j, offs, 0), 0)
    weight = tl.sum(tl.where(rank == j, p, 0.0), 0)
    if RENORMALIZE:
        weight = weight / tl.sum(tl.where(rank < TOP_K, p, 0.0), 0)
    return expert, weight


@triton.jit(do_not_specialize=["num_pairs"])  # the autotune key only: one compile for every batch size
def _moe_gemv_gate_up_kernel(x_ptr, w_ptr, act_ptr, ids_ptr, logits_ptr, weights_ptr, routing_ptr, num_pairs, N, K,
                             num_experts, stride_x, stride_l, stride_we, stride_wn,
                             TOP_K: tl.constexpr, ROUTE: tl.constexpr, RENORMALIZE: tl.constexpr,
                             HAS_ROUTING: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """act[pair, n] = silu(w13[e, n] . x[t]) * (w13[e, I + n] . x[t]), e = ids[pair], t = pair // TOP_K.
    Grid (num_pairs, cdiv(N, BLOCK_N)); N = I, K = H. num_pairs is only the autotune key. ROUTE: e comes from
    the router logits ([T, E], row stride stride_l) through _route_pair, and the programs of column tile 0
    write ids[pair], weights[pair] (and routing[pair] if HAS_ROUTING) for the down kernel and the counters."""
    pair = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t = pair // TOP_K
    if ROUTE:
        expert, weight = _route_pair(logits_ptr + t.to(tl.int64) * stride_l, pair % TOP_K, num_experts, TOP_K,
                                     BLOCK_E, RENORMALIZE)
        if tl.program_id(1) == 0:
            tl.store(ids_ptr + pair, expert.to(tl.int64))
            tl.store(weights_ptr + pair, weight)
            if HAS_ROUTING:
                tl.store(routing_ptr + pair, expert.to(tl.int64))
        expert = expert.to(tl.int64)
    else:
        expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + t.to(tl.int64) * stride_x
    w_rows = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(x_row + kk, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        m = mask_n[:, None] & mask_k[None, :]
        acc_g += tl.sum(tl.load(w_rows + kk[None, :], mask=m, other=0.0).to(tl.float32) * x, 1)
        acc_u += tl.sum(tl.load(w_rows + N * stride_wn + kk[None, :], mask=m, other=0.0).to(tl.float32) * x, 1)
    dtype = act_ptr.dtype.element_ty
    g = acc_g.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * acc_u.to(dtype).to(tl.float32)
    tl.store(act_ptr + pair.to(tl.int64) * N + offs_n, act.to(dtype), mask=mask_n)


@triton.jit(do_not_specialize=["num_tokens"])  # the autotune key only
def _moe_gemv_down_kernel(act_ptr, w_ptr, out_ptr, ids_ptr, weights_ptr, num_tokens, N, K, stride_we, stride_wn,
                          stride_o, TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """out[t, n] = sum_j weights[t, j] * (w2[e_j, n] . act[t * TOP_K + j]), e_j = ids[t, j]. Grid
    (num_tokens, cdiv(N, BLOCK_N)); N = H, K = I. All k experts' [BLOCK_N, BLOCK_K] tiles are one
    [K_PAD, BLOCK_N, BLOCK_K] load, so k times the bytes are in flight per program as a loop over the
    experts would have; the k-term sum is in registers (deterministic, no atomics)."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_j = tl.arange(0, K_PAD)
    mask_j = offs_j < TOP_K
    pairs = t * TOP_K + offs_j
    experts = tl.load(ids_ptr + pairs, mask=mask_j, other=0).to(tl.int64)
    route_w = tl.load(weights_ptr + pairs, mask=mask_j, other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = act_ptr + pairs.to(tl.int64)[:, None] * K                                      # [K_PAD, 1]
    w_rows = (w_ptr + experts[:, None, None] * stride_we
              + offs_n.to(tl.int64)[None, :, None] * stride_wn)                              # [K_PAD, BLOCK_N, 1]
    mask_jn = mask_j[:, None, None] & mask_n[None, :, None]
    acc = tl.zeros([K_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(a_rows + kk[None, :], mask=mask_j[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_rows + kk[None, None, :], mask=mask_jn & mask_k[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * a[:, None, :], 2)
    dtype = out_ptr.dtype.element_ty
    # Each expert's product rounded to the model dtype before its weight, as the reference's per-expert linear.
    out = tl.sum(acc.to(dtype).to(tl.float32) * route_w[:, None], 0)
    tl.store(out_ptr + t.to(tl.int64) * stride_o + offs_n, out.to(dtype), mask=mask_n)


# The decode path runs while T * k <= GEMV_MAX_PAIRS and the expected re-reads of experts chosen by several
# tokens (each pair reads its expert) cost less than GEMV_MAX_EXTRA_BYTES: about the time moe_align's dozen
# small launches take at ~4.5 TB/s (~15 us). Qwen3-30B-A3B (9.4 MB experts, k = 8): T <= 4; Mixtral (352 MB
# experts, k = 2 of 8): T = 1 only. benchmarks/moe_bench.py measures both paths at T = 1..16.
GEMV_MAX_PAIRS = 64
GEMV_MAX_EXTRA_BYTES = 64 * 2**20
# Above the decode path and up to this many pairs, the dedup path (each chosen expert read once, no sort: five
# launches with the router matmul, route_topk and the k-term sum); beyond, moe_align's sort (~25 small launches)
# pays for the grouped path's BLOCK_M-row blocks. One block of 128 rows holds them all.
DEDUP_MAX_PAIRS = 128
PATHS = ("auto", "gemv", "dedup", "grouped")


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


# On the GPU the decode kernels pick their tiles by timing these once per shape (key: N, K, k and the number of
# pairs or tokens), at the first call of that shape; the engine runs each CUDA-graph size once before capturing
# it, so capture never tunes. (BLOCK_N, BLOCK_K, num_warps). gate_up: narrow-and-long tiles keep enough bytes in
# flight when few rows are read, wide ones when many are. down: the tile is [K_PAD, BLOCK_N, BLOCK_K], so the
# candidates are pruned to at most _DOWN_ELEMS_PER_THREAD weight elements per thread (registers).
_GEMV_CONFIGS = [(8, 256, 4), (16, 256, 4), (32, 256, 4), (64, 128, 4), (16, 512, 8), (32, 128, 4), (8, 512, 4),
                 (64, 256, 8), (8, 1024, 4), (16, 1024, 8)]
_DOWN_CONFIGS = [(2, 256, 4), (4, 128, 4), (4, 256, 4), (8, 128, 4), (4, 512, 8), (8, 256, 8), (16, 128, 8),
                 (8, 512, 4), (16, 256, 4), (16, 512, 8), (32, 256, 8), (8, 1024, 8), (64, 128, 8)]
_DOWN_ELEMS_PER_THREAD = 64


def _configs(tiles):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w) for bn, bk, w in tiles]


def _prune_down(configs, named_args, **kwargs):
    k_pad = kwargs.get("K_PAD", 8)  # triton 3.x passes the launch's constexprs; 8: the largest in practice
    fits = [c for c in configs
            if k_pad * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= _DOWN_ELEMS_PER_THREAD * 32 * c.num_warps]
    return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] / c.num_warps)]


_gate_up_tuned = triton.autotune(configs=_configs(_GEMV_CONFIGS), key=["num_pairs", "N", "K", "TOP_K", "ROUTE"])(
    _moe_gemv_gate_up_kernel)
_down_tuned = triton.autotune(configs=_configs(_DOWN_CONFIGS), key=["num_tokens", "N", "K", "TOP_K"],
                              prune_configs_by={"early_config_prune": _prune_down})(_moe_gemv_down_kernel)
_CPU_TILES = {"gate_up": (16, 32, 4), "down": (16, 32, 4)}


def _decode(x, w13, w2, ids, weights, tiles, route=None) -> torch.Tensor:
    """The two decode launches. route: None (ids [T, k] int64 and weights [T, k] float32 given) or
    (router_logits [T, E], renormalize, routing_out or None): the gate_up kernel routes and fills ids and weights."""
    t, h = x.shape
    inter = w13.shape[1] // 2
    top_k = ids.shape[1]
    k_pad = max(2, triton.next_power_of_2(top_k))
    act = torch.empty(t * top_k, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    logits, renormalize, routing = route if route is not None else (ids, False, None)
    num_experts = w13.shape[0]
    args1 = (x, w13, act, ids, logits, weights, routing if routing is not None else ids, t * top_k, inter, h,
             num_experts, x.stride(0), logits.stride(0), w13.stride(0), w13.stride(1))
    meta1 = dict(TOP_K=top_k, ROUTE=route is not None, RENORMALIZE=renormalize, HAS_ROUTING=routing is not None,
                 BLOCK_E=triton.next_power_of_2(num_experts))
    args2 = (act, w2, out, ids, weights, t, h, inter, w2.stride(0), w2.stride(1), out.stride(0))
    if tiles is None and x.device.type == "cuda":
        _gate_up_tuned[lambda m: (t * top_k, triton.cdiv(inter, m["BLOCK_N"]))](*args1, **meta1)
        _down_tuned[lambda m: (t, triton.cdiv(h, m["BLOCK_N"]))](*args2, TOP_K=top_k, K_PAD=k_pad)
        return out
    (bn1, bk1, w1), (bn2, bk2, w2_) = (tiles or _CPU_TILES)["gate_up"], (tiles or _CPU_TILES)["down"]
    _moe_gemv_gate_up_kernel[(t * top_k, triton.cdiv(inter, bn1))](*args1, **meta1, BLOCK_N=bn1, BLOCK_K=bk1,
                                                                    num_warps=w1)
    _moe_gemv_down_kernel[(t, triton.cdiv(h, bn2))](*args2, TOP_K=top_k, K_PAD=k_pad, BLOCK_N=bn2, BLOCK_K=bk2,
                                                     num_warps=w2_)
    return out


def fused_moe_decode(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, tiles: dict | None = None) -> torch.Tensor:
    """The decode path (see the module doc): fused_moe's result without sorting, two launches.
    tiles: {"gate_up": (BLOCK_N, BLOCK_K, num_warps), "down": (...)} fixes the tiles (benchmarks, tests);
    None autotunes on the GPU and uses small tiles under the interpreter."""
    return _decode(x, w13, w2, topk_ids.contiguous(), topk_weights.to(torch.float32).contiguous(), tiles)


def fused_moe_decode_routed(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                            top_k: int, renormalize: bool, routing_out: torch.Tensor | None = None,
                            tiles: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """route_topk_triton + fused_moe_decode in two launches: the gate_up kernel routes each pair from the router
    logits ([T, E], last dim contiguous). Returns (out [T, H], topk_weights [T, k] float32, topk_ids [T, k]
    int64); the ids are also written to routing_out ([T, k] int64, contiguous) if given."""
    t = x.shape[0]
    if router_logits.stride(1) != 1:
        raise ValueError("fused_moe_decode_routed needs router_logits with a contiguous last dimension")
    ids = torch.empty(t, top_k, dtype=torch.int64, device=x.device)
    weights = torch.empty(t, top_k, dtype=torch.float32, device=x.device)
    out = _decode(x, w13, w2, ids, weights, tiles, (router_logits, renormalize, routing_out))
    return out, weights, ids


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
    use_gemv_path) routes inside its gate_up kernel (two launches); otherwise route_topk_triton then fused_moe
    (path "dedup" or "grouped", or "auto": pick_path)."""
    _check(x, w13, w2, path)
    if path == "gemv" or (path == "auto" and use_gemv_path(x.shape[0], top_k, w13.shape[0], _expert_bytes(w13, w2))):
        return fused_moe_decode_routed(x, router_logits, w13, w2, top_k, renormalize, routing_out)[0]
    weights, ids = route_topk_triton(router_logits, top_k, renormalize, routing_out)
    return fused_moe(x, w13, w2, weights, ids, path=path)


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
