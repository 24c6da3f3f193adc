"""Triton kernel: a decode-sized linear layer, out = x W^T (+ b), with the element-wise op before it fused in.

Why: at batch 1 an 8B model's decode step is ~390 kernels. Besides the GEMMs, 65 of them are RMSNorms, 32
SwiGLU activations and 64 cuBLAS split-K reduce kernels, each a few microseconds of mostly launch latency
and idle SM time between graph nodes (measured on an H200: 0.21 ms of norms, 0.11 ms of reduces and
0.27 ms of gaps in a 4.8 ms step). Here the norm or the activation runs in the prologue of the GEMV that
consumes it, and no split-K is needed (one 4096-wide layer is already 512 programs of 8 rows), so a
layer is 7 launches instead of 12 (4 GEMVs, rotary + KV write, split attention and its reduce).

Prologues (PROLOGUE):
    0 "none":  x as given
    1 "norm":  x := norm_weight * rmsnorm(x + residual), with add_rms_norm's rounding (the sum rounded to
               x's dtype, the normed value rounded, the product rounded); the programs of column tile 0
               also write the new residual x + residual. Each program reads the whole row (from L2) for
               the sum of squares, then its K loop recomputes the normed values it needs.
    2 "silu":  x := silu(h[:, :K]) * h[:, K:] of h [M, 2K], with silu_and_mul's rounding
Layouts: x [M, K] (silu: h [M, 2K]), residual [M, K], K contiguous; weight [N, K] (nn.Linear's, K
contiguous); bias [N]; out [M, N] in x's dtype. Everything 16-bit or float32, x and weight alike.
Grid (M, cdiv(N, BLOCK_N)), the row fastest (the programs that share a weight tile run together). A program
owns BLOCK_N output channels; its K loop loads the next weight tile before it uses the current one (a
register double buffer: loads stay in flight across the FMAs without shared memory), accumulates
w * x in a float32 [BLOCK_N, BLOCK_K] tile and reduces it once at the end.

References: add_rms_norm_reference / silu_and_mul_reference, then F.linear (engine/kernels/reference.py).
Which config a shape gets, or whether it keeps cuBLAS after the separate element-wise kernel ("unfused",
the first candidate and the one used off CUDA), is measured on the device (engine.quant.tuning.pick).
Nothing reads device values on the host, so the launches can be captured in a CUDA graph.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import nn
from torch.nn import functional as F

from .pdl import launch_options, pdl_enabled, release, wait_for_inputs

GEMV_MAX_ROWS = 4  # above this, cuBLAS's tensor-core GEMMs win (each row re-reads the weights from L2 here)
MAX_NORM_ROW = 8192  # the norm prologue keeps a whole row in registers
PROLOGUES = {"none": 0, "norm": 1, "silu": 2}
# (BLOCK_N, BLOCK_K, num_warps) timed per shape: 16-byte loads of 8 rows x 512 features are 64 bytes a
# thread at 4 warps, and with the prefetched tile 128 bytes in flight.
GEMV_TILES = ((8, 512, 4), (4, 512, 4), (16, 256, 4), (8, 1024, 8), (16, 512, 8))


@triton.jit
def _prologue_x(x_row, res_row, nw_ptr, offs_k, mask_k, K, inv, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                dtype: tl.constexpr):
    """The layer's input features offs_k of one row, float32, rounded as the unfused kernels round them."""
    if PROLOGUE == 1:
        h = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(res_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        y = (h.to(dtype).to(tl.float32) * inv).to(dtype).to(tl.float32)
        nw = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        return (nw * y).to(dtype).to(tl.float32)
    elif PROLOGUE == 2:
        g = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        u = tl.load(x_row + K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        return (act * u).to(dtype).to(tl.float32)
    else:
        return tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, N, K, eps, stride_xm, stride_wn,
                 PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, ROW_BLOCK: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr = False):
    m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    dtype = out_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_row = x_ptr + m * stride_xm
    res_row = res_ptr + m * K
    offs_k = tl.arange(0, BLOCK_K)
    if EVEN_K:  # masks constant along K: the loads stay 16-byte vectors
        mask_k = tl.full([BLOCK_K], 1, tl.int1)
    else:
        mask_k = offs_k < K
    w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # before the norm
    # programmatic dependent launch (engine.kernels.pdl): the weights are constant, x, the residual and out wait
    wait_for_inputs(PDL)
    inv = 1.0
    if PROLOGUE == 1:
        offs = tl.arange(0, ROW_BLOCK)
        mask = offs < K
        h = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(res_row + offs, mask=mask, other=0.0).to(tl.float32)
        h = h.to(dtype)
        if pid_n == 0:
            tl.store(res_out_ptr + m * K + offs, h, mask=mask)
        hf = h.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:  # the last step's prefetch re-reads the last tile (an L2 hit) instead of masking along K
            mask_k = tl.full([BLOCK_K], 1, tl.int1)
            offs_next = tl.minimum(k0 + BLOCK_K, K - BLOCK_K) + tl.arange(0, BLOCK_K)
            w_next = tl.load(w_rows + offs_next[None, :], mask=mask_n[:, None], other=0.0)
        else:
            mask_k = offs_k < K
            offs_next = offs_k + BLOCK_K
            w_next = tl.load(w_rows + offs_next[None, :], mask=mask_n[:, None] & (offs_next < K)[None, :], other=0.0)
        xk = _prologue_x(x_row, res_row, nw_ptr, offs_k, mask_k, K, inv, PROLOGUE, HAS_RESIDUAL, dtype)
        acc += w.to(tl.float32) * xk[None, :]
        w = w_next
    release(PDL)
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * N + offs_n, out.to(dtype), mask=mask_n)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, prologue: str = "none",
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 1e-6, *,
         block_n: int = 8, block_k: int = 512, num_warps: int = 4, pdl: bool | None = None):
    """out [M, N] = prologue(x) @ weight^T (+ bias), in x's dtype. prologue "norm" returns (out, new residual
    [M, K]); "silu" takes x = h [M, 2K]; "none" returns out. pdl: programmatic dependent launch
    (engine.kernels.pdl; None: its default)."""
    m = x.shape[0]
    n, k = weight.shape
    code = PROLOGUES[prologue]
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty((m, k), dtype=x.dtype, device=x.device) if code == 1 else out
    if residual is not None:
        residual = residual.contiguous()
    pdl = pdl_enabled(x.device, pdl)
    _gemv_kernel[(m, triton.cdiv(n, block_n))](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, out, res_out, n, k, eps, x.stride(0), weight.stride(0),
        PROLOGUE=code, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, ROW_BLOCK=triton.next_power_of_2(k) if code == 1 else 1, EVEN_K=k % block_k == 0,
        PDL=pdl, num_warps=num_warps, **launch_options(pdl))
    return (out, res_out) if code == 1 else out


