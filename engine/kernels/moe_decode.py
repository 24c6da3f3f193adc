"""The MoE decode path: GEMV kernels over unsorted token-expert pairs, the routing fused (engine/kernels/moe.py
picks it for few pairs: use_gemv_path). Reference: `fused_moe_reference` and `route_topk` in moe_reference.py.

Sorting (moe.py's moe_align) costs a dozen tiny kernels per layer, more than the GEMMs at batch 1, so pairs
are not sorted at all. `_moe_gemv_gate_up_kernel`, grid (P, cdiv(I, BLOCK_N)), has each pair read its own
expert's gate and up rows (a GEMV reading the expert id on the device, fused silu * up);
`_moe_gemv_down_kernel`, grid (T, cdiv(H, BLOCK_N)), has each token load its k experts' down rows as one
[k, BLOCK_N, BLOCK_K] tile and sum weight * (w2[e] @ act[pair]) in registers: the weighted combine is fused,
deterministic, with no atomics. Two tokens choosing one expert read it twice, which moe.py's use_gemv_path
bounds. The routing (softmax, top-k, renormalisation; `route_topk_triton` on the other paths) is fused into
the gate_up kernel (`fused_moe_decode_routed`, `_rank_experts`): every program ranks its token's experts by
router logit and takes its pair's expert; column tile 0 also computes the weight (`_route_weight`) and stores
ids and weights for the down kernel and the expert-load counters. Three launches per MoE layer at decode:
the router matmul, gate_up, down; nothing reads the device from the host, so the path is CUDA-graph
capturable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rank_experts(logits_row, num_experts, BLOCK_E: tl.constexpr):
    """(logits [BLOCK_E] float32, -inf past num_experts; rank [BLOCK_E]: how many experts come before each one,
    by logit, the lower index first among equals). The k chosen experts are those of rank < k. Ranking the
    logits ranks the softmax probabilities (monotonic): one comparison matrix and one reduction, no softmax
    and no loop over the k choices, so that every program of the gate_up grid can afford it."""
    offs = tl.arange(0, BLOCK_E)
    x = tl.load(logits_row + offs, mask=offs < num_experts, other=float("-inf")).to(tl.float32)
    ahead = (x[None, :] > x[:, None]) | ((x[None, :] == x[:, None]) & (offs[None, :] < offs[:, None]))
    return x, tl.sum(ahead.to(tl.int32), 1)


@triton.jit
def _route_weight(x, rank, j, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr):
    """The routing weight of the rank-j expert, as route_topk: its softmax probability (float32), divided by the
    top k's sum when RENORMALIZE (then 1 / sum_i exp(x_i - x_j) over the top k: no softmax over all experts)."""
    x_j = tl.sum(tl.where(rank == j, x, 0.0), 0)
    if RENORMALIZE:
        return 1.0 / tl.sum(tl.where(rank < TOP_K, tl.exp(x - x_j), 0.0), 0)
    m = tl.max(x, 0)
    return tl.exp(x_j - m) / tl.sum(tl.exp(x - m), 0)


@triton.jit(do_not_specialize=["num_pairs"])  # the autotune key only: one compile for every batch size
def _moe_gemv_gate_up_kernel(x_ptr, w_ptr, act_ptr, ids_ptr, logits_ptr, weights_ptr, routing_ptr, num_pairs, N, K,
                             num_experts, stride_x, stride_l, stride_we, stride_wn,
                             TOP_K: tl.constexpr, ROUTE: tl.constexpr, RENORMALIZE: tl.constexpr,
                             HAS_ROUTING: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """act[pair, n] = silu(w13[e, n] . x[t]) * (w13[e, I + n] . x[t]), e = ids[pair], t = pair // TOP_K.
    Grid (num_pairs, cdiv(N, BLOCK_N)); N = I, K = H. num_pairs is only the autotune key. ROUTE: e comes from
    the router logits ([T, E], row stride stride_l) through _rank_experts, and the programs of column tile 0
    write ids[pair], weights[pair] (and routing[pair] if HAS_ROUTING) for the down kernel and the counters."""
    pair = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t = pair // TOP_K
    if ROUTE:
        logits, rank = _rank_experts(logits_ptr + t.to(tl.int64) * stride_l, num_experts, BLOCK_E)
        j = pair % TOP_K
        expert = tl.sum(tl.where(rank == j, tl.arange(0, BLOCK_E), 0), 0).to(tl.int64)
        if tl.program_id(1) == 0:  # the weight only where it is stored
            tl.store(ids_ptr + pair, expert)
            tl.store(weights_ptr + pair, _route_weight(logits, rank, j, TOP_K, RENORMALIZE))
            if HAS_ROUTING:
                tl.store(routing_ptr + pair, expert)
    else:
        expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + t.to(tl.int64) * stride_x
    w_rows = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + offs_k)[None, :]
        mask_k = kk < K
        m = mask_n[:, None] & mask_k
        # Both weight tiles issued before either is reduced (twice the bytes in flight), and x read as a [1, BLOCK_K]
        # tile in the weights' layout (no layout conversion through shared memory each step).
        w_gate = tl.load(w_rows + kk, mask=m, other=0.0)
        w_up = tl.load(w_rows + N * stride_wn + kk, mask=m, other=0.0)
        x = tl.load(x_row + kk, mask=mask_k, other=0.0).to(tl.float32)
        acc_g += tl.sum(w_gate.to(tl.float32) * x, 1)
        acc_u += tl.sum(w_up.to(tl.float32) * x, 1)
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
    a_rows = act_ptr + pairs.to(tl.int64)[:, None, None] * K                                # [K_PAD, 1, 1]
    w_rows = (w_ptr + experts[:, None, None] * stride_we
              + offs_n.to(tl.int64)[None, :, None] * stride_wn)                              # [K_PAD, BLOCK_N, 1]
    mask_jn = mask_j[:, None, None] & mask_n[None, :, None]
    acc = tl.zeros([K_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        w = tl.load(w_rows + kk[None, None, :], mask=mask_jn & mask_k[None, None, :], other=0.0)
        a = tl.load(a_rows + kk[None, None, :], mask=mask_j[:, None, None] & mask_k[None, None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * a.to(tl.float32), 2)
    dtype = out_ptr.dtype.element_ty
    # Each expert's product rounded to the model dtype before its weight, as the reference's per-expert linear.
    out = tl.sum(acc.to(dtype).to(tl.float32) * route_w[:, None], 0)
    tl.store(out_ptr + t.to(tl.int64) * stride_o + offs_n, out.to(dtype), mask=mask_n)


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
