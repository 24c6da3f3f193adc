"""Launch-configuration choice for the dequantizing matmuls, measured once per shape on the device.

Why measured: which tile, split-K and pipelining depth is fastest for a decode GEMV depends on the
shape (a 4096-wide layer must be split over K to fill 132 SMs, a 128k-wide LM head must not) and on
the GPU, and timings taken with ordinary launches are dominated by host launch overhead at these
sizes. So the first call for a (kernel, rows, N, K, dtype) key on CUDA times every candidate by
replaying a CUDA graph of its launches (device time, including the extra kernel a split-K candidate
launches), over enough copies of the weights to overflow L2, and keeps the fastest for the life of
the process.

Invariants: `chosen` maps a key to the config every later call with that key uses; `timings` keeps
the measured milliseconds per candidate and `seconds` the tuning's wall time, for benchmarks to
record; a candidate whose output differs from the first candidate's (tuning.agrees), on the activations given
and on them scaled past float16's range (bfloat16 / float32 ones), or that fails to build is timed as inf and
never chosen.
No tuning happens off CUDA,
while a CUDA graph is being captured (the first candidate is used then, without caching), or when
ENGINE_QUANT_AUTOTUNE=0; the first candidate is the shape heuristic.

Choices persist on disk across processes (a notebook's restarted kernel, a sweep's Ray workers, the command
line): one JSON file per GPU model, SM count, torch and Triton version and hash of the kernels' source
(engine/quant, engine/kernels), in ENGINE_TUNING_CACHE (default ~/.cache/paged-workbench/tuning; "0" turns it
off). A stored choice is used only while it is still one of the key's candidates; timings and seconds stay empty
for such a key. A process reads the file once, and writes it (merged with what other processes wrote) after each
key it tuned.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

chosen: dict[tuple, dict] = {}
timings: dict[tuple, list[tuple[dict, float]]] = {}
seconds: dict[tuple, float] = {}  # wall time the tuning of a key took (compiles included)
_stored: dict[str, dict[str, dict]] = {}  # per cache file: repr(key) -> config, as read from disk (and written)


def pick(key: tuple, candidates: list[dict] | Callable[[], list[dict]], launch: Callable[..., object],
         arg_sets: Callable[[], list[tuple]], device: torch.device) -> dict:
    """The config of `candidates` to use for `key`. launch(cfg, *args) runs the kernel(s) once;
    arg_sets() gives argument tuples whose weights together overflow the L2 cache, so the timing
    streams weights from DRAM as a decode step does (a lone 17 MB layer would stay in a 50 MB L2).
    candidates may be a function giving the list: the engine's layers pass one, so that a call whose key is
    already chosen (every call after the first on CUDA) does not build the list (~0.1-0.5 ms of host time
    for the int4 kernels' 20-50 configs, per layer and eager step)."""
    cfg = chosen.get(key)
    if cfg is not None:
        return cfg
    if callable(candidates):
        candidates = candidates()
    if device.type != "cuda" or os.environ.get("ENGINE_QUANT_AUTOTUNE", "1") == "0":
        return candidates[0]
    path = cache_file(device)
    stored = _read(path).get(repr(key)) if path is not None else None
    if stored is not None and stored in candidates:
        chosen[key] = stored
        return stored
    if torch.cuda.is_current_stream_capturing():
        return candidates[0]
    t0 = time.perf_counter()
    sets = arg_sets()
    large = _large_x(sets[0])
    results = []
    reference = reference_large = None
    for cand in candidates:
        try:
            out = launch(cand, *sets[0])
            out_large = launch(cand, *large) if large is not None else None
            if reference is None:
                reference = out.float()
                if out_large is not None and bool(torch.isfinite(out_large).all()):
                    reference_large = out_large.float()
            elif not agrees(out, reference):  # a wrong candidate never wins (a miscompile, a bad tile)
                raise ValueError("output differs from the first candidate's")
            elif reference_large is not None and not agrees(out_large, reference_large):
                raise ValueError("output differs from the first candidate's with activations past float16's range")
            ms = _graph_time(lambda: [launch(cand, *a) for a in sets], len(sets))
        except Exception:  # noqa: BLE001 - a config this GPU or Triton cannot build is skipped
            ms = math.inf
        results.append((cand, ms))
    del sets
    best = min(results, key=lambda r: r[1])[0]
    chosen[key], timings[key] = best, results
    seconds[key] = time.perf_counter() - t0
    if path is not None:
        _write(path, repr(key), best)
    return best


def cache_file(device: torch.device) -> Path | None:
    """The file this device's tuned choices persist in (module docstring), or None when ENGINE_TUNING_CACHE=0 or
    the device cannot be described."""
    root = os.environ.get("ENGINE_TUNING_CACHE", str(Path.home() / ".cache" / "paged-workbench" / "tuning"))
    if root in ("", "0"):
        return None
    try:
        props = torch.cuda.get_device_properties(device)
    except Exception:  # noqa: BLE001 - no such device (a test's stand-in): nothing to persist
        return None
    import triton
    name = (f"{props.name}-sm{props.major}{props.minor}-{props.multi_processor_count}sms-torch{torch.__version__}"
            f"-triton{triton.__version__}-{_source_hash()}")
    return Path(root) / ("".join(c if c.isalnum() or c in ".-_" else "_" for c in name) + ".json")


@functools.cache
def _source_hash() -> str:
    """8 hex digits of the kernels' source (engine/quant, engine/kernels): edited kernels are tuned afresh."""
    engine = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for f in sorted([*(engine / "quant").glob("*.py"), *(engine / "kernels").glob("*.py")]):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:8]