def gemv_reference(x, weight, bias=None, prologue="none", residual=None, norm_weight=None, eps=1e-6):
    """The unfused ops gemv replaces, in plain torch (the oracle of its tests)."""
    from .reference import add_rms_norm_reference, silu_and_mul_reference
    if prologue == "norm":
        y, res = add_rms_norm_reference(x, residual, norm_weight, eps)
        return F.linear(y, weight, bias), res
    return F.linear(silu_and_mul_reference(x) if prologue == "silu" else x, weight, bias)


def candidates() -> list[dict]:
    """What tuning.pick times for a shape: cuBLAS after the separate element-wise kernel (first: the
    choice off CUDA and during capture), then the GEMV tiles."""
    return [dict(kernel="unfused")] + [dict(kernel="gemv", block_n=bn, block_k=bk, num_warps=w)
                                       for bn, bk, w in GEMV_TILES]


def fusable(x: torch.Tensor, linear: nn.Module, prologue: str) -> bool:
    """Whether `linear` can run as this kernel on x: a plain nn.Linear (not a quantized or tensor-parallel
    one, no hooks: calibration's pre-hooks must see its input) at decode size, x and weight of one dtype,
    unless ENGINE_FUSED_GEMV=0 (read when a step is traced: CUDA graphs keep what they were captured with)."""
    if x.dim() != 2 or x.shape[0] > GEMV_MAX_ROWS:  # first: prefill steps (eager, every layer) stop here
        return False
    if type(linear) is not nn.Linear or linear._forward_hooks or linear._forward_pre_hooks:
        return False
    return (x.dtype == linear.weight.dtype and linear.weight.stride(-1) == 1
            and (prologue != "norm" or linear.in_features <= MAX_NORM_ROW)
            and os.environ.get("ENGINE_FUSED_GEMV", "1") != "0")  # "0": the unfused path, for A/B measurements


def fused_linear(x: torch.Tensor, linear: nn.Linear, prologue: str, residual: torch.Tensor | None = None,
                 norm: nn.Module | None = None):
    """linear(prologue(x)) as gemv returns it, by the config tuning.pick measured fastest for (prologue, rows,
    N, K, dtype): a GEMV tile, or "unfused" (the separate Triton element-wise kernel, then cuBLAS).
    norm: the RMSNorm module (weight, eps) of the "norm" prologue."""
    from ..quant import tuning
    from .triton_fused import add_rms_norm_triton, silu_and_mul_triton
    b = linear.bias
    norm_w, eps = (norm.weight, norm.eps) if norm is not None else (None, 1e-6)

    def launch(cfg, x, w, residual):
        if cfg["kernel"] == "gemv":
            return gemv(x, w, b, prologue, residual, norm_w, eps, block_n=cfg["block_n"], block_k=cfg["block_k"],
                        num_warps=cfg["num_warps"])
        if prologue == "norm":
            y, res = add_rms_norm_triton(x, residual, norm_w, eps)
            return F.linear(y, w, b), res
        return F.linear(silu_and_mul_triton(x) if prologue == "silu" else x, w, b)

    def timed(cfg, *args):  # tuning compares and times the layer's output
        out = launch(cfg, *args)
        return out[0] if prologue == "norm" else out

    w = linear.weight
    key = ("gemv", prologue, x.shape[0], w.shape[0], w.shape[1], x.dtype, b is not None, residual is not None)
    copies = lambda: [(x, w if i == 0 else w.clone(), residual)  # noqa: E731
                      for i in range(tuning.weight_copies(w.numel() * w.element_size()))]
    return launch(tuning.pick(key, candidates, timed, copies, x.device), x, w, residual)
