"""Bit packing of 4-bit codes into the int32 words of the Hub's AWQ and GPTQ checkpoints.

Both formats put eight 4-bit codes in one int32 word, nibble i at bits 4i..4i+3 (nibble 7 holds the
sign bit, so a word is often negative as an int32). They differ in which codes share a word:
- GPTQ (AutoGPTQ, "sequential"): the eight consecutive codes 8w..8w+7 of the packed dimension, code
  8w+i in nibble i. qweight [in, out] packs along `in` (rows: [in/8, out]); qzeros [groups, out]
  packs along `out` (columns: [groups, out/8]).
- AWQ (AutoAWQ's GEMM version): qweight [in, out] and qzeros [groups, out] both pack along `out`,
  with the eight codes of a word interleaved: nibble i holds code 8w + AWQ_ORDER[i]
  (AWQ_ORDER = 0, 2, 4, 6, 1, 3, 5, 7), so code 8w + j sits in nibble AWQ_REVERSE_ORDER[j].
The functions work on integer tensors of codes in [0, 15] (int64 arithmetic inside) and give back
int32 words, or codes as uint8.
"""
from __future__ import annotations

import torch

PACK = 8  # 4-bit codes per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)        # nibble i <- code AWQ_ORDER[i] of its group of eight
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # code j -> nibble AWQ_REVERSE_ORDER[j]
SEQUENTIAL_ORDER = tuple(range(PACK))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> the int32 with the same 32 bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_last(codes: torch.Tensor, order: tuple[int, ...] = SEQUENTIAL_ORDER) -> torch.Tensor:
    """codes [..., C] (values 0..15, C % 8 == 0) -> int32 [..., C/8]; nibble i of word w holds code
    8w + order[i]."""
    if codes.shape[-1] % PACK:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes into int32 words of {PACK}: the packed "
                         "dimension must be a multiple of 8")
    c = codes.to(torch.int64)
    if bool(((c < 0) | (c > 15)).any()):
        raise ValueError("4-bit codes must lie in [0, 15]")
    c = c.view(*c.shape[:-1], -1, PACK)
    words = torch.zeros(c.shape[:-1], dtype=torch.int64, device=c.device)
    for nibble, j in enumerate(order):
        words |= c[..., j] << (4 * nibble)
    return _to_int32(words)


def unpack_last(words: torch.Tensor, order: tuple[int, ...] = SEQUENTIAL_ORDER) -> torch.Tensor:
    """int32 [..., C/8] -> codes [..., C] uint8, the inverse of pack_last with the same order."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = torch.empty((*w.shape, PACK), dtype=torch.uint8, device=w.device)
    for nibble, j in enumerate(order):
        codes[..., j] = ((w >> (4 * nibble)) & 0xF).to(torch.uint8)
    return codes.flatten(-2)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """codes [R, C] -> int32 [R/8, C], sequential along the rows (GPTQ's qweight)."""
    return pack_last(codes.t()).t().contiguous()


def unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """int32 [R/8, C] -> codes [R, C] uint8 (GPTQ's qweight)."""
    return unpack_last(words.t()).t().contiguous()


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """codes [R, C] -> int32 [R, C/8] in AWQ's interleaved order (its qweight and qzeros)."""
    return pack_last(codes, AWQ_ORDER)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] in AWQ's order -> codes [R, C] uint8."""
    return unpack_last(words, AWQ_ORDER)
