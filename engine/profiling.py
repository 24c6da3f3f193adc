"""Deep mode (profile="kernels"): torch.profiler over a window of engine steps, device time by kernel class.

On CUDA the profiled events are the device kernels (and memcpys); on the CPU, where there are no
kernels, they are the aten ops (nested as they call each other), and a class is given each op's
self time (its own time, without the ops it called), so that nested ops are not counted twice.
Each event gets one class of KERNEL_CLASSES by its name (`classify`).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch

KERNEL_CLASSES = ("attention_prefill", "attention_decode", "gemm", "norm_rotary_act", "sampler", "kv_write",
                  "communication", "memcpy", "other")

# First match wins: the order settles names that fit two patterns (a fused rotary + KV write is a KV write).
_RULES = [
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|c10d"),
    ("memcpy", r"memcpy|memset|copy_?htod|copy_?dtoh|aten::copy_|aten::to\b|aten::_to_copy"),
    ("attention_decode", r"decode"),
    # The torch backend's attention (CPU) is einsum + softmax, prefill and decode alike: it counts as prefill.
    ("attention_prefill", r"prefill|attention|attn|flash|fmha|sdpa|scaled_dot_product|aten::bmm|aten::baddbmm"
                          r"|einsum|softmax"),
    ("kv_write", r"write_kv|reshape_and_cache|index_put|index_copy|scatter"),
    ("other", r"route|routing"),  # MoE routing picks experts with a top-k: not the sampler's
    ("sampler", r"argmax|argmin|topk|sort|multinomial|aten::max\b|exponential"),
    # The quantized linears' own kernels (dot, dp4a, MMA, tensor-core and dequantize kernels, and the quantization
    # of their activations) count as GEMM time, as cuBLAS's do for bf16.
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|cublas|matmul|_mm_kernel|splitk|aten::mm\b|aten::addmm|aten::linear"
             r"|_dot_kernel|dp4a|_mma|_tc_kernel|dequant|limbs|quantize|per_token"),
    ("norm_rotary_act", r"norm|rms|rotary|rope|silu|gelu|act|elementwise|aten::mul|aten::add|aten::neg|aten::cat"
                        r"|aten::pow|aten::mean|aten::rsqrt|aten::sigmoid|aten::embedding|aten::index_select"),
]
_COMPILED = [(cls, re.compile(pat, re.IGNORECASE)) for cls, pat in _RULES]


def classify(name: str) -> str:
    """The class (one of KERNEL_CLASSES) of a kernel or aten op by its name."""
    for cls, pattern in _COMPILED:
        if pattern.search(name):
            return cls
    return "other"


@dataclass
class KernelProfile:
    """Kernels of profiled steps [first_step, last_step]: (name, class, start, duration, self time) in
    seconds, start relative to the first kernel; self time is the duration less nested events (CPU ops), and
    for device kernels the part of its time no earlier kernel covered: with programmatic dependent launch
    (engine.kernels.pdl) a kernel starts while the one before it still runs, and that overlap counts once, for
    the earlier kernel, so the classes add up to the busy time. window: from the first kernel's start to the
    last one's end."""

    first_step: int
    last_step: int
    device: str
    kernels: list[tuple[str, str, float, float, float]] = field(default_factory=list)
    overhead: float = 0.0  # host seconds the profiler itself took (starting, stopping, reading its events)
    overhead_spans: list[tuple[float, float]] = field(default_factory=list)  # those seconds, perf_counter spans

    def overhead_within(self, start: float, end: float) -> float:
        """Seconds of the profiler's own host time inside [start, end] (perf_counter seconds)."""
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in self.overhead_spans)

    @property
    def window(self) -> float:
        return max((k[2] + k[3] for k in self.kernels), default=0.0)

    def busy_time(self) -> float:
        """Seconds at least one kernel ran (overlapping kernels counted once)."""
        busy, end = 0.0, 0.0
        for s, d in sorted((k[2], k[3]) for k in self.kernels):
            if s + d > end:
                busy += s + d - max(s, end)
                end = s + d
        return busy

    def by_class(self) -> dict[str, float]:
        """Seconds of kernel (self) time per class, plus "idle": the window's seconds with no kernel running."""
        out = {cls: 0.0 for cls in KERNEL_CLASSES}
        for k in self.kernels:
            out[k[1]] += k[4]
        out["idle"] = max(self.window - self.busy_time(), 0.0)
        return out


class KernelProfiler:
    """torch.profiler over engine steps [first_step, first_step + num_steps) (num_steps None: until stop()).

    Invariant: the profiler runs from before_step(first_step) until after_step(last step) or stop(),
    never across a reset of the engine's counters (step indices restart there).
    """

    def __init__(self, device: torch.device, first_step: int = 0, num_steps: int | None = None):
        if first_step < 0:
            raise ValueError(f"first_step={first_step} must be >= 0")
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1 (or None: until the run ends)")
        self.device = device
        self.first_step, self.num_steps = first_step, num_steps
        self.prof = None
        self.steps_seen: list[int] = []
        self.result: KernelProfile | None = None
        self.overhead_spans: list[tuple[float, float]] = []

    def before_step(self, step: int) -> None:
        if self.prof is None and self.result is None and step >= self.first_step:
            t0 = time.perf_counter()
            # On CUDA only the device's activity: the host's ops would multiply the events to read back.
            activities = [torch.profiler.ProfilerActivity.CUDA if self.device.type == "cuda"
                          else torch.profiler.ProfilerActivity.CPU]
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self.overhead_spans.append((t0, time.perf_counter()))

    def after_step(self, step: int) -> bool:
        """Note a finished step; True when the window is complete (the profile is then in `result`)."""
        if self.prof is None:
            return False
        self.steps_seen.append(step)
        if self.num_steps is not None and len(self.steps_seen) >= self.num_steps:
            self.stop()
            return True
        return False

    def stop(self) -> KernelProfile | None:
        if self.prof is None:
            return self.result
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prof.__exit__(None, None, None)
        events = self.prof.events()
        self.prof = None
        first = self.steps_seen[0] if self.steps_seen else self.first_step
        last = self.steps_seen[-1] if self.steps_seen else first - 1
        kernels = _kernels(events, self.device.type == "cuda")
        self.overhead_spans.append((t0, time.perf_counter()))
        self.result = KernelProfile(first, last, self.device.type, kernels,
                                    sum(b - a for a, b in self.overhead_spans), list(self.overhead_spans))
        return self.result


def _kernels(events, cuda: bool) -> list[tuple[str, str, float, float, float]]:
    rows = []
    for e in events:
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
        elif not e.name.startswith("aten::"):
            continue
        start, dur = e.time_range.start / 1e6, (e.time_range.end - e.time_range.start) / 1e6
        rows.append((e.name, classify(e.name), start, dur, dur if cuda else e.self_cpu_time_total / 1e6))
    if not rows:
        return []
    rows.sort(key=lambda r: r[2])
    t0 = rows[0][2]
    if cuda:  # a kernel's self time: what of it no earlier kernel covered (see KernelProfile)
        covered, own = t0, []
        for _, _, s, d, _ in rows:
            own.append(max(0.0, s + d - max(s, covered)))
            covered = max(covered, s + d)
        rows = [(n, c, s, d, o) for (n, c, s, d, _), o in zip(rows, own)]
    return [(n, c, s - t0, d, own) for n, c, s, d, own in rows]