def _read(path: Path) -> dict[str, dict]:
    """The choices stored in path (read once per process; an unreadable file counts as empty)."""
    table = _stored.get(str(path))
    if table is None:
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        _stored[str(path)] = table = table if isinstance(table, dict) else {}
    return table


def _write(path: Path, key: str, cfg: dict) -> None:
    """Store one choice: merged into the file as it is now (other processes may have added keys), written to a
    temporary file and renamed over it. A failure to write only costs a later process this key's tuning."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _stored.pop(str(path), None)
        table = dict(_read(path), **{key: cfg})
        text = json.dumps(table, indent=0, sort_keys=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = f.name
            f.write(text)
        os.replace(tmp, path)
        _stored[str(path)] = table
    except (OSError, TypeError, ValueError):
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _large_x(args: tuple) -> tuple | None:
    """args with the activations (the first argument) scaled to a largest magnitude of 1e5, past float16's
    range, or None when they cannot hold it (float16, fp8) or are all zero. A candidate that converts them
    to float16 on the way (triton_int8_mma did, where the compiler moved its scaling after the conversion)
    then returns inf or NaN, which never agrees."""
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.bfloat16, torch.float32) or x.numel() == 0:
        return None
    peak = float(x.abs().max())
    if not peak > 0:
        return None
    return (x * (1e5 / peak),) + tuple(args[1:])


def agrees(out: torch.Tensor, reference: torch.Tensor, rtol: float = 2e-2) -> bool:
    """Whether a candidate's output equals the first candidate's up to 16-bit rounding of the weights
    and of the sums (relative Frobenius error below rtol; NaN or inf anywhere never agrees)."""
    if out.shape != reference.shape:
        return False
    out = out.float()
    err = (out - reference).norm()
    return bool(torch.isfinite(err)) and float(err) <= rtol * float(reference.norm()) + 1e-6


@functools.cache
def _timing_stream(device_index: int) -> torch.cuda.Stream:
    """The one side stream all timings of a device capture on. torch gives every stream cuBLAS runs on a workspace
    of its own (32 MiB on sm_90) for the life of the process, and torch.cuda.Stream() hands out streams of a pool
    of 32 in turn: a new stream per timing could keep up to 1 GiB. (On an H200 a bf16 engine's other_bytes went
    from 0.21 to 0.75 GB once the tuning ran before the memory profile, benchmarks/memory_trims.py, which such
    workspaces would explain; with the one stream it read 0.28 GB, data/benchmarks/trim_diag_fp8_h200.log.)"""
    return torch.cuda.Stream(device_index)


def _graph_time(fn: Callable[[], object], calls: int, reps: int = 4) -> float:
    """Milliseconds per call of fn's launches, from replays of a CUDA graph of `reps` x fn (best of 3)."""
    stream = _timing_stream(torch.cuda.current_device())
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(reps):
                fn()
        best = math.inf
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
    torch.cuda.current_stream().wait_stream(stream)
    del graph
    return best / (reps * calls)


def weight_copies(weight_bytes: int, l2_bytes: int = 50 * 2**20) -> int:
    """How many copies of a layer's weights make a working set of about 3x the L2 cache (1 to 8)."""
    return max(1, min(8, math.ceil(3 * l2_bytes / max(weight_bytes, 1))))
