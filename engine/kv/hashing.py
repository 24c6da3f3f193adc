"""Prefix-cache block hashes: a full block is named by its parent's hash and its own token ids."""
from __future__ import annotations

import hashlib
from array import array

BlockHash = bytes

ROOT_HASH: BlockHash = b""


def hash_block_tokens(parent_hash: BlockHash, token_ids) -> BlockHash:
    """16-byte BLAKE2b digest of (parent hash, token ids).

    Chaining makes a hash name the whole prefix up to and including this block, so two requests
    share block i only when all their tokens up to the end of block i agree. A cryptographic digest
    rather than Python's hash() because a collision would silently serve one request another's KV.
    """
    h = hashlib.blake2b(parent_hash, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def hash_request_blocks(token_ids, block_size: int, known: list[BlockHash],
                        root: BlockHash = ROOT_HASH) -> list[BlockHash]:
    """Extend `known` (hashes of the first full blocks) to cover every full block of token_ids. root: the parent
    of the first block (KV cache groups of one pool each chain from their own root, engine/kv/groups.py)."""
    for i in range(len(known), len(token_ids) // block_size):
        parent = known[-1] if known else root
        known.append(hash_block_tokens(parent, token_ids[i * block_size:(i + 1) * block_size]))
    return known
