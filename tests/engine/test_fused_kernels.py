"""The fused element-wise Triton kernels against their pure-torch twins (CPU interpreter, float32/16)."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1")

from engine.kernels.metadata import AttentionMetadata  # noqa: E402
from engine.kernels.reference import (add_rms_norm_reference, rotate_reference, silu_and_mul_reference,  # noqa: E402
                                      write_kv_reference)
from engine.model.rotary import RotaryEmbedding  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]


def tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("n", [64, 96])
def test_add_rms_norm(dtype, with_residual, n):
    from engine.kernels.triton_fused import add_rms_norm_triton
    g = torch.Generator().manual_seed(n)
    x = torch.randn(7, n, generator=g).to(DEVICE, dtype)
    r = torch.randn(7, n, generator=g).to(DEVICE, dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    out, res = add_rms_norm_triton(x, r, w, 1e-5)
    ref_out, ref_res = add_rms_norm_reference(x, r, w, 1e-5)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 2)])
def test_rotary_write_kv(dtype, heads):
    from engine.kernels.triton_fused import rotary_write_kv_triton
    h, hkv = heads
    d, t, block_size, num_blocks = 16, 9, 4, 8
    g = torch.Generator().manual_seed(h)
    rotary = RotaryEmbedding(d, 64, 10000.0, None).to(DEVICE)
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g).to(DEVICE, dtype)
    positions = torch.randint(0, 64, (t,), generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t].to(DEVICE)
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=None, seq_lens=None, block_tables=None,
                             num_decodes=0, max_query_len=t, max_seq_len=t)
    caches = [torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype, device=DEVICE)
              for _ in range(4)]
    q = rotary_write_kv_triton(qkv, positions, rotary.cos, rotary.sin, caches[0], caches[1], meta, h, hkv, d)
    q_ref, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q_ref = rotate_reference(q_ref.view(t, h, d), positions, rotary.cos, rotary.sin)
    k = rotate_reference(k.reshape(t, hkv, d), positions, rotary.cos, rotary.sin)
    write_kv_reference(k, v.reshape(t, hkv, d), caches[2], caches[3], slots)
    torch.testing.assert_close(q, q_ref, **tol(dtype))
    # NaN in the same places proves the kernel wrote exactly the slots in slot_mapping
    torch.testing.assert_close(caches[0], caches[2], equal_nan=True, **tol(dtype))
    torch.testing.assert_close(caches[1], caches[3], equal_nan=True, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    from engine.kernels.triton_fused import silu_and_mul_triton
    x = torch.randn(5, 2 * 1500, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_reference(x), **tol(dtype))
