"""Triton JIT compilations seen by this process: which kernel variant was built, when, and how long it took.

Triton builds a kernel the first time a launch needs a variant it has not built in this process: a new
constexpr (a block size, a split count's padding), or a new specialization of an argument (an integer
equal to 1 or divisible by 16, a pointer aligned to 16 bytes). Building takes up to seconds (2.4 s for the
prefill kernel on an H200; milliseconds when Triton's disk cache has it), and the GPU idles meanwhile; a measurement that contains a build reads
slower than the engine is. `install()` hooks Triton's JIT (knobs.runtime.jit_cache_hook, called before
a build, and jit_post_compile_hook, after) and `events` keeps one CompileEvent per build, so
EngineStats can say how many builds fell inside its window.

Invariants: events only grows (readers keep an index into it); install() is idempotent and chains any
hooks installed before it; without those knobs (older Triton) nothing is recorded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class CompileEvent:
    kernel: str       # the kernel's function name
    seconds: float    # from the cache miss to the built kernel (a disk-cache hit is fast)
    time: float       # time.perf_counter() when the build finished
    variant: str = ""  # Triton's description: launch options and each argument's type and specialization


events: list[CompileEvent] = []
_started: dict[str, float] = {}
_installed = False


def install() -> bool:
    """Hook Triton's JIT once per process; True if the hooks are in place."""
    global _installed
    if _installed:
        return True
    try:
        from triton import knobs
        runtime = knobs.runtime
        before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    except (ImportError, AttributeError):
        return False

    def on_miss(*args, **kwargs):
        _started[_name(kwargs)] = time.perf_counter()
        return before(*args, **kwargs) if before else None  # truthy would skip the build

    def on_built(*args, **kwargs):
        name, now = _name(kwargs), time.perf_counter()
        events.append(CompileEvent(name, now - _started.pop(name, now), now, str(kwargs.get("repr", ""))))
        return after(*args, **kwargs) if after else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = on_miss, on_built
    _installed = True
    return True


def _name(kwargs: dict) -> str:
    fn = kwargs.get("fn")
    return getattr(fn, "name", None) or str(kwargs.get("repr", "?")).split("[", 1)[0]
