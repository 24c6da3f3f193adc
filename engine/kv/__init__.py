from .block_pool import BlockPool, FreeBlockQueue, KVBlock
from .hashing import hash_block_tokens, hash_request_blocks
from .kv_cache_manager import KVCacheManager, KVCacheSnapshot
from .hybrid import HybridKVCacheManager

__all__ = ["BlockPool", "FreeBlockQueue", "HybridKVCacheManager", "KVBlock", "KVCacheManager", "KVCacheSnapshot",
           "hash_block_tokens", "hash_request_blocks"]
