"""int4 weight-only quantization: asymmetric, group-wise along the input dimension (AWQ/GPTQ-style).

Format (per Linear of weight W [N, K], group size G = 128, K % G == 0):
    qweight: [N, K // 2] uint8, two 4-bit codes per byte: input feature 2j in the low nibble, 2j + 1
             in the high nibble (GPTQ's order: its int32 words are these bytes, little-endian)
    scales:  [N, K // G] in the model dtype, scale = (max - min) / 15 over the group
    zeros:   [N, K // G] uint8 integer zero points in [0, 15], zero = round(-min / scale)
A code q stands for (q - zero) * scale. Rounding error per element <= scale / 2, except at the top
of a group's range, where the stored scale's own rounding (relative eps/2 of its dtype) can make
15 steps fall short of max - min: there the clamp adds up to 15 * eps/2 steps.

On CUDA the forward runs Triton kernels that unpack and dequantize in registers (triton_int4.py,
triton_int4_tc.py): a GEMV on CUDA cores and tensor-core kernels, the one measured fastest per shape. Int4Linear keeps
the codes in the kernels' layout (pack_int4_kernel: 8 codes per int32 word, interleaved so that
one 16-byte load feeds 32 features), the same bytes as qweight. On the CPU it
dequantizes with torch (`int4_linear_reference`), the oracle of those kernels.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

GROUP_SIZE = 128
INT4_MAX = 15
KERNEL_CHUNK = 32  # input features per 16-byte run of the kernel layout (pack_int4_kernel)


def check_int4_shape(name: str, in_features: int, group_size: int = GROUP_SIZE) -> None:
    """Raise ValueError naming the layer if its input dim cannot be cut into whole groups, or into the
    whole 32-feature chunks of the kernel layout."""
    if in_features % group_size != 0 or in_features % KERNEL_CHUNK != 0:
        raise ValueError(f"quantization='int4' needs every quantized layer's input dimension to be a multiple of "
                         f"the group size {group_size} and of {KERNEL_CHUNK}, but {name} has "
                         f"in_features={in_features}: use "
                         "quantization='int8' (per-channel) for this model")


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE,
                  scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (qweight [N, K//2] uint8, scales [N, K//G] scale_dtype, zeros [N, K//G] uint8).

    scale_dtype defaults to the weight's dtype. Codes are computed against the stored (rounded)
    scale, so dequantization reproduces exactly what the codes were chosen for.
    """
    n, k = weight.shape
    check_int4_shape("the weight", k, group_size)
    w = weight.detach().float().view(n, k // group_size, group_size)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    scales = ((hi - lo) / INT4_MAX).clamp(min=1e-8).to(scale_dtype or weight.dtype)
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, INT4_MAX)
    q = (torch.round(w / s[..., None]) + zeros[..., None]).clamp(0, INT4_MAX).to(torch.uint8).view(n, k)
    return pack_int4(q), scales, zeros.to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (values 0..15) -> [N, K // 2] uint8, even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] uint8 -> codes [N, K] uint8."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(1)


def pack_int4_kernel(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] uint8 (pack_int4's order) -> the kernels' layout: [N, K // (8 * RUN), RUN] int32, K % 32 == 0.

    Each run of 32 input features (a chunk, 16 bytes) is 4 words; nibble i (bits 4i..4i+3) of word r
    of chunk c holds feature k = 32c + 4i + r. So one 16-byte load gives a row 32 codes, nibble
    plane i of the 4 words meets the 4 contiguous features 32c + 4i .. 32c + 4i + 3 of x, and planes
    0-3 sit in the low half-word (so a mask, no shift, isolates them; triton_int4.py).
    The words are stored step-major: a view [N, S, RUN] of storage [S, N, RUN] (RUN = 16 words, the GEMV's
    128-feature step, when K % 128 == 0, else 4; S = K // (8 * RUN)), so that the RUN words of consecutive rows are
    contiguous: a kernel's step tile of BLOCK_N rows x 16 words is one BLOCK_N * 64-byte run of memory, not BLOCK_N
    runs of 64 bytes K / 2 bytes apart. The row-strided layout capped the loads alone at 2.4 TB/s on an H200
    (llama-3.1-8b's LM head at 1 row; 4.2 TB/s contiguous, int4_layout_probe_h200.json). Kernels address word w of
    row n at n * stride(0) + (w // RUN) * stride(1) + w % RUN (int4_layout._word_offsets).
    """
    n, half = qweight.shape
    k = 2 * half
    if k % KERNEL_CHUNK:
        raise ValueError(f"the int4 kernel layout needs in_features % {KERNEL_CHUNK} == 0, got {k}")
    codes = unpack_int4(qweight).view(n, k // KERNEL_CHUNK, 8, 4).transpose(2, 3)  # [n, c, r, i]
    words = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [n, c, r, byte]: byte b holds nibbles 2b, 2b + 1
    run = 16 if k % 128 == 0 else 4
    words = words.contiguous().view(torch.int32).view(n, k // (8 * run), run)
    return words.transpose(0, 1).contiguous().transpose(0, 1)


def unpack_int4_kernel(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4_kernel: [N, K // (8 * RUN), RUN] int32 -> [N, K // 2] uint8 in pack_int4's order."""
    n = packed.shape[0]
    words = packed.reshape(n, -1)  # row-major [N, K // 8] (a copy of the step-major storage)
    k = 8 * words.shape[1]
    b = words.contiguous().view(torch.uint8).view(n, k // KERNEL_CHUNK, 4, 4)  # [n, c, r, byte]
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).view(n, k // KERNEL_CHUNK, 4, 8)  # [n, c, r, i]
    return pack_int4(codes.transpose(2, 3).reshape(n, k))


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] that (qweight, scales, zeros) stand for."""
    q = unpack_int4(qweight).float()
    n, k = q.shape
    groups = scales.shape[1]
    w = (q.view(n, groups, k // groups) - zeros.float()[..., None]) * scales.float()[..., None]
    return w.view(n, k).to(dtype)


def int4_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequantized W^T in float32, returned in x's dtype."""
    return F.linear(x.float(), dequantize_int4(qweight, scales, zeros)).to(x.dtype)


class Int4Linear(nn.Module):
    """Drop-in for nn.Linear holding packed int4 weights; packed, scales, zeros (and bias) are
    buffers, so engine.model.weights.weight_bytes counts them.

    The codes are held once, in the kernels' layout (`packed`, pack_int4_kernel), prepared when the
    layer is built; `qweight` gives them in the format's order (pack_int4) for checkpoints and tools.
    input_columns' tensors are kept once per kernel order and device; they and the dp4a configs that input_limbs
    and forward_limbs read are looked up by rows bucket: they follow the process's tuned choices (tuning.chosen),
    which never change once made."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int = GROUP_SIZE, perm: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = group_size
        check_int4_shape("Int4Linear", self.in_features, group_size)
        self.register_buffer("packed", pack_int4_kernel(qweight))
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)
        # GPTQ's act-order: the codes are stored with input feature perm[j] at column j (so that groups
        # stay contiguous) and the forward gathers x's features in that order. None: identity.
        self.register_buffer("perm", None if perm is None else perm.to(torch.int64))
        # input_columns' tensors by (kernel order, device), and the same by (rows bucket, dtype, device)
        self._columns: dict[tuple, torch.Tensor] = {}
        self._columns_by_rows: dict[tuple, torch.Tensor] = {}
        self._dp4a_by_rows: dict[tuple, dict | None] = {}  # _dp4a_config's answers by (rows bucket, dtype, device)

    def _ordered_config(self, rows: int, dtype: torch.dtype, device: torch.device) -> dict | None:
        """The config of the kernel that runs rows of input stored by its producer (tuned_config's x_ordered key;
        on CUDA the first call tunes it); None off CUDA unless a test chose one."""
        from . import tuning
        from .triton_int4 import tuned_config, tuning_key
        if device.type != "cuda" and tuning_key(rows, self.out_features, self.in_features, self.group_size,
                                                dtype, x_ordered=True) not in tuning.chosen:
            return None
        return tuned_config(rows, dtype, device, self.packed, self.scales, self.zeros, self.group_size,
                            lambda: torch.randn(rows, self.in_features, dtype=dtype, device=device), True)

    def input_limbs(self, rows: int, dtype: torch.dtype, device: torch.device) -> int | None:
        """The chunks of the dp4a GEMV that runs rows of input stored by its producer, when that kernel is the dp4a
        GEMV: the producer then stores the input as its Limbs (triton_int4_dp4a's fused producers, the columns in
        `perm`'s order) for forward_limbs. None: no such input (see input_columns)."""
        config = self._dp4a_config(rows, dtype, device)
        return None if config is None else config.get("chunks", 4)

    def _dp4a_config(self, rows: int, dtype: torch.dtype, device: torch.device) -> dict | None:
        """_ordered_config when it is the dp4a GEMV's, else None; looked up by rows bucket after the first call."""
        from .triton_int8 import tune_bucket
        rows_key = (tune_bucket(rows), dtype, device)
        if rows_key not in self._dp4a_by_rows:
            config = self._ordered_config(rows, dtype, device)
            if config is None:
                return None
            self._dp4a_by_rows[rows_key] = config if config.get("kernel") == "dp4a" else None
        return self._dp4a_by_rows[rows_key]

    def forward_limbs(self, limbs) -> torch.Tensor:
        """The product of the input whose Limbs (triton_int4_dp4a.Limbs, of input_limbs' chunks) its producer
        stored, [M, out_features]."""
        from .triton_int4 import _launch
        rows = limbs.q.shape[0]
        config = self._dp4a_config(rows, limbs.dtype, limbs.q.device)
        if config is None:
            raise ValueError(f"forward_limbs: the layer's kernel for {rows} rows of ordered input is not the dp4a "
                             "GEMV: check input_limbs first")
        out = _launch(limbs, self.packed, self.scales, self.zeros, self.group_size, **config)
        return out if self.bias is None else out + self.bias

    def input_columns(self, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """For a kernel that produces this layer's input: where to store each feature (int32 [in_features] on
        device) so that forward(x, x_ordered=True) reads x as its kernel does, with no gather or permuting copy
        of its own: GPTQ's act-order gather and the x_perm kernels' permutation (triton_int4.x_order) together.
        That kernel is tuned for such input (tuned_config's x_ordered key; on CUDA the first call tunes it).
        An empty tensor: the features in their own order. None: no such input (call forward(x)): off CUDA
        (where forward runs the torch reference; tests choose a kernel config to get here), or while a CUDA graph
        is being captured and the tensor would have to be made in it."""
        from .triton_int8 import tune_bucket
        rows_key = (tune_bucket(rows), dtype, device)
        columns = self._columns_by_rows.get(rows_key)  # (an eager step's ~100 calls: a lookup each after the first)
        if columns is not None:
            return columns
        from .triton_int4 import x_order, x_order_kind
        config = self._ordered_config(rows, dtype, device)
        if config is None:
            return None
        key = (x_order_kind(config), device)
        if key not in self._columns:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            order = x_order(config, self.in_features)
            if self.perm is not None:  # the kernel reads x1[:, order] of x1 = x[:, perm]
                perm = self.perm.cpu()
                order = perm if order is None else perm[order]
            columns = torch.empty(0 if order is None else self.in_features, dtype=torch.int32)
            if order is not None:
                columns[order] = torch.arange(self.in_features, dtype=torch.int32)
            self._columns[key] = columns.to(device)
        self._columns_by_rows[rows_key] = self._columns[key]
        return self._columns[key]

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "a Linear layer",
                    group_size: int = GROUP_SIZE) -> "Int4Linear":
        check_int4_shape(name, linear.in_features, group_size)
        qweight, scales, zeros = quantize_int4(linear.weight, group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(qweight, scales, zeros, bias, group_size)

    @property
    def qweight(self) -> torch.Tensor:
        """[out, in // 2] uint8, pack_int4's order (a new tensor, unpacked from `packed`)."""
        return unpack_int4_kernel(self.packed)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] this layer multiplies by, in the original input order."""
        w = dequantize_int4(self.qweight, self.scales, self.zeros, dtype)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def forward(self, x: torch.Tensor, x_ordered: bool = False) -> torch.Tensor:
        """x_ordered: x's features are already where input_columns put them (not in their own order)."""
        if self.perm is not None and not x_ordered:
            x = x.index_select(-1, self.perm)
        if x.is_cuda or x_ordered:  # (x_ordered on the CPU: the Triton kernels under the interpreter, in tests)
            from .triton_int4 import int4_matmul
            out = int4_matmul(x.reshape(-1, self.in_features), self.packed, self.scales, self.zeros,
                              self.group_size, x_ordered=x_ordered)
            out = out.view(*x.shape[:-1], self.out_features)
        else:
            out = int4_linear_reference(x, self.qweight, self.scales, self.zeros)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group={self.group_size}")
