"""The int4 kernels' weight layout seen from Triton (int4.pack_int4_kernel stores it): word w of row n lies at
n * stride_wn + (w // RUN) * stride_ws + w % RUN, runs of RUN words of consecutive rows contiguous."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _word_offsets(words, stride_ws, RUN: tl.constexpr):
    """Where word `words` of a row lies from the row's start in the kernel layout (int4.pack_int4_kernel): runs of
    RUN words, stride_ws apart."""
    return (words // RUN) * stride_ws + words % RUN


@triton.jit
def _step_words(kw, cols, stride_ws, RUN: tl.constexpr, VEC: tl.constexpr):
    """_word_offsets of the words kw + cols (a step's first word plus its columns), stated to run in VEC contiguous
    words from multiples of VEC, so that they load as 16-byte vectors. (Offsets of the columns added to those of
    kw, a scalar, load 4 bytes at a time under Triton 3.6.)"""
    return tl.max_contiguous(tl.multiple_of(_word_offsets(kw + cols, stride_ws, RUN), VEC), VEC)


def layout_args(packed: torch.Tensor) -> tuple[int, int, int]:
    """(stride_wn, stride_ws, RUN) of a kernel-layout tensor (int4.pack_int4_kernel), for the kernels' launches."""
    if packed.dim() != 3 or packed.stride(2) != 1:
        raise ValueError(f"int4 kernels need int4.pack_int4_kernel's layout [N, K // (8 * RUN), RUN], got a tensor "
                         f"of shape {tuple(packed.shape)} and strides {packed.stride()}")
    return packed.stride(0), packed.stride(1), packed.shape[2]
