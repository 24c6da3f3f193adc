"""Memory planner: KV capacity and an out-of-memory verdict for a config, before any run.

The rule is the engine's own: ``LLM.size_kv_cache`` (engine/memory.py), which the engine's runner sizes its
pool with. The planner only estimates that rule's inputs where the engine measures them:

    weights         exact bytes of engine/quant's formats, per GPU under tensor parallelism
    other           what torch holds beside the weights (rotary tables, input buffers, the graphs' hidden
                    buffer), exact, plus a calibrated remainder
    activation peak the larger of a prefill of max_num_batched_tokens and a decode of max_num_seqs rows
                    with float32 logits (calibrated on the engine's own profile on an H100,
                    ``scripts/calibrate_planner.py`` -> ``data/planner/calibration_h100.json``)
    CUDA graphs     the largest decode graph's pool (its forward without the LM head), 0 with enforce_eager
    non-torch       the CUDA context (calibrated)

and the engine adds its margin (engine.memory.MEMORY_MARGIN_BYTES) and scratch block. num_gpu_blocks,
max_num_seqs, max_num_batched_tokens, quantization, kv_cache_dtype, tensor_parallel_size and enforce_eager all
change the plan as they change the engine. On the CPU the engine sizes the pool as gpu_memory_utilization x
CPU_KV_BUDGET_BYTES; ``gpu="cpu"`` plans that. Tensor parallelism is planned per GPU (Megatron sharding:
linear layers, embeddings and LM head split, norms replicated, KV heads split); a tensor_parallel_size that
does not divide the head counts, or with quantization, is refused as the engine refuses it.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine import LLM, EngineConfig, ModelSpec
from engine.quant import LM_HEAD_MODE  # awq/gptq: the LM head in int8
from engine.quant.dequant_mm import DEQUANT_MIN_ROWS, slice_rows  # int8/int4 from 65 rows: a float weight slice
from engine.quant.embedding import quantized_embedding_bytes  # any mode: an untied table in int8 per row

MiB, GiB = 2**20, 2**30
QUANT_GROUP_SIZE = 128  # int4: one scale and one zero point per 128 input channels
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
KV_DTYPE_BYTES = {"fp8": 1}  # "auto" = the model dtype
VERDICTS = LLM.MEMORY_VERDICTS  # the engine's: fits | weights do not fit | max_model_len ... | num_gpu_blocks ...
CALIBRATION_FILE = Path(__file__).resolve().parents[1] / "data" / "planner" / "calibration_h100.json"


@dataclass(frozen=True)
class GPU:
    """A GPU model: usable memory in bytes as torch reports it (cudaMemGetInfo total), compute capability."""

    name: str
    total_bytes: int
    compute_capability: tuple[int, int]
    source: str


GPUS = {g.name: g for g in [
    GPU("A10G", 23028 * MiB, (8, 6), "nvidia-smi memory.total as commonly reported (AWS g5); torch reports a little "
        "less: use gpu='current' there"),
    GPU("L4", 23034 * MiB, (8, 9), "nvidia-smi memory.total as commonly reported (GCP g2); torch reports a little "
        "less: use gpu='current' there"),
    GPU("L40S", 46068 * MiB, (8, 9), "nvidia-smi memory.total as commonly reported; torch reports a little less: "
        "use gpu='current' there"),
    GPU("A100-40GB", 40448 * MiB, (8, 0), "torch total capacity 39.50 GiB as commonly reported; varies with the "
        "driver"),
    GPU("A100-80GB", 81040 * MiB, (8, 0), "torch total capacity 79.14 GiB as commonly reported; varies with the "
        "driver"),
    GPU("H100-80GB", 85017493504, (9, 0), "H100 80GB HBM3, driver 580: torch's total (81080 MiB) measured on this "
        "project's machine; nvidia-smi shows 81559 MiB"),
    GPU("H200", 143771 * MiB, (9, 0), "H200 141GB, driver 580: nvidia-smi on this project's machine; torch reports "
        "a little less (479 MiB less on the H100)"),
]}


@dataclass(frozen=True)
class Calibration:
    """The fitted terms of the memory model, in bytes. The engine's profile forward peaks at the larger of

        MLP:    T x (forward_hidden_bytes x hidden + forward_intermediate_bytes x intermediate / tp)
        logits: S x vocab / tp x logits_bytes + 2 x (T + S) x hidden

    plus forward_const_bytes, for T = max_num_batched_tokens tokens over S = min(max_num_seqs, T) sequences
    (16-bit dtypes; the token terms scale with the dtype's bytes / 2). The H100 fit gives 8 and 6 bytes:
    the residual stream, its normed copy, the layer output and the down projection's output (4 x 2 x hidden)
    beside gate_up and the fused SwiGLU output (3 x 2 x intermediate); the logits are bf16 plus their float32
    copy (6 bytes). forward_const_bytes: the first matmul's cuBLAS workspace, which a fresh start counts in its
    peak. other_bytes: what torch holds before the profile besides weights, rotary tables and input buffers.
    (The fit was made on the profile step before issue 13, which also held its sequences' KV blocks; the
    forward terms are that step's forward, which the engine's prefill profile still runs.)
    """

    forward_const_bytes: float
    forward_hidden_bytes: float
    forward_intermediate_bytes: float
    logits_bytes: float
    non_torch_bytes: int
    other_bytes: int
    source: str

    @classmethod
    def from_json(cls, path: str | Path = CALIBRATION_FILE) -> "Calibration":
        """The ``fit`` section of a calibration file written by scripts/calibrate_planner.py."""
        fit = json.loads(Path(path).read_text())["fit"]
        return cls(**{f: fit[f] for f in cls.__dataclass_fields__ if f != "source"}, source=str(path))


# Fitted by scripts/calibrate_planner.py on the H100 80GB HBM3 (torch 2.11, CUDA 13.0) and committed with its data,
# data/planner/calibration_h100.json; tests/workbench/test_planner.py checks that these equal the file.
# A fresh LLM(...) and an engine rebuilt by LLM.reconfigure() (what a sweep does) differ a little: after the first
# start the cuBLAS workspace has moved from the profile's peak into what torch holds, and the CUDA context has
# grown by the kernels loaded so far (by about 180 MiB). The default takes the larger of each overhead, so that
# its block count errs low (by up to 1%) rather than high, however the engine was started.
CALIBRATION_H100 = Calibration(
    forward_const_bytes=33668419.92924863, forward_hidden_bytes=7.99560761992533,
    forward_intermediate_bytes=6.001154310030951, logits_bytes=6.008116683072934,
    non_torch_bytes=829926058, other_bytes=33816576,
    source="data/planner/calibration_h100.json, section fit")
CALIBRATION_H100_FRESH = Calibration(
    forward_const_bytes=33668419.92924863, forward_hidden_bytes=7.99560761992533,
    forward_intermediate_bytes=6.001154310030951, logits_bytes=6.008116683072934,
    non_torch_bytes=648871936, other_bytes=262144,
    source="data/planner/calibration_h100.json, section fit_fresh")
CALIBRATION_H100_RECONFIGURED = Calibration(
    forward_const_bytes=98962.58132262375, forward_hidden_bytes=7.99560761992533,
    forward_intermediate_bytes=6.001154310030951, logits_bytes=6.008116683072934,
    non_torch_bytes=829926058, other_bytes=33816576,
    source="data/planner/calibration_h100.json, section fit_reconfigured")


# ----- model shape -> bytes ------------------------------------------------------------------------

def resolve_model(model) -> tuple[str, ModelSpec]:
    """(name, ModelSpec) of a preset name, an HF config (object or dict), a checkpoint folder or a ModelSpec."""
    if isinstance(model, ModelSpec):
        return model.model_type, model
    if isinstance(model, (str, Path)):
        return (str(model) if str(model) in LLM.presets() else Path(model).name), LLM.model_spec(model)
    name = model.get("_name_or_path") if isinstance(model, dict) else getattr(model, "name_or_path", "")
    return name or "hf-config", LLM.model_spec(model)


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not allowed: use one of {sorted(DTYPE_BYTES)}")
    return name


def _linear_bytes(out_features: int, in_features: int, quantization: str | None, dtype_bytes: int) -> int:
    """Bytes of one linear weight [out, in] in engine/quant's formats."""
    n = out_features * in_features
    if quantization is None:
        return n * dtype_bytes
    if quantization in ("int8", "fp8"):  # one byte per weight, one float32 scale per output channel
        return n + out_features * 4
    if quantization in ("int4", "awq", "gptq"):  # two weights per byte; per group of 128 inputs a scale, a uint8 zero
        return n // 2 + out_features * (in_features // QUANT_GROUP_SIZE) * (dtype_bytes + 1)
    raise ValueError(f"quantization={quantization!r} is not allowed: use None, 'int8', 'int4', 'awq', 'gptq' or 'fp8'")


def _linears(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(out, in) of the linear layers engine/quant quantizes: each layer's four, and an untied LM head."""
    h, d, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    layer = {"qkv_proj": (q + 2 * kv, h), "o_proj": (h, q), "gate_up_proj": (2 * inter, h), "down_proj": (h, inter)}
    return {**layer, **({} if spec.tie_word_embeddings else {"lm_head": (spec.vocab_size, h)})}


def weight_bytes(spec: ModelSpec, quantization: str | None = None, dtype="bfloat16",
                 tensor_parallel_size: int = 1) -> int:
    """Weight bytes on one GPU, as engine/quant stores them: the decoder's linear layers and an untied LM
    head quantized, an untied embedding table in int8 per row; norms, biases and a tied embedding (the LM
    head too) in the model dtype.

    With tensor_parallel_size > 1, linear layers, embeddings and LM head are split, norms replicated.
    For quantization=None and tp=1 this equals spec.num_params() x dtype bytes.
    """
    e, tp = DTYPE_BYTES[_dtype_name(dtype)], tensor_parallel_size
    shapes = _linears(spec)
    lm_head = shapes.pop("lm_head", None)
    per_layer = sum(_linear_bytes(o, i, quantization, e) for o, i in shapes.values())
    bias = shapes["qkv_proj"][0] * e if spec.attention_bias else 0
    embedding = quantized_embedding_bytes(spec.vocab_size, spec.hidden_size) \
        if quantization is not None and lm_head is not None else spec.vocab_size * spec.hidden_size * e
    sharded = spec.num_layers * (per_layer + bias) + embedding
    if lm_head is not None:
        sharded += _linear_bytes(*lm_head, LM_HEAD_MODE.get(quantization, quantization), e)
    norms = (spec.num_layers * 2 + 1) * spec.hidden_size * e
    # What the formula above does not model (MoE experts and routers, q/k and Gemma's extra norms), from the
    # spec's own count; experts stay in the model dtype (engine/quant swaps nn.Linear only) and are split.
    plain = spec.num_layers * (sum(o * i for o, i in shapes.values()) * e + bias) \
        + spec.vocab_size * spec.hidden_size * e * (1 if lm_head is None else 2) + norms
    extra = spec.weight_bytes(e) - plain
    return -(-sharded // tp) + norms + (-(-extra // tp) if extra > 0 else extra)


def kv_heads_per_gpu(spec: ModelSpec, tensor_parallel_size: int = 1) -> int:
    """KV heads each GPU holds: split across GPUs, replicated when there are fewer heads than GPUs."""
    return max(1, spec.num_kv_heads // tensor_parallel_size)


def kv_bytes_per_token(spec: ModelSpec, kv_cache_dtype: str = "auto", dtype="bfloat16",
                       tensor_parallel_size: int = 1) -> int:
    """K and V bytes of one token over all layers, on one GPU ("auto" = model dtype, "fp8" = 1 byte)."""
    e = KV_DTYPE_BYTES.get(kv_cache_dtype) or DTYPE_BYTES[_dtype_name(dtype)]
    return 2 * spec.num_layers * kv_heads_per_gpu(spec, tensor_parallel_size) * spec.head_dim * e


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _alloc(nbytes: int) -> int:
    return _cdiv(nbytes, 512) * 512  # torch's caching allocator rounds every block up to 512 bytes


def _profile_shape(cfg: EngineConfig) -> tuple[int, int]:
    """(tokens, sequences) of the engine's prefill profile: max_num_batched_tokens over min(max_num_seqs, tokens)
    sequences, no sequence longer than max_model_len (ModelRunner._profile_prefill)."""
    seqs = max(1, min(cfg.max_num_seqs, cfg.max_num_batched_tokens))
    return min(cfg.max_num_batched_tokens, seqs * cfg.max_model_len), seqs


def forward_peak_bytes(spec: ModelSpec, cfg: EngineConfig, dtype="bfloat16", calibration: Calibration | None = None,
                       tensor_parallel_size: int = 1) -> int:
    """Peak activation bytes of the engine's worst-case profile (calibrated; see Calibration): the larger of the
    MLP of the prefill's tokens and the LM head (float32 logits) over min(max_num_seqs, tokens) rows, which the
    prefill and the max_num_seqs-row decode both reach."""
    c, tp = calibration or CALIBRATION_H100, tensor_parallel_size
    e = DTYPE_BYTES[_dtype_name(dtype)]
    t, s = _profile_shape(cfg)
    h = spec.hidden_size
    mlp = t * (c.forward_hidden_bytes * h + c.forward_intermediate_bytes * spec.intermediate_size / tp) * e / 2
    # 16-bit logits and their float32 copy (logits_bytes = 2 + 4); float32 logits need no copy.
    per_logit = c.logits_bytes * (e + (4 if e < 4 else 0)) / 6
    logits = s * spec.vocab_size / tp * per_logit + (t + s) * h * e
    return int(c.forward_const_bytes + max(mlp, logits) + dequant_slice_bytes(spec, cfg, e, tp))


def dequant_slice_bytes(spec: ModelSpec, cfg: EngineConfig, dtype_bytes: int, tensor_parallel_size: int = 1) -> int:
    """The float weight slice an int8 / int4 / AWQ / GPTQ linear holds while it multiplies a prefill chunk
    (engine.quant.dequant_mm, from DEQUANT_MIN_ROWS rows): whole output channels of the widest layer on one GPU
    (column-parallel layers split their outputs, row-parallel ones their inputs), as dequant_mm.slice_rows cuts them."""
    if cfg.quantization not in ("int8", "int4", "awq", "gptq") or cfg.max_num_batched_tokens < DEQUANT_MIN_ROWS:
        return 0
    tp = tensor_parallel_size
    row_parallel = ("o_proj", "down_proj")
    largest = 0
    for name, (out_f, in_f) in _linears(spec).items():
        n, k = (out_f, in_f // tp) if name in row_parallel else (out_f // tp, in_f)
        largest = max(largest, min(n, slice_rows(k, dtype_bytes)) * k * dtype_bytes)
    return largest


def graph_pool_bytes(spec: ModelSpec, cfg: EngineConfig, dtype="bfloat16", calibration: Calibration | None = None,
                     tensor_parallel_size: int = 1) -> int:
    """The CUDA-graph pool the engine measures (0 with enforce_eager): the largest decode graph's forward of
    min(max_num_seqs, max_num_batched_tokens) rows, without the LM head (the engine runs that eagerly), and from
    DEQUANT_MIN_ROWS rows under int modes a float weight slice (dequant_slice_bytes; from 65 to 256 rows only where
    tuning picks that path, so counted there too: the block count errs low rather than high)."""
    if cfg.enforce_eager:
        return 0
    c, tp = calibration or CALIBRATION_H100, tensor_parallel_size
    e = DTYPE_BYTES[_dtype_name(dtype)]
    rows = max(1, min(cfg.max_num_seqs, cfg.max_num_batched_tokens))
    per_row = c.forward_hidden_bytes * spec.hidden_size + c.forward_intermediate_bytes * spec.intermediate_size / tp
    slice_ = dequant_slice_bytes(spec, cfg, e, tp) if rows >= DEQUANT_MIN_ROWS else 0
    return _alloc(int(rows * per_row * e / 2)) + slice_


def static_bytes(spec: ModelSpec, cfg: EngineConfig, dtype="bfloat16", num_kv_groups: int = 1,
                 tensor_parallel_size: int = 1) -> int:
    """Torch allocations besides weights made before the profile: rotary cos/sin (float32), input buffers (with
    num_kv_groups KV cache groups, a block table and a slot mapping per group), under tensor parallelism each
    rank's int64 staging buffer of a step's inputs (engine/distributed/step_broadcast.py, every group's tables and
    slot mappings included) and, with CUDA graphs, the graphs' hidden-state output buffer."""
    rotary = 2 * _alloc(spec.max_position_embeddings * spec.head_dim * 4)
    tokens, seqs = cfg.max_num_batched_tokens, cfg.max_num_seqs
    blocks_per_seq = -(-cfg.max_model_len // cfg.block_size)
    buffers = 3 * _alloc(tokens * 8) + _alloc((seqs + 1) * 4) + _alloc(seqs * 4) + _alloc(seqs * blocks_per_seq * 4)
    if num_kv_groups > 1:
        buffers += _alloc((num_kv_groups - 1) * seqs * blocks_per_seq * 4) + _alloc((num_kv_groups - 1) * tokens * 8)
    if tensor_parallel_size > 1:
        table = seqs * blocks_per_seq
        buffers += _alloc((3 * tokens + 2 * seqs + 1 + table + (num_kv_groups - 1) * (table + tokens)) * 8)
    hidden = 0 if cfg.enforce_eager else _alloc(min(seqs, tokens) * spec.hidden_size * DTYPE_BYTES[_dtype_name(dtype)])
    return rotary + buffers + hidden


# ----- the plan ------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What one config needs on one GPU (bytes unless named otherwise) and the verdict, with its reason.

    The verdict, reason, kv_cache_bytes and num_gpu_blocks come from the engine's rule (LLM.size_kv_cache).
    load_bytes: the weights in the model dtype, which the engine builds on the GPU before quantizing
    (its start-up check). activation_peak_bytes estimates MemoryProfile.peak_activation_bytes, graph_pool_bytes
    MemoryProfile.graph_pool_bytes. kv_tokens = num_gpu_blocks x block_size (/ the number of KV cache groups of
    a sliding-window model, whose blocks each hold 1/num_groups of the layers: tokens of every layer);
    max_concurrent_requests: requests of max_model_len tokens whose KV fits at once (a sliding layer keeping its
    window's blocks only); largest_max_model_len: the longest request the pool holds.
    headroom_bytes: memory outside the engine's budget, (1 - util) x total. knobs: single changes that would
    make a failing plan fit (each checked by planning it). draft_model, draft_bytes, draft_num_gpu_blocks: a
    speculative draft model's engine (on a GPU): its weights, other memory and KV pool, which the target's sizing
    counts as other memory, and its pool's blocks; a draft that does not fit its share gives the plan its verdict.
    """

    model: str
    gpu: str
    total_bytes: int
    dtype: str
    quantization: str | None
    kv_cache_dtype: str
    tensor_parallel_size: int
    gpu_memory_utilization: float
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    enforce_eager: bool
    load_bytes: int
    weight_bytes: int
    weight_bytes_by_mode: dict
    kv_bytes_per_token: int
    kv_bytes_per_token_by_dtype: dict
    static_bytes: int
    forward_peak_bytes: int
    activation_peak_bytes: int
    graph_pool_bytes: int
    non_torch_bytes: int
    margin_bytes: int
    budget_bytes: int
    kv_cache_bytes: int
    num_gpu_blocks: int
    kv_tokens: int
    max_concurrent_requests: int
    largest_max_model_len: int
    headroom_bytes: int
    verdict: str
    reason: str
    knobs: list = field(default_factory=list)
    draft_model: str | None = None
    draft_bytes: int = 0
    draft_num_gpu_blocks: int = 0

    @property
    def fits(self) -> bool:
        return self.verdict == "fits"

    def to_dict(self) -> dict:
        """A flat row: per-mode weight bytes and per-dtype KV bytes as columns, other_bytes (static +
        non-torch + margin), knobs joined by '; '."""
        d = asdict(self)
        d["quantization"] = d["quantization"] or "none"
        d.update({f"weight_bytes_{m}": b for m, b in d.pop("weight_bytes_by_mode").items()})
        d.update({f"kv_bytes_per_token_{k}": b for k, b in d.pop("kv_bytes_per_token_by_dtype").items()})
        d["other_bytes"] = self.static_bytes + self.non_torch_bytes + self.graph_pool_bytes + self.margin_bytes \
            + self.draft_bytes
        d["knobs"] = "; ".join(self.knobs)
        return d


def _gpu_key(text: str) -> str:
    """A GPU name reduced to letters and digits, without the vendor and the memory type: "NVIDIA H100 80GB HBM3",
    "h100-80gb" and "H100 80GB" all give "h10080gb"."""
    key = re.sub(r"[^a-z0-9]", "", text.lower()).removeprefix("nvidia")
    return re.sub(r"(hbm3e?|hbm2e?|sxm\d?)$", "", key)


# Common spellings of the GPUS entries (after _gpu_key); the bare model name where it has one memory size.
GPU_ALIASES = {"h100": "H100-80GB", "h100sxm": "H100-80GB", "h200141gb": "H200", "a10080gbsxm": "A100-80GB",
               "l40s48gb": "L40S", "l424gb": "L4", "a10g24gb": "A10G"}


def resolve_gpu(gpu) -> GPU:
    """A GPUS name in any common spelling ("H100", "H100 80GB", "h100-80gb", "NVIDIA H200"), "current" (this
    machine's GPU), "cpu" (the engine's CPU pool), bytes, or "80GiB" / "24GB"."""
    if isinstance(gpu, GPU):
        return gpu
    if isinstance(gpu, (int, float)) and not isinstance(gpu, bool):
        return GPU(f"{gpu / GiB:.1f}GiB", int(gpu), None, "given in bytes")
    text = str(gpu)
    if text in GPUS:
        return GPUS[text]
    if text.lower() == "cpu":
        return GPU("cpu", LLM.CPU_KV_BUDGET_BYTES, None, "the engine's CPU pool budget (LLM.CPU_KV_BUDGET_BYTES)")
    if text.lower() == "current":
        import torch
        if not torch.cuda.is_available():
            raise ValueError("gpu='current' needs a CUDA GPU: name one of GPUS or give its memory in bytes")
        return GPU(torch.cuda.get_device_name(), torch.cuda.mem_get_info()[1], torch.cuda.get_device_capability(),
                   "read from this machine (cudaMemGetInfo)")
    m = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|MiB|MB)\s*", text)
    if m:
        unit = {"GiB": GiB, "GB": 10**9, "MiB": MiB, "MB": 10**6}[m.group(2)]
        return GPU(text.strip(), int(float(m.group(1)) * unit), None, "given")
    key = _gpu_key(text)
    by_key = {_gpu_key(name): name for name in GPUS}
    name = by_key.get(key) or GPU_ALIASES.get(key)
    if name is not None:
        return GPUS[name]
    if key == "a100":
        raise ValueError(f"gpu={gpu!r} is ambiguous: the A100 has 40 GB and 80 GB models; use 'A100-40GB' or "
                         "'A100-80GB'")
    raise ValueError(f"gpu={gpu!r} is unknown: use one of {sorted(GPUS)} (any common spelling, e.g. 'H100 80GB'), "
                     "'current', 'cpu', bytes or e.g. '48GiB'")


def _check_allowed(spec: ModelSpec, gpu: GPU, cfg: EngineConfig, tp: int = 1) -> None:
    """Raise ValueError for configs the engine refuses outright, whatever the memory."""
    LLM.check_config(spec, cfg.replace(tensor_parallel_size=tp))  # quantization, head counts, max_model_len
    if cfg.quantization == "fp8" and (gpu.name == "cpu" or (gpu.compute_capability or (9, 0)) < (8, 9)):
        raise ValueError(f"quantization='fp8' needs fp8 tensor cores (compute capability >= 8.9), which {gpu.name} "
                         "lacks: use quantization='int8' or 'int4'")


def _draft_plan(gpu: GPU, cfg: EngineConfig, dtype: str, cal: Calibration, target_bytes: int) -> Plan:
    """The plan of cfg's speculative draft model on a GPU. The engine builds the draft's engine after the target's
    weights and before the target's pool (engine/llm.py, LLM._draft_engine), with LLM.draft_config at the share of
    the device LLM.draft_memory_share gives: what is in use then (target_bytes that torch holds and the CUDA
    context) plus a fixed extra. The target's bytes count as the draft's other memory."""
    name, spec = resolve_model(cfg.speculative_model)
    in_use = target_bytes + cal.non_torch_bytes
    share = LLM.draft_memory_share(gpu_memory_utilization=cfg.gpu_memory_utilization, total_bytes=gpu.total_bytes,
                                   free_bytes=gpu.total_bytes - in_use, reserved_bytes=target_bytes,
                                   allocated_bytes=target_bytes)
    return _size(spec, name, gpu, LLM.draft_config(cfg, spec, share), 1, dtype, cal, resident_bytes=target_bytes)


def _size(spec: ModelSpec, name: str, gpu: GPU, cfg: EngineConfig, tp: int, dtype: str, cal: Calibration,
          resident_bytes: int = 0) -> Plan:
    """The numbers and the verdict of one config, without knobs: the planner's estimates through the engine's rule.
    resident_bytes: what another engine of the process holds when this one sizes its pool (a draft model's, or
    the target's for the draft), which the engine measures as its other memory."""
    on_cpu = gpu.name == "cpu"
    total, util = gpu.total_bytes, cfg.gpu_memory_utilization
    modes = {m or "none": weight_bytes(spec, m, dtype, tp) for m in (None, "int8", "int4", "awq", "gptq", "fp8")}
    kv_by = {k: kv_bytes_per_token(spec, k, dtype, tp) for k in ("auto", "fp8")}
    load, weights, kv_token = modes["none"], modes[cfg.quantization or "none"], kv_by[cfg.kv_cache_dtype]
    # Sliding-window models: blocks per KV cache group, as the engine keeps them (engine/kv/groups.py).
    groups = LLM.kv_cache_groups(spec.layer_windows, spec.num_layers, tp)
    windows = tuple(g.sliding_window for g in groups) if groups else None
    static = fwd = graphs = non_torch = 0
    if not on_cpu:
        static = static_bytes(spec, cfg, dtype, len(windows) if windows else 1, tp) + cal.other_bytes
        fwd = forward_peak_bytes(spec, cfg, dtype, cal, tp)
        graphs = graph_pool_bytes(spec, cfg, dtype, cal, tp)
        non_torch = cal.non_torch_bytes
    draft, draft_bytes = None, 0
    if not on_cpu and cfg.speculative_method in ("draft", "synthetic") and cfg.speculative_model is not None:
        draft = _draft_plan(gpu, cfg, dtype, cal, weights + static)
        draft_bytes = draft.weight_bytes + draft.static_bytes + draft.kv_cache_bytes
    sizing = LLM.size_kv_cache(
        total_bytes=total, gpu_memory_utilization=util, weight_bytes=weights, kv_bytes_per_token=kv_token,
        block_size=cfg.block_size, max_model_len=cfg.max_model_len, other_bytes=static + resident_bytes + draft_bytes,
        activation_peak_bytes=fwd, graph_pool_bytes=graphs, non_torch_bytes=non_torch,
        num_gpu_blocks=cfg.num_gpu_blocks, load_bytes=load, max_positions=spec.max_position_embeddings,
        device="cpu" if on_cpu else "cuda", group_windows=windows, chunk_tokens=cfg.max_num_batched_tokens)
    blocks = sizing.num_blocks if sizing.verdict in ("fits", VERDICTS[2]) else 0
    # A request of max_model_len holds this many blocks between steps (all its blocks in a full group, its
    # window's in a sliding one).
    per_request = LLM.request_kv_blocks(windows or (None,), cfg.max_model_len, cfg.block_size)
    p = Plan(
        model=name, gpu=gpu.name, total_bytes=total, dtype=dtype, quantization=cfg.quantization,
        kv_cache_dtype=cfg.kv_cache_dtype, tensor_parallel_size=tp, gpu_memory_utilization=util,
        block_size=cfg.block_size, max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
        max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager, load_bytes=load, weight_bytes=weights,
        weight_bytes_by_mode=modes, kv_bytes_per_token=kv_token, kv_bytes_per_token_by_dtype=kv_by,
        static_bytes=static, forward_peak_bytes=fwd, activation_peak_bytes=fwd, graph_pool_bytes=graphs,
        non_torch_bytes=non_torch, margin_bytes=sizing.margin_bytes, budget_bytes=sizing.budget_bytes,
        kv_cache_bytes=sizing.kv_cache_bytes, num_gpu_blocks=blocks,
        kv_tokens=blocks * cfg.block_size // (len(windows) if windows else 1),
        max_concurrent_requests=blocks // per_request, largest_max_model_len=sizing.largest_max_model_len,
        headroom_bytes=0 if on_cpu else total - sizing.budget_bytes, verdict=sizing.verdict, reason=sizing.reason,
        draft_model=None if draft is None else draft.model, draft_bytes=draft_bytes,
        draft_num_gpu_blocks=0 if draft is None else draft.num_gpu_blocks)
    if draft is not None and not draft.fits:
        p.verdict, p.reason = draft.verdict, f"the draft model (speculative_model={cfg.speculative_model!r}, " \
            f"{draft.gpu_memory_utilization:.3f} of the device): {draft.reason}"
    return p


def _knobs(spec: ModelSpec, name: str, gpu: GPU, cfg: EngineConfig, tp: int, dtype: str, cal: Calibration,
           p: Plan) -> list[str]:
    """Single changes that turn a failing plan into one that fits, each checked by planning it."""
    allowed = {(cfg.quantization, tp, cfg.max_model_len): True}  # what _check_allowed looks at -> its answer

    def fits(c: EngineConfig = cfg, t: int = tp) -> bool:
        key = (c.quantization, t, c.max_model_len)
        if key not in allowed:
            try:
                _check_allowed(spec, gpu, c, t)
                allowed[key] = True
            except ValueError:
                allowed[key] = False
        return allowed[key] and _size(spec, name, gpu, c, t, dtype, cal).fits

    knobs = []
    if p.verdict == VERDICTS[3]:
        most = _size(spec, name, gpu, cfg.replace(num_gpu_blocks=None), tp, dtype, cal)
        if most.num_gpu_blocks >= 1 and fits(cfg.replace(num_gpu_blocks=most.num_gpu_blocks)):
            knobs.append(f"lower num_gpu_blocks to {most.num_gpu_blocks} or less")
        if fits(cfg.replace(num_gpu_blocks=None)):
            knobs.append("leave num_gpu_blocks=None (sized from memory)")
    if p.verdict == VERDICTS[2] and p.largest_max_model_len > 0 and fits(
            cfg.replace(max_model_len=p.largest_max_model_len)):
        knobs.append(f"lower max_model_len to {p.largest_max_model_len} or less")
    shares = [u / 100 for u in range(1, 101)]
    higher = [u for u in shares if u > p.gpu_memory_utilization and fits(cfg.replace(gpu_memory_utilization=u))]
    if higher:
        knobs.append(f"raise gpu_memory_utilization to {higher[0]:.2f}")
    quant = [f"quantization={m!r}" for m in ("int8", "fp8", "int4")
             if m != cfg.quantization and fits(cfg.replace(quantization=m))]
    if cfg.kv_cache_dtype != "fp8" and fits(cfg.replace(kv_cache_dtype="fp8")):
        quant.append("kv_cache_dtype='fp8'")
    if quant:
        knobs.append("quantize: " + " or ".join(quant))
    if cfg.max_num_batched_tokens > 2048 and fits(cfg.replace(max_num_batched_tokens=2048)):
        knobs.append("lower max_num_batched_tokens to 2048 (a smaller activation peak)")
    if cfg.max_num_seqs > 256 and fits(cfg.replace(max_num_seqs=256)):
        knobs.append("lower max_num_seqs to 256 (smaller logits and CUDA graphs)")
    if not cfg.enforce_eager and gpu.name != "cpu" and fits(cfg.replace(enforce_eager=True)):
        knobs.append("enforce_eager=True (no CUDA-graph pool)")
    more = next((n for n in (2, 4, 8) if n > tp and fits(t=n)), None)
    if more:
        knobs.append(f"add GPUs: tensor_parallel_size={more}")
    return knobs


def plan(model, gpu, cfg: EngineConfig | None = None, tensor_parallel_size: int | None = None, dtype=None,
         calibration: Calibration | None = None) -> Plan:
    """Plan `cfg` for `model` (preset name, HF config, checkpoint folder or ModelSpec) on `gpu` (see resolve_gpu).

    tensor_parallel_size defaults to cfg.tensor_parallel_size; dtype to the engine's default (bfloat16 on a
    GPU, float32 on "cpu"); calibration to CALIBRATION_H100. Raises ValueError where the engine refuses the
    config whatever the memory (max_model_len past the model's positions, int4 shapes, fp8 without fp8 units).
    """
    cfg = cfg or EngineConfig()
    tp = tensor_parallel_size or cfg.tensor_parallel_size
    name, spec = resolve_model(model)
    g = resolve_gpu(gpu)
    dtype = _dtype_name(dtype or ("float32" if g.name == "cpu" else "bfloat16"))
    # max_model_len=None: the model's context; batch limits None: picked from this GPU's memory, as the engine does
    cfg = LLM.resolve_config(spec, cfg, total_bytes=None if g.name == "cpu" else g.total_bytes, device_name=g.name)
    _check_allowed(spec, g, cfg, tp)
    cal = calibration or CALIBRATION_H100
    p = _size(spec, name, g, cfg, tp, dtype, cal)
    if not p.fits:
        p.knobs = _knobs(spec, name, g, cfg, tp, dtype, cal, p)
        if p.knobs:
            p.reason += ". Fix: " + "; ".join(p.knobs)
    return p


def plan_table(models, gpus, configs, tensor_parallel_sizes=(None,), dtype=None,
               calibration: Calibration | None = None):
    """A pandas DataFrame with one row per (model, gpu, config, tensor_parallel_size): Plan.to_dict() plus
    config_index. configs: EngineConfigs or dicts of EngineConfig fields. A config the engine refuses
    outright gets verdict "not allowed" and the engine's reason."""
    import pandas as pd

    models = [models] if isinstance(models, (str, Path, ModelSpec)) else list(models)
    gpus = [gpus] if isinstance(gpus, (str, int, float, GPU)) else list(gpus)
    configs = [configs] if isinstance(configs, (EngineConfig, dict)) else list(configs)
    rows = []
    for m in models:
        for g in gpus:
            for i, c in enumerate(configs):
                cfg = c if isinstance(c, EngineConfig) else EngineConfig(**c)
                for tp in tensor_parallel_sizes:
                    try:
                        row = plan(m, g, cfg, tp, dtype, calibration).to_dict()
                    except ValueError as exc:
                        row = {"model": resolve_model(m)[0], "gpu": resolve_gpu(g).name,
                               "quantization": cfg.quantization or "none", "kv_cache_dtype": cfg.kv_cache_dtype,
                               "tensor_parallel_size": tp or cfg.tensor_parallel_size, "verdict": "not allowed",
                               "reason": str(exc), "kv_tokens": 0, "num_gpu_blocks": 0}
                    rows.append({"config_index": i, **row})
    return pd.DataFrame(rows)
