"""Pure-torch paged attention: the CPU path and the oracle every Triton kernel is tested against
(random_paged_batch builds the test cases, reference_on_cpu runs the oracle on them).

Cache layout (one tensor per layer for K and one for V):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
Token t of a request lives in block block_table[t // block_size] at offset t % block_size.
"""
from __future__ import annotations

import torch

from .metadata import AttentionMetadata


def write_kv_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V ([T, num_kv_heads, head_dim]) into the cache at slot_mapping ([T])."""
    num_blocks, block_size, h, d = k_cache.shape
    k_cache.view(num_blocks * block_size, h, d).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, h, d).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one request as a contiguous [seq_len, num_kv_heads, head_dim] tensor."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:seq_len]


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                              softcap: float | None = None) -> torch.Tensor:
    """Attention of the new tokens q ([T, num_heads, head_dim]) over each request's cached K/V.

    Works for decode, prefill and chunked prefill alike; K/V of the new tokens must already be in
    the cache. Softmax in float32. Returns [T, num_heads, head_dim] in q's dtype.
    sliding_window W: a token at position p sees keys p - W + 1 .. p only (transformers' rule), so keys
    older than the window are never read (their blocks may hold anything). softcap c: scores become
    c * tanh(scores / c) before the mask (Gemma 2).
    """
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    qsl = meta.query_start_loc_cpu or meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
    for i, seq_len in enumerate(seq_lens):
        start, end = qsl[i], qsl[i + 1]
        q_len = end - start
        k = gather_kv(k_cache, meta.block_tables[i], seq_len).float().repeat_interleave(group, dim=1)
        v = gather_kv(v_cache, meta.block_tables[i], seq_len).float().repeat_interleave(group, dim=1)
        qi = q[start:end].float()
        scores = _softcap(torch.einsum("qhd,khd->hqk", qi, k) * scale, softcap)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        hidden = k_pos > q_pos
        if sliding_window is not None:
            hidden |= k_pos <= q_pos - sliding_window
            v = v.masked_fill(hidden.all(0)[:, None, None], 0.0)  # keys out of every window: not read
        if q_len > 1 or sliding_window is not None:
            scores.masked_fill_(hidden, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


def _softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                 sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Decode attention (one new token per request, q [B, num_heads, head_dim]) for all requests at once.

    Gathers every request's blocks into a padded [B, max_len, ...] tensor and masks the padding: more
    memory than the per-request loop, far fewer kernel launches. The CPU fast path for decode steps.
    """
    b, num_heads, d = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k = k_cache[block_tables.long()].flatten(1, 2).float()  # [B, max_blocks * block_size, Hkv, D]
    v = v_cache[block_tables.long()].flatten(1, 2).float()
    qg = q.float().view(b, num_kv_heads, group, d)
    scores = _softcap(torch.einsum("bhgd,bkhd->bhgk", qg, k) * scale, softcap)
    k_pos = torch.arange(k.shape[1], device=q.device).unsqueeze(0)
    pad = k_pos >= seq_lens.unsqueeze(1)
    if sliding_window is not None:  # the new token sits at seq_len - 1
        pad |= k_pos <= seq_lens.unsqueeze(1) - 1 - sliding_window
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    # Padding slots hold whatever the cache held (possibly NaN): zero them, as 0 * NaN is NaN.
    v = v.masked_fill(pad[:, :, None, None], 0.0)
    out = torch.einsum("bhgk,bkhd->bhgd", scores.softmax(-1), v)
    return out.reshape(b, num_heads, d).to(q.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(weight * rmsnorm(residual + x), residual + x), the sum in x's dtype and the norm in float32, as HF."""
    if residual is not None:
        x = residual + x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), x


def rotate_reference(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF "rotate half" rotary embedding of x [T, heads, D] in float32; cos/sin [max_pos, D]."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * c + rotated * s).to(x.dtype)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def random_paged_batch(requests, *, num_kv_heads: int, group: int, head_dim: int, block_size: int,
                       dtype: torch.dtype, seed: int, device: torch.device | str = "cpu", fill_new_kv: bool = True):
    """A paged batch for checking kernels: requests is a list of (ctx_len, query_len), decodes (query_len 1) first.

    Returns q, k_cache, v_cache, meta and the new tokens' key/value ([T, num_kv_heads, head_dim]), on `device`.
    Each request's blocks are shuffled, non-contiguous physical blocks; the cache holds every request's
    first ctx_len tokens (and, if fill_new_kv, its new tokens too); every other slot is NaN, and
    block-table padding points at a NaN block, so a kernel that reads past a context fails.
    """
    g = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-(c + n) // block_size) for c, n in requests]
    num_blocks = sum(blocks_per_req) + 3
    physical = torch.randperm(num_blocks, generator=g).tolist()
    spare = physical.pop()  # never holds a token: padding entries point here
    block_tables = torch.full((len(requests), max(blocks_per_req) + 2), spare, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots, keys, values, seq_lens, qsl = [], [], [], [], [0]
    for i, (ctx_len, q_len) in enumerate(requests):
        ids = [physical.pop() for _ in range(blocks_per_req[i])]
        block_tables[i, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        seq_len = ctx_len + q_len
        pos = torch.arange(seq_len)
        req_slots = torch.tensor(ids)[pos // block_size] * block_size + pos % block_size
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=g).to(dtype)
        upto = seq_len if fill_new_kv else ctx_len
        write_kv_reference(k[:upto], v[:upto], k_cache, v_cache, req_slots[:upto])
        slots.append(req_slots[ctx_len:])
        keys.append(k[ctx_len:])
        values.append(v[ctx_len:])
        seq_lens.append(seq_len)
        qsl.append(qsl[-1] + q_len)
    q = torch.randn(qsl[-1], num_kv_heads * group, head_dim, generator=g).to(dtype)
    num_decodes = 0
    while num_decodes < len(requests) and requests[num_decodes][1] == 1:
        num_decodes += 1
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(device), query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=block_tables.to(device),
        num_decodes=num_decodes, max_query_len=max(n for _, n in requests), max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    return (q.to(device), k_cache.to(device), v_cache.to(device), meta,
            torch.cat(keys).to(device), torch.cat(values).to(device))


def reference_on_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    """paged_attention_reference in float32 on CPU copies of (device) inputs: the kernels' oracle."""
    cpu_meta = AttentionMetadata(meta.slot_mapping.cpu(), meta.query_start_loc.cpu(), meta.seq_lens.cpu(),
                                 meta.block_tables.cpu(), meta.num_decodes, meta.max_query_len, meta.max_seq_len,
                                 meta.query_start_loc_cpu, meta.seq_lens_cpu)
    return paged_attention_reference(q.float().cpu(), k_cache.float().cpu(), v_cache.float().cpu(), cpu_meta, scale)
