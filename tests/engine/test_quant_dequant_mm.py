"""The dequantize-then-matmul path of many rows (engine/quant/dequant_mm.py): the int4 dequantization kernel
against the torch dequantization of the format's own codes (Triton's CPU interpreter here), the sliced
matmul against the float product, and where tuning offers it."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from engine.quant.int4 import dequantize_int4, int4_linear_reference, pack_int4_kernel, quantize_int4  # noqa: E402
from engine.quant.int8 import int8_linear_reference, quantize_int8  # noqa: E402

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("n,k,group,block_n,chunks", [(40, 256, 128, 32, 4), (33, 96, 32, 16, 2),
                                                      (7, 384, 64, 8, 8), (70, 160, 32, 32, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_dequantize_kernel_equals_the_torch_dequantization(n, k, group, block_n, chunks, dtype):
    """Ragged N (masked rows), K off the kernel's tile (masked features), groups smaller and larger than a tile:
    every weight equals (q - zero) * scale of its own group, rounded once to `dtype`."""
    from engine.quant.dequant_mm import int4_dequantize
    g = torch.Generator().manual_seed(n * k)
    qw, scales, zeros = quantize_int4(torch.randn(n, k, generator=g), group_size=group)
    ref = dequantize_int4(qw, scales, zeros).to(dtype)
    out = int4_dequantize(pack_int4_kernel(qw).to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), group, dtype,
                          block_n=block_n, chunks=chunks).cpu()
    assert out.dtype == dtype and torch.equal(out, ref)


@pytest.mark.parametrize("n,k,block_n,block_k", [(40, 256, 8, 1024), (33, 200, 16, 64), (7, 96, 32, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_dequantize_kernel_equals_codes_times_channel_scale(n, k, block_n, block_k, dtype):
    from engine.quant.dequant_mm import int8_dequantize
    g = torch.Generator().manual_seed(n + k)
    q, s = quantize_int8(torch.randn(n, k, generator=g))
    out = int8_dequantize(q.to(DEVICE), s.to(DEVICE), dtype, block_n, block_k).cpu()
    assert out.dtype == dtype and torch.equal(out, (q.float() * s[:, None]).to(dtype))


def test_int4_dequantize_refuses_a_layout_it_cannot_read():
    from engine.quant.dequant_mm import int4_dequantize
    qw, scales, zeros = quantize_int4(torch.randn(8, 64), group_size=32)
    packed = pack_int4_kernel(qw)
    with pytest.raises(ValueError, match="group_size"):
        int4_dequantize(packed, scales, zeros, 48, torch.float32)
    with pytest.raises(ValueError, match="same strides"):
        int4_dequantize(packed, scales, zeros.t().contiguous().t(), 32, torch.float32)


def _layer(seed: int, n: int, k: int, m: int):
    """Activations [m, k] and one [n, k] weight in int4 (codes, scales, zeros) and int8 (codes, scales)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g)
    return (x, *quantize_int4(w), *quantize_int8(w))


@pytest.mark.parametrize("slice_bytes", [None, 2 * 256 * 4, 5 * 256 * 4])
def test_sliced_dequant_matmul_equals_the_reference_in_one_slice_or_several(monkeypatch, slice_bytes):
    """int4 and int8 through each kernel="dequant" tile tuning may pick: one slice, slices of 2 output channels, and
    5 (a ragged last slice of 40 channels), each matmul writing its columns in place."""
    from engine.quant import dequant_mm
    from engine.quant.triton_int4 import _launch as int4_launch
    from engine.quant.triton_int8 import _launch as int8_launch
    if slice_bytes is not None:
        monkeypatch.setattr(dequant_mm, "SLICE_BYTES", slice_bytes)
    x, qw, scales, zeros, q8, s8 = _layer(3, n=40, k=256, m=70)
    ref4, ref8 = int4_linear_reference(x, qw, scales, zeros), int8_linear_reference(x, q8, s8)
    for cfg in dequant_mm.with_dequant(300, [], "int4"):
        out = int4_launch(x.to(DEVICE), pack_int4_kernel(qw).to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), 128,
                          **cfg).cpu()
        torch.testing.assert_close(out, ref4, rtol=1e-5, atol=1e-5)
    for cfg in dequant_mm.with_dequant(300, [], "int8"):
        out = int8_launch(x.to(DEVICE), q8.to(DEVICE), s8.to(DEVICE), **cfg).cpu()
        torch.testing.assert_close(out, ref8, rtol=1e-5, atol=1e-5)


def test_tuning_offers_dequant_from_65_rows_and_defaults_to_it_for_prefill_chunks():
    """Above 256 rows (prefill chunks) the untuned default is the dequantize-then-matmul path for int4 and int8,
    and fp8 keeps to torch._scaled_mm; from 65 rows tuning times it last; at 64 rows and below not at all."""
    from engine.quant.triton_fp8_gemm import fp8_candidates
    from engine.quant.triton_int4 import candidates as int4_candidates
    from engine.quant.dequant_mm import INT4_TILES
    kinds = lambda cands: [c.get("kernel") for c in cands]  # noqa: E731
    tiles = len(INT4_TILES)
    assert kinds(int4_candidates(300, 4096, 4096, 128, 132))[:tiles + 1].count("dequant") == tiles
    assert kinds(int4_candidates(100, 4096, 4096, 128, 132))[-tiles:] == ["dequant"] * tiles
    assert "dequant" not in kinds(int4_candidates(64, 4096, 4096, 128, 132))
    assert fp8_candidates(300, 4096, 4096, 132) == [dict(kernel="scaled_mm")]
    assert len(fp8_candidates(256, 4096, 4096, 132)) > 1


def test_int4_and_int8_matmul_take_the_dequant_path_untuned_at_prefill_rows():
    """int4_matmul / int8_matmul with no config at 300 rows (off CUDA or untuned: the first candidate)."""
    from engine.quant.triton_int4 import int4_matmul
    from engine.quant.triton_int8 import int8_matmul
    x, qw, scales, zeros, q8, s8 = _layer(5, n=24, k=128, m=300)
    out4 = int4_matmul(x.to(DEVICE), pack_int4_kernel(qw).to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE)).cpu()
    out8 = int8_matmul(x.to(DEVICE), q8.to(DEVICE), s8.to(DEVICE)).cpu()
    torch.testing.assert_close(out4, int4_linear_reference(x, qw, scales, zeros), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out8, int8_linear_reference(x, q8, s8), rtol=1e-5, atol=1e-5)
